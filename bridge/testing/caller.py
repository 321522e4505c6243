"""Public helpers for tests of the bridge: :class:`TwilioCaller`, a Twilio caller double.

The double speaks Twilio's side of a call over real sockets, as Twilio does (protocols.md §1.2-1.4):

1. ``POST /twilio/voice`` with the form Twilio sends and an ``X-Twilio-Signature`` over the *public* URL;
2. the ``<Connect><Stream>`` TwiML is read; the stream socket is opened to the URL written there (its host
   swapped for where the bridge really listens), the upgrade signed over that URL exactly as written;
3. ``connected`` then ``start`` (with the TwiML ``<Parameter>``s), then caller audio at real pace;
4. what the bridge sends back is played like Twilio plays it: media in one FIFO at 8 bytes per ms, marks in
   the same FIFO and echoed when playback reaches them, ``clear`` dropping all buffered audio and echoing
   every pending mark at once. Every outbound message is checked like Twilio would; a violation is recorded
   in :attr:`TwilioCaller.violations`, not raised, so one test can see them all.

Times are the event loop's clock (``loop.time()``), the clock a bridge running in the same loop uses.

Example::

    async with TwilioCaller("http://127.0.0.1:8080", auth_token=TOKEN) as caller:
        await caller.dial()
        await caller.wait_for_played(1.0)  # the greeting
        await caller.speak(ulaw_hello)
        assert caller.violations == []
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
import orjson
import pybase64
from twilio.request_validator import RequestValidator

from bridge.config import STREAM_PATH, VOICE_PATH

__all__ = [
    "DEFAULT",
    "DEFAULT_ACCOUNT_SID",
    "FRAME_BYTES",
    "ULAW_SILENCE",
    "PlayedMark",
    "TwilioCaller",
    "TwilioCallerError",
]

FRAME_BYTES: Final = 160
"""One 20 ms μ-law frame, what Twilio sends per ``media`` message."""
FRAME_SECONDS: Final = 0.020
BYTES_PER_SECOND: Final = 8000
"""μ-law at 8 kHz: 8 bytes per ms, for playback and for ``heard_seconds``."""
ULAW_SILENCE: Final = b"\xff"
DEFAULT_ACCOUNT_SID: Final = "AC" + "5f1e0c2b8a9d4e7f" * 2

_OUTBOUND_FIELDS: Final[dict[str, frozenset[str]]] = {
    "media": frozenset({"event", "streamSid", "media"}),
    "mark": frozenset({"event", "streamSid", "mark"}),
    "clear": frozenset({"event", "streamSid"}),
}


class TwilioCallerError(AssertionError):
    """The bridge did not behave as Twilio needs (a bad webhook answer, a closed stream, ...)."""


class _Default(enum.Enum):
    DEFAULT = "DEFAULT"


DEFAULT: Final = _Default.DEFAULT
"""Sentinel for :meth:`TwilioCaller.connect_stream`: sign the upgrade as Twilio would."""


@dataclass
class PlayedMark:
    """A mark the double echoed back to the bridge."""

    name: str
    played: bool
    """True: playback reached it; False: a ``clear`` flushed it first."""
    at: float
    """Loop time of the echo."""


class _QueuedMark:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class TwilioCaller:
    """One phone call, as Twilio would place it against the bridge.

    ``base_url`` is where the bridge really listens (``http://127.0.0.1:PORT``); ``public_url`` is what the
    bridge believes its public URL is (default: ``base_url``). Signatures are computed over public URLs, as
    Twilio's are; connections go to ``base_url``'s host. ``auth_token=None`` sends no signatures (a bridge
    in insecure dev mode). The first inbound ``timestamp`` is ``first_timestamp_ms`` (Twilio's is rarely 0);
    playback is advanced every ``tick`` seconds, by elapsed loop time, so ticks never cause drift.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth_token: str | None,
        public_url: str | None = None,
        call_sid: str | None = None,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        from_: str = "+15551230001",
        to: str = "+15559870002",
        extra_form: Mapping[str, str] | None = None,
        first_timestamp_ms: int = 10,
        tick: float = 0.005,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.public_url = (public_url or base_url).rstrip("/")
        self.auth_token = auth_token
        self.call_sid = call_sid or "CA" + secrets.token_hex(16)
        self.account_sid = account_sid
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.from_ = from_
        self.to = to
        self.extra_form: dict[str, str] = dict(extra_form or {})
        self.first_timestamp_ms = first_timestamp_ms
        self.tick = tick

        # What the webhook answered (set by dial / post_voice).
        self.voice_status: int | None = None
        self.twiml: str | None = None
        self.stream_url: str | None = None
        self.parameters: dict[str, str] = {}

        # What the caller heard: the playback emulation.
        self.received_media: list[tuple[float, bytes]] = []
        """``(loop time, payload)`` of every outbound ``media``, as it arrived."""
        self.played = bytearray()
        """μ-law actually played, in order; flushed audio is never in it."""
        self.marks: list[PlayedMark] = []
        self.clears: list[float] = []
        """Loop times at which a ``clear`` arrived."""
        self.violations: list[str] = []
        """Messages from the bridge Twilio would have refused, each with the reason; should stay empty."""
        self.sent: list[str | bytes] = []
        """Every frame the double sent on the stream, in order."""
        self.closed = asyncio.Event()
        self.close_code: int | None = None

        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._send_lock = asyncio.Lock()
        self._sequence = 0
        self._chunk = 0
        self._stream_t0 = 0.0
        self._next_timestamp_ms = first_timestamp_ms
        self._next_frame_due = 0.0
        self._clears_returned = 0
        self._changed = asyncio.Event()
        self._audio_arrived = asyncio.Event()
        self._closing = False
        # Playback FIFO: audio chunks and marks; the head chunk is played from _head_offset on. Played
        # bytes are counted from _epoch (when playback last started from empty), so there is no drift.
        self._queue: deque[bytes | _QueuedMark] = deque()
        self._head_offset = 0
        self._epoch = 0.0
        self._epoch_bytes = 0

    # --- the call ---------------------------------------------------------------------------------------

    async def dial(self) -> None:
        """Place the call: webhook, TwiML, stream socket, ``connected`` and ``start``.

        Raises :class:`TwilioCallerError` if the webhook does not answer 200 with ``<Connect><Stream>``,
        and :class:`aiohttp.WSServerHandshakeError` if the bridge refuses the stream upgrade.
        """
        status, body = await self.post_voice()
        if status != 200:
            raise TwilioCallerError(f"POST {VOICE_PATH} answered {status}, not 200: {body[:300]!r}")
        self.accept_twiml(body)
        await self.connect_stream()

    async def post_voice(self) -> tuple[int, str]:
        """Send only the voice webhook, signed like Twilio's; return its status and body as they are.

        A 200 answer is kept in :attr:`twiml` (parsed into :attr:`stream_url` and :attr:`parameters` by
        :meth:`dial`). Use it to test refusals (draining, no capacity) that :meth:`dial` would raise on.
        """
        form = {
            "CallSid": self.call_sid,
            "AccountSid": self.account_sid,
            "From": self.from_,
            "To": self.to,
            "Direction": "inbound",
            "CallStatus": "ringing",
            "ApiVersion": "2010-04-01",
            **self.extra_form,
        }
        headers = {"User-Agent": "TwilioProxy/1.1", "Accept": "*/*"}
        if self.auth_token is not None:
            signed_url = self.public_url + VOICE_PATH
            headers["X-Twilio-Signature"] = RequestValidator(self.auth_token).compute_signature(
                signed_url, form
            )
        async with self._get_session().post(self.base_url + VOICE_PATH, data=form, headers=headers) as resp:
            body = await resp.text()
            self.voice_status = resp.status
            if resp.status == 200:
                content_type = resp.content_type
                if content_type not in ("text/xml", "application/xml"):
                    # Twilio error 12300: invalid Content-Type.
                    raise TwilioCallerError(f"POST {VOICE_PATH} answered Content-Type {content_type!r}")
                self.twiml = body
            return resp.status, body

    def accept_twiml(self, body: str) -> None:
        """Take the stream URL and parameters from the webhook's TwiML (as :meth:`dial` does)."""
        try:
            root = ET.fromstring(body)  # noqa: S314 -- the bridge under test is trusted
        except ET.ParseError as exc:
            raise TwilioCallerError(f"the webhook's answer is not XML: {body[:300]!r}") from exc
        stream = root.find("./Connect/Stream")
        if root.tag != "Response" or stream is None:
            raise TwilioCallerError(f"the TwiML has no <Response><Connect><Stream>: {body[:300]!r}")
        url = stream.get("url")
        if not url:
            raise TwilioCallerError("<Stream> has no url")
        url = urljoin(self.public_url + VOICE_PATH, url)  # Twilio allows a relative url
        parts = urlsplit(url)
        if parts.scheme != "wss" and not (parts.scheme == "ws" and self.public_url.startswith("http://")):
            raise TwilioCallerError(f"<Stream url={url!r}> is not wss:// (ws:// only for an http:// bridge)")
        if parts.query:
            # Twilio error 31920: a query string can fail the stream handshake.
            raise TwilioCallerError(f"<Stream url={url!r}> has a query string; use <Parameter>s")
        self.stream_url = url
        self.parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}

    async def connect_stream(
        self,
        *,
        signature: str | _Default | None = DEFAULT,
        parameters: Mapping[str, str] | None = None,
    ) -> None:
        """Open the stream socket and send ``connected`` and ``start``; the lower half of :meth:`dial`.

        ``signature``: :data:`DEFAULT` signs the stream URL as Twilio would (nothing without an auth
        token); a string is sent as is; ``None`` sends no signature. ``parameters`` replace the TwiML's
        ``<Parameter>``s in ``start.customParameters`` (e.g. a bad token). Without a prior :meth:`dial`, the
        stream URL is the public URL's ``ws(s)://`` twin plus ``/twilio/stream``.
        """
        if self._ws is not None:
            raise TwilioCallerError("the stream is already connected")
        if self.stream_url is None:
            scheme, rest = self.public_url.split("://", 1)
            self.stream_url = ("wss" if scheme == "https" else "ws") + "://" + rest + STREAM_PATH
        if signature is DEFAULT:
            signature = (
                None
                if self.auth_token is None
                else RequestValidator(self.auth_token).compute_signature(self.stream_url, {})
            )
        headers = {"User-Agent": "Twilio.TmeWs/1.0"}
        if signature is not None:
            headers["x-twilio-signature"] = signature  # Twilio sends it lowercase on upgrades
        self._ws = await self._get_session().ws_connect(
            self._dial_url(self.stream_url), headers=headers, autoping=True, heartbeat=None
        )
        loop = asyncio.get_running_loop()
        self._stream_t0 = loop.time()
        self._epoch = self._stream_t0
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"}, numbered=False)
        custom = dict(self.parameters if parameters is None else parameters)
        await self._send(
            {
                "event": "start",
                "sequenceNumber": None,
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": custom,
                },
                "streamSid": self.stream_sid,
            }
        )
        self._tasks = [
            asyncio.create_task(self._read(self._ws), name=f"twilio-caller-read-{self.call_sid}"),
            asyncio.create_task(self._play(), name=f"twilio-caller-play-{self.call_sid}"),
        ]

    def _dial_url(self, stream_url: str) -> str:
        parts = urlsplit(stream_url)
        base = urlsplit(self.base_url)
        return urlunsplit(
            ("wss" if base.scheme == "https" else "ws", base.netloc, parts.path, parts.query, "")
        )

    # --- what the caller sends ---------------------------------------------------------------------------

    async def speak(self, ulaw: bytes, *, realtime: bool = True) -> None:
        """Send caller audio as 160-byte ``media`` frames (the last one padded with silence).

        With ``realtime`` the frames go out 20 ms apart on a schedule against the loop clock (no drift;
        back-to-back calls continue the same grid); without it, as fast as possible. ``timestamp`` is ms
        since the stream started, from ``first_timestamp_ms``; ``chunk`` counts from 1. Returns early,
        without raising, if the bridge has closed the stream (Twilio stops sending too), so that a test
        racing a hang-up is not flaky; check :attr:`closed`.
        """
        if self._ws is not None and self._ws.closed and not self._closing:
            return
        ws = self._require_stream()
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = max(now, self._next_frame_due)
        timestamp = max(
            self._next_timestamp_ms, self.first_timestamp_ms + int((now - self._stream_t0) * 1000)
        )
        for start in range(0, len(ulaw), FRAME_BYTES):
            frame = ulaw[start : start + FRAME_BYTES]
            if len(frame) < FRAME_BYTES:
                frame += ULAW_SILENCE * (FRAME_BYTES - len(frame))
            if realtime:
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                due += FRAME_SECONDS
            if ws.closed:
                break
            self._chunk += 1
            try:
                await self._send(
                    {
                        "event": "media",
                        "sequenceNumber": None,
                        "media": {
                            "track": "inbound",
                            "chunk": str(self._chunk),
                            "timestamp": str(timestamp),
                            "payload": pybase64.b64encode_as_string(frame),
                        },
                        "streamSid": self.stream_sid,
                    }
                )
            except ConnectionResetError:
                break
            timestamp += 20
        self._next_timestamp_ms = timestamp
        if realtime:
            self._next_frame_due = due

    async def silence(self, seconds: float) -> None:
        """Send ``seconds`` of μ-law silence at real pace."""
        await self.speak(ULAW_SILENCE * round(seconds * BYTES_PER_SECOND))

    async def send_raw(self, data: str | bytes) -> None:
        """Send one frame as is (bytes as a binary frame), for bad-frame tests. No sequence number."""
        ws = self._require_stream()
        async with self._send_lock:
            if isinstance(data, bytes):
                await ws.send_bytes(data)
            else:
                await ws.send_str(data)
            self.sent.append(data)

    async def send_dtmf(self, digit: str) -> None:
        """The caller presses a key: a ``dtmf`` event."""
        self._require_stream()
        await self._send(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": None,
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    async def hang_up(self) -> None:
        """The caller hangs up: ``stop``, then the socket closes; waits until it has."""
        ws = self._require_stream()
        with contextlib.suppress(ConnectionResetError):  # the bridge closed first: nothing to say
            await self._send(
                {
                    "event": "stop",
                    "sequenceNumber": None,
                    "streamSid": self.stream_sid,
                    "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                }
            )
        await ws.close()
        await self.wait_closed()
        self.close_code = ws.close_code

    # --- what the caller heard ---------------------------------------------------------------------------

    def heard_seconds(self) -> float:
        """Seconds of the bridge's audio played so far (as of the last playback tick)."""
        return len(self.played) / BYTES_PER_SECOND

    def buffered_seconds(self) -> float:
        """Seconds of the bridge's audio buffered and not yet played."""
        queued = sum(len(item) for item in self._queue if isinstance(item, bytes))
        return (queued - self._head_offset) / BYTES_PER_SECOND

    async def wait_for_played(self, seconds: float, timeout: float = 10) -> None:  # noqa: ASYNC109 -- a test helper's API
        """Wait until at least ``seconds`` of the bridge's audio has been played.

        Raises :class:`TimeoutError`, or :class:`TwilioCallerError` if the stream closes first (playback
        stops with the socket: a bridge must wait for its last mark before hanging up).
        """
        target = round(seconds * BYTES_PER_SECOND)
        await self._wait_until(lambda: len(self.played) >= target, timeout, f"{seconds:g} s of audio played")

    async def wait_for_media(self, count: int = 1, timeout: float = 10) -> None:  # noqa: ASYNC109 -- a test helper's API
        """Wait until the bridge has sent at least ``count`` ``media`` messages."""
        await self._wait_until(lambda: len(self.received_media) >= count, timeout, f"{count} media messages")

    async def wait_for_clear(self, timeout: float = 10) -> float:  # noqa: ASYNC109 -- a test helper's API
        """Wait for the next ``clear`` not returned by an earlier call; return its loop time."""
        index = self._clears_returned
        await self._wait_until(lambda: len(self.clears) > index, timeout, "a clear")
        self._clears_returned = index + 1
        return self.clears[index]

    async def wait_closed(self, timeout: float = 5) -> None:  # noqa: ASYNC109 -- a test helper's API
        """Wait until the stream socket is closed (by either side)."""
        try:
            async with asyncio.timeout(timeout):
                await self.closed.wait()
        except TimeoutError:
            raise TimeoutError(f"the stream did not close within {timeout:g} s") from None

    async def _wait_until(self, done: Callable[[], bool], limit: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while not done():
            if self.closed.is_set():
                raise TwilioCallerError(
                    f"the stream closed (code {self.close_code}) before {what}; "
                    f"heard {self.heard_seconds():.3f} s, violations: {self.violations}"
                )
            changed = self._changed
            try:
                async with asyncio.timeout_at(deadline):
                    await changed.wait()
            except TimeoutError:
                raise TimeoutError(
                    f"timed out after {limit:g} s waiting for {what}; heard {self.heard_seconds():.3f} s, "
                    f"{len(self.received_media)} media, {len(self.marks)} marks, {len(self.clears)} clears"
                ) from None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # --- lifetime ----------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the socket and session and end the double's tasks; idempotent.

        Raises :class:`TwilioCallerError` if one of its tasks failed unexpectedly (a bug to see).
        """
        if self._closing:
            return
        self._closing = True
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
            self.close_code = self._ws.close_code
        if self._session is not None:
            await self._session.close()
        self.closed.set()
        self._notify()
        for result in results:
            if isinstance(result, Exception):
                raise TwilioCallerError(f"the caller double failed: {result!r}") from result

    async def __aenter__(self) -> TwilioCaller:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- internals: sending ------------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closing:
            raise TwilioCallerError("the caller is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _require_stream(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is None:
            raise TwilioCallerError("the stream is not connected: call dial() or connect_stream() first")
        if self._ws.closed or self._closing:
            raise TwilioCallerError(f"the stream is closed (code {self.close_code})")
        return self._ws

    async def _send(self, message: dict[str, Any], *, numbered: bool = True) -> None:
        """Send one message; number it (``sequenceNumber`` as a string, +1 per message) under the lock,
        so that numbers and wire order agree whichever task sends."""
        ws = self._ws
        assert ws is not None
        async with self._send_lock:
            if numbered:
                self._sequence += 1
                message["sequenceNumber"] = str(self._sequence)
            text = orjson.dumps(message).decode()
            await ws.send_str(text)
            self.sent.append(text)

    # --- internals: receiving and playback ---------------------------------------------------------------

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The one reader of the stream socket: validates and handles what the bridge sends."""
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self._violation("a binary frame (Twilio error 31950)")
        finally:
            self.close_code = ws.close_code
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()  # playback stops with the socket
            self.closed.set()
            self._notify()

    async def _play(self) -> None:
        """Advance playback by elapsed loop time every tick; echo marks as playback reaches them."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:  # idle: sleep until audio arrives rather than tick for nothing
                self._audio_arrived.clear()
                await self._audio_arrived.wait()
            await asyncio.sleep(self.tick)
            before = len(self.played)
            echoes = self._advance(loop.time())
            if echoes:
                await self._echo(echoes)
            if len(self.played) != before or echoes:
                self._notify()

    def _violation(self, reason: str) -> None:
        self.violations.append(reason)
        self._notify()

    async def _on_text(self, data: str) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._violation(f"not JSON (Twilio error 31951): {data[:80]!r}")
            return
        if type(message) is not dict:
            self._violation(f"not a JSON object (Twilio error 31951): {data[:80]!r}")
            return
        event = message.get("event")
        allowed = _OUTBOUND_FIELDS.get(event) if type(event) is str else None
        if allowed is None:
            self._violation(f"event {event!r} is not media, mark or clear (Twilio error 31951)")
            return
        keys = message.keys()
        if keys != allowed:
            extra = sorted(keys - allowed)
            missing = sorted(allowed - keys)
            self._violation(f"{event}: unknown fields {extra}, missing fields {missing} (Twilio error 31951)")
            return
        if message["streamSid"] != self.stream_sid:
            self._violation(f"{event}: streamSid {message['streamSid']!r} is not this stream's (31951)")
            return
        now = asyncio.get_running_loop().time()
        if event == "media":
            await self._on_media(message["media"], now)
        elif event == "mark":
            mark = message["mark"]
            if type(mark) is not dict or mark.keys() != {"name"} or type(mark["name"]) is not str:
                self._violation(f'mark: "mark" must be {{"name": string}}, not {mark!r} (31951)')
                return
            echoes = self._advance(now)
            self._queue.append(_QueuedMark(mark["name"]))
            echoes += self._advance(now)  # an empty buffer: echoed at once
            await self._echo(echoes)
        else:
            await self._on_clear(now)
        self._notify()

    async def _on_media(self, media: object, now: float) -> None:
        if type(media) is not dict or media.keys() != {"payload"} or type(media["payload"]) is not str:
            self._violation(f'media: "media" must be {{"payload": string}}, not {str(media)[:80]} (31951)')
            return
        try:
            payload = pybase64.b64decode(media["payload"], validate=True)
        except ValueError:
            self._violation("media: payload is not valid base64 (31951)")
            return
        if payload.startswith(b"RIFF"):
            self._violation("media: payload has a WAV header; it would play as noise")
        self.received_media.append((now, payload))
        echoes = self._advance(now)  # catch up first: the new audio queues behind what is playing
        if payload:
            self._queue.append(payload)
            self._audio_arrived.set()
        if echoes:
            await self._echo(echoes)

    async def _on_clear(self, now: float) -> None:
        echoes = self._advance(now)  # what played until now, played
        flushed = [item.name for item in self._queue if isinstance(item, _QueuedMark)]
        self._queue.clear()
        self._head_offset = 0
        self._epoch = now
        self._epoch_bytes = 0
        self.clears.append(now)
        await self._echo(echoes, flushed)

    def _advance(self, now: float) -> list[str]:
        """Play the FIFO up to ``now``; return the marks playback reached, in order (already recorded)."""
        queue = self._queue
        reached: list[str] = []
        budget = int((now - self._epoch) * BYTES_PER_SECOND) - self._epoch_bytes
        while queue:
            head = queue[0]
            if isinstance(head, _QueuedMark):
                queue.popleft()
                reached.append(head.name)
                continue
            if budget <= 0:
                break
            offset = self._head_offset
            take = min(len(head) - offset, budget)
            self.played += head[offset : offset + take]
            budget -= take
            self._epoch_bytes += take
            if offset + take == len(head):
                queue.popleft()
                self._head_offset = 0
            else:
                self._head_offset = offset + take
        if not queue:  # idle: the next audio starts playing when it arrives
            self._epoch = now
            self._epoch_bytes = 0
        for name in reached:
            self.marks.append(PlayedMark(name, True, now))
        return reached

    async def _echo(self, played: list[str], flushed: list[str] | None = None) -> None:
        """Echo marks to the bridge, ``played`` first; ``flushed`` ones are recorded as not played."""
        now = asyncio.get_running_loop().time()
        names = list(played)
        if flushed:
            self.marks.extend(PlayedMark(name, False, now) for name in flushed)
            names += flushed
        try:
            for name in names:
                await self._send(
                    {
                        "event": "mark",
                        "sequenceNumber": None,
                        "streamSid": self.stream_sid,
                        "mark": {"name": name},
                    }
                )
        except ConnectionResetError:
            pass  # the socket is closing; the reader will see it end

"""Public helpers for tests of the bridge: :class:`TwilioCaller`, a Twilio caller double.

The double speaks Twilio's side of a call over real sockets, as Twilio does (docs/protocols.md §1.2-1.4):

1. ``POST /twilio/voice`` with the form Twilio sends and an ``X-Twilio-Signature`` over the *public* URL;
2. the ``<Connect><Stream>`` TwiML is read; the stream socket is opened to the URL written there (its host
   swapped for where the bridge really listens), the upgrade signed over that URL exactly as written;
3. ``connected`` then ``start`` (with the TwiML ``<Parameter>``s), then caller audio at real pace;
4. what the bridge sends back is played like Twilio plays it: media in one FIFO at 8 bytes per ms, marks in
   the same FIFO and echoed when playback reaches them, ``clear`` dropping all buffered audio and echoing
   every pending mark at once (the model is :class:`~bridge.testing.playback.Playback`). Every outbound
   message is checked like Twilio would (:mod:`bridge.testing.checks`); a violation is recorded in
   :attr:`TwilioCaller.violations`, not raised, so one test can see them all.

Impairments of the Twilio leg, for tests of how the bridge copes: :attr:`TwilioCaller.burst` sends caller
frames in bursts (jitter), :meth:`TwilioCaller.stall` stalls the stream both ways for a while (playback
goes on from what is buffered), and :attr:`TwilioCaller.lose_echo` loses chosen mark echoes.

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
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final

import aiohttp
import orjson

from bridge.config import STREAM_PATH, VOICE_PATH
from bridge.testing import messages
from bridge.testing.checks import (
    BINARY_FRAME,
    OutboundClear,
    OutboundMark,
    OutboundMedia,
    TwilioCallerError,
    check_outbound,
    read_stream_twiml,
)
from bridge.testing.playback import BYTES_PER_SECOND, Playback, PlayedMark

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
ULAW_SILENCE: Final = b"\xff"
DEFAULT_ACCOUNT_SID: Final = "AC" + "5f1e0c2b8a9d4e7f" * 2


class _Default(enum.Enum):
    DEFAULT = "DEFAULT"


DEFAULT: Final = _Default.DEFAULT
"""Sentinel for :meth:`TwilioCaller.connect_stream`: sign the upgrade as Twilio would."""


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
        self.playback = Playback()
        """Twilio's playback FIFO for this call; :attr:`played` and :attr:`marks` are its."""
        self.received_media: list[tuple[float, bytes]] = []
        """``(loop time, payload)`` of every outbound ``media``, as it arrived."""
        self.clears: list[float] = []
        """Loop times at which a ``clear`` arrived."""
        self.violations: list[str] = []
        """Messages from the bridge Twilio would have refused, each with the reason; should stay empty."""
        self.sent: list[str | bytes] = []
        """Every frame the double sent on the stream, in order."""
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.burst = 1
        """Jitter: at real pace, caller frames go in bursts of this many, each when its last frame is due."""
        self.lose_echo: Callable[[str], bool] | None = None
        """Told each mark name as its echo is due; True loses that echo (it is never sent)."""
        self.lost_echoes: list[str] = []
        """The names of the echoes lost, in order."""

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
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def frames_sent(self) -> int:
        """How many ``media`` frames the caller has sent."""
        return self._chunk

    @property
    def played(self) -> bytearray:
        """μ-law actually played, in order; flushed audio is never in it."""
        return self.playback.played

    @property
    def marks(self) -> list[PlayedMark]:
        """Every mark echoed back to the bridge, played or flushed, in echo order."""
        return self.playback.marks

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
        form = messages.voice_form(
            call_sid=self.call_sid,
            account_sid=self.account_sid,
            from_=self.from_,
            to=self.to,
            extra=self.extra_form,
        )
        headers = messages.voice_headers(self.auth_token, self.public_url + VOICE_PATH, form)
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
        self.stream_url, self.parameters = read_stream_twiml(body, self.public_url)

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
            signature = messages.sign(self.auth_token, self.stream_url, {})
        self._ws = await self._get_session().ws_connect(
            messages.socket_url(self.stream_url, self.base_url),
            headers=messages.stream_headers(signature),
            autoping=True,
            heartbeat=None,
        )
        loop = asyncio.get_running_loop()
        self._stream_t0 = loop.time()
        await self._send(messages.connected(), numbered=False)
        custom = self.parameters if parameters is None else parameters
        await self._send(
            messages.start(
                stream_sid=self.stream_sid,
                account_sid=self.account_sid,
                call_sid=self.call_sid,
                custom=custom,
            )
        )
        self._tasks = [
            asyncio.create_task(self._read(self._ws), name=f"twilio-caller-read-{self.call_sid}"),
            asyncio.create_task(self._play(), name=f"twilio-caller-play-{self.call_sid}"),
        ]

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
                if self._chunk % self.burst == 0:  # the first frame of a burst: wait for its last one
                    delay = due + (self.burst - 1) * FRAME_SECONDS - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                due += FRAME_SECONDS
            if ws.closed:
                break
            self._chunk += 1
            try:
                await self._send(
                    messages.media(
                        stream_sid=self.stream_sid, chunk=self._chunk, timestamp=timestamp, payload=frame
                    )
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

    async def stall(self, seconds: float) -> None:
        """A network stall of the stream for ``seconds``: nothing is sent (caller media, mark echoes) and
        nothing the bridge sends is taken in, while playback goes on from what is buffered; then what
        waited goes at once, in order."""
        self._flowing.clear()
        try:
            async with self._send_lock:
                await asyncio.sleep(seconds)
        finally:
            self._flowing.set()

    async def send_dtmf(self, digit: str) -> None:
        """The caller presses a key: a ``dtmf`` event."""
        self._require_stream()
        await self._send(messages.dtmf(stream_sid=self.stream_sid, digit=digit))

    async def hang_up(self) -> None:
        """The caller hangs up: ``stop``, then the socket closes; waits until it has."""
        ws = self._require_stream()
        with contextlib.suppress(ConnectionResetError):  # the bridge closed first: nothing to say
            await self._send(
                messages.stop(
                    stream_sid=self.stream_sid, account_sid=self.account_sid, call_sid=self.call_sid
                )
            )
        await ws.close()
        await self.wait_closed()
        self.close_code = ws.close_code

    # --- what the caller heard ---------------------------------------------------------------------------

    def heard_seconds(self) -> float:
        """Seconds of the bridge's audio played so far (as of the last playback tick)."""
        return self.playback.heard_seconds()

    def buffered_seconds(self) -> float:
        """Seconds of the bridge's audio buffered and not yet played."""
        return self.playback.buffered_seconds()

    def peak_buffered_seconds(self) -> float:
        """The most seconds of the bridge's audio ever buffered and not yet played (as audio arrived)."""
        return self.playback.peak_buffered / BYTES_PER_SECOND

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
                if not self._flowing.is_set():
                    await self._flowing.wait()  # a stall: taken in when it ends
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self._violation(BINARY_FRAME)
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
        playback = self.playback
        while True:
            if playback.idle:  # idle: sleep until audio arrives rather than tick for nothing
                self._audio_arrived.clear()
                await self._audio_arrived.wait()
            await asyncio.sleep(self.tick)
            before = len(playback.played)
            echoes = playback.advance(loop.time())
            if echoes:
                await self._echo(echoes)
            if len(playback.played) != before or echoes:
                self._notify()

    def _violation(self, reason: str) -> None:
        self.violations.append(reason)
        self._notify()

    async def _on_text(self, data: str) -> None:
        checked = check_outbound(data, self.stream_sid)
        for reason in checked.violations:
            self._violation(reason)
        message = checked.message
        if message is None:
            return
        now = asyncio.get_running_loop().time()
        if isinstance(message, OutboundMedia):
            self.received_media.append((now, message.payload))
            echoes = self.playback.media(message.payload, now)
            if message.payload:
                self._audio_arrived.set()
            if echoes:
                await self._echo(echoes)
        elif isinstance(message, OutboundMark):
            await self._echo(self.playback.mark(message.name, now))
        else:
            assert isinstance(message, OutboundClear)
            reached, flushed = self.playback.clear(now)
            self.clears.append(now)
            await self._echo(reached + flushed)
        self._notify()

    async def _echo(self, names: list[str]) -> None:
        """Echo marks to the bridge, in order (playback has recorded them)."""
        try:
            for name in names:
                if self.lose_echo is not None and self.lose_echo(name):
                    self.lost_echoes.append(name)
                    continue
                await self._send(messages.mark(stream_sid=self.stream_sid, name=name))
        except ConnectionResetError:
            pass  # the socket is closing; the reader will see it end

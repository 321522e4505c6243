"""Twilio Media Streams: typed events, parse and serialize, TwiML, signatures and stream tokens.

The core of the Twilio leg, without I/O (protocols.md §1). :func:`parse_message` turns one inbound text
frame into a frozen event; the ``serialize_*`` functions build the three messages a bidirectional stream
may send back (``media``, ``mark``, ``clear``). Media is the hot path (300 calls x 50 frames/s each way on
one core), so it is parsed and built by hand rather than through a generic schema layer.

Twilio's quirks this parser tolerates (protocols.md §1.2): counters arrive as strings (ints are accepted
too), the first ``timestamp`` is often not 0, and ``customParameters``, ``sequenceNumber``, ``track`` and
``mediaFormat`` may be missing. Media ``chunk``/``timestamp`` and the details of ``stop`` may be missing too
(-> 0, ""), so that outbound ``media`` parses (fakes, replays) and no ``stop`` is ever skipped. Anything else
that is wrong raises :class:`MalformedMessage` with a short reason; the call goes on and the frame is
skipped.

Authentication of the stream socket has two gates: Twilio's signature on the upgrade request
(:func:`check_signature` over :func:`websocket_signature_urls`) and a one-time token bound to the CallSid,
which the webhook puts in a ``<Parameter>`` and the stream hands back in ``start.customParameters``
(:func:`make_stream_token`, :func:`verify_stream_token`, :class:`TokenLedger`).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
import pybase64
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from bridge.errors import AuthenticationFailed, LocalError, MalformedMessage

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PARAM_CALL_SID",
    "PARAM_FROM",
    "PARAM_TO",
    "PARAM_TOKEN",
    "Connected",
    "Dtmf",
    "Mark",
    "Media",
    "Start",
    "Stop",
    "TokenLedger",
    "TwilioEvent",
    "UnknownEvent",
    "check_signature",
    "connect_twiml",
    "make_stream_token",
    "parse_message",
    "reject_twiml",
    "serialize_clear",
    "serialize_mark",
    "serialize_media",
    "verify_stream_token",
    "websocket_signature_urls",
]

# Names of the <Parameter>s the webhook writes into the TwiML; they come back in start.customParameters.
PARAM_CALL_SID: Final = "CallSid"
PARAM_FROM: Final = "From"
PARAM_TO: Final = "To"
PARAM_TOKEN: Final = "token"  # noqa: S105 -- a parameter name, not a secret

MAX_MESSAGE_BYTES: int = 64 * 1024
"""Largest inbound frame we parse; a real media frame is ~400 bytes."""

DEFAULT_ENCODING: Final = "audio/x-mulaw"
DEFAULT_SAMPLE_RATE: Final = 8000
DEFAULT_CHANNELS: Final = 1

MAX_PARAMETER_CHARS: Final = 500
"""Twilio's limit on a <Parameter>'s name plus value (protocols.md §1.1, secondary source)."""


# --- events -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """``connected``: the first frame of every stream."""

    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class Start:
    """``start``: stream metadata, once, right after ``connected``."""

    stream_sid: str
    account_sid: str
    call_sid: str
    tracks: tuple[str, ...]
    custom_parameters: Mapping[str, str]
    """The TwiML ``<Parameter>``s, read-only."""
    encoding: str
    sample_rate: int
    channels: int
    sequence_number: int


@dataclass(frozen=True, slots=True)
class Media:
    """``media``: one chunk of the caller's audio."""

    stream_sid: str
    track: str
    chunk: int
    timestamp: int
    """Inbound presentation time in ms since the stream started; never a playback clock."""
    payload: bytes
    """Raw μ-law bytes, base64 already decoded."""
    sequence_number: int


@dataclass(frozen=True, slots=True)
class Mark:
    """``mark``: the echo of a mark we sent; played *or* flushed by a ``clear``."""

    stream_sid: str
    name: str
    sequence_number: int


@dataclass(frozen=True, slots=True)
class Dtmf:
    """``dtmf``: the caller pressed a key."""

    stream_sid: str
    track: str
    digit: str
    sequence_number: int


@dataclass(frozen=True, slots=True)
class Stop:
    """``stop``: the stream is ending (hang-up, redirect, ...)."""

    stream_sid: str
    account_sid: str
    call_sid: str
    sequence_number: int


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event type this module does not know; logged once per type by the caller, never a crash."""

    event: str


TwilioEvent = Connected | Start | Media | Mark | Dtmf | Stop | UnknownEvent


# --- parsing ------------------------------------------------------------------------------------------


def parse_message(data: str | bytes) -> TwilioEvent:
    """Parse one frame from Twilio into a typed event.

    Raises :class:`MalformedMessage` for a binary frame, an oversized frame, bad JSON, a value that is
    not an object, a missing or wrong-typed field, a payload that is not base64, or a counter that is
    not an integer. An unknown ``event`` is returned as :class:`UnknownEvent`.
    """
    if not isinstance(data, str):
        raise MalformedMessage("binary frame")
    size = len(data)
    # len() counts characters; only a frame near the limit can have more bytes than characters that matter.
    if size > MAX_MESSAGE_BYTES or (
        size * 4 > MAX_MESSAGE_BYTES and len(data.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES
    ):
        raise MalformedMessage(f"message is larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage("message is not valid JSON") from exc
    if type(message) is not dict:
        raise MalformedMessage("message is not a JSON object")
    event = message.get("event")
    if event == "media":  # the hot path first
        return _parse_media(message)
    if type(event) is not str:
        raise MalformedMessage("event is missing" if event is None else "event is not a string")
    parser = _PARSERS.get(event)
    if parser is None:
        return UnknownEvent(event)
    return parser(message)


def _parse_media(message: dict[str, Any]) -> Media:
    # The hot path: 50 frames/s per call. Checks are inlined; the slow, precise reasons come from the
    # general helpers only once something is already wrong.
    media = message.get("media")
    if type(media) is not dict:
        raise _bad("media", media, "an object")
    payload = media.get("payload")
    if type(payload) is not str:
        raise _bad("media.payload", payload, "a string")
    try:
        audio = pybase64.b64decode(payload, validate=True)
    except ValueError as exc:  # binascii.Error, or a non-ASCII str
        raise MalformedMessage("media.payload is not valid base64") from exc
    track = media.get("track", "inbound")
    if type(track) is not str:
        raise _bad("media.track", track, "a string")
    stream_sid = message.get("streamSid")
    if type(stream_sid) is not str:
        raise _bad("streamSid", stream_sid, "a string")
    # Counters are optional (-> 0) so that outbound media, which has none, parses too (fakes, replays).
    chunk = media.get("chunk")
    if type(chunk) is not str or not chunk.isdigit():
        chunk = _optional_counter(media, "chunk", "media.chunk")
    timestamp = media.get("timestamp")
    if type(timestamp) is not str or not timestamp.isdigit():
        timestamp = _optional_counter(media, "timestamp", "media.timestamp")
    sequence_number = message.get("sequenceNumber")
    if type(sequence_number) is not str or not sequence_number.isdigit():
        sequence_number = _optional_counter(message, "sequenceNumber", "sequenceNumber")
    try:
        return _new_media(stream_sid, track, int(chunk), int(timestamp), audio, int(sequence_number))
    except ValueError:  # a digit to isdigit() that int() refuses ("²"): let _counter name the field
        _counter(media, "chunk", "media.chunk")
        _counter(media, "timestamp", "media.timestamp")
        _counter(message, "sequenceNumber", "sequenceNumber")
        raise


def _slot_setter(cls: type, name: str) -> Callable[[object, object], None]:
    setter: Callable[[object, object], None] = cls.__dict__[name].__set__
    return setter


_MEDIA_SETTERS: Final = tuple(_slot_setter(Media, f.name) for f in fields(Media))
if tuple(f.name for f in fields(Media)) != (
    "stream_sid",
    "track",
    "chunk",
    "timestamp",
    "payload",
    "sequence_number",
):  # pragma: no cover - guards _new_media against a change of Media's fields
    raise LocalError("Media's fields changed: update _new_media")


def _new_media(
    stream_sid: str, track: str, chunk: int, timestamp: int, payload: bytes, sequence_number: int
) -> Media:
    """``Media(...)`` at about a third of the cost: a frozen dataclass's ``__init__`` goes through
    ``object.__setattr__`` per field, while the slot descriptors set the fields directly."""
    media = _object_new(Media)
    set_sid, set_track, set_chunk, set_timestamp, set_payload, set_sequence = _MEDIA_SETTERS
    set_sid(media, stream_sid)
    set_track(media, track)
    set_chunk(media, chunk)
    set_timestamp(media, timestamp)
    set_payload(media, payload)
    set_sequence(media, sequence_number)
    return media


_object_new: Final = object.__new__


def _parse_connected(message: dict[str, Any]) -> Connected:
    return Connected(_string(message, "protocol", "protocol"), _string(message, "version", "version"))


def _parse_start(message: dict[str, Any]) -> Start:
    start = _object(message, "start", "start")
    stream_sid = message.get("streamSid")
    inner_sid = start.get("streamSid")
    if stream_sid is None:  # Twilio sends both; either one will do
        stream_sid = inner_sid
        if stream_sid is None:
            raise MalformedMessage("streamSid is missing")
    if type(stream_sid) is not str:
        raise _bad("streamSid", stream_sid, "a string")
    if inner_sid is not None and inner_sid != stream_sid:
        raise MalformedMessage("start.streamSid differs from streamSid")

    tracks_raw = start.get("tracks")
    if tracks_raw is None:
        tracks: tuple[str, ...] = ("inbound",)
    elif type(tracks_raw) is list and all(type(t) is str for t in tracks_raw):
        tracks = tuple(tracks_raw)
    else:
        raise MalformedMessage("start.tracks is not a list of strings")

    params_raw = start.get("customParameters")
    if params_raw is None:
        params: dict[str, str] = {}
    elif type(params_raw) is dict and all(type(v) is str for v in params_raw.values()):
        params = params_raw
    else:
        raise MalformedMessage("start.customParameters is not an object of strings")

    media_format = start.get("mediaFormat")
    if media_format is None:
        media_format = {}
    elif type(media_format) is not dict:
        raise _bad("start.mediaFormat", media_format, "an object")
    encoding = media_format.get("encoding", DEFAULT_ENCODING)
    if type(encoding) is not str:
        raise _bad("start.mediaFormat.encoding", encoding, "a string")
    sample_rate = (
        _counter(media_format, "sampleRate", "start.mediaFormat.sampleRate")
        if "sampleRate" in media_format
        else DEFAULT_SAMPLE_RATE
    )
    channels = (
        _counter(media_format, "channels", "start.mediaFormat.channels")
        if "channels" in media_format
        else DEFAULT_CHANNELS
    )
    return Start(
        stream_sid=stream_sid,
        account_sid=_string(start, "accountSid", "start.accountSid"),
        call_sid=_string(start, "callSid", "start.callSid"),
        tracks=tracks,
        custom_parameters=MappingProxyType(params),
        encoding=encoding,
        sample_rate=sample_rate,
        channels=channels,
        sequence_number=_sequence_number(message),
    )


def _parse_mark(message: dict[str, Any]) -> Mark:
    mark = _object(message, "mark", "mark")
    return Mark(_stream_sid(message), _string(mark, "name", "mark.name"), _sequence_number(message))


def _parse_dtmf(message: dict[str, Any]) -> Dtmf:
    dtmf = _object(message, "dtmf", "dtmf")
    track = dtmf.get("track", "inbound_track")  # what Twilio names the track in dtmf events
    if type(track) is not str:
        raise _bad("dtmf.track", track, "a string")
    digit = _string(dtmf, "digit", "dtmf.digit")
    if not digit:
        raise MalformedMessage("dtmf.digit is empty")
    return Dtmf(_stream_sid(message), track, digit, _sequence_number(message))


def _parse_stop(message: dict[str, Any]) -> Stop:
    # A stop must never be skipped for want of details: the SIDs default to "" when absent.
    stop = message.get("stop")
    if stop is None:
        stop = {}
    elif type(stop) is not dict:
        raise _bad("stop", stop, "an object")
    account_sid = stop.get("accountSid", "")
    if type(account_sid) is not str:
        raise _bad("stop.accountSid", account_sid, "a string")
    call_sid = stop.get("callSid", "")
    if type(call_sid) is not str:
        raise _bad("stop.callSid", call_sid, "a string")
    return Stop(_stream_sid(message), account_sid, call_sid, _sequence_number(message))


_PARSERS: Final[dict[str, Callable[[dict[str, Any]], TwilioEvent]]] = {
    "connected": _parse_connected,
    "start": _parse_start,
    "mark": _parse_mark,
    "dtmf": _parse_dtmf,
    "stop": _parse_stop,
}


def _bad(name: str, value: object, expected: str) -> MalformedMessage:
    if value is None:
        return MalformedMessage(f"{name} is missing")
    return MalformedMessage(f"{name} is not {expected}")


def _object(container: dict[str, Any], key: str, name: str) -> dict[str, Any]:
    value = container.get(key)
    if type(value) is not dict:
        raise _bad(name, value, "an object")
    return value


def _string(container: dict[str, Any], key: str, name: str) -> str:
    value = container.get(key)
    if type(value) is not str:
        raise _bad(name, value, "a string")
    return value


def _stream_sid(message: dict[str, Any]) -> str:
    value = message.get("streamSid")
    if type(value) is not str:
        raise _bad("streamSid", value, "a string")
    return value


def _counter(container: dict[str, Any], key: str, name: str) -> int:
    """A non-negative integer that Twilio sends as a string of digits (an int is accepted too)."""
    value = container.get(key)
    if type(value) is str:
        # isascii() first: isdigit() alone accepts "²", which int() refuses.
        if value.isascii() and value.isdigit():
            try:
                return int(value)
            except ValueError:  # more digits than int() will read (4300)
                pass
    elif type(value) is int:
        if value >= 0:
            return value
    elif value is None:
        raise MalformedMessage(f"{name} is missing")
    raise MalformedMessage(f"{name} is not an integer")


def _optional_counter(container: dict[str, Any], key: str, name: str) -> int:
    """Like :func:`_counter`, but a missing (or null) counter is 0."""
    if container.get(key) is None:
        return 0
    return _counter(container, key, name)


def _sequence_number(message: dict[str, Any]) -> int:
    return _optional_counter(message, "sequenceNumber", "sequenceNumber")


# --- serializing --------------------------------------------------------------------------------------
# A pre-built template is 1.5-2x as fast as an orjson dict dump for media (timeit, 160 B); it is only
# used when the streamSid needs no JSON escaping, which holds for every real SID (MZ + 32 hex digits).


def serialize_media(stream_sid: str, payload: bytes) -> str:
    """``{"event":"media","streamSid":S,"media":{"payload":B64}}``: raw μ-law, no file header."""
    if stream_sid.isalnum():
        return (
            '{"event":"media","streamSid":"'
            + stream_sid
            + '","media":{"payload":"'
            + pybase64.b64encode_as_string(payload)
            + '"}}'
        )
    return orjson.dumps(
        {
            "event": "media",
            "streamSid": stream_sid,
            "media": {"payload": pybase64.b64encode_as_string(payload)},
        }
    ).decode()


def serialize_mark(stream_sid: str, name: str) -> str:
    """``{"event":"mark","streamSid":S,"mark":{"name":N}}``: Twilio echoes it when playback reaches it."""
    return orjson.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}).decode()


def serialize_clear(stream_sid: str) -> str:
    """``{"event":"clear","streamSid":S}``: drop all buffered audio; pending marks echo at once."""
    return orjson.dumps({"event": "clear", "streamSid": stream_sid}).decode()


# --- TwiML --------------------------------------------------------------------------------------------


def connect_twiml(
    stream_url: str,
    parameters: Mapping[str, str],
    *,
    status_callback: str | None = None,
    action: str | None = None,
    say_first: str | None = None,
) -> str:
    """``<Response><Connect><Stream url=…><Parameter …/>…</Stream></Connect></Response>``.

    ``stream_url`` must be an absolute ``ws(s)://`` URL without a query string (a query string can fail
    Twilio's handshake, error 31920); per-call values go in ``parameters``. When the bridge closes the
    stream socket, Twilio requests ``action`` (if given) for what to do next, else hangs up.
    ``say_first`` is spoken by Twilio before the stream connects (e.g. a recording notice).
    """
    parts = urlsplit(stream_url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise LocalError(f"stream URL {stream_url!r} is not an absolute ws:// or wss:// URL")
    if parts.query or parts.fragment or "?" in stream_url:
        raise LocalError(f"stream URL {stream_url!r} has a query string: pass values as parameters")
    for name, value in parameters.items():
        if len(name) + len(value) >= MAX_PARAMETER_CHARS:
            raise LocalError(f"TwiML parameter {name!r} is too long for Twilio ({MAX_PARAMETER_CHARS} chars)")
    response = VoiceResponse()
    if say_first:
        response.say(say_first)
    connect = response.connect() if action is None else response.connect(action=action, method="POST")
    if status_callback is None:
        stream = connect.stream(url=stream_url)
    else:
        stream = connect.stream(url=stream_url, status_callback=status_callback)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    return str(response)


def reject_twiml(message: str) -> str:
    """``<Response><Say>message</Say><Hangup/></Response>``: refuse a call politely (draining, full)."""
    response = VoiceResponse()
    if message:
        response.say(message)
    response.hangup()
    return str(response)


# --- signatures ---------------------------------------------------------------------------------------


def check_signature(auth_token: str, url: str, params: Mapping[str, str], signature: str | None) -> bool:
    """True if ``signature`` (the ``X-Twilio-Signature`` header) signs ``url`` and the POST ``params``.

    ``url`` is the public URL Twilio requested, built from configuration, never from ``Host`` or
    ``X-Forwarded-*``. A missing or empty signature, or an empty auth token, never passes.
    """
    if not signature or not auth_token:
        return False
    # Passed as is: a MultiDict (aiohttp's request.post()) keeps repeated fields, which Twilio signs too.
    return bool(RequestValidator(auth_token).validate(url, params, signature))


def websocket_signature_urls(stream_url: str) -> tuple[str, ...]:
    """The URL forms whose signature is accepted on the stream upgrade (protocols.md §1.4).

    Twilio signs the ``wss://`` URL exactly as written in the TwiML; its ``https://`` twin is accepted
    too, since which form Twilio signs is not documented and the HMAC key is secret either way. Ports are
    handled by :func:`check_signature`, which tries each URL with and without one.
    """
    scheme, sep, rest = stream_url.partition("://")
    twin = {"wss": "https", "ws": "http", "https": "wss", "http": "ws"}.get(scheme.lower())
    if not sep or twin is None:
        return (stream_url,)
    return (stream_url, twin + "://" + rest)


# --- one-time stream tokens ---------------------------------------------------------------------------
# Format: "<expiry>.<nonce>.<mac>"; expiry in whole seconds of the clock the caller passes as `now`,
# nonce from secrets.token_urlsafe, mac = urlsafe-b64(HMAC-SHA256(secret, "<call_sid>.<expiry>.<nonce>"))
# without padding. The CallSid is not in the token: it is bound by the MAC.

_NONCE_BYTES: Final = 16
_MAC_CHARS: Final = 43  # 32 bytes of HMAC-SHA256, base64 without padding
_MAX_TOKEN_CHARS: Final = 256
_URLSAFE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _token_mac(secret: bytes, call_sid: str, expiry: str, nonce: str) -> str:
    digest = hmac.new(secret, f"{call_sid}.{expiry}.{nonce}".encode(), hashlib.sha256).digest()
    return pybase64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def make_stream_token(secret: bytes, call_sid: str, *, now: float, ttl: float) -> str:
    """A one-time token for the ``token`` parameter, bound to ``call_sid``, valid until ``now + ttl``."""
    if not secret:
        raise LocalError("the stream token secret is empty")
    if not ttl > 0:
        raise LocalError(f"stream token ttl must be positive, not {ttl!r}")
    expiry = str(math.ceil(now + ttl))
    nonce = secrets.token_urlsafe(_NONCE_BYTES)
    return f"{expiry}.{nonce}.{_token_mac(secret, call_sid, expiry, nonce)}"


def verify_stream_token(secret: bytes, call_sid: str, token: str, *, now: float) -> tuple[str, float]:
    """Check a token from ``start.customParameters``; return ``(nonce, expiry)`` for the ledger.

    Raises :class:`AuthenticationFailed` with ``"stream token malformed"``, ``"stream token is for
    another call (or was altered)"`` or ``"stream token expired"``. The MAC is checked before the expiry,
    so an altered expiry is reported as altered, not as expired. Pass the result to
    :meth:`TokenLedger.use` to make the token one-time.
    """
    if not secret:
        raise LocalError("the stream token secret is empty")
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS:
        raise AuthenticationFailed("stream token malformed")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthenticationFailed("stream token malformed")
    expiry, nonce, mac = parts
    if (
        not (expiry.isascii() and expiry.isdigit() and len(expiry) <= 15)
        or not nonce
        or not _URLSAFE.issuperset(nonce)
        or len(mac) != _MAC_CHARS
        or not _URLSAFE.issuperset(mac)
    ):
        raise AuthenticationFailed("stream token malformed")
    if not hmac.compare_digest(_token_mac(secret, call_sid, expiry, nonce), mac):
        raise AuthenticationFailed("stream token is for another call (or was altered)")
    expires_at = float(int(expiry))
    if now >= expires_at:
        raise AuthenticationFailed("stream token expired")
    return nonce, expires_at


class TokenLedger:
    """Remembers used nonces until they expire, so each token is accepted once.

    Per process: behind a load balancer a token could be replayed on another instance within its ttl,
    which the short ttl and the CallSid binding keep harmless.
    """

    __slots__ = ("_expiries", "_used")

    def __init__(self) -> None:
        self._used: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []  # a heap, for pruning in expiry order

    def __len__(self) -> int:
        return len(self._used)

    def use(self, nonce: str, expiry: float, *, now: float) -> bool:
        """Record ``nonce`` as used; False if it was used before or has already expired.

        Entries whose expiry has passed are pruned first; an expired nonce is refused rather than
        recorded, so pruning can never make a token usable again.
        """
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, old = heapq.heappop(heap)
            self._used.pop(old, None)
        if expiry <= now or nonce in self._used:
            return False
        self._used[nonce] = expiry
        heapq.heappush(heap, (expiry, nonce))
        return True

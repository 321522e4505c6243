"""The call-recording format: JSON Lines, a versioned header, then every message of both sockets.

A recording is one file per call::

    {"format": "bridge-call-recording", "version": 2, "bridge_version": "0.1.0", "call_sid": "CA…", …}
    {"t": 0.0, "src": "model", "dir": "out", "msg": {"type": "session.update", …}}
    {"t": 412.7, "src": "twilio", "dir": "in", "msg": {"event": "start", …}}
    {"t": 413.1, "src": "twilio", "dir": "in", "raw": "{not json"}
    {"t": 1795000.4, "src": "model", "dir": "in", "s": 2, "msg": {"type": "session.created", …}}

``t`` is milliseconds since the call began (the webhook), ``src`` the socket (``twilio`` or ``model``),
``dir`` whether the message came ``in`` to the bridge or went ``out`` of it. ``msg`` is the message as it
crossed the wire when it was a JSON object; anything else is kept verbatim in ``raw`` (text) or ``b64``
(a binary frame), so malformed input replays exactly as it arrived.

One call may use several Realtime sessions (WebSocket connections to the model): a planned rollover to a
fresh session before the service's cap, or a reconnection after a drop. They are numbered 1, 2, 3… in
the order the bridge opened them (a session opened but never used still takes its number), and a model
line says which one it crossed in ``s``, written only when it is not 1: a call with one session reads
exactly as a version 1 file. ``s`` is never on a Twilio line (the call has one Twilio stream).

Versions: 1 had no ``s``; 2 added it. This reader reads both and refuses a newer version with a message
that says to upgrade the bridge (which is also what a version 1 reader says of a version 2 file).

Secrets never enter a recording: the bridge records messages, never HTTP or WebSocket headers, and the
one-time stream token in Twilio's ``start`` is replaced by ``"[redacted]"``.

This module does no I/O: :class:`RecordingWriter` writes lines to a sink it is given, and
:func:`parse_recording` reads lines it is given. It also accepts a plain capture of Twilio messages (one
JSON message per line, no header) as a caller-only recording. The reader tolerates a truncated last
line, which is what a crash in the middle of a call leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import pybase64

from bridge.errors import MalformedMessage

FORMAT = "bridge-call-recording"
VERSION = 2
"""The format version this bridge writes; it reads every version from 1 to this one."""
REDACTED = "[redacted]"
SECRET_PARAMETERS = frozenset({"token"})

Source = Literal["twilio", "model"]
Direction = Literal["in", "out"]


@dataclass(frozen=True, slots=True)
class Header:
    """What a recording says about its call."""

    call_sid: str
    version: int = VERSION
    bridge_version: str = ""
    started_at: str = ""
    from_number: str = ""
    to_number: str = ""
    dialect: str = "ga"
    audio_path: str = "pcm16"
    session: Mapping[str, Any] = field(default_factory=dict)
    """The effective session config the bridge asked for (the ``session`` of its ``session.update``)."""
    profile: Mapping[str, Any] = field(default_factory=dict)
    caller_only: bool = False
    """True for a plain Twilio capture: there is no model side to compare with."""
    rollover: Mapping[str, float] = field(default_factory=dict)
    """The bridge's rollover settings for the call (``margin``, ``max_session``, ``model_idle``, in
    seconds), so that a replay swaps sessions when the call did; empty in recordings made before them."""
    greeting_audio: bytes = b""
    """The pre-rendered greeting the call played (μ-law 8 kHz), so a replay can play it too."""

    def to_json(self) -> dict[str, Any]:
        """The header line's object."""
        return {
            "format": FORMAT,
            "version": self.version,
            "bridge_version": self.bridge_version,
            "started_at": self.started_at,
            "call_sid": self.call_sid,
            "from": self.from_number,
            "to": self.to_number,
            "dialect": self.dialect,
            "audio_path": self.audio_path,
            "session": dict(self.session),
            "profile": dict(self.profile),
            **({"rollover": dict(self.rollover)} if self.rollover else {}),
            **(
                {"greeting_audio": pybase64.b64encode(self.greeting_audio).decode()}
                if self.greeting_audio
                else {}
            ),
        }


@dataclass(frozen=True, slots=True)
class Event:
    """One message that crossed one of the call's sockets."""

    t: float
    """Milliseconds since the call began."""
    src: Source
    dir: Direction
    msg: Mapping[str, Any] | None = None
    raw: str | None = None
    data: bytes | None = None
    """A binary frame's bytes."""
    session: int = 1
    """The Realtime session (1, 2, 3… in the order the bridge opened them) a model message crossed;
    always 1 for a Twilio message."""

    @property
    def wire(self) -> str | bytes:
        """The message as it is sent again on replay."""
        if self.msg is not None:
            return orjson.dumps(self.msg).decode()
        if self.data is not None:
            return self.data
        return self.raw or ""

    @property
    def kind(self) -> str:
        """The Twilio ``event`` or Realtime ``type`` of the message (``""`` when it has none)."""
        if self.msg is None:
            return ""
        value = self.msg.get("event" if self.src == "twilio" else "type", "")
        return value if isinstance(value, str) else ""


@dataclass(frozen=True, slots=True)
class Recording:
    """A parsed recording: its header and its events in time order."""

    header: Header
    events: tuple[Event, ...]
    truncated: bool = False
    """The last line was cut short (a crash mid-call) and was left out."""

    def select(self, src: Source, direction: Direction, session: int | None = None) -> list[Event]:
        """The events of one socket in one direction; with ``session``, only those of that Realtime
        session (Twilio events are all in session 1)."""
        return [
            e
            for e in self.events
            if e.src == src and e.dir == direction and (session is None or e.session == session)
        ]

    @property
    def sessions(self) -> int:
        """How many Realtime sessions the call used: the highest session number of a model message
        (1 when there is none)."""
        return max((e.session for e in self.events if e.src == "model"), default=1)

    @property
    def duration_ms(self) -> float:
        """Time of the last event."""
        return self.events[-1].t if self.events else 0.0


def redact(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """``message`` with secrets replaced: the stream token in a Twilio ``start``."""
    start = message.get("start")
    if message.get("event") != "start" or not isinstance(start, dict):
        return message
    params = start.get("customParameters")
    if not isinstance(params, dict) or not SECRET_PARAMETERS & params.keys():
        return message
    clean = {k: (REDACTED if k in SECRET_PARAMETERS else v) for k, v in params.items()}
    return {**message, "start": {**start, "customParameters": clean}}


def encode_event(t: float, src: Source, direction: Direction, wire: str | bytes, session: int = 1) -> str:
    """One recording line (without the newline) for a message as it crossed the wire.

    ``session`` is the number of the Realtime session a model message crossed; it is written (``"s"``)
    only when it is not 1. Raises :class:`ValueError` for a session that is not a positive int, or not
    1 on a Twilio message: the reader would refuse the line.
    """
    line: dict[str, Any] = {"t": round(t, 1), "src": src, "dir": direction}
    if session != 1:
        if isinstance(session, bool) or not isinstance(session, int) or session < 1:
            raise ValueError(f"a Realtime session number is a positive int, not {session!r}")
        if src != "model":
            raise ValueError("only a model message has a Realtime session number")
        line["s"] = session
    if isinstance(wire, bytes):
        line["b64"] = pybase64.b64encode(wire).decode("ascii")
    else:
        try:
            parsed = orjson.loads(wire)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            line["msg"] = redact(parsed) if src == "twilio" else parsed
        else:
            line["raw"] = wire
    return orjson.dumps(line).decode()


class RecordingWriter:
    """Writes a recording line by line to ``sink`` (a function that writes and flushes text)."""

    def __init__(self, header: Header, sink: Callable[[str], None]) -> None:
        self._sink = sink
        self.closed = False
        sink(orjson.dumps(header.to_json()).decode() + "\n")

    def write(self, t: float, src: Source, direction: Direction, wire: str | bytes, session: int = 1) -> None:
        """Record one message; ``session``: the Realtime session a model message crossed (see
        :func:`encode_event`)."""
        if not self.closed:
            self._sink(encode_event(t, src, direction, wire, session) + "\n")

    def close(self) -> None:
        """Write nothing more."""
        self.closed = True


def _header(obj: dict[str, Any]) -> Header:
    version = obj.get("version")
    if not isinstance(version, int) or version < 1:
        raise MalformedMessage("the recording header has no valid version")
    if version > VERSION:
        raise MalformedMessage(
            f"the recording is format version {version}, newer than this bridge reads ({VERSION}): "
            "upgrade the bridge"
        )
    session = obj.get("session")
    profile = obj.get("profile")
    greeting = obj.get("greeting_audio")
    try:
        greeting_audio = pybase64.b64decode(greeting, validate=True) if isinstance(greeting, str) else b""
    except ValueError:
        raise MalformedMessage("the recording header's greeting_audio is not valid base64") from None
    raw_rollover = obj.get("rollover")
    rollover = (
        {
            k: float(v)
            for k, v in raw_rollover.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if isinstance(raw_rollover, dict)
        else {}
    )
    return Header(
        rollover=rollover,
        greeting_audio=greeting_audio,
        call_sid=str(obj.get("call_sid", "")),
        version=version,
        bridge_version=str(obj.get("bridge_version", "")),
        started_at=str(obj.get("started_at", "")),
        from_number=str(obj.get("from", "")),
        to_number=str(obj.get("to", "")),
        dialect=str(obj.get("dialect", "ga")),
        audio_path=str(obj.get("audio_path", "pcm16")),
        session=session if isinstance(session, dict) else {},
        profile=profile if isinstance(profile, dict) else {},
    )


def _event(obj: dict[str, Any], where: str) -> Event:
    t, src, direction = obj.get("t"), obj.get("src"), obj.get("dir")
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise MalformedMessage(f"{where}: 't' is not a number")
    if src not in ("twilio", "model") or direction not in ("in", "out"):
        raise MalformedMessage(f"{where}: 'src' must be twilio or model and 'dir' in or out")
    session = obj.get("s", 1)
    if "s" in obj:
        if isinstance(session, bool) or not isinstance(session, int) or session < 1:
            raise MalformedMessage(f"{where}: 's' (the Realtime session) is not a positive integer")
        if src != "model":
            raise MalformedMessage(f"{where}: 's' (the Realtime session) is only for model messages")
    msg, raw, b64 = obj.get("msg"), obj.get("raw"), obj.get("b64")
    if isinstance(msg, dict):
        return Event(float(t), src, direction, msg=msg, session=session)
    if isinstance(raw, str):
        return Event(float(t), src, direction, raw=raw, session=session)
    if isinstance(b64, str):
        try:
            data = pybase64.b64decode(b64, validate=True)
            return Event(float(t), src, direction, data=data, session=session)
        except ValueError:
            raise MalformedMessage(f"{where}: 'b64' is not valid base64") from None
    raise MalformedMessage(f"{where}: the event has no msg, raw or b64")


def _capture_time(message: dict[str, Any], last: float) -> float:
    """The time of a plain Twilio capture line: media ``timestamp`` where there is one."""
    media = message.get("media")
    if message.get("event") == "media" and isinstance(media, dict):
        try:
            return float(media.get("timestamp", last))
        except (TypeError, ValueError):
            return last
    return last


def parse_recording(lines: Iterable[str], *, name: str = "recording") -> Recording:
    """Parse a recording's lines; a plain Twilio capture becomes a caller-only recording.

    Raises :class:`~bridge.errors.MalformedMessage` naming the line when the file is not a recording;
    a last line cut short is left out and flagged in :attr:`Recording.truncated`.
    """
    rows: list[tuple[int, str]] = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not rows:
        raise MalformedMessage(f"{name} is empty")
    parsed: list[dict[str, Any]] = []
    truncated = False
    for index, (number, line) in enumerate(rows):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            if index == len(rows) - 1 and index > 0:
                truncated = True  # what a crash mid-write leaves: keep everything before it
                break
            raise MalformedMessage(f"{name}:{number} is not JSON") from None
        if not isinstance(obj, dict):
            raise MalformedMessage(f"{name}:{number} is not a JSON object")
        parsed.append(obj)

    first = parsed[0]
    if first.get("format") == FORMAT:
        header = _header(first)
        events = [_event(obj, f"{name}:{rows[i + 1][0]}") for i, obj in enumerate(parsed[1:])]
        return Recording(header, tuple(sorted(events, key=lambda e: e.t)), truncated)

    if "event" not in first:
        raise MalformedMessage(
            f"{name} is neither a bridge recording (no '{FORMAT}' header) nor a capture of Twilio messages"
        )
    # A plain capture of Twilio stream messages: the caller side only.
    events = []
    t = 0.0
    call_sid = ""
    for obj in parsed:
        t = _capture_time(obj, t)
        start = obj.get("start")
        if obj.get("event") == "start" and isinstance(start, dict):
            call_sid = str(start.get("callSid", ""))
        events.append(Event(t, "twilio", "in", msg=redact(obj)))
    header = Header(call_sid=call_sid or "capture", caller_only=True)
    return Recording(header, tuple(events), truncated)

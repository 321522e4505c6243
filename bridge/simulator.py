"""The local Realtime model: a loopback WebSocket server speaking both Azure OpenAI Realtime dialects.

It is the embedded default model of ``bridge serve`` (when no Azure settings are given) and the test double
of the suite and the benchmarks. It implements the wire protocol on its own (protocols.md §2), never through
``bridge.realtime``, so that a mistake in our adapter cannot be mirrored here and go unnoticed.

Theory of operation, per connection (:class:`ModelConnection`):

* The handshake (``process_request``) picks the dialect from the URL: ``/openai/v1/realtime?model=DEP`` is
  GA, ``/openai/realtime?api-version=V&deployment=DEP`` is preview. It checks auth (``api-key`` header,
  ``Authorization: Bearer``, or ``?api-key=``) and applies injected faults (:meth:`LocalModel.reject_next`,
  :attr:`LocalModel.connect_delay`).
* One reader handles client events in order. Every server event goes through :meth:`ModelConnection._send`,
  which stamps an ``event_id``, records the event in :attr:`ModelConnection.sent` and writes it.
* ``input_audio_buffer.append`` extends the input timeline (ms of all audio appended this session) and,
  with ``server_vad``/``semantic_vad``, feeds an energy VAD over 10 ms frames. ``threshold`` t maps
  linearly in dB to a frame RMS of ``-70 + 60·t`` dBFS: 0.5 is -40 dBFS, well under telephone speech
  (about -30 to -15 dBFS) and well over line silence and low noise (under -55 dBFS). ``semantic_vad`` is the
  same detector at threshold 0.5, its ``eagerness`` choosing the silence that ends a turn
  (:data:`EAGERNESS_SILENCE_MS`).
* A response runs as one task that paces audio deltas at ``speed``× real time. Barge-in and
  ``response.cancel`` set its stop reason and wait for it; the task always sends the end events itself, so
  no delta can follow ``response.done``. Content is an echo test: a greeting signal (C-E-G tones) while the
  caller has said nothing, else a 660 Hz beep followed by the caller's last utterance.
* Each assistant item counts the audio actually sent in its deltas; ``conversation.item.truncate`` is
  checked against that ("Audio content of Xms is already shorter than Yms").
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import numpy.typing as npt
import orjson
import pybase64
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

__all__ = ["EAGERNESS_SILENCE_MS", "LocalModel", "ModelConnection", "threshold_to_rms"]

Pcm = npt.NDArray[np.int16]
EventHook = Callable[["ModelConnection", dict[str, Any]], None]
"""An observer of the events of one connection: :attr:`LocalModel.on_client_event`, ``on_server_event``."""

_MAX_MESSAGE = 32 * 2**20  # 15 MiB of audio per append is 20 MiB of base64
_MAX_APPEND = 15 * 2**20
_SESSION_SECONDS = 30 * 60
_FRAME_MS = 10

EAGERNESS_SILENCE_MS = {"low": 1200, "medium": 700, "auto": 700, "high": 300}
"""Silence (ms) that ends a turn under ``semantic_vad``, per ``eagerness``."""

_RATES = {"pcm16": 24000, "g711_ulaw": 8000, "g711_alaw": 8000}
_BYTES_PER_MS = {"pcm16": 48, "g711_ulaw": 8, "g711_alaw": 8}
_GA_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
_GA_FORMAT_JSON: dict[str, dict[str, Any]] = {
    "pcm16": {"type": "audio/pcm", "rate": 24000},
    "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"},
}
_MODELS = {"ga": "gpt-realtime-2025-08-28", "preview": "gpt-4o-realtime-preview-2024-12-17"}
"""What ``session.model`` reports, whatever the deployment is called (as Azure does)."""
_VOICES_PREVIEW = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse")
_VOICES_GA = (*_VOICES_PREVIEW, "marin", "cedar")
_GREETING_TEXT = "Hello! This is the local test model."

# Server event names that differ between the dialects (protocols.md §2.8).
_NAMES = {
    "ga": {
        "audio.delta": "response.output_audio.delta",
        "audio.done": "response.output_audio.done",
        "transcript.delta": "response.output_audio_transcript.delta",
        "transcript.done": "response.output_audio_transcript.done",
        "text.delta": "response.output_text.delta",
        "text.done": "response.output_text.done",
        "audio part": "output_audio",
        "text part": "output_text",
    },
    "preview": {
        "audio.delta": "response.audio.delta",
        "audio.done": "response.audio.done",
        "transcript.delta": "response.audio_transcript.delta",
        "transcript.done": "response.audio_transcript.done",
        "text.delta": "response.text.delta",
        "text.done": "response.text.done",
        "audio part": "audio",
        "text part": "text",
    },
}


# Client events and the fields each may carry besides ``type`` and ``event_id``.
def _words(names: str) -> tuple[str, ...]:
    return tuple(names.split())


_EVENT_KEYS: dict[str, tuple[str, ...]] = {
    "session.update": ("session",),
    "input_audio_buffer.append": ("audio",),
    "input_audio_buffer.commit": (),
    "input_audio_buffer.clear": (),
    "conversation.item.create": ("item", "previous_item_id"),
    "conversation.item.truncate": ("item_id", "content_index", "audio_end_ms"),
    "conversation.item.delete": ("item_id",),
    "conversation.item.retrieve": ("item_id",),
    "response.create": ("response",),
    "response.cancel": ("response_id",),
}
_PREVIEW_SESSION_KEYS = _words(
    "model modalities instructions voice input_audio_format output_audio_format input_audio_transcription "
    "turn_detection input_audio_noise_reduction tools tool_choice temperature max_response_output_tokens "
    "speed tracing"
)
_APPEND_FIELDS = frozenset(("type", "event_id", "audio"))
_GA_SESSION_KEYS = _words(
    "type model instructions output_modalities audio tools tool_choice max_output_tokens tracing truncation "
    "prompt include"
)
_PREVIEW_RESPONSE_KEYS = _words(
    "modalities instructions voice output_audio_format tools tool_choice temperature "
    "max_response_output_tokens conversation metadata input"
)
_GA_RESPONSE_KEYS = _words(
    "output_modalities instructions audio tools tool_choice max_output_tokens conversation metadata input "
    "prompt"
)


# --- G.711 and resampling (our own, independent of bridge.audio on purpose) --------------------------------


def _ulaw_tables() -> tuple[Pcm, npt.NDArray[np.uint8]]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    mag = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)
    decode = np.where(u & 0x80, 0x84 - mag, mag - 0x84).astype(np.int16)
    v = np.arange(-32768, 32768, dtype=np.int32) >> 2  # the classic 14-bit encoder, as audioop has it
    m = np.minimum(np.abs(v), 8159) + 0x21
    exp = np.zeros_like(m)
    for e in range(1, 8):
        exp[m >= (0x40 << (e - 1))] = e
    code = np.where(m >= 0x2000, 0x7F, (exp << 4) | ((m >> (exp + 1)) & 0x0F))
    return decode, (code ^ np.where(v < 0, 0x7F, 0xFF)).astype(np.uint8)


def _alaw_tables() -> tuple[Pcm, npt.NDArray[np.uint8]]:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exp, mant = (a >> 4) & 7, a & 0x0F
    mag = np.where(exp == 0, (mant << 4) + 8, ((mant << 4) + 0x108) << np.maximum(exp - 1, 0))
    decode = np.where(a & 0x80, mag, -mag).astype(np.int16)
    s = np.arange(-32768, 32768, dtype=np.int32) >> 3
    m = np.where(s >= 0, s, -s - 1)
    exp = np.zeros_like(m)
    for e in range(1, 8):
        exp[m >= (16 << e)] = e
    mant = np.where(exp == 0, m >> 1, m >> exp) & 0x0F
    return decode, (((exp << 4) | mant) ^ np.where(s >= 0, 0xD5, 0x55)).astype(np.uint8)


_ULAW_DECODE, _ULAW_ENCODE = _ulaw_tables()
_ALAW_DECODE, _ALAW_ENCODE = _alaw_tables()


def _decode(fmt: str, data: bytes) -> Pcm:
    """Wire bytes in ``fmt`` → PCM16 samples at the format's own rate."""
    if fmt == "pcm16":
        return np.frombuffer(data, dtype="<i2").astype(np.int16)
    table = _ULAW_DECODE if fmt == "g711_ulaw" else _ALAW_DECODE
    out: Pcm = table[np.frombuffer(data, dtype=np.uint8)]
    return out


def _encode(fmt: str, pcm: Pcm) -> bytes:
    """PCM16 samples (already at the format's rate) → wire bytes in ``fmt``."""
    if fmt == "pcm16":
        return pcm.astype("<i2").tobytes()
    table = _ULAW_ENCODE if fmt == "g711_ulaw" else _ALAW_ENCODE
    return table[pcm.astype(np.int32) + 32768].tobytes()


def _resample(pcm: Pcm, src: int, dst: int) -> Pcm:
    """A crude resampler (quality does not matter for a test model): box filter down, linear up."""
    if src == dst or not len(pcm):
        return pcm
    out: Pcm
    if src == 3 * dst:
        out = pcm[: len(pcm) // 3 * 3].astype(np.int32).reshape(-1, 3).mean(axis=1).astype(np.int16)
    else:
        x = np.arange(max(1, round(len(pcm) * dst / src))) * (src / dst)
        out = np.interp(x, np.arange(len(pcm)), pcm.astype(np.float64)).astype(np.int16)
    return out


def _tone(freq: float, ms: int, rate: int = 24000, amp: float = 0.3) -> Pcm:
    n = rate * ms // 1000
    ramp = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (rate * 0.01))  # 10 ms fades
    return (np.sin(2 * np.pi * freq * np.arange(n) / rate) * ramp * amp * 32767).astype(np.int16)


_GREETING = np.concatenate([_tone(523.25, 500), _tone(659.25, 500), _tone(783.99, 500)])
_BEEP = _tone(660.0, 300)


def threshold_to_rms(threshold: float) -> float:
    """The frame RMS (PCM16 units) that counts as speech for a VAD ``threshold``: ``-70 + 60·t`` dBFS."""
    return 32768.0 * 10 ** ((-70.0 + 60.0 * threshold) / 20.0)


# --- validation of client events ---------------------------------------------------------------------------


class _Invalid(Exception):
    """A client event the real service would answer with an ``invalid_request_error``."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _kind(value: object) -> str:
    if value is None:
        return "null"
    for cls, name in ((bool, "a boolean"), (int, "an integer"), (float, "a decimal"), (str, "a string")):
        if isinstance(value, cls):
            return name
    return "an array" if isinstance(value, list) else "an object"


def _bad_type(param: str, expected: str, value: object) -> _Invalid:
    message = f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead."
    return _Invalid("invalid_type", message, param)


def _obj(value: object, param: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad_type(param, "an object", value)
    unknown = [key for key in value if key not in allowed] if allowed is not None else []
    if unknown:
        name = f"{param}.{unknown[0]}" if param else unknown[0]
        raise _Invalid("unknown_parameter", f"Unknown parameter: '{name}'.", name)
    return value


def _choice(value: object, allowed: tuple[str, ...], param: str) -> str:
    supported = ", ".join(f"'{a}'" for a in allowed)
    if not isinstance(value, str):
        raise _bad_type(param, f"one of {supported}", value)
    if value not in allowed:
        raise _Invalid(
            "invalid_value", f"Invalid value: '{value}'. Supported values are: {supported}.", param
        )
    return value


def _number(value: object, param: str, low: float, high: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise _bad_type(param, "an integer" if integer else "a number", value)
    if not low <= value <= high:
        message = f"Invalid '{param}': expected a value from {low:g} to {high:g}, but got {value}."
        raise _Invalid("invalid_value", message, param)
    return float(value)


def _integer(value: object, param: str, low: float = 0, high: float = 2**53) -> int:
    return int(_number(value, param, low, high, integer=True))


def _string(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise _bad_type(param, "a string", value)
    return value


def _boolean(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise _bad_type(param, "a boolean", value)
    return value


def _required(d: dict[str, Any], key: str, param: str | None = None) -> Any:
    if key not in d:
        param = param or key
        raise _Invalid("missing_required_parameter", f"Missing required parameter: '{param}'.", param)
    return d[key]


def _turn_detection(value: object, param: str, dialect: str) -> dict[str, Any] | None:
    """Validate ``turn_detection`` and fill in the defaults the service fills in."""
    if value is None:
        return None
    td = _obj(value, param)
    kind = _choice(_required(td, "type", f"{param}.type"), ("server_vad", "semantic_vad"), f"{param}.type")
    out: dict[str, Any] = {"type": kind}
    if kind == "server_vad":
        silence = 500 if dialect == "ga" else 200  # openai's GA types say 500; the Azure preview ref 200
        out |= {"threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": silence}
        if dialect == "ga":
            out["idle_timeout_ms"] = None
    else:
        out["eagerness"] = "auto"
    out |= {"create_response": True, "interrupt_response": True}
    _obj(td, param, tuple(out))
    for key, raw in td.items():
        p = f"{param}.{key}"
        if key == "threshold":
            out[key] = _number(raw, p, 0.0, 1.0)
        elif key in ("prefix_padding_ms", "silence_duration_ms"):
            out[key] = _integer(raw, p, 0, 10_000)
        elif key == "idle_timeout_ms":
            out[key] = None if raw is None else _integer(raw, p, 5000, 30_000)
        elif key in ("create_response", "interrupt_response"):
            out[key] = _boolean(raw, p)
        elif key == "eagerness":
            out[key] = _choice(raw, tuple(EAGERNESS_SILENCE_MS), p)
    return out


def _noise_reduction(value: object, param: str) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = _required(_obj(value, param, ("type",)), "type", f"{param}.type")
    return {"type": _choice(kind, ("near_field", "far_field"), f"{param}.type")}


def _transcription(value: object, param: str) -> dict[str, Any] | None:
    if value is None:
        return None
    given = _obj(value, param, ("model", "language", "prompt"))
    return {"model": "whisper-1"} | {k: _string(v, f"{param}.{k}") for k, v in given.items()}


def _ga_format(value: object, param: str) -> dict[str, Any]:
    fmt = _obj(value, param, ("type", "rate"))
    kind = _choice(_required(fmt, "type", f"{param}.type"), tuple(_GA_FORMATS), f"{param}.type")
    if kind != "audio/pcm" and "rate" in fmt:
        raise _Invalid("unknown_parameter", f"Unknown parameter: '{param}.rate'.", f"{param}.rate")
    if fmt.get("rate", 24000) != 24000:
        raise _Invalid(
            "invalid_value", f"Invalid value: {fmt['rate']!r}. Supported values are: 24000.", f"{param}.rate"
        )
    return dict(_GA_FORMAT_JSON[_GA_FORMATS[kind]])


def _common_field(session: dict[str, Any], key: str, raw: object, p: str, tokens_key: str) -> bool:
    """Validate and set a field both dialects share; False when ``key`` is not one of them."""
    if key in ("instructions", "model"):
        session[key] = _string(raw, p)
    elif key == "tools":
        if not isinstance(raw, list):
            raise _bad_type(p, "an array", raw)
        for i, tool in enumerate(raw):
            t = _obj(tool, f"{p}[{i}]", ("type", "name", "description", "parameters"))
            _choice(_required(t, "type", f"{p}[{i}].type"), ("function",), f"{p}[{i}].type")
            _string(_required(t, "name", f"{p}[{i}].name"), f"{p}[{i}].name")
        session[key] = raw
    elif key == "tool_choice":
        session[key] = raw if isinstance(raw, dict) else _string(raw, p)
    elif key == tokens_key:
        session[key] = raw if raw == "inf" else _integer(raw, p, 1, 4096)
    elif key == "tracing":
        session[key] = raw
    else:
        return False
    return True


def _modalities(raw: object, p: str, dialect: str) -> list[str]:
    allowed = (["audio"], ["text"]) if dialect == "ga" else (["text"], ["audio", "text"])
    if not isinstance(raw, list) or sorted(raw) not in allowed:
        raise _Invalid(
            "invalid_value",
            f"Invalid value: {raw!r}. Supported values are: " + " and ".join(map(repr, allowed)) + ".",
            p,
        )
    return list(raw)


def _voice_locked(param: str) -> _Invalid:
    message = "Cannot update a conversation's voice if assistant audio is present."
    return _Invalid("cannot_update_voice", message, param)


def _update_preview(current: dict[str, Any], update: dict[str, Any], audio_locked: bool) -> dict[str, Any]:
    """The preview session after a flat ``session.update`` (protocols.md §2.2)."""
    session = dict(current)
    _obj(update, "session", _PREVIEW_SESSION_KEYS)
    for key, raw in update.items():
        p = f"session.{key}"
        if _common_field(session, key, raw, p, "max_response_output_tokens"):
            continue
        if key == "modalities":
            session[key] = _modalities(raw, p, "preview")
        elif key == "voice":
            session[key] = _choice(raw, _VOICES_PREVIEW, p)
        elif key in ("input_audio_format", "output_audio_format"):
            session[key] = _choice(raw, tuple(_RATES), p)
        elif key == "input_audio_transcription":
            session[key] = _transcription(raw, p)
        elif key == "turn_detection":
            session[key] = _turn_detection(raw, p, "preview")
        elif key == "input_audio_noise_reduction":
            session[key] = _noise_reduction(raw, p)
        elif key == "temperature":
            session[key] = _number(raw, p, 0.6, 1.2)
        elif key == "speed":
            session[key] = _number(raw, p, 0.25, 1.5)
    if audio_locked and session["voice"] != current["voice"]:
        raise _voice_locked("session.voice")
    return session


def _update_ga(current: dict[str, Any], update: dict[str, Any], audio_locked: bool) -> dict[str, Any]:
    """The GA session after a nested ``session.update`` (protocols.md §2.7); ``session.type`` is required."""
    kind = _required(update, "type", "session.type")
    if kind != "realtime":
        raise _Invalid(
            "invalid_value",
            f"Invalid value: {kind!r}. The local model supports only sessions of type 'realtime'.",
            "session.type",
        )
    _obj(update, "session", _GA_SESSION_KEYS)
    session = dict(current)
    for key, raw in update.items():
        p = f"session.{key}"
        if key == "type" or _common_field(session, key, raw, p, "max_output_tokens"):
            continue
        if key == "output_modalities":
            session[key] = _modalities(raw, p, "ga")
        elif key in ("truncation", "prompt", "include"):
            session[key] = raw
        elif key == "audio":
            audio = _obj(raw, p, ("input", "output"))
            merged = {side: dict(current["audio"][side]) for side in ("input", "output")}
            checks: dict[str, dict[str, Callable[[object, str], object]]] = {
                "input": {
                    "format": _ga_format,
                    "transcription": _transcription,
                    "noise_reduction": _noise_reduction,
                    "turn_detection": lambda v, pk: _turn_detection(v, pk, "ga"),
                },
                "output": {
                    "format": _ga_format,
                    "voice": lambda v, pk: _choice(v, _VOICES_GA, pk),
                    "speed": lambda v, pk: _number(v, pk, 0.25, 1.5),
                },
            }
            for side, given in audio.items():
                for k, v in _obj(given, f"{p}.{side}", tuple(checks[side])).items():
                    merged[side][k] = checks[side][k](v, f"{p}.{side}.{k}")
            session["audio"] = merged
    if audio_locked and session["audio"]["output"]["voice"] != current["audio"]["output"]["voice"]:
        raise _voice_locked("session.audio.output.voice")
    return session


def _default_session(dialect: str, session_id: str, model: str) -> dict[str, Any]:
    head = {
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "expires_at": int(time.time()) + _SESSION_SECONDS,
    }
    vad = _turn_detection({"type": "server_vad"}, "", dialect)
    tail = {"tools": [], "tool_choice": "auto"}
    if dialect == "ga":
        return {
            "type": "realtime",
            **head,
            "output_modalities": ["audio"],
            "instructions": "",
            "audio": {
                "input": {
                    "format": dict(_GA_FORMAT_JSON["pcm16"]),
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": vad,
                },
                "output": {"format": dict(_GA_FORMAT_JSON["pcm16"]), "voice": "alloy", "speed": 1.0},
            },
            **tail,
            "max_output_tokens": "inf",
            "tracing": None,
            "truncation": "auto",
            "prompt": None,
            "include": None,
        }
    return {
        **head,
        "modalities": ["audio", "text"],
        "instructions": "",
        "voice": "alloy",
        "input_audio_format": "pcm16",
        "output_audio_format": "pcm16",
        "input_audio_transcription": None,
        "turn_detection": vad,
        "input_audio_noise_reduction": None,
        **tail,
        "temperature": 0.8,
        "max_response_output_tokens": "inf",
        "speed": 1.0,
        "tracing": None,
    }


@dataclass(frozen=True, slots=True)
class _Effective:
    """The dialect-neutral reading of a session config: what the simulator acts on."""

    input_format: str
    output_format: str
    voice: str
    text_only: bool
    transcribe: bool
    vad: dict[str, Any] | None

    @staticmethod
    def of(session: dict[str, Any], dialect: str) -> _Effective:
        if dialect == "ga":
            a_in, a_out = session["audio"]["input"], session["audio"]["output"]
            return _Effective(
                _GA_FORMATS[a_in["format"]["type"]],
                _GA_FORMATS[a_out["format"]["type"]],
                a_out["voice"],
                session["output_modalities"] == ["text"],
                a_in["transcription"] is not None,
                a_in["turn_detection"],
            )
        return _Effective(
            session["input_audio_format"],
            session["output_audio_format"],
            session["voice"],
            "audio" not in session["modalities"],
            session["input_audio_transcription"] is not None,
            session["turn_detection"],
        )


# --- conversation state ------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Item:
    id: str
    role: str
    kind: str = "message"
    status: str = "completed"
    content: list[dict[str, Any]] = field(default_factory=list)
    pcm: Pcm | None = None
    """Caller audio of a user item, at ``rate``; kept for the latest user item only (the echo)."""
    rate: int = 24000
    seconds: float = 0.0
    """Duration of a user item's audio."""
    audio: bytearray = field(default_factory=bytearray)
    """Assistant audio actually sent in deltas, in ``audio_format``."""
    audio_format: str = "pcm16"
    transcript: str = ""
    text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def audio_ms(self) -> float:
        return len(self.audio) / _BYTES_PER_MS[self.audio_format]


@dataclass(slots=True, eq=False)
class _Response:
    id: str
    item: _Item
    text_only: bool
    audio: bytes
    text: str
    in_conversation: bool
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str | None = None
    task: asyncio.Task[None] | None = None


class ModelConnection:
    """One accepted Realtime session. Public attributes are for tests to inspect; treat them as read-only."""

    def __init__(self, model: LocalModel, ws: ServerConnection, dialect: str, deployment: str) -> None:
        self._model = model
        self._ws = ws
        self.dialect = dialect
        """``"ga"`` or ``"preview"``, from the URL dialled."""
        self.deployment = deployment
        self.headers: dict[str, str] = (
            {k.lower(): v for k, v in ws.request.headers.raw_items()} if ws.request else {}
        )
        """Handshake headers, lower-case names."""
        self.received: list[dict[str, Any]] = []
        """Every client event received (parsed JSON objects), in order."""
        self.sent: list[dict[str, Any]] = []
        """Every server event sent, in order."""
        self.closed = asyncio.Event()
        self.session = _default_session(dialect, model._new_id("sess"), _MODELS[dialect])
        """The effective session config, in the dialect's shape (what ``session.updated`` carries)."""
        self._eff = _Effective.of(self.session, dialect)
        self._names = _NAMES[dialect]
        self._send_lock = asyncio.Lock()
        self._items: dict[str, _Item] = {}
        self._order: list[str] = []
        self._response: _Response | None = None
        self._audio_produced = False  # locks the voice
        # The input timeline (ms of all audio appended this session) survives input format changes.
        self._rate = _RATES[self._eff.input_format]
        self._base_ms = 0.0
        self._samples = 0  # appended at _rate since _base_ms
        self._odd_byte = b""
        # The uncommitted input buffer, which starts at _buf_start_ms on the timeline.
        self._buf: list[Pcm] = []
        self._buf_len = 0
        self._buf_start_ms = 0.0
        # The energy VAD.
        self._vad_rest: Pcm = np.zeros(0, dtype=np.int16)
        self._speaking = False
        self._speech_start_ms = 0
        self._silence_ms = 0
        self._user_item_id: str | None = None

    # --- for tests ---

    def received_types(self) -> list[str]:
        """The ``type`` of every client event received, in order."""
        return [str(e.get("type")) for e in self.received]

    def sent_types(self) -> list[str]:
        """The ``type`` of every server event sent, in order."""
        return [str(e.get("type")) for e in self.sent]

    @property
    def items(self) -> list[dict[str, Any]]:
        """The conversation, item objects in order (transcripts as truncation left them)."""
        return [self._item_json(self._items[i]) for i in self._order]

    def item_audio_ms(self, item_id: str) -> float:
        """How much audio an assistant item holds now: what was sent, less what truncation cut."""
        return self._items[item_id].audio_ms

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close this socket from the server side (1000: clean; 1011: a server error)."""
        await self._ws.close(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake, as a network failure would."""
        if self._ws.transport is not None:
            self._ws.transport.abort()

    async def send(self, event: dict[str, Any]) -> None:
        """Send any server event (an ``event_id`` is added when missing), to inject what tests need."""
        await self._send(dict(event))

    async def expire(self) -> None:
        """Do what Azure does at the session cap: a ``session_expired`` error, then a close."""
        message = "Your session hit the maximum duration of 30 minutes."
        await self._send_error(_Invalid("session_expired", message), None)
        await self.close(1001, "session expired")

    # --- plumbing ---

    async def _send(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", self._model._new_id("event"))
        async with self._send_lock:
            if self._model.record:
                self.sent.append(event)
            if self._model.on_server_event is not None:
                self._model.on_server_event(self, event)
            await self._ws.send(orjson.dumps(event).decode())

    async def _send_error(self, exc: _Invalid, client_event_id: str | None) -> None:
        error = {
            "type": "invalid_request_error",
            "code": exc.code,
            "message": exc.message,
            "param": exc.param,
            "event_id": client_event_id,
        }
        await self._send({"type": "error", "error": error})

    async def _run(self) -> None:
        await self._send({"type": "session.created", "session": self.session})
        async for message in self._ws:
            await self._dispatch(message)

    async def _dispatch(self, message: str | bytes) -> None:
        """Handle one client event; a malformed or unknown one gets an ``error`` and the session goes on."""
        event_id: str | None = None
        try:
            if isinstance(message, bytes):
                raise _Invalid("invalid_request_error", "Binary frames are not supported: send JSON text.")
            try:
                event = orjson.loads(message)
            except orjson.JSONDecodeError:
                raise _Invalid(
                    "invalid_json",
                    "The server could not parse the JSON body of your event. "
                    "Please check that it is valid JSON.",
                ) from None
            if not isinstance(event, dict):
                raise _Invalid("invalid_request_error", "An event must be a JSON object.")
            if self._model.record:
                self.received.append(event)
            if self._model.on_client_event is not None:
                self._model.on_client_event(self, event)
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            if (
                self._model.fast_appends
                and event.get("type") == "input_audio_buffer.append"
                and event.keys() <= _APPEND_FIELDS
            ):
                await self._on_input_audio_buffer_append(event)
                return
            kind = _choice(_required(event, "type"), tuple(_EVENT_KEYS), "type")
            _obj(event, "", ("type", "event_id", *_EVENT_KEYS[kind]))
            handler: Callable[[dict[str, Any]], Awaitable[None]] = getattr(
                self, "_on_" + kind.replace(".", "_")
            )
            await handler(event)
        except _Invalid as exc:
            await self._send_error(exc, event_id)

    def _item_json(self, item: _Item) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": item.id,
            "object": "realtime.item",
            "type": item.kind,
            "status": item.status,
        }
        if item.kind == "message":
            out["role"] = item.role
            out["content"] = [dict(part) for part in item.content]
            if item.role == "assistant" and out["content"] and "transcript" in out["content"][0]:
                out["content"][0]["transcript"] = item.transcript
        return out | item.extra

    def _find(self, item_id: str) -> _Item:
        item = self._items.get(item_id)
        if item is None:
            raise _Invalid("item_not_found", f"Conversation item with id '{item_id}' not found.", "item_id")
        return item

    async def _add_item(self, item: _Item) -> None:
        """Add to the conversation: preview ``conversation.item.created``; GA ``.added`` (and ``.done``)."""
        previous = self._order[-1] if self._order else None
        self._items[item.id] = item
        self._order.append(item.id)
        body = {"previous_item_id": previous, "item": self._item_json(item)}
        if self.dialect == "preview":
            await self._send({"type": "conversation.item.created", **body})
            return
        await self._send({"type": "conversation.item.added", **body})
        if item.status != "in_progress":
            await self._send({"type": "conversation.item.done", **body})

    # --- session.update ---

    async def _on_session_update(self, event: dict[str, Any]) -> None:
        update = _obj(_required(event, "session"), "session")
        change = _update_ga if self.dialect == "ga" else _update_preview
        session = change(self.session, update, self._audio_produced)
        eff = _Effective.of(session, self.dialect)
        if eff.input_format != self._eff.input_format:
            self._change_input_rate(_RATES[eff.input_format])
        if eff.vad is None:
            self._speaking, self._silence_ms = False, 0
        self.session, self._eff = session, eff
        await self._send({"type": "session.updated", "session": session})

    def _change_input_rate(self, rate: int) -> None:
        self._base_ms, self._samples = self._now_ms(), 0
        self._buf = [_resample(np.concatenate(self._buf), self._rate, rate)] if self._buf else []
        self._buf_len = sum(len(b) for b in self._buf)
        self._vad_rest = np.zeros(0, dtype=np.int16)
        self._odd_byte = b""
        self._rate = rate

    # --- input audio and the VAD ---

    def _now_ms(self) -> float:
        return self._base_ms + self._samples * 1000 / self._rate

    async def _on_input_audio_buffer_append(self, event: dict[str, Any]) -> None:
        try:
            data = pybase64.b64decode(_string(_required(event, "audio"), "audio"), validate=True)
        except ValueError:
            raise _Invalid(
                "invalid_value", "Invalid 'audio': expected base64-encoded audio.", "audio"
            ) from None
        if len(data) > _MAX_APPEND:
            raise _Invalid("invalid_value", "Invalid 'audio': at most 15 MiB of audio per event.", "audio")
        if self._eff.input_format == "pcm16":  # keep an odd byte for the next append
            data = self._odd_byte + data
            cut = len(data) // 2 * 2
            data, self._odd_byte = data[:cut], data[cut:]
        pcm = _decode(self._eff.input_format, data)
        if not len(pcm):
            return
        start = self._samples
        self._samples += len(pcm)
        self._buf.append(pcm)
        self._buf_len += len(pcm)
        if self._eff.vad is None:
            return
        if self._model.fast_appends:
            await self._fast_vad(pcm, start)
            return
        frames = np.concatenate([self._vad_rest, pcm])
        first = start - len(self._vad_rest)  # the timeline sample of frames[0]
        size = self._rate * _FRAME_MS // 1000
        n = len(frames) // size
        self._vad_rest = frames[n * size :]
        block = frames[: n * size].astype(np.float32).reshape(n, size)
        for i, level in enumerate(np.sqrt(np.mean(block * block, axis=1)).tolist()):
            await self._vad_frame(level, self._base_ms + (first + i * size) * 1000 / self._rate)
        if not self._speaking:
            self._trim_buffer()

    async def _fast_vad(self, pcm: Pcm, start: int) -> None:
        """The VAD above for :attr:`LocalModel.fast_appends`: exact integer energies, one numpy reduction,
        and :meth:`_vad_frame` only for the frames that can change something (speech, or while speaking)."""
        rest = self._vad_rest
        frames = np.concatenate([rest, pcm]) if len(rest) else pcm
        first = start - len(rest)
        size = self._rate * _FRAME_MS // 1000
        n = len(frames) // size
        self._vad_rest = frames[n * size :]
        if n:
            block = frames[: n * size].reshape(n, size).astype(np.int64)
            threshold = self._vad_params()[0]
            for i, energy in enumerate((block * block).sum(axis=1).tolist()):
                level = math.sqrt(energy / size)
                if self._speaking or level >= threshold:
                    await self._vad_frame(level, self._base_ms + (first + i * size) * 1000 / self._rate)
        if not self._speaking:
            self._trim_buffer()

    def _vad_params(self) -> tuple[float, int, int]:
        """(RMS threshold, prefix padding ms, silence ms) of the session's turn detection."""
        vad = self._eff.vad
        assert vad is not None
        if vad["type"] == "semantic_vad":
            return threshold_to_rms(0.5), 300, EAGERNESS_SILENCE_MS[vad["eagerness"]]
        return threshold_to_rms(vad["threshold"]), vad["prefix_padding_ms"], vad["silence_duration_ms"]

    async def _vad_frame(self, level: float, frame_ms: float) -> None:
        threshold, padding, silence = self._vad_params()
        if level >= threshold:
            self._silence_ms = 0
            if self._speaking:
                return
            # input_audio_buffer.speech_started: audio_start_ms includes the prefix padding.
            self._speaking = True
            self._speech_start_ms = max(round(self._buf_start_ms), round(frame_ms) - padding, 0)
            self._user_item_id = self._model._new_id("item")
            await self._send(
                {
                    "type": "input_audio_buffer.speech_started",
                    "audio_start_ms": self._speech_start_ms,
                    "item_id": self._user_item_id,
                }
            )
            r = self._response
            if r is not None and self._eff.vad is not None and self._eff.vad["interrupt_response"]:
                await self._stop_response(r, "turn_detected")  # barge-in
        elif self._speaking:
            self._silence_ms += _FRAME_MS
            if self._silence_ms < silence:
                return
            # input_audio_buffer.speech_stopped: audio_end_ms includes the silence that ended the turn.
            end_ms = round(frame_ms) + _FRAME_MS
            item_id = self._user_item_id or self._model._new_id("item")
            self._speaking, self._silence_ms, self._user_item_id = False, 0, None
            await self._send(
                {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms, "item_id": item_id}
            )
            await self._commit(self._speech_start_ms, end_ms, item_id)
            if self._eff.vad is not None and self._eff.vad["create_response"] and self._response is None:
                await self._start_response({})

    def _take(self, start_ms: float, end_ms: float) -> Pcm:
        """Drop the buffer up to ``end_ms``; return the audio from ``start_ms`` to ``end_ms``."""
        whole = np.concatenate(self._buf) if self._buf else np.zeros(0, dtype=np.int16)
        a = max(0, round((start_ms - self._buf_start_ms) * self._rate / 1000))
        b = min(len(whole), max(a, round((end_ms - self._buf_start_ms) * self._rate / 1000)))
        rest = whole[b:]
        self._buf, self._buf_len = ([rest] if len(rest) else []), len(rest)
        self._buf_start_ms = self._now_ms() - len(rest) * 1000 / self._rate
        return whole[a:b]

    def _trim_buffer(self) -> None:
        """While nobody speaks, keep only what the prefix padding may reach back to (trimmed in batches)."""
        keep_ms = self._vad_params()[1] + 2 * _FRAME_MS
        if self._buf_len * 1000 / self._rate > 2 * keep_ms + 1000:
            self._take(0, self._now_ms() - keep_ms)

    async def _commit(self, start_ms: float, end_ms: float, item_id: str) -> None:
        pcm = self._take(start_ms, end_ms)
        previous = self._order[-1] if self._order else None
        await self._send(
            {"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id}
        )
        for older in self._items.values():
            older.pcm = None  # only the latest utterance is echoed; a long call must not hoard audio
        part: dict[str, Any] = {"type": "input_audio", "transcript": None}
        seconds = len(pcm) / self._rate
        await self._add_item(
            _Item(item_id, "user", content=[part], pcm=pcm, rate=self._rate, seconds=seconds)
        )
        if self._eff.transcribe:  # there is no ASR: a deterministic stand-in
            part["transcript"] = text = f"(caller speech, {len(pcm) / self._rate:.1f} s)"
            await self._send(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item_id,
                    "content_index": 0,
                    "transcript": text,
                    "usage": {"type": "duration", "seconds": round(len(pcm) / self._rate, 3)},
                }
            )

    async def _on_input_audio_buffer_commit(self, event: dict[str, Any]) -> None:
        have = self._buf_len * 1000 / self._rate
        if have < 100:
            raise _Invalid(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too "
                f"small. Expected at least 100ms of audio, but buffer only has {have:.2f}ms of audio.",
            )
        item_id = self._user_item_id if self._speaking and self._user_item_id else self._model._new_id("item")
        self._speaking, self._silence_ms, self._user_item_id = False, 0, None
        await self._commit(self._buf_start_ms, self._now_ms(), item_id)

    async def _on_input_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        self._take(self._now_ms(), self._now_ms())
        self._speaking, self._silence_ms, self._user_item_id = False, 0, None
        await self._send({"type": "input_audio_buffer.cleared"})

    # --- conversation items ---

    async def _on_conversation_item_create(self, event: dict[str, Any]) -> None:
        raw = _obj(_required(event, "item"), "item")
        kind = _choice(
            raw.get("type", "message"), ("message", "function_call", "function_call_output"), "item.type"
        )
        item_id = raw.get("id") or self._model._new_id("item")
        if not isinstance(item_id, str) or item_id in self._items:
            raise _Invalid("invalid_value", f"Item with id {item_id!r} already exists.", "item.id")
        previous = event.get("previous_item_id")
        if previous not in (None, "root") and previous not in self._items:
            raise _Invalid(
                "invalid_value", f"Previous item with id {previous!r} not found.", "previous_item_id"
            )
        if kind != "message":
            fields = ("call_id", "name", "arguments", "output")
            _obj(raw, "item", ("id", "type", "object", "status", *fields))
            _string(_required(raw, "call_id", "item.call_id"), "item.call_id")
            await self._add_item(_Item(item_id, "", kind=kind, extra={k: raw[k] for k in fields if k in raw}))
            return
        _obj(raw, "item", ("id", "type", "object", "status", "role", "content"))
        role = _choice(_required(raw, "role", "item.role"), ("user", "assistant", "system"), "item.role")
        content = _required(raw, "content", "item.content")
        if not isinstance(content, list):
            raise _bad_type("item.content", "an array", content)
        names = self._names
        allowed = {
            "user": ("input_text", "input_audio"),
            "system": ("input_text",),
            "assistant": (names["text part"], names["audio part"]),
        }[role]
        text: str | None = None
        transcript = ""
        for i, part in enumerate(content):
            p = f"item.content[{i}]"
            if _choice(_obj(part, p).get("type"), allowed, f"{p}.type").endswith("text"):
                text = _string(_required(part, "text", f"{p}.text"), f"{p}.text")
            elif part.get("transcript") is not None:
                transcript = _string(part["transcript"], f"{p}.transcript")
        item = _Item(item_id, role, content=list(content), text=text)
        item.transcript = (transcript or text or "") if role == "assistant" else ""
        await self._add_item(item)

    async def _on_conversation_item_truncate(self, event: dict[str, Any]) -> None:
        """``conversation.item.truncate`` (protocols.md §2.5): cut an assistant item's audio and text."""
        item_id = _string(_required(event, "item_id"), "item_id")
        index = _integer(_required(event, "content_index"), "content_index")
        end_ms = _integer(_required(event, "audio_end_ms"), "audio_end_ms")
        item = self._find(item_id)
        if item.role != "assistant" or item.kind != "message":
            raise _Invalid("invalid_value", "Only assistant messages can be truncated.", "item_id")
        if index != 0 or not item.content:
            raise _Invalid("invalid_value", f"Item '{item_id}' has no content part {index}.", "content_index")
        if end_ms > item.audio_ms:
            raise _Invalid(
                "invalid_value",
                f"Audio content of {int(item.audio_ms)}ms is already shorter than {end_ms}ms",
                "audio_end_ms",
            )
        del item.audio[end_ms * _BYTES_PER_MS[item.audio_format] :]
        item.transcript = ""  # the service forgets the words, heard or not
        await self._send(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": index,
                "audio_end_ms": end_ms,
            }
        )

    async def _on_conversation_item_delete(self, event: dict[str, Any]) -> None:
        item = self._find(_string(_required(event, "item_id"), "item_id"))
        del self._items[item.id]
        self._order.remove(item.id)
        await self._send({"type": "conversation.item.deleted", "item_id": item.id})

    async def _on_conversation_item_retrieve(self, event: dict[str, Any]) -> None:
        item = self._find(_string(_required(event, "item_id"), "item_id"))
        await self._send({"type": "conversation.item.retrieved", "item": self._item_json(item)})

    # --- responses ---

    async def _on_response_create(self, event: dict[str, Any]) -> None:
        if self._response is not None:
            raise _Invalid(
                "conversation_already_has_active_response",
                "Conversation already has an active "
                f"response in progress: {self._response.id}. Wait until the response is finished "
                "before creating a new one.",
            )
        await self._start_response(_obj(event.get("response", {}), "response"))

    def _overrides(self, body: dict[str, Any]) -> tuple[str, bool, bool]:
        """Validate a ``response.create`` body; return (output format, text only, in the conversation)."""
        fmt, text_only = self._eff.output_format, self._eff.text_only
        if self.dialect == "ga":
            _obj(body, "response", _GA_RESPONSE_KEYS)
            if "output_modalities" in body:
                text_only = _modalities(body["output_modalities"], "response.output_modalities", "ga") == [
                    "text"
                ]
            audio = _obj(body.get("audio", {}), "response.audio", ("output",))
            out = _obj(audio.get("output", {}), "response.audio.output", ("format", "voice"))
            if "format" in out:
                fmt = _GA_FORMATS[_ga_format(out["format"], "response.audio.output.format")["type"]]
            if "voice" in out:
                _choice(out["voice"], _VOICES_GA, "response.audio.output.voice")
        else:
            _obj(body, "response", _PREVIEW_RESPONSE_KEYS)
            if "modalities" in body:
                text_only = "audio" not in _modalities(body["modalities"], "response.modalities", "preview")
            if "output_audio_format" in body:
                fmt = _choice(body["output_audio_format"], tuple(_RATES), "response.output_audio_format")
            if "voice" in body:
                _choice(body["voice"], _VOICES_PREVIEW, "response.voice")
        if "instructions" in body:
            _string(body["instructions"], "response.instructions")  # accepted, not acted on
        conversation = _choice(body.get("conversation", "auto"), ("auto", "none"), "response.conversation")
        return fmt, text_only, conversation == "auto"

    def _content(self, fmt: str) -> tuple[bytes, str]:
        """What the echo test says: the greeting, or a beep and the caller's last utterance."""
        last = next((self._items[i] for i in reversed(self._order) if self._items[i].role == "user"), None)
        rate = _RATES[fmt]
        if last is not None and last.pcm is not None:
            pcm = np.concatenate([_resample(_BEEP, 24000, rate), _resample(last.pcm, last.rate, rate)])
            return _encode(fmt, pcm), f"You said: ({len(last.pcm) / last.rate:.1f} s of audio)"
        text = _GREETING_TEXT if last is None else f"You said: {last.text or ''}"
        return _encode(fmt, _resample(_GREETING, 24000, rate)), text

    def _response_json(self, r: _Response, status: str, details: dict[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "object": "realtime.response",
            "id": r.id,
            "status": status,
            "status_details": details,
            "output": [],
            "conversation_id": "conv_local",
            "max_output_tokens": "inf",
            "metadata": None,
            "usage": None,
        }
        fmt = r.item.audio_format
        if self.dialect == "ga":
            out["output_modalities"] = ["text"] if r.text_only else ["audio"]
            out["audio"] = {"output": {"format": dict(_GA_FORMAT_JSON[fmt]), "voice": self._eff.voice}}
        else:
            out |= {
                "modalities": ["text"] if r.text_only else ["audio", "text"],
                "voice": self._eff.voice,
                "output_audio_format": fmt,
                "temperature": self.session["temperature"],
            }
        return out

    async def _start_response(self, body: dict[str, Any]) -> None:
        """Send the opening events of a response, then leave the deltas and the end to :meth:`_stream`."""
        fmt, text_only, in_conversation = self._overrides(body)
        audio, text = self._content(fmt)
        part: dict[str, Any] = (
            {"type": self._names["text part"], "text": ""}
            if text_only
            else {"type": self._names["audio part"], "transcript": ""}
        )
        item = _Item(
            self._model._new_id("item"), "assistant", status="in_progress", content=[part], audio_format=fmt
        )
        r = _Response(
            self._model._new_id("resp"), item, text_only, b"" if text_only else audio, text, in_conversation
        )
        self._response = r
        await self._send(
            {"type": "response.created", "response": self._response_json(r, "in_progress", None)}
        )
        await self._send(
            {
                "type": "rate_limits.updated",
                "rate_limits": [
                    {"name": "requests", "limit": 1000, "remaining": 999, "reset_seconds": 0.06},
                    {"name": "tokens", "limit": 100_000, "remaining": 95_000, "reset_seconds": 3.0},
                ],
            }
        )
        await self._send(
            {
                "type": "response.output_item.added",
                "response_id": r.id,
                "output_index": 0,
                "item": self._item_json(item),
            }
        )
        if in_conversation:
            await self._add_item(item)
        await self._send(
            {
                "type": "response.content_part.added",
                "response_id": r.id,
                "item_id": item.id,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "text", "text": ""} if text_only else {"type": "audio", "transcript": ""},
            }
        )
        r.task = self._model._spawn(self._stream(r), f"local-model {r.id}")

    async def _stream(self, r: _Response) -> None:
        """Pace the deltas at ``speed``× real time, then send the end events whatever stopped the response."""
        model, item = self._model, r.item
        ids = {"response_id": r.id, "item_id": item.id, "output_index": 0, "content_index": 0}
        text_delta = self._names["text.delta" if r.text_only else "transcript.delta"]
        step = model.delta_ms * _BYTES_PER_MS[item.audio_format]
        chunks = [r.audio[i : i + step] for i in range(0, len(r.audio), step)] or [b""]
        words = re.findall(r"\S+\s*", r.text)
        loop = asyncio.get_running_loop()
        start = loop.time() + model.response_delay
        words_sent = 0
        try:
            for n, chunk in enumerate(chunks):
                delay = start + n * model.delta_ms / 1000 / model.speed - loop.time()
                if delay > 0 and not r.stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(r.stop.wait(), delay)
                if r.stop_reason is not None:
                    break
                if chunk:
                    delta = pybase64.b64encode(chunk).decode()
                    await self._send({"type": self._names["audio.delta"], **ids, "delta": delta})
                    item.audio += chunk
                    self._audio_produced = True
                upto = math.ceil((n + 1) * len(words) / len(chunks))  # transcript keeps pace with the audio
                if upto > words_sent:
                    delta = "".join(words[words_sent:upto])
                    words_sent = upto
                    item.transcript += delta
                    await self._send({"type": text_delta, **ids, "delta": delta})
            await self._finish(r, ids)
        except ConnectionClosed:
            pass
        finally:
            if self._response is r:
                self._response = None

    async def _finish(self, r: _Response, ids: dict[str, Any]) -> None:
        item = r.item
        cancelled = r.stop_reason is not None
        item.status = "incomplete" if cancelled else "completed"
        part = dict(item.content[0])
        if r.text_only:
            item.content[0] = part = part | {"text": item.transcript}
            await self._send({"type": self._names["text.done"], **ids, "text": item.transcript})
        else:
            part["transcript"] = item.transcript
            await self._send({"type": self._names["audio.done"], **ids})
            await self._send({"type": self._names["transcript.done"], **ids, "transcript": item.transcript})
        # The part events say "audio"/"text" in both dialects; only GA items say "output_audio"/"output_text".
        part = part | {"type": "text" if r.text_only else "audio"}
        await self._send({"type": "response.content_part.done", **ids, "part": part})
        body = self._item_json(item)
        await self._send(
            {"type": "response.output_item.done", "response_id": r.id, "output_index": 0, "item": body}
        )
        if self.dialect == "ga" and item.id in self._order:
            at = self._order.index(item.id)
            previous = self._order[at - 1] if at else None
            await self._send({"type": "conversation.item.done", "previous_item_id": previous, "item": body})
        details = {"type": "cancelled", "reason": r.stop_reason} if cancelled else None
        done = self._response_json(r, "cancelled" if cancelled else "completed", details)
        # Token counts in the service's proportions: about 10 audio tokens/s in and 20/s out.
        out_audio, out_text = round(item.audio_ms / 50), len(item.transcript.split())
        in_audio = sum(round(i.seconds * 10) for i in self._items.values())
        in_text = len(self.session["instructions"]) // 4
        done["output"] = [body]
        done["usage"] = {
            "total_tokens": in_audio + in_text + out_audio + out_text,
            "input_tokens": in_audio + in_text,
            "output_tokens": out_audio + out_text,
            "input_token_details": {"cached_tokens": 0, "text_tokens": in_text, "audio_tokens": in_audio},
            "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
        }
        await self._send({"type": "response.done", "response": done})

    async def _stop_response(self, r: _Response, reason: str) -> None:
        """Stop a response (``turn_detected`` or ``client_cancelled``) and wait until its end is sent."""
        if r.stop_reason is None:
            r.stop_reason = reason
            r.stop.set()
        if r.task is not None:
            await asyncio.shield(r.task)

    async def _on_response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        if wanted is not None:
            _string(wanted, "response_id")
        r = self._response
        if r is None or r.stop_reason is not None or wanted not in (None, r.id):
            raise _Invalid("response_cancel_not_active", "Cancellation failed: no active response found.")
        await self._stop_response(r, "client_cancelled")

    def _abandon(self) -> None:
        """The socket is gone: stop the response without its end events."""
        if self._response is not None and self._response.task is not None:
            self._response.task.cancel()


class LocalModel:
    """The loopback Realtime model server (see the module docstring): ``async with LocalModel() as m``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        speed: float = 4.0,
        delta_ms: int = 100,
        seed: int = 0,
        record: bool = True,
        on_client_event: EventHook | None = None,
        on_server_event: EventHook | None = None,
        fast_appends: bool = False,
    ) -> None:
        if speed <= 0 or delta_ms <= 0:
            raise ValueError("speed and delta_ms must be positive")
        self.host = host
        self.api_key = api_key
        """``None``: any non-empty key or bearer token passes; else exactly this one must be given."""
        self.speed = speed
        """How much faster than real time audio deltas are sent (4.0: 1 s of audio every 250 ms)."""
        self.delta_ms = delta_ms
        """Audio per delta, in ms."""
        self.connect_delay = 0.0
        """Seconds to wait before answering a handshake."""
        self.response_delay = 0.05
        """Seconds from ``response.create`` (or the end of a turn) to the first delta."""
        self.record = record
        """Keep every connection and its events for inspection (tests). ``bridge serve`` passes ``False``
        so that a long-running server holds only its open connections, without their event logs."""
        self.on_client_event = on_client_event
        """Called with every client event (a parsed JSON object) as it is received, before it is handled:
        an observer for benchmarks (``scripts/bench``). It must be cheap and must not change the event."""
        self.on_server_event = on_server_event
        """Called with every server event just before it is written to the socket, with the same rules."""
        self.fast_appends = fast_appends
        """Handle ``input_audio_buffer.append`` on a shorter path, for load generators: the same checks and
        VAD, with frame energies summed exactly in integers (not float32) and fewer Python and numpy calls."""
        self.connections: list[ModelConnection] = []
        """Every accepted connection, in order (with ``record=False``: the open ones)."""
        self._port = port
        self._rng = random.Random(seed)
        self._count = 0
        self._rejects: list[int] = []
        self._server: Server | None = None
        self._closing = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Condition()

    async def start(self) -> None:
        """Start listening; :attr:`port` and :attr:`endpoint` are valid afterwards."""
        if self._server is not None:
            raise RuntimeError("the local model is already started")
        self._server = await serve(
            self._handle,
            self.host,
            self._port,
            process_request=self._process_request,
            max_size=_MAX_MESSAGE,
            compression=None,
            close_timeout=2,
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Close every connection and the server; no task started here outlives this call."""
        self._closing.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> LocalModel:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The TCP port listened on (the real one when 0 was asked for)."""
        return self._port

    @property
    def endpoint(self) -> str:
        """What ``AZURE_OPENAI_ENDPOINT`` is set to for this server: ``http://127.0.0.1:PORT``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    def reject_next(self, status: int = 429, count: int = 1) -> None:
        """Answer the next ``count`` handshakes with HTTP ``status`` (429, 500, 503 …)."""
        self._rejects.extend([status] * count)

    async def drop_all(self, code: int = 1011, reason: str = "server error") -> None:
        """Close every open connection with ``code`` and ``reason``."""
        await asyncio.gather(*(c.close(code, reason) for c in self.connections if not c.closed.is_set()))

    def wait_for_connection(self, n: int = 1, timeout: float = 5) -> Awaitable[ModelConnection]:
        """Wait until the ``n``-th connection (1-based) has been accepted, and return it (``record=True``)."""
        return self._wait_for_connection(n, timeout)

    async def _wait_for_connection(self, n: int, limit: float) -> ModelConnection:
        async with asyncio.timeout(limit), self._arrived:
            await self._arrived.wait_for(lambda: len(self.connections) >= n)
        return self.connections[n - 1]

    def _new_id(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._rng.getrandbits(64):016x}{self._count:x}"

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """The handshake: injected faults, then the URL per dialect, then auth (protocols.md §2.1)."""
        if self.connect_delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.connect_delay)
        if self._rejects:
            status = self._rejects.pop(0)
            if status == 429:
                return _http_error(
                    connection, 429, "Requests to the Realtime API have exceeded the rate limit."
                )
            return _http_error(connection, status, "The server had an error while processing your request.")
        url = urlsplit(request.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        path = url.path.rstrip("/")
        if path == "/openai/v1/realtime":
            if "api-version" in query:
                return _http_error(
                    connection,
                    400,
                    "api-version is not allowed on /openai/v1 (the GA protocol has "
                    "no api-version): remove it.",
                )
            if not query.get("model"):
                return _http_error(connection, 400, "Missing required query parameter: model.")
        elif path == "/openai/realtime":
            if not query.get("api-version") or not query.get("deployment"):
                return _http_error(
                    connection, 400, "Missing required query parameters: api-version, deployment."
                )
        else:
            return _http_error(connection, 404, "Resource not found.")
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        given = [k for k in (request.headers.get("api-key", ""), query.get("api-key", ""), bearer) if k]
        if not given or (self.api_key is not None and self.api_key not in given):
            return _http_error(
                connection,
                401,
                "Access denied due to invalid subscription key or wrong API "
                "endpoint. Make sure to provide a valid key for an active subscription and use a "
                "correct regional API endpoint for your resource.",
            )
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        url = urlsplit(ws.request.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        ga = url.path.rstrip("/") == "/openai/v1/realtime"
        conn = ModelConnection(self, ws, "ga" if ga else "preview", query["model" if ga else "deployment"])
        async with self._arrived:
            self.connections.append(conn)
            self._arrived.notify_all()
        try:
            await conn._run()
        except ConnectionClosed:
            pass
        finally:
            conn._abandon()
            conn.closed.set()
            if not self.record:
                self.connections.remove(conn)


def _http_error(connection: ServerConnection, status: int, message: str) -> Response:
    body = orjson.dumps({"error": {"code": str(status), "message": message}}).decode()
    response = connection.respond(status, body)
    response.headers["Content-Type"] = "application/json"
    if status == 429:
        response.headers["Retry-After"] = "1"
    return response

"""The wire protocol of the local Realtime model (:mod:`bridge.local_model`): names, validation, JSON shapes.

What a :class:`~bridge.local_model.ModelConnection` checks and answers, without its socket: the event names
of both dialects, the validation of client events and ``session.update`` (an invalid one raises
:class:`InvalidEvent`, which the connection turns into an ``error`` event), the default sessions, the
conversation items and responses, and the JSON the server sends about them. Written from protocols.md §2,
never through ``bridge.realtime``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import orjson
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from bridge.local_model.audio import (
    BEEP,
    GREETING,
    GREETING_TEXT,
    Pcm,
    encode,
    resample,
    threshold_to_rms,
)

_SESSION_SECONDS = 30 * 60


EAGERNESS_SILENCE_MS = {"low": 1200, "medium": 700, "auto": 700, "high": 300}
"""Silence (ms) that ends a turn under ``semantic_vad``, per ``eagerness``."""

RATES = {"pcm16": 24000, "g711_ulaw": 8000, "g711_alaw": 8000}
BYTES_PER_MS = {"pcm16": 48, "g711_ulaw": 8, "g711_alaw": 8}
_GA_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
_GA_FORMAT_JSON: dict[str, dict[str, Any]] = {
    "pcm16": {"type": "audio/pcm", "rate": 24000},
    "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"},
}
MODELS = {"ga": "gpt-realtime-2025-08-28", "preview": "gpt-4o-realtime-preview-2024-12-17"}
"""What ``session.model`` reports, whatever the deployment is called (as Azure does)."""
_VOICES_PREVIEW = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse")
_VOICES_GA = (*_VOICES_PREVIEW, "marin", "cedar")

# Server event names that differ between the dialects (protocols.md §2.8).
NAMES = {
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


EVENT_KEYS: dict[str, tuple[str, ...]] = {
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
APPEND_FIELDS = frozenset(("type", "event_id", "audio"))
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

# --- validation of client events ---------------------------------------------------------------------------


class InvalidEvent(Exception):
    """A client event the real service would answer with an ``invalid_request_error``."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def parse_event(message: str | bytes) -> dict[str, Any]:
    """A client event's JSON object, before its ``type`` and fields are checked."""
    if isinstance(message, bytes):
        raise InvalidEvent("invalid_request_error", "Binary frames are not supported: send JSON text.")
    try:
        event = orjson.loads(message)
    except orjson.JSONDecodeError:
        raise InvalidEvent(
            "invalid_json",
            "The server could not parse the JSON body of your event. Please check that it is valid JSON.",
        ) from None
    if not isinstance(event, dict):
        raise InvalidEvent("invalid_request_error", "An event must be a JSON object.")
    return event


def _kind(value: object) -> str:
    if value is None:
        return "null"
    for cls, name in ((bool, "a boolean"), (int, "an integer"), (float, "a decimal"), (str, "a string")):
        if isinstance(value, cls):
            return name
    return "an array" if isinstance(value, list) else "an object"


def _bad_type(param: str, expected: str, value: object) -> InvalidEvent:
    message = f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead."
    return InvalidEvent("invalid_type", message, param)


def obj(value: object, param: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad_type(param, "an object", value)
    unknown = [key for key in value if key not in allowed] if allowed is not None else []
    if unknown:
        name = f"{param}.{unknown[0]}" if param else unknown[0]
        raise InvalidEvent("unknown_parameter", f"Unknown parameter: '{name}'.", name)
    return value


def choice(value: object, allowed: tuple[str, ...], param: str) -> str:
    supported = ", ".join(f"'{a}'" for a in allowed)
    if not isinstance(value, str):
        raise _bad_type(param, f"one of {supported}", value)
    if value not in allowed:
        raise InvalidEvent(
            "invalid_value", f"Invalid value: '{value}'. Supported values are: {supported}.", param
        )
    return value


def _number(value: object, param: str, low: float, high: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise _bad_type(param, "an integer" if integer else "a number", value)
    if not low <= value <= high:
        message = f"Invalid '{param}': expected a value from {low:g} to {high:g}, but got {value}."
        raise InvalidEvent("invalid_value", message, param)
    return float(value)


def field_integer(value: object, param: str, low: float = 0, high: float = 2**53) -> int:
    return int(_number(value, param, low, high, integer=True))


def field_string(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise _bad_type(param, "a string", value)
    return value


def _boolean(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise _bad_type(param, "a boolean", value)
    return value


def field_required(d: dict[str, Any], key: str, param: str | None = None) -> Any:
    if key not in d:
        param = param or key
        raise InvalidEvent("missing_required_parameter", f"Missing required parameter: '{param}'.", param)
    return d[key]


def _turn_detection(value: object, param: str, dialect: str) -> dict[str, Any] | None:
    """Validate ``turn_detection`` and fill in the defaults the service fills in."""
    if value is None:
        return None
    td = obj(value, param)
    kind = choice(
        field_required(td, "type", f"{param}.type"), ("server_vad", "semantic_vad"), f"{param}.type"
    )
    out: dict[str, Any] = {"type": kind}
    if kind == "server_vad":
        silence = 500 if dialect == "ga" else 200  # openai's GA types say 500; the Azure preview ref 200
        out |= {"threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": silence}
        if dialect == "ga":
            out["idle_timeout_ms"] = None
    else:
        out["eagerness"] = "auto"
    out |= {"create_response": True, "interrupt_response": True}
    obj(td, param, tuple(out))
    for key, raw in td.items():
        p = f"{param}.{key}"
        if key == "threshold":
            out[key] = _number(raw, p, 0.0, 1.0)
        elif key in ("prefix_padding_ms", "silence_duration_ms"):
            out[key] = field_integer(raw, p, 0, 10_000)
        elif key == "idle_timeout_ms":
            out[key] = None if raw is None else field_integer(raw, p, 5000, 30_000)
        elif key in ("create_response", "interrupt_response"):
            out[key] = _boolean(raw, p)
        elif key == "eagerness":
            out[key] = choice(raw, tuple(EAGERNESS_SILENCE_MS), p)
    return out


def _noise_reduction(value: object, param: str) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = field_required(obj(value, param, ("type",)), "type", f"{param}.type")
    return {"type": choice(kind, ("near_field", "far_field"), f"{param}.type")}


def _transcription(value: object, param: str) -> dict[str, Any] | None:
    if value is None:
        return None
    given = obj(value, param, ("model", "language", "prompt"))
    return {"model": "whisper-1"} | {k: field_string(v, f"{param}.{k}") for k, v in given.items()}


def _ga_format(value: object, param: str) -> dict[str, Any]:
    fmt = obj(value, param, ("type", "rate"))
    kind = choice(field_required(fmt, "type", f"{param}.type"), tuple(_GA_FORMATS), f"{param}.type")
    if kind != "audio/pcm" and "rate" in fmt:
        raise InvalidEvent("unknown_parameter", f"Unknown parameter: '{param}.rate'.", f"{param}.rate")
    if fmt.get("rate", 24000) != 24000:
        raise InvalidEvent(
            "invalid_value", f"Invalid value: {fmt['rate']!r}. Supported values are: 24000.", f"{param}.rate"
        )
    return dict(_GA_FORMAT_JSON[_GA_FORMATS[kind]])


def _common_field(session: dict[str, Any], key: str, raw: object, p: str, tokens_key: str) -> bool:
    """Validate and set a field both dialects share; False when ``key`` is not one of them."""
    if key in ("instructions", "model"):
        session[key] = field_string(raw, p)
    elif key == "tools":
        if not isinstance(raw, list):
            raise _bad_type(p, "an array", raw)
        for i, tool in enumerate(raw):
            t = obj(tool, f"{p}[{i}]", ("type", "name", "description", "parameters"))
            choice(field_required(t, "type", f"{p}[{i}].type"), ("function",), f"{p}[{i}].type")
            field_string(field_required(t, "name", f"{p}[{i}].name"), f"{p}[{i}].name")
        session[key] = raw
    elif key == "tool_choice":
        session[key] = raw if isinstance(raw, dict) else field_string(raw, p)
    elif key == tokens_key:
        session[key] = raw if raw == "inf" else field_integer(raw, p, 1, 4096)
    elif key == "tracing":
        session[key] = raw
    else:
        return False
    return True


def _modalities(raw: object, p: str, dialect: str) -> list[str]:
    allowed = (["audio"], ["text"]) if dialect == "ga" else (["text"], ["audio", "text"])
    if not isinstance(raw, list) or sorted(raw) not in allowed:
        raise InvalidEvent(
            "invalid_value",
            f"Invalid value: {raw!r}. Supported values are: " + " and ".join(map(repr, allowed)) + ".",
            p,
        )
    return list(raw)


def _voice_locked(param: str) -> InvalidEvent:
    message = "Cannot update a conversation's voice if assistant audio is present."
    return InvalidEvent("cannot_update_voice", message, param)


def update_preview(current: dict[str, Any], update: dict[str, Any], audio_locked: bool) -> dict[str, Any]:
    """The preview session after a flat ``session.update`` (protocols.md §2.2)."""
    session = dict(current)
    obj(update, "session", _PREVIEW_SESSION_KEYS)
    for key, raw in update.items():
        p = f"session.{key}"
        if _common_field(session, key, raw, p, "max_response_output_tokens"):
            continue
        if key == "modalities":
            session[key] = _modalities(raw, p, "preview")
        elif key == "voice":
            session[key] = choice(raw, _VOICES_PREVIEW, p)
        elif key in ("input_audio_format", "output_audio_format"):
            session[key] = choice(raw, tuple(RATES), p)
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


def update_ga(current: dict[str, Any], update: dict[str, Any], audio_locked: bool) -> dict[str, Any]:
    """The GA session after a nested ``session.update`` (protocols.md §2.7); ``session.type`` is required."""
    kind = field_required(update, "type", "session.type")
    if kind != "realtime":
        raise InvalidEvent(
            "invalid_value",
            f"Invalid value: {kind!r}. The local model supports only sessions of type 'realtime'.",
            "session.type",
        )
    obj(update, "session", _GA_SESSION_KEYS)
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
            audio = obj(raw, p, ("input", "output"))
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
                    "voice": lambda v, pk: choice(v, _VOICES_GA, pk),
                    "speed": lambda v, pk: _number(v, pk, 0.25, 1.5),
                },
            }
            for side, given in audio.items():
                for k, v in obj(given, f"{p}.{side}", tuple(checks[side])).items():
                    merged[side][k] = checks[side][k](v, f"{p}.{side}.{k}")
            session["audio"] = merged
    if audio_locked and session["audio"]["output"]["voice"] != current["audio"]["output"]["voice"]:
        raise _voice_locked("session.audio.output.voice")
    return session


def default_session(dialect: str, session_id: str, model: str) -> dict[str, Any]:
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
class EffectiveSession:
    """The dialect-neutral reading of a session config: what the simulator acts on."""

    input_format: str
    output_format: str
    voice: str
    text_only: bool
    transcribe: bool
    vad: dict[str, Any] | None

    @staticmethod
    def of(session: dict[str, Any], dialect: str) -> EffectiveSession:
        if dialect == "ga":
            a_in, a_out = session["audio"]["input"], session["audio"]["output"]
            return EffectiveSession(
                _GA_FORMATS[a_in["format"]["type"]],
                _GA_FORMATS[a_out["format"]["type"]],
                a_out["voice"],
                session["output_modalities"] == ["text"],
                a_in["transcription"] is not None,
                a_in["turn_detection"],
            )
        return EffectiveSession(
            session["input_audio_format"],
            session["output_audio_format"],
            session["voice"],
            "audio" not in session["modalities"],
            session["input_audio_transcription"] is not None,
            session["turn_detection"],
        )


# --- conversation state ------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class ConversationItem:
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
        return len(self.audio) / BYTES_PER_MS[self.audio_format]


@dataclass(slots=True, eq=False)
class ModelResponse:
    id: str
    item: ConversationItem
    text_only: bool
    audio: bytes
    text: str
    in_conversation: bool
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str | None = None
    task: asyncio.Task[None] | None = None


def vad_params(vad: dict[str, Any] | None) -> tuple[float, int, int]:
    """(RMS threshold, prefix padding ms, silence ms) of a session's turn detection."""
    assert vad is not None
    if vad["type"] == "semantic_vad":
        return threshold_to_rms(0.5), 300, EAGERNESS_SILENCE_MS[vad["eagerness"]]
    return threshold_to_rms(vad["threshold"]), vad["prefix_padding_ms"], vad["silence_duration_ms"]


def item_json(item: ConversationItem) -> dict[str, Any]:
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


def new_item(
    event: dict[str, Any], names: dict[str, str], existing: Container[str], new_id: Callable[[], str]
) -> ConversationItem:
    """The item a ``conversation.item.create`` adds (``existing``: the ids in the conversation)."""
    raw = obj(field_required(event, "item"), "item")
    kind = choice(
        raw.get("type", "message"), ("message", "function_call", "function_call_output"), "item.type"
    )
    item_id = raw.get("id") or new_id()
    if not isinstance(item_id, str) or item_id in existing:
        raise InvalidEvent("invalid_value", f"Item with id {item_id!r} already exists.", "item.id")
    previous = event.get("previous_item_id")
    if previous not in (None, "root") and previous not in existing:
        raise InvalidEvent(
            "invalid_value", f"Previous item with id {previous!r} not found.", "previous_item_id"
        )
    if kind != "message":
        fields = ("call_id", "name", "arguments", "output")
        obj(raw, "item", ("id", "type", "object", "status", *fields))
        field_string(field_required(raw, "call_id", "item.call_id"), "item.call_id")
        return ConversationItem(item_id, "", kind=kind, extra={k: raw[k] for k in fields if k in raw})
    obj(raw, "item", ("id", "type", "object", "status", "role", "content"))
    role = choice(field_required(raw, "role", "item.role"), ("user", "assistant", "system"), "item.role")
    content = field_required(raw, "content", "item.content")
    if not isinstance(content, list):
        raise _bad_type("item.content", "an array", content)
    allowed = {
        "user": ("input_text", "input_audio"),
        "system": ("input_text",),
        "assistant": (names["text part"], names["audio part"]),
    }[role]
    text: str | None = None
    transcript = ""
    for i, part in enumerate(content):
        p = f"item.content[{i}]"
        if choice(obj(part, p).get("type"), allowed, f"{p}.type").endswith("text"):
            text = field_string(field_required(part, "text", f"{p}.text"), f"{p}.text")
        elif part.get("transcript") is not None:
            transcript = field_string(part["transcript"], f"{p}.transcript")
    item = ConversationItem(item_id, role, content=list(content), text=text)
    item.transcript = (transcript or text or "") if role == "assistant" else ""
    return item


# --- responses ---------------------------------------------------------------------------------------------


RATE_LIMITS: tuple[dict[str, Any], ...] = (
    {"name": "requests", "limit": 1000, "remaining": 999, "reset_seconds": 0.06},
    {"name": "tokens", "limit": 100_000, "remaining": 95_000, "reset_seconds": 3.0},
)
"""What ``rate_limits.updated`` says at the start of every response."""


def response_overrides(body: dict[str, Any], dialect: str, eff: EffectiveSession) -> tuple[str, bool, bool]:
    """Validate a ``response.create`` body; return (output format, text only, in the conversation)."""
    fmt, text_only = eff.output_format, eff.text_only
    if dialect == "ga":
        obj(body, "response", _GA_RESPONSE_KEYS)
        if "output_modalities" in body:
            text_only = _modalities(body["output_modalities"], "response.output_modalities", "ga") == ["text"]
        audio = obj(body.get("audio", {}), "response.audio", ("output",))
        out = obj(audio.get("output", {}), "response.audio.output", ("format", "voice"))
        if "format" in out:
            fmt = _GA_FORMATS[_ga_format(out["format"], "response.audio.output.format")["type"]]
        if "voice" in out:
            choice(out["voice"], _VOICES_GA, "response.audio.output.voice")
    else:
        obj(body, "response", _PREVIEW_RESPONSE_KEYS)
        if "modalities" in body:
            text_only = "audio" not in _modalities(body["modalities"], "response.modalities", "preview")
        if "output_audio_format" in body:
            fmt = choice(body["output_audio_format"], tuple(RATES), "response.output_audio_format")
        if "voice" in body:
            choice(body["voice"], _VOICES_PREVIEW, "response.voice")
    if "instructions" in body:
        field_string(body["instructions"], "response.instructions")  # accepted, not acted on
    conversation = choice(body.get("conversation", "auto"), ("auto", "none"), "response.conversation")
    return fmt, text_only, conversation == "auto"


def echo_content(fmt: str, last: ConversationItem | None) -> tuple[bytes, str]:
    """What the echo test says, given the last user item: the greeting, or a beep and the caller's words."""
    rate = RATES[fmt]
    if last is not None and last.pcm is not None:
        pcm = np.concatenate([resample(BEEP, 24000, rate), resample(last.pcm, last.rate, rate)])
        return encode(fmt, pcm), f"You said: ({len(last.pcm) / last.rate:.1f} s of audio)"
    text = GREETING_TEXT if last is None else f"You said: {last.text or ''}"
    return encode(fmt, resample(GREETING, 24000, rate)), text


def response_json(
    r: ModelResponse,
    status: str,
    details: dict[str, Any] | None,
    dialect: str,
    voice: str,
    session: dict[str, Any],
) -> dict[str, Any]:
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
    if dialect == "ga":
        out["output_modalities"] = ["text"] if r.text_only else ["audio"]
        out["audio"] = {"output": {"format": dict(_GA_FORMAT_JSON[fmt]), "voice": voice}}
    else:
        out |= {
            "modalities": ["text"] if r.text_only else ["audio", "text"],
            "voice": voice,
            "output_audio_format": fmt,
            "temperature": session["temperature"],
        }
    return out


def usage_json(
    item: ConversationItem, conversation: Iterable[ConversationItem], instructions: str
) -> dict[str, Any]:
    """Token counts in the service's proportions: about 10 audio tokens/s in and 20/s out."""
    out_audio, out_text = round(item.audio_ms / 50), len(item.transcript.split())
    in_audio = sum(round(i.seconds * 10) for i in conversation)
    in_text = len(instructions) // 4
    return {
        "total_tokens": in_audio + in_text + out_audio + out_text,
        "input_tokens": in_audio + in_text,
        "output_tokens": out_audio + out_text,
        "input_token_details": {"cached_tokens": 0, "text_tokens": in_text, "audio_tokens": in_audio},
        "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
    }


# --- the handshake -----------------------------------------------------------------------------------------


def handshake_problem(request: Request, api_key: str | None) -> tuple[int, str] | None:
    """What is wrong with a handshake, as (HTTP status, message): the URL per dialect, then auth
    (protocols.md §2.1). ``api_key`` ``None``: any non-empty key or bearer token passes."""
    url = urlsplit(request.path)
    query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
    path = url.path.rstrip("/")
    if path == "/openai/v1/realtime":
        if "api-version" in query:
            return (
                400,
                "api-version is not allowed on /openai/v1 (the GA protocol has no api-version): remove it.",
            )
        if not query.get("model"):
            return 400, "Missing required query parameter: model."
    elif path == "/openai/realtime":
        if not query.get("api-version") or not query.get("deployment"):
            return 400, "Missing required query parameters: api-version, deployment."
    else:
        return 404, "Resource not found."
    auth = request.headers.get("Authorization", "")
    bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    given = [k for k in (request.headers.get("api-key", ""), query.get("api-key", ""), bearer) if k]
    if not given or (api_key is not None and api_key not in given):
        return (
            401,
            "Access denied due to invalid subscription key or wrong API "
            "endpoint. Make sure to provide a valid key for an active subscription and use a "
            "correct regional API endpoint for your resource.",
        )
    return None


def http_error(connection: ServerConnection, status: int, message: str) -> Response:
    body = orjson.dumps({"error": {"code": str(status), "message": message}}).decode()
    response = connection.respond(status, body)
    response.headers["Content-Type"] = "application/json"
    if status == 429:
        response.headers["Retry-After"] = "1"
    return response

"""Validation of client events for the local Realtime model (:mod:`bridge.local_model`), per dialect.

What the real service rejects, the local model rejects with the same ``invalid_request_error`` body: a
failed check raises :class:`InvalidEvent`, which the connection turns into an ``error`` event and the
session goes on. Here are the field checks, ``session.update`` in both dialects (flat preview, nested GA)
with the defaults the service fills in, the default sessions (whose ``expires_at`` is the connect time
plus the session cap) and the error sent at that cap, their dialect-neutral reading
(:class:`EffectiveSession`) and the body of ``response.create``. Written on its own, never through
``bridge.realtime``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from bridge.local_model.audio import threshold_to_rms
from bridge.local_model.names import GA_FORMAT_JSON, GA_FORMATS, RATES

SESSION_SECONDS = 30 * 60.0
"""Azure's session cap in seconds (docs/protocols.md §2.6): ``LocalModel``'s default ``session_seconds``."""


EAGERNESS_SILENCE_MS = {"low": 1200, "medium": 700, "auto": 700, "high": 300}
"""Silence (ms) that ends a turn under ``semantic_vad``, per ``eagerness``."""

_VOICES_PREVIEW = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse")
_VOICES_GA = (*_VOICES_PREVIEW, "marin", "cedar")


# The fields of a session and of a response.create body, per dialect.
def _words(names: str) -> tuple[str, ...]:
    return tuple(names.split())


_PREVIEW_SESSION_KEYS = _words(
    "model modalities instructions voice input_audio_format output_audio_format input_audio_transcription "
    "turn_detection input_audio_noise_reduction tools tool_choice temperature max_response_output_tokens "
    "speed tracing"
)
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


def bad_type(param: str, expected: str, value: object) -> InvalidEvent:
    message = f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead."
    return InvalidEvent("invalid_type", message, param)


def object_field(value: object, param: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_type(param, "an object", value)
    unknown = [key for key in value if key not in allowed] if allowed is not None else []
    if unknown:
        name = f"{param}.{unknown[0]}" if param else unknown[0]
        raise InvalidEvent("unknown_parameter", f"Unknown parameter: '{name}'.", name)
    return value


def choice_field(value: object, allowed: tuple[str, ...], param: str) -> str:
    supported = ", ".join(f"'{a}'" for a in allowed)
    if not isinstance(value, str):
        raise bad_type(param, f"one of {supported}", value)
    if value not in allowed:
        raise InvalidEvent(
            "invalid_value", f"Invalid value: '{value}'. Supported values are: {supported}.", param
        )
    return value


def _number_field(value: object, param: str, low: float, high: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise bad_type(param, "an integer" if integer else "a number", value)
    if not low <= value <= high:
        message = f"Invalid '{param}': expected a value from {low:g} to {high:g}, but got {value}."
        raise InvalidEvent("invalid_value", message, param)
    return float(value)


def integer_field(value: object, param: str, low: float = 0, high: float = 2**53) -> int:
    return int(_number_field(value, param, low, high, integer=True))


def string_field(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise bad_type(param, "a string", value)
    return value


def _boolean_field(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise bad_type(param, "a boolean", value)
    return value


def required_field(d: dict[str, Any], key: str, param: str | None = None) -> Any:
    if key not in d:
        param = param or key
        raise InvalidEvent("missing_required_parameter", f"Missing required parameter: '{param}'.", param)
    return d[key]


def _turn_detection(value: object, param: str, dialect: str) -> dict[str, Any] | None:
    """Validate ``turn_detection`` and fill in the defaults the service fills in."""
    if value is None:
        return None
    td = object_field(value, param)
    kind = choice_field(
        required_field(td, "type", f"{param}.type"), ("server_vad", "semantic_vad"), f"{param}.type"
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
    object_field(td, param, tuple(out))
    for key, raw in td.items():
        p = f"{param}.{key}"
        if key == "threshold":
            out[key] = _number_field(raw, p, 0.0, 1.0)
        elif key in ("prefix_padding_ms", "silence_duration_ms"):
            out[key] = integer_field(raw, p, 0, 10_000)
        elif key == "idle_timeout_ms":
            out[key] = None if raw is None else integer_field(raw, p, 5000, 30_000)
        elif key in ("create_response", "interrupt_response"):
            out[key] = _boolean_field(raw, p)
        elif key == "eagerness":
            out[key] = choice_field(raw, tuple(EAGERNESS_SILENCE_MS), p)
    return out


def _noise_reduction(value: object, param: str) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = required_field(object_field(value, param, ("type",)), "type", f"{param}.type")
    return {"type": choice_field(kind, ("near_field", "far_field"), f"{param}.type")}


def _transcription(value: object, param: str) -> dict[str, Any] | None:
    if value is None:
        return None
    given = object_field(value, param, ("model", "language", "prompt"))
    return {"model": "whisper-1"} | {k: string_field(v, f"{param}.{k}") for k, v in given.items()}


def _ga_format(value: object, param: str) -> dict[str, Any]:
    fmt = object_field(value, param, ("type", "rate"))
    kind = choice_field(required_field(fmt, "type", f"{param}.type"), tuple(GA_FORMATS), f"{param}.type")
    if kind != "audio/pcm" and "rate" in fmt:
        raise InvalidEvent("unknown_parameter", f"Unknown parameter: '{param}.rate'.", f"{param}.rate")
    if fmt.get("rate", 24000) != 24000:
        raise InvalidEvent(
            "invalid_value", f"Invalid value: {fmt['rate']!r}. Supported values are: 24000.", f"{param}.rate"
        )
    return dict(GA_FORMAT_JSON[GA_FORMATS[kind]])


def _common_field(session: dict[str, Any], key: str, raw: object, p: str, tokens_key: str) -> bool:
    """Validate and set a field both dialects share; False when ``key`` is not one of them."""
    if key in ("instructions", "model"):
        session[key] = string_field(raw, p)
    elif key == "tools":
        if not isinstance(raw, list):
            raise bad_type(p, "an array", raw)
        for i, tool in enumerate(raw):
            t = object_field(tool, f"{p}[{i}]", ("type", "name", "description", "parameters"))
            choice_field(required_field(t, "type", f"{p}[{i}].type"), ("function",), f"{p}[{i}].type")
            string_field(required_field(t, "name", f"{p}[{i}].name"), f"{p}[{i}].name")
        session[key] = raw
    elif key == "tool_choice":
        session[key] = raw if isinstance(raw, dict) else string_field(raw, p)
    elif key == tokens_key:
        session[key] = raw if raw == "inf" else integer_field(raw, p, 1, 4096)
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
    """The preview session after a flat ``session.update`` (docs/protocols.md §2.2)."""
    session = dict(current)
    object_field(update, "session", _PREVIEW_SESSION_KEYS)
    for key, raw in update.items():
        p = f"session.{key}"
        if _common_field(session, key, raw, p, "max_response_output_tokens"):
            continue
        if key == "modalities":
            session[key] = _modalities(raw, p, "preview")
        elif key == "voice":
            session[key] = choice_field(raw, _VOICES_PREVIEW, p)
        elif key in ("input_audio_format", "output_audio_format"):
            session[key] = choice_field(raw, tuple(RATES), p)
        elif key == "input_audio_transcription":
            session[key] = _transcription(raw, p)
        elif key == "turn_detection":
            session[key] = _turn_detection(raw, p, "preview")
        elif key == "input_audio_noise_reduction":
            session[key] = _noise_reduction(raw, p)
        elif key == "temperature":
            session[key] = _number_field(raw, p, 0.6, 1.2)
        elif key == "speed":
            session[key] = _number_field(raw, p, 0.25, 1.5)
    if audio_locked and session["voice"] != current["voice"]:
        raise _voice_locked("session.voice")
    return session


def update_ga(current: dict[str, Any], update: dict[str, Any], audio_locked: bool) -> dict[str, Any]:
    """The GA session after a nested ``session.update`` (docs/protocols.md §2.7); ``session.type`` is
    required."""
    kind = required_field(update, "type", "session.type")
    if kind != "realtime":
        raise InvalidEvent(
            "invalid_value",
            f"Invalid value: {kind!r}. The local model supports only sessions of type 'realtime'.",
            "session.type",
        )
    object_field(update, "session", _GA_SESSION_KEYS)
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
            audio = object_field(raw, p, ("input", "output"))
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
                    "voice": lambda v, pk: choice_field(v, _VOICES_GA, pk),
                    "speed": lambda v, pk: _number_field(v, pk, 0.25, 1.5),
                },
            }
            for side, given in audio.items():
                for k, v in object_field(given, f"{p}.{side}", tuple(checks[side])).items():
                    merged[side][k] = checks[side][k](v, f"{p}.{side}.{k}")
            session["audio"] = merged
    if audio_locked and session["audio"]["output"]["voice"] != current["audio"]["output"]["voice"]:
        raise _voice_locked("session.audio.output.voice")
    return session


def default_session(dialect: str, session_id: str, model: str, session_seconds: float) -> dict[str, Any]:
    """The session a new connection starts with, in the dialect's shape. ``expires_at`` is the integer unix
    time at which the session cap (``session_seconds`` from now, the connect time) is reached."""
    head = {
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "expires_at": int(time.time() + session_seconds),
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
                    "format": dict(GA_FORMAT_JSON["pcm16"]),
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": vad,
                },
                "output": {"format": dict(GA_FORMAT_JSON["pcm16"]), "voice": "alloy", "speed": 1.0},
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


def session_expired(session_seconds: float) -> InvalidEvent:
    """The error the service sends when a session reaches its cap: "…maximum duration of 30 minutes." (a cap
    that is not a whole number of minutes is given in seconds)."""
    minutes, rest = divmod(session_seconds, 60)
    count, unit = (minutes, "minute") if rest == 0 else (session_seconds, "second")
    number = str(int(count)) if float(count).is_integer() else str(count)
    span = f"{number} {unit}" + ("" if count == 1 else "s")
    return InvalidEvent("session_expired", f"Your session hit the maximum duration of {span}.")


@dataclass(frozen=True, slots=True)
class EffectiveSession:
    """The dialect-neutral reading of a session config: what the local model acts on."""

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
                GA_FORMATS[a_in["format"]["type"]],
                GA_FORMATS[a_out["format"]["type"]],
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


def vad_params(vad: dict[str, Any] | None) -> tuple[float, int, int]:
    """(RMS threshold, prefix padding ms, silence ms) of a session's turn detection."""
    assert vad is not None
    if vad["type"] == "semantic_vad":
        return threshold_to_rms(0.5), 300, EAGERNESS_SILENCE_MS[vad["eagerness"]]
    return threshold_to_rms(vad["threshold"]), vad["prefix_padding_ms"], vad["silence_duration_ms"]


# --- response.create ---------------------------------------------------------------------------------------


def response_overrides(body: dict[str, Any], dialect: str, eff: EffectiveSession) -> tuple[str, bool, bool]:
    """Validate a ``response.create`` body; return (output format, text only, in the conversation)."""
    fmt, text_only = eff.output_format, eff.text_only
    if dialect == "ga":
        object_field(body, "response", _GA_RESPONSE_KEYS)
        if "output_modalities" in body:
            text_only = _modalities(body["output_modalities"], "response.output_modalities", "ga") == ["text"]
        audio = object_field(body.get("audio", {}), "response.audio", ("output",))
        out = object_field(audio.get("output", {}), "response.audio.output", ("format", "voice"))
        if "format" in out:
            fmt = GA_FORMATS[_ga_format(out["format"], "response.audio.output.format")["type"]]
        if "voice" in out:
            choice_field(out["voice"], _VOICES_GA, "response.audio.output.voice")
    else:
        object_field(body, "response", _PREVIEW_RESPONSE_KEYS)
        if "modalities" in body:
            text_only = "audio" not in _modalities(body["modalities"], "response.modalities", "preview")
        if "output_audio_format" in body:
            fmt = choice_field(body["output_audio_format"], tuple(RATES), "response.output_audio_format")
        if "voice" in body:
            choice_field(body["voice"], _VOICES_PREVIEW, "response.voice")
    if "instructions" in body:
        string_field(body["instructions"], "response.instructions")  # accepted, not acted on
    conversation = choice_field(body.get("conversation", "auto"), ("auto", "none"), "response.conversation")
    return fmt, text_only, conversation == "auto"

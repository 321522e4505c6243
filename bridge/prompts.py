"""The prompt profile: what the assistant says and how it behaves on a call.

A profile is plain data, validated once, frozen: the instructions, voice and greeting, turn detection,
noise reduction, transcription, response and call limits, the fallback message Twilio speaks when the
model cannot be reached, recording with its consent announcement, and the phone numbers routed to it.
Profiles are kept, versioned, in the store (``store.py``); ``BRIDGE_PROFILE`` (TOML or JSON) seeds the
default profile. This module does no I/O: callers hand it data (:func:`profile_from_mapping`) or a
file's text (:func:`parse_profile`); :func:`profile_to_mapping` is the inverse.

Validation collects every problem, one message per field, so that a person fixing a file sees all of
them at once (:class:`ProfileError`).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from bridge.config import AudioPath, Dialect
from bridge.errors import ConfigError

PREVIEW_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse")
GA_VOICES = (*PREVIEW_VOICES, "marin", "cedar")
NOISE_REDUCTION = ("near_field", "far_field")
EAGERNESS = ("low", "medium", "high", "auto")
TurnType = Literal["server_vad", "semantic_vad"]


def voices_for(dialect: Dialect) -> tuple[str, ...]:
    """The voices a dialect accepts (docs/protocols.md §2.2, §2.7)."""
    return GA_VOICES if dialect is Dialect.GA else PREVIEW_VOICES


@dataclass(frozen=True, slots=True)
class TurnDetection:
    """When the model decides the caller has finished, and whether speech interrupts it."""

    type: TurnType = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    eagerness: str = "auto"
    create_response: bool = True
    interrupt_response: bool = True


@dataclass(frozen=True, slots=True)
class Transcription:
    """Transcription of the caller's speech (for the call record)."""

    model: str = "whisper-1"
    language: str | None = None


@dataclass(frozen=True, slots=True)
class Profile:
    """One prompt profile: instructions, voice, greeting, turn detection, audio handling."""

    name: str = "default"
    instructions: str = (
        "You are a friendly, concise phone assistant. Keep answers short: callers are listening, "
        "not reading. If you did not understand, ask the caller to repeat."
    )
    voice: str = "alloy"
    greeting: str = "Hello! How can I help you today?"
    turn_detection: TurnDetection = field(default_factory=TurnDetection)
    noise_reduction: str | None = "near_field"
    transcription: Transcription | None = None
    audio_path: AudioPath | None = None
    """``None``: use the bridge's ``BRIDGE_AUDIO_PATH``."""
    language: str | None = None
    """The language the assistant speaks (ISO-639-1), told to the model with the instructions."""
    max_response_tokens: int | None = None
    """Output token limit per response; ``None``: the model's maximum."""
    max_call_seconds: int = 1800
    """The call is ended politely after this long."""
    fallback_message: str = "Sorry, our assistant is not available right now. Please call again later."
    """Spoken by Twilio when the model cannot be reached."""
    record_calls: bool = False
    """Record calls of this profile (as ``BRIDGE_RECORDINGS_DIR`` does for every call)."""
    consent_message: str = "This call may be recorded."
    """Spoken by Twilio before the call is connected, when calls are recorded."""
    numbers: tuple[str, ...] = ()
    """E.164 numbers routed to this profile."""

    def effective_instructions(self) -> str:
        """The instructions as sent to the model (with the language, when one is set)."""
        if self.language:
            return (
                f"{self.instructions}\n\nSpeak the language with ISO-639-1 code {self.language}, "
                "unless the caller asks for another."
            )
        return self.instructions

    def greeting_instructions(self) -> str | None:
        """The ``response.create`` instructions that make the model say the greeting, or ``None``."""
        if not self.greeting.strip():
            return None
        return f"Greet the caller by saying exactly this, and nothing else: {self.greeting.strip()}"


DEFAULT_PROFILE = Profile()


class ProfileError(ConfigError):
    """A profile has invalid fields; :attr:`problems` maps each field to what is wrong with it."""

    def __init__(self, problems: Mapping[str, str], source: str = "profile") -> None:
        self.problems = dict(problems)
        listing = "; ".join(f"{name}: {why}" for name, why in self.problems.items())
        super().__init__(f"{source} is invalid: {listing}")


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _int(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def profile_from_mapping(data: Mapping[str, Any], *, dialect: Dialect = Dialect.GA) -> Profile:
    """Build a :class:`Profile` from plain data; raise :class:`ProfileError` listing every bad field."""
    problems: dict[str, str] = {}
    base = DEFAULT_PROFILE
    known = {
        "name", "instructions", "voice", "greeting", "turn_detection", "noise_reduction", "transcription",
        "audio_path", "language", "max_response_tokens", "max_call_seconds", "fallback_message",
        "record_calls", "consent_message", "numbers",
    }  # fmt: skip
    for key in data:
        if key not in known:
            problems[key] = f"unknown field (known: {', '.join(sorted(known))})"

    def text(key: str, default: str, *, required: bool = False, limit: int = 20000) -> str:
        value = data.get(key, default)
        if not isinstance(value, str):
            problems[key] = "must be text"
            return default
        if required and not value.strip():
            problems[key] = "must not be empty"
        if len(value) > limit:
            problems[key] = f"is longer than {limit} characters"
        return value

    name = text("name", base.name, required=True, limit=100)
    instructions = text("instructions", base.instructions)
    greeting = text("greeting", base.greeting, limit=1000)
    voice = text("voice", base.voice, required=True)
    allowed = voices_for(dialect)
    if "voice" not in problems and voice not in allowed:
        problems["voice"] = f"{voice!r} is not a voice of this model: use one of {', '.join(allowed)}"

    noise: str | None = base.noise_reduction
    if "noise_reduction" in data:
        raw = data["noise_reduction"]
        if raw in (None, "off", "none", False):
            noise = None
        elif raw in NOISE_REDUCTION:
            noise = str(raw)
        else:
            problems["noise_reduction"] = "use off, near_field or far_field"

    transcription = base.transcription
    if "transcription" in data:
        raw = data["transcription"]
        if raw in (None, False, "off"):
            transcription = None
        elif isinstance(raw, Mapping):
            model = raw.get("model", "whisper-1")
            language = raw.get("language")
            if not isinstance(model, str) or not model:
                problems["transcription.model"] = "must be a model name, e.g. whisper-1"
            elif language is not None and not (isinstance(language, str) and 2 <= len(language) <= 3):
                problems["transcription.language"] = "must be an ISO-639-1 code such as en"
            else:
                transcription = Transcription(model=model, language=language)
        else:
            problems["transcription"] = "must be a table with model (and optional language), or off"

    audio_path = base.audio_path
    if "audio_path" in data and data["audio_path"] is not None:
        try:
            audio_path = AudioPath(data["audio_path"])
        except ValueError:
            problems["audio_path"] = "use pcm16 or g711_ulaw"

    turn = base.turn_detection
    if "turn_detection" in data:
        raw = data["turn_detection"]
        if raw in (None, "none", "off", False):
            problems["turn_detection"] = (
                "none is not supported: the bridge relies on the model's turn detection to answer; "
                "use server_vad or semantic_vad"
            )
        elif isinstance(raw, Mapping):
            turn = _turn_detection(raw, problems)
        else:
            problems["turn_detection"] = "must be a table (type server_vad or semantic_vad) or none"

    language = data.get("language", base.language)
    if language in ("", None):
        language = None
    elif not (isinstance(language, str) and re.fullmatch(r"[a-z]{2,3}", language)):
        problems["language"] = "must be an ISO-639-1 code such as en or de (or empty)"
        language = None
    max_tokens = data.get("max_response_tokens", base.max_response_tokens)
    if max_tokens in ("", "inf", None):
        max_tokens = None
    elif _int(max_tokens, 1, 4096) is None:
        problems["max_response_tokens"] = "must be a whole number from 1 to 4096 (or empty for no limit)"
        max_tokens = None
    max_call = _int(data.get("max_call_seconds", base.max_call_seconds), 5, 4 * 3600)
    if max_call is None:
        problems["max_call_seconds"] = "must be whole seconds from 5 to 14400"
        max_call = base.max_call_seconds
    fallback = text("fallback_message", base.fallback_message, required=True, limit=500)
    consent = text("consent_message", base.consent_message, limit=500)
    record = _bool(data.get("record_calls", base.record_calls))
    if record is None:
        problems["record_calls"] = "must be true or false"
        record = False
    if record and not consent.strip():
        problems["consent_message"] = "must not be empty when calls are recorded: callers must be told"
    numbers = _numbers(data.get("numbers", base.numbers), problems)

    if problems:
        raise ProfileError(problems, f"profile {name!r}" if isinstance(name, str) else "profile")
    return Profile(
        language=language,
        max_response_tokens=max_tokens,
        max_call_seconds=max_call,
        fallback_message=fallback,
        record_calls=record,
        consent_message=consent,
        numbers=numbers,
        name=name,
        instructions=instructions,
        voice=voice,
        greeting=greeting,
        turn_detection=turn,
        noise_reduction=noise,
        transcription=transcription,
        audio_path=audio_path,
    )


E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def _numbers(raw: Any, problems: dict[str, str]) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [part for part in re.split(r"[,;\n]+", raw) if part.strip()]
    if not isinstance(raw, list | tuple) or not all(isinstance(n, str) for n in raw):
        problems["numbers"] = "must be a list of phone numbers in E.164 form, e.g. +14155550123"
        return ()
    cleaned = [re.sub(r"[\s().-]", "", n) for n in raw]
    bad = [n for n in cleaned if not E164.fullmatch(n)]
    if bad:
        problems["numbers"] = (
            f"not in E.164 form (+ country code and number, e.g. +14155550123): {', '.join(bad)}"
        )
        return ()
    if len(set(cleaned)) != len(cleaned):
        problems["numbers"] = "lists the same number twice"
        return ()
    return tuple(cleaned)


def profile_to_mapping(profile: Profile) -> dict[str, Any]:
    """A JSON/TOML-ready mapping that :func:`profile_from_mapping` turns back into ``profile``."""
    data = asdict(profile)
    data["audio_path"] = profile.audio_path.value if profile.audio_path else None
    data["numbers"] = list(profile.numbers)
    data["transcription"] = asdict(profile.transcription) if profile.transcription else None
    data["noise_reduction"] = profile.noise_reduction or "off"
    return data


def _turn_detection(raw: Mapping[str, Any], problems: dict[str, str]) -> TurnDetection:
    base = TurnDetection()
    kind = raw.get("type", "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        problems["turn_detection.type"] = "use server_vad or semantic_vad (or set turn_detection to none)"
        return base
    threshold = raw.get("threshold", base.threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        problems["turn_detection.threshold"] = "must be a number from 0 to 1"
        threshold = base.threshold
    padding = _int(raw.get("prefix_padding_ms", base.prefix_padding_ms), 0, 5000)
    if padding is None:
        problems["turn_detection.prefix_padding_ms"] = "must be whole milliseconds from 0 to 5000"
    silence = _int(raw.get("silence_duration_ms", base.silence_duration_ms), 50, 10000)
    if silence is None:
        problems["turn_detection.silence_duration_ms"] = "must be whole milliseconds from 50 to 10000"
    eagerness = raw.get("eagerness", base.eagerness)
    if eagerness not in EAGERNESS:
        problems["turn_detection.eagerness"] = f"use one of {', '.join(EAGERNESS)}"
    create = _bool(raw.get("create_response", True))
    if create is None:
        problems["turn_detection.create_response"] = "must be true or false"
    elif not create:
        problems["turn_detection.create_response"] = (
            "false is not supported: the model would never answer (the bridge does not create responses)"
        )
    interrupt = _bool(raw.get("interrupt_response", True))
    if interrupt is None:
        problems["turn_detection.interrupt_response"] = "must be true or false"
    extra = set(raw) - {
        "type",
        "threshold",
        "prefix_padding_ms",
        "silence_duration_ms",
        "eagerness",
        "create_response",
        "interrupt_response",
    }
    for key in sorted(extra):
        problems[f"turn_detection.{key}"] = "unknown field"
    return TurnDetection(
        type=kind,
        threshold=float(threshold),
        prefix_padding_ms=padding if padding is not None else base.prefix_padding_ms,
        silence_duration_ms=silence if silence is not None else base.silence_duration_ms,
        eagerness=str(eagerness),
        create_response=bool(create) if create is not None else True,
        interrupt_response=bool(interrupt) if interrupt is not None else True,
    )


def parse_profile(text: str, *, filename: str, dialect: Dialect = Dialect.GA) -> Profile:
    """Parse a profile file's text (``.toml`` or ``.json`` by ``filename``) and validate it."""
    try:
        if filename.lower().endswith(".json"):
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # a TOMLDecodeError is a ValueError; too deep: RecursionError
        raise ConfigError(f"BRIDGE_PROFILE {filename!r} cannot be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"BRIDGE_PROFILE {filename!r} must hold a table/object of profile fields")
    try:
        return profile_from_mapping(data, dialect=dialect)
    except ProfileError as exc:
        raise ProfileError(exc.problems, f"BRIDGE_PROFILE {filename!r}") from None

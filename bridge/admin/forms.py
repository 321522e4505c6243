"""The profile edit form: its fields and labels, form input ⇄ profile data, and version diffs.

The form speaks the staff's language (minutes and seconds, "caller can interrupt", one number per
line); :func:`mapping_from_values` turns what was typed into the plain data that
:func:`bridge.prompts.profile_from_mapping` validates, so validation lives in one place. Its problems
are keyed by profile field (``turn_detection.threshold``); :func:`form_field` says which input shows
each message. Values the form cannot even parse (``"abc"`` for a number) are passed through unparsed, so
that the profile's own validation explains what is wrong in its usual words.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.prompts import DEFAULT_PROFILE, Profile, profile_to_mapping

CHECKBOXES = ("interrupt_response", "transcription", "record_calls", "make_default")
TEXT_FIELDS = (
    "name", "instructions", "voice", "greeting", "language", "turn_type", "threshold", "prefix_padding_ms",
    "silence_duration_ms", "eagerness", "noise_reduction", "transcription_language", "transcription_model",
    "audio_path", "max_response_tokens", "max_call_minutes", "max_call_seconds", "fallback_message",
    "consent_message", "numbers", "comment",
)  # fmt: skip

_FIELD_OF_PROBLEM = {
    "turn_detection": "turn_type",
    "turn_detection.type": "turn_type",
    "turn_detection.threshold": "threshold",
    "turn_detection.prefix_padding_ms": "prefix_padding_ms",
    "turn_detection.silence_duration_ms": "silence_duration_ms",
    "turn_detection.eagerness": "eagerness",
    "turn_detection.interrupt_response": "interrupt_response",
    "turn_detection.create_response": "turn_type",
    "transcription": "transcription",
    "transcription.model": "transcription_model",
    "transcription.language": "transcription_language",
    "max_call_seconds": "max_call",
}

FORM_LABELS = {
    "name": "Profile name",
    "instructions": "Instructions",
    "greeting": "Greeting",
    "voice": "Voice",
    "language": "Language",
    "fallback_message": "Fallback message",
    "turn_type": "Turn detection",
    "threshold": "Speech sensitivity threshold",
    "prefix_padding_ms": "Audio kept before speech",
    "silence_duration_ms": "Silence that ends a turn",
    "eagerness": "Eagerness",
    "interrupt_response": "Callers can interrupt",
    "noise_reduction": "Noise reduction",
    "max_response_tokens": "Maximum answer length",
    "max_call": "Maximum call length",
    "transcription": "Transcription",
    "transcription_language": "Language of callers",
    "transcription_model": "Transcription model",
    "record_calls": "Record calls",
    "consent_message": "Recording announcement",
    "numbers": "Phone numbers",
    "audio_path": "Audio handling",
    "make_default": "Default profile",
    "comment": "Comment",
}
"""Labels of the form's inputs (for the list of problems at the top of the form)."""
FORM_ANCHORS = {"max_call": "max_call_minutes"}
"""Inputs whose problems are keyed by something else than their id."""

LABELS = {
    "name": "Profile name",
    "instructions": "Instructions",
    "voice": "Voice",
    "greeting": "Greeting",
    "language": "Language",
    "turn_detection.type": "Turn detection",
    "turn_detection.threshold": "Speech threshold",
    "turn_detection.prefix_padding_ms": "Audio kept before speech",
    "turn_detection.silence_duration_ms": "Silence that ends a turn",
    "turn_detection.eagerness": "Eagerness",
    "turn_detection.create_response": "Answers automatically",
    "turn_detection.interrupt_response": "Caller can interrupt",
    "noise_reduction": "Noise reduction",
    "transcription": "Transcription",
    "transcription.model": "Transcription model",
    "transcription.language": "Transcription language",
    "audio_path": "Audio handling",
    "max_response_tokens": "Maximum answer length",
    "max_call_seconds": "Maximum call length",
    "fallback_message": "Fallback message",
    "record_calls": "Record calls",
    "consent_message": "Recording announcement",
    "numbers": "Phone numbers",
}
"""Human names of the profile fields (flattened as :func:`flatten` does), in form order."""

COMMENT_LIMIT = 500
"""Longest version comment (it is one line in the history)."""

LONG_TEXT = frozenset({"instructions", "greeting", "fallback_message", "consent_message", "numbers"})
"""Fields whose changes are shown as a line diff rather than "old → new"."""


def form_field(problem_key: str) -> str:
    """The form input next to which a validation problem of ``problem_key`` is shown."""
    return _FIELD_OF_PROBLEM.get(problem_key, problem_key)


def form_errors(problems: Mapping[str, str]) -> dict[str, str]:
    """Profile problems keyed by form input (two problems for one input are joined)."""
    errors: dict[str, str] = {}
    for key, message in problems.items():
        name = form_field(key)
        errors[name] = f"{errors[name]}; {message}" if name in errors else message
    return errors


def values_from_profile(profile: Profile, *, is_default: bool = False) -> dict[str, Any]:
    """What the form shows for a saved profile."""
    turn = profile.turn_detection
    minutes, secs = divmod(profile.max_call_seconds, 60)
    return {
        "name": profile.name,
        "instructions": profile.instructions,
        "voice": profile.voice,
        "greeting": profile.greeting,
        "language": profile.language or "",
        "turn_type": turn.type,
        "threshold": f"{turn.threshold:g}",
        "prefix_padding_ms": str(turn.prefix_padding_ms),
        "silence_duration_ms": str(turn.silence_duration_ms),
        "eagerness": turn.eagerness,
        "interrupt_response": turn.interrupt_response,
        "noise_reduction": profile.noise_reduction or "off",
        "transcription": profile.transcription is not None,
        "transcription_language": (profile.transcription.language or "") if profile.transcription else "",
        "transcription_model": profile.transcription.model if profile.transcription else "whisper-1",
        "audio_path": profile.audio_path.value if profile.audio_path else "",
        "max_response_tokens": ""
        if profile.max_response_tokens is None
        else str(profile.max_response_tokens),
        "max_call_minutes": str(minutes),
        "max_call_seconds": str(secs),
        "fallback_message": profile.fallback_message,
        "record_calls": profile.record_calls,
        "consent_message": profile.consent_message,
        "numbers": "\n".join(profile.numbers),
        "make_default": is_default,
        "comment": "",
    }


def new_profile_values() -> dict[str, Any]:
    """What the form shows for a new profile: the defaults, without a name."""
    return values_from_profile(DEFAULT_PROFILE) | {"name": ""}


def values_from_form(form: Mapping[str, Any]) -> dict[str, Any]:
    """The form's input as typed (strings, checkboxes as booleans), to validate or to show again."""
    values: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        raw = form.get(name, "")
        values[name] = raw if isinstance(raw, str) else ""
    for name in CHECKBOXES:
        values[name] = name in form  # an unchecked box is simply absent from the POST
    return values


def _number(raw: str, kind: type[int] | type[float]) -> Any:
    text = raw.strip()
    try:
        return kind(text)
    except ValueError:
        return text  # let the profile's validation word the complaint


def mapping_from_values(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Profile data for :func:`~bridge.prompts.profile_from_mapping`, and problems found on the way."""
    problems: dict[str, str] = {}
    transcription: dict[str, Any] | None = None
    if values["transcription"]:
        transcription = {
            "model": values["transcription_model"].strip() or "whisper-1",
            "language": values["transcription_language"].strip().lower() or None,
        }
    tokens = values["max_response_tokens"].strip()
    minutes_raw, seconds_raw = values["max_call_minutes"].strip(), values["max_call_seconds"].strip()
    max_call: Any = None
    try:
        minutes = int(minutes_raw) if minutes_raw else 0
        secs = int(seconds_raw) if seconds_raw else 0
        if minutes < 0 or secs < 0:
            raise ValueError("negative")
        max_call = minutes * 60 + secs
    except ValueError:
        problems["max_call_seconds"] = "give whole minutes and seconds, e.g. 30 and 0"
    data: dict[str, Any] = {
        "name": values["name"].strip(),
        "instructions": values["instructions"],
        "voice": values["voice"],
        "greeting": values["greeting"],
        "language": values["language"].strip().lower(),  # "EN" is what people type; the code is "en"
        "turn_detection": {
            "type": values["turn_type"],
            "threshold": _number(values["threshold"], float),
            "prefix_padding_ms": _number(values["prefix_padding_ms"], int),
            "silence_duration_ms": _number(values["silence_duration_ms"], int),
            "eagerness": values["eagerness"],
            "interrupt_response": bool(values["interrupt_response"]),
        },
        "noise_reduction": values["noise_reduction"],
        "transcription": transcription,
        "audio_path": values["audio_path"] or None,
        "max_response_tokens": _number(tokens, int) if tokens else None,
        "fallback_message": values["fallback_message"],
        "record_calls": bool(values["record_calls"]),
        "consent_message": values["consent_message"],
        "numbers": values["numbers"],
    }
    if max_call is not None:
        data["max_call_seconds"] = max_call
    if len(values["comment"]) > COMMENT_LIMIT:
        problems["comment"] = f"is longer than {COMMENT_LIMIT} characters"
    return data, problems


# -- diffs between versions


def flatten(profile: Profile) -> dict[str, str]:
    """A profile as ``label key → display text`` (nested tables flattened with dots)."""
    out: dict[str, str] = {}
    for key, value in profile_to_mapping(profile).items():
        if isinstance(value, dict):
            for inner, item in value.items():
                out[f"{key}.{inner}"] = _show(item)
        elif key == "transcription" and value is None:
            out["transcription.model"] = "off"
            out["transcription.language"] = "off"
        elif key == "numbers":
            out[key] = "\n".join(value)
        elif key == "max_call_seconds":
            out[key] = f"{value // 60} min {value % 60:02d} s"
        else:
            out[key] = _show(value)
    return out


def _show(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


@dataclass(frozen=True, slots=True)
class Change:
    """One changed field between two versions."""

    field: str
    label: str
    old: str
    new: str
    lines: tuple[tuple[str, str], ...] = ()
    """For long text: ``(kind, line)`` with kind ``ctx``, ``del``, ``ins`` or ``gap`` (lines skipped)."""


def diff(old: Profile, new: Profile) -> list[Change]:
    """What changed from ``old`` to ``new``, field by field, in form order."""
    before, after = flatten(old), flatten(new)
    order = [k for k in LABELS if k in before or k in after]
    order += sorted((set(before) | set(after)) - set(order))
    changes = []
    for key in order:
        a, b = before.get(key, ""), after.get(key, "")
        if a == b:
            continue
        lines = _line_diff(a, b) if key in LONG_TEXT else ()
        changes.append(Change(key, LABELS.get(key, key), a, b, lines))
    return changes


def _line_diff(a: str, b: str, context: int = 2) -> tuple[tuple[str, str], ...]:
    old, new = a.splitlines(), b.splitlines()
    out: list[tuple[str, str]] = []
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    for i, group in enumerate(matcher.get_grouped_opcodes(context)):
        if i or (group and (group[0][1] > 0 or group[0][3] > 0)):
            out.append(("gap", "…"))
        for op, a1, a2, b1, b2 in group:
            if op == "equal":
                out.extend(("ctx", line) for line in old[a1:a2])
                continue
            out.extend(("del", line) for line in old[a1:a2])
            out.extend(("ins", line) for line in new[b1:b2])
    if out and (group[-1][2] < len(old) or group[-1][4] < len(new)):
        out.append(("gap", "…"))  # unchanged lines follow
    return tuple(out)

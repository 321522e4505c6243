"""Comparing what the bridge sent the model on replay with what it sent in the recording, in plain words.

The session config must match exactly and every other client event must come in the same order; caller
audio is compared by length and truncation points by position, each within a tolerance; event ids are
ignored. A call that used several Realtime sessions is compared session by session
(:func:`compare_sessions`): what the replay sent on its k-th connection against what the recording sent in
its session k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pybase64

from bridge.replay.loop import Speed

TRUNCATE_TOLERANCE_MS = {"fast": 25, "realtime": 60}
"""How far a replayed truncation point may be from the recorded one."""
AUDIO_TOLERANCE_MS = 40
"""How far the total caller audio sent to the model may differ."""


def _audio_ms(events: Sequence[Mapping[str, Any]], audio_path: str) -> float:
    total = sum(len(pybase64.b64decode(str(e.get("audio", "")))) for e in events)
    return total / (48.0 if audio_path == "pcm16" else 8.0)


def _strip(event: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "event_id"}


def compare_client_events(
    recorded: Sequence[Mapping[str, Any]],
    replayed: Sequence[Mapping[str, Any]],
    *,
    audio_path: str,
    speed: Speed,
) -> list[str]:
    """What the bridge sent to the model now, against the recording: a list of differences in words."""
    problems: list[str] = []
    appends = "input_audio_buffer.append"
    rec_audio = _audio_ms([e for e in recorded if e.get("type") == appends], audio_path)
    new_audio = _audio_ms([e for e in replayed if e.get("type") == appends], audio_path)
    if abs(rec_audio - new_audio) > AUDIO_TOLERANCE_MS:
        problems.append(
            f"caller audio sent to the model: {rec_audio:.0f} ms in the recording, {new_audio:.0f} ms now"
        )
    old = [_strip(e) for e in recorded if e.get("type") != appends]
    new = [_strip(e) for e in replayed if e.get("type") != appends]
    tolerance = TRUNCATE_TOLERANCE_MS[speed]
    for index in range(max(len(old), len(new))):
        if index >= len(new):
            problems.append(
                f"missing #{index + 1}: {_describe(old[index])} (the recording has it, the replay not)"
            )
            continue
        if index >= len(old):
            problems.append(
                f"extra #{index + 1}: {_describe(new[index])} (the replay sent it, the recording not)"
            )
            continue
        a, b = old[index], new[index]
        if a.get("type") != b.get("type"):
            problems.append(f"#{index + 1}: the recording has {_describe(a)}, the replay sent {_describe(b)}")
            break  # everything after a change of order would only repeat it
        if a.get("type") == "conversation.item.truncate":
            end_a, end_b = int(a.get("audio_end_ms", -1)), int(b.get("audio_end_ms", -1))
            if a.get("item_id") != b.get("item_id") or abs(end_a - end_b) > tolerance:
                problems.append(
                    f"#{index + 1} conversation.item.truncate: {a.get('item_id')} at {end_a} ms "
                    f"in the recording, {b.get('item_id')} at {end_b} ms now (tolerance {tolerance} ms)"
                )
        elif a != b:
            problems.append(f"#{index + 1} {a.get('type')}: {_diff(a, b)}")
    return problems


def compare_sessions(
    recorded: Sequence[Sequence[Mapping[str, Any]]],
    replayed: Sequence[Sequence[Mapping[str, Any]]],
    *,
    audio_path: str,
    speed: Speed,
) -> list[str]:
    """:func:`compare_client_events` session by session: ``recorded[k - 1]`` is what the recording sent in
    Realtime session ``k``, ``replayed[k - 1]`` what the replay sent on its ``k``-th connection.

    Each difference names its session (``session 2: …``) when either side has more than one. A session
    one side never opened is one difference, not one per event; a session the replay opened beyond the
    recording's and sent nothing on is none (the recording cannot show a session opened and never used
    last).
    """
    named = max(len(recorded), len(replayed)) > 1
    problems: list[str] = []
    for index in range(max(len(recorded), len(replayed))):
        number = index + 1
        prefix = f"session {number}: " if named else ""
        old = recorded[index] if index < len(recorded) else None
        new = replayed[index] if index < len(replayed) else None
        if new is None:
            if old:
                problems.append(
                    f"{prefix}the replay never opened it (the recording sent {len(old)} client events in it)"
                )
            continue
        if old is None:
            if new:
                problems.append(
                    f"{prefix}the replay opened it and sent {len(new)} client events in it "
                    f"(the recording has {len(recorded)} session{'s' if len(recorded) != 1 else ''})"
                )
            continue
        problems += [prefix + p for p in compare_client_events(old, new, audio_path=audio_path, speed=speed)]
    return problems


def _describe(event: Mapping[str, Any]) -> str:
    kind = str(event.get("type", "?"))
    if kind == "conversation.item.truncate":
        return f"{kind} {event.get('item_id')} at {event.get('audio_end_ms')} ms"
    if kind == "response.cancel":
        return f"{kind} {event.get('response_id', '')}".rstrip()
    return kind


def _diff(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _diff(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    return f"{path or 'value'} was {a!r}, now {b!r}"

"""Replay recorded calls through a real bridge: the engine (:mod:`.engine`), its virtual clock
(:mod:`.loop`) and comparison (:mod:`.compare`), the ``bridge replay`` command (:mod:`.cli`) and the pytest
plugin (:mod:`.pytest_plugin`, fixture ``bridge_replay``)."""

from __future__ import annotations

from bridge.replay.compare import compare_client_events, compare_sessions
from bridge.replay.engine import (
    ModelChoice,
    RecordedModel,
    ReplayResult,
    profile_of,
    replay_file,
    replay_recording,
)
from bridge.replay.loop import Speed, VirtualTimeLoop, run

__all__ = [
    "ModelChoice",
    "RecordedModel",
    "ReplayResult",
    "Speed",
    "VirtualTimeLoop",
    "compare_client_events",
    "compare_sessions",
    "profile_of",
    "replay_file",
    "replay_recording",
    "run",
]

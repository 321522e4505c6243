"""A pytest plugin (registered on install) that turns recorded calls into regression tests.

Fixtures:

``bridge_replay``
    ``bridge_replay(path, model="recorded", speed="fast") -> ReplayResult``: replays a recording through
    an in-process bridge (see :mod:`bridge.replay`) and returns what happened. Use it from plain
    (synchronous) test functions: a fast replay runs on its own virtual-time event loop.

Example (``tests/test_my_calls.py``)::

    def test_the_barge_in_call_still_truncates_where_the_caller_stopped_listening(bridge_replay):
        result = bridge_replay("tests/recordings/barge-in.jsonl.gz")
        assert result.passed, result.divergences
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from bridge.replay import ModelChoice, ReplayResult, Speed


@pytest.fixture
def bridge_replay() -> Callable[..., ReplayResult]:
    """Replay a recording and return its :class:`~bridge.replay.ReplayResult`."""
    from bridge.replay import replay_file

    def replay(path: str | Path, *, model: ModelChoice = "recorded", speed: Speed = "fast") -> ReplayResult:
        return replay_file(path, model=model, speed=speed)

    return replay

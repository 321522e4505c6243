"""Injectable time.

Core code never calls :mod:`time` or sleeps; it is handed a :class:`Clock` (or a plain ``now`` value)
so that tests can drive every timing rule with a :class:`ManualClock`.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A monotonic clock in seconds."""

    def now(self) -> float:
        """Return the current monotonic time in seconds."""
        ...


class MonotonicClock:
    """The real clock: :func:`time.monotonic`."""

    def now(self) -> float:
        """Return :func:`time.monotonic`."""
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to; for tests."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        """Return the time set so far."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` and return the new time."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._now += seconds
        return self._now

    def set(self, now: float) -> None:
        """Jump to ``now`` (which must not be in the past)."""
        if now < self._now:
            raise ValueError("a clock cannot go backwards")
        self._now = now


class LoopClock:
    """The running event loop's clock: follows a virtual-time loop when replaying calls fast."""

    def now(self) -> float:
        """Return the running loop's time."""
        import asyncio

        return asyncio.get_running_loop().time()

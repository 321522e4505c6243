"""Injectable time.

Core code never calls :mod:`time` or sleeps; it is handed a :class:`Clock` (or a plain ``now`` value)
so that tests can drive every timing rule with a :class:`ManualClock`. ``now()`` is monotonic, for
durations and timeouts; ``wall()`` is the wall clock (seconds since the epoch), for what must mean the same
on every instance and after a restart: call records' times, the expiry of stream tokens.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A monotonic clock in seconds."""

    def now(self) -> float:
        """Return the current monotonic time in seconds."""
        ...

    def wall(self) -> float:
        """Return the wall-clock time in seconds since the epoch."""
        ...


class MonotonicClock:
    """The real clock: :func:`time.monotonic`."""

    def now(self) -> float:
        """Return :func:`time.monotonic`."""
        return time.monotonic()

    def wall(self) -> float:
        """Return :func:`time.time`."""
        return time.time()


class ManualClock:
    """A clock that moves only when told to; for tests."""

    def __init__(self, start: float = 0.0, *, wall_start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start

    def now(self) -> float:
        """Return the time set so far."""
        return self._now

    def wall(self) -> float:
        """The wall clock moves with :meth:`now`, from ``wall_start`` (2027-01-15 by default)."""
        return self._now + self._wall_offset

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

    def wall(self) -> float:
        """Return :func:`time.time`: a replayed call's records and tokens carry the real date."""
        return time.time()

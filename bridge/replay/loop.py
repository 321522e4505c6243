"""A virtual clock for fast replays: an event loop whose time jumps ahead whenever every party is idle.

Every party of an in-process replay -- the bridge, the Twilio caller double and the recorded model --
runs on the one loop, so a ten-minute call replays in seconds with the timing it would have had.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

Speed = Literal["fast", "realtime"]
T = TypeVar("T")


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that, when nothing is ready, moves the clock to the next timer instead of waiting.

    Every party of an in-process replay runs on the one loop, and loopback TCP delivers in ``send``, so
    "no socket is readable and no callback is ready" means nothing can happen before the next timer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.threads_busy = 0
        """Work handed to threads (the store's SQLite calls): its end wakes the loop through I/O."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None or self.threads_busy:
            # Only outside work can wake us (a thread, or no timer at all): wait for it for real,
            # without moving the virtual clock.
            result: list[tuple[selectors.SelectorKey, int]] = super().select(timeout)
            return result
        self.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: sleeps and timeouts pass instantly when the loop is idle."""

    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        """Virtual seconds since the loop was made."""
        return float(self._jumping.now)

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """As usual, but the clock must not jump while a thread works: its result is the next event."""
        future = super().run_in_executor(executor, func, *args)
        self._jumping.threads_busy += 1

        def done(_: asyncio.Future[T]) -> None:
            self._jumping.threads_busy -= 1

        future.add_done_callback(done)
        return future

    async def shutdown_default_executor(self, *args: Any, **kwargs: Any) -> None:
        """Joining the executor's threads happens in a thread too: keep the clock still meanwhile
        (Python 3.12+ would otherwise see its join timeout pass at once)."""
        self._jumping.threads_busy += 1
        try:
            await super().shutdown_default_executor(*args, **kwargs)
        finally:
            self._jumping.threads_busy -= 1


def run(main: Coroutine[Any, Any, T], *, speed: Speed) -> T:
    """Run ``main`` on a fresh loop: virtual time for ``fast``, the wall clock for ``realtime``."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = VirtualTimeLoop if speed == "fast" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)

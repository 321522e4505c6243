"""The calls of one process: pre-warmed calls waiting for their stream, live calls, recent outcomes, and
the drain at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

from bridge.call import Call
from bridge.store import Store, StoreError

log = logging.getLogger(__name__)

GOODBYE = "I'm sorry, I have to end our call now. Please call back in a moment. Goodbye!"
"""Said to live calls still going when the drain's deadline passes."""
GOODBYE_TIMEOUT = 10.0
"""At shutdown, how long the goodbye may take before calls are ended regardless."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended, kept briefly for Twilio's ``<Connect action>`` request."""

    reason: str
    model_failed: bool
    fallback_message: str


class CallRegistry:
    """Pre-warmed calls waiting for their stream, live calls, and recent outcomes; one per app."""

    OUTCOMES_KEPT = 1000

    def __init__(self, prewarm_timeout: float, store: Store | None = None) -> None:
        self.prewarm_timeout = prewarm_timeout
        self.store = store
        self.outcomes: OrderedDict[str, Outcome] = OrderedDict()
        self.draining = False
        self.live: set[Call] = set()
        self._prewarmed: dict[str, tuple[Call, asyncio.TimerHandle]] = {}
        self._cleanup: set[asyncio.Task[None]] = set()

    async def ended(self, call: Call) -> None:
        """A call has ended: remember how (for ``<Connect action>``) and store its record."""
        self.outcomes[call.call_sid] = Outcome(
            call.end_reason or "", call.model_failed, call.session.profile.fallback_message
        )
        while len(self.outcomes) > self.OUTCOMES_KEPT:
            self.outcomes.popitem(last=False)
        if self.store is not None and call.session.start is not None:
            try:
                await self.store.add_call(call.record())
            except StoreError as exc:
                log.error("call %s: the call record was not stored: %s", call.call_sid, exc)

    def prewarm(self, call: Call) -> None:
        """Start ``call``'s Realtime connection and keep it for its stream, for a while."""
        old = self._prewarmed.pop(call.call_sid, None)
        if old is not None:  # Twilio retried the webhook: the newer answer wins
            old[1].cancel()
            self._track(old[0].abandon("replaced by a retried webhook"))
        call.open_model()
        handle = asyncio.get_running_loop().call_later(self.prewarm_timeout, self._expire, call.call_sid)
        self._prewarmed[call.call_sid] = (call, handle)

    def claim(self, call_sid: str) -> Call | None:
        """The pre-warmed call for ``call_sid``, now owned by its stream; ``None`` if there is none."""
        entry = self._prewarmed.pop(call_sid, None)
        if entry is None:
            return None
        entry[1].cancel()
        call = entry[0]
        if call.finished.is_set():
            # Its Realtime session failed or closed while waiting: better to connect afresh now.
            self._track(call.abandon("pre-warmed session failed"))
            return None
        return call

    def _expire(self, call_sid: str) -> None:
        entry = self._prewarmed.pop(call_sid, None)
        if entry is not None:
            log.info(
                "call %s: no stream within %.0f s; closing its Realtime session",
                call_sid,
                self.prewarm_timeout,
            )
            self._track(entry[0].abandon("no stream arrived"))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    async def drain(self, deadline: float, goodbye: str) -> None:
        """Shutdown: refuse new calls, let live ones (and answered ones still to connect) finish until
        ``deadline`` s, then have the model say ``goodbye`` and end them."""
        self.draining = True
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline
        if self.live or self._prewarmed:
            log.info("draining: up to %.0f s for %d live calls", deadline, len(self.live))
        while (self.live or self._prewarmed) and loop.time() < until:  # noqa: ASYNC110 - polling two sets
            await asyncio.sleep(0.05)
        for call, handle in self._prewarmed.values():
            handle.cancel()
            self._track(call.abandon("shutting down"))
        self._prewarmed.clear()
        remaining = [c for c in self.live if not c.finished.is_set()]
        if remaining:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GOODBYE_TIMEOUT):
                    await asyncio.gather(*(c.goodbye(goodbye) for c in remaining), return_exceptions=True)
                    await asyncio.gather(*(c.finished.wait() for c in remaining))
        for call in list(self.live):
            await call.teardown()
        if self._cleanup:
            await asyncio.gather(*self._cleanup, return_exceptions=True)

"""Wrong admin tokens (typed at sign-in or sent as the API bearer token): counted, logged, answered late.

The right token is checked before anything here and always accepted at once, so nobody is ever locked
out (staff behind one proxy share an address); see :mod:`bridge.admin.auth` for the whole picture.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from bridge.keys import METRICS

log = logging.getLogger(__name__)

FREE_FAILURES = 3
"""Recent failures from one address before its wrong answers are slowed down (typos happen)."""
GLOBAL_FREE_FAILURES = 30
"""Recent failures from all addresses together before every wrong answer is slowed down (a spray)."""
GLOBAL_DOUBLING = 5
"""Beyond :data:`GLOBAL_FREE_FAILURES`, the overall delay doubles every this many failures."""
BASE_DELAY = 0.25
"""The first delay, in seconds; it doubles with each further failure (per address)."""
MAX_DELAY = 5.0
"""No wrong answer waits longer than this (seconds)."""
ADDRESS_HALF_LIFE = 300.0
GLOBAL_HALF_LIFE = 60.0
"""Seconds after which a failure counts half (per address, overall): old failures fade away."""
MAX_HELD = 1000
"""Late answers held at once; beyond this a wrong guess is answered 429 at once (bounded memory)."""
MAX_ADDRESSES = 10_000
"""Addresses whose failures are remembered; the least recently failed are forgotten first."""
LOG_INTERVAL = 60.0
"""After a logged failure, further ones are summed up in one line per this many seconds."""

REASON_SIGN_IN = "sign_in"
REASON_BEARER = "admin_token"
"""Labels of ``bridge_refused_total`` for wrong tokens typed at sign-in and sent as a bearer token."""


_WHAT = {REASON_SIGN_IN: "typed at sign-in", REASON_BEARER: "sent as the API bearer token"}
_LOGGED_ADDRESSES = 1000


@dataclass
class FailureLog:
    """Logs wrong tokens without flooding the log: the first at once, then one summary per interval.

    The guess itself is never logged.
    """

    interval: float = LOG_INTERVAL
    reasons: Counter[str] = field(default_factory=Counter)
    addresses: Counter[str] = field(default_factory=Counter)
    """Failures per address since the last line (at most ``_LOGGED_ADDRESSES`` of them)."""
    unlisted: int = 0
    """Failures since the last line from addresses beyond that bound."""
    hurried: int = 0
    """Failures since the last line answered at once because too many late answers were held."""
    _timer: asyncio.TimerHandle | None = None

    def failed(self, address: str, reason: str, *, hurried: bool = False) -> None:
        """Note one wrong token."""
        if self._timer is None:
            log.warning(
                "admin: a wrong token %s from %s; further failures are summed up every %.0f s",
                _WHAT.get(reason, reason),
                address,
                self.interval,
            )
            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)
            return
        self.reasons[reason] += 1
        if address in self.addresses or len(self.addresses) < _LOGGED_ADDRESSES:
            self.addresses[address] += 1
        else:
            self.unlisted += 1
        self.hurried += hurried

    def flush(self, *, again: bool = True) -> None:
        """Log the summary of the failures since the last line (if any)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        total = sum(self.reasons.values())
        if not total:
            return
        reasons = ", ".join(f"{n} {_WHAT.get(r, r)}" for r, n in sorted(self.reasons.items()))
        most = ", ".join(f"{a} ×{n}" for a, n in self.addresses.most_common(3))
        count = f"{len(self.addresses)}{'+' if self.unlisted else ''}"
        hurried = (
            f"; {self.hurried} of them answered 429 at once (too many late answers held already)"
            if self.hurried
            else ""
        )
        log.warning(
            "admin: %d more wrong tokens (%s) from %s address(es), most from %s%s",
            total,
            reasons,
            count,
            most,
            hurried,
        )
        self.reasons.clear()
        self.addresses.clear()
        self.unlisted = self.hurried = 0
        if again:  # keep summing up while they go on; the next quiet period ends with the next failure
            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def close(self) -> None:
        """Log what is pending and stop (the app is shutting down)."""
        self.flush(again=False)


def _decayed(score: float, at: float, now: float, half_life: float) -> float:
    return score * math.pow(0.5, max(0.0, now - at) / half_life)


def backoff(address_failures: float, all_failures: float) -> float:
    """Seconds a wrong answer waits, given the recent failures of its address and of everyone."""
    delay = 0.0
    if address_failures > FREE_FAILURES:
        delay = BASE_DELAY * math.pow(2.0, min(address_failures - FREE_FAILURES - 1, 16.0))
    if all_failures > GLOBAL_FREE_FAILURES:
        steps = (all_failures - GLOBAL_FREE_FAILURES - 1) / GLOBAL_DOUBLING
        delay = max(delay, BASE_DELAY * math.pow(2.0, min(steps, 16.0)))
    return min(delay, MAX_DELAY)


@dataclass
class Throttle:
    """Slows wrong tokens down without ever delaying (or refusing) the right one.

    Callers check the token first; only a wrong one comes here (:meth:`wrong_token`). Recent failures
    are counted per address and overall, each fading with its half-life, and decide the delay
    (:func:`backoff`).
    """

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    """How a late answer waits; tests replace both."""
    max_held: int = MAX_HELD
    addresses: dict[str, tuple[float, float]] = field(default_factory=dict)
    """address → (recent failures, when last counted); least recently failed first."""
    overall: tuple[float, float] = (0.0, 0.0)
    held: int = 0
    """Late answers waiting now."""
    log: FailureLog = field(default_factory=FailureLog)

    def failed(self, address: str) -> float:
        """Count a failure of ``address``; the delay its answer gets."""
        now = self.now()
        score, at = self.addresses.pop(address, (0.0, now))
        score = _decayed(score, at, now, ADDRESS_HALF_LIFE) + 1.0
        self.addresses[address] = (score, now)
        while len(self.addresses) > MAX_ADDRESSES:
            del self.addresses[next(iter(self.addresses))]
        total = _decayed(*self.overall, now, GLOBAL_HALF_LIFE) + 1.0
        self.overall = (total, now)
        return backoff(score, total)

    async def wrong_token(self, request: web.Request, reason: str) -> bool:
        """Count, log and slow down a wrong token; ``False`` when it must be answered 429 at once instead
        (too many late answers held already)."""
        address = client_address(request)
        metrics = request.app.get(METRICS)
        if metrics is not None:
            metrics.refused.inc(label=reason)
        delay = self.failed(address)
        hurried = delay > 0 and self.held >= self.max_held
        self.log.failed(address, reason, hurried=hurried)
        if hurried:
            return False
        if delay > 0:
            self.held += 1
            try:
                await self.sleep(delay)
            finally:
                self.held -= 1
        return True


def client_address(request: web.Request) -> str:
    """The peer address for the wrong-token backoff (not X-Forwarded-For, which a client can forge)."""
    return request.remote or "unknown"

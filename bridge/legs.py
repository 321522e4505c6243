"""The Realtime sessions of one call: what the session asks of the driver, and their log. No I/O.

A live call may go through several Realtime sessions (numbered 1, 2, 3… in the order they are opened):
the session (``session.py``) decides when a new one is needed -- a rollover before the service's cap,
a reconnect after a drop -- and the driver (``call.py``) opens, writes and closes the sockets. What the
session wants done to a session other than the serving one is a :data:`LegCommand`, taken with
:meth:`~bridge.session.CallSession.legs_to_send` in order, before the serving session's own commands.

:func:`swap_times` says when a session is due for a rollover: ``margin`` seconds before its
``expires_at`` (at most half its lifetime before, so that a short cap does not swap without pause), or,
when the service sent none, as if it expired ``max_session`` seconds after it was created. A swap waits
for a turn boundary until the *force* time, a quarter of the margin before the end, then takes the
least harmful moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from bridge import realtime as rt

Began = Literal["first", "rollover", "reconnect"]


@dataclass(frozen=True, slots=True)
class OpenLeg:
    """Open session ``number`` (connect with the process's connect policy); report with
    :meth:`~bridge.session.CallSession.leg_opened` or :meth:`~bridge.session.CallSession.leg_failed`."""

    number: int
    why: Began
    budget: float
    """Seconds the connect (with its retries) may take in all."""


@dataclass(frozen=True, slots=True)
class SendToLeg:
    """Send ``commands`` to session ``number`` (one that does not serve the call yet, or no longer)."""

    number: int
    commands: list[rt.ClientCommand]


@dataclass(frozen=True, slots=True)
class CloseLeg:
    """Close session ``number`` (after what was sent to it before), ``grace`` seconds from now: a session
    swapped from may still send the transcripts of its last turn."""

    number: int
    why: str
    grace: float = 0.0


LegCommand = OpenLeg | SendToLeg | CloseLeg


@dataclass(slots=True)
class LegInfo:
    """One session of the call, for the call record and the admin call page."""

    number: int
    began: Began
    opened_at: float
    """When it was asked for (the clock's time)."""
    session_id: str = ""
    ended_at: float | None = None
    ended: str = ""
    expires_at: float | None = None
    """The service's ``expires_at`` (wall-clock seconds), when it sent one."""
    created_at: float | None = None
    """When its ``session.created`` arrived (the clock's time)."""
    served_from: float | None = None
    """When it began to serve the call (the clock's time)."""


def swap_times(
    created: float, wall_created: float, expires_at: float | None, *, margin: float, max_session: float
) -> tuple[float, float]:
    """When a session created at ``created`` (the clock's time; ``wall_created`` on the wall clock) is due
    for a rollover, and when one is forced: ``(due, force)``, both on the clock."""
    # expires_at is in whole seconds: the lifetime is rounded up, so that it does not depend on where in its
    # second the session was created (and a replay, whose clock reads otherwise, plans the same swap).
    lifetime = max_session if expires_at is None else math.ceil(expires_at - wall_created)
    if lifetime <= 0:  # already past on our wall clock: a skewed clock; the service's figure is no guide
        lifetime = max_session
    margin = min(margin, lifetime / 2)
    end = created + lifetime
    return end - margin, end - margin / 4

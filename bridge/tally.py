"""One call's figures told to the process's metrics as the call goes: the driver's bookkeeping.

The session counts what happens on its call in its :class:`~bridge.playback.Stats` (it does no I/O and
knows no metrics). :class:`Tally` keeps how much of that the process's :class:`~bridge.metrics.Metrics`
have been told, and tells them the rest after each batch the driver sends (:meth:`Tally.sent`,
:meth:`Tally.legs`) and at the call's end (:meth:`Tally.ended`). Kept apart from ``call.py``, which
drives the call.
"""

from __future__ import annotations

from bridge.clock import Clock
from bridge.metrics import Metrics
from bridge.session import CallSession
from bridge.states import EndReason


class Tally:
    """What of one call's :class:`~bridge.playback.Stats` the process's metrics have been told."""

    def __init__(self, session: CallSession, metrics: Metrics, clock: Clock) -> None:
        self.session, self.metrics, self.clock = session, metrics, clock
        self._counted = (0, 0, 0, 0, 0, 0, 0)
        """Frames out, barge-ins, truncations, holds played, marks lost, send-bound hits, held-cap cuts."""
        self._counted_legs = (0, 0, 0)
        """Rollovers, reconnections and reconnection gaps."""

    def sent(self, received: float | None) -> None:
        """After a batch was sent: count what the session counted since, and time the batch from the
        event that caused it (``received``, when one did)."""
        session, metrics = self.session, self.metrics
        stats = session.stats
        now = (
            stats.frames_out,
            stats.barge_ins,
            len(stats.truncations),
            stats.holds_played,
            stats.marks_lost,
            stats.send_holds,
            stats.held_cuts,
        )
        if now == self._counted:
            return
        frames, barge_ins, truncations, holds, lost, bound_hits, cuts = (
            a - b for a, b in zip(now, self._counted, strict=True)
        )
        self._counted = now
        metrics.frames_out.inc(frames)
        metrics.barge_ins.inc(barge_ins)
        metrics.truncations.inc(truncations)
        metrics.holds.inc(holds)
        metrics.marks_lost.inc(lost)
        metrics.twilio_bound_hits.inc(bound_hits)
        metrics.twilio_held_cuts.inc(cuts)
        if frames:
            metrics.twilio_ahead.observe(session.ahead_seconds())
            metrics.twilio_held.observe(session.held_seconds())
        if received is not None:
            if frames:
                metrics.outbound_delay.observe(self.clock.now() - received)
            if barge_ins:
                metrics.clear_delay.observe(self.clock.now() - received)

    def legs(self) -> None:
        """Count the rollovers, reconnections and their gaps the session counted since."""
        stats, metrics = self.session.stats, self.metrics
        rollovers, reconnects, gaps = self._counted_legs
        for cause in stats.reconnects[reconnects:]:
            metrics.reconnects.inc(label=cause)
        for gap in stats.reconnect_gaps[gaps:]:
            metrics.reconnect_gap.observe(gap)
        metrics.rollovers.inc(stats.rollovers - rollovers)
        self._counted_legs = (stats.rollovers, len(stats.reconnects), len(stats.reconnect_gaps))

    def ended(self) -> None:
        """The call is over: count the rest, its outcome, and what is counted once per call."""
        self.sent(None)
        self.legs()
        metrics, stats = self.metrics, self.session.stats
        reason = self.session.end_reason or EndReason.SHUTDOWN
        metrics.calls.inc(label="completed" if reason.completed else "ended")
        for why, count in stats.frames_discarded.items():
            metrics.discarded.inc(count, label=why)
        metrics.sequence_gaps.inc(stats.sequence_gaps)

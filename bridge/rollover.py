"""Rollover and reconnection of a call's Realtime session. No I/O.

A Realtime session cannot be resumed and does not last: Azure ends one after about 30 minutes
(``session_expired``), a socket can drop at any time. :class:`Rollover`, a part of
:class:`~bridge.session.CallSession` (a base class of it, sharing its state), keeps a call on the line
through both (the table: :data:`~bridge.states.LINK_TRANSITIONS`):

* **Planned rollover.** When the serving session is due (:func:`~bridge.legs.swap_times`: its
  ``expires_at`` less the margin), the next one is opened and configured -- its ``session.update``, then
  the conversation so far (:mod:`bridge.conversation`) -- while the old one serves, and swapped to at a
  turn boundary: the caller silent, no answer owed or running, nothing of the model still playing (no
  tool call pending, once there are tools). Past the force time, the first moment the caller is silent and
  no answer is running or owed will do, playback going on.
* **Reconnection.** A lost session (the socket closed or reset, ``session_expired`` or ``server_error``,
  no event for :attr:`~bridge.states.Timeouts.model_idle` while one was owed, a socket stalled with more
  caller audio waiting for it than its bound, ``streams.RealtimeLinks``) is replaced the same way at
  once, the caller's audio held meanwhile (with the utterance the caller was in, when they were speaking),
  then given to the new session. An answer that was being spoken is carried as far as it was generated and
  sent (it plays on; if the caller interrupts it, its item is rewritten where the marks prove it heard),
  and the new session is asked to finish it; a turn left unanswered is answered, or asked to be repeated
  when its words were lost; a goodbye being said is asked of the new session.
  After :attr:`~bridge.states.Timeouts.hold_after` the caller hears a pre-rendered "one moment, please";
  after :attr:`~bridge.states.Timeouts.reconnect` the call ends with the profile's fallback message.
* **The swap** is one step of the session: what was queued for the old session goes to it (its caller
  audio to the new one), the old socket is closed a few seconds later (the transcripts of its last turn
  may still come, and are told to the new session), and from then on caller audio goes to the new
  session: nothing lost, nothing sent twice.

What must be done to a session other than the serving one is queued as a :data:`~bridge.legs.LegCommand`
for the driver (``call.py``), which reports back with :meth:`Rollover.leg_opened`,
:meth:`Rollover.leg_failed` and :meth:`Rollover.leg_closed`.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable

from bridge import realtime as rt
from bridge.audio import InboundTranscoder, model_bytes_to_ms
from bridge.config import AudioPath
from bridge.conversation import RESUME_NOTE, UNHEARD_NOTE, Conversation
from bridge.legs import Began, CloseLeg, LegCommand, LegInfo, OpenLeg, SendToLeg, swap_times
from bridge.playback import Item, Playback
from bridge.prompts import Profile
from bridge.states import (
    CallState,
    EndReason,
    Goodbye,
    GoodbyeTrigger,
    Link,
    LinkTrigger,
    Timeouts,
)

log = logging.getLogger(__name__)

MAX_QUEUED_FRAMES = 50 * 30
"""Caller audio held while the model is not ready yet (or is being reconnected): 30 s. Older frames go
first beyond that."""
RETRY_BASE, RETRY_CAP = 0.25, 2.0
"""A reconnection whose new session failed after it opened tries again after up to ``RETRY_BASE * 2**n``
seconds (at most ``RETRY_CAP``), jittered down to half (the connect itself backs off in ``upstream.py``)."""
LATE_GRACE = 5.0
"""A session swapped from is closed this much later: transcripts of its last turn may still come."""
ROLLOVER_RETRY = 5.0
"""A next session that could not be opened is tried again this much later (the old one still serves)."""
HOLD_RETRY = 0.25
"""The "one moment" prompt waits for what the caller still hears to end, looking again this often."""

Due = EndReason | Callable[[float], None]
"""What a timeout does: end the call with a reason, or call a function with the time."""


class Rollover(Playback):
    """The Realtime sessions of a call: rollover and reconnection (see the module docstring)."""

    # The state this part reads and writes; :class:`~bridge.session.CallSession` sets it up.
    profile: Profile
    audio_path: AudioPath
    timeouts: Timeouts
    conversation: Conversation
    leg: int
    legs: dict[int, LegInfo]
    hold_audio: bytes | None
    _to_model: list[rt.ClientCommand]
    _control: list[LegCommand]
    _queue: deque[bytes]
    _utterance: deque[bytes]
    _dropped: set[str]
    _forwarding: bool
    _next: int | None
    _next_since: float
    _next_count: int
    _swap_due: float
    _swap_force: float
    _forced: bool
    _down_since: float | None
    _hold_due: float | None
    _cut: Item | None
    _unanswered: bool
    _last_model_at: float
    _caller_speaking: bool
    _answer_owed: bool
    rearm: bool
    _attempts: int
    _retry_at: float | None
    _jitter: random.Random
    _regreet: bool
    _goodbye_ask: rt.CreateResponse | None
    _goodbye_response: str | None
    _greeted: bool
    greeting_audio: bytes | None

    def _format_problem(self, event: rt.SessionUpdated) -> str:
        expected = self.audio_path.value
        if event.input_format not in (None, expected) or event.output_format not in (None, expected):
            return (
                f"the model runs {event.input_format}/{event.output_format} audio but the bridge sends "
                f"{expected}: the session.update was not applied"
            )
        return ""

    def _link_timeouts(self) -> list[tuple[float, Due]]:
        """The Realtime sessions' timeouts of a live call: rollover, watchdogs, reconnection, "one moment"."""
        timeouts, link = self.timeouts, self.link
        due: list[tuple[float, Due]] = []
        if link is Link.DOWN:
            assert self._down_since is not None
            due.append((self._down_since + timeouts.reconnect, EndReason.MODEL_LOST))
            if self._hold_due is not None:
                due.append((self._hold_due, self._play_hold))
            if self._retry_at is not None:
                due.append((self._retry_at, self._retry))
        else:
            if link is Link.UP:
                due.append((self._swap_due, self._rollover_due))
            elif not self._forced:
                due.append((self._swap_force, self._force_swap))
            if self._active_response is not None or self._answer_owed:
                due.append((self._last_model_at + timeouts.model_idle, self._model_idle))
        if self._next is not None and link is not Link.READY:
            due.append((self._next_since + timeouts.reconnect + timeouts.model_idle, self._next_timed_out))
        return due

    def _created(self, info: LegInfo, event: rt.SessionCreated) -> None:
        info.session_id = event.session_id
        info.created_at = self.clock.now()
        info.expires_at = float(event.expires_at) if event.expires_at is not None else None

    def _plan_swap(self, info: LegInfo) -> None:
        """When the session ``info`` (now serving) is due for a rollover, and forced to one."""
        created = info.created_at if info.created_at is not None else self.clock.now()
        wall_created = self.clock.wall() - (self.clock.now() - created)
        self._swap_due, self._swap_force = swap_times(
            created,
            wall_created,
            info.expires_at,
            margin=self.timeouts.rollover_margin,
            max_session=self.timeouts.max_session,
        )
        self._forced = False
        self.rearm = True

    def leg_opened(self, leg: int) -> None:
        """The socket of session ``leg`` (asked for with :class:`~bridge.legs.OpenLeg`) is open."""
        if leg != self._next or self.state is CallState.ENDED:
            self._control.append(CloseLeg(leg, "no longer needed"))
            return
        self._control.append(SendToLeg(leg, [rt.UpdateSession(self.profile, self.audio_path)]))

    def leg_failed(self, leg: int, detail: str, *, fatal: bool) -> None:
        """Session ``leg`` could not be opened (``fatal``: no retry can help, e.g. HTTP 401)."""
        if leg != self._next or self.state is CallState.ENDED:
            return
        if fatal and (self.link is Link.DOWN or self.state is not CallState.LIVE):
            self.end(EndReason.MODEL_FATAL, detail)
        else:  # a rollover's: the serving session still serves; tried again later
            self._next_failed(detail)

    def leg_closed(self, leg: int, reason: EndReason, detail: str) -> None:
        """The socket of session ``leg`` ended without the bridge closing it."""
        if self.state is CallState.ENDED:
            return
        if leg == self._next:
            self._next_failed(f"closed: {detail or reason.value}")
        elif leg == self.leg and self.link is not Link.DOWN:
            if self.state is not CallState.LIVE or reason is EndReason.MODEL_WRONG_DIALECT:
                self.end(reason, detail)  # before the call is live, the fallback is the honest answer
            else:
                self._lost(
                    "dropped" if reason is EndReason.MODEL_DROPPED else "closed", detail or reason.value
                )

    def leg_stalled(self, leg: int, unsent: list[bytes], detail: str) -> None:
        """Session ``leg``'s socket stopped taking what is written to it: more caller audio waits for it
        than the bound (``streams.RealtimeLinks``). It is replaced like a lost one; ``unsent``, the caller
        audio it never got, is held for the next one with the rest (the utterance in progress, if any).
        A next session being prepared fails like one that closed; any other is closing already."""
        if self.state is CallState.ENDED:
            return
        if leg == self._next:
            self._next_failed(f"stalled: {detail}")
        elif leg == self.leg and self.link is not Link.DOWN:
            if self.state is not CallState.LIVE:
                self.end(EndReason.MODEL_DROPPED, f"stalled: {detail}")
            else:
                self._to_model[:0] = [rt.AppendAudio(audio) for audio in unsent]
                self._lost("stalled", detail)

    def _open_next(self, began: Began) -> None:
        number = self._next = self._next_count
        self._next_count += 1
        self._next_since = now = self.clock.now()
        self.legs[number] = LegInfo(number, began, now)
        budget = self.timeouts.reconnect
        if self._down_since is not None:
            budget = max(0.5, self._down_since + budget - now)
        self._control.append(OpenLeg(number, began, budget))
        self.rearm = True

    def _next_failed(self, detail: str) -> None:
        number = self._next
        assert number is not None
        log.warning("call %s: Realtime session %d failed: %s", self.call_id, number, detail)
        info = self.legs[number]
        info.ended_at, info.ended = self.clock.now(), f"failed: {detail}"
        self._control.append(CloseLeg(number, "failed"))
        self._next = None
        if self.link is Link.DOWN:
            # Opened, then refused or closed before it served: try again after a (jittered) pause.
            self._attempts += 1
            pause = min(RETRY_CAP, RETRY_BASE * 2**self._attempts) * self._jitter.uniform(0.5, 1.0)
            assert self._down_since is not None
            if self.clock.now() + pause < self._down_since + self.timeouts.reconnect - 0.5:
                self._retry_at = self.clock.now() + pause
                self.rearm = True
            else:
                self.end(EndReason.MODEL_LOST, detail)
            return
        self._link_move(LinkTrigger.NEXT_FAILED)
        self._swap_due = self.clock.now() + ROLLOVER_RETRY
        self.rearm = True

    def _retry(self, now: float) -> None:
        self._retry_at = None
        self._open_next("reconnect")

    def _next_timed_out(self, now: float) -> None:
        self._next_failed("no session.updated in time")

    def _from_next(self, event: rt.ServerEvent, leg: int) -> None:
        """An event of the session being prepared (or reconnected to)."""
        if isinstance(event, rt.SessionCreated):
            self._created(self.legs[leg], event)
        elif isinstance(event, rt.SessionUpdated) and self.link is not Link.READY:  # (ready: a repeat)
            problem = self._format_problem(event)
            if problem:
                self.end(EndReason.AUDIO_FORMAT_MISMATCH, problem)
                return
            self._control.append(SendToLeg(leg, self.conversation.carry(leg, first=True)))
            self._link_move(LinkTrigger.NEXT_READY)
            if self._down_since is not None:
                self._swap()
            else:
                self._maybe_swap()
        elif isinstance(event, rt.ErrorEvent) and not event.benign:
            self.stats.upstream_errors += 1
            if event.fatal:
                self.end(EndReason.MODEL_FATAL, f"{event.code}: {event.message}")
            elif self.link is not Link.READY or event.session_lost:
                # Before its session.updated: the configuration was refused; after it: it is going.
                self._next_failed(f"{event.code}: {event.message}")

    def _rollover_due(self, now: float) -> None:
        log.info("call %s: Realtime session %d is due for a rollover", self.call_id, self.leg)
        self._link_move(LinkTrigger.ROLLOVER_DUE)
        self._open_next("rollover")

    def _force_swap(self, now: float) -> None:
        log.info("call %s: no turn boundary came; swapping at the first quiet moment", self.call_id)
        self._forced = True
        self._maybe_swap()

    def _maybe_swap(self) -> None:
        """Swap to the ready next session if this is a turn boundary (see the module docstring)."""
        if self.link is not Link.READY or self.goodbye is not Goodbye.NONE:
            return
        if self._caller_speaking or self._answer_owed or self._active_response is not None:
            return
        if not self._forced and self.hearing_model():
            return
        self._swap()

    def _swap(self) -> None:
        """Make the next session the serving one: from now on caller audio goes to it."""
        old, new = self.leg, self._next
        assert new is not None
        now = self.clock.now()
        self._link_move(LinkTrigger.SWAPPED)
        if self._down_since is None:
            # Queued for the old session in this same step: its audio goes to the new one instead.
            tail = self._to_model
            self._to_model = [c for c in tail if type(c) is rt.AppendAudio]
            rest = [c for c in tail if type(c) is not rt.AppendAudio]
            if rest:
                self._control.append(SendToLeg(old, rest))
            info = self.legs[old]
            info.ended_at, info.ended = now, f"rolled over to session {new}"
            self._control.append(CloseLeg(old, "rolled over", LATE_GRACE))
            held: list[rt.ClientCommand] = []
            self.stats.rollovers += 1
            log.info("call %s: rolled over from Realtime session %d to %d", self.call_id, old, new)
        else:
            # What was asked for while no session served (a goodbye): after the conversation is carried.
            held, self._to_model = [c for c in self._to_model if type(c) is not rt.AppendAudio], []
            gap = now - self._down_since
            self.stats.reconnect_gaps.append(gap)
            log.info("call %s: Realtime session %d replaces %d after %.2f s", self.call_id, new, old, gap)
        self.leg, self._next = new, None
        info = self.legs[new]
        info.served_from = now
        self._plan_swap(info)
        self._active_response = None
        self._dropped.clear()
        self._caller_speaking = self._answer_owed = False
        self._last_model_at = now
        self._attempts, self._retry_at = 0, None
        to_model = self._to_model
        if self._cut is not None:
            self._carry_cut(self._cut)
        to_model.extend(self.conversation.carry(new, first=False))
        if self.goodbye is Goodbye.NONE:  # a goodbye asked for meanwhile is the next response
            if self._cut is not None:
                to_model.append(rt.AddTextItem("system", RESUME_NOTE))
            elif self._unanswered and not self.conversation.caller_known():
                to_model.append(rt.AddTextItem("system", UNHEARD_NOTE))
            if self._regreet:
                to_model.append(rt.CreateResponse(self.profile.greeting_instructions()))
            elif self._cut is not None or self._unanswered:
                to_model.append(rt.CreateResponse())
        to_model.extend(held)
        self._cut, self._unanswered, self._regreet = None, False, False
        to_model.extend(rt.AppendAudio(chunk) for chunk in self._queue)
        self._queue.clear()
        self._down_since = self._hold_due = None
        self._forwarding = True

    def _carry_cut(self, item: Item) -> None:
        """The answer a lost session was speaking: carried as far as it was sent to the caller, who hears
        it to its end unless they interrupt (a barge-in then rewrites it where the marks prove it heard)."""
        generated = model_bytes_to_ms(item.model_bytes, self.audio_path)
        sent = item.sent_bytes / 8 - self._outbound.delay_ms
        self.conversation.cut_off(item.item_id, min(sent, generated), generated)

    def _lost(self, cause: str, detail: str) -> None:
        """The serving session is gone (or going): hold the caller's audio and replace it."""
        old = self.leg
        now = self.clock.now()
        log.warning("call %s: Realtime session %d lost (%s); reconnecting", self.call_id, old, detail)
        had_next = self.link is Link.READY
        self._link_move(LinkTrigger.LOST)
        info = self.legs[old]
        info.ended_at, info.ended = now, f"lost: {detail}"
        self._control.append(CloseLeg(old, "lost"))
        self.stats.reconnects.append(cause)
        self._down_since = now
        self._hold_due = now + self.timeouts.hold_after if self.hold_audio else None
        self.rearm = True
        self._forwarding = False
        # Queued for the lost session and not sent: its audio is held for the next one, the rest is moot.
        held = [c.audio for c in self._to_model if type(c) is rt.AppendAudio]
        self._to_model = []
        if self.goodbye in (Goodbye.ASKED, Goodbye.SPEAKING) and self._goodbye_ask is not None:
            # The goodbye was asked of the lost session: ask it of the next one (after the conversation).
            self._goodbye_move(GoodbyeTrigger.SESSION_LOST)
            self._goodbye_response = None
            self._to_model.append(self._goodbye_ask)
        if self._caller_speaking:
            # Its session heard the start of what the caller is saying: the next one gets all of it (the
            # utterance holds the frames not sent yet too).
            resend = InboundTranscoder(self.audio_path)
            self._queue.extend(resend.convert(payload) for payload in self._utterance)
        else:
            self._queue.extend(held)
        while len(self._queue) > MAX_QUEUED_FRAMES:
            self._queue.popleft()
            self.stats.frames_queued_dropped += 1
        running = self._active_response is not None
        if running:
            current = self._current
            if current is not None and current.response_id == self._active_response:
                self._cut = current
            self._flush_outbound()  # what was generated plays on
            self._active_response = None
        caller_spoke = any(t.role == "user" for t in self.conversation.turns)
        owed = self._answer_owed or running
        self._unanswered = owed and self._cut is None and caller_spoke
        # The greeting asked of the model was lost before any of it was heard: ask the next one.
        self._regreet = (
            running and self._cut is None and not caller_spoke and self._greeted and not self.greeting_audio
        )
        self._caller_speaking = self._answer_owed = False
        if had_next:
            self._link_move(LinkTrigger.NEXT_READY)
            self._swap()
        elif self._next is None:
            self._open_next("reconnect")

    def _model_idle(self, now: float) -> None:
        self._lost("idle", f"no event for {self.timeouts.model_idle:.0f} s while one was owed")

    def _play_hold(self, now: float) -> None:
        if self.hearing_model():
            self._hold_due = now + HOLD_RETRY  # the caller still hears the model: no gap yet
            return
        self._hold_due = None
        if self.hold_audio:
            self.stats.holds_played += 1
            self._play_local("hold", self.hold_audio)

    def _recarry(self, key: str) -> None:
        """An answer was cut by a barge-in: where a text item carries it (the serving session, when it
        was said in an earlier one; the next session, already told of it), rewrite that item as heard --
        a text item cannot be truncated -- or remove it when nothing of it was heard."""
        for leg, out in ((self.leg, self._to_model), (self._next, None)):
            carried = None if leg is None else self.conversation.carried_id(key, leg)
            if leg is None or carried is None or carried == key:  # not there, or its own item: truncated
                continue
            if out is None:
                out = []
                self._control.append(SendToLeg(leg, out))
            elif not self._forwarding:
                continue
            out.append(rt.DeleteItem(carried))
            text = self.conversation.text_of(key)
            if text:
                out.append(rt.AddTextItem("assistant", text, self.conversation.recarry(key, leg)))

    def _late_transcript(self, event: rt.CallerTranscript | rt.AssistantTranscript, leg: int) -> None:
        """A transcript from a session swapped from (its last turn's), kept and told to the serving one."""
        role = "user" if isinstance(event, rt.CallerTranscript) else "assistant"
        self.conversation.said(role, event.item_id, event.transcript, leg)
        self.stats.transcript.append(("caller" if role == "user" else "assistant", event.transcript))
        if self._forwarding:
            self._to_model.extend(self.conversation.carry(self.leg, first=False))

"""``CallSession``: the state of one call between Twilio and the Realtime model. No I/O.

Theory of operation
-------------------
The session is fed parsed events from both sides -- :meth:`CallSession.receive_twilio` and
:meth:`CallSession.receive_realtime` -- and the passing of time, :meth:`CallSession.tick`. It queues
what to send per destination, in order, as typed outputs, which the driver takes like websockets'
``data_to_send()``: :meth:`~CallSession.twilio_to_send` (Twilio commands: :class:`PlayAudio`,
:class:`PlaceMark`, :class:`ClearAudio`) and :meth:`~CallSession.model_to_send` (Realtime client
commands, :mod:`bridge.realtime`). When the call is over, :attr:`~CallSession.end_reason` says why, as an
:class:`EndReason`. ``call.py`` sends what is queued; nothing here touches a socket, a loop or the wall
clock (time comes from the injected :class:`~bridge.clock.Clock`). Every timeout of a call (no stream
after the pre-warm, no ``session.updated``, a silent Twilio socket, the profile's time limit) is decided
here, by :meth:`~CallSession.tick`; :meth:`~CallSession.deadline` says when it is next due, so the driver
keeps one timer per call and no policy of its own.

Call states (:data:`~bridge.states.TRANSITIONS`; the tables and enums live in ``states.py``): a call is
*live* once Twilio's ``start`` has arrived **and** the model has confirmed our ``session.update``; either
may come first (the Realtime socket is opened while the webhook is answered). Caller audio that arrives
before the call is live is queued, not dropped, and the greeting is requested the moment it goes live.

The playback ledger (what the caller heard, from Twilio's marks) is :class:`~bridge.playback.Playback`,
and the call's Realtime sessions (rollover, reconnection) are :class:`~bridge.rollover.Rollover`: parts of
this class, each in its own module.

Responses and goodbyes (:data:`~bridge.states.GOODBYE_TRANSITIONS`): a goodbye (shutdown, time limit) is
asked for, spoken by the next response, and the call ends once the caller has heard it (its last mark).

Barge-in (``input_audio_buffer.speech_started`` while the caller hears the model): Twilio ``clear``
first, then ``conversation.item.truncate`` at the proved position (clamped to what the model generated),
``response.cancel`` only while that response is active, and every later delta of it is dropped. The
outbound resampler and framer are reset so the next response starts clean.
"""

from __future__ import annotations

import logging
import random
from collections import deque

from bridge import realtime as rt
from bridge import twilio as tw
from bridge.audio import Framer, InboundTranscoder, OutboundTranscoder, model_bytes_to_ms
from bridge.clock import Clock
from bridge.config import AudioPath
from bridge.conversation import Conversation
from bridge.legs import LegCommand, LegInfo
from bridge.playback import HELD_CAP_SECONDS, ULAW_BYTES_PER_MS, Item, Stats
from bridge.prompts import Profile
from bridge.rollover import MAX_QUEUED_FRAMES, Due, Rollover
from bridge.states import (
    GOODBYE_TRANSITIONS,
    TRANSITIONS,
    CallState,
    EndReason,
    Goodbye,
    GoodbyeTrigger,
    Link,
    Timeouts,
    Trigger,
)
from bridge.twilio import ClearAudio, PlaceMark, PlayAudio, TwilioCommand

__all__ = [
    "GOODBYE_TRANSITIONS",
    "TRANSITIONS",
    "CallSession",
    "CallState",
    "ClearAudio",
    "EndReason",
    "Goodbye",
    "GoodbyeTrigger",
    "PlaceMark",
    "PlayAudio",
    "Stats",
    "Timeouts",
    "Trigger",
    "TwilioCommand",
]

log = logging.getLogger(__name__)

MARK_EVERY_FRAMES = 5
"""A mark after every 5 frames (100 ms) bounds the interpolation between proofs of playback."""
DEFAULT_TIMEOUTS = Timeouts()
UTTERANCE_FRAMES = 50 * 15
"""The caller's current utterance is kept (15 s at most, as Twilio's μ-law) to give it again to a session
that replaces one lost while the caller spoke."""
PRE_SPEECH_FRAMES = 25
"""And the 500 ms before the VAD's ``speech_started`` (the service's prefix padding is 300 ms)."""


TIME_LIMIT_GOODBYE = (
    "I'm sorry, we have reached the time limit for this call. Thank you for calling, goodbye!"
)


class CallSession(Rollover):
    """The sans-I/O state of one call; see the module docstring for how it works."""

    def __init__(
        self,
        *,
        call_id: str,
        profile: Profile,
        audio_path: AudioPath,
        clock: Clock,
        mark_every_frames: int = MARK_EVERY_FRAMES,
        greeting_audio: bytes | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.call_id = call_id
        self.profile = profile
        self.audio_path = audio_path
        self.clock = clock
        self.timeouts = timeouts
        self.state = CallState.WAITING_BOTH
        self.stats = Stats()
        self.stream_sid: str | None = None
        self.start: tw.Start | None = None
        self.end_reason: EndReason | None = None
        self.end_detail = ""
        """What more there is to say about :attr:`end_reason` (an error's text), or empty."""
        self._to_twilio: list[TwilioCommand] = []
        self._to_model: list[rt.ClientCommand] = []
        self._mark_every = mark_every_frames
        self._inbound = InboundTranscoder(audio_path)
        self._outbound = OutboundTranscoder(audio_path)
        self._framer = Framer()
        self._queue: deque[bytes] = deque()
        self._prestart: list[tuple[Item, bytes]] = []
        self._greeted = False
        self._regreet = False
        self._attempts = 0
        self._retry_at: float | None = None
        self._jitter = random.Random(call_id)
        """Jitter of the pauses between reconnection attempts: varied across calls, the same on replay."""
        self.greeting_audio = greeting_audio or None
        """A pre-rendered greeting (μ-law 8 kHz), played the instant the stream starts."""
        self._turn_ended_at: float | None = None
        self.generation = 0
        """Bumped at every barge-in: frames computed before it must not be sent after it."""
        # Time: when the call was made (the webhook), when its stream started, when Twilio last spoke.
        self._created_at = clock.now()
        self._started_at = 0.0
        self._last_twilio_at = 0.0
        self._limit_goodbye_at: float | None = None
        # Response bookkeeping.
        self.goodbye = Goodbye.NONE
        self._goodbye_response: str | None = None
        self._goodbye_ask: rt.CreateResponse | None = None
        self._active_response: str | None = None
        self._dropped: set[str] = set()
        self._items: dict[str, Item] = {}
        self._current: Item | None = None
        self._init_playback()  # the ledger and the send bound (playback.py)
        # Realtime sessions (legs.py): the serving one, the next one, what the driver must do to others.
        self.conversation = Conversation()
        self.link = Link.UP
        self.leg = 1
        """The number of the Realtime session serving the call."""
        self.legs: dict[int, LegInfo] = {1: LegInfo(1, "first", self._created_at)}
        self.hold_audio: bytes | None = None
        """A pre-rendered "one moment, please" (μ-law 8 kHz), played when a reconnection takes long."""
        self._forwarding = False
        """Caller audio goes straight to the serving session (live, and a session serves)."""
        self.rearm = False
        """A deadline may have come nearer than the driver's timer: it re-arms (and clears this)."""
        self._next: int | None = None
        self._next_since = 0.0
        self._next_count = 2
        self._control: list[LegCommand] = []
        self._swap_due = float("inf")
        self._swap_force = float("inf")
        self._forced = False
        self._down_since: float | None = None
        self._hold_due: float | None = None
        self._cut: Item | None = None
        """The answer a lost session was generating: carried as heard, then finished by the next one."""
        self._unanswered = False
        """The caller's turn ended and its answer was owed when the session was lost."""
        self._last_model_at = self._created_at
        self._caller_speaking = False
        self._answer_owed = False
        self._recent: deque[bytes] = deque(maxlen=PRE_SPEECH_FRAMES)
        self._sequence = 0
        """The last Twilio sequence number of caller media (0: none yet)."""
        self._utterance: deque[bytes] = deque(maxlen=UTTERANCE_FRAMES)

    # -- what to send, per destination (taken by the driver, like websockets' data_to_send())

    def twilio_to_send(self) -> list[TwilioCommand]:
        """The Twilio commands queued since the last call, in order; the queue is emptied."""
        out = self._to_twilio
        if out:
            self._to_twilio = []
        return out

    def model_to_send(self) -> list[rt.ClientCommand]:
        """The client commands for the serving Realtime session (:attr:`leg`) queued since the last call, in
        order; the queue is emptied. Take :meth:`legs_to_send` first. While no session serves (a
        reconnection), nothing: what is asked for meanwhile goes to the next one."""
        out = self._to_model
        if out:
            if self.link is Link.DOWN:
                return []
            self._to_model = []
        return out

    def legs_to_send(self) -> list[LegCommand]:
        """What to do to the call's other Realtime sessions (open, send to, close), in order; emptied."""
        out = self._control
        if out:
            self._control = []
        return out

    # -- state tables

    def _went_live(self) -> None:
        to_model = self._to_model
        to_model.extend(rt.AppendAudio(chunk) for chunk in self._queue)
        self._queue.clear()
        self._forwarding = True
        self._plan_swap(self.legs[self.leg])
        instructions = self.profile.greeting_instructions()
        if instructions and not self._greeted:
            self._greeted = True
            if self.greeting_audio is not None:
                # The caller is already hearing it: the model only needs to know it was said.
                greeting = self.profile.greeting.strip()
                to_model.append(rt.AddTextItem("assistant", greeting))
                self.conversation.said("assistant", "local:greeting", greeting, self.leg)
            else:
                to_model.append(rt.CreateResponse(instructions))

    # -- time

    def deadline(self) -> float | None:
        """When :meth:`tick` is next due (the clock's time), or ``None`` once the call has ended."""
        return None if self.state is CallState.ENDED else self._next_timeout()[0]

    def tick(self, now: float) -> None:
        """Apply every timeout that is due at ``now``."""
        while self.state is not CallState.ENDED:
            due, what = self._next_timeout()
            if now < due:
                return
            if isinstance(what, EndReason):
                self.end(what, self.timeouts.detail(what))
                return
            what(now)

    def _next_timeout(self) -> tuple[float, Due]:
        """The earliest timeout: what it ends the call with, or what to do then."""
        timeouts = self.timeouts
        if self.start is None:
            return self._created_at + timeouts.prewarm, EndReason.NO_STREAM
        due: list[tuple[float, Due]] = []
        if self.state is not CallState.LIVE:  # first: on a tie, the silent model is the reason
            due.append((self._started_at + timeouts.model_ready, EndReason.MODEL_NOT_READY))
        due.append((self._last_twilio_at + timeouts.twilio_idle, EndReason.TWILIO_IDLE))
        if self._limit_goodbye_at is None:
            due.append((self._started_at + self.profile.max_call_seconds, self._time_limit))
        else:
            due.append((self._limit_goodbye_at + timeouts.time_limit_grace, EndReason.TIME_LIMIT))
        give_up = self._give_up_at()
        if give_up is not None:
            due.append((give_up, self._give_up))
        if self.state is CallState.LIVE:
            due.extend(self._link_timeouts())
        return min(due, key=lambda entry: entry[0])

    def _time_limit(self, now: float) -> None:
        log.info("call %s: time limit of %d s reached", self.call_id, self.profile.max_call_seconds)
        self._limit_goodbye_at = now
        self.say_goodbye(TIME_LIMIT_GOODBYE)

    # -- the Realtime side

    def upstream_opened(self) -> None:
        """The first Realtime socket is open: configure the session from the profile."""
        self._to_model.append(rt.UpdateSession(self.profile, self.audio_path))

    def receive_realtime(self, event: rt.ServerEvent, leg: int = 1) -> None:
        """Handle one Realtime server event of session ``leg``; what to send is queued."""
        if self.state is CallState.ENDED:
            return
        if leg != self.leg or self.link is Link.DOWN:
            if leg == self._next:
                self._from_next(event, leg)
            elif isinstance(event, rt.CallerTranscript | rt.AssistantTranscript):
                self._late_transcript(event, leg)
            return  # otherwise, a session that no longer serves the call (its socket is being closed)
        self._last_model_at = self.clock.now()
        if isinstance(event, rt.AudioDelta):
            self._on_delta(event)
            return
        if isinstance(event, rt.SpeechStarted):
            self._caller_speaking = True
            self._utterance.clear()
            self._utterance.extend(self._recent)
            self._on_speech_started()
        elif isinstance(event, rt.SpeechStopped):
            self.rearm = True  # the model's answer is owed: the watchdog runs
            self._turn_ended_at = self.clock.now()
            self._caller_speaking = False
            self._answer_owed = self.profile.turn_detection.create_response
            self.conversation.reserve("user", event.item_id, leg)
        elif isinstance(event, rt.ResponseCreated):
            self.rearm = True  # a response runs: the watchdog runs
            self._active_response = event.response_id
            self._answer_owed = False
            if self.goodbye is Goodbye.ASKED:
                self._goodbye_response = event.response_id
                self._goodbye_move(GoodbyeTrigger.RESPONSE_CREATED)
        elif isinstance(event, rt.OutputItemAdded):
            if event.response_id not in self._dropped and event.item_type == "message":
                # A delta may have come first (and marks may point at the item): never replace it.
                self._current = self._items.setdefault(
                    event.item_id, Item(event.item_id, event.response_id, leg=leg)
                )
                self.conversation.reserve("assistant", event.item_id, leg)
        elif isinstance(event, rt.AudioDone):
            if event.response_id not in self._dropped:
                self._flush_outbound()
        elif isinstance(event, rt.ResponseDone):
            self._on_response_done(event)
        elif isinstance(event, rt.SessionCreated):
            self._created(self.legs[leg], event)
        elif isinstance(event, rt.SessionUpdated):
            self._on_session_updated(event)
        elif isinstance(event, rt.AssistantTranscriptDelta):
            self.conversation.saying(event.item_id, event.delta, leg)
        elif isinstance(event, rt.AssistantTranscript):
            self.conversation.said("assistant", event.item_id, event.transcript, leg)
            if event.response_id not in self._dropped:
                self.stats.transcript.append(("assistant", event.transcript))
        elif isinstance(event, rt.CallerTranscript):
            self.stats.transcript.append(("caller", event.transcript))
            self.conversation.said("user", event.item_id, event.transcript, leg)
        elif isinstance(event, rt.ErrorEvent):
            self._on_error(event)
        self._maybe_swap()

    def _on_session_updated(self, event: rt.SessionUpdated) -> None:
        problem = self._format_problem(event)
        if problem:
            self.end(EndReason.AUDIO_FORMAT_MISMATCH, problem)
        elif (
            self.state in (CallState.WAITING_BOTH, CallState.WAITING_MODEL)
            and self._move(Trigger.MODEL_READY) is CallState.LIVE
        ):
            self._went_live()

    def _on_error(self, event: rt.ErrorEvent) -> None:
        if event.benign:
            return
        self.stats.upstream_errors += 1
        if event.fatal:
            self.end(EndReason.MODEL_FATAL, f"{event.code}: {event.message}")
        elif self.state in (CallState.WAITING_BOTH, CallState.WAITING_MODEL):
            # Before session.updated, an error means our configuration was refused: the call cannot work.
            self.end(EndReason.MODEL_REFUSED_SESSION, f"{event.code}: {event.message}")
        elif event.session_lost and self.state is not CallState.LIVE:
            self.end(
                EndReason.MODEL_DROPPED, f"{event.code}: {event.message}"
            )  # the fallback, not a reconnect
        elif event.session_lost:
            cause = "session_expired" if event.code == "session_expired" else "server_error"
            self._lost(cause, f"{event.code}: {event.message}")

    def _on_response_done(self, event: rt.ResponseDone) -> None:
        if event.response_id in self._dropped:
            self._dropped.discard(event.response_id)
        else:
            self._flush_outbound()
        if self._active_response == event.response_id:
            self._active_response = None
        if event.response_id == self._goodbye_response and self.goodbye is Goodbye.SPEAKING:
            self._goodbye_move(GoodbyeTrigger.RESPONSE_DONE)
        self._end_if_goodbye_heard()

    def _end_if_goodbye_heard(self) -> None:
        if self.goodbye is Goodbye.SPOKEN and not self._ledger and not self._unmarked_frames:
            self.end(EndReason.SAID_GOODBYE)

    # -- barge-in

    def _on_speech_started(self) -> None:
        if not self.live or not self.profile.turn_detection.interrupt_response:
            return  # interrupt_response false: the caller's speech does not interrupt the model
        self._barge_in()

    def _barge_in(self) -> None:
        """Stop the model's audio: clear, truncate at what was heard, cancel, drop what comes late."""
        hearing = self.hearing_model()
        position = self.heard_position()
        # What was computed for Twilio but not taken yet is stale now: it never reaches the caller.
        self._to_twilio.clear()
        if hearing:
            self._to_twilio.append(ClearAudio())
            self.stats.barge_ins += 1
        if position is not None and position[0].local:
            position = None  # the bridge's own audio: the model holds the greeting as text, nothing to cut
        self._cut_model(position)
        self._reset_playback()
        self.generation += 1

    def _hold_full(self, item: Item) -> None:
        """The audio held for Twilio reached its cap (playback.py): the response is cut at the end of what
        is held, which plays on, as if the caller had interrupted it there."""
        self.stats.held_cuts += 1
        log.warning(
            "call %s: over %.0f s of %s held for the caller; cutting the response there",
            self.call_id,
            HELD_CAP_SECONDS,
            item.item_id,
        )
        self._flush_outbound()
        sent_ms = item.sent_bytes / ULAW_BYTES_PER_MS - self._outbound.delay_ms
        generated_ms = model_bytes_to_ms(item.model_bytes, self.audio_path)
        self._cut_model((item, int(max(0.0, min(sent_ms, generated_ms)))))

    def _cut_model(self, position: tuple[Item, int] | None) -> None:
        """Make the model's conversation what the caller heard: ``position``'s item truncated there (later
        items of its response deleted), the active response cancelled and its later deltas dropped."""
        to_model = self._to_model
        active = self._active_response
        if position is not None:
            item, heard_ms = position
            self.stats.truncations.append((item.item_id, heard_ms))
            log.info("call %s: truncating %s at %d ms", self.call_id, item.item_id, heard_ms)
            conversation = self.conversation
            generated = model_bytes_to_ms(item.model_bytes, self.audio_path)
            if item is self._cut:  # cut off by a lost session, then interrupted: heard this far, final
                conversation.cut_off(item.item_id, heard_ms, generated)
                self._cut = None
            else:
                conversation.heard(item.item_id, heard_ms, generated)
            if item.leg == self.leg and self.link is not Link.DOWN:
                to_model.append(rt.TruncateItem(item.item_id, heard_ms))
            self._recarry(item.item_id)
            # Later items of the same response were never heard: remove them from the conversation.
            later = False
            for other in self._items.values():
                if other is item:
                    later = True
                elif later and other.response_id == item.response_id and other.model_bytes:
                    conversation.heard(other.item_id, 0, 1)
                    if other.leg == self.leg and self.link is not Link.DOWN:
                        to_model.append(rt.DeleteItem(other.item_id))
                    self._recarry(other.item_id)
        if active is not None and (position is None or position[0].response_id != active):
            # The caller was hearing something else (an answer of a lost session, "one moment"): what
            # the serving session generated meanwhile was never heard.
            for other in self._items.values():
                if other.response_id == active and other.model_bytes and other.leg == self.leg:
                    self.conversation.heard(other.item_id, 0, 1)
                    to_model.append(rt.DeleteItem(other.item_id))
        if active is not None:
            to_model.append(rt.CancelResponse(active))
            self.stats.cancels += 1
            self._dropped.add(active)
            self._active_response = None

    # -- the Twilio side

    def receive_twilio(self, event: tw.TwilioEvent) -> None:
        """Handle one Twilio Media Streams event; what to send is queued."""
        if self.state is CallState.ENDED:
            return
        self._last_twilio_at = self.clock.now()
        if isinstance(event, tw.Media):
            if event.stream_sid != self.stream_sid or event.track != "inbound":
                self._discard(event)  # before start, another call's stream, or our own audio echoed
                return
            sequence = event.sequence_number
            if sequence != self._sequence + 1 and self._sequence:
                self._gap(sequence)
            self._sequence = sequence
            self.stats.frames_in += 1
            audio = self._inbound.convert(event.payload)
            payload = event.payload  # kept as μ-law (a sixth of PCM16): converted again only when resent
            self._recent.append(payload)
            if self._caller_speaking:
                self._utterance.append(payload)
            if self._forwarding:
                self._to_model.append(rt.AppendAudio(audio))
                return
            self._queue.append(audio)
            if len(self._queue) > MAX_QUEUED_FRAMES:
                self._queue.popleft()
                self.stats.frames_queued_dropped += 1
        elif isinstance(event, tw.Mark):
            self._sequence = event.sequence_number  # every message of Twilio's is numbered
            self._on_mark(event.name)
        elif isinstance(event, tw.Start):
            self._on_start(event)
        elif isinstance(event, tw.Stop):
            self.end(EndReason.CALLER_HUNG_UP)
        elif isinstance(event, tw.Dtmf):
            self._sequence = event.sequence_number
            self.stats.dtmf.append(event.digit)
            if self.state is CallState.LIVE:
                text = f"[The caller pressed {event.digit} on the keypad.]"
                key = f"dtmf:{len(self.stats.dtmf)}"
                if self._forwarding:
                    self._to_model.append(rt.AddTextItem("user", text))
                    self.conversation.said("user", key, text, self.leg)
                else:
                    self.conversation.said("user", key, text)
                # else: reconnecting; the next session is told with the rest of the conversation

    def _discard(self, event: tw.Media) -> None:
        """Media that is not this call's caller audio: counted, logged once per kind, never the model's."""
        kind = (
            "before start"
            if self.stream_sid is None
            else ("of another stream" if event.stream_sid != self.stream_sid else f"on track {event.track!r}")
        )
        discarded = self.stats.frames_discarded
        if kind not in discarded:
            log.warning("call %s: discarding media %s (counted, logged once)", self.call_id, kind)
        discarded[kind] = discarded.get(kind, 0) + 1

    def _gap(self, sequence: int) -> None:
        """Twilio's sequence numbers skipped (messages lost or reordered on the way): counted, logged once."""
        if not self.stats.sequence_gaps:
            log.warning(
                "call %s: Twilio sequence jumped from %d to %d (counted, logged once)",
                self.call_id,
                self._sequence,
                sequence,
            )
        self.stats.sequence_gaps += 1

    def _on_start(self, event: tw.Start) -> None:
        if self.start is not None:
            log.info("call %s: a second start event, ignored", self.call_id)
            return  # a repeated start changes nothing
        self.start = event
        self.stream_sid = event.stream_sid
        self._sequence = event.sequence_number
        self._started_at = self._last_twilio_at
        for item, frame in self._prestart:
            self._emit([frame], item, final=False)
        self._prestart.clear()
        if self.greeting_audio is not None and self.profile.greeting_instructions():
            self._play_local("greeting", self.greeting_audio)
            # The model is told the greeting as text, so no transcript event will carry it: note it here.
            self.stats.transcript.append(("assistant", self.profile.greeting.strip()))
        if self._move(Trigger.STREAM_STARTED) is CallState.LIVE:
            self._went_live()

    # -- goodbye (shutdown, time limit)

    def say_goodbye(self, text: str) -> None:
        """Stop what is playing and ask the model to say ``text``; the call ends once it was heard."""
        if self.goodbye is not Goodbye.NONE or self.state is CallState.ENDED:
            return
        if self.state is not CallState.LIVE:
            self.end(EndReason.SHUTDOWN)
            return
        self._goodbye_move(GoodbyeTrigger.ASK)
        self._barge_in()
        self._goodbye_ask = rt.CreateResponse(f"Say exactly this to the caller, then stop: {text}")
        self._to_model.append(self._goodbye_ask)

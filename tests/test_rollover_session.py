"""Rollover and reconnection in the sans-I/O session, on a manual clock: turn boundaries, a 65-minute call
through many rollovers, the watchdog, "one moment", fatal errors. (Over real sockets: test_rollover.py.)"""

from __future__ import annotations

from collections import defaultdict

import pytest

from bridge import realtime as rt
from bridge import twilio as tw
from bridge.clock import ManualClock
from bridge.config import AudioPath
from bridge.conversation import CARRY_CHARS, CONTINUE_NOTE, OMITTED_NOTE, RESUME_NOTE, Conversation, cut_text
from bridge.legs import CloseLeg, OpenLeg, swap_times
from bridge.prompts import Profile
from bridge.session import CallSession
from bridge.states import EndReason, Link, Timeouts
from bridge.twilio import ClearAudio, PlaceMark, PlayAudio

pytestmark = pytest.mark.timeout(120)

SID = "MZ" + "0" * 32
FRAME = 0.02
G711 = AudioPath.G711_ULAW


def start_event() -> tw.Start:
    return tw.Start(SID, "AC" + "1" * 32, "CA" + "2" * 32, ("inbound",), {}, "audio/x-mulaw", 8000, 1, 1)


class Line:
    """A session driven as call.py drives it, against a scripted model with any number of sessions, and a
    Twilio that plays the audio it is sent in real time and echoes each mark when it was played."""

    def __init__(self, session: CallSession, clock: ManualClock, *, cap: float = 1800.0) -> None:
        self.session, self.clock, self.cap = session, clock, cap
        self.sent: dict[int, list[rt.ClientCommand]] = defaultdict(list)
        """Every client command each Realtime session received, in order."""
        self.opened: list[OpenLeg] = []
        self.closed: list[int] = []
        self.twilio: list[tw.TwilioEvent | object] = []
        self.marks: list[tuple[float, str]] = []
        self.play_end = 0.0
        self.answer_on_open = True
        self.inbox: list[tuple[int, rt.ServerEvent]] = []
        self.to_closed: list[rt.ClientCommand] = []
        self.answer_updates = True

    def created(self, leg: int) -> rt.SessionCreated:
        return rt.SessionCreated(f"sess_{leg}", int(self.clock.wall() + self.cap))

    def pump(self) -> None:
        session = self.session
        while True:
            to_twilio = session.twilio_to_send()
            control = session.legs_to_send()
            serving = session.leg
            to_model = session.model_to_send()
            for command in to_twilio:
                self.twilio.append(command)
                if isinstance(command, PlayAudio):
                    self.play_end = max(self.play_end, self.clock.now()) + len(command.payload) / 8000
                elif isinstance(command, PlaceMark):
                    self.marks.append((self.play_end, command.name))
                elif isinstance(command, ClearAudio):
                    self.play_end = self.clock.now()
                    flushed, self.marks = self.marks, []
                    for _, name in flushed:  # Twilio echoes the marks a clear flushed at once
                        self.inbox.append((0, rt.OtherEvent(name)))
            for command in control:
                if isinstance(command, OpenLeg):
                    self.opened.append(command)
                    if self.answer_on_open:
                        self.inbox.append((command.number, self.created(command.number)))
                        self.inbox.append((-command.number, rt.OtherEvent("opened")))
                elif isinstance(command, CloseLeg):
                    self.closed.append(command.number)
                else:
                    self.receive(command.number, command.commands)
            self.receive(serving, to_model)
            if not self.inbox:
                return
            leg, event = self.inbox.pop(0)
            if leg == 0:
                assert isinstance(event, rt.OtherEvent)
                session.receive_twilio(tw.Mark(SID, event.type, 0))
            elif leg < 0:
                session.leg_opened(-leg)
            else:
                session.receive_realtime(event, leg)

    def receive(self, leg: int, commands: list[rt.ClientCommand]) -> None:
        if leg in self.closed:
            self.to_closed.extend(commands)  # a write to a closed socket: lost
        self.sent[leg].extend(commands)
        for command in commands:
            if isinstance(command, rt.UpdateSession) and leg in self.open_legs() and self.answer_updates:
                self.inbox.append((leg, rt.SessionUpdated(f"sess_{leg}", "alloy", G711.value, G711.value)))

    def open_legs(self) -> set[int]:
        return {1} | {c.number for c in self.opened}

    def event(self, event: rt.ServerEvent, leg: int | None = None) -> None:
        self.session.receive_realtime(event, self.session.leg if leg is None else leg)
        self.pump()

    def step(self, payload: bytes) -> None:
        """20 ms pass: due timeouts, the marks played by now, then one caller frame."""
        now = self.clock.advance(FRAME)
        deadline = self.session.deadline()
        if deadline is not None and deadline <= now:
            self.session.tick(now)
            self.pump()
        while self.marks and self.marks[0][0] <= now:
            _, name = self.marks.pop(0)
            self.session.receive_twilio(tw.Mark(SID, name, 0))
            self.pump()
        self.session.receive_twilio(tw.Media(SID, "inbound", 1, 0, payload, 1))
        self.pump()

    def appended(self) -> list[bytes]:
        """Caller audio each session received, sessions in order."""
        return [c.audio for leg in sorted(self.sent) for c in self.sent[leg] if isinstance(c, rt.AppendAudio)]


def line(*, cap: float = 1800.0, hold: bytes | None = None, **timeouts: float) -> Line:
    clock = ManualClock(100.0)
    profile = Profile(greeting="", max_call_seconds=4 * 3600)
    session = CallSession(
        call_id="CA-roll", profile=profile, audio_path=G711, clock=clock, timeouts=Timeouts(**timeouts)
    )
    session.hold_audio = hold
    call = Line(session, clock, cap=cap)
    session.upstream_opened()
    call.inbox.append((1, call.created(1)))
    call.pump()
    session.receive_twilio(start_event())
    call.pump()
    assert session.live
    return call


def frame(n: int) -> bytes:
    """A caller frame that says which one it is."""
    return n.to_bytes(4, "big") * 40


def answer(call: Line, key: str, seconds: float, words: str = "") -> None:
    """The serving session answers with ``seconds`` of audio, generated at once."""
    response, item = f"r{key}", f"a{key}"
    call.event(rt.ResponseCreated(response))
    call.event(rt.OutputItemAdded(response, item, "message"))
    for _ in range(int(seconds)):
        call.event(rt.AudioDelta(response, item, b"\x7f" * 8000))
    call.event(rt.AudioDone(response, item))
    call.event(rt.AssistantTranscript(response, item, words or f"answer {key}"))
    call.event(rt.ResponseDone(response, "completed", None))


# -- a 65-minute call


def test_a_65_minute_call_rolls_over_again_and_again_losing_no_audio_and_carrying_the_conversation() -> None:
    cap = 600.0  # each session lives 10 minutes: due 2 minutes before its end, forced 30 s before
    call = line(cap=cap)
    session = call.session
    n, cycle = 0, 15.5
    turn = 0
    next_turn = 1.0
    asked: list[tuple[float, int]] = []
    while n < int(65 * 60 / FRAME):
        t = n * FRAME
        if t >= next_turn:
            # The caller speaks 6 s, then the model answers 10 s: the caller always starts again before
            # the answer has played out, so there is never a natural boundary: every swap is forced.
            turn += 1
            call.event(rt.SpeechStarted(0, f"u{turn}"))
            for _ in range(300):
                call.step(frame(n))
                n += 1
            call.event(rt.SpeechStopped(0, f"u{turn}"))
            call.event(rt.CallerTranscript(f"u{turn}", f"question {turn}"))
            asked.append((call.clock.now(), turn))
            answer(call, f"{session.leg}_{turn}", 10, f"answer {turn} " + "word " * 20)
            next_turn = (n * FRAME) + cycle - 6
        call.step(frame(n))
        n += 1
    assert not session.ended
    assert session.stats.rollovers >= 5 and session.stats.reconnects == []
    assert call.to_closed == []  # nothing was written to a session after it was closed
    # Every caller frame reached exactly one session, in order: none lost, none twice.
    assert call.appended() == [frame(i) for i in range(n)]
    # No session outlived its cap: each was closed before its expires_at.
    for number, info in session.legs.items():
        if info.ended_at is not None:
            assert info.created_at is not None and info.ended_at - info.created_at < cap, number
    # Every new session got the conversation so far, ending with the note, and was never asked to greet.
    for leg in range(2, session.leg + 1):
        items = [c for c in call.sent[leg] if isinstance(c, rt.AddTextItem)]
        assert CONTINUE_NOTE in [c.text for c in items]
        served_from = session.legs[leg].served_from
        assert served_from is not None
        questions = [c.text for c in items if c.role == "user" and c.text.startswith("question")]
        expected = [f"question {k}" for t, k in asked if t < served_from]
        # All of them, or the newest within the budget with a note that the start is left out.
        assert questions == expected[len(expected) - len(questions) :] and questions[-1] == expected[-1], (
            leg,
            len(questions),
            len(expected),
            questions[-3:],
            expected[-3:],
        )
        assert len(questions) == len(expected) or items[0].text == OMITTED_NOTE
        assert not any(isinstance(c, rt.CreateResponse) for c in call.sent[leg])
        # A barge-in on audio of an earlier session rewrites its carried item; a truncate names only
        # this session's own items.
        own = {f"a{leg}_{k}" for k in range(turn + 1)}
        assert all(c.item_id in own for c in call.sent[leg] if isinstance(c, rt.TruncateItem))
    assert sorted(call.closed) == list(range(1, session.leg))


# -- turn boundaries


def ready_for_rollover(cap: float = 40.0) -> Line:
    call = line(cap=cap, rollover_margin=10.0)
    for n in range(int((cap - 10) / FRAME) + 2):
        call.step(frame(n))
        if call.opened:
            break
    assert call.opened == [OpenLeg(2, "rollover", 10.0)]
    return call


def test_a_due_rollover_prepares_the_next_session_and_swaps_at_once_when_all_is_quiet() -> None:
    call = ready_for_rollover()
    session = call.session
    assert session.leg == 2 and session.link is Link.UP  # nothing was going on: swapped when ready
    assert call.closed == [1]
    update = call.sent[2][0]
    assert isinstance(update, rt.UpdateSession) and update.profile == session.profile
    assert session.legs[1].ended == "rolled over to session 2"


def test_no_swap_inside_the_callers_speech_nor_while_an_answer_is_owed_running_or_playing() -> None:
    call = line(cap=40.0, rollover_margin=10.0)
    session = call.session
    n = 0
    for n in range(int(29.9 / FRAME)):
        call.step(frame(n))
    call.event(rt.SpeechStarted(0, "u1"))
    for _ in range(100):  # the next session becomes ready while the caller speaks
        n += 1
        call.step(frame(n))
    assert session.link is Link.READY and session.leg == 1
    call.event(rt.SpeechStopped(0, "u1"))
    call.step(frame(n + 1))
    assert session.leg == 1  # an answer is owed
    answer(call, "1_1", 2)
    call.step(frame(n + 2))
    assert session.leg == 1  # the answer is playing
    for k in range(n + 3, n + 200):
        call.step(frame(k))
        if session.leg == 2:
            break
    assert session.leg == 2 and call.play_end <= call.clock.now()  # swapped once it was all heard
    carried = [c for c in call.sent[2] if isinstance(c, rt.AddTextItem)]
    assert [c.text for c in carried][-1] == "answer 1_1"  # the answer, carried at the swap


def test_a_forced_swap_takes_a_moment_the_caller_is_silent_and_no_answer_runs() -> None:
    call = line(cap=40.0, rollover_margin=10.0)  # due at 30 s, forced at 37.5 s
    session = call.session
    for n in range(int(29.9 / FRAME)):
        call.step(frame(n))
    answer(call, "1_1", 20, "word " * 50)  # 20 s of audio: playing until well past the force time
    for _ in range(int(7.0 / FRAME)):
        call.step(frame(0))
    assert session.link is Link.READY and session.leg == 1
    for _ in range(int(1.0 / FRAME)):
        call.step(frame(0))
    assert session.leg == 2 and call.play_end > call.clock.now()  # forced, the answer playing on
    # The caller interrupts the old session's answer: cleared, and its carried item rewritten as heard.
    call.event(rt.SpeechStarted(0, "u2"))
    (delete,) = [c for c in call.sent[2] if isinstance(c, rt.DeleteItem)]
    (rewritten,) = [
        c for c in call.sent[2] if isinstance(c, rt.AddTextItem) and c.item_id == delete.item_id + "r"
    ]
    assert rewritten.text.endswith("…") or rewritten.text == ""
    assert not any(isinstance(c, rt.TruncateItem) for c in call.sent[2])
    assert any(isinstance(c, ClearAudio) for c in call.twilio)


# -- reconnection


def test_a_lost_session_is_replaced_holding_the_callers_audio_and_the_utterance_in_progress() -> None:
    call = line()
    session = call.session
    call.answer_on_open = False
    n = 0
    for n in range(50):
        call.step(frame(n))
    call.event(rt.SpeechStarted(0, "u1"))
    for n in range(50, 80):
        call.step(frame(n))
    session.leg_closed(1, EndReason.MODEL_DROPPED, "1006")
    call.pump()
    assert call.opened == [OpenLeg(2, "reconnect", 10.0)] and call.closed == [1]
    for n in range(80, 100):
        call.step(frame(n))
    call.answer_on_open = True
    session.leg_opened(2)
    call.inbox.append((2, call.created(2)))
    call.pump()
    assert session.leg == 2 and session.stats.reconnects == ["dropped"]
    second = [c.audio for c in call.sent[2] if isinstance(c, rt.AppendAudio)]
    # The utterance from 0.5 s before speech_started (frame 25), then everything held: nothing lost.
    assert second == [frame(i) for i in range(25, 100)]
    assert session.stats.reconnect_gaps and session.stats.reconnect_gaps[0] == pytest.approx(0.4)


def test_one_moment_is_played_when_the_gap_grows_and_the_call_ends_when_the_budget_is_spent() -> None:
    hold = b"\x55" * 8000
    call = line(hold=hold)
    session = call.session
    call.answer_on_open = False
    session.leg_closed(1, EndReason.MODEL_CLOSED, "1011 server error")
    call.pump()
    before = len(call.twilio)
    for n in range(int(1.4 / FRAME)):
        call.step(frame(n))
    assert not any(isinstance(c, PlayAudio) for c in call.twilio[before:])
    for n in range(int(0.2 / FRAME)):
        call.step(frame(n))
    played = b"".join(c.payload for c in call.twilio[before:] if isinstance(c, PlayAudio))
    assert played == hold and session.stats.holds_played == 1
    for n in range(int(8.5 / FRAME)):
        call.step(frame(n))
    assert session.ended and session.end_reason is EndReason.MODEL_LOST
    assert EndReason.MODEL_LOST.model_failed  # Twilio speaks the fallback message


def test_the_watchdog_counts_a_silent_model_with_a_response_owed_as_lost() -> None:
    call = line(model_idle=3.0)
    session = call.session
    call.event(rt.ResponseCreated("r1"))
    for n in range(int(2.9 / FRAME)):
        call.step(frame(n))
    assert call.opened == []
    for n in range(int(0.2 / FRAME)):
        call.step(frame(n))
    assert session.stats.reconnects == ["idle"] and call.closed[:1] == [1]
    assert session.leg == 2  # replaced at once (the scripted model answers)


def test_a_fatal_refusal_of_the_next_session_ends_the_call_with_the_fallback() -> None:
    call = line()
    session = call.session
    call.answer_on_open = False
    session.leg_closed(1, EndReason.MODEL_DROPPED, "no close frame")
    call.pump()
    session.leg_failed(2, "HTTP 401", fatal=True)
    assert session.end_reason is EndReason.MODEL_FATAL and EndReason.MODEL_FATAL.model_failed


def test_a_fatal_error_event_ends_the_call_and_session_expired_reconnects() -> None:
    call = line()
    call.event(
        rt.ErrorEvent(
            "session_expired", "Your session hit the maximum duration.", "invalid_request_error", None, None
        )
    )
    assert call.session.stats.reconnects == ["session_expired"] and call.session.leg == 2
    call.event(rt.ErrorEvent("insufficient_quota", "Quota exceeded.", "insufficient_quota", None, None))
    assert call.session.end_reason is EndReason.MODEL_FATAL


def test_an_answer_cut_off_by_a_drop_is_carried_as_sent_and_rewritten_as_heard_on_a_barge_in() -> None:
    call = line()
    session = call.session
    call.answer_on_open = False
    call.event(rt.SpeechStopped(0, "u1"))
    call.event(rt.CallerTranscript("u1", "what are your hours"))
    call.event(rt.ResponseCreated("r1"))
    call.event(rt.OutputItemAdded("r1", "a1", "message"))
    call.event(rt.AudioDelta("r1", "a1", b"\x7f" * 8000))
    call.event(rt.AssistantTranscriptDelta("r1", "a1", "one two three four five six seven eight nine ten"))
    for n in range(int(0.2 / FRAME)):
        call.step(frame(n))
    session.leg_closed(1, EndReason.MODEL_DROPPED, "no close frame")  # the answer is cut off mid-way
    call.pump()
    call.answer_on_open = True
    session.leg_opened(2)
    call.inbox.append((2, call.created(2)))
    call.pump()
    # All that was generated was sent, and plays on: the new session is told all of it, and to finish it.
    texts = [(c.role, c.text) for c in call.sent[2] if isinstance(c, rt.AddTextItem)]
    assert ("assistant", "one two three four five six seven eight nine ten") in texts
    assert texts[-1] == ("system", RESUME_NOTE)
    assert isinstance(call.sent[2][-1], rt.CreateResponse)
    assert not any(isinstance(c, rt.CreateResponse) for c in call.sent[1][1:])
    # The caller interrupts it at 0.4 s: the item carrying it is rewritten where the marks prove it heard.
    for n in range(int(0.2 / FRAME)):
        call.step(frame(n))
    call.event(rt.SpeechStarted(0, "u2"))
    (rewritten,) = [
        c for c in call.sent[2] if isinstance(c, rt.AddTextItem) and c.item_id and c.item_id[-1] == "r"
    ]
    assert rewritten.text.endswith("…") and 2 <= len(rewritten.text.split()) <= 6


# -- the plan and the carried conversation


def test_swap_times_follow_expires_at_the_margin_and_the_fallback_lifetime() -> None:
    assert swap_times(0.0, 1000.0, 2800, margin=120, max_session=1500) == (1680.0, 1770.0)
    assert swap_times(0.0, 1000.0, 1012, margin=120, max_session=1500) == (6.0, 10.5)  # at most half
    assert swap_times(0.0, 1000.0, None, margin=120, max_session=1500) == (1380.0, 1470.0)
    assert swap_times(0.0, 1000.0, 900, margin=120, max_session=1500) == (1380.0, 1470.0)  # a skewed clock
    assert swap_times(0.0, 1000.4, 1012, margin=120, max_session=1500) == (6.0, 10.5)  # whole seconds


def test_the_conversation_is_carried_in_order_cut_at_what_was_heard_within_its_budget() -> None:
    conversation = Conversation()
    conversation.reserve("user", "u1")
    conversation.said("assistant", "a1", "one two three four five six seven eight nine ten")
    conversation.said("user", "u1", "hello")  # a caller's transcript arrives after the answer to it
    conversation.heard("a1", 400, 1000)
    items = conversation.carry(2, first=True)
    assert [(c.role, c.text) for c in items] == [
        ("user", "hello"),
        ("assistant", "one two three four…"),
        ("system", CONTINUE_NOTE),
    ]
    assert conversation.carry(2, first=False) == []  # nothing twice
    assert cut_text("a b c", 0.0) == "" and cut_text("a b c", 1.0) == "a b c"
    long = Conversation()
    for k in range(400):
        long.said("user", f"u{k}", "x" * 100)
    carried = long.carry(2, first=True)
    assert carried[0].text == OMITTED_NOTE and sum(len(c.text) for c in carried[1:-1]) <= CARRY_CHARS


# -- what the review of the first version found


def test_the_next_session_closing_while_ready_is_tried_again_later_and_the_call_goes_on() -> None:
    call = line(cap=40.0, rollover_margin=10.0)
    session = call.session
    for n in range(int(29.9 / FRAME)):
        call.step(frame(n))
    call.event(rt.SpeechStarted(0, "u1"))  # the caller speaks: the ready session waits for a boundary
    for _ in range(50):
        call.step(frame(0))
    assert session.link is Link.READY
    session.leg_closed(2, EndReason.MODEL_DROPPED, "1006")  # it dies while waiting
    call.pump()
    assert session.link is Link.UP and session.leg == 1 and not session.ended
    call.event(rt.SpeechStopped(0, "u1"))
    answer(call, "1_1", 1)
    for _ in range(int(6.0 / FRAME)):
        call.step(frame(0))
    assert [c.number for c in call.opened] == [2, 3] and session.leg == 3  # tried again, and swapped


def test_a_barge_in_while_the_next_session_waits_rewrites_the_answer_it_was_told() -> None:
    call = line(cap=40.0, rollover_margin=10.0)
    session = call.session
    for n in range(int(29.9 / FRAME)):
        call.step(frame(n))
    answer(call, "1_1", 10, "word " * 40)  # playing: the next session is told all of it, and waits
    for _ in range(int(1.0 / FRAME)):
        call.step(frame(0))
    assert session.link is Link.READY
    carried = next(c for c in call.sent[2] if isinstance(c, rt.AddTextItem) and c.role == "assistant")
    assert len(carried.text.split()) == 40
    call.event(rt.SpeechStarted(0, "u1"))  # the caller cuts the answer short
    assert any(isinstance(c, rt.TruncateItem) for c in call.sent[1])
    delete = next(c for c in call.sent[2] if isinstance(c, rt.DeleteItem))
    rewritten = [
        c for c in call.sent[2] if isinstance(c, rt.AddTextItem) and c.item_id == carried.item_id + "r"
    ]
    assert delete.item_id == carried.item_id and rewritten and len(rewritten[0].text.split()) < 10


def test_a_goodbye_asked_while_reconnecting_is_said_by_the_next_session() -> None:
    call = line()
    session = call.session
    call.answer_on_open = False
    session.leg_closed(1, EndReason.MODEL_DROPPED, "1006")
    call.pump()
    session.say_goodbye("Goodbye!")
    call.pump()
    assert not any(isinstance(c, rt.CreateResponse) for c in call.sent[1][1:])  # not to the dead session
    call.answer_on_open = True
    session.leg_opened(2)
    call.inbox.append((2, call.created(2)))
    call.pump()
    (create,) = [c for c in call.sent[2] if isinstance(c, rt.CreateResponse)]
    assert create.instructions is not None and "Goodbye!" in create.instructions


def test_a_server_error_before_the_call_is_live_gives_the_fallback_not_a_reconnection() -> None:
    clock = ManualClock(100.0)
    session = CallSession(call_id="CA-x", profile=Profile(), audio_path=G711, clock=clock)
    session.upstream_opened()
    session.receive_realtime(
        rt.SessionUpdated("s", "alloy", G711.value, G711.value)
    )  # waiting for the stream
    session.receive_realtime(
        rt.ErrorEvent("server_error", "The server had an error.", "server_error", None, None)
    )
    assert session.end_reason is EndReason.MODEL_DROPPED and EndReason.MODEL_DROPPED.model_failed
    assert session.legs_to_send() == []


def test_a_new_session_refused_after_it_opened_is_tried_again_after_a_pause_not_at_once() -> None:
    call = line()
    session = call.session
    call.answer_on_open = False
    session.leg_closed(1, EndReason.MODEL_DROPPED, "1006")
    call.pump()
    call.answer_updates = False
    session.leg_opened(2)
    call.pump()
    session.receive_realtime(
        rt.ErrorEvent("invalid_value", "Refused.", "invalid_request_error", None, None), 2
    )
    call.pump()
    assert [c.number for c in call.opened] == [2] and 2 in call.closed  # no tight loop
    call.step(frame(0))
    for _ in range(int(1.0 / FRAME)):
        call.step(frame(0))
    assert [c.number for c in call.opened] == [2, 3]  # after a jittered pause of at most 0.5 s


def test_a_late_transcript_of_the_session_swapped_from_is_told_to_the_new_one() -> None:
    call = line(cap=40.0, rollover_margin=10.0)
    session = call.session
    call.event(rt.SpeechStarted(0, "u1"))
    call.event(rt.SpeechStopped(0, "u1"))
    answer(call, "1_1", 1)
    for n in range(int(31.0 / FRAME)):
        call.step(frame(n))
    assert session.leg == 2  # swapped; the caller's transcript of session 1 had not come yet
    assert ("user", "late words") not in [
        (c.role, c.text) for c in call.sent[2] if isinstance(c, rt.AddTextItem)
    ]
    session.receive_realtime(rt.CallerTranscript("u1", "late words"), 1)  # within the old socket's grace
    call.pump()
    assert ("user", "late words") in [(c.role, c.text) for c in call.sent[2] if isinstance(c, rt.AddTextItem)]
    assert ("caller", "late words") in session.stats.transcript
    (close,) = [c for c in session.legs.values() if c.number == 1]
    assert close.ended == "rolled over to session 2"


def test_a_greeting_lost_before_a_word_of_it_was_heard_is_asked_of_the_next_session() -> None:
    clock = ManualClock(100.0)
    profile = Profile(greeting="Hello, thanks for calling.")
    session = CallSession(call_id="CA-g", profile=profile, audio_path=G711, clock=clock)
    call = Line(session, clock)
    session.upstream_opened()
    call.inbox.append((1, call.created(1)))
    call.pump()
    session.receive_twilio(start_event())
    call.pump()
    call.event(rt.ResponseCreated("r_greet"))
    call.answer_on_open = True
    session.leg_closed(1, EndReason.MODEL_DROPPED, "1006")
    call.pump()
    texts = [c.text for c in call.sent[2] if isinstance(c, rt.AddTextItem)]
    assert not any("repeat" in t for t in texts)  # the caller said nothing: no apology for lost words
    (create,) = [c for c in call.sent[2] if isinstance(c, rt.CreateResponse)]
    assert create.instructions == profile.greeting_instructions()


def test_a_goodbye_being_said_when_the_session_is_lost_is_asked_of_the_next_one() -> None:
    call = line()
    session = call.session
    session.say_goodbye("Goodbye!")
    call.pump()
    call.event(rt.ResponseCreated("r_bye"))  # the goodbye is being spoken...
    session.leg_closed(1, EndReason.MODEL_DROPPED, "1006")  # ...when the session is lost
    call.pump()
    (create,) = [c for c in call.sent[2] if isinstance(c, rt.CreateResponse)]
    assert create.instructions is not None and "Goodbye!" in create.instructions
    # The next session's answer is that goodbye; the call ends once it is heard, not before.
    answer(call, "2_bye", 1)
    assert not session.ended
    for _ in range(int(1.5 / FRAME)):
        call.step(frame(0))
    assert session.end_reason is EndReason.SAID_GOODBYE


def test_a_barge_in_on_the_lost_sessions_answer_removes_what_the_new_one_queued_unheard() -> None:
    call = line()
    session = call.session
    answer(call, "1_1", 3, "word " * 30)  # three seconds, playing
    for _ in range(int(0.5 / FRAME)):
        call.step(frame(0))
    session.leg_closed(1, EndReason.MODEL_DROPPED, "1006")
    call.pump()
    assert session.leg == 2
    call.event(rt.ResponseCreated("r2"))  # the new session answers (its audio queued behind the old)
    call.event(rt.OutputItemAdded("r2", "a2", "message"))
    call.event(rt.AudioDelta("r2", "a2", b"\x7f" * 8000))
    call.event(rt.SpeechStarted(0, "u1"))  # the caller interrupts the old answer, still playing
    sent = call.sent[2]
    assert rt.DeleteItem("a2") in sent  # never heard: removed, not left for the model to believe heard
    assert rt.CancelResponse("r2") in sent
    assert not any(isinstance(c, rt.TruncateItem) for c in sent)

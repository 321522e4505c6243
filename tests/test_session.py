"""CallSession without sockets: states, queueing, the playback ledger and every barge-in rule."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from bridge import realtime as rt
from bridge import twilio as tw
from bridge.clock import ManualClock
from bridge.config import AudioPath
from bridge.errors import IllegalTransition
from bridge.prompts import Profile, TurnDetection
from bridge.session import (
    CallSession,
    CallState,
    ClearAudio,
    EndReason,
    Goodbye,
    PlaceMark,
    PlayAudio,
    Timeouts,
    Trigger,
)

SID = "MZ" + "0" * 32


@dataclass(frozen=True)
class Ended:
    """In a step's outputs: this step ended the call."""

    reason: EndReason
    detail: str = ""


class Driven:
    """A session as the driver runs it: each step returns what it queued for both sockets (Twilio's
    first, the order the driver sends them in), then :class:`Ended` when that step ended the call."""

    def __init__(self, session: CallSession) -> None:
        self.session = session

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def _step(self, action: Callable[..., None], *args: Any) -> list[object]:
        ended = self.session.ended
        action(*args)
        out: list[object] = [*self.session.twilio_to_send(), *self.session.model_to_send()]
        if self.session.ended and not ended:
            assert self.session.end_reason is not None
            out.append(Ended(self.session.end_reason, self.session.end_detail))
        return out

    def receive_twilio(self, event: tw.TwilioEvent) -> list[object]:
        return self._step(self.session.receive_twilio, event)

    def receive_realtime(self, event: rt.ServerEvent) -> list[object]:
        return self._step(self.session.receive_realtime, event)

    def upstream_opened(self) -> list[object]:
        return self._step(self.session.upstream_opened)

    def say_goodbye(self, text: str) -> list[object]:
        return self._step(self.session.say_goodbye, text)

    def end(self, reason: EndReason, detail: str = "") -> list[object]:
        return self._step(self.session.end, reason, detail)

    def tick(self, now: float) -> list[object]:
        return self._step(self.session.tick, now)


def start_event() -> tw.Start:
    return tw.Start(
        stream_sid=SID,
        account_sid="AC" + "1" * 32,
        call_sid="CA" + "2" * 32,
        tracks=("inbound",),
        custom_parameters={},
        encoding="audio/x-mulaw",
        sample_rate=8000,
        channels=1,
        sequence_number=1,
    )


def media(payload: bytes = b"\xff" * 160, n: int = 1) -> tw.Media:
    return tw.Media(SID, "inbound", n, 20 * n, payload, n + 1)


def mark(name: str) -> tw.Mark:
    return tw.Mark(SID, name, 0)


def updated(fmt: str) -> rt.SessionUpdated:
    return rt.SessionUpdated("sess_1", "alloy", fmt, fmt)


def make(
    path: AudioPath = AudioPath.G711_ULAW, *, greeting: str = "Hi there", interrupt: bool = True
) -> tuple[Driven, ManualClock]:
    clock = ManualClock(100.0)
    profile = Profile(greeting=greeting, turn_detection=TurnDetection(interrupt_response=interrupt))
    session = Driven(CallSession(call_id="CA-test", profile=profile, audio_path=path, clock=clock))
    return session, clock


def live(path: AudioPath = AudioPath.G711_ULAW, **kw: object) -> tuple[Driven, ManualClock]:
    session, clock = make(path, **kw)  # type: ignore[arg-type]
    session.upstream_opened()
    session.receive_twilio(start_event())
    session.receive_realtime(updated(path.value))
    assert session.live
    return session, clock


def respond(session: Driven, response: str, item: str, audio: bytes) -> list[object]:
    out: list[object] = []
    out += session.receive_realtime(rt.ResponseCreated(response))
    out += session.receive_realtime(rt.OutputItemAdded(response, item, "message"))
    out += session.receive_realtime(rt.AudioDelta(response, item, audio))
    return out


# -- states and queueing


def test_upstream_opened_configures_the_session_from_the_profile() -> None:
    session, _ = make(AudioPath.PCM16)
    (update,) = session.upstream_opened()
    assert update == rt.UpdateSession(session.profile, AudioPath.PCM16)


@pytest.mark.parametrize("stream_first", [True, False])
def test_goes_live_when_both_sides_are_ready_and_greets_once(stream_first: bool) -> None:
    session, _ = make()
    first = [start_event(), updated("g711_ulaw")] if stream_first else [updated("g711_ulaw"), start_event()]
    outs = []
    for event in first:
        outs += (
            session.receive_twilio(event) if isinstance(event, tw.Start) else session.receive_realtime(event)  # type: ignore[arg-type]
        )
    assert session.state is CallState.LIVE
    greetings = [o for o in outs if isinstance(o, rt.CreateResponse)]
    assert len(greetings) == 1 and "Hi there" in (greetings[0].instructions or "")
    # A second session.updated (e.g. after a later update) does not greet again.
    assert session.receive_realtime(updated("g711_ulaw")) == []


def test_no_greeting_when_the_profile_has_none() -> None:
    session, _ = make(greeting="  ")
    session.receive_twilio(start_event())
    assert session.receive_realtime(updated("g711_ulaw")) == []


def test_caller_audio_before_the_model_is_ready_is_queued_in_order_not_dropped() -> None:
    session, _ = make()
    session.receive_twilio(start_event())
    frames = [bytes([i]) * 160 for i in range(5)]
    for i, frame in enumerate(frames):
        assert session.receive_twilio(media(frame, i + 1)) == []
    outs = session.receive_realtime(updated("g711_ulaw"))
    appended = [o.audio for o in outs if isinstance(o, rt.AppendAudio)]
    assert appended == frames
    assert isinstance(outs[-1], rt.CreateResponse)  # the greeting after the queued audio
    # Once live, audio goes straight through.
    assert session.receive_twilio(media(b"\x01" * 160)) == [rt.AppendAudio(b"\x01" * 160)]


def test_pcm16_path_transcodes_caller_audio_to_24k() -> None:
    session, _ = live(AudioPath.PCM16)
    (append,) = session.receive_twilio(media(b"\xff" * 160))
    assert isinstance(append, rt.AppendAudio)
    assert len(append.audio) == 160 * 3 * 2  # 20 ms at 24 kHz, 16-bit


def test_illegal_transition_raises_and_changes_nothing() -> None:
    session, _ = live()
    with pytest.raises(IllegalTransition):
        session._move(Trigger.MODEL_READY)
    assert session.state is CallState.LIVE


def test_stop_ends_the_call_and_nothing_is_sent_after() -> None:
    session, _ = live()
    assert session.receive_twilio(tw.Stop(SID, "AC", "CA", 9)) == [Ended(EndReason.CALLER_HUNG_UP)]
    assert session.ended
    assert session.receive_twilio(media()) == []
    assert session.receive_realtime(rt.AudioDelta("r", "i", b"\x00" * 800)) == []
    assert session.end(EndReason.SHUTDOWN) == []
    assert session.end_reason is EndReason.CALLER_HUNG_UP  # the first reason stays


def test_a_refused_session_update_ends_the_call_with_the_reason() -> None:
    session, _ = make()
    outs = session.receive_realtime(
        rt.ErrorEvent("invalid_value", "voice is bad", "invalid_request_error", "x", None)
    )
    assert len(outs) == 1 and isinstance(outs[0], Ended)
    assert outs[0].reason is EndReason.MODEL_REFUSED_SESSION and "voice is bad" in outs[0].detail


def test_a_session_with_the_wrong_audio_format_ends_the_call() -> None:
    session, _ = make(AudioPath.PCM16)
    (end,) = session.receive_realtime(updated("g711_ulaw"))
    assert isinstance(end, Ended) and end.reason is EndReason.AUDIO_FORMAT_MISMATCH and "pcm16" in end.detail


def test_benign_cancel_error_is_ignored() -> None:
    session, _ = live()
    err = rt.ErrorEvent(
        "response_cancel_not_active", "no active response", "invalid_request_error", None, None
    )
    assert session.receive_realtime(err) == []
    assert session.stats.upstream_errors == 0


def test_dtmf_is_told_to_the_model() -> None:
    session, _ = live()
    (item,) = session.receive_twilio(tw.Dtmf(SID, "inbound_track", "5", 3))
    assert isinstance(item, rt.AddTextItem) and "5" in item.text
    assert session.stats.dtmf == ["5"]


# -- outbound framing and marks


def test_deltas_are_framed_with_marks_and_flushed_when_the_response_ends() -> None:
    session, _ = live()
    outs = respond(session, "r1", "i1", b"\x10" * 1000)  # 125 ms of μ-law
    plays = [o for o in outs if isinstance(o, PlayAudio)]
    marks = [o for o in outs if isinstance(o, PlaceMark)]
    assert [len(p.payload) for p in plays] == [160] * 6
    assert len(marks) == 1  # after 5 frames
    tail = session.receive_realtime(rt.AudioDone("r1", "i1"))
    assert [type(o) for o in tail] == [PlayAudio, PlaceMark]
    last = tail[0]
    assert isinstance(last, PlayAudio)
    assert last.payload == b"\x10" * 40 + b"\xff" * 120  # padded with μ-law silence
    assert session.receive_realtime(rt.ResponseDone("r1", "completed", None)) == []


def test_audio_is_never_sent_before_twilio_start_and_none_is_lost() -> None:
    session, _ = make()
    session.receive_realtime(updated("g711_ulaw"))
    assert respond(session, "r1", "i1", b"\x20" * 320) == []
    outs = session.receive_twilio(start_event())
    assert [len(o.payload) for o in outs if isinstance(o, PlayAudio)] == [160, 160]


# -- barge-in


def test_barge_in_sends_clear_first_then_truncate_at_the_proved_position_then_cancel() -> None:
    session, clock = live()
    respond(session, "r1", "i1", b"\x30" * 3200)  # 400 ms, marks m1..m4 every 100 ms
    clock.advance(0.1)
    session.receive_twilio(mark("m1"))
    clock.advance(0.1)
    session.receive_twilio(mark("m2"))
    clock.advance(0.05)  # 50 ms past the last proof: interpolated with the clock
    outs = session.receive_realtime(rt.SpeechStarted(900, "u1"))
    assert outs == [ClearAudio(), rt.TruncateItem("i1", 250), rt.CancelResponse("r1")]
    assert session.stats.barge_ins == 1 and session.stats.truncations == [("i1", 250)]


def test_interpolation_never_passes_the_next_unechoed_mark() -> None:
    session, clock = live()
    respond(session, "r1", "i1", b"\x30" * 3200)
    clock.advance(0.1)
    session.receive_twilio(mark("m1"))
    clock.advance(5.0)  # the m2 echo is late: the caller cannot have heard past m2
    outs = session.receive_realtime(rt.SpeechStarted(900, "u1"))
    assert rt.TruncateItem("i1", 200) in outs


def test_truncate_is_clamped_to_the_audio_the_model_generated() -> None:
    session, clock = live()
    respond(session, "r1", "i1", b"\x30" * 500)  # 62.5 ms generated, padded to 4 frames = 80 ms sent
    session.receive_realtime(rt.AudioDone("r1", "i1"))
    session.receive_realtime(rt.ResponseDone("r1", "completed", None))
    clock.advance(0.075)
    outs = session.receive_realtime(rt.SpeechStarted(900, "u1"))
    # Response already done: clear and truncate, but no cancel.
    assert outs == [ClearAudio(), rt.TruncateItem("i1", 62)]


def test_audio_queued_behind_earlier_audio_counts_from_when_that_audio_finished() -> None:
    session, clock = live()
    respond(session, "r1", "i1", b"\x30" * 800)  # 100 ms: m1
    session.receive_realtime(rt.AudioDone("r1", "i1"))
    session.receive_realtime(rt.ResponseDone("r1", "completed", None))
    clock.advance(0.01)
    respond(session, "r2", "i2", b"\x31" * 800)  # queued behind i1 at Twilio: m2
    clock.advance(0.09)
    session.receive_twilio(mark("m1"))  # i1 finished playing now; i2 starts now
    clock.advance(0.03)
    outs = session.receive_realtime(rt.SpeechStarted(900, "u1"))
    assert outs == [ClearAudio(), rt.TruncateItem("i2", 30), rt.CancelResponse("r2")]


def test_no_barge_in_when_the_caller_hears_nothing() -> None:
    session, _ = live()
    respond(session, "r1", "i1", b"\x30" * 800)
    session.receive_realtime(rt.AudioDone("r1", "i1"))
    session.receive_realtime(rt.ResponseDone("r1", "completed", None))
    session.receive_twilio(mark("m1"))  # everything played
    assert session.receive_realtime(rt.SpeechStarted(900, "u1")) == []
    assert session.stats.barge_ins == 0


def test_speech_while_the_model_is_thinking_cancels_without_clear_or_truncate() -> None:
    session, _ = live()
    session.receive_realtime(rt.ResponseCreated("r1"))
    assert session.receive_realtime(rt.SpeechStarted(900, "u1")) == [rt.CancelResponse("r1")]


def test_late_deltas_of_the_cancelled_response_are_dropped_and_stale_marks_ignored() -> None:
    session, clock = live()
    respond(session, "r1", "i1", b"\x30" * 1600)
    clock.advance(0.05)
    session.receive_realtime(rt.SpeechStarted(900, "u1"))
    assert session.receive_realtime(rt.AudioDelta("r1", "i1", b"\x30" * 800)) == []
    assert session.receive_realtime(rt.AudioDone("r1", "i1")) == []
    assert session.receive_twilio(mark("m1")) == []  # echoed by clear: flushed, not played
    assert session.receive_twilio(mark("m2")) == []
    assert session.receive_realtime(rt.ResponseDone("r1", "cancelled", "turn_detected")) == []
    assert session.stats.late_deltas_dropped == 1 and session.stats.marks_ignored == 2
    # The next response plays cleanly, from a fresh frame boundary.
    outs = respond(session, "r2", "i2", b"\x40" * 160)
    assert [o for o in outs if isinstance(o, PlayAudio)] == [PlayAudio(b"\x40" * 160)]
    assert session.receive_realtime(rt.SpeechStarted(2000, "u2")) != []


def test_interrupt_response_false_means_speech_does_not_interrupt() -> None:
    session, clock = live(interrupt=False)
    respond(session, "r1", "i1", b"\x30" * 1600)
    clock.advance(0.05)
    assert session.receive_realtime(rt.SpeechStarted(900, "u1")) == []


def test_pcm16_truncate_accounts_for_the_outbound_resampler_delay() -> None:
    session, clock = live(AudioPath.PCM16)
    respond(session, "r1", "i1", b"\x00\x10" * 24000)  # 1 s of PCM16 at 24 kHz
    for name in ("m1", "m2", "m3", "m4"):
        clock.advance(0.1)
        session.receive_twilio(mark(name))
    clock.advance(0.1)
    outs = session.receive_realtime(rt.SpeechStarted(900, "u1"))
    truncate = next(o for o in outs if isinstance(o, rt.TruncateItem))
    delay = session._outbound.delay_ms
    assert truncate.audio_end_ms == int(500 - delay)


def test_goodbye_stops_playback_speaks_and_ends_once_heard() -> None:
    session, clock = live()
    respond(session, "r1", "i1", b"\x30" * 1600)
    outs = session.say_goodbye("Bye now")
    assert outs[0] == ClearAudio()
    assert isinstance(outs[-1], rt.CreateResponse) and "Bye now" in (outs[-1].instructions or "")
    session.receive_realtime(rt.ResponseDone("r1", "cancelled", "client_cancelled"))
    respond(session, "r2", "i2", b"\x30" * 800)
    session.receive_realtime(rt.AudioDone("r2", "i2"))
    assert session.receive_realtime(rt.ResponseDone("r2", "completed", None)) == []
    clock.advance(0.1)
    (end,) = session.receive_twilio(mark("m3"))
    assert end == Ended(EndReason.SAID_GOODBYE)


def test_a_delta_before_output_item_added_keeps_the_items_counts() -> None:
    session, clock = live()
    session.receive_realtime(rt.ResponseCreated("r1"))
    session.receive_realtime(rt.AudioDelta("r1", "i1", b"\x30" * 1600))  # m1, m2
    session.receive_realtime(rt.OutputItemAdded("r1", "i1", "message"))  # must not reset i1
    clock.advance(0.2)
    session.receive_twilio(mark("m2"))
    outs = session.receive_realtime(rt.SpeechStarted(900, "u1"))
    assert rt.TruncateItem("i1", 200) in outs


def test_everything_sent_was_heard_but_the_model_still_talks_truncates_at_the_heard_end() -> None:
    session, clock = live()
    respond(session, "r1", "i1", b"\x30" * 800)  # m1 after 5 frames: all of it sent
    clock.advance(0.1)
    session.receive_twilio(mark("m1"))  # all heard; the response is still active (model is slow)
    outs = session.receive_realtime(rt.SpeechStarted(900, "u1"))
    assert outs == [rt.TruncateItem("i1", 100), rt.CancelResponse("r1")]


def test_later_items_of_the_interrupted_response_are_deleted() -> None:
    session, clock = live()
    respond(session, "r1", "i1", b"\x30" * 800)
    session.receive_realtime(rt.OutputItemAdded("r1", "i2", "message"))
    session.receive_realtime(rt.AudioDelta("r1", "i2", b"\x31" * 800))
    clock.advance(0.03)
    outs = session.receive_realtime(rt.SpeechStarted(900, "u1"))
    assert outs == [ClearAudio(), rt.TruncateItem("i1", 30), rt.DeleteItem("i2"), rt.CancelResponse("r1")]


def test_goodbye_stops_the_model_even_when_speech_may_not_interrupt_it() -> None:
    session, _ = live(interrupt=False)
    respond(session, "r1", "i1", b"\x30" * 800)
    outs = session.say_goodbye("Bye")
    assert outs[0] == ClearAudio()
    assert rt.CancelResponse("r1") in outs
    assert session.generation == 1


def test_unknown_and_stale_mark_names_are_ignored() -> None:
    session, _ = live()
    respond(session, "r1", "i1", b"\x30" * 1600)
    assert session.receive_twilio(mark("bogus")) == []
    assert session.receive_twilio(mark("m99")) == []
    session.receive_twilio(mark("m2"))  # m1 implicitly played before m2
    assert session.stats.marks_played == 2 and session.stats.marks_ignored == 2
    assert session.receive_twilio(mark("m1")) == []  # echoed again: stale


def test_a_prerendered_greeting_plays_at_stream_start_and_the_model_is_told() -> None:
    clock = ManualClock(100.0)
    session = Driven(
        CallSession(
            call_id="CA",
            profile=Profile(greeting="Hi there"),
            audio_path=AudioPath.PCM16,
            clock=clock,
            greeting_audio=b"\x11" * 1000,
        )
    )
    outs = session.receive_twilio(start_event())  # the model is not even ready yet
    plays = [o for o in outs if isinstance(o, PlayAudio)]
    assert b"".join(p.payload for p in plays).startswith(b"\x11" * 1000) and len(plays) == 7
    live_outs = session.receive_realtime(updated("pcm16"))
    assert rt.AddTextItem("assistant", "Hi there") in live_outs
    assert not any(isinstance(o, rt.CreateResponse) for o in live_outs)
    # Barge-in during it: clear, but nothing of the model's to truncate or cancel.
    clock.advance(0.05)
    assert session.receive_realtime(rt.SpeechStarted(900, "u1")) == [ClearAudio()]


def test_turn_latency_is_measured_from_the_end_of_the_callers_turn() -> None:
    session, clock = live()
    session.receive_realtime(rt.SpeechStopped(2000, "u1"))
    clock.advance(0.42)
    respond(session, "r1", "i1", b"\x30" * 800)
    assert session.stats.turn_latencies_ms == [pytest.approx(420)]


# -- time: every timeout is the session's, decided by tick(now); deadline() says when it is due


def timed(max_call_seconds: int = 60) -> tuple[Driven, ManualClock]:
    clock = ManualClock(100.0)
    profile = Profile(greeting="", max_call_seconds=max_call_seconds)
    timeouts = Timeouts(prewarm=5.0, model_ready=3.0, twilio_idle=15.0, time_limit_grace=20.0)
    session = CallSession(
        call_id="CA-t", profile=profile, audio_path=AudioPath.G711_ULAW, clock=clock, timeouts=timeouts
    )
    return Driven(session), clock


def test_a_prewarmed_call_without_a_stream_ends_at_its_deadline() -> None:
    session, clock = timed()
    assert session.deadline() == 105.0
    clock.set(104.9)
    assert session.tick(clock.now()) == []
    clock.set(105.0)
    assert session.tick(clock.now()) == [Ended(EndReason.NO_STREAM, "within 5 s")]
    assert session.deadline() is None


def test_a_stream_whose_model_never_confirms_ends_after_model_ready() -> None:
    session, clock = timed()
    clock.advance(1.0)
    session.receive_twilio(start_event())  # the stream starts at 101: the model has until 104
    assert session.deadline() == 104.0
    clock.set(104.0)
    (end,) = session.tick(clock.now())
    assert end == Ended(EndReason.MODEL_NOT_READY, "within 3 s")


def test_twilio_silence_ends_a_live_call_and_each_frame_moves_the_deadline() -> None:
    session, clock = timed()
    session.receive_twilio(start_event())
    session.receive_realtime(updated("g711_ulaw"))
    assert session.live and session.deadline() == 115.0
    clock.advance(10.0)
    session.receive_twilio(media())
    assert session.deadline() == 125.0
    clock.set(124.9)
    assert session.tick(clock.now()) == []
    clock.set(125.0)
    assert session.tick(clock.now()) == [Ended(EndReason.TWILIO_IDLE, "nothing for 15 s")]


def test_the_time_limit_asks_for_a_goodbye_then_ends_after_the_grace() -> None:
    session, clock = timed(max_call_seconds=12)
    session.receive_twilio(start_event())
    session.receive_realtime(updated("g711_ulaw"))
    clock.set(112.0)
    session.receive_twilio(media())  # Twilio is still there
    outs = session.tick(clock.now())
    assert isinstance(outs[-1], rt.CreateResponse) and "time limit" in (outs[-1].instructions or "")
    assert session.goodbye is Goodbye.ASKED
    assert session.deadline() == 127.0  # Twilio's idle deadline comes before the grace
    clock.set(126.0)
    session.receive_twilio(media())
    assert session.deadline() == 132.0  # the grace: 112 + 20
    clock.set(132.0)
    session.receive_twilio(media())
    assert session.tick(clock.now()) == [Ended(EndReason.TIME_LIMIT)]


def test_a_goodbye_moves_along_its_table_only() -> None:
    session, _ = live()
    session.say_goodbye("Bye")
    assert session.goodbye is Goodbye.ASKED
    assert session.say_goodbye("Bye again") == []  # asked once
    session.receive_realtime(rt.ResponseCreated("r9"))
    assert session.goodbye is Goodbye.SPEAKING
    session.receive_realtime(rt.ResponseDone("r8", "completed", None))  # another response: no move
    assert session.goodbye is Goodbye.SPEAKING
    session.receive_realtime(rt.ResponseDone("r9", "completed", None))
    assert session.goodbye is Goodbye.SPOKEN


def test_a_prerendered_greeting_is_in_the_transcript() -> None:
    clock = ManualClock(100.0)
    session = CallSession(
        call_id="CA",
        profile=Profile(greeting="Hi there"),
        audio_path=AudioPath.G711_ULAW,
        clock=clock,
        greeting_audio=b"\x11" * 400,
    )
    session.receive_twilio(start_event())
    assert session.stats.transcript == [("assistant", "Hi there")]


def test_a_barge_in_drops_twilio_commands_not_taken_yet() -> None:
    session, clock = live()
    session.session.receive_realtime(rt.ResponseCreated("r1"))
    session.session.receive_realtime(rt.AudioDelta("r1", "i1", b"\x30" * 800))  # queued, not taken
    clock.advance(0.01)
    outs = session.receive_realtime(rt.SpeechStarted(100, "u1"))
    assert outs[0] == ClearAudio()
    assert not any(isinstance(o, PlayAudio | PlaceMark) for o in outs)


def test_end_reasons_say_whether_the_call_completed_and_whether_the_model_failed() -> None:
    assert EndReason.CALLER_HUNG_UP.completed and EndReason.SAID_GOODBYE.completed
    assert not EndReason.TWILIO_IDLE.completed
    assert EndReason.MODEL_DROPPED.model_failed and EndReason.MODEL_UNREACHABLE.model_failed
    assert EndReason.INTERNAL_ERROR.model_failed  # our bug: the caller hears the fallback, not a hang-up
    assert not EndReason.CALLER_HUNG_UP.model_failed and not EndReason.TWILIO_IDLE.model_failed
    # Before the call is live too: the caller hears the fallback message, not a bare hang-up.
    assert EndReason.MODEL_NOT_READY.model_failed and EndReason.MODEL_REFUSED_SESSION.model_failed
    assert EndReason.MODEL_FATAL.model_failed and EndReason.MODEL_LOST.model_failed


def test_media_that_is_not_this_calls_caller_audio_is_discarded_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session, _ = make()
    session.upstream_opened()
    assert session.receive_twilio(media()) == []  # before start: not queued for the model
    session.receive_twilio(start_event())
    out = session.receive_realtime(updated(AudioPath.G711_ULAW.value))
    assert not any(isinstance(c, rt.AppendAudio) for c in out)
    other = tw.Media("MZ" + "9" * 32, "inbound", 1, 20, b"\xff" * 160, 2)
    outbound = tw.Media(SID, "outbound", 1, 20, b"\xff" * 160, 3)
    with caplog.at_level(logging.WARNING, logger="bridge.session"):
        for _ in range(3):
            assert session.receive_twilio(other) == [] and session.receive_twilio(outbound) == []
    assert session.stats.frames_discarded == {
        "before start": 1,
        "of another stream": 3,
        "on track 'outbound'": 3,
    }
    assert len([r for r in caplog.records if "discarding media" in r.getMessage()]) == 3  # once per kind
    assert session.stats.frames_in == 0


def test_sequence_gaps_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    session, _ = live()
    with caplog.at_level(logging.WARNING, logger="bridge.session"):
        for sequence in (2, 3, 4, 7, 8, 12, 13):  # two jumps: 4 → 7 and 8 → 12
            out = session.receive_twilio(
                tw.Media(SID, "inbound", sequence, 20 * sequence, b"\xff" * 160, sequence)
            )
            assert any(isinstance(c, rt.AppendAudio) for c in out)  # the frames still go to the model
    assert session.stats.sequence_gaps == 2
    assert len([r for r in caplog.records if "sequence jumped" in r.getMessage()]) == 1

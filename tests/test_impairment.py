"""A bad Twilio leg and a slow model: lost mark echoes, the send bounds each way, jitter and stalls.

The sans-I/O rules first (a :class:`~bridge.session.CallSession` on a manual clock, and
:class:`~bridge.streams.RealtimeLinks` against stand-in sockets), then whole calls over real loopback
sockets -- the Twilio caller double ⇄ the bridge ⇄ the local model -- with the double's impairments
(:attr:`~bridge.testing.TwilioCaller.burst`, :meth:`~bridge.testing.TwilioCaller.stall`,
:attr:`~bridge.testing.TwilioCaller.lose_echo`): the call goes on, and a barge-in still truncates within
40 ms of what the caller heard.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import numpy as np
import pytest

from bridge import audio
from bridge import realtime as rt
from bridge.call import Call
from bridge.config import AudioPath
from bridge.keys import REGISTRY
from bridge.local_model import LocalModel
from bridge.metrics import Metrics
from bridge.playback import AHEAD_SECONDS, HELD_CAP_SECONDS, MARK_GRACE
from bridge.prompts import Profile
from bridge.session import ClearAudio, EndReason, PlaceMark, PlayAudio
from bridge.states import Link
from bridge.streams import MODEL_STALL_SECONDS, RealtimeLinks
from tests.conftest import Bridge
from tests.test_e2e import INTERRUPT, QUESTION, answered, caller, caller_audio, is_audio, settle, types
from tests.test_rollover import appends, listen_until, outcome_of
from tests.test_rollover_session import FRAME, answer, frame, line
from tests.test_session import Ended, live, mark, media, respond

pytestmark = pytest.mark.timeout(60)

ULAW_PER_SECOND = 8000


def tone(seconds: float, hz: float = 440.0) -> bytes:
    """A steady tone as μ-law 8 kHz: speech to the local model's energy VAD, one utterance however long."""
    t = np.arange(int(seconds * ULAW_PER_SECOND)) / ULAW_PER_SECOND
    pcm = (6000 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()
    return audio.pcm16_to_ulaw(pcm)


async def the_call(bridge: Bridge) -> Call:
    """The one live call of ``bridge``, once its stream has been handed to it."""
    registry = bridge.app[REGISTRY]
    await until(lambda: len(registry.live) == 1, 5)
    (call,) = registry.live
    return call


def metric(exposition: str, series: str) -> float:
    """The value of one series in the ``/metrics`` text."""
    return float(next(row for row in exposition.splitlines() if row.startswith(series + " ")).split()[-1])


async def until(condition: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- lost marks (sans I/O)


def test_a_mark_never_echoed_is_given_up_after_the_grace_and_playback_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session, clock = live()
    respond(session, "r1", "i1", b"\x30" * 3200)  # 400 ms, sent at 100.0: m1..m4 every 100 ms
    session.receive_realtime(rt.AudioDone("r1", "i1"))
    session.receive_realtime(rt.ResponseDone("r1", "completed", None))
    clock.advance(0.1)
    session.receive_twilio(mark("m1"))
    # m2..m4 never come back. m2 should have played by 100.2: it is given up MARK_GRACE later.
    assert session.deadline() == pytest.approx(100.2 + MARK_GRACE)
    clock.advance(0.1 + MARK_GRACE + 0.05)
    with caplog.at_level(logging.WARNING, "bridge.playback"):
        assert session.tick(clock.now()) == []
        assert session.stats.marks_lost == 1 and session.hearing_model()  # m3 is not due yet
        clock.advance(0.2)
        session.tick(clock.now())
    assert session.stats.marks_lost == 3 and session.stats.marks_played == 1
    assert not session.hearing_model()  # the caller is no longer taken to hear the model
    assert len([r for r in caplog.records if "not echoed" in r.message]) == 1  # logged once per call
    # The next answer: a barge-in 50 ms into it truncates it at 50 ms (not the old one at its end).
    respond(session, "r2", "i2", b"\x31" * 1600)
    clock.advance(0.05)
    outs = session.receive_realtime(rt.SpeechStarted(900, "u1"))
    assert outs == [ClearAudio(), rt.TruncateItem("i2", 50), rt.CancelResponse("r2")]


def test_with_no_echo_at_all_audio_still_flows_in_real_time_without_a_gap() -> None:
    session, clock = live(greeting="")
    outs = respond(session, "r1", "i1", b"\x30" * ULAW_PER_SECOND * 10)  # 10 s; Twilio echoes no mark
    session.receive_realtime(rt.AudioDone("r1", "i1"))
    session.receive_realtime(rt.ResponseDone("r1", "completed", None))
    play_end, gaps, n = clock.now(), 0.0, 1
    while True:
        for o in outs:  # Twilio plays what it gets in order, in real time
            if isinstance(o, PlayAudio):
                gaps += max(0.0, clock.now() - play_end)
                play_end = max(play_end, clock.now()) + len(o.payload) / ULAW_PER_SECOND
        if not session.hearing_model():
            break
        deadline = session.deadline()
        assert deadline is not None and deadline < 100 + 10 + MARK_GRACE + 1
        clock.advance(max(0.0, deadline - clock.now()))
        outs = session.tick(clock.now())
        n += 1
        session.receive_twilio(media(n=n))  # the caller's line stays open
    assert gaps == 0.0 and play_end == pytest.approx(110.0)  # no gap: marks given up let the rest go
    assert session.stats.marks_lost == 100 and session.stats.marks_played == 0


def test_a_goodbye_whose_last_mark_never_comes_back_still_ends_the_call() -> None:
    session, clock = live(greeting="")
    session.say_goodbye("Bye now")
    respond(session, "r1", "i1", b"\x30" * 800)  # 100 ms: m1
    session.receive_realtime(rt.AudioDone("r1", "i1"))
    assert session.receive_realtime(rt.ResponseDone("r1", "completed", None)) == []
    assert not session.ended  # waiting for m1: the caller is hearing the goodbye
    deadline = session.deadline()
    assert deadline == pytest.approx(100.1 + MARK_GRACE)
    clock.advance(deadline - clock.now())
    assert session.tick(clock.now()) == [Ended(EndReason.SAID_GOODBYE)]


# -- the send bound towards Twilio (sans I/O)


def test_model_audio_goes_out_at_most_the_bound_ahead_of_proved_playback() -> None:
    session, clock = live(greeting="")
    outs: list[object] = respond(session, "r1", "i1", b"\x30" * ULAW_PER_SECOND * 10)  # 10 s at once
    sent = [o for o in outs if isinstance(o, PlayAudio)]
    assert len(sent) * 160 == AHEAD_SECONDS * ULAW_PER_SECOND  # the rest is held in the bridge
    assert (session.ahead_seconds(), session.held_seconds()) == (AHEAD_SECONDS, 10 - AHEAD_SECONDS)
    assert session.stats.send_holds == 1
    # Twilio plays in real time and echoes each mark: each echo lets as much more go as it proved played.
    pending = [o.name for o in outs if isinstance(o, PlaceMark)]
    for _ in range(50):  # 5 s
        clock.advance(0.1)
        out = session.receive_twilio(mark(pending.pop(0)))
        assert [type(o) for o in out] == [PlayAudio] * 5 + [PlaceMark]  # 100 ms more, and its mark
        pending += [o.name for o in out if isinstance(o, PlaceMark)]
        outs += out
        assert session.ahead_seconds() == AHEAD_SECONDS
    assert session.stats.send_holds == 1  # one hit: it held back all along
    # A barge-in while audio is held: exact, and what was held never reaches the caller.
    clock.advance(0.03)
    out = session.receive_realtime(rt.SpeechStarted(900, "u1"))
    assert out == [ClearAudio(), rt.TruncateItem("i1", 5030), rt.CancelResponse("r1")]
    assert (session.ahead_seconds(), session.held_seconds()) == (0.0, 0.0)
    assert session.receive_realtime(rt.AudioDone("r1", "i1")) == []
    played = b"".join(o.payload for o in outs if isinstance(o, PlayAudio))
    assert played == b"\x30" * ULAW_PER_SECOND * 8  # in order, nothing twice: 3 s ahead of the 5 s proved


def test_a_response_that_would_hold_more_than_the_cap_is_cut_where_the_hold_ends() -> None:
    session, _ = live(greeting="")
    session.receive_realtime(rt.ResponseCreated("r1"))
    session.receive_realtime(rt.OutputItemAdded("r1", "i1", "message"))
    outs: list[object] = []
    for _ in range(70):  # 70 s of audio, a second a delta, and no mark echoed meanwhile
        outs += session.receive_realtime(rt.AudioDelta("r1", "i1", b"\x30" * ULAW_PER_SECOND))
    cut_at = int(AHEAD_SECONDS + HELD_CAP_SECONDS + 1)  # the first second past the cap
    assert [o for o in outs if not isinstance(o, PlayAudio | PlaceMark)] == [
        rt.TruncateItem("i1", cut_at * 1000),
        rt.CancelResponse("r1"),
    ]  # no clear: what is held plays on
    assert session.stats.held_cuts == 1 and session.stats.late_deltas_dropped == 70 - cut_at
    assert session.held_seconds() == cut_at - AHEAD_SECONDS  # bounded
    assert session.hearing_model()


# -- the send bound towards the model (sans I/O)


class StallingSocket:
    """A Realtime connection whose socket takes ``takes`` messages, then waits (its buffers full); it takes
    one more each time :meth:`take` is called."""

    def __init__(self, takes: int) -> None:
        self.written: list[rt.ClientCommand] = []
        self.takes = takes
        self.ready = asyncio.Event()

    def write(self, command: rt.ClientCommand) -> Any:
        if len(self.written) < self.takes:
            self.written.append(command)
            return None
        return self._wait(command)

    async def _wait(self, command: rt.ClientCommand) -> None:
        await self.ready.wait()
        self.ready.clear()
        self.written.append(command)

    def take(self) -> None:
        self.takes = len(self.written) + 1
        self.ready.set()


async def test_a_realtime_socket_that_takes_nothing_more_is_given_up_with_the_audio_it_never_got() -> None:
    metrics = Metrics()
    stalled: list[tuple[int, list[bytes], str]] = []
    links = RealtimeLinks(
        lambda n: None,
        lambda n, audio, why: stalled.append((n, audio, why)),
        audio_path=AudioPath.G711_ULAW,
        metrics=metrics,
    )
    sock = StallingSocket(takes=10)
    links.open[1] = sock  # type: ignore[assignment]
    frames = [bytes([n]) * 160 for n in range(200)]
    drains: list[asyncio.Task[None]] = []
    n = 0
    while not stalled:  # a call forwards a frame at a time
        draining = links.write(1, [rt.AppendAudio(frames[n])])
        if draining is not None:
            drains.append(asyncio.create_task(draining))
        await asyncio.sleep(0)
        n += 1
    n -= 1  # the frame that tipped it
    # Frames 0-9 were taken, frame 10 is being written, and MODEL_STALL_SECONDS of audio (100 frames) came
    # behind it with nothing taken: given up at the next frame.
    per_frame = 0.02
    assert n == 10 + round(MODEL_STALL_SECONDS / per_frame) + 1
    ((number, unsent, why),) = stalled
    assert number == 1 and unsent == frames[11 : n + 1] and "stalled" in why
    assert links.backlog_seconds(1) == 0.0
    assert links.write(1, [rt.AppendAudio(frames[n + 1])]) is None  # nothing more is written to it
    assert metrics.model_bound_hits.get() == 1
    for task in drains:
        task.cancel()
    await asyncio.gather(*drains, return_exceptions=True)


async def test_a_realtime_socket_that_drains_slowly_keeps_everything_in_order() -> None:
    stalled: list[object] = []
    links = RealtimeLinks(lambda n: None, lambda *a: stalled.append(a), audio_path=AudioPath.G711_ULAW)
    sock = StallingSocket(takes=3)
    links.open[1] = sock  # type: ignore[assignment]
    frames = [n.to_bytes(2, "big") * 80 for n in range(300)]
    drains: list[asyncio.Task[None]] = []
    for n, chunk in enumerate(frames):
        draining = links.write(1, [rt.AppendAudio(chunk)])
        if draining is not None:
            drains.append(asyncio.create_task(draining))
        if n % 50 == 0:
            sock.take()  # it takes one message a second: slow, but not stalled
        await asyncio.sleep(0)
    assert stalled == [] and links.backlog_seconds(1) > MODEL_STALL_SECONDS
    async with asyncio.timeout(5):
        while len(sock.written) < len(frames):
            sock.take()
            await asyncio.sleep(0)
    await asyncio.gather(*drains)
    assert [c.audio for c in sock.written if isinstance(c, rt.AppendAudio)] == frames


def test_a_stalled_session_is_replaced_and_the_next_one_gets_the_audio_it_never_got() -> None:
    call = line()
    session = call.session
    for n in range(50):
        call.step(frame(n))
    assert 1 not in call.closed
    # Session 1's socket took frames up to 39; 40-49 waited behind them when it was found stalled.
    session.leg_stalled(1, [frame(n) for n in range(40, 50)], "stalled: a test")
    call.pump()
    for n in range(50, 60):
        call.step(frame(n))
    assert session.stats.reconnects == ["stalled"] and session.leg == 2
    resent = [c.audio for c in call.sent[2] if isinstance(c, rt.AppendAudio)]
    assert resent == [frame(n) for n in range(40, 60)]
    assert 1 in call.closed


def test_a_next_session_that_stalls_while_prepared_is_tried_again_not_left_deaf() -> None:
    call = line(cap=40.0, rollover_margin=10.0)
    session = call.session
    for n in range(int(29.9 / FRAME)):
        call.step(frame(n))
    call.event(rt.SpeechStarted(0, "u1"))  # the caller speaks: the ready session waits for a boundary
    for _ in range(50):
        call.step(frame(0))
    assert session.link is Link.READY
    session.leg_stalled(2, [], "took nothing for 2 s")  # its socket stopped taking what it is told
    call.pump()
    assert session.link is Link.UP and session.leg == 1 and not session.ended and 2 in call.closed
    call.event(rt.SpeechStopped(0, "u1"))
    answer(call, "1_1", 1)
    for _ in range(int(6.0 / FRAME)):
        call.step(frame(0))
    assert [c.number for c in call.opened] == [2, 3] and session.leg == 3  # a fresh one serves


# -- whole calls: the Twilio leg impaired


async def test_caller_audio_in_bursts_and_stalls_of_the_stream_keep_barge_in_exact(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model)
    async with caller(bridge) as call:
        call.burst = 5  # jitter: the caller's audio comes 100 ms at a time
        await call.dial()
        conn = await model.wait_for_connection()
        await call.wait_for_played(0.3)  # the greeting (1.5 s) is playing
        await call.stall(0.2)  # no echo, no caller audio, nothing taken in: the caller hears on
        await call.wait_for_played(0.6)
        await call.stall(0.2)
        speaking = asyncio.create_task(call.speak(INTERRUPT))
        await call.wait_for_clear(timeout=10)
        heard = len(call.played) / ULAW_PER_SECOND  # the greeting is all that played
        await settle(lambda: "conversation.item.truncate" in types(conn), 2)
        truncate = next(e for e in conn.received if e["type"] == "conversation.item.truncate")
        assert abs(truncate["audio_end_ms"] - heard * 1000) <= 40, (truncate, heard)
        # The call goes on: the interruption is answered and heard.
        await speaking
        await call.silence(0.8)
        await settle(lambda: any(answered(e, truncate["item_id"]) for e in conn.sent), 10)
        await call.wait_for_played(heard + 1.0, timeout=10)
        assert call.violations == []
        assert len(call.clears) == 1


async def test_a_lost_mark_echo_is_given_up_and_the_call_goes_on_with_exact_barge_in(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model)
    async with caller(bridge) as call:
        # The echo of the greeting's last mark (nothing played after it) is lost.
        call.lose_echo = lambda name: not call.lost_echoes and call.playback.idle
        await call.dial()
        conn = await model.wait_for_connection()
        session = (await the_call(bridge)).session
        await listen_until(call, lambda: bool(call.lost_echoes), 10)
        assert session.hearing_model()  # the bridge waits for that mark...
        # ...for MARK_GRACE after its audio should have played, then takes it as played.
        await listen_until(call, lambda: not session.hearing_model(), MARK_GRACE + 2)
        status, metrics = await bridge.get("/metrics")
        assert metric(metrics, "bridge_twilio_marks_lost_total") == 1
        # The call goes on: a question (nothing was playing: no clear), then its answer.
        heard_before = len(call.played)
        await call.speak(QUESTION)
        await call.silence(0.8)
        await call.wait_for_played(heard_before / ULAW_PER_SECOND + 1.0, timeout=10)
        assert call.clears == []
        # A barge-in on the answer truncates it where the caller was.
        speaking = asyncio.create_task(call.speak(INTERRUPT))
        await call.wait_for_clear(timeout=10)
        heard = (len(call.played) - heard_before) / ULAW_PER_SECOND
        await settle(lambda: "conversation.item.truncate" in types(conn), 2)
        truncate = next(e for e in conn.received if e["type"] == "conversation.item.truncate")
        answer = next(
            e["item"]["id"] for e in reversed(conn.sent) if e["type"] == "response.output_item.added"
        )
        assert truncate["item_id"] == answer
        assert abs(truncate["audio_end_ms"] - heard * 1000) <= 40, (truncate, heard)
        await speaking
        assert call.violations == []


async def test_a_goodbye_whose_last_echo_is_lost_still_ends_the_call(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model, profile=Profile(greeting=""))
    async with caller(bridge) as call:
        await call.dial()
        await model.wait_for_connection()
        the = await the_call(bridge)
        await until(lambda: the.session.live, 5)
        call.lose_echo = lambda name: call.playback.idle  # the last mark of what was sent: the goodbye's
        await the.goodbye("Goodbye!")
        # The goodbye (1.5 s at 4x) plays; its last mark is given up MARK_GRACE later, and the call ends.
        await call.wait_closed(timeout=1.5 + MARK_GRACE + 3)
        assert call.lost_echoes
        assert call.heard_seconds() >= 1.4  # the caller heard it all
    outcome = await outcome_of(bridge, call.call_sid)
    assert outcome.reason is EndReason.SAID_GOODBYE


# -- whole calls: the send bounds


async def test_a_long_answer_goes_out_no_further_ahead_than_the_bound_and_barge_in_stays_exact(
    start_bridge: Any,
) -> None:
    async with LocalModel(speed=8.0) as model:
        bridge = await start_bridge(model, profile=Profile(greeting=""))
        async with caller(bridge) as call:
            await call.dial()
            conn = await model.wait_for_connection()
            await call.speak(tone(4.0))  # the answer: a beep and these 4 s, generated 8x faster than played
            await call.silence(0.8)
            await settle(lambda: "response.done" in [e["type"] for e in conn.sent], 10)
            await call.wait_for_played(3.8, timeout=10)
            # Twilio never had more than the bound (and a mark's 100 ms) ahead of what it played.
            assert 2.0 < call.peak_buffered_seconds() <= AHEAD_SECONDS + 0.15
            # A barge-in while the rest is held: exact, and nothing held reaches the caller after the clear.
            speaking = asyncio.create_task(call.speak(INTERRUPT))
            clear_at = await call.wait_for_clear(timeout=10)
            heard = len(call.played) / ULAW_PER_SECOND
            await settle(lambda: "conversation.item.truncate" in types(conn), 2)
            truncate = next(e for e in conn.received if e["type"] == "conversation.item.truncate")
            assert abs(truncate["audio_end_ms"] - heard * 1000) <= 40, (truncate, heard)
            interrupted = truncate["item_id"]
            expected = caller_audio(e for e in conn.sent if is_audio(e) and e["item_id"] == interrupted)
            assert bytes(call.played) == expected[: len(call.played)]  # held audio came out in order
            await speaking
            await call.silence(0.8)
            await settle(lambda: any(answered(e, interrupted) for e in conn.sent), 10)
            after = caller_audio(e for e in conn.sent if is_audio(e) and e["item_id"] != interrupted)
            await settle(lambda: sum(len(p) for t, p in call.received_media if t > clear_at) >= len(after))
            assert b"".join(p for t, p in call.received_media if t > clear_at) == after
            assert call.violations == []
        status, metrics = await bridge.get("/metrics")
        assert metric(metrics, "bridge_twilio_send_bound_hits_total") >= 1  # the long answer was held back
        assert metric(metrics, "bridge_twilio_ahead_seconds_count") > 0
        assert metric(metrics, 'bridge_twilio_ahead_seconds_bucket{le="3.0"}') == metric(
            metrics, "bridge_twilio_ahead_seconds_count"
        )


def small_buffers(sock: Any, option: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, option, 4096)


async def test_a_stalled_model_socket_is_replaced_and_the_call_goes_on(start_bridge: Any) -> None:
    async with LocalModel(speed=4.0) as model:
        bridge = await start_bridge(model, profile=Profile(greeting=""))
        async with caller(bridge) as call:
            await call.dial()
            first = await model.wait_for_connection()
            the = await the_call(bridge)
            await listen_until(call, lambda: the.session.live and appends(first) > 10, 5)
            # The model stops reading (its socket's buffers made small, so that they fill in a moment).
            ours = the.links.open[1].ws.transport
            theirs = first._ws.transport
            assert ours is not None and theirs is not None
            small_buffers(ours.get_extra_info("socket"), socket.SO_SNDBUF)
            small_buffers(theirs.get_extra_info("socket"), socket.SO_RCVBUF)
            theirs.pause_reading()

            # The caller's audio piles up behind it: the session is replaced, and the call goes on.
            def replaced() -> bool:
                return len(model.connections) > 1 and appends(model.connections[1]) > 0

            await listen_until(call, replaced, 30)
            second = model.connections[1]
            heard = call.heard_seconds()
            await call.speak(QUESTION)
            await listen_until(call, lambda: call.heard_seconds() > heard + 1.0, 15)
            assert "response.done" in [e["type"] for e in second.sent]
            await call.hang_up()
        status, metrics = await bridge.get("/metrics")
        assert metric(metrics, 'bridge_reconnects_total{cause="stalled"}') == 1
        assert metric(metrics, "bridge_model_send_bound_hits_total") == 1
        assert metric(metrics, "bridge_model_backlog_seconds_count") >= 1

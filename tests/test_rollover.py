"""Rollover and reconnection end to end, over real loopback sockets: the caller double ⇄ the bridge ⇄ the
local model, in both Realtime dialects. The sans-I/O rules (turn boundaries, the 65-minute call, the
watchdog, "one moment") are in tests/test_rollover_session.py."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

import bridge.upstream
from bridge.conversation import CONTINUE_NOTE, RESUME_NOTE
from bridge.keys import GREETINGS, REGISTRY, STORE, UPSTREAM
from bridge.local_model import LocalModel
from bridge.registry import Outcome
from bridge.session import PRE_SPEECH_FRAMES
from bridge.testing import TwilioCaller
from bridge.upstream import BREAKER_THRESHOLD, Breaker
from tests.conftest import AUTH_TOKEN, Bridge, fixture_audio

pytestmark = pytest.mark.timeout(60)

QUESTION = fixture_audio("question.ulaw")
INTERRUPT = fixture_audio("interrupt.ulaw")


def caller(bridge: Bridge) -> TwilioCaller:
    return TwilioCaller(bridge.url, auth_token=AUTH_TOKEN)


def types(conn: Any) -> list[str]:
    return [str(e.get("type")) for e in conn.received]


def appends(conn: Any) -> int:
    return types(conn).count("input_audio_buffer.append")


def texts(conn: Any) -> list[tuple[str, str, str]]:
    """(id, role, text) of every text item the bridge created in a session."""
    out = []
    for e in conn.received:
        if e.get("type") == "conversation.item.create":
            item = e["item"]
            out.append((str(item.get("id", "")), item["role"], item["content"][0]["text"]))
    return out


async def until(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def outcome_of(bridge: Bridge, call_sid: str) -> Outcome:
    """How the call ended, once the registry has it (its teardown runs after the stream closed)."""
    outcomes = bridge.app[REGISTRY].outcomes
    await until(lambda: call_sid in outcomes, 5)
    return outcomes[call_sid]


async def listen_until(call: TwilioCaller, condition: Any, timeout: float = 10.0) -> None:
    """Keep the caller's line open (Twilio streams silence whenever the caller says nothing) until
    ``condition`` holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await call.silence(0.1)


@pytest.mark.parametrize("dialect", ["ga", "preview"])
async def test_planned_rollover_at_a_turn_boundary_carries_the_call(dialect: str, start_bridge: Any) -> None:
    async with LocalModel(speed=4.0, session_seconds=12) as model:
        bridge = await start_bridge(model, dialect=dialect)
        async with caller(bridge) as call:
            await call.dial()
            first = await model.wait_for_connection()
            await call.wait_for_played(1.0)  # the greeting
            await call.speak(QUESTION)
            # Due at half the 12 s lifetime: the next session is configured, then swapped to in a pause.
            await listen_until(call, lambda: len(model.connections) > 1 and appends(model.connections[1]) > 0)
            second = model.connections[1]
            assert "response.done" in [e["type"] for e in first.sent]  # the question was answered first
            sent_before = call.frames_sent
            await asyncio.wait_for(first.closed.wait(), 5)
            # After the swap the caller asks again and is answered by the new session.
            heard = call.heard_seconds()
            await call.speak(QUESTION)
            await listen_until(call, lambda: "response.done" in [e["type"] for e in second.sent], 15)
            await listen_until(call, lambda: call.heard_seconds() > heard + 1.0, 15)
            total = call.frames_sent
            await call.hang_up()
        await until(lambda: not bridge.app[REGISTRY].live, 5)
    # Every caller frame reached exactly one session, in order: none lost, none sent twice.
    assert sum(appends(conn) for conn in model.connections) == total
    assert appends(first) <= sent_before
    # The new session got the profile's instructions, the conversation and the note, no greeting.
    kinds = types(second)
    assert kinds[0] == "session.update"
    assert second.received[0]["session"]["instructions"] == first.received[0]["session"]["instructions"]
    carried = texts(second)
    assert [role for _, role, _ in carried[:2]] == ["assistant", "user"]  # the greeting, the question
    assert carried[1][2].startswith("(caller speech")  # the caller's words, from input transcription
    assert any(text == CONTINUE_NOTE for _, _, text in carried)
    creates = [e for e in second.received if e["type"] == "response.create"]
    assert creates == []  # answers come from the new session's VAD; the greeting is not asked for again
    status, metrics = await bridge.get("/metrics")
    assert "bridge_rollovers_total 1.0" in metrics
    # The call record (and so the admin call page) lists the sessions, how each began and ended.
    record = await bridge.app[STORE].call(call.call_sid)
    first_session, second_session = record.sessions[:2]
    assert (first_session.began, first_session.ended) == ("first", "rolled over to session 2")
    assert second_session.began == "rollover" and second_session.session_id == second.sent[0]["session"]["id"]
    assert first_session.ended_at is not None and first_session.ended_at <= second_session.ended_at


@pytest.mark.parametrize("dialect", ["ga", "preview"])
async def test_a_drop_mid_answer_reconnects_and_a_barge_in_after_it_works(
    dialect: str, start_bridge: Any
) -> None:
    async with LocalModel(speed=1.0) as model:
        bridge = await start_bridge(model, dialect=dialect)
        async with caller(bridge) as call:
            await call.dial()
            first = await model.wait_for_connection()
            await call.wait_for_played(0.4)  # the greeting (1.5 s at speed 1) is being spoken
            first.abort()  # a TCP reset in the middle of the answer
            second = await model.wait_for_connection(2, timeout=5)
            await until(lambda: "response.create" in types(second), 5)
            carried = texts(second)
            # The greeting was carried as far as the marks prove it was heard, and is to be finished.
            assert any(text == RESUME_NOTE for _, _, text in carried)
            await until(lambda: any(e["type"].endswith("audio.delta") for e in second.sent), 5)
            # What the lost session generated has played out; the caller now hears the new session.
            await call.wait_for_played(1.3)
            # A barge-in on the new session's answer: cleared, truncated in the session that has the item.
            await call.speak(INTERRUPT)
            await call.wait_for_clear(timeout=5)
            await until(lambda: "conversation.item.truncate" in types(second), 5)
            await call.silence(1.0)
            await call.hang_up()
        await until(lambda: not bridge.app[REGISTRY].live, 5)
    truncate = next(e for e in second.received if e["type"] == "conversation.item.truncate")
    assert truncate["item_id"] in {
        e["item"]["id"] for e in second.sent if e["type"] == "response.output_item.added"
    }
    errors = [e["error"]["code"] for e in second.sent if e["type"] == "error"]
    # No item_not_found, no overrun: the truncate state is consistent. (A cancel racing the server's own,
    # response_cancel_not_active, is expected with server VAD: docs/protocols.md §5.2.)
    assert [code for code in errors if code != "response_cancel_not_active"] == []
    status, metrics = await bridge.get("/metrics")
    assert 'bridge_reconnects_total{cause="dropped"} 1.0' in metrics


def appended_audio(conn: Any) -> list[bytes]:
    return [base64.b64decode(e["audio"]) for e in conn.received if e["type"] == "input_audio_buffer.append"]


async def test_a_drop_mid_caller_speech_gives_the_new_session_the_whole_utterance(start_bridge: Any) -> None:
    async with LocalModel(speed=4.0) as model:
        bridge = await start_bridge(model, audio_path="g711_ulaw")  # μ-law passes through: bytes compare
        async with caller(bridge) as call:
            await call.dial()
            first = await model.wait_for_connection()
            await listen_until(call, lambda: call.heard_seconds() >= 1.0)  # line silence, then speech
            speaking = asyncio.create_task(call.speak(QUESTION))
            await until(lambda: "input_audio_buffer.speech_started" in [e["type"] for e in first.sent], 5)
            at_speech = appends(first)
            await until(lambda: appends(first) >= at_speech + 10, 5)  # the bridge knows the caller speaks
            first.abort()
            second = await model.wait_for_connection(2, timeout=5)
            await speaking
            # The new session heard the utterance from its start and answers it.
            await listen_until(call, lambda: "response.done" in [e["type"] for e in second.sent], 10)
            total = call.frames_sent
            await call.hang_up()
    before, after = appended_audio(first), appended_audio(second)
    resent = len(before) + len(after) - total
    # Given again: what the lost session had of the utterance, from 0.5 s before its speech_started...
    assert PRE_SPEECH_FRAMES <= resent <= len(before) - at_speech + PRE_SPEECH_FRAMES + 5
    assert after[:resent] == before[-resent:]
    # ...then every later frame once: nothing lost, nothing else twice.
    assert len(before) + len(after) - resent == total
    assert "input_audio_buffer.committed" in [e["type"] for e in second.sent]


async def test_a_fatal_refusal_on_reconnect_ends_with_the_fallback_at_once(start_bridge: Any) -> None:
    async with LocalModel(speed=4.0) as model:
        bridge = await start_bridge(model)
        async with caller(bridge) as call:
            await call.dial()
            first = await model.wait_for_connection()
            await call.wait_for_played(0.3)
            model.reject_next(401, count=10)
            await model.drop_all(1011, "server error")
            await call.wait_closed(timeout=5)
        outcome = await outcome_of(bridge, call.call_sid)
        assert outcome.model_failed  # Twilio's <Connect action> speaks the profile's fallback message
        assert len(model._rejects) == 9  # one handshake refused with 401, then no retry storm
        assert first.closed.is_set()


async def test_a_refused_session_update_before_the_call_is_live_gives_the_fallback(start_bridge: Any) -> None:
    async with LocalModel(speed=4.0) as model:
        model.fail_next_session_update("invalid_value", "Invalid value for 'voice'.")
        bridge = await start_bridge(model)
        async with caller(bridge) as call:
            await call.dial()
            await call.wait_closed(timeout=5)
        outcome = await outcome_of(bridge, call.call_sid)
        assert outcome.model_failed


async def test_a_fatal_error_mid_call_does_not_leave_a_silent_line(start_bridge: Any) -> None:
    async with LocalModel(speed=4.0) as model:
        bridge = await start_bridge(model)
        async with caller(bridge) as call:
            await call.dial()
            conn = await model.wait_for_connection()
            await call.wait_for_played(0.3)
            error = {"type": "insufficient_quota", "code": "insufficient_quota", "message": "Quota exceeded."}
            await conn.send({"type": "error", "error": error})
            await call.wait_closed(timeout=5)
        outcome = await outcome_of(bridge, call.call_sid)
        assert outcome.model_failed
        assert len(model.connections) == 1  # fatal: no reconnection tried


async def test_session_expired_mid_call_is_a_reconnection_not_the_end(start_bridge: Any) -> None:
    async with LocalModel(speed=4.0) as model:
        bridge = await start_bridge(model)
        async with caller(bridge) as call:
            await call.dial()
            first = await model.wait_for_connection()
            await call.wait_for_played(1.0)
            await first.expire()
            await listen_until(call, lambda: len(model.connections) > 1 and appends(model.connections[1]) > 0)
            assert not call.closed.is_set()
            await call.hang_up()
    status, metrics = await bridge.get("/metrics")
    assert 'bridge_reconnects_total{cause="session_expired"} 1.0' in metrics


async def test_the_breaker_opens_under_refusals_and_a_probe_closes_it(
    start_bridge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge.upstream, "CONNECT_BUDGET", 0.2)
    async with LocalModel(speed=4.0) as model:
        served = await start_bridge(model)
        upstream = served.app[UPSTREAM]
        model.reject_next(503, count=1000)
        for _ in range(
            BREAKER_THRESHOLD
        ):  # each call's connect fails, with its retries: in a row, they open it
            async with caller(served) as call:
                await call.dial()
                await call.wait_closed(timeout=10)
            assert (await outcome_of(served, call.call_sid)).model_failed
        assert upstream.breaker.state == Breaker.OPEN
        left = len(model._rejects)
        async with caller(served) as call:  # answered with the fallback at once: no stream, no handshake
            status, twiml = await call.post_voice()
            assert status == 200 and "<Say>" in twiml and "<Connect>" not in twiml
        assert len(model._rejects) == left
        status, metrics = await served.get("/metrics")
        assert "bridge_upstream_breaker_state 1.0" in metrics
        # The service is back: after the cooldown the next connect is the probe, and it closes the breaker.
        model._rejects.clear()
        upstream.breaker.cooldown = 0.0
        async with caller(served) as call:
            await call.dial()
            await call.wait_for_played(0.3)
            await call.hang_up()
        assert upstream.breaker.state == Breaker.CLOSED
        status, metrics = await served.get("/metrics")
        assert "bridge_upstream_breaker_state 0.0" in metrics


async def test_one_moment_please_fills_a_long_reconnection_in_the_profiles_voice(start_bridge: Any) -> None:
    async with LocalModel(speed=4.0) as model:
        served = await start_bridge(model, render_greetings=True)
        greetings = served.app[GREETINGS]
        async with caller(served) as first:  # the first call with this voice has its hold prompt rendered
            await first.dial()
            await first.wait_for_played(0.3)
            await first.hang_up()
        await until(lambda: bool(greetings._holds), 10)
        async with caller(served) as call:
            await call.dial()
            await listen_until(call, lambda: call.heard_seconds() >= 1.4 and call.buffered_seconds() == 0)
            conn = next(c for c in reversed(model.connections) if appends(c) > 0)  # this call's session
            heard = call.heard_seconds()
            model.connect_delay = 2.5  # the new session takes 2.5 s to open
            conn.abort()
            await listen_until(call, lambda: call.heard_seconds() > heard + 0.5, 10)  # "one moment"
            await listen_until(call, lambda: appends(model.connections[-1]) > 0, 10)
            await call.hang_up()
        status, metrics = await served.get("/metrics")
        assert "bridge_hold_prompts_total 1.0" in metrics

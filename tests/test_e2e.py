"""End to end over real loopback sockets: the Twilio caller double ⇄ the bridge ⇄ the local model.

The caller double signs its requests, fetches TwiML, streams speech at real pace and plays the bridge's
audio at real pace with Twilio's mark and clear semantics, so what it "heard" is what a caller would hear.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterable
from typing import Any

import aiohttp
import numpy as np
import pytest

from bridge import audio
from bridge.app import drain
from bridge.config import AudioPath
from bridge.keys import REGISTRY
from bridge.local_model import LocalModel
from bridge.prompts import Profile
from bridge.testing import TwilioCaller, TwilioCallerError
from tests.conftest import AUTH_TOKEN, Bridge, fixture_audio

pytestmark = pytest.mark.timeout(60)

QUESTION = fixture_audio("question.ulaw")
INTERRUPT = fixture_audio("interrupt.ulaw")


def types(conn: Any) -> list[str]:
    return [e["type"] for e in conn.received]


def is_audio(event: dict[str, Any]) -> bool:
    """An audio delta the model sent, in either dialect."""
    return str(event["type"]).endswith("audio.delta")


def answered(event: dict[str, Any], other_than: str) -> bool:
    """A ``response.done`` of a response whose item is not ``other_than``: a later answer, all sent."""
    if event["type"] != "response.done":
        return False
    return any(item["id"] != other_than for item in event["response"]["output"])


def caller_audio(deltas: Iterable[dict[str, Any]]) -> bytes:
    """What the bridge sends the caller for these deltas of one response (pcm16 path): transcoded from a
    clean start, as after a barge-in, cut into frames, the end flushed and padded to a frame."""
    transcoder, framer = audio.OutboundTranscoder(AudioPath.PCM16), audio.Framer()
    frames = [f for e in deltas for f in framer.push(transcoder.convert(base64.b64decode(e["delta"])))]
    frames += framer.push(transcoder.flush())
    tail = framer.flush()
    return b"".join(frames) + (tail or b"")


def caller(bridge: Bridge, **kw: Any) -> TwilioCaller:
    return TwilioCaller(bridge.url, auth_token=AUTH_TOKEN, **kw)


def level(ulaw: bytes) -> float:
    pcm = np.frombuffer(audio.ulaw_to_pcm16(ulaw), dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(pcm**2))) if len(pcm) else 0.0


async def settle(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("dialect", ["ga", "preview"])
@pytest.mark.parametrize("audio_path", ["pcm16", "g711_ulaw"])
async def test_greeting_heard_then_a_question_answered(
    model: LocalModel, start_bridge: Any, dialect: str, audio_path: str
) -> None:
    bridge = await start_bridge(model, dialect=dialect, audio_path=audio_path)
    async with caller(bridge) as call:
        await call.dial()
        conn = await model.wait_for_connection()
        assert conn.dialect == dialect
        assert conn.headers["api-key"] == "test-api-key"
        # Greeting: configured first, then spoken without waiting for the caller.
        await call.wait_for_played(1.2)
        sent = types(conn)
        assert sent[0] == "session.update"
        assert "response.create" in sent
        assert level(bytes(call.played)) > 500
        await settle(lambda: call.buffered_seconds() == 0, 5)
        heard_before = call.heard_seconds()
        # A question: the local model's echo test answers with a tone and the caller's own words.
        await call.speak(QUESTION)
        await call.silence(0.8)
        await call.wait_for_played(heard_before + len(QUESTION) / 8000 * 0.9, timeout=15)
        assert call.violations == []
        assert call.clears == []
        appended = [e for e in conn.received if e["type"] == "input_audio_buffer.append"]
        assert len(appended) >= len(QUESTION) // 160  # every caller frame reached the model


async def test_the_answer_is_the_callers_own_audio_faithfully_transcoded(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model, profile=Profile(greeting=""))
    async with caller(bridge) as call:
        await call.dial()
        await call.speak(QUESTION)
        await call.silence(0.8)
        await call.wait_for_played(len(QUESTION) / 8000 + 0.3, timeout=15)
        await settle(lambda: call.buffered_seconds() == 0, 10)
        heard = np.frombuffer(audio.ulaw_to_pcm16(bytes(call.played)), dtype="<i2").astype(np.float64)
        said = np.frombuffer(audio.ulaw_to_pcm16(QUESTION), dtype="<i2").astype(np.float64)
        # Find the caller's words inside what came back (after the echo test's tone) and compare.
        corr = np.correlate(heard, said, mode="valid")
        lag = int(np.argmax(corr))
        segment = heard[lag : lag + len(said)]
        similarity = float(np.dot(segment, said) / (np.linalg.norm(segment) * np.linalg.norm(said)))
        assert similarity > 0.9, similarity


async def test_barge_in_truncates_at_what_the_caller_heard_and_stops_the_old_audio(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model)
    async with caller(bridge) as call:
        await call.dial()
        conn = await model.wait_for_connection()
        await call.wait_for_played(0.6)  # the greeting is playing (generated 4x faster than real time)
        speaking = asyncio.create_task(call.speak(INTERRUPT))
        clear_at = await call.wait_for_clear(timeout=10)
        heard_at_clear = len(call.played) / 8000  # the greeting is all that played; a clear empties the queue
        await settle(lambda: "conversation.item.truncate" in types(conn), 2)
        truncate = next(e for e in conn.received if e["type"] == "conversation.item.truncate")
        # What the caller heard of the greeting, per the double's own playback, against the bridge's claim.
        assert abs(truncate["audio_end_ms"] - heard_at_clear * 1000) <= 40, (truncate, heard_at_clear)
        # No audio of the interrupted answer reaches the caller after the clear: once the answer to the
        # interruption has been sent in full, what arrived after the clear is exactly that answer.
        await speaking
        await call.silence(0.8)  # the end of the caller's turn: the model answers the interruption
        interrupted = truncate["item_id"]
        await settle(lambda: any(answered(e, interrupted) for e in conn.sent), 10)
        expected = caller_audio(e for e in conn.sent if is_audio(e) and e["item_id"] != interrupted)
        assert expected  # the interruption was answered: there is something that could be told apart
        await settle(lambda: sum(len(p) for t, p in call.received_media if t > clear_at) >= len(expected))
        assert b"".join(p for t, p in call.received_media if t > clear_at) == expected
        assert call.violations == []
        errors = [e for e in conn.sent if e["type"] == "error"]
        assert errors == []  # the truncate was accepted: never past what was generated


async def test_bad_frames_are_skipped_and_the_call_goes_on(model: LocalModel, start_bridge: Any) -> None:
    bridge = await start_bridge(model, profile=Profile(greeting=""))
    async with caller(bridge) as call:
        await call.dial()
        conn = await model.wait_for_connection()
        await call.send_raw("{not json")
        bad_base64 = {"event": "media", "streamSid": call.stream_sid, "media": {"payload": "***"}}
        await call.send_raw(json.dumps(bad_base64))
        await call.send_raw(b"\x00\x01binary")
        await call.send_raw('{"event":"surprise","streamSid":"x"}')
        # Oversized for a media message yet under the socket's 64 KiB cap (above it the socket closes: 1009).
        await call.send_raw('{"event":"media","media":{"payload":"' + "A" * 30_000 + '"}}')
        await call.speak(QUESTION)
        await call.silence(0.8)
        await call.wait_for_played(1.0, timeout=15)
        assert not call.closed.is_set()
        assert "input_audio_buffer.append" in types(conn)
        status, text = await bridge.get("/metrics")
        assert 'bridge_malformed_messages_total{source="twilio"} 4.0' in text


async def test_unsigned_stream_and_bad_token_are_refused_with_1008(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model)
    async with caller(bridge) as call:
        await call.connect_stream(signature=None)
        await call.wait_closed()
        assert call.close_code == 1008
    async with caller(bridge) as call:
        await call.connect_stream(parameters={"token": "1.abc.def"})
        await call.wait_closed()
        assert call.close_code == 1008
    status, text = await bridge.get("/metrics")
    assert 'bridge_refused_total{reason="bad_signature"} 1.0' in text


async def test_unsigned_webhook_is_refused(model: LocalModel, start_bridge: Any) -> None:
    bridge = await start_bridge(model)
    call = TwilioCaller(bridge.url, auth_token="the-wrong-token")
    with pytest.raises(TwilioCallerError, match="403"):
        await call.dial()
    await call.close()
    assert model.connections == []


async def test_hang_up_mid_response_closes_the_model_leg_at_once(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model)
    async with caller(bridge) as call:
        await call.dial()
        conn = await model.wait_for_connection()
        await call.wait_for_played(0.3)
        await call.hang_up()
        began = asyncio.get_running_loop().time()
        await asyncio.wait_for(conn.closed.wait(), 1.0)
        assert asyncio.get_running_loop().time() - began < 0.1
    await settle(lambda: not bridge.app[REGISTRY].live, 1)


async def test_prewarm_opens_the_model_during_the_webhook_and_closes_it_unused(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model, BRIDGE_PREWARM_TIMEOUT="0.5")
    async with caller(bridge) as call:
        status, _ = await call.post_voice()
        assert status == 200
        conn = await model.wait_for_connection(timeout=2)
        await settle(lambda: types(conn)[:1] == ["session.update"], 2)  # configured before the stream exists
        await asyncio.wait_for(conn.closed.wait(), 2.0)


async def test_model_unreachable_ends_the_call(start_bridge: Any) -> None:
    async with LocalModel() as model:
        model.reject_next(status=401, count=5)
        bridge = await start_bridge(model)
        async with caller(bridge) as call:
            await call.dial()
            await call.wait_closed(timeout=5)
        status, text = await bridge.get("/metrics")
        assert 'bridge_upstream_errors_total{code="connect"} 1.0' in text


async def test_a_429_on_connect_is_retried(start_bridge: Any) -> None:
    async with LocalModel(speed=4.0) as model:
        model.reject_next(status=429, count=1)
        bridge = await start_bridge(model)
        async with caller(bridge) as call:
            await call.dial()
            await call.wait_for_played(0.5, timeout=10)


async def test_shutdown_drains_refuses_new_calls_and_says_goodbye(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model)
    async with caller(bridge) as call:
        await call.dial()
        await call.wait_for_played(0.2)
        draining = asyncio.create_task(drain(bridge.app, deadline=0.3))
        await settle(lambda: bridge.app[REGISTRY].draining, 1)
        status, _ = await bridge.get("/readyz")
        assert status == 503
        refused = caller(bridge)
        status, twiml = await refused.post_voice()
        assert status == 200
        assert "<Say>" in twiml and "<Connect>" not in twiml
        await refused.close()
        await asyncio.wait_for(draining, 20)
        await call.wait_closed(timeout=5)
        conn = model.connections[0]
        creates = [e for e in conn.received if e["type"] == "response.create"]
        assert "goodbye" in creates[-1]["response"]["instructions"].lower()


async def test_metrics_want_the_bearer_token_when_one_is_set(start_bridge: Any) -> None:
    token = "metrics-" + "x" * 20
    async with LocalModel() as model:
        served = await start_bridge(model, BRIDGE_METRICS_TOKEN=token)
        async with aiohttp.ClientSession() as http:
            async with http.get(served.url + "/metrics") as resp:
                assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
            async with http.get(served.url + "/metrics", headers={"Authorization": "Bearer wrong"}) as resp:
                assert resp.status == 401
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(served.url + "/metrics", headers=headers) as resp:
                assert resp.status == 200
                assert 'bridge_refused_total{reason="metrics_token"} 2.0' in await resp.text()


async def test_above_max_calls_the_webhook_answers_the_fallback_and_readyz_says_full(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model, BRIDGE_MAX_CALLS="1")
    status, _ = await bridge.get("/readyz")
    assert status == 200
    async with caller(bridge) as first:
        await first.dial()
        await first.wait_for_played(0.2)
        opened = len(model.connections)
        status, text = await bridge.get("/readyz")
        assert (status, text) == (503, "full\n")  # a load balancer sends the next call elsewhere
        async with caller(bridge) as second:
            status, twiml = await second.post_voice()
        assert status == 200 and "<Say>" in twiml and "<Connect>" not in twiml and "<Hangup" in twiml
        assert len(model.connections) == opened  # no Realtime session opened for it
        await first.hang_up()
    await settle(lambda: not bridge.app[REGISTRY].live, 2)
    status, _ = await bridge.get("/readyz")
    assert status == 200
    status, metrics = await bridge.get("/metrics")
    assert 'bridge_refused_total{reason="full"} 1.0' in metrics


async def test_a_stream_that_sends_too_much_before_start_is_refused_not_held(
    model: LocalModel, start_bridge: Any
) -> None:
    from bridge.testing import messages

    bridge = await start_bridge(model)
    async with caller(bridge) as call:
        status, twiml = await call.post_voice()
        call.accept_twiml(twiml)
        assert call.stream_url is not None
        url = messages.socket_url(call.stream_url, bridge.url)
        headers = messages.stream_headers(messages.sign(AUTH_TOKEN, call.stream_url, {}))
        async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
            await ws.send_str(json.dumps(messages.connected()))
            frame = json.dumps(
                messages.media(stream_sid="MZ" + "1" * 32, chunk=1, timestamp=0, payload=b"\xff" * 160)
            )
            for _ in range(30):  # media with no start: Twilio never does this
                if ws.closed:
                    break
                await ws.send_str(frame)
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == 1008
        # A single message over the size cap closes the socket before it is held.
        async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
            await ws.send_str("x" * (1024 * 1024))
            await ws.receive(timeout=5)
            assert ws.close_code == 1009
    status, metrics = await bridge.get("/metrics")
    assert 'bridge_refused_total{reason="no_start"} 1.0' in metrics

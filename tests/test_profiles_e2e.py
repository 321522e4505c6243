"""Profiles on real calls: routing by number, versions per call, pre-rendered greetings, fallback, records."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from twilio.request_validator import RequestValidator

from bridge.keys import REGISTRY, STORE
from bridge.local_model import LocalModel
from bridge.prompts import Profile
from bridge.testing import TwilioCaller
from tests.conftest import AUTH_TOKEN, Bridge, fixture_audio

pytestmark = pytest.mark.timeout(60)
SALES = "+15550001111"


def caller(bridge: Bridge, **kw: Any) -> TwilioCaller:
    return TwilioCaller(bridge.url, auth_token=AUTH_TOKEN, **kw)


def session_of(conn: Any) -> dict[str, Any]:
    update = next(e for e in conn.received if e["type"] == "session.update")
    return dict(update["session"])


async def settle(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_each_number_gets_its_profile_and_a_new_version_applies_to_the_next_call(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model)
    store = bridge.app[STORE]
    sales = await store.create(
        Profile(name="sales", voice="verse", greeting="", numbers=(SALES,)), author="test", comment="new"
    )
    async with caller(bridge, to=SALES) as first:
        await first.dial()
        conn1 = await model.wait_for_connection()
        await settle(lambda: any(e["type"] == "session.update" for e in conn1.received))
        assert session_of(conn1)["audio"]["output"]["voice"] == "verse"
        # Staff change the voice while the call is in progress: this call keeps its version.
        v2 = await store.save(
            sales.profile_id, replace(sales.profile, voice="coral"), expected_version=1, author="staff"
        )
        await first.speak(fixture_audio("hello.ulaw"))
        await first.hang_up()
    async with caller(bridge, to=SALES) as second:
        await second.dial()
        conn2 = await model.wait_for_connection(2)
        await settle(lambda: any(e["type"] == "session.update" for e in conn2.received))
        assert session_of(conn2)["audio"]["output"]["voice"] == "coral"
        await second.hang_up()
    async with caller(bridge, to="+15559999999") as other:
        await other.dial()
        conn3 = await model.wait_for_connection(3)
        await settle(lambda: any(e["type"] == "session.update" for e in conn3.received))
        assert session_of(conn3)["audio"]["output"]["voice"] == "alloy"  # the default profile
        await other.hang_up()
    await settle(lambda: not bridge.app[REGISTRY].live)
    records = await store.calls()
    by_sid = {r.call_sid: r for r in records}
    assert (
        by_sid[first.call_sid].profile_version == 1 and by_sid[first.call_sid].profile_id == sales.profile_id
    )
    assert by_sid[second.call_sid].profile_version == v2.version == 2
    assert by_sid[first.call_sid].end_reason == "the caller hung up"


async def test_the_call_record_holds_the_transcript_and_barge_ins(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model)
    async with caller(bridge) as call:
        await call.dial()
        await call.wait_for_played(0.6)
        await call.speak(fixture_audio("interrupt.ulaw"))
        await call.silence(0.8)
        await call.wait_for_played(3.0, timeout=15)
        await call.hang_up()
    await settle(lambda: not bridge.app[REGISTRY].live)
    record = await bridge.app[STORE].call(call.call_sid)
    assert record.barge_ins == 1 and len(record.truncations) == 1
    assert ("assistant", "Hello! This is the local test model.") in record.transcript
    assert record.latency_ms["turns"] >= 1 and record.duration_s > 1


async def test_a_prerendered_greeting_plays_at_once_and_the_model_is_told(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model)
    store = bridge.app[STORE]
    default = await store.default_profile()
    assert default is not None
    audio = bytes(range(0, 250, 10)) * 64  # 1600 bytes: a recognisable 200 ms "greeting"
    await store.set_greeting_audio(default.profile_id, default.version, audio)
    async with caller(bridge) as call:
        await call.dial()
        conn = await model.wait_for_connection()
        await call.wait_for_played(0.2)
        assert bytes(call.played[:1600]) == audio
        await settle(lambda: any(e["type"] == "conversation.item.create" for e in conn.received))
        item = next(e for e in conn.received if e["type"] == "conversation.item.create")["item"]
        assert item["role"] == "assistant" and default.profile.greeting in item["content"][0]["text"]
        assert "response.create" not in [e["type"] for e in conn.received]
        await call.hang_up()


async def post_signed(bridge: Bridge, path: str, form: dict[str, str]) -> tuple[int, str]:
    signature = RequestValidator(AUTH_TOKEN).compute_signature(bridge.url + path, form)
    async with (
        aiohttp.ClientSession() as http,
        http.post(bridge.url + path, data=form, headers={"X-Twilio-Signature": signature}) as resp,
    ):
        return resp.status, await resp.text()


async def test_twilio_speaks_the_fallback_when_the_model_cannot_be_reached(start_bridge: Any) -> None:
    async with LocalModel() as model:
        model.reject_next(status=401, count=10)
        bridge = await start_bridge(model)
        async with caller(bridge) as call:
            await call.dial()
            assert call.twiml is not None and "/twilio/after-stream" in call.twiml
            await call.wait_closed(timeout=5)
        await settle(lambda: not bridge.app[REGISTRY].live)
        status, twiml = await post_signed(bridge, "/twilio/after-stream", {"CallSid": call.call_sid})
        assert status == 200
        assert "<Say>Sorry, our assistant is not available right now" in twiml and "<Hangup" in twiml
        status, twiml = await post_signed(bridge, "/twilio/after-stream", {"CallSid": "CA-unknown"})
        assert "<Say>" not in twiml
        status, _ = await post_signed(bridge, "/twilio/after-stream?tampered=1", {"CallSid": "x"})
        assert status == 200
        async with aiohttp.ClientSession() as http, http.post(bridge.url + "/twilio/after-stream") as resp:
            assert resp.status == 403


async def test_a_recorded_profile_announces_it_and_records(
    model: LocalModel, start_bridge: Any, tmp_path: Path
) -> None:
    bridge = await start_bridge(model, profile=Profile(record_calls=True, consent_message="We record calls."))
    async with caller(bridge) as call:
        await call.dial()
        assert call.twiml is not None
        assert call.twiml.index("<Say>We record calls.</Say>") < call.twiml.index("<Connect")
        await call.wait_for_played(0.3)
        await call.hang_up()
    await settle(lambda: not bridge.app[REGISTRY].live)
    record = await bridge.app[STORE].call(call.call_sid)
    assert record.recording_path is not None and Path(record.recording_path).exists()


async def test_the_time_limit_ends_the_call_with_a_goodbye(model: LocalModel, start_bridge: Any) -> None:
    bridge = await start_bridge(model, profile=Profile(greeting="", max_call_seconds=5))
    async with caller(bridge) as call:
        await call.dial()
        conn = await model.wait_for_connection()
        while not call.closed.is_set():
            await call.silence(0.2)
        creates = [e for e in conn.received if e["type"] == "response.create"]
        assert "time limit" in creates[-1]["response"]["instructions"]
        assert call.heard_seconds() > 1.0  # the goodbye was heard before the call ended

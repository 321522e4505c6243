"""The call driver (bridge/call.py, bridge/registry.py): its one timer, typed endings, the recording tap."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from bridge.call import Call
from bridge.clock import ManualClock, MonotonicClock
from bridge.config import AudioPath, Dialect
from bridge.keys import REGISTRY
from bridge.local_model import LocalModel
from bridge.metrics import Metrics
from bridge.prompts import Profile
from bridge.recordings import Header, RecordingFile, RecordingWriter
from bridge.registry import CallRegistry
from bridge.session import EndReason, Timeouts
from bridge.streams import CallRecorder
from bridge.testing import TwilioCaller
from bridge.upstream import Target, Upstream
from tests.conftest import AUTH_TOKEN, Bridge
from tests.test_e2e import settle


def a_call(model: LocalModel, *, prewarm: float, registry: CallRegistry) -> Call:
    upstream = Upstream(Target(model.endpoint, "dep", Dialect.GA, None, "key"))
    return Call(
        call_sid="CA" + "7" * 32,
        profile=Profile(greeting=""),
        audio_path=AudioPath.PCM16,
        upstream=upstream,
        metrics=Metrics(),
        clock=MonotonicClock(),
        timeouts=Timeouts(prewarm=prewarm),
        on_end=registry.ended,
    )


async def test_a_prewarmed_call_that_gets_no_stream_ends_on_its_timer_and_closes_its_model(
    model: LocalModel,
) -> None:
    registry = CallRegistry()
    call = a_call(model, prewarm=0.3, registry=registry)
    registry.prewarm(call)
    conn = await model.wait_for_connection()
    await asyncio.wait_for(call.finished.wait(), 5)
    assert call.end_reason is EndReason.NO_STREAM
    await asyncio.wait_for(conn.closed.wait(), 5)  # the registry tore it down: its Realtime socket is gone
    assert registry.claim(call.call_sid) is None
    await settle(lambda: call.call_sid in registry.outcomes)  # kept at the end of the teardown
    assert registry.outcomes[call.call_sid].reason is EndReason.NO_STREAM
    assert not registry.outcomes[call.call_sid].model_failed


async def test_a_claimed_call_is_not_torn_down_by_its_prewarm(model: LocalModel) -> None:
    registry = CallRegistry()
    call = a_call(model, prewarm=30.0, registry=registry)
    registry.prewarm(call)
    await model.wait_for_connection()
    assert registry.claim(call.call_sid) is call
    assert not call.finished.is_set()
    await call.teardown()
    assert call.end_reason is EndReason.SHUTDOWN


async def test_a_model_that_drops_a_live_call_ends_it_as_the_models_failure(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge: Bridge = await start_bridge(model, profile=Profile(greeting=""))
    async with TwilioCaller(bridge.url, auth_token=AUTH_TOKEN) as caller:
        await caller.dial()
        conn = await model.wait_for_connection()
        await conn.close(1011, "server error")
        await asyncio.wait_for(caller.closed.wait(), 5)
    registry = bridge.app[REGISTRY]
    outcome = registry.outcomes[caller.call_sid]
    assert outcome.reason is EndReason.MODEL_DROPPED
    assert outcome.model_failed  # Twilio's <Connect action> then speaks the profile's fallback message


async def test_the_caller_hanging_up_ends_the_call_as_completed(model: LocalModel, start_bridge: Any) -> None:
    bridge: Bridge = await start_bridge(model, profile=Profile(greeting=""))
    async with TwilioCaller(bridge.url, auth_token=AUTH_TOKEN) as caller:
        await caller.dial()
        await model.wait_for_connection()
        await caller.hang_up()
    registry = bridge.app[REGISTRY]
    await settle(lambda: caller.call_sid in registry.outcomes)  # written as the call is torn down
    outcome = registry.outcomes[caller.call_sid]
    assert outcome.reason is EndReason.CALLER_HUNG_UP and outcome.reason.completed


def recorder_on(path: Path, clock: ManualClock) -> CallRecorder:
    header = Header(call_sid="CA1", bridge_version="test", started_at="2026-11-28T00:00:00.000+00:00")
    sink = RecordingFile(path, clock)
    return CallRecorder(RecordingWriter(header, sink), sink, clock, clock.now())


def test_the_recording_tap_records_each_socket_with_its_source_direction_and_time(tmp_path: Path) -> None:
    clock = ManualClock(10.0)
    path = tmp_path / "call.jsonl"
    recorder = recorder_on(path, clock)
    clock.advance(0.25)
    recorder.tap("twilio")("in", '{"event":"connected"}')
    recorder.tap("model")("out", '{"type":"session.update"}')
    recorder.close()
    recorder.close()  # idempotent
    events = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert [(e["src"], e["dir"], e["t"]) for e in events] == [
        ("twilio", "in", 250.0),
        ("model", "out", 250.0),
    ]


async def test_writes_to_a_draining_realtime_socket_keep_their_order() -> None:
    from bridge import realtime as rt
    from bridge.streams import RealtimeLinks
    from bridge.upstream import SEND_HIGH_WATER

    async with LocalModel(record=True) as model:
        upstream = Upstream(Target(model.endpoint, "dep", Dialect.GA, None, "key"))
        conn = await upstream.connect()
        failed: list[int] = []
        links = RealtimeLinks(failed.append)
        links.open[1] = conn
        served = await model.wait_for_connection()
        transport = served._ws.transport
        assert transport is not None
        transport.pause_reading()  # a slow reader: the kernel's buffers fill, then the bridge's
        chunk = b"\x00" * 48_000  # a second of PCM16 (64 kB of base64)
        count = 16 * 2**20 // 64_000 + SEND_HIGH_WATER // 64_000
        batch: list[rt.ClientCommand] = [rt.AppendAudio(chunk) for _ in range(count)]
        batch.append(rt.AddTextItem("user", "end of the held audio"))
        pending = links.write(1, batch)
        assert pending is not None  # it must drain
        # Another reader's flush, meanwhile: a live frame and a note. They wait behind the batch.
        assert links.write(1, [rt.AppendAudio(b"\x01" * 960), rt.AddTextItem("user", "live")]) is None
        transport.resume_reading()
        await pending
        async with asyncio.timeout(20):
            while "live" not in str(served.received[-1:]):
                await asyncio.sleep(0.01)
        kinds = [e["type"] for e in served.received if e["type"] != "session.update"]
        texts = [
            e["item"]["content"][0]["text"]
            for e in served.received
            if e["type"] == "conversation.item.create"
        ]
        assert texts == ["end of the held audio", "live"]
        assert kinds[: len(batch) - 1] == ["input_audio_buffer.append"] * (len(batch) - 1)
        assert failed == []
        await conn.close()
        await upstream.close()

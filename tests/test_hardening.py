"""Replayed webhooks and streams, call records that survive crashes and store failures, slow clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge import app as bridge_app
from bridge import registry as bridge_registry
from bridge.app import drain
from bridge.keys import METRICS, REGISTRY, STORE
from bridge.local_model import LocalModel
from bridge.store import CallRecord, CallStatus, SQLiteStore, Store, StoreError
from bridge.testing import TwilioCaller, serve_bridge
from tests.conftest import AUTH_TOKEN, Bridge
from tests.test_cli import clean_env, free_port, spawn_server, wait_ready

pytestmark = pytest.mark.timeout(60)


def caller(bridge: Bridge, **kw: Any) -> TwilioCaller:
    return TwilioCaller(bridge.url, auth_token=AUTH_TOKEN, **kw)


async def settle(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_repeated_voice_webhook_gets_the_same_answer_and_no_second_session(
    model: LocalModel, start_bridge: Any
) -> None:
    bridge = await start_bridge(model)
    async with caller(bridge) as call:
        status, first = await call.post_voice()
        assert status == 200 and "<Connect" in first
        status, again = await call.post_voice()  # Twilio retried, or someone replayed the signed POST
        assert (status, again) == (200, first)  # the same one-time token: nothing new minted
        assert bridge.app[REGISTRY].active == 1
        call.accept_twiml(again)
        await call.connect_stream()
        await call.wait_for_played(0.3)  # the greeting
        assert len(model.connections) == 1  # the pre-warmed session serves the call; no second one
        # Once the stream has run, the same webhook is refused: no token, no session.
        status, late = await call.post_voice()
        assert status == 200 and "<Connect" not in late and "<Hangup" in late
        await call.hang_up()
    await settle(lambda: not bridge.app[REGISTRY].live)
    assert len(model.connections) == 1
    _, metrics = await bridge.get("/metrics")
    assert 'bridge_refused_total{reason="webhook_replayed"} 1.0' in metrics


async def test_a_call_sid_gets_one_stream_across_instances(model: LocalModel, start_bridge: Any) -> None:
    one = await start_bridge(model)
    # A second instance behind the same public URL, on the same database.
    two = await start_bridge(model, BRIDGE_PUBLIC_URL=one.url)
    async with caller(one) as call:
        await call.dial()
        await call.wait_for_played(0.2)  # the greeting
        replay = TwilioCaller(two.url, auth_token=AUTH_TOKEN, public_url=one.url, call_sid=call.call_sid)
        async with replay:
            assert call.twiml is not None
            replay.accept_twiml(call.twiml)  # the captured TwiML, token and all, and a valid signature
            await replay.connect_stream()
            await replay.wait_closed(timeout=5)
        assert not two.app[REGISTRY].live
        await call.hang_up()
    await settle(lambda: not one.app[REGISTRY].live)
    _, metrics = await two.get("/metrics")
    assert 'bridge_refused_total{reason="stream_reused"} 1.0' in metrics
    record = await one.app[STORE].call(call.call_sid)
    assert record.status is CallStatus.COMPLETED and record.instance == one.settings.instance_id


async def test_the_record_is_written_when_the_call_starts(model: LocalModel, start_bridge: Any) -> None:
    bridge = await start_bridge(model)
    store = bridge.app[STORE]
    async with caller(bridge) as call:
        await call.dial()
        await settle(lambda: bool(bridge.app[REGISTRY].live))
        live = next(iter(bridge.app[REGISTRY].live))
        await settle(lambda: live.session.start is not None)
        record = await store.call(call.call_sid)
        assert record.status is CallStatus.IN_PROGRESS and record.end_reason == ""
        await call.hang_up()
    await settle(lambda: not bridge.app[REGISTRY].live)
    done = await store.call(call.call_sid)
    assert done.status is CallStatus.COMPLETED and done.started_at == record.started_at


@pytest.mark.timeout(90)
async def test_a_call_cut_by_kill_9_is_marked_interrupted_at_the_next_start(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(tmp_path, BRIDGE_INSECURE_DEV="1", TWILIO_AUTH_TOKEN="", BRIDGE_INSTANCE_ID="box-1")
    server = await spawn_server(env, port, asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(port)
        async with TwilioCaller(url, auth_token=None) as call:
            await call.dial()
            await call.wait_for_media(1, timeout=20)  # live: the greeting plays
            server.send_signal(signal.SIGKILL)
            await server.wait()
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    database = tmp_path / "data" / "bridge.sqlite3"
    async with await SQLiteStore.open(database) as store:
        left = await store.call(call.call_sid)
    assert left.status is CallStatus.IN_PROGRESS and left.instance == "box-1"

    server = await spawn_server(env, port, asyncio.subprocess.DEVNULL)  # the restart
    try:
        await wait_ready(port)
        async with await SQLiteStore.open(database) as store:
            found = await store.call(call.call_sid)
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), 20)
    assert found.status is CallStatus.INTERRUPTED
    assert "stopped during the call" in found.end_reason


class FlakyStore:
    """A store whose call record writes fail ``failures`` times, then go through."""

    def __init__(self, real: Store, failures: int) -> None:
        self.real, self.failures = real, failures
        self.tries = 0

    async def start_call(self, record: CallRecord) -> None:
        await self.real.start_call(record)

    async def add_call(self, record: CallRecord) -> None:
        self.tries += 1
        if self.tries <= self.failures:
            raise StoreError("database is locked")
        await self.real.add_call(record)


@pytest.mark.parametrize("failures", [2, 10])
async def test_a_failed_record_write_is_retried_then_logged_and_counted(
    model: LocalModel,
    start_bridge: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failures: int,
) -> None:
    monkeypatch.setattr(bridge_registry, "STORE_RETRIES", (0.01, 0.01, 0.01))
    bridge = await start_bridge(model)
    registry = bridge.app[REGISTRY]
    flaky = FlakyStore(bridge.app[STORE], failures)
    registry.store = flaky  # type: ignore[assignment]
    async with caller(bridge) as call:
        await call.dial()
        await call.wait_for_media(1)
        await call.hang_up()
    await settle(lambda: not registry.live)
    await settle(lambda: flaky.tries >= min(failures + 1, 4))
    record = await bridge.app[STORE].call(call.call_sid)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and call.call_sid in r.getMessage()]
    counted = bridge.app[METRICS].store_errors.get("call_record")
    if failures < 4:
        assert record.status is CallStatus.COMPLETED and flaky.tries == failures + 1
        assert not errors and counted == 0
    else:  # four tries, then the error says what the record held, and it is counted
        await settle(lambda: bridge.app[METRICS].store_errors.get("call_record") == 1)
        assert record.status is CallStatus.IN_PROGRESS and flaky.tries == 4
        await settle(lambda: any("was not stored" in r.getMessage() for r in caplog.records))
        message = next(r.getMessage() for r in caplog.records if "was not stored" in r.getMessage())
        assert call.call_sid in message and "database is locked" in message and call.from_ in message


async def test_test_calls_count_against_max_calls(model: LocalModel, start_bridge: Any) -> None:
    token = "admin-token-for-tests-0123456789"
    bridge = await start_bridge(model, BRIDGE_MAX_CALLS="1", BRIDGE_ADMIN_TOKEN=token)
    jar = aiohttp.CookieJar(unsafe=True)  # cookies of 127.0.0.1
    async with caller(bridge) as call, aiohttp.ClientSession(cookie_jar=jar) as staff:
        await call.dial()
        await call.wait_for_played(0.2)  # one call live: the bridge is full
        signed_in = await staff.post(
            bridge.url + "/admin/sign-in", data={"token": token, "name": "Ada", "next": "/admin"}
        )
        match = re.search(r'name="csrf" value="([^"]+)"', await signed_in.text())
        assert match is not None
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await staff.ws_connect(
                f"{bridge.url}/admin/test-call?profile=1&csrf={match.group(1)}",
                headers={"Origin": bridge.url},
            )
        assert refused.value.status == 503
        await call.hang_up()
    _, metrics = await bridge.get("/metrics")
    assert 'bridge_refused_total{reason="full"} 1.0' in metrics


async def test_an_instances_own_beats_never_interrupt_its_live_calls(
    model: LocalModel, start_bridge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge_app, "BEAT_SECONDS", 0.02)
    bridge = await start_bridge(model)
    store = bridge.app[STORE]
    beats = 0
    real_beat = store.heartbeat

    async def counted(instance: str) -> None:
        nonlocal beats
        beats += 1
        await real_beat(instance)

    monkeypatch.setattr(store, "heartbeat", counted)
    async with caller(bridge) as call:
        await call.dial()
        await settle(lambda: beats >= 5)  # the call spans several beats and sweeps
        assert (await store.call(call.call_sid)).status is CallStatus.IN_PROGRESS
        await call.hang_up()
    await settle(lambda: not bridge.app[REGISTRY].live)
    record = await store.call(call.call_sid)
    assert record.status is CallStatus.COMPLETED and record.end_reason
    assert bridge.app[METRICS].store_errors.get("call_record") == 0


async def test_a_failing_store_at_the_webhook_still_answers_a_call_sid_once(
    model: LocalModel, start_bridge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bridge = await start_bridge(model)

    async def broken(*args: object) -> None:
        raise StoreError("disk I/O error")

    monkeypatch.setattr(bridge.app[STORE], "answer_call", broken)
    async with caller(bridge) as call:
        status, first = await call.post_voice()
        assert status == 200 and "<Connect" in first
        _, again = await call.post_voice()
        assert again == first  # this process remembers its answer: no second token
        call.accept_twiml(again)
        await call.connect_stream()
        await call.wait_for_played(0.2)
        assert len(model.connections) == 1
        await call.hang_up()
    assert bridge.app[METRICS].store_errors.get("call_answer") == 2


async def test_a_slow_store_never_delays_a_call(
    model: LocalModel, start_bridge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bridge = await start_bridge(model)
    store = bridge.app[STORE]
    release = asyncio.Event()
    real_start = store.start_call

    async def slow(record: CallRecord) -> None:
        await release.wait()  # a store busy with another process's write
        await real_start(record)

    monkeypatch.setattr(store, "start_call", slow)
    async with caller(bridge) as call:
        await call.dial()
        await call.wait_for_played(0.3)  # the greeting plays while the first record waits
        release.set()
        await call.hang_up()
    await settle(lambda: not bridge.app[REGISTRY].live)
    assert (await store.call(call.call_sid)).status is CallStatus.COMPLETED


async def test_a_request_body_that_never_arrives_is_answered_408(
    model: LocalModel, start_bridge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge_app, "IDLE_TIMEOUT", 0.5)
    bridge = await start_bridge(model)
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    try:
        writer.write(
            b"POST /twilio/voice HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nCallSid=CA"
        )  # and the other 90 bytes never come
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.startswith(b"HTTP/1.1 408")
    finally:
        writer.close()
    _, metrics = await bridge.get("/metrics")
    assert 'bridge_refused_total{reason="slow_body"} 1.0' in metrics


async def test_instances_starting_together_on_a_fresh_store_all_start(tmp_path: Path) -> None:
    env = {"TWILIO_AUTH_TOKEN": AUTH_TOKEN, "BRIDGE_DATA_DIR": str(tmp_path / "data")}
    async with contextlib.AsyncExitStack() as stack:
        started = await asyncio.gather(
            *(stack.enter_async_context(serve_bridge(env)) for _ in range(4)), return_exceptions=True
        )  # (all of them, so that the stack closes every one that did start)
        bridges = [b for b in started if not isinstance(b, BaseException)]
        assert len(bridges) == 4, [b for b in started if isinstance(b, BaseException)]
        assert [(await b.get("/readyz"))[0] for b in bridges] == [200] * 4
        profiles = await bridges[0].app[STORE].list_profiles()
        assert len(profiles) == 1 and profiles[0].is_default  # seeded once


@pytest.mark.parametrize(
    ("sent", "answer", "refused"),
    [
        # Headers that never end: the connection is closed, no answer.
        (b"POST /twilio/voice HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", b"", False),
        # A body that never arrives (90 of its 100 bytes missing): 408, counted.
        (
            b"POST /twilio/voice HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nCallSid=CA",
            b"HTTP/1.1 408",
            True,
        ),
    ],
    ids=["headers", "body"],
)
async def test_a_slow_client_is_cut_off(
    model: LocalModel,
    start_bridge: Any,
    monkeypatch: pytest.MonkeyPatch,
    sent: bytes,
    answer: bytes,
    refused: bool,
) -> None:
    monkeypatch.setattr(bridge_app, "IDLE_TIMEOUT", 0.5)
    bridge = await start_bridge(model)
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    try:
        writer.write(sent)  # and then nothing
        await writer.drain()
        got = await asyncio.wait_for(reader.readline(), 10)  # its status line, or b"" when it closed
    finally:
        writer.close()
    assert got.startswith(answer) and bool(got) == bool(answer)
    _, metrics = await bridge.get("/metrics")
    assert ('bridge_refused_total{reason="slow_body"} 1.0' in metrics) == refused
    # A client that completes its request is served as usual.
    async with aiohttp.ClientSession() as http, http.get(bridge.url + "/healthz") as resp:
        assert resp.status == 200


async def test_a_drain_waits_for_the_record_of_a_call_that_just_ended(
    model: LocalModel, start_bridge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bridge = await start_bridge(model)
    store = bridge.app[STORE]
    entered, release = asyncio.Event(), asyncio.Event()
    real_add = store.add_call

    async def slow(record: CallRecord) -> None:
        entered.set()
        await release.wait()  # a busy store, while the process is being stopped
        await real_add(record)

    monkeypatch.setattr(store, "add_call", slow)
    async with caller(bridge) as call:
        await call.dial()
        await call.wait_for_media(1)
        await call.hang_up()
    await asyncio.wait_for(entered.wait(), 10)
    asyncio.get_running_loop().call_later(0.3, release.set)
    await drain(bridge.app, 0.0)  # SIGTERM: the drain must not return under the record being written
    assert (await store.call(call.call_sid)).status is CallStatus.COMPLETED

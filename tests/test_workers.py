"""``bridge serve --workers N``: N processes on one port, calls spread over them, drained together."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from bridge.cli import WORKER_STARTUP
from bridge.store import CallStatus, open_store
from bridge.testing import TwilioCaller
from tests.test_cli import clean_env, free_port, run_cli, spawn_server, wait_ready

pytestmark = pytest.mark.timeout(120)


def children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


def age(pid: int) -> float:
    """Seconds since process ``pid`` started (field 22 of /proc/PID/stat, in clock ticks since boot)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_two_workers_share_the_port_serve_calls_and_drain_together(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    port = free_port()
    database = str(tmp_path / "data" / "bridge.sqlite3")
    if backend == "postgresql":
        database = request.getfixturevalue("postgres_database")
    env = clean_env(
        tmp_path,
        BRIDGE_INSECURE_DEV="1",
        TWILIO_AUTH_TOKEN="",
        BRIDGE_INSTANCE_ID="box",
        BRIDGE_DATABASE=database,
    )
    server = await spawn_server({**env, "BRIDGE_WORKERS": "2"}, port, asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(port)
        workers = children(server.pid)
        assert len(workers) == 2
        sids = []
        for _ in range(16):  # new connections each: the kernel spreads them over the two workers
            async with TwilioCaller(url, auth_token=None) as call:
                await call.dial()
                await call.wait_for_media(1, timeout=20)
                await call.hang_up()
                sids.append(call.call_sid)
        # A worker that dies (after its start-up) is started again.
        dead = min(workers)
        await asyncio.sleep(max(0.0, WORKER_STARTUP + 0.5 - age(dead)))
        os.kill(dead, signal.SIGKILL)
        async with asyncio.timeout(20):
            while len(now := children(server.pid)) < 2 or dead in now:
                await asyncio.sleep(0.05)
        workers |= now
        await wait_ready(port)
        live = TwilioCaller(url, auth_token=None)
        await live.dial()
        await live.wait_for_media(1, timeout=20)
        server.send_signal(signal.SIGTERM)  # both drain: the live call goes on until it hangs up
        await live.wait_for_media(len(live.received_media) + 5, timeout=10)
        await live.hang_up()
        await live.close()
        assert await asyncio.wait_for(server.wait(), 40) == 0
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    async with await open_store(database) as store:
        records = [await store.call(sid) for sid in [*sids, live.call_sid]]
    assert all(r.status is CallStatus.COMPLETED for r in records)
    assert {r.instance for r in records} == {"box/0", "box/1"}  # both workers served calls


async def test_a_worker_that_cannot_start_stops_them_all(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(tmp_path, BRIDGE_INSECURE_DEV="1", TWILIO_AUTH_TOKEN="")
    blocker = await spawn_server(env, port, asyncio.subprocess.DEVNULL)  # a plain server holds the port
    try:
        await wait_ready(port)
        code, err = await run_cli({**env, "BRIDGE_WORKERS": "2", "BRIDGE_PORT": str(port)}, "serve")
    finally:
        blocker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(blocker.wait(), 20)
    assert code == 1
    assert "failed at start-up" in err and "cannot listen" in err
    assert "Traceback" not in err  # a clean stop, not a supervisor that crashed


async def test_workers_are_counted_and_need_a_port(tmp_path: Path) -> None:
    env = clean_env(tmp_path, BRIDGE_INSECURE_DEV="1", TWILIO_AUTH_TOKEN="")
    code, err = await run_cli({**env, "BRIDGE_WORKERS": "0"}, "serve")
    assert code == 2 and "BRIDGE_WORKERS" in err
    code, err = await run_cli({**env, "BRIDGE_WORKERS": "2", "BRIDGE_PORT": "0"}, "serve")
    assert code == 2 and "several workers share one port" in err

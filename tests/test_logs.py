"""Log lines as JSON (``BRIDGE_LOG_FORMAT=json``), each carrying the fields of the call it is about."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

import pytest

from bridge import logs
from bridge.testing import TwilioCaller
from tests.test_cli import clean_env, free_port, run_cli, spawn_server, wait_ready

pytestmark = pytest.mark.timeout(60)


def test_a_json_line_has_the_call_fields_of_its_context_and_the_traceback() -> None:
    record = logging.LogRecord("bridge.x", logging.ERROR, __file__, 1, "went %s", ("wrong",), None)
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    fields = {"call_sid": "CA1", "profile": "sales"}
    assert logs.call_context(fields).run(logs.CallFields().filter, record)
    fields["stream_sid"] = "MZ1"  # filled in later: the same dict, so later lines have it
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "went wrong" and line["level"] == "ERROR" and line["logger"] == "bridge.x"
    assert (line["call_sid"], line["profile"]) == ("CA1", "sales")
    assert "ValueError: boom" in line["exception"] and line["time"].endswith("+00:00")
    outside = logging.LogRecord("bridge.x", logging.INFO, __file__, 1, "idle", (), None)
    assert logs.CallFields().filter(outside) and "call_sid" not in json.loads(
        logs.JsonFormatter().format(outside)
    )


async def test_bridge_serve_logs_json_lines_with_the_call_and_its_stream(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(tmp_path, BRIDGE_INSECURE_DEV="1", TWILIO_AUTH_TOKEN="", BRIDGE_LOG_FORMAT="json")
    server = await spawn_server(env, port, asyncio.subprocess.PIPE)
    try:
        await wait_ready(port)
        async with TwilioCaller(f"http://127.0.0.1:{port}", auth_token=None) as call:
            await call.dial()
            await call.wait_for_media(1, timeout=20)
            await call.hang_up()
        server.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(server.communicate(), 30)
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    lines = [json.loads(line) for line in err.decode().splitlines() if line.strip()]  # every line is JSON
    answered = [line for line in lines if line.get("event") == "call_answered"]
    ended = [line for line in lines if line.get("event") == "call_ended"]
    assert len(answered) == len(ended) == 1
    assert answered[0]["call_sid"] == call.call_sid and answered[0]["profile"] == "default"
    assert ended[0]["call_sid"] == call.call_sid and ended[0]["stream_sid"] == call.stream_sid
    assert ended[0]["profile"] == "default" and "ended after" in ended[0]["message"]
    about_the_call = [line for line in lines if line["logger"] == "bridge.call"]
    assert about_the_call and all(line.get("call_sid") == call.call_sid for line in about_the_call)


async def test_an_unknown_log_format_stops_start_up(tmp_path: Path) -> None:
    env = clean_env(tmp_path, BRIDGE_INSECURE_DEV="1", TWILIO_AUTH_TOKEN="", BRIDGE_LOG_FORMAT="xml")
    code, err = await run_cli(env, "serve")
    assert code == 2 and "BRIDGE_LOG_FORMAT='xml' is unknown" in err

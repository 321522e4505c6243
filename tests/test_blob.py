"""Recordings in Blob Storage (``BRIDGE_STORAGE_URL``), against Azurite: recorded, downloaded, drawn,
replayed; a failed upload keeps the local file; the setting is checked."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.app import create_app
from bridge.check import run_checks
from bridge.config import Secret, load_settings
from bridge.errors import ConfigError
from bridge.keys import METRICS, STORE
from bridge.local_model import LocalModel
from bridge.recordings import blob
from bridge.recordings.blob import BlobNotFound, BlobStorage, fetch_recording, split_blob_url
from bridge.replay.engine import replay_file
from bridge.store import CallRecord
from bridge.testing import TwilioCaller
from tests.azurite_support import KEY
from tests.conftest import AUTH_TOKEN, fixture_audio
from tests.test_admin import env_for, sign_in

BASE = {
    "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
    "BRIDGE_PUBLIC_URL": "https://bridge.example.test",
    "BRIDGE_DATA_DIR": tempfile.gettempdir(),
}


async def _call(start_bridge: Any, tmp_path: Path, **env: str) -> tuple[Any, str]:
    """One real call through a bridge recording to ``tmp_path/recordings``; the bridge and the CallSid."""
    async with LocalModel(speed=8.0) as model:
        bridge = await start_bridge(
            model, BRIDGE_RECORDINGS_DIR=str(tmp_path / "recordings"), BRIDGE_STORAGE_KEY=KEY, **env
        )
        async with TwilioCaller(bridge.url, auth_token=AUTH_TOKEN, from_="+15550001111") as call:
            await call.dial()
            await call.wait_for_played(0.5)
            await call.speak(fixture_audio("hello.ulaw"))
            await call.hang_up()
    return bridge, call.call_sid


async def _completed(bridge: Any, call_sid: str) -> CallRecord:
    """The call's completed record (written after the upload, as the call's teardown ends)."""
    async with asyncio.timeout(20):
        while True:
            record = await bridge.app[STORE].call(call_sid)
            if record.status.value == "completed":
                return record  # type: ignore[no-any-return]
            await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_a_call_recording_goes_to_the_container_and_the_admin_and_replay_read_it(
    start_bridge: Any, tmp_path: Path, azurite: str
) -> None:
    bridge, sid = await _call(start_bridge, tmp_path, BRIDGE_STORAGE_URL=azurite, BRIDGE_RECORDINGS_GZIP="1")
    record = await _completed(bridge, sid)
    assert record.recording_path is not None and record.recording_path.startswith(azurite + "/recordings/")
    assert record.recording_path.endswith(f"-{sid}.jsonl.gz")
    assert not any((tmp_path / "recordings").iterdir())  # uploaded, then the local spool file removed
    container, name = split_blob_url(record.recording_path)
    async with BlobStorage(container, key=Secret(KEY)) as storage:
        assert await storage.exists(name)
        data = await storage.get(name)
    assert data[:2] == b"\x1f\x8b"

    recording = await fetch_recording(record.recording_path, {"BRIDGE_STORAGE_KEY": KEY})
    assert recording.header.call_sid == sid and recording.header.from_number == "+15550001111"
    assert {"start", "media", "stop"} <= {e.kind for e in recording.events}

    # The admin UI of an instance with the same store and container: the call page, download, timeline.
    app = create_app(load_settings(env_for(tmp_path, BRIDGE_STORAGE_URL=azurite, BRIDGE_STORAGE_KEY=KEY)))
    async with TestClient(TestServer(app)) as client:
        await sign_in(client)
        page = await (await client.get(f"/admin/calls/{sid}")).text()
        assert f'<img src="/admin/calls/{sid}/timeline.svg"' in page and "Download the recording" in page
        resp = await client.get(f"/admin/calls/{sid}/recording")
        assert resp.status == 200 and resp.content_type == "application/gzip"
        assert f'-{sid}.jsonl.gz"' in resp.headers["Content-Disposition"]
        assert await resp.read() == data
        resp = await client.get(f"/admin/calls/{sid}/timeline.svg")
        assert resp.status == 200 and resp.content_type == "image/svg+xml" and "<svg" in await resp.text()

    # bridge replay reads the blob URL (argparse's Path folds "http://" to "http:/": taken either way).
    url = record.recording_path
    result = await asyncio.to_thread(
        replay_file, Path(url), model="local", environ={"BRIDGE_STORAGE_KEY": KEY}
    )
    assert result.passed, (result.divergences, result.errors)
    assert result.name == Path(url).name and result.turns >= 1


@pytest.mark.timeout(120)
async def test_a_failed_upload_keeps_the_local_file_logs_and_counts(
    start_bridge: Any,
    tmp_path: Path,
    azurite: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(blob, "UPLOAD_RETRIES", (0.01, 0.01))
    missing = azurite.rsplit("/", 1)[0] + "/no-such-container"
    with caplog.at_level(logging.WARNING, logger="bridge.recordings.blob"):
        bridge, sid = await _call(start_bridge, tmp_path, BRIDGE_STORAGE_URL=missing)
        record = await _completed(bridge, sid)
    (local,) = (tmp_path / "recordings").iterdir()
    assert record.recording_path == str(local) and local.name.endswith(f"-{sid}.jsonl")
    assert "not uploaded to Blob Storage" in caplog.text and "ContainerNotFound" in caplog.text
    assert caplog.text.count("upload failed (try") == 2
    assert bridge.app[METRICS].store_errors.get("recording_upload") == 1
    # The admin still serves the kept local file.
    app = create_app(load_settings(env_for(tmp_path, BRIDGE_STORAGE_URL=missing, BRIDGE_STORAGE_KEY=KEY)))
    async with TestClient(TestServer(app)) as client:
        await sign_in(client)
        resp = await client.get(f"/admin/calls/{sid}/recording")
        assert resp.status == 200 and await resp.read() == local.read_bytes()


async def test_a_blob_of_another_container_or_a_missing_one_is_not_served(azurite: str) -> None:
    async with BlobStorage(azurite, key=Secret(KEY)) as storage:
        await storage.put("recordings/x.jsonl", b"{}\n")
        assert await storage.get("recordings/x.jsonl") == b"{}\n"
        assert storage.name_of(storage.url_for("recordings/x.jsonl")) == "recordings/x.jsonl"
        assert storage.name_of(azurite + "-other/recordings/x.jsonl") is None
        assert storage.name_of(azurite + "/recordings/../../x") is None
        assert not await storage.exists("recordings/nothing.jsonl")
        with pytest.raises(BlobNotFound, match="not found"):
            await storage.get("recordings/nothing.jsonl")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://example.com/acct/container", "http only on loopback"),
        ("https://acct.blob.core.windows.net", "one container"),
        ("https://acct.blob.core.windows.net/a/b", "one container"),
        ("http://127.0.0.1:10000/container", "ACCOUNT/CONTAINER"),
        ("https://acct.blob.core.windows.net/Bad_Name", "lowercase"),
        ("https://acct.blob.core.windows.net/c1x?sig=abc", "plain container URL"),
    ],
)
def test_the_storage_url_is_checked(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_settings(BASE | {"BRIDGE_STORAGE_URL": url})


def test_the_storage_settings_and_the_key_is_a_secret() -> None:
    settings = load_settings(
        BASE
        | {
            "BRIDGE_STORAGE_URL": "https://acct.blob.core.windows.net/calls/",
            "BRIDGE_STORAGE_KEY": "c2VjcmV0",
        }
    )
    assert settings.storage_url == "https://acct.blob.core.windows.net/calls"
    assert settings.storage_key == Secret("c2VjcmV0") and "c2VjcmV0" not in repr(settings)
    assert load_settings(BASE).storage_url is None
    with pytest.raises(ConfigError, match="without BRIDGE_STORAGE_URL"):
        load_settings(BASE | {"BRIDGE_STORAGE_KEY": "x"})


async def test_bridge_check_proves_the_container_exists(tmp_path: Path, azurite: str) -> None:
    missing = azurite.rsplit("/", 1)[0] + "/no-such-container"
    lines: list[tuple[str, bool, str]] = []
    for url in (azurite, missing):
        env = env_for(tmp_path, BRIDGE_STORAGE_URL=url, BRIDGE_STORAGE_KEY=KEY)
        await run_checks(load_settings(env), lambda *line: lines.append(line))
    there, gone = (line for line in lines if line[0] == "blob storage")
    assert there == ("blob storage", True, f"{azurite}: reachable")
    assert not gone[1] and "not found" in gone[2] and KEY not in gone[2]


async def test_a_blob_url_elsewhere_is_refused_before_any_credential_is_sent() -> None:
    with pytest.raises(ConfigError, match="refusing to send the storage credential"):
        await fetch_recording("https://evil.example.com/c/recordings/x.jsonl", {"BRIDGE_STORAGE_KEY": KEY})

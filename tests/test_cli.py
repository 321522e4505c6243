"""The command line as users run it: a real ``python -m bridge serve`` process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from bridge.audio import ulaw_to_pcm16
from tests.conftest import fixture_audio, wav_file

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "TWILIO_", "BRIDGE_"))}
    return {**env, "BRIDGE_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT), **extra}


async def spawn_server(env: dict[str, str], port: int, output: int) -> asyncio.subprocess.Process:
    """``python -m bridge serve`` on ``port``; ``output`` is PIPE to read its log, DEVNULL otherwise."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", "--port", str(port), env=env, stdout=output, stderr=output
    )


async def wait_ready(port: int) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    pytest.fail("the server did not start")


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    code, _, err = await run_cli_output(env, *args)
    return code, err


async def run_cli_output(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run ``python -m bridge ARGS``; return its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({}, "TWILIO_AUTH_TOKEN is not set"),
        (
            {"TWILIO_AUTH_TOKEN": "t", "BRIDGE_PUBLIC_URL": "https://x.example", "BRIDGE_AUDIO_PATH": "opus"},
            "BRIDGE_AUDIO_PATH='opus' is unknown",
        ),
    ],
)
async def test_a_misconfiguration_stops_start_up_with_one_line(
    tmp_path: Path, extra: dict[str, str], fragment: str
) -> None:
    code, err = await run_cli(clean_env(tmp_path, **extra), "serve")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err


async def test_an_invalid_profile_file_lists_its_bad_fields(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('voice = "robot"\n[turn_detection]\nthreshold = 3\n')
    env = clean_env(
        tmp_path, BRIDGE_INSECURE_DEV="1", BRIDGE_PROFILE=str(profile), BRIDGE_PORT=str(free_port())
    )
    code, err = await run_cli(env, "serve")
    assert code == 2
    assert "voice: 'robot' is not a voice" in err and "turn_detection.threshold" in err


async def test_serve_runs_with_the_local_model_and_drains_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(
        tmp_path, BRIDGE_INSECURE_DEV="1", TWILIO_AUTH_TOKEN="", AZURE_OPENAI_API_KEY="never-logged"
    )
    proc = await spawn_server(env, port, asyncio.subprocess.PIPE)
    try:
        await wait_ready(port)
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert "bridge_live_calls 0.0" in await resp.text()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = err.decode()
    assert proc.returncode == 0, text
    assert "built-in local model" in text and "BRIDGE_INSECURE_DEV=1" in text and "shutting down" in text
    assert "never-logged" not in text


async def test_a_newcomer_records_a_call_replays_it_and_exports_it(tmp_path: Path) -> None:
    """The README's walk-through: serve with recording on, place a call, replay it, export it."""
    port = free_port()
    recordings = tmp_path / "recordings"
    env = clean_env(tmp_path, BRIDGE_INSECURE_DEV="1", BRIDGE_RECORDINGS_DIR=str(recordings))
    server = await spawn_server(env, port, asyncio.subprocess.DEVNULL)
    try:
        await wait_ready(port)
        code, err = await run_cli(
            env, "call", "--url", f"http://127.0.0.1:{port}", "--say", str(ROOT / "tests/fixtures/hello.ulaw")
        )
        assert code == 0, err
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), 20)
    (recording,) = recordings.iterdir()
    code, err = await run_cli(env, "replay", str(recording))
    assert code == 0, err
    wav, svg = tmp_path / "call.wav", tmp_path / "call.svg"
    code, err = await run_cli(env, "export", str(recording), "--wav", str(wav), "--timeline", str(svg))
    assert code == 0, err
    assert wav.stat().st_size > 8000 and "<svg" in svg.read_text()


def twilio_style_wav(path: Path) -> Path:
    """The hello fixture as Twilio stores a recording: a two-channel 8 kHz μ-law WAV (format tag 7)."""
    speech = np.frombuffer(ulaw_to_pcm16(fixture_audio("hello.ulaw")), dtype="<i2").astype(np.float64)
    path.write_bytes(wav_file([speech, speech], 8000, encoding="ulaw"))
    return path


async def test_bridge_call_says_a_mulaw_wav(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(tmp_path, BRIDGE_INSECURE_DEV="1")
    server = await spawn_server(env, port, asyncio.subprocess.DEVNULL)
    try:
        await wait_ready(port)
        wav = twilio_style_wav(tmp_path / "hello.wav")
        code, out, err = await run_cli_output(
            env, "call", "--url", f"http://127.0.0.1:{port}", "--say", str(wav)
        )
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), 20)
    assert code == 0, err
    assert "said 1.7 s" in out and "Traceback" not in err


async def test_bridge_call_names_an_unusable_file_in_one_line(tmp_path: Path) -> None:
    wav = bytearray(twilio_style_wav(tmp_path / "speech.wav").read_bytes())
    wav[20:22], wav[34:36] = (1).to_bytes(2, "little"), (24).to_bytes(2, "little")  # claim 24-bit PCM
    (tmp_path / "speech.wav").write_bytes(bytes(wav))
    env = clean_env(tmp_path, BRIDGE_INSECURE_DEV="1")
    for path, fragment in (
        (tmp_path / "speech.wav", "24-bit PCM WAV is not supported"),
        (tmp_path / "missing.wav", "cannot read it"),
    ):
        code, err = await run_cli(env, "call", "--url", "http://127.0.0.1:9", "--say", str(path))
        assert code == 2, err
        (line,) = err.strip().splitlines()
        assert line.startswith(f"bridge call: {path}: {fragment}"), line
    assert "sox in.wav -r 8000 -c 1" in (await run_cli(env, "call", "--say", str(tmp_path / "speech.wav")))[1]


@pytest.mark.timeout(30)
def test_scripts_serve_refuses_a_public_url_without_an_auth_token(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "BRIDGE_PUBLIC_URL": "https://abc.example.com"}
    done = subprocess.run(
        ["bash", str(Path(__file__).parent.parent / "scripts" / "serve")],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 2
    assert "TWILIO_AUTH_TOKEN" in done.stderr and "loopback only" in done.stderr


async def test_check_reaches_the_store_and_the_model_and_says_what_is_wrong(tmp_path: Path) -> None:
    env = clean_env(tmp_path, BRIDGE_INSECURE_DEV="1", TWILIO_AUTH_TOKEN="")
    code, out, _ = await run_cli_output(env, "check")
    assert code == 0, out
    assert "store         ok" in out and "model         ok      the built-in local model" in out
    assert "blob storage  ok      not configured" in out

    broken = {
        **env,
        "AZURE_OPENAI_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "AZURE_OPENAI_DEPLOYMENT": "gpt-realtime",
        "AZURE_OPENAI_API_KEY": "never-printed-key",
        "BRIDGE_DATABASE": f"postgresql://bridge:never-printed-pw@127.0.0.1:{free_port()}/bridge",
    }
    code, out, err = await run_cli_output(broken, "check")
    assert code == 1
    assert "store         FAILED" in out and "model         FAILED" in out
    assert "never-printed" not in out + err

    code, out, _ = await run_cli_output({**env, "BRIDGE_AUDIO_PATH": "mp3"}, "check")
    assert code == 2 and "settings      FAILED  BRIDGE_AUDIO_PATH='mp3' is unknown" in out

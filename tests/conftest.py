"""Shared fixtures: the local model and a bridge served on a real loopback port."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from bridge.app import create_app
from bridge.config import load_settings
from bridge.local_model import LocalModel
from bridge.prompts import Profile

FIXTURES = Path(__file__).parent / "fixtures"
AUTH_TOKEN = "test-twilio-auth-token"


def fixture_audio(name: str) -> bytes:
    """A committed speech fixture: raw 8 kHz μ-law (see tests/fixtures/README.md)."""
    return (FIXTURES / name).read_bytes()


@dataclass
class Bridge:
    """A running bridge: its app, its base URL and the settings' public URL (the same here)."""

    app: web.Application
    url: str
    runner: web.AppRunner

    async def get(self, path: str) -> tuple[int, str]:
        import aiohttp

        async with aiohttp.ClientSession() as http, http.get(self.url + path) as resp:
            return resp.status, await resp.text()


@pytest.fixture
async def model() -> AsyncIterator[LocalModel]:
    async with LocalModel(speed=4.0) as local:
        yield local


BridgeFactory = Callable[..., "AsyncIterator[Bridge]"]


@pytest.fixture
async def start_bridge(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """Start bridges on real ports; every one is cleaned up (and drained) at the end of the test."""
    runners: list[web.AppRunner] = []

    async def start(
        model: LocalModel | None,
        *,
        dialect: str = "ga",
        audio_path: str = "pcm16",
        profile: Profile | None = None,
        render_greetings: bool = False,
        **env: str,
    ) -> Bridge:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        values = {
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "BRIDGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "BRIDGE_DATA_DIR": str(tmp_path / "data"),
            "BRIDGE_AUDIO_PATH": audio_path,
            **env,
        }
        if model is not None:
            values |= {
                "AZURE_OPENAI_ENDPOINT": model.endpoint,
                "AZURE_OPENAI_DEPLOYMENT": "test-deployment",
                "AZURE_OPENAI_API_KEY": "test-api-key",
            }
            if dialect == "preview":
                values["AZURE_OPENAI_API_VERSION"] = "2025-04-01-preview"
        settings = load_settings(values)
        app = create_app(settings, profile=profile, render_greetings=render_greetings)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        runners.append(runner)
        await web.SockSite(runner, sock).start()
        return Bridge(app, f"http://127.0.0.1:{port}", runner)

    yield start
    for runner in runners:
        await runner.cleanup()

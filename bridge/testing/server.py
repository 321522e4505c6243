"""A real bridge on a free loopback port, for tests, scripts and the replay engine: :func:`serve_bridge`.

Example::

    async with serve_bridge({"TWILIO_AUTH_TOKEN": TOKEN, "BRIDGE_DATA_DIR": str(tmp_path)}) as bridge:
        async with TwilioCaller(bridge.url, auth_token=TOKEN) as caller:
            await caller.dial()
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from bridge.app import create_app, make_runner
from bridge.clock import Clock
from bridge.config import Settings, load_settings
from bridge.prompts import Profile

__all__ = ["LOOPBACK", "ServedBridge", "serve_bridge"]

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ServedBridge:
    """A bridge serving on ``http://127.0.0.1:PORT``: its app, address and settings."""

    app: web.Application
    port: int
    settings: Settings
    runner: web.AppRunner

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: where it listens (point a :class:`TwilioCaller` here)."""
        return f"http://{LOOPBACK}:{self.port}"

    async def get(self, path: str) -> tuple[int, str]:
        """``GET`` one path on it; return the status and the body."""
        async with aiohttp.ClientSession() as http, http.get(self.url + path) as resp:
            return resp.status, await resp.text()


@asynccontextmanager
async def serve_bridge(
    settings: Settings | Mapping[str, str],
    *,
    profile: Profile | None = None,
    clock: Clock | None = None,
    render_greetings: bool = False,
    shutdown_timeout: float = 2.0,
) -> AsyncIterator[ServedBridge]:
    """Serve a bridge (:func:`bridge.app.create_app`) on a free port of 127.0.0.1 until the block ends.

    ``settings`` is either the environment to load them from (``load_settings``), in which
    ``BRIDGE_PUBLIC_URL`` defaults to the bridge's own ``http://127.0.0.1:PORT`` (the port is known only
    once it is bound, so let this fill it in), or ready :class:`~bridge.config.Settings`, used as they are
    except for ``host`` and ``port``, which become the ones it listens on.

    ``profile``, ``clock`` and ``render_greetings`` go to ``create_app``; greetings are not rendered by
    default (rendering asks the model for audio at start-up). Signals are left alone. On exit the app is
    cleaned up like ``bridge serve`` does on shutdown: live calls get ``shutdown_timeout`` seconds to end,
    then the port is free.

    Example::

        env = {"TWILIO_AUTH_TOKEN": TOKEN, "BRIDGE_DATA_DIR": str(tmp_path), **model_env}
        async with serve_bridge(env, profile=Profile(greeting="")) as bridge:
            assert await bridge.get("/healthz") == (200, "ok\n")
            async with TwilioCaller(bridge.url, auth_token=TOKEN) as caller:
                await caller.dial()
    """
    sock = socket.socket()
    try:
        sock.bind((LOOPBACK, 0))
        port = int(sock.getsockname()[1])
        if isinstance(settings, Settings):
            settings = dataclasses.replace(settings, host=LOOPBACK, port=port)
        else:
            env = {"BRIDGE_PUBLIC_URL": f"http://{LOOPBACK}:{port}", **settings}
            settings = load_settings(env, host=LOOPBACK, port=port)
        app = create_app(settings, profile=profile, clock=clock, render_greetings=render_greetings)
        runner = make_runner(app, shutdown_timeout=shutdown_timeout)
    except BaseException:
        sock.close()
        raise
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
        yield ServedBridge(app, port, settings, runner)
    finally:
        await runner.cleanup()
        sock.close()

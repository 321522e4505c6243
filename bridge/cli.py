"""The ``bridge`` command line: ``bridge serve``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from aiohttp import web

from bridge import __version__
from bridge.app import create_app, drain
from bridge.config import Settings, load_settings
from bridge.errors import ConfigError
from bridge.web import REGISTRY

log = logging.getLogger("bridge")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridge", description="Twilio ⇄ Azure OpenAI Realtime bridge")
    parser.add_argument("--version", action="version", version=f"bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1, or BRIDGE_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080, or BRIDGE_PORT)")
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # websockets logs every handshake at INFO; keep the log about calls.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain: refuse new calls, let live calls finish, stop."""
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "bridge %s listening on http://%s:%d (public URL %s)",
        __version__,
        settings.host,
        settings.port,
        settings.public_url,
    )
    log.info("point your Twilio number's voice webhook at %s/twilio/voice (POST)", settings.public_url)
    try:
        await stop.wait()
        log.info(
            "shutting down: refusing new calls, draining %d live calls (up to %.0f s)",
            len(app[REGISTRY].live),
            settings.drain_seconds,
        )
        await drain(app)
    finally:
        await runner.cleanup()


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (it cuts the per-frame cost), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is not on Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bridge`` console script."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(host=args.host, port=args.port)
    except ConfigError as exc:
        print(f"bridge: configuration error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    if settings.twilio_auth_token is None:
        log.warning("BRIDGE_INSECURE_DEV=1: Twilio signatures are NOT checked; never expose this server")
    try:
        _run(serve(settings))
    except ConfigError as exc:
        print(f"bridge: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"bridge: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0

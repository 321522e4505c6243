"""The ``bridge`` command line: ``bridge serve``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from bridge import __version__, logs
from bridge.app import create_app, drain, make_runner
from bridge.config import Settings, load_settings
from bridge.errors import ConfigError
from bridge.keys import REGISTRY

log = logging.getLogger("bridge")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridge", description="Twilio ⇄ Azure OpenAI Realtime bridge")
    parser.add_argument("--version", action="version", version=f"bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1, or BRIDGE_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080, or BRIDGE_PORT)")
    serve.add_argument(
        "--workers",
        type=int,
        help="processes sharing the port, drained together on SIGTERM (default 1, or BRIDGE_WORKERS)",
    )

    check = sub.add_parser(
        "check",
        help="check the settings and reach the store, the model and the blob container; say what is wrong",
    )
    check.add_argument("--host", help=argparse.SUPPRESS)
    check.add_argument("--port", type=int, help=argparse.SUPPRESS)

    replay = sub.add_parser(
        "replay",
        help="replay recorded calls through the bridge and compare what it sends",
        description="Replays the caller side of each recording into a bridge and reports per call; "
        "exits 1 when any call diverges from its recording or errs.",
    )
    replay.add_argument("recordings", nargs="+", type=Path, metavar="RECORDING")
    replay.add_argument(
        "--model",
        choices=("recorded", "local", "azure"),
        default="recorded",
        help="recorded: answer with the recorded model events and compare (default); local: the local "
        "model; azure: the deployment in AZURE_OPENAI_*",
    )
    replay.add_argument(
        "--speed",
        choices=("fast", "realtime"),
        help="fast: a virtual clock (default for recorded/local); realtime: the wall clock (azure, --url)",
    )
    replay.add_argument("--url", help="replay into a running bridge at this base URL instead of in-process")
    replay.add_argument("--auth-token", help="the running bridge's TWILIO_AUTH_TOKEN (with --url)")
    replay.add_argument("--json", action="store_true", help="print the reports as JSON on stdout")

    call = sub.add_parser(
        "call",
        help="place a simulated phone call into a running bridge (a Twilio double), e.g. to record one",
        description="Dials the bridge like Twilio would, says each --say file in turn, listens to the "
        "answers as a caller would hear them, then hangs up.",
    )
    call.add_argument("--url", default="http://127.0.0.1:8080", help="the bridge's base URL")
    call.add_argument(
        "--auth-token", help="its TWILIO_AUTH_TOKEN (default: the environment's; none in dev mode)"
    )
    call.add_argument(
        "--say",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="speech to say: raw 8 kHz μ-law (.ulaw) or a WAV (16-bit PCM, μ-law or A-law; any rate; "
        "mono or stereo); repeatable",
    )
    call.add_argument("--listen", type=float, default=15.0, help="at most this long for each answer (s)")
    call.add_argument("--heard", type=Path, help="write what the caller heard to this WAV file")

    prompts = sub.add_parser("prompts", help="export or import the prompt profiles as one JSON or TOML file")
    prompts_sub = prompts.add_subparsers(dest="prompts_command", required=True)
    for name, text in (
        ("export", "write every profile's latest version and the default to FILE (.json, or .toml)"),
        ("import", "create or update profiles (matched by name) from FILE; nothing is written if invalid"),
    ):
        cmd = prompts_sub.add_parser(name, help=text)
        cmd.add_argument("file", type=Path, metavar="FILE")
        cmd.add_argument("--database", help="default: BRIDGE_DATABASE, else BRIDGE_DATA_DIR/bridge.sqlite3")
        if name == "import":
            cmd.add_argument("--author", default="cli", help="recorded as the new versions' author")

    export = sub.add_parser("export", help="turn a recording into a stereo WAV and a timeline picture")
    export.add_argument("recording", type=Path, metavar="RECORDING")
    export.add_argument("--wav", type=Path, help="stereo WAV: left the caller, right what the caller heard")
    export.add_argument("--timeline", type=Path, help="SVG timeline of the call")
    return parser


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain: refuse new calls, let live calls finish, stop."""
    app = create_app(settings)
    runner = make_runner(app, shutdown_timeout=5.0)
    await runner.setup()
    # Workers share the port: the kernel spreads new connections among them (SO_REUSEPORT).
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=settings.worker is not None)
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


RESTART_PAUSE, RESTART_PAUSE_CAP = 1.0, 30.0
"""A worker that keeps dying is started again after 1 s, then 2, 4 … at most 30 s."""
WORKER_STARTUP = 5.0
"""A worker that ends within this long of its start failed to start (a port in use, a bad database): the
supervisor stops them all instead of starting it again and again."""


def supervise(settings: Settings) -> int:
    """``bridge serve --workers N``: run N ``bridge serve`` processes on one port and watch them.

    Each worker is this command again with ``BRIDGE_WORKER`` set to its index (its call records say
    ``host:port/N``). SIGTERM or SIGINT is passed to every worker, so they drain together; a worker that
    dies is started again, unless it failed at start-up, which stops them all. Returns the exit status:
    0 when every worker ended cleanly after a signal, else the worst worker's.
    """
    command = [sys.executable, "-m", "bridge", "serve", "--host", settings.host, "--port", str(settings.port)]
    workers: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    stopping = False
    status = 0
    failure: int | None = None

    restarts: dict[int, int] = {}

    def start(index: int) -> None:
        if stopping:  # a signal came while the workers were being started
            return
        env = {**os.environ, "BRIDGE_WORKER": str(index), "BRIDGE_WORKERS": "1"}
        workers[index] = (subprocess.Popen(command, env=env), time.monotonic())  # noqa: S603 - our own argv

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process, _ in workers.values():
            if process.returncode is None:
                # os.kill, not Popen.send_signal: that polls, and could reap a worker behind os.wait's back.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(settings.workers):
        start(index)
    log.info("bridge %s: %d workers on %s:%d", __version__, settings.workers, settings.host, settings.port)
    while workers:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:  # every worker was reaped already: nothing is left to wait for
            break
        code = os.waitstatus_to_exitcode(wait_status)
        found = next((i for i, (p, _) in workers.items() if p.pid == pid), None)
        if found is None:
            continue
        index = found
        process, started = workers.pop(index)
        process.returncode = code  # reaped here, not by Popen.wait
        if stopping:  # a worker still starting up has no handler yet: our SIGTERM ends it, with no call
            status = max(status, 0 if code == -signal.SIGTERM else abs(code))
            continue
        if code == 2 or time.monotonic() - started < WORKER_STARTUP:
            why = "a configuration error" if code == 2 else "it failed at start-up"
            log.error("worker %d ended (exit status %d, %s): stopping the others", index, code, why)
            failure = max(abs(code), 1)
            stop(signal.SIGTERM, None)
            continue
        ran_well = time.monotonic() - started > RESTART_PAUSE_CAP * 2  # a new run of bad luck: from 1 s
        restarts[index] = 1 if ran_well else restarts.get(index, 0) + 1
        pause = min(RESTART_PAUSE * 2 ** (restarts[index] - 1), RESTART_PAUSE_CAP)
        log.error(
            "worker %d ended unexpectedly (exit status %d): starting it again in %.0f s", index, code, pause
        )
        time.sleep(pause)  # the supervisor has nothing else to do; a signal still stops it (PEP 475)
        start(index)
    return status if failure is None else failure


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bridge`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "replay":
        from bridge.replay.cli import replay_command

        return replay_command(args)
    if args.command == "export":
        from bridge.recordings.cli import export_command

        return export_command(args)
    if args.command == "prompts":
        from bridge.store import cli as prompts_cli

        command = (
            prompts_cli.export_command if args.prompts_command == "export" else prompts_cli.import_command
        )
        return command(args)
    if args.command == "check":
        from bridge.check import check_command

        logs.configure("WARNING")
        return check_command(args.host, args.port)
    if args.command == "call":
        from bridge.testing.cli import call_command

        return call_command(args)
    try:
        settings = load_settings(host=args.host, port=args.port, workers=args.workers)
    except ConfigError as exc:
        print(f"bridge: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if settings.workers > 1 and settings.worker is None:
        return supervise(settings)
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

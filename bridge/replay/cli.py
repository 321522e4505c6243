"""``bridge replay``: the command-line face of :mod:`bridge.replay`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TextIO

from bridge.errors import BridgeError
from bridge.recordings import Recording
from bridge.recordings.blob import load_recording_source
from bridge.replay import ModelChoice, ReplayResult, Speed, replay_recording, run


def _progress(stream: TextIO, done: int, total: int, name: str) -> None:
    """A one-line progress bar on a terminal; a plain line per call otherwise."""
    if total < 2:
        return
    if stream.isatty():
        width = 30
        filled = int(width * done / total)
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name[:40]:<40}")
        if done == total:
            stream.write("\n")
    else:
        stream.write(f"[{done}/{total}] {name}\n")
    stream.flush()


def _report(result: ReplayResult, out: TextIO) -> None:
    verdict = "PASS" if result.passed else "FAIL"
    truncs = ", ".join(f"{item[-8:]}@{ms}ms" for item, ms in result.truncations) or "none"
    out.write(
        f"{verdict} {result.name}: {result.duration_s:.1f} s, {result.turns} turns, "
        f"{result.clears} barge-ins, truncations {truncs}, heard {result.heard_seconds:.1f} s of the model"
    )
    if max(result.model_sessions, result.recorded_sessions) > 1:
        out.write(f", {result.model_sessions} Realtime sessions (the recording {result.recorded_sessions})")
    if result.added_latency_ms:
        figures = ", ".join(f"{k} {v:.2f} ms" for k, v in result.added_latency_ms.items())
        out.write(f", bridge-added delay {figures}")
    out.write("\n")
    for line in result.divergences:
        out.write(f"    diverges: {line}\n")
    for line in result.errors:
        out.write(f"    error: {line}\n")


def _table(results: list[ReplayResult], out: TextIO) -> None:
    rows = [("recording", "result", "turns", "barge-ins", "truncations", "heard s", "problems")]
    for r in results:
        rows.append(
            (
                r.name,
                "pass" if r.passed else "FAIL",
                str(r.turns),
                str(r.clears),
                str(len(r.truncations)),
                f"{r.heard_seconds:.1f}",
                str(len(r.divergences) + len(r.errors)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")
        if index == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    passed = sum(r.passed for r in results)
    out.write(f"{passed} passed, {len(results) - passed} failed\n")


def _replay_one(recording: Recording, name: str, args: argparse.Namespace) -> ReplayResult:
    model: ModelChoice = args.model
    notes: list[str] = []
    if recording.header.caller_only and model == "recorded":
        model = "local"  # a plain Twilio capture has no model side to answer with
        notes.append("a caller-only capture: replayed against the local model, nothing to compare")
    remote = args.url is not None or model == "azure"
    speed: Speed = args.speed or ("realtime" if remote else "fast")
    if remote and speed == "fast":
        raise BridgeError("--speed fast needs the in-process bridge with the recorded or local model")
    token = (args.auth_token or os.environ.get("TWILIO_AUTH_TOKEN")) if args.url else None
    if args.url and not token:
        raise BridgeError("--url needs the bridge's auth token: --auth-token or TWILIO_AUTH_TOKEN")
    coro = replay_recording(
        recording,
        name=name,
        model="azure" if args.url else model,
        speed=speed,
        url=args.url,
        auth_token=token,
        environ=os.environ,
    )
    result = run(coro, speed=speed)
    if args.url:
        result.divergences.clear()
    for note in notes:
        logging.getLogger("bridge.replay").info("%s: %s", name, note)
    return result


def replay_command(args: argparse.Namespace) -> int:
    """``bridge replay``: exit 0 when every call passed, 1 when any diverged or failed, 2 on bad input."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results: list[ReplayResult] = []
    out = sys.stderr if args.json else sys.stdout
    total = len(args.recordings)
    for index, path in enumerate(args.recordings):
        _progress(sys.stderr, index, total, path.name)
        try:
            recording = load_recording_source(path, os.environ)  # a file, or a blob URL
            result = _replay_one(recording, path.name, args)
        except (BridgeError, OSError) as exc:
            result = ReplayResult(name=path.name, model=args.model, speed=args.speed or "fast")
            result.errors.append(str(exc))
        results.append(result)
        _report(result, out)
    _progress(sys.stderr, total, total, "done")
    if total > 1 or args.json:
        _table(results, out)
    if args.json:
        json.dump([r.to_json() for r in results], sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0 if all(r.passed for r in results) else 1

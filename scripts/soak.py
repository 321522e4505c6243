"""Soak (not a test): N calls for M minutes through the real bridge; do its resources stay flat?

``scripts/soak`` runs this with the project's virtual environment. It reuses ``scripts/bench.py`` (imported,
not copied): the bridge is started the same way, as a real ``bridge serve`` subprocess dialling the local
model (:class:`bridge.local_model.LocalModel`, ``record=False``) hosted in this process, and the callers are
the benchmark's lean Twilio doubles (signed webhook, TwiML, signed stream upgrade, 20 ms μ-law frames at
real pace, speech with barge-ins, marks echoed as playback reaches them). What is new here is the churn and
the sampling:

* ``--calls N`` calls are kept up: each lasts ``--call-seconds`` ± 50 % (at random), then hangs up as
  Twilio does (``stop``, close) and a new call is dialled in its place, for ``--minutes M``;
* every ``--interval S`` the bridge process is sampled: RSS (``/proc/PID/status`` VmRSS), open file
  descriptors (``/proc/PID/fd``), threads, asyncio tasks, and from its ``/metrics`` the live calls
  (``bridge_live_calls``) and the calls ended so far (``bridge_calls_total``);
* after the last call has hung up, the bridge is sampled once more, idle, to compare with the idle sample
  taken before the first call.

The task count needs a reading from inside the bridge's process, which ``/metrics`` does not export. So the
bridge is started as ``python -c PROBE serve --port P``: :data:`TASK_PROBE` imports ``bridge.cli``, wraps
its ``serve`` (the very coroutine ``bridge serve`` runs) to install two signal handlers on its event loop,
and calls ``bridge.cli.main``. On SIGUSR1 it writes ``len(asyncio.all_tasks())`` and glibc's heap figures
(``mallinfo2``) to a file kept open (one descriptor, there from the start); on SIGUSR2 -- sent when the
bridge is idle, before the first call and after the last -- it runs ``gc.collect()`` and ``malloc_trim(0)``
and reports where its memory is: Python objects, pymalloc's arenas, glibc's heap. ``--trace-memory`` also
runs tracemalloc in the bridge (slow) and lists what grew by allocation site from the end of the warm-up
(one more SIGUSR2, under load) to the end. Nothing else changes; ``--no-task-probe`` runs plain ``bridge
serve`` and reports neither tasks nor the memory breakdown.

The verdict: the samples of the warm-up (``--warmup``) are left out; of the rest, the mean of the first
third is compared with the mean of the last third, for RSS, descriptors, tasks and live calls. Each is
*flat* when the last third exceeds the first by no more than ``--tolerance`` per cent of the first (and at
least 2 MiB, 3 descriptors, 3 tasks, 1 call: the noise of calls coming and going); else it is *GROWING*,
and the exit status is 1. After the run, descriptors and tasks must also be back to the idle figures of the
start (the same slack).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
from bench import (
    MAX_CALLS,
    ROOT,
    Bench,
    BridgeProcess,
    Call,
    Draining,
    Options,
    _die_with_parent,
    add_common_arguments,
    bridge_env,
    free_port,
    load_speech,
    parse_prometheus,
    perf,
)

from bridge.local_model import LocalModel

TASK_PROBE = r"""
import asyncio, ctypes, gc, os, signal, sys, tempfile
import bridge.cli as cli

_fd = os.open(os.environ["SOAK_TASKS_FILE"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
_report_fd = os.open(os.environ["SOAK_REPORT_FILE"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
_serve = cli.serve
_seq = 0
_frames = int(os.environ.get("SOAK_TRACE_MEMORY") or 0)
_reference = None
if _frames:
    import tracemalloc

    tracemalloc.start(_frames)

try:  # glibc's allocator: what it has handed out and what it holds free (not returned to the system)

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks "
                    "uordblks fordblks keepcost".split()]

    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _Mallinfo2
except (OSError, AttributeError):
    _libc = None


def malloc_figures():
    if _libc is None:
        return -1, -1
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd, m.fordblks


def answer(tasks):
    global _seq
    _seq += 1
    used, free = malloc_figures()
    os.pwrite(_fd, b"%12d %12d %15d %15d\n" % (_seq, tasks, used, free), 0)


def pymalloc():
    # sys._debugmallocstats() prints to the C stderr: catch it in a file for the moment.
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
    stats = {}
    for line in text.splitlines():
        if line.startswith("# ") and "=" in line:
            key, _, value = line[2:].partition("=")
            stats.setdefault(key.strip(), int(value.strip().replace(",", "")))
    return stats.get("arenas allocated current", -1), stats.get("bytes in allocated blocks", -1)


def reclaim():
    # SIGUSR2: collect the garbage, give free memory back (malloc_trim), then report where memory is;
    # with tracemalloc on, the first time takes the reference snapshot, later ones list what grew since.
    global _reference
    freed = gc.collect()
    lines = [f"gc_freed {freed}", f"objects {len(gc.get_objects())}"]
    if _libc is not None:
        _libc.malloc_trim(0)
    arenas, blocks = pymalloc()
    used, free = malloc_figures()
    lines += [f"pymalloc_arenas {arenas}", f"pymalloc_blocks {blocks}", f"malloc_used {used}",
              f"malloc_free {free}"]
    if _frames:
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        lines.append(f"traced {tracemalloc.get_traced_memory()[0]}")
        if _reference is None:
            _reference = snap
        else:
            for s in [s for s in snap.compare_to(_reference, "traceback") if s.size_diff > 0][:12]:
                frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in s.traceback][::-1]
                where = " ← ".join(frames)  # where it was allocated ← what called that ← ...
                lines.append(f"site {s.size_diff} {s.count_diff} {where}")
    text = ("\n".join(lines) + "\n").encode()
    os.ftruncate(_report_fd, 0)
    os.pwrite(_report_fd, text, 0)
    answer(-1)


async def serve(settings):
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: answer(len(asyncio.all_tasks(loop))))
    loop.add_signal_handler(signal.SIGUSR2, reclaim)
    await _serve(settings)


cli.serve = serve
sys.argv[0] = "bridge"
sys.exit(cli.main(sys.argv[1:]))
"""
"""The bridge's entry point with probes: ``bridge.cli.main`` as ``bridge serve`` runs it, its ``serve``
coroutine wrapped to answer two signals on its event loop. SIGUSR1: ``<sequence> <len(asyncio.all_tasks())>
<malloc in use> <malloc free>`` written to ``SOAK_TASKS_FILE`` (opened once, at start). SIGUSR2
(:meth:`ProbedBridge.reclaim`): ``gc.collect()``, ``malloc_trim(0)``, then where the memory is (Python
objects, pymalloc's arenas, glibc's heap; with ``SOAK_TRACE_MEMORY=FRAMES``, tracemalloc's growth by
allocation site) written to ``SOAK_REPORT_FILE``."""


class ProbedBridge(BridgeProcess):
    """``bridge serve`` (as :class:`bench.BridgeProcess` runs it) with :data:`TASK_PROBE` around it."""

    def __init__(
        self,
        *,
        env: dict[str, str],
        port: int,
        log_path: Path,
        source: Path | None,
        probe: bool,
        trace_frames: int = 0,
    ) -> None:
        if not probe:
            super().__init__(env=env, port=port, core=None, log_path=log_path, source=source)
            self.tasks_file: Path | None = None
            self.malloc_kib: tuple[int, int] | None = None
            return
        self.tasks_file = log_path.with_name("tasks")
        self.report_file = log_path.with_name("report")
        env = env | {"SOAK_TASKS_FILE": str(self.tasks_file), "SOAK_REPORT_FILE": str(self.report_file)}
        if trace_frames:
            env["SOAK_TRACE_MEMORY"] = str(trace_frames)
        if source is not None:
            env["PYTHONPATH"] = str(source)
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TASK_PROBE, "serve", "--port", str(port)],
            env=env,
            cwd=source or ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.proc.pid
        self.clk_tck = os.sysconf("SC_CLK_TCK")
        self._seq = 0
        self.malloc_kib = None
        """glibc's ``mallinfo2`` at the last probe: KiB handed out (in use), KiB held free."""

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    async def tasks(self, sig: int = signal.SIGUSR1, wait: float = 2.0) -> int | None:
        """The bridge's ``len(asyncio.all_tasks())`` now: SIGUSR1, then the probe's answer (≤ ``wait`` s);
        it also updates :attr:`malloc_kib`. With SIGUSR2, waits for :meth:`reclaim`'s report instead."""
        if self.tasks_file is None:
            return None
        os.kill(self.pid, sig)
        deadline = perf() + wait
        while perf() < deadline:
            with contextlib.suppress(OSError, ValueError):
                seq, count, used, free = (int(x) for x in self.tasks_file.read_text().split())
                if seq > self._seq:
                    self._seq = seq
                    if used >= 0:
                        self.malloc_kib = (used // 1024, free // 1024)
                    return count
            await asyncio.sleep(0.005)
        return None

    async def reclaim(self) -> dict[str, Any] | None:
        """SIGUSR2: the bridge collects its garbage and trims its heap, then reports (see :data:`TASK_PROBE`):
        ``{"rss_kib", "gc_freed", "objects", "pymalloc_arenas", "pymalloc_blocks", "malloc_used",
        "malloc_free", "traced"?, "sites": [(bytes, blocks, where), ...]}``; ``None`` without the probe."""
        if self.tasks_file is None:
            return None
        await self.tasks(signal.SIGUSR2, wait=120.0)
        out: dict[str, Any] = {"rss_kib": self.rss_kib(), "sites": []}
        for line in self.report_file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "site":
                size, count, where = value.split(" ", 2)
                out["sites"].append((int(size), int(count), where))
            else:
                out[key] = int(value)
        return out


@dataclass(slots=True)
class Sample:
    t: float
    """Seconds since the first call was dialled (0 for the idle sample just before it)."""
    phase: str
    """``idle`` (before the first call), ``load``, or ``after`` (every call over)."""
    up: int
    """Calls this generator had up."""
    placed: int
    """Calls dialled so far."""
    ended: int | None
    """Calls the bridge has ended so far (``bridge_calls_total``)."""
    live: int | None
    """``bridge_live_calls``."""
    rss_kib: int
    fds: int
    tasks: int | None
    threads: int
    malloc_kib: tuple[int, int] | None
    """glibc's allocator in the bridge: KiB in use, KiB free (held, not returned to the system)."""


@dataclass
class SoakOptions:
    calls: int
    minutes: float
    call_seconds: float
    interval: float
    warmup: float
    tolerance: float
    task_probe: bool
    trace_memory: int


class Soak(Bench):
    """Keeps ``calls`` calls up through one bridge for the run, each replaced when it ends; samples."""

    def __init__(self, opts: Options, soak: SoakOptions, speech: dict[str, list[str]]) -> None:
        super().__init__(opts, speech)
        self.soak = soak
        self.rng = random.Random(opts.seed)
        self.placed = 0
        self.dial_failures = 0
        self.ends: dict[Call, float] = {}
        """Live calls → when they hang up (perf time)."""
        self.samples: list[Sample] = []
        self.t0 = 0.0
        self.metrics_session: aiohttp.ClientSession | None = None
        self.probed: ProbedBridge | None = None
        self.reclaimed: dict[str, dict[str, Any]] = {}
        """:meth:`ProbedBridge.reclaim`'s reports: ``idle`` (before the first call), ``reference`` (the end
        of the warm-up, with ``--trace-memory`` only), ``after`` (after the last call)."""

    def log(self, text: str) -> None:
        if self.opts.verbose:
            print(f"soak: {text}", file=sys.stderr)

    # -- calls --

    async def place(self, first: bool) -> bool:
        """Dial one call; the first ones get shorter lives too, so that their ends spread out at once."""
        i = self.placed
        self.placed += 1
        call = Call(
            i,
            random.Random(self.opts.seed * 100_003 + i),
            "CA" + secrets.token_hex(16),
            "MZ" + secrets.token_hex(16),
            self.rng.randrange(len(self.slots)),
        )
        try:
            await self.dial(call)
        except Draining:
            raise
        except Exception as exc:
            self.dial_failures += 1
            if self.dial_failures <= 3:
                print(f"soak: call {i} failed to dial: {exc!r}", file=sys.stderr)
            if call.ws is not None:
                call.ws.close()
            return False
        low = 0.1 if first else 0.5
        self.calls.append(call)
        self.ends[call] = perf() + self.soak.call_seconds * self.rng.uniform(low, 1.5)
        return True

    def hang_up_one(self, call: Call) -> None:
        """The caller hangs up as Twilio does (``stop``, then the socket closes); the call is forgotten."""
        alive, call.alive = call.alive, False
        ws = call.ws
        if alive and ws is not None and not ws.closed:
            stop = {
                "event": "stop",
                "sequenceNumber": str(call.seq + 1),
                "streamSid": call.stream_sid,
                "stop": {"accountSid": "AC" + "0" * 32, "callSid": call.call_sid},
            }
            ws.send_text(orjson.dumps(stop).decode())
            ws.close()
        self.forget(call)

    def forget(self, call: Call) -> None:
        with contextlib.suppress(ValueError):
            self.slots[call.slot].remove(call)
        with contextlib.suppress(ValueError):
            self.calls.remove(call)
        self.ends.pop(call, None)
        call.pending_marks.clear()
        call.sent_times.clear()

    async def churn(self, until: float) -> None:
        """Until ``until``: hang up the calls whose time is up (or the bridge ended); dial new ones."""
        first = True
        while perf() < until:
            now = perf()
            for call, end in list(self.ends.items()):
                if not call.alive or now >= end:
                    self.hang_up_one(call)
            while len(self.calls) < self.soak.calls and perf() < until:
                placed = await self.place(first)
                self.check_bridge()
                if not placed:
                    break  # try again in a moment
            first = False
            await asyncio.sleep(0.05)

    # -- sampling --

    async def scrape_quietly(self) -> dict[str, float]:
        """``/metrics`` on a connection closed after each request (no keep-alive descriptor left behind)."""
        assert self.metrics_session is not None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.metrics_session.get(self.base_url + "/metrics") as resp:
                return parse_prometheus(await resp.text())
        return {}

    async def take(self, phase: str) -> Sample:
        bridge = self.probed
        assert bridge is not None
        self.check_bridge()
        # The process's own figures first: the /metrics request below adds a connection and a task.
        tasks = await bridge.tasks()
        fds, rss, threads = bridge.fds(), bridge.rss_kib(), bridge.status("Threads")
        metrics = await self.scrape_quietly()
        ended = [v for k, v in metrics.items() if k.startswith("bridge_calls_total")]
        live = metrics.get("bridge_live_calls")
        sample = Sample(
            t=round(perf() - self.t0, 1) if self.t0 else 0.0,
            phase=phase,
            up=sum(c.alive for c in self.calls),
            placed=self.placed,
            ended=int(sum(ended)) if metrics else None,
            live=None if live is None else int(live),
            rss_kib=rss,
            fds=fds,
            tasks=tasks,
            threads=threads,
            malloc_kib=bridge.malloc_kib if tasks is not None else None,
        )
        self.samples.append(sample)
        return sample

    async def sampler(self) -> None:
        interval = self.soak.interval
        next_at = self.t0 + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - perf()))
            next_at = max(next_at + interval, perf() + interval / 2)  # after a stall: no burst of samples
            s = await self.take("load")
            if self.soak.trace_memory and s.t >= self.soak.warmup and "reference" not in self.reclaimed:
                assert self.probed is not None
                report = await self.probed.reclaim()  # tracemalloc's reference snapshot
                if report is not None:
                    self.reclaimed["reference"] = report
            for conn in [c for c in self.by_conn if c.closed.is_set()]:
                del self.by_conn[conn]  # the model has closed it: no event will come from it any more
            self.log(
                f"t={s.t:.0f} s: {s.up} calls up, {s.placed} placed, bridge: {s.live} live, "
                f"RSS {s.rss_kib / 1024:.1f} MiB, {s.fds} fds, {s.tasks} tasks"
            )

    async def settle(self) -> None:
        """Until the bridge's descriptors and tasks have not changed for 0.5 s (at most 10 s): at start-up
        it renders its greetings with the model, and a connection just closed on our side may still be open
        on its side for a moment."""
        bridge = self.probed
        assert bridge is not None
        deadline = perf() + 10.0
        seen, same = (bridge.fds(), await bridge.tasks()), 0
        while same < 5 and perf() < deadline:
            await asyncio.sleep(0.1)
            now = (bridge.fds(), await bridge.tasks())
            same = same + 1 if now == seen else 0
            seen = now

    async def wait_idle(self, fds: int, tasks: int | None) -> None:
        """After the last hang-up: until the bridge has no live call and its descriptors and tasks are at
        most what they were idle before the first call (at most 30 s; the sample then shows what is left)."""
        bridge = self.probed
        assert bridge is not None
        slack = 0
        deadline = perf() + 30.0
        while perf() < deadline:
            metrics = await self.scrape_quietly()
            count = await bridge.tasks()
            if (
                metrics.get("bridge_live_calls", 1) == 0
                and bridge.fds() <= fds + slack
                and (tasks is None or count is None or count <= tasks + slack)
            ):
                return
            await asyncio.sleep(0.2)

    # -- the run --

    async def soak_run(self) -> list[Sample]:
        opts, soak = self.opts, self.soak
        tmp = Path(tempfile.mkdtemp(prefix="bridge-soak-"))
        model = LocalModel(
            api_key="soak-api-key",
            record=False,
            fast_appends=True,
            on_client_event=self.on_client_event,
            on_server_event=self.on_server_event,
        )
        ticker: asyncio.Task[None] | None = None
        try:
            await model.start()
            port = free_port()
            self.base_url = f"http://127.0.0.1:{port}"
            env = bridge_env(model.endpoint, self.base_url, self.auth_token, tmp, opts.audio_path, soak.calls)
            self.probed = self.bridge = ProbedBridge(
                env=env,
                port=port,
                log_path=tmp / "bridge.log",
                source=opts.bridge_source,
                probe=soak.task_probe,
                trace_frames=soak.trace_memory,
            )
            # Every request but the webhooks goes on a connection closed after it, so that the idle figures
            # (before the first call, after the last) count no keep-alive connection of ours.
            self.metrics_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=10)
            )
            self.session = self.metrics_session
            await self.wait_ready()
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            await self.settle()
            report = await self.probed.reclaim()
            if report is not None:
                self.reclaimed["idle"] = report
            idle = await self.take("idle")
            self.log(f"bridge idle: RSS {idle.rss_kib / 1024:.1f} MiB, {idle.fds} fds, {idle.tasks} tasks")
            ticker = asyncio.create_task(self.ticker([]), name="ticker")
            self.t0 = perf()
            sampler = asyncio.create_task(self.sampler(), name="sampler")
            try:
                await self.churn(self.t0 + soak.minutes * 60)
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            self.log(f"{soak.minutes:g} min over; hanging up {len(self.calls)} calls")
            for call in list(self.calls):
                self.hang_up_one(call)
            await self.session.close()  # and its keep-alive connections to the bridge
            self.session = None
            await self.wait_idle(idle.fds, idle.tasks)
            await self.settle()
            after = await self.take("after")
            self.log(f"bridge idle again: RSS {after.rss_kib / 1024:.1f} MiB, {after.fds} fds")
            report = await self.probed.reclaim()
            if report is not None:
                self.reclaimed["after"] = report
            return self.samples
        finally:
            self.stopping = True
            for call in list(self.calls):
                if call.ws is not None:
                    call.ws.close()
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            for session in {self.session, self.metrics_session}:
                if session is not None:
                    await session.close()
            if self.bridge is not None:
                await asyncio.to_thread(self.bridge.stop)
            await model.close()
            if opts.keep:
                print(f"soak: kept {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)


# --- the verdict -------------------------------------------------------------------------------------------

FLOORS = {"RSS (MiB)": 2.0, "open fds": 3.0, "asyncio tasks": 3.0, "live calls": 1.0}
"""The least growth tolerated per figure, whatever ``--tolerance`` says: the noise of calls coming and going
(a sample may fall while a call is being dialled or hung up; one call is ~2-3 descriptors, ~5 tasks)."""


def figures(s: Sample) -> dict[str, float | None]:
    return {
        "RSS (MiB)": s.rss_kib / 1024,
        "open fds": s.fds,
        "asyncio tasks": s.tasks,
        "live calls": s.live,
    }


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def verdict(samples: list[Sample], warmup: float, tolerance: float) -> tuple[bool, list[str]]:
    """(flat?, Markdown lines): first third against last third after the warm-up, and idle against idle."""
    steady = [s for s in samples if s.phase == "load" and s.t >= warmup]
    third = len(steady) // 3
    if third < 1:
        return False, [f"**Too few samples after the warm-up ({len(steady)}): no verdict.** Run longer."]
    first, last = steady[:third], steady[-third:]
    lines = [
        f"After the {warmup:g} s warm-up: {len(steady)} samples; mean of the first {third} "
        f"(t = {first[0].t:g}-{first[-1].t:g} s) against the last {third} "
        f"(t = {last[0].t:g}-{last[-1].t:g} s).",
        "",
        "| figure | first third | last third | change | tolerated | |",
        "|---|---|---|---|---|---|",
    ]
    flat = True
    growing: list[str] = []
    for name, floor in FLOORS.items():
        a_values = [v for s in first if (v := figures(s)[name]) is not None]
        b_values = [v for s in last if (v := figures(s)[name]) is not None]
        if not a_values or not b_values:
            lines.append(f"| {name} | – | – | – | – | not measured |")
            continue
        a, b = mean(a_values), mean(b_values)
        allowed = max(floor, a * tolerance / 100)
        ok = b - a <= allowed
        flat &= ok
        word = "flat" if ok else "**GROWING**"
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {b - a:+.1f} | +{allowed:.1f} | {word} |")
        if not ok:
            growing.append(f"{name} {a:.1f} → {b:.1f} ({b - a:+.1f}, tolerated +{allowed:.1f})")
    idle = next((s for s in samples if s.phase == "idle"), None)
    after = next((s for s in samples if s.phase == "after"), None)
    if idle is not None and after is not None:
        back = [
            ("open fds", idle.fds, after.fds, FLOORS["open fds"]),
            ("asyncio tasks", idle.tasks, after.tasks, FLOORS["asyncio tasks"]),
        ]
        for name, before, now, slack in back:
            if before is None or now is None:
                continue
            ok = now - before <= slack
            flat &= ok
            if not ok:
                growing.append(f"{name} idle {before} before the calls, {now} after them")
        lines += [
            "",
            f"Idle before the first call → after the last: RSS {idle.rss_kib / 1024:.1f} → "
            f"{after.rss_kib / 1024:.1f} MiB, open fds {idle.fds} → {after.fds}, asyncio tasks "
            f"{cell(idle.tasks)} → {cell(after.tasks)}, "
            f"live calls {after.live}.",
        ]
    lines += ["", "**Verdict: flat.**" if flat else "**Verdict: GROWING**: " + "; ".join(growing) + "."]
    return flat, lines


def cell(v: int | None) -> str:
    return "–" if v is None else str(v)


def table(samples: list[Sample]) -> list[str]:
    lines = [
        "| t (s) | phase | calls up | calls placed | calls ended | live calls (/metrics) | RSS (MiB) "
        "| open fds | asyncio tasks | threads | malloc in use / free (MiB) |",
        "|" + "---|" * 11,
    ]
    for s in samples:
        heap = "–" if s.malloc_kib is None else f"{s.malloc_kib[0] / 1024:.1f} / {s.malloc_kib[1] / 1024:.1f}"
        lines.append(
            f"| {s.t:g} | {s.phase} | {s.up} | {s.placed} | {cell(s.ended)} | {cell(s.live)} "
            f"| {s.rss_kib / 1024:.1f} | {s.fds} | {cell(s.tasks)} | {s.threads} | {heap} |"
        )
    return lines


NOTES = {
    "unmapped model connections": "model sessions of no call (at start-up the bridge has the model render "
    "its greeting and hold prompt)"
}


def memory_lines(run: Soak) -> list[str]:
    """Where the bridge's memory is, idle before the calls and after them, each time just after
    ``gc.collect()`` and ``malloc_trim(0)``; with ``--trace-memory``, what grew since the warm-up."""
    before, after = run.reclaimed.get("idle"), run.reclaimed.get("after")
    if before is None or after is None:
        return []
    mib = 1 / 2**20
    rows = [
        ("RSS (MiB)", before["rss_kib"] / 1024, after["rss_kib"] / 1024),
        ("pymalloc arenas (MiB, 1 MiB each)", before["pymalloc_arenas"], after["pymalloc_arenas"]),
        ("… of which objects (MiB)", before["pymalloc_blocks"] * mib, after["pymalloc_blocks"] * mib),
        ("malloc in use (MiB)", before["malloc_used"] * mib, after["malloc_used"] * mib),
        (
            "malloc free, kept after malloc_trim (MiB)",
            before["malloc_free"] * mib,
            after["malloc_free"] * mib,
        ),
        ("Python objects tracked by gc", before["objects"], after["objects"]),
    ]
    if "traced" in after and "reference" in run.reclaimed:
        rows.append(
            (
                "tracemalloc, traced (MiB; before: at the warm-up's end)",
                run.reclaimed["reference"]["traced"] * mib,
                after["traced"] * mib,
            )
        )
    lines = [
        "Where the memory is, idle, just after `gc.collect()` and `malloc_trim(0)` in the bridge:",
        "",
        "| | before the first call | after the last call | change |",
        "|---|---|---|---|",
    ]
    for name, a, b in rows:
        if a < 0 or b < 0:  # pymalloc's figures are not to be had while tracemalloc hooks the allocator
            lines.append(f"| {name} | – | – | – |")
        elif isinstance(a, int) and isinstance(b, int):
            lines.append(f"| {name} | {a} | {b} | {b - a:+d} |")
        else:
            lines.append(f"| {name} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    sites = after.get("sites") or []
    if sites:
        lines += [
            "",
            "Grown since the end of the warm-up (tracemalloc), by allocation site:",
            "",
            "| KiB | blocks | allocated at ← called from |",
            "|---|---|---|",
        ]
        lines += [f"| {size / 1024:.1f} | {count:+d} | {where} |" for size, count, where in sites]
    return lines


# --- command line ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/soak",
        description="N concurrent simulated Twilio calls for M minutes through the real bridge (each call "
        "replaced when it ends); reports RSS, open fds, asyncio tasks and live calls over time and whether "
        "they stayed flat (exit 0) or grew (exit 1).",
    )
    p.add_argument("--calls", type=int, default=20, help="concurrent calls kept up (default 20)")
    p.add_argument("--minutes", type=float, default=3.0, help="how long, in minutes (default 3)")
    p.add_argument(
        "--call-seconds", type=float, default=20.0, help="mean call length, s (each ±50 %%; default 20)"
    )
    p.add_argument("--interval", type=float, help="s between samples (default: the run / 30, at least 2)")
    p.add_argument(
        "--warmup",
        type=float,
        help="s of samples left out of the verdict (default 1.5 × --call-seconds or 10 %% of the run, "
        "whichever is longer, at most half the run)",
    )
    p.add_argument(
        "--tolerance", type=float, default=5.0, help="growth tolerated, %% of the first third (default 5)"
    )
    p.add_argument("--audio-path", choices=("pcm16", "g711_ulaw"), default="pcm16")
    p.add_argument("--barge", type=float, default=0.4, help="share of turns that talk over the reply")
    p.add_argument("--no-task-probe", action="store_true", help="run plain `bridge serve` (no task count)")
    p.add_argument(
        "--trace-memory",
        type=int,
        default=0,
        metavar="FRAMES",
        help="diagnosis: run tracemalloc in the bridge (FRAMES frames per allocation; slows it) and list "
        "what grew from the end of the warm-up to the end, by allocation site",
    )
    add_common_arguments(p)
    args = p.parse_args(argv)
    if not 1 <= args.calls <= MAX_CALLS:
        p.error(f"--calls must be from 1 to {MAX_CALLS}")
    if args.minutes <= 0 or args.call_seconds <= 0:
        p.error("--minutes and --call-seconds must be positive")
    run = args.minutes * 60
    if args.interval is None:
        args.interval = max(2.0, run / 30)
    if args.warmup is None:
        args.warmup = min(max(1.5 * args.call_seconds, 0.1 * run), 0.5 * run)
    if args.interval <= 0 or args.warmup < 0:
        p.error("--interval must be positive and --warmup not negative")
    return args


async def amain(args: argparse.Namespace) -> Soak:
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    opts = Options(
        calls=args.calls,
        duration=args.minutes * 60,
        ramp=None,
        warmup=args.warmup,
        audio_path=args.audio_path,
        dialect="ga",
        barge=args.barge,
        pin=False,
        profile=False,
        seed=args.seed,
        keep=args.keep,
        verbose=not args.quiet,
        bridge_source=args.bridge_source.resolve() if args.bridge_source else None,
    )
    soak = SoakOptions(
        calls=args.calls,
        minutes=args.minutes,
        call_seconds=args.call_seconds,
        interval=args.interval,
        warmup=args.warmup,
        tolerance=args.tolerance,
        task_probe=not args.no_task_probe,
        trace_memory=args.trace_memory,
    )
    run = Soak(opts, soak, load_speech())
    await run.soak_run()
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the bridge inherits it
    try:
        run = uvloop.run(amain(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("soak: interrupted", file=sys.stderr)
        return 130
    samples = run.samples
    flat, lines = verdict(samples, args.warmup, args.tolerance)
    head = (
        f"`scripts/soak --calls {args.calls} --minutes {args.minutes:g}`: {args.calls} calls kept up, "
        f"each {args.call_seconds:g} s ± 50 %, sampled every {args.interval:g} s."
    )
    print("\n".join([head, "", *table(samples), "", *lines]))
    memory = memory_lines(run)
    if memory:
        print("\n".join(["", *memory]))
    notes = [f"- {NOTES.get(k, k)}: {v}" for k, v in run.counts.items() if v]
    if run.dial_failures:
        notes.append(f"- calls that failed to dial: {run.dial_failures}")
    if notes:
        print("\n".join(["", "Notes:", *notes]))
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())

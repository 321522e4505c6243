"""Benchmark (not a test): N concurrent simulated Twilio calls through the real bridge and the local model.

``scripts/bench`` runs this with the project's virtual environment. The bridge is started as a real
subprocess (``bridge serve``) pinned to core 0 with ``taskset``; this process pins itself to core 1 and
hosts everything else on one uvloop event loop:

* the local Realtime model (:class:`bridge.local_model.LocalModel`, ``record=False``) that the bridge dials
  as its "Azure" endpoint, observed through its ``on_client_event`` / ``on_server_event`` hooks;
* N lean Twilio doubles: each signs and posts the voice webhook, reads the TwiML, opens the stream with
  a signed upgrade, sends ``connected`` and ``start``, then streams 20 ms μ-law frames at real pace
  (speech, then silence, then speech again ...), plays what the bridge sends at real pace and echoes
  its marks as Twilio does (when playback reaches them; at once, all of them, on ``clear``). The stream
  sockets are a minimal WebSocket client of our own (:class:`WsClient`, an asyncio protocol: no task,
  no queue, no await per message), and one ticker task sends every call's frames and every due mark
  echo, on a 1 ms grid with the calls' 20 ms phases spread over it, rather than one timer per call;
* a loopback probe (the same client ⇄ a websockets server inside this process, no bridge) that measures
  what this process alone adds to a message, so that generator lag can be told from bridge delay.

Every time is ``time.perf_counter()`` in this one process (the doubles and the model share it), so a
delay is the difference of two readings of one clock. docs/benchmark.md explains the method and has
the results.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import gc
import hashlib
import heapq
import math
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import orjson
import pybase64
import uvloop
from twilio.request_validator import RequestValidator
from websockets.asyncio.server import ServerConnection, serve

from bridge.local_model import LocalModel, ModelConnection

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
VOICE_PATH = "/twilio/voice"
FRAME_BYTES = 160
FRAME_S = 0.020
SLOT_S = 0.001
SLOTS = 20  # 1 ms slots over one 20 ms frame period: every call's sends fall in one of them
RESAMPLER_TAIL = 30
"""μ-law samples the bridge's outbound resampler emits at the end of a response (its group delay)."""
DELTA_NAMES = {"ga": "response.output_audio.delta", "preview": "response.audio.delta"}
PREVIEW_API_VERSION = "2025-04-01-preview"
MAX_CALLS = 500
perf = time.perf_counter


# --- audio -------------------------------------------------------------------------------------------------


def _ulaw_encode(pcm: np.ndarray[Any, np.dtype[np.float64]]) -> bytes:
    """Float samples in [-1, 1] → G.711 μ-law (the continuous formula; fine for a synthetic stand-in)."""
    x = np.clip(pcm, -1.0, 1.0)
    y = np.sign(x) * np.log1p(255.0 * np.abs(x)) / np.log1p(255.0)
    code = np.round((y + 1.0) / 2.0 * 255.0).astype(np.int32)
    out: bytes = np.where(code >= 128, 255 - (code - 128), 127 - code).astype(np.uint8).tobytes()
    return out


def _synthetic_speech(seconds: float, seed: int) -> bytes:
    """Loud tone bursts (syllables of a harmonic tone around -20 dBFS), for when the fixtures are missing."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 8000)) / 8000.0
    f0 = 140.0 + 40.0 * rng.random()
    voice = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    syllables = 0.5 * (1 - np.cos(2 * np.pi * 4.0 * t))  # four syllables a second
    return _ulaw_encode(0.15 * voice * syllables)


def _frames_b64(ulaw: bytes) -> list[str]:
    """Cut into 160-byte frames (the last padded with μ-law silence), each base64 once, ahead of time."""
    frames = [ulaw[i : i + FRAME_BYTES] for i in range(0, len(ulaw), FRAME_BYTES)]
    return [pybase64.b64encode_as_string(f.ljust(FRAME_BYTES, b"\xff")) for f in frames]


def load_speech() -> dict[str, list[str]]:
    """The utterances callers say: the test fixtures when present, else synthetic speech."""
    out: dict[str, list[str]] = {}
    for seed, (name, seconds) in enumerate((("hello", 1.7), ("question", 2.3), ("interrupt", 2.7))):
        path = FIXTURES / f"{name}.ulaw"
        out[name] = _frames_b64(path.read_bytes() if path.is_file() else _synthetic_speech(seconds, seed))
    return out


SILENCE_B64 = pybase64.b64encode_as_string(b"\xff" * FRAME_BYTES)


def b64_len(text: str) -> int:
    """Decoded length of a base64 string, without decoding it."""
    pad = 2 if text.endswith("==") else 1 if text.endswith("=") else 0
    return len(text) // 4 * 3 - pad


# --- statistics --------------------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary_ms(values: list[float]) -> dict[str, Any]:
    p50, p99 = quantile(values, 0.5), quantile(values, 0.99)
    return {
        "n": len(values),
        "p50_ms": None if p50 is None else round(p50 * 1000, 3),
        "p99_ms": None if p99 is None else round(p99 * 1000, 3),
        "max_ms": round(max(values) * 1000, 3) if values else None,
    }


def parse_prometheus(text: str) -> dict[str, float]:
    """``name{labels} value`` lines → {``name{labels}``: value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def histogram_quantiles(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, Any]:
    """p50/p99 of a Prometheus histogram over the window (after − before), by linear interpolation in
    the bucket that holds the quantile; a quantile in the +Inf bucket is reported as "> last bound"."""
    pattern = re.compile(re.escape(name) + r'_bucket\{le="([^"]+)"\}')
    buckets: list[tuple[float, float]] = []
    for key, value in after.items():
        m = pattern.fullmatch(key)
        if m:
            le = math.inf if m.group(1) == "+Inf" else float(m.group(1))
            buckets.append((le, value - before.get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    out: dict[str, Any] = {"n": int(total)}
    for label, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
        if not total:
            out[label] = None
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for le, cumulative in buckets:
            if cumulative >= rank:
                if math.isinf(le):
                    out[label] = f"> {lower * 1000:g}"
                else:
                    share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
                    out[label] = round((lower + (le - lower) * share) * 1000, 3)
                break
            lower, below = le, cumulative
    return out


# --- the bridge process ------------------------------------------------------------------------------------


def cpu_times() -> dict[str, float]:
    """Seconds so far of all CPUs together, from /proc/stat: process time (user, nice, system), interrupt
    handling (irq, softirq: mostly the loopback network here) and steal (the hypervisor's)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return {"process": (v[0] + v[1] + v[2]) / tick, "irq": (v[5] + v[6]) / tick, "steal": v[7] / tick}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Draining(RuntimeError):
    """The bridge answers calls with its polite refusal: it is shutting down."""


class BridgeProcess:
    """``bridge serve`` as a subprocess (pinned with taskset); always terminated by :meth:`stop`."""

    def __init__(
        self, *, env: dict[str, str], port: int, core: int | None, log_path: Path, source: Path | None
    ) -> None:
        cmd = [str(ROOT / ".venv" / "bin" / "bridge"), "serve", "--port", str(port)]
        if source is not None or not Path(cmd[0]).exists():
            cmd = [sys.executable, "-m", "bridge", "serve", "--port", str(port)]
        if source is not None:  # another checkout of the bridge (e.g. a `git archive` of a commit)
            env = env | {"PYTHONPATH": str(source)}
        if core is not None:
            cmd = ["taskset", "-c", str(core), *cmd]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=source or ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.proc.pid
        self.clk_tck = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (every thread), from /proc/PID/stat."""
        raw = Path(f"/proc/{self.pid}/stat").read_text()
        rest = raw[raw.rindex(")") + 2 :].split()
        return (int(rest[11]) + int(rest[12])) / self.clk_tck

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def rss_kib(self) -> int:
        return self.status("VmRSS")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; idempotent."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# --- a minimal WebSocket client ---------------------------------------------------------------------------

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WsClient(asyncio.Protocol):
    """Just enough of an RFC 6455 client for a Twilio double, as cheap as can be: text frames out, masked
    with a zero key (a client must mask; the key's value is free), and text, ping and close frames in,
    handed to ``on_text(text, receive_time)`` from ``data_received`` -- no task, queue or await per message.
    """

    def __init__(self, on_text: Callable[[str, float], None], on_close: Callable[[], None]) -> None:
        self.on_text = on_text
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.paused = False
        self._key = b""
        self._buf = bytearray()
        self._fragments: list[bytes] = []

    @classmethod
    async def connect(cls, url: str, headers: dict[str, str], **callbacks: Any) -> WsClient:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(lambda: cls(**callbacks), host, port)
        client._key = base64.b64encode(secrets.token_bytes(16))
        lines = [
            f"GET {parts.path or '/'} HTTP/1.1",
            f"Host: {parts.netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {client._key.decode()}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        assert client.transport is not None
        client.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await asyncio.wait_for(client.opened, 30)
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during the handshake: {exc!r}"))
        self.on_close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def send_text(self, text: str) -> None:
        if self.closed or self.transport is None:
            return
        data = text.encode()
        n = len(data)
        if n < 126:
            head = bytes((0x81, 0x80 | n))
        elif n < 65536:
            head = b"\x81\xfe" + n.to_bytes(2, "big")
        else:
            head = b"\x81\xff" + n.to_bytes(8, "big")
        self.transport.write(head + b"\0\0\0\0" + data)

    def close(self, code: int = 1000) -> None:
        if self.closed or self.transport is None:
            return
        self.transport.write(b"\x88\x82\0\0\0\0" + code.to_bytes(2, "big"))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        now = perf()
        buf = self._buf
        buf += data
        if not self.opened.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1")
            del buf[: end + 4]
            accept = base64.b64encode(hashlib.sha1(self._key + _WS_GUID).digest()).decode()
            if not head.startswith("HTTP/1.1 101") or accept not in head:
                self.opened.set_exception(ConnectionError(f"upgrade refused: {head.splitlines()[0]!r}"))
                assert self.transport is not None
                self.transport.close()
                return
            self.opened.set_result(None)
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, pos = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, pos = int.from_bytes(buf[2:10], "big"), 10
            mask = b""
            if b1 & 0x80:  # servers do not mask; tolerate it anyway
                mask, pos = bytes(buf[pos : pos + 4]), pos + 4
            if len(buf) < pos + n:
                return
            payload = bytes(buf[pos : pos + n])
            del buf[: pos + n]
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode, fin = b0 & 0x0F, b0 & 0x80
            if opcode in (0x0, 0x1):
                self._fragments.append(payload)
                if fin:
                    text = b"".join(self._fragments).decode()
                    self._fragments.clear()
                    self.on_text(text, now)
            elif opcode == 0x9 and self.transport is not None:  # ping: pong
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            elif opcode == 0x8 and self.transport is not None:  # close: answer and drop the connection
                self.close(1000)
                return


# --- the calls ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Response:
    """One model response of one call, as the model sent it."""

    samples: int = 0
    """Samples of audio in its deltas (24 kHz PCM16 or 8 kHz μ-law) sent before any speech_started."""
    base: int | None = None
    """Where its audio starts in the μ-law the double receives (bytes since the call began)."""
    stopped: bool = False
    """A speech_started came while it ran: the model cancels it, the bridge drops its later deltas."""


@dataclass(slots=True, eq=False)
class Call:
    index: int
    rng: random.Random
    call_sid: str
    stream_sid: str
    slot: int
    ws: WsClient | None = None
    conn: ModelConnection | None = None
    seq: int = 0
    chunk: int = 0
    timestamp: int = 0
    next_due: float = 0.0
    alive: bool = False
    ended_by_bridge: bool = False
    # What the caller says.
    utterance: list[str] | None = None
    position: int = 0
    next_utterance: list[str] | None = None
    next_utterance_at: float | None = None
    waiting_for_reply: bool = False
    speech_end: float = 0.0
    rx_at_speech_end: int = 0
    # Inbound accounting.
    sent_times: deque[float] = field(default_factory=deque)
    frames_sent: int = 0
    appends: int = 0
    # Outbound: what the double received and played.
    rx_bytes: int = 0
    frames_rx: int = 0
    play_end: float = 0.0
    pending_marks: deque[str] = field(default_factory=deque)
    generation: int = 0
    clears: int = 0
    targets: deque[tuple[int, float, Response]] = field(default_factory=deque)
    """Outbound probes: (μ-law byte position, time the model sent the delta that starts there, reply)."""
    # Outbound: what the model sent.
    responses: list[Response] = field(default_factory=list)
    current: Response | None = None
    expected_out: int = 0
    speech_started_at: float | None = None
    media_prefix: str = ""
    media_overhead: int = 0


@dataclass
class Options:
    calls: int
    duration: float
    ramp: float | None
    warmup: float
    audio_path: str
    dialect: str
    barge: float
    pin: bool
    profile: bool
    seed: int
    keep: bool
    verbose: bool
    bridge_source: Path | None


class Bench:
    """One run at one number of calls: start the bridge, ramp up, measure, wind down, report."""

    def __init__(self, opts: Options, speech: dict[str, list[str]]) -> None:
        self.opts = opts
        self.speech = speech
        self.loop = asyncio.get_running_loop()
        self.auth_token = secrets.token_hex(16)
        self.validator = RequestValidator(self.auth_token)
        self.delta_name = DELTA_NAMES[opts.dialect]
        self.pcm16 = opts.audio_path == "pcm16"
        self.calls: list[Call] = []
        self.slots: list[list[Call]] = [[] for _ in range(SLOTS)]
        self.by_conn: dict[ModelConnection, Call | None] = {}
        self.awaiting: Call | None = None
        self.mapped: asyncio.Future[None] | None = None
        self.mark_heap: list[tuple[float, int, Call, int]] = []
        self.mark_counter = 0
        self.sending = True
        self.winding_down = False
        self.stopping = False
        self.win_start = math.inf
        self.win_end = math.inf
        # Samples (seconds).
        self.inbound: list[float] = []
        self.outbound: list[float] = []
        self.clear: list[float] = []
        self.tick_lag: list[float] = []
        self.gc_pauses: list[float] = []
        self.gc_started = 0.0
        self.probe_in: list[float] = []
        self.probe_out: list[float] = []
        self.counts: defaultdict[str, int] = defaultdict(int)
        self.setup: dict[str, list[float]] = {"webhook": [], "model": [], "stream": []}
        """Call set-up times: POST → TwiML; TwiML → the model's first event; the stream's upgrade."""
        self.session: aiohttp.ClientSession | None = None
        self.bridge: BridgeProcess | None = None
        self.base_url = ""
        self.tasks: list[asyncio.Task[Any]] = []

    # -- hooks on the local model (called for every event: keep them cheap) --

    def on_client_event(self, conn: ModelConnection, event: dict[str, Any]) -> None:
        call = self.by_conn.get(conn, self)  # self: never seen
        if call is self:
            call = self.awaiting
            self.by_conn[conn] = call
            if call is None:
                self.counts["unmapped model connections"] += 1
                return
            call.conn = conn
            self.awaiting = None
            if self.mapped is not None and not self.mapped.done():
                self.mapped.set_result(None)
        if call is None:
            return
        assert isinstance(call, Call)
        if event.get("type") == "input_audio_buffer.append":
            now = perf()
            call.appends += 1
            if call.sent_times:
                sent = call.sent_times.popleft()
                if self.win_start <= sent < self.win_end:
                    self.inbound.append(now - sent)

    def on_server_event(self, conn: ModelConnection, event: dict[str, Any]) -> None:
        call = self.by_conn.get(conn)
        if call is None:
            return
        kind = event["type"]
        if kind == self.delta_name:
            r = call.current
            if r is None or r.stopped:
                self.counts["deltas after speech_started (the bridge drops them)"] += r is not None
                return
            now = perf()
            n = b64_len(event["delta"])
            samples = n // 2 if self.pcm16 else n
            if r.base is None:
                # Where this reply starts in what the double receives: after every earlier reply's audio
                # as the bridge frames it (see response.done). Exact while no frame is lost, and right
                # even when earlier frames are still on their way.
                r.base = call.expected_out
            before = -(-r.samples // 3) if self.pcm16 else r.samples
            r.samples += samples
            after = -(-r.samples // 3) if self.pcm16 else r.samples
            if after - before >= FRAME_BYTES and self.win_start <= now < self.win_end:
                call.targets.append((r.base + before, now, r))
        elif kind == "input_audio_buffer.speech_started":
            call.speech_started_at = perf()
            if call.current is not None:
                call.current.stopped = True
        elif kind == "response.created":
            call.current = Response()
            call.responses.append(call.current)
        elif kind == "response.done":
            r = call.current
            call.current = None
            if r is not None:
                out = -(-r.samples // 3) if self.pcm16 else r.samples
                if r.stopped:
                    frames = out // FRAME_BYTES
                elif out:
                    frames = -(-(out + (RESAMPLER_TAIL if self.pcm16 else 0)) // FRAME_BYTES)
                else:
                    frames = 0
                call.expected_out += frames * FRAME_BYTES
                if r.stopped and r.base is not None:
                    # The bridge sends no partial frame of a cut reply: forget positions it never reaches.
                    end = r.base + frames * FRAME_BYTES
                    call.targets = deque(t for t in call.targets if t[2] is not r or t[0] < end)

    # -- what the doubles receive --

    def on_text(self, call: Call, data: str, now: float) -> None:
        """One message from the bridge on a call's stream; media is counted without parsing its JSON."""
        if data.startswith(call.media_prefix) and data.endswith('"}}'):
            pad = 2 if data.endswith('=="}}') else 1 if data.endswith('="}}') else 0
            self.on_media(call, (len(data) - call.media_overhead) // 4 * 3 - pad, now)
            return
        message = orjson.loads(data)
        event = message.get("event")
        if event == "mark":
            self.on_mark(call, message["mark"]["name"], now)
        elif event == "clear":
            self.on_clear(call, now)
        elif event == "media":
            self.on_media(call, b64_len(message["media"]["payload"]), now)
        else:
            self.counts[f"unexpected outbound event {event!r}"] += 1

    def on_closed(self, call: Call) -> None:
        if call.alive and not self.stopping:
            self.counts["calls closed by the bridge"] += 1
            call.ended_by_bridge = True
        call.alive = False

    def on_media(self, call: Call, nbytes: int, now: float) -> None:
        call.rx_bytes += nbytes
        call.frames_rx += 1
        call.play_end = max(now, call.play_end) + nbytes / 8000.0
        targets = call.targets
        while targets and targets[0][0] < call.rx_bytes:
            self.outbound.append(now - targets.popleft()[1])

    def on_mark(self, call: Call, name: str, now: float) -> None:
        if call.play_end <= now and not call.pending_marks:
            self.echo(call, name)  # nothing is playing: Twilio echoes at once
            return
        call.pending_marks.append(name)
        self.mark_counter += 1
        heapq.heappush(self.mark_heap, (max(now, call.play_end), self.mark_counter, call, call.generation))

    def on_clear(self, call: Call, now: float) -> None:
        call.clears += 1
        if call.speech_started_at is not None:
            if self.win_start <= call.speech_started_at < self.win_end:
                self.clear.append(now - call.speech_started_at)
            call.speech_started_at = None
        else:
            self.counts["clears without a speech_started"] += 1
        call.play_end = now
        call.generation += 1
        for name in call.pending_marks:  # Twilio echoes every pending mark at once on clear
            self.echo(call, name)
        call.pending_marks.clear()

    def echo(self, call: Call, name: str) -> None:
        ws = call.ws
        if ws is None or ws.closed:
            return
        call.seq += 1
        ws.send_text(
            '{"event":"mark","sequenceNumber":"'
            + str(call.seq)
            + '","streamSid":"'
            + call.stream_sid
            + '","mark":{"name":'
            + orjson.dumps(name).decode()
            + "}}"
        )

    # -- what the doubles send: one ticker for every call --

    def next_frame(self, call: Call, now: float) -> str:
        """The caller's next 20 ms: speech or silence; decides when to speak next (barge-in or not)."""
        utterance = call.utterance
        if utterance is not None:
            frame = utterance[call.position]
            call.position += 1
            if call.position == len(utterance):
                call.utterance = None
                call.speech_end = now + FRAME_S
                call.rx_at_speech_end = call.rx_bytes
                if call.rng.random() < self.opts.barge:
                    # Talk over the reply: it starts ~0.55 s after the turn ends and lasts 2.5-4 s.
                    call.next_utterance = self.speech["interrupt"]
                    call.next_utterance_at = call.speech_end + call.rng.uniform(1.1, 2.4)
                else:
                    call.next_utterance = self.speech[call.rng.choice(("hello", "question"))]
                    call.next_utterance_at = None
                    call.waiting_for_reply = True
            return frame
        if call.waiting_for_reply and (
            (call.rx_bytes > call.rx_at_speech_end and call.play_end <= now and not call.pending_marks)
            or now - call.speech_end > 10.0
        ):
            call.waiting_for_reply = False
            call.next_utterance_at = now + call.rng.uniform(0.3, 1.2)
        if call.next_utterance_at is not None and now >= call.next_utterance_at and not self.winding_down:
            call.utterance, call.position = call.next_utterance, 0
            call.next_utterance_at = None
            assert call.utterance is not None
            return self.next_frame(call, now)
        return SILENCE_B64

    def send_frame(self, call: Call, now: float) -> None:
        ws = call.ws
        assert ws is not None
        if ws.closed:
            call.alive = False
            return
        payload = self.next_frame(call, now)
        call.seq += 1
        call.chunk += 1
        text = (
            '{"event":"media","sequenceNumber":"'
            + str(call.seq)
            + '","media":{"track":"inbound","chunk":"'
            + str(call.chunk)
            + '","timestamp":"'
            + str(call.timestamp)
            + '","payload":"'
            + payload
            + '"},"streamSid":"'
            + call.stream_sid
            + '"}'
        )
        call.timestamp += 20
        call.frames_sent += 1
        if ws.paused:
            self.counts["frames written while the bridge was not reading (socket buffer full)"] += 1
        call.sent_times.append(perf())
        ws.send_text(text)

    async def ticker(self, probes: list[Probe]) -> None:
        """Every 1 ms: send the due frames of the calls in this slot, and every mark echo now due."""
        slot = 0
        t = perf()
        while not self.stopping:
            t += SLOT_S
            slot = (slot + 1) % SLOTS
            delay = t - perf()
            if delay > 0:
                await asyncio.sleep(delay)
            now = perf()
            if self.win_start <= now < self.win_end:
                self.tick_lag.append(now - t)
            if now - t > 0.1:
                t = now  # far behind (a stall): skip ahead rather than run a backlog of empty slots
            if self.sending:
                for call in self.slots[slot]:
                    while call.alive and call.next_due <= now + SLOT_S / 2:
                        self.send_frame(call, now)
                        call.next_due += FRAME_S
            heap = self.mark_heap
            while heap and heap[0][0] <= now:
                _, _, call, generation = heapq.heappop(heap)
                if generation == call.generation and call.pending_marks:
                    self.echo(call, call.pending_marks.popleft())
            for probe in probes:
                if probe.slot == slot:
                    probe.ping(now)

    # -- placing a call --

    async def dial(self, call: Call) -> None:
        session = self.session
        assert session is not None
        form = {
            "CallSid": call.call_sid,
            "AccountSid": "AC" + "0" * 32,
            "From": f"+1555{call.index:07d}",
            "To": "+15559870002",
            "Direction": "inbound",
            "CallStatus": "ringing",
            "ApiVersion": "2010-04-01",
        }
        headers = {"X-Twilio-Signature": self.validator.compute_signature(self.base_url + VOICE_PATH, form)}
        self.awaiting = call
        self.mapped = self.loop.create_future()
        posted = perf()
        try:
            async with session.post(self.base_url + VOICE_PATH, data=form, headers=headers) as resp:
                body = await resp.text()
                if resp.status != 200:
                    raise RuntimeError(f"POST {VOICE_PATH} answered {resp.status}: {body[:200]}")
            stream = ET.fromstring(body).find("./Connect/Stream")  # the TwiML of our own bridge
            if "<Connect>" not in body and "busy right now" in body:
                raise Draining("the bridge refuses calls: it is draining (did something send it SIGTERM?)")
            if stream is None or not stream.get("url"):
                raise RuntimeError(f"no <Connect><Stream url> in the TwiML: {body[:200]}")
            url = stream.get("url", "")
            parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
            # The bridge opens its Realtime session during the webhook: its first event maps it to us.
            answered = perf()
            await asyncio.wait_for(self.mapped, 30)
            connected = perf()
        finally:
            self.awaiting = None
            self.mapped = None
        signature = self.validator.compute_signature(url, {})
        call.media_prefix = '{"event":"media","streamSid":"' + call.stream_sid + '","media":{"payload":"'
        call.media_overhead = len(call.media_prefix) + len('"}}')
        call.ws = ws = await WsClient.connect(
            url,
            {"X-Twilio-Signature": signature, "User-Agent": "Twilio.TmeWs/1.0"},
            on_text=lambda text, now: self.on_text(call, text, now),
            on_close=lambda: self.on_closed(call),
        )
        ws.send_text(orjson.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}).decode())
        self.setup["webhook"].append(answered - posted)
        self.setup["model"].append(connected - answered)
        self.setup["stream"].append(perf() - connected)
        call.seq = 1
        start = {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "accountSid": form["AccountSid"],
                "streamSid": call.stream_sid,
                "callSid": call.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": parameters,
            },
            "streamSid": call.stream_sid,
        }
        ws.send_text(orjson.dumps(start).decode())
        now = perf()
        call.alive = True
        call.timestamp = 20
        # First frame in this call's slot of the 20 ms grid, some time within the next period.
        call.next_due = now + ((call.slot - (now / SLOT_S) % SLOTS) % SLOTS) * SLOT_S
        call.next_utterance = self.speech["hello"]
        call.next_utterance_at = now + call.rng.uniform(0.3, 3.0)  # often during the greeting: a barge-in
        self.slots[call.slot].append(call)

    # -- the run --

    async def run(self) -> dict[str, Any]:
        opts = self.opts
        rng = random.Random(opts.seed)
        tmp = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
        model = LocalModel(
            api_key="bench-api-key",
            record=False,
            fast_appends=True,
            on_client_event=self.on_client_event,
            on_server_event=self.on_server_event,
        )
        probe_server = ProbeServer(self)
        try:
            await model.start()
            await probe_server.start()
            port = free_port()
            self.base_url = f"http://127.0.0.1:{port}"
            env = bridge_env(model.endpoint, self.base_url, self.auth_token, tmp, opts.audio_path, opts.calls)
            if opts.dialect == "preview":
                env["AZURE_OPENAI_API_VERSION"] = PREVIEW_API_VERSION
            self.bridge = bridge = BridgeProcess(
                env=env,
                port=port,
                core=0 if opts.pin else None,
                log_path=tmp / "bridge.log",
                source=opts.bridge_source,
            )
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))
            await self.wait_ready()
            rss_base = bridge.rss_kib()
            probes = [Probe(self, slot=(i * 7 + 3) % SLOTS) for i in range(8)]
            for probe in probes:
                await probe.connect(probe_server.url)
            ticker = asyncio.create_task(self.ticker(probes), name="ticker")
            self.tasks.append(ticker)
            # Ramp up: dial one call at a time (the model connection is mapped to the call that way).
            ramp = opts.ramp if opts.ramp is not None else max(5.0, opts.calls * 0.03)
            t0 = perf()
            give_up = t0 + 3 * ramp + 60.0
            dial_failures = 0
            for i in range(opts.calls):
                if perf() > give_up:
                    self.counts[f"dialling stopped after {perf() - t0:.0f} s: calls not placed"] = (
                        opts.calls - i
                    )
                    break
                if i and i % 50 == 0:
                    self.log(f"{i} calls dialled in {perf() - t0:.1f} s")
                slot = rng.randrange(SLOTS)
                call = Call(
                    i,
                    random.Random(opts.seed * 100_003 + i),
                    "CA" + secrets.token_hex(16),
                    "MZ" + secrets.token_hex(16),
                    slot,
                )
                self.calls.append(call)
                delay = t0 + i * ramp / opts.calls - perf()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    await self.dial(call)
                except Draining:
                    raise
                except Exception as exc:
                    dial_failures += 1
                    if dial_failures <= 3:
                        print(f"bench: call {i} failed to dial: {exc!r}", file=sys.stderr)
                self.check_bridge()
            ramp_took = perf() - t0
            self.log(f"{opts.calls} calls dialled in {ramp_took:.1f} s; warming up {opts.warmup:g} s")
            await asyncio.sleep(opts.warmup)
            # The measurement window.
            live_calls = sum(c.alive for c in self.calls)
            metrics_before = await self.scrape()
            gc.collect()
            gc.freeze()  # what exists now lives to the end: keep the collector's full passes short
            gc.callbacks.append(self.on_gc)
            busy0 = cpu_times()
            cpu0, ru0, w0 = bridge.cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF), perf()
            self.win_start, self.win_end = w0, w0 + opts.duration
            profiler = self.start_profiler(tmp) if opts.profile else None
            rss_samples: list[int] = []
            while perf() < self.win_end:
                await asyncio.sleep(min(1.0, max(0.0, self.win_end - perf())))
                rss_samples.append(bridge.rss_kib())
                self.check_bridge()
            cpu1, ru1, w1 = bridge.cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF), perf()
            busy1 = cpu_times()
            metrics_after = await self.scrape()
            threads = bridge.status("Threads")
            live_end = sum(c.alive for c in self.calls)
            profile = await self.finish_profiler(profiler) if profiler else None
            # Wind down: no new turns; let replies finish and play; then stop the audio and count.
            self.log("window over; winding down")
            self.winding_down = True
            drained_in = perf()
            await self.drain()
            self.log(f"drained in {perf() - drained_in:.1f} s")
            result = self.report(
                window=w1 - w0,
                bridge_cpu=cpu1 - cpu0,
                gen_cpu=(ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
                machine={k: busy1[k] - busy0[k] for k in busy0},
                rss_base=rss_base,
                rss_live=max(rss_samples) if rss_samples else bridge.rss_kib(),
                live_calls=min(live_calls, live_end),
                metrics=(metrics_before, metrics_after),
                dial_failures=dial_failures,
                ramp_took=ramp_took,
                threads=threads,
            )
            if profile is not None:
                result["profile"] = profile
            self.stopping = True
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            await self.hang_up()
            for probe in probes:
                probe.close()
            return result
        finally:
            if self.on_gc in gc.callbacks:
                gc.callbacks.remove(self.on_gc)
            gc.unfreeze()
            self.stopping = True
            for call in self.calls:
                if call.ws is not None:
                    call.ws.close()
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            if self.session is not None:
                await self.session.close()
            if self.bridge is not None:
                await asyncio.to_thread(self.bridge.stop)
            await probe_server.close()
            await model.close()
            if opts.keep:
                print(f"bench: kept {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """Time the generator's own garbage collections in the window (a pause shows as generator lag)."""
        now = perf()
        if phase == "start":
            self.gc_started = now
        elif self.win_start <= now < self.win_end:
            self.gc_pauses.append(now - self.gc_started)

    def log(self, text: str) -> None:
        if self.opts.verbose:
            print(f"bench [{self.opts.calls} calls]: {text}", file=sys.stderr)

    def check_bridge(self) -> None:
        bridge = self.bridge
        if bridge is not None and bridge.proc.poll() is not None:
            raise RuntimeError(f"the bridge exited ({bridge.proc.returncode}):\n{bridge.log_tail()}")

    async def wait_ready(self) -> None:
        assert self.session is not None
        deadline = perf() + 20.0
        while perf() < deadline:
            self.check_bridge()
            with contextlib.suppress(aiohttp.ClientError):
                async with self.session.get(self.base_url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError("the bridge did not become ready within 20 s")

    async def scrape(self) -> dict[str, float]:
        assert self.session is not None
        async with self.session.get(self.base_url + "/metrics") as resp:
            return parse_prometheus(await resp.text())

    async def drain(self) -> None:
        """After the window: let the callers finish their sentences and the VAD close their turns, stop the
        caller audio, then wait until every frame sent has reached the model and every reply the model
        finished has reached the callers -- as long as anything still moves (at most 5 s without progress,
        90 s in all), so that a frame still queued in an overloaded bridge is not called lost too early."""
        live = [c for c in self.calls if c.conn is not None]

        def turns_over(now: float) -> bool:
            return all(c.utterance is None and now - c.speech_end > 1.0 for c in live if c.alive)

        def inbound_done(now: float) -> bool:
            return all(c.appends >= c.frames_sent for c in live)

        def outbound_done(now: float) -> bool:
            return all(c.current is None and c.rx_bytes >= c.expected_out for c in live)

        await self.wait_until(turns_over, "caller turns still open")
        self.sending = False
        await self.wait_until(inbound_done, "inbound frames still in flight")
        await self.wait_until(outbound_done, "outbound replies still in flight")

    async def wait_until(self, done: Callable[[float], bool], what: str) -> None:
        def progress() -> tuple[int, int, int]:
            calls = self.calls
            return sum(c.appends for c in calls), sum(c.rx_bytes for c in calls), sum(c.seq for c in calls)

        deadline = perf() + 90.0
        last, still = progress(), perf()
        while not done(perf()):
            await asyncio.sleep(0.05)
            now = perf()
            if progress() != last:
                last, still = progress(), now
            elif now - still > 5.0 or now > deadline:
                self.counts[f"gave up waiting: {what}"] += 1
                return

    async def hang_up(self) -> None:
        """Every caller hangs up as Twilio does: ``stop``, then the socket closes."""
        for call in self.calls:
            ws = call.ws
            if ws is None or ws.closed:
                continue
            call.alive = False
            stop = {
                "event": "stop",
                "sequenceNumber": str(call.seq + 1),
                "streamSid": call.stream_sid,
                "stop": {"accountSid": "AC" + "0" * 32, "callSid": call.call_sid},
            }
            ws.send_text(orjson.dumps(stop).decode())
            ws.close()
        deadline = perf() + 5.0
        while perf() < deadline and not all(c.ws is None or c.ws.closed for c in self.calls):  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    # -- profiling --

    def start_profiler(self, tmp: Path) -> tuple[subprocess.Popen[bytes], Path] | None:
        spy = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
        if not Path(spy).exists():
            print("bench: --profile needs py-spy (.venv/bin/pip install py-spy)", file=sys.stderr)
            return None
        assert self.bridge is not None
        out = tmp / "profile.txt"
        cmd = [
            spy,
            "record",
            "--pid",
            str(self.bridge.pid),
            "--duration",
            str(int(self.opts.duration)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out),
        ]
        if self.opts.pin:
            cmd = ["taskset", "-c", "1", *cmd]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return proc, out

    async def finish_profiler(self, profiler: tuple[subprocess.Popen[bytes], Path] | None) -> dict[str, Any]:
        if profiler is None:
            return {}
        proc, out = profiler
        try:
            _, err = await asyncio.to_thread(proc.communicate, None, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"error": "py-spy did not finish"}
        if not out.exists():
            return {"error": err.decode(errors="replace")[-500:]}
        result = summarize_profile(out.read_text(errors="replace"))
        result["raw"] = str(out) + ("" if self.opts.keep else " (deleted; --keep keeps it)")
        return result

    # -- results --

    def report(
        self,
        *,
        window: float,
        bridge_cpu: float,
        gen_cpu: float,
        rss_base: int,
        rss_live: int,
        live_calls: int,
        metrics: tuple[dict[str, float], dict[str, float]],
        dial_failures: int,
        ramp_took: float,
        threads: int,
        machine: dict[str, float],
    ) -> dict[str, Any]:
        opts = self.opts
        n = max(1, live_calls)
        # Frames lost on calls that stayed up; what was in flight on calls the bridge ended is counted apart.
        up = [c for c in self.calls if c.conn is not None and not c.ended_by_bridge]
        ended = [c for c in self.calls if c.conn is not None and c.ended_by_bridge]
        lost_in = sum(max(0, c.frames_sent - c.appends) for c in up)
        extra_in = sum(max(0, c.appends - c.frames_sent) for c in up)
        lost_out = sum(max(0, c.expected_out - c.rx_bytes) for c in up) // FRAME_BYTES
        extra_out = sum(max(0, c.rx_bytes - c.expected_out) for c in up) // FRAME_BYTES
        ended_in = sum(max(0, c.frames_sent - c.appends) for c in ended)
        ended_out = sum(max(0, c.expected_out - c.rx_bytes) for c in ended) // FRAME_BYTES
        before, after = metrics
        # What ran on the machine besides the bridge and this process (other work skews every figure).
        foreign = max(0.0, machine["process"] - bridge_cpu - gen_cpu)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        return {
            "calls": opts.calls,
            "live_calls": live_calls,
            "dial_failures": dial_failures,
            "audio_path": opts.audio_path,
            "dialect": opts.dialect,
            "pinned": opts.pin,
            "window_s": round(window, 2),
            "other_load_percent_of_a_core": round(100 * foreign / window, 1),
            "irq_percent_of_a_core": round(100 * machine["irq"] / window, 1),
            "steal_percent_of_a_core": round(100 * machine["steal"] / window, 1),
            "ramp_s": round(ramp_took, 2),
            "bridge": {
                "cpu_percent_of_core": round(100 * bridge_cpu / window, 1),
                "cpu_ms_per_call_second": round(1000 * bridge_cpu / window / n, 3),
                "rss_base_mib": round(rss_base / 1024, 1),
                "rss_live_mib": round(rss_live / 1024, 1),
                "mib_per_call": round((rss_live - rss_base) / 1024 / n, 3),
                "threads": threads,
            },
            "generator": {
                "cpu_percent_of_core": round(100 * gen_cpu / window, 1),
                "tick_lag": summary_ms(self.tick_lag),
                "gc_pauses": summary_ms(self.gc_pauses) | {"total_ms": round(1000 * sum(self.gc_pauses), 1)},
                "probe_in": summary_ms(self.probe_in),
                "probe_out": summary_ms(self.probe_out),
            },
            "inbound": summary_ms(self.inbound),
            "outbound": summary_ms(self.outbound),
            "clear": summary_ms(self.clear),
            "bridge_metrics": {
                "inbound": histogram_quantiles(before, after, "bridge_inbound_added_seconds"),
                "outbound": histogram_quantiles(before, after, "bridge_outbound_added_seconds"),
                "clear": histogram_quantiles(before, after, "bridge_clear_latency_seconds"),
                "frames_in": int(delta.get("bridge_frames_in_total", 0)),
                "frames_out": int(delta.get("bridge_frames_out_total", 0)),
                "barge_ins": int(delta.get("bridge_barge_ins_total", 0)),
                "malformed": int(sum(v for k, v in delta.items() if k.startswith("bridge_malformed"))),
                "upstream_errors": int(
                    sum(v for k, v in delta.items() if k.startswith("bridge_upstream_err"))
                ),
                "calls_ended": {
                    k: int(v) for k, v in delta.items() if k.startswith("bridge_calls_total") and v
                },
                "refused": {
                    k: int(v) for k, v in delta.items() if k.startswith("bridge_refused_total") and v
                },
            },
            "frames": {
                "inbound_sent": sum(c.frames_sent for c in self.calls),
                "inbound_lost": lost_in,
                "inbound_extra": extra_in,
                "outbound_received": sum(c.frames_rx for c in self.calls),
                "outbound_lost": lost_out,
                "outbound_extra": extra_out,
                "lost": lost_in + lost_out,
                "undelivered_on_calls_the_bridge_ended": {"inbound": ended_in, "outbound": ended_out},
            },
            "setup": {k: summary_ms(v) for k, v in self.setup.items()},
            "barge_ins": len(self.clear),
            "barge_ins_total": sum(c.clears for c in self.calls),
            "responses": sum(len(c.responses) for c in self.calls),
            "notes": dict(self.counts)
            | {"outbound probes never matched": sum(len(c.targets) for c in self.calls)},
        }


# --- the generator's own baseline: a loopback probe --------------------------------------------------------


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options the benchmark and the soak share: --seed, --bridge-source, --keep, -q."""
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--bridge-source",
        type=Path,
        help="run the bridge from this source tree (e.g. `git archive COMMIT | tar -x -C DIR`), "
        "not from this checkout; the local model and the doubles still come from here",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (bridge log)")
    p.add_argument("-q", "--quiet", action="store_true")


def bridge_env(
    model_endpoint: str, base_url: str, auth_token: str, tmp: Path, audio_path: str, calls: int
) -> dict[str, str]:
    """The environment of a bridge under load: this one's without its AZURE_, BRIDGE_ and TWILIO_
    settings, plus the local model, signatures on, a data directory in ``tmp``, quiet logs, no drain."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "BRIDGE_", "TWILIO_"))}
    return env | {
        "AZURE_OPENAI_ENDPOINT": model_endpoint,
        "AZURE_OPENAI_DEPLOYMENT": "bench",
        "AZURE_OPENAI_API_KEY": "bench-api-key",
        "TWILIO_AUTH_TOKEN": auth_token,
        "BRIDGE_PUBLIC_URL": base_url,
        "BRIDGE_DATA_DIR": str(tmp / "data"),
        "BRIDGE_LOG_LEVEL": "WARNING",
        "BRIDGE_AUDIO_PATH": audio_path,
        "BRIDGE_DRAIN_SECONDS": "0",
        # The load is the point: admission control must not turn calls away.
        "BRIDGE_MAX_CALLS": str(calls + 10),
    }


class ProbeServer:
    """A websockets server in this process (the library the local model uses) that stamps and echoes."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.url = ""
        self._server: Any = None

    async def start(self) -> None:
        self._server = await serve(self._handle, "127.0.0.1", 0, compression=None)
        self.url = f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/"

    async def _handle(self, ws: ServerConnection) -> None:
        bench = self.bench
        with contextlib.suppress(Exception):
            async for message in ws:
                now = perf()
                sent = float(str(message)[:24])
                if bench.win_start <= sent < bench.win_end:
                    bench.probe_in.append(now - sent)
                await ws.send(f"{perf():<24.9f}" + "x" * 256)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Probe:
    """One stream client (as the doubles have) sending a media-sized message every 20 ms to the server."""

    def __init__(self, bench: Bench, slot: int) -> None:
        self.bench = bench
        self.slot = slot
        self.ws: WsClient | None = None
        self.next_due = 0.0

    async def connect(self, url: str) -> None:
        self.ws = await WsClient.connect(url, {}, on_text=self.on_text, on_close=lambda: None)

    def ping(self, now: float) -> None:
        if self.ws is None or self.ws.closed or now < self.next_due:
            return
        self.next_due = now + FRAME_S - SLOT_S
        self.ws.send_text(f"{perf():<24.9f}" + "x" * 256)

    def on_text(self, text: str, now: float) -> None:
        sent = float(text[:24])
        if self.bench.win_start <= sent < self.bench.win_end:
            self.bench.probe_out.append(now - sent)

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


# --- profile summary ---------------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    with contextlib.suppress(ValueError):
        return str(Path(path).relative_to(ROOT))
    return path


def summarize_profile(raw: str, top: int = 25) -> dict[str, Any]:
    """py-spy ``--format raw`` (collapsed stacks) → the functions with the most samples: self time (the
    innermost frame) and total time (anywhere on the stack), as % of all samples."""
    own: defaultdict[str, int] = defaultdict(int)
    total: defaultdict[str, int] = defaultdict(int)
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        names = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame.strip())
            if m:
                names.append(f"{_short(m.group('file'))}:{m.group('func')}")
        if not names:
            continue
        own[names[-1]] += count
        for name in set(names):
            total[name] += count

    def table(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / samples, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": samples, "self": table(own), "total": table(total)}


# --- command line ------------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def calls_cell(r: dict[str, Any]) -> str:
    return str(r["calls"]) if r["live_calls"] == r["calls"] else f"{r['calls']} ({r['live_calls']} live)"


def markdown(results: list[dict[str, Any]]) -> str:
    head = (
        "| calls | bridge CPU (% of its core) | CPU ms per call-second | MiB per call | inbound p50 / p99 ms "
        "| outbound p50 / p99 ms | clear p50 / p99 ms | frames lost (in + out) | barge-ins "
        "| generator CPU % |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in results:
        b, g = r["bridge"], r["generator"]
        lines.append(
            f"| {calls_cell(r)} | {b['cpu_percent_of_core']} | {b['cpu_ms_per_call_second']} "
            f"| {b['mib_per_call']} | {fmt(r['inbound']['p50_ms'])} / {fmt(r['inbound']['p99_ms'])} "
            f"| {fmt(r['outbound']['p50_ms'])} / {fmt(r['outbound']['p99_ms'])} "
            f"| {fmt(r['clear']['p50_ms'])} / {fmt(r['clear']['p99_ms'])} "
            f"| {r['frames']['inbound_lost']} + {r['frames']['outbound_lost']} | {r['barge_ins']} "
            f"| {g['cpu_percent_of_core']} |"
        )
    lines += [
        "",
        "Bridge's own /metrics histograms over the window (p50 / p99 ms, interpolated in buckets),",
        "and the generator's baseline (loopback probe without the bridge; ticker lateness):",
        "",
    ]
    lines.append(
        "| calls | /metrics inbound | /metrics outbound | /metrics clear | probe in | probe out "
        "| ticker lag | samples in / out / clear |"
    )
    lines.append("|" + "---|" * 8)
    for r in results:
        m, g = r["bridge_metrics"], r["generator"]

        def pair(d: dict[str, Any]) -> str:
            return f"{fmt(d['p50_ms'])} / {fmt(d['p99_ms'])}"

        lines.append(
            f"| {calls_cell(r)} | {pair(m['inbound'])} | {pair(m['outbound'])} | {pair(m['clear'])} "
            f"| {pair(g['probe_in'])} | {pair(g['probe_out'])} | {pair(g['tick_lag'])} "
            f"| {r['inbound']['n']} / {r['outbound']['n']} / {r['clear']['n']} |"
        )
    notes = [f"- {r['calls']} calls: {k}: {v}" for r in results for k, v in r["notes"].items() if v]
    for r in results:
        ended = r["frames"]["undelivered_on_calls_the_bridge_ended"]
        if ended["inbound"] or ended["outbound"]:
            notes.append(
                f"- {r['calls']} calls: frames in flight on calls the bridge ended: "
                f"{ended['inbound']} in, {ended['outbound']} out; /metrics calls ended "
                f"{r['bridge_metrics']['calls_ended']}, refused {r['bridge_metrics']['refused']}"
            )
        st = r["setup"]
        notes.append(
            f"- {r['calls']} calls: call set-up p50 / p99 ms: webhook {st['webhook']['p50_ms']} / "
            f"{st['webhook']['p99_ms']}, model session {st['model']['p50_ms']} / {st['model']['p99_ms']}, "
            f"stream upgrade {st['stream']['p50_ms']} / {st['stream']['p99_ms']}"
        )
        notes.append(
            f"- {r['calls']} calls: machine in the window: irq {r['irq_percent_of_a_core']} %, "
            f"steal {r['steal_percent_of_a_core']} %, other processes {r['other_load_percent_of_a_core']} % "
            f"of a core; bridge RSS {r['bridge']['rss_base_mib']} → {r['bridge']['rss_live_mib']} MiB"
        )
    for r in results:
        for warning in warnings_for(r):
            notes.append(f"- {r['calls']} calls: **{warning}**")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def warnings_for(r: dict[str, Any]) -> list[str]:
    """What makes a run's figures less than trustworthy."""
    out = []
    if r["other_load_percent_of_a_core"] > 5:
        out.append(f"other processes used {r['other_load_percent_of_a_core']} % of a core during the window")
    if r["steal_percent_of_a_core"] > 10:
        out.append(f"the hypervisor stole {r['steal_percent_of_a_core']} % of a core (CPU time is noisier)")
    g = r["generator"]
    if (
        g["cpu_percent_of_core"] > 85
        or (g["probe_in"]["p99_ms"] or 0) > 5
        or (g["probe_out"]["p99_ms"] or 0) > 5
    ):
        out.append(
            f"the generator lags or is near saturation (CPU {g['cpu_percent_of_core']} %, probe p99 "
            f"{g['probe_in']['p99_ms']} / {g['probe_out']['p99_ms']} ms): delays include its own lag"
        )
    if r["bridge"]["cpu_percent_of_core"] > 90:
        out.append(f"the bridge is saturated ({r['bridge']['cpu_percent_of_core']} % of its core)")
    if r["live_calls"] < r["calls"]:
        out.append(f"only {r['live_calls']} of {r['calls']} calls were live through the window")
    return out


def profile_text(result: dict[str, Any]) -> str:
    prof = result.get("profile") or {}
    if "self" not in prof:
        return f"profile: {prof.get('error', 'none')}"
    lines = [f"py-spy, {result['live_calls']} calls, {prof['samples']} samples", "", "self time:"]
    lines += [f"  {pct:5.1f} %  {name}" for name, pct in prof["self"]]
    lines += ["", "total time (on the stack):"]
    lines += [f"  {pct:5.1f} %  {name}" for name, pct in prof["total"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[list[int], argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="N concurrent simulated Twilio calls through the real bridge against the local model.",
    )
    p.add_argument(
        "--calls", default="100", help="concurrent calls (max 500); a comma list runs each in turn"
    )
    p.add_argument("--duration", type=float, default=30.0, help="measurement window, s (default 30)")
    p.add_argument("--ramp", type=float, default=None, help="s to dial every call (default 0.03 s per call)")
    p.add_argument("--warmup", type=float, default=5.0, help="s between the last dial and the window")
    p.add_argument("--audio-path", choices=("pcm16", "g711_ulaw"), default="pcm16")
    p.add_argument("--dialect", choices=("ga", "preview"), default="ga")
    p.add_argument("--barge", type=float, default=0.4, help="share of turns that talk over the reply")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-pin", action="store_true", help="do not pin the bridge and the generator to cores")
    p.add_argument("--profile", action="store_true", help="py-spy the bridge during the window")
    add_common_arguments(p)
    args = p.parse_args(argv)
    try:
        counts = [int(x) for x in str(args.calls).split(",") if x.strip()]
    except ValueError:
        p.error("--calls takes a number or a comma list of numbers")
    if not counts or any(not 1 <= n <= MAX_CALLS for n in counts):
        p.error(f"--calls must be from 1 to {MAX_CALLS}")
    return counts, args


async def amain(counts: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    # Ctrl-C and SIGTERM cancel the run, whose clean-up stops the bridge (and SIGKILLs it if need be).
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    speech = load_speech()
    results = []
    for n in counts:
        opts = Options(
            calls=n,
            duration=args.duration,
            ramp=args.ramp,
            warmup=args.warmup,
            audio_path=args.audio_path,
            dialect=args.dialect,
            barge=args.barge,
            pin=not args.no_pin,
            profile=args.profile,
            seed=args.seed,
            keep=args.keep,
            verbose=not args.quiet,
            bridge_source=args.bridge_source.resolve() if args.bridge_source else None,
        )
        results.append(await Bench(opts, speech).run())
    return results


def main(argv: list[str] | None = None) -> int:
    counts, args = parse_args(argv)
    if not args.no_pin:
        if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
            print("bench: pinning needs 2 cores and taskset; use --no-pin", file=sys.stderr)
            return 2
        os.sched_setaffinity(0, {1})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the bridge inherits it
    try:
        results = uvloop.run(amain(counts, args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    else:
        print(markdown(results))
        for r in results:
            if "profile" in r:
                print()
                print(profile_text(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

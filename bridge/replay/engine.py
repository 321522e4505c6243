"""Replay recorded calls through the bridge, offline and deterministic, and compare what it sends.

How a replay works
------------------
* The **caller side** of a recording (Twilio → bridge messages) is played into a bridge through the
  Twilio caller double: the webhook is signed and fetched afresh (a new one-time token), the stream opens
  when it opened in the recording, and every recorded caller message -- media, DTMF, malformed frames,
  ``stop`` -- is sent at its recorded offset from ``start``. Mark echoes are not replayed: the double
  plays the bridge's audio at real pace and echoes marks itself, exactly as Twilio would.
* The **model side** is, by choice: ``recorded`` -- :class:`RecordedModel` sends the recorded Realtime
  server events, each once the bridge has sent as many client events as it had when that event came in
  the recording, and no sooner than it came then (so a reply starts after the same audio, paced the same);
  ``local`` -- the local model; ``azure`` -- the configured deployment.
* A call may use several Realtime sessions (a rollover, a reconnection; numbered in the order the bridge
  opened them). :class:`RecordedModel` serves the k-th connection it accepts with the server events of
  recorded session k, counting only the client events of that connection against the recorded client
  events of that session; a connection beyond the recorded sessions gets nothing (it only listens).
* With ``--model recorded`` the client events the bridge sends now are compared with the recording's,
  session by session (what connection k received against what recorded session k did): the session
  config exactly, every other event in order, with tolerances for audio (length) and for truncation points
  (ms), ignoring event ids. Any difference is a divergence, reported in plain words
  (:mod:`bridge.replay.compare`), naming the session when the call had more than one.
* **Speed**: ``realtime`` runs on the wall clock; ``fast`` runs the bridge, the double and the recorded
  model on one event loop whose clock jumps ahead whenever every party is idle (a virtual clock), so a
  ten-minute call replays in seconds with identical timing (:mod:`bridge.replay.loop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from aiohttp import web
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bridge.clock import LoopClock
from bridge.errors import ConfigError
from bridge.keys import METRICS, STORE
from bridge.local_model import LocalModel
from bridge.prompts import Profile, profile_from_mapping
from bridge.recordings import Event, Recording
from bridge.recordings.blob import load_recording_source
from bridge.replay.compare import compare_sessions
from bridge.replay.loop import Speed, run
from bridge.testing import TwilioCaller, serve_bridge

ModelChoice = Literal["recorded", "local", "azure"]

ROLLOVER_SETTINGS = {
    "margin": "BRIDGE_ROLLOVER_MARGIN",
    "max_session": "BRIDGE_MAX_SESSION_SECONDS",
    "model_idle": "BRIDGE_MODEL_IDLE_TIMEOUT",
}
"""The recording header's rollover settings, and the settings a replay gives the bridge from them."""

END_GRACE_S = 3.0
"""After the last recorded event, how long the replay waits for the call to end on its own."""


# --- the recorded model ----------------------------------------------------------------------------


AUDIO_DRIVEN = ("input_audio_buffer.", "conversation.item.input_audio_transcription.")
"""Server events caused by the caller's audio: they wait for the same amount of it on replay."""


@dataclass(frozen=True, slots=True)
class _Cue:
    event: Event
    after: int
    """Send once the bridge has sent this many client events of the kind that causes it..."""
    audio: bool
    """...counting ``input_audio_buffer.append`` (audio-driven events) or every other client event..."""
    lag: float
    """...and this many seconds after the last of them arrived (the recorded think time)."""


class _Connection:
    """One connection the recorded model accepted: its number (= the recorded session it is served) and
    the client events it received."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.received: list[dict[str, Any]] = []
        self.arrivals: dict[bool, list[float]] = {True: [], False: []}
        """When each client event arrived: ``input_audio_buffer.append`` (True) or any other (False)."""
        self.changed = asyncio.Event()


class RecordedModel:
    """A Realtime server that answers with a recording's model events, causally (see the module doc).

    The k-th connection it accepts is served the server events of recorded session k (a connection
    beyond the recording's sessions gets none). VAD events wait for as much caller audio, sent on that
    connection, as they followed in their session; every other event waits for that connection's other
    client events (``session.update``, ``response.create``, ``truncate`` …). Events go out in their
    recorded order, paced as recorded, so a reply streams as fast as it did.
    """

    def __init__(self, recording: Recording) -> None:
        self.recording = recording
        self.received: list[dict[str, Any]] = []
        """Client events the bridge sent on every connection, in arrival order, parsed (a non-JSON message
        becomes ``{"raw": …}``)."""
        self.received_by_connection: list[list[dict[str, Any]]] = []
        """The same, per connection: item ``k - 1`` is what connection (session) ``k`` received."""
        self.sent: list[dict[str, Any]] = []
        """Server events sent, on every connection, in the order they went out."""
        self._scripts = {k: self._script(recording, k) for k in range(1, recording.sessions + 1)}
        self._server: Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def connections(self) -> int:
        """How many connections (Realtime sessions) it accepted."""
        return len(self.received_by_connection)

    @staticmethod
    def _script(recording: Recording, session: int = 1) -> list[_Cue]:
        """The cues of one recorded session. Its think times count from the call's start for session 1
        (opened at the webhook) and from the session's first message for a later one (its opening time
        is not recorded)."""
        cues: list[_Cue] = []
        events = [e for e in recording.events if e.src == "model" and e.session == session]
        origin = 0.0 if session == 1 or not events else events[0].t
        counts = {True: 0, False: 0}
        last_t = {True: origin, False: origin}
        for event in events:
            if event.dir == "out":
                audio = event.kind == "input_audio_buffer.append"
                counts[audio] += 1
                last_t[audio] = event.t
            else:
                audio = event.kind.startswith(AUDIO_DRIVEN)
                lag = max(0.0, (event.t - last_t[audio]) / 1000.0)
                cues.append(_Cue(event, counts[audio], audio, lag))
        return cues

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``, for ``AZURE_OPENAI_ENDPOINT``."""
        assert self._server is not None
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        """Listen on a loopback port."""
        self._server = await serve(self._handle, "127.0.0.1", 0, max_size=None, compression=None)

    async def close(self) -> None:
        """Close the server and every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _handle(self, ws: ServerConnection) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = _Connection(self.connections + 1)
        self.received_by_connection.append(conn.received)
        sender = asyncio.create_task(self._send_cues(ws, conn, self._scripts.get(conn.number, [])))
        try:
            async for message in ws:
                try:
                    parsed = orjson.loads(message)
                except orjson.JSONDecodeError:
                    parsed = None
                event = parsed if isinstance(parsed, dict) else {"raw": str(message)}
                self.received.append(event)
                conn.received.append(event)
                audio = event.get("type") == "input_audio_buffer.append"
                conn.arrivals[audio].append(asyncio.get_running_loop().time())
                conn.changed.set()
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            self._handlers.discard(task)

    def _rebased(self, event: Event) -> dict[str, Any] | None:
        """The message of ``event`` as sent now: a ``session.created``'s ``expires_at`` (wall-clock time)
        moved by the recording's age, so that the session has as long to live as it had in the call and
        the bridge plans its rollover as it did then."""
        if event.msg is None:
            return None
        message = dict(event.msg)
        session = message.get("session")
        if message.get("type") != "session.created" or not isinstance(session, dict):
            return message
        expires = session.get("expires_at")
        if not isinstance(expires, int):
            return message
        try:
            started = datetime.fromisoformat(self.recording.header.started_at).timestamp()
        except ValueError:
            return message  # no start time recorded: the recorded value, as it was
        # As long to live as the recorded session had when its session.created arrived, in whole seconds
        # rounded up as the bridge reads it (bridge.legs.swap_times).
        lifetime = math.ceil(expires - (started + event.t / 1000.0))
        message["session"] = {**session, "expires_at": int(time.time()) + lifetime}
        return message

    async def _send_cues(self, ws: ServerConnection, conn: _Connection, cues: list[_Cue]) -> None:
        loop = asyncio.get_running_loop()
        connected = loop.time()
        previous: tuple[float, float] | None = None  # (when sent, recorded t) of the previous cue
        for cue in cues:
            arrivals = conn.arrivals[cue.audio]
            while len(arrivals) < cue.after:
                conn.changed.clear()
                await conn.changed.wait()
            anchor = arrivals[cue.after - 1] if cue.after else connected
            due = anchor + cue.lag
            if previous is not None:  # keep the recorded pacing of a stream of deltas
                due = max(due, previous[0] + (cue.event.t - previous[1]) / 1000.0)
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            message = self._rebased(cue.event)
            await ws.send(orjson.dumps(message).decode() if message is not None else cue.event.wire)
            if message is not None:
                self.sent.append(message)
            previous = (loop.time(), cue.event.t)


# --- one replay ------------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    """What happened when a recording was replayed, and how it compares with the recording."""

    name: str
    model: ModelChoice
    speed: Speed
    divergences: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    client_events: list[dict[str, Any]] = field(default_factory=list)
    """Every client event the bridge sent to the model (``recorded`` and ``local`` models)."""
    truncations: list[tuple[str, int]] = field(default_factory=list)
    clears: int = 0
    turns: int = 0
    heard_seconds: float = 0.0
    duration_s: float = 0.0
    transcript: list[tuple[str, str]] = field(default_factory=list)
    added_latency_ms: dict[str, float] = field(default_factory=dict)
    """Mean bridge-added delay each way (realtime replays only: virtual time has no CPU cost)."""
    model_sessions: int = 0
    """Realtime sessions (connections) the bridge opened to the model during the replay (``recorded`` and
    ``local`` models; 0 when not known)."""
    recorded_sessions: int = 0
    """Realtime sessions the recorded call used (:attr:`~bridge.recordings.Recording.sessions`)."""

    @property
    def passed(self) -> bool:
        """No divergence and no error."""
        return not self.divergences and not self.errors

    @property
    def session_config(self) -> dict[str, Any]:
        """The ``session`` of the first ``session.update`` the bridge sent."""
        for event in self.client_events:
            if event.get("type") == "session.update" and isinstance(event.get("session"), dict):
                return dict(event["session"])
        return {}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready report."""
        return {
            "name": self.name,
            "passed": self.passed,
            "model": self.model,
            "speed": self.speed,
            "duration_s": round(self.duration_s, 3),
            "turns": self.turns,
            "barge_ins": self.clears,
            "truncations": [{"item_id": i, "audio_end_ms": ms} for i, ms in self.truncations],
            "heard_s": round(self.heard_seconds, 3),
            "added_latency_ms": self.added_latency_ms,
            "model_sessions": self.model_sessions,
            "recorded_sessions": self.recorded_sessions,
            "divergences": self.divergences,
            "errors": self.errors,
        }


def profile_of(recording: Recording) -> Profile:
    """The prompt profile the recorded call ran with (defaults for a caller-only capture)."""
    data = dict(recording.header.profile)
    return profile_from_mapping(data) if data else Profile()


async def replay_recording(
    recording: Recording,
    *,
    name: str = "recording",
    model: ModelChoice = "recorded",
    speed: Speed = "fast",
    url: str | None = None,
    auth_token: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ReplayResult:
    """Replay one recording; run it on :func:`run` (``fast`` needs the virtual-time loop)."""
    if model == "recorded" and recording.header.caller_only:
        raise ConfigError(f"{name} is a caller-only capture: replay it with --model local or azure")
    result = ReplayResult(name=name, model=model, speed=speed, recorded_sessions=recording.sessions)
    recorded_model: RecordedModel | None = None
    local: LocalModel | None = None
    app: web.Application | None = None
    token = auth_token or secrets.token_hex(16)
    header = recording.header
    async with contextlib.AsyncExitStack() as stack:  # on exit: the bridge, then the model
        env: dict[str, str] = {}
        if model == "recorded":
            recorded_model = RecordedModel(recording)
            stack.push_async_callback(recorded_model.close)
            await recorded_model.start()
            env |= {"AZURE_OPENAI_ENDPOINT": recorded_model.endpoint, "AZURE_OPENAI_API_KEY": "replay"}
        elif model == "local":
            local = LocalModel()
            stack.push_async_callback(local.close)
            await local.start()
            env |= {"AZURE_OPENAI_ENDPOINT": local.endpoint, "AZURE_OPENAI_API_KEY": "replay"}
        else:
            env |= {k: v for k, v in (environ or {}).items() if k.startswith("AZURE_OPENAI_")}
        if model != "azure":
            env["AZURE_OPENAI_DEPLOYMENT"] = "replay"
            if header.dialect == "preview":
                env["AZURE_OPENAI_API_VERSION"] = "2025-04-01-preview"
        base_url = url
        if base_url is None:
            data_dir = tempfile.mkdtemp(prefix="bridge-replay-")
            env |= {
                "TWILIO_AUTH_TOKEN": token,
                "BRIDGE_DATA_DIR": data_dir,
                "BRIDGE_AUDIO_PATH": header.audio_path,
                **{
                    name: f"{header.rollover[key]:g}"
                    for key, name in ROLLOVER_SETTINGS.items()
                    if key in header.rollover
                },
            }
            bridge = await stack.enter_async_context(
                serve_bridge(env, profile=profile_of(recording), clock=LoopClock(), shutdown_timeout=1.0)
            )
            app = bridge.app
            if header.greeting_audio:  # the call played a pre-rendered greeting: so does its replay
                default = await app[STORE].default_profile()
                if default is not None:
                    await app[STORE].set_greeting_audio(
                        default.profile_id, default.version, header.greeting_audio
                    )
            base_url = bridge.url
        await _play_caller(recording, base_url, token, result)
        if recorded_model is not None:
            result.client_events = recorded_model.received
            result.model_sessions = recorded_model.connections
            recorded = [
                [dict(e.msg) for e in recording.select("model", "out", session=k) if e.msg is not None]
                for k in range(1, recording.sessions + 1)
            ]
            result.divergences += compare_sessions(
                recorded, recorded_model.received_by_connection, audio_path=header.audio_path, speed=speed
            )
            rec_clears = sum(1 for e in recording.select("twilio", "out") if e.kind == "clear")
            if rec_clears != result.clears:
                result.divergences.append(
                    f"barge-ins (Twilio clear): {rec_clears} in the recording, {result.clears} now"
                )
            model_events = recorded_model.sent
        elif local is not None and local.connections:
            result.model_sessions = len(local.connections)
            result.client_events = [e for conn in local.connections for e in conn.received]
            model_events = [e for conn in local.connections for e in conn.sent]
        else:
            model_events = []
        result.truncations = [
            (str(e.get("item_id")), int(e.get("audio_end_ms", 0)))
            for e in result.client_events
            if e.get("type") == "conversation.item.truncate"
        ]
        for event in model_events:
            kind = event.get("type")
            if kind == "input_audio_buffer.speech_started":
                result.turns += 1
            elif kind == "error":
                err = event.get("error") or {}
                if err.get("code") != "response_cancel_not_active":
                    result.errors.append(f"the model answered error {err.get('code')}: {err.get('message')}")
            elif kind in ("response.output_audio_transcript.done", "response.audio_transcript.done"):
                result.transcript.append(("assistant", str(event.get("transcript", ""))))
            elif kind == "conversation.item.input_audio_transcription.completed":
                result.transcript.append(("caller", str(event.get("transcript", ""))))
        if app is not None and speed == "realtime":
            metrics = app[METRICS]
            for key, hist in (("inbound", metrics.inbound_delay), ("outbound", metrics.outbound_delay)):
                if hist.count:
                    result.added_latency_ms[key] = round(hist.sum / hist.count * 1000.0, 3)
    return result


async def _play_caller(recording: Recording, base_url: str, token: str, result: ReplayResult) -> None:
    header = recording.header
    caller_events = recording.select("twilio", "in")
    start = next((e for e in caller_events if e.kind == "start"), None)
    if start is None or start.msg is None:
        raise ConfigError(f"{result.name} has no Twilio start event: nothing to replay")
    start_body = start.msg.get("start") or {}
    call = TwilioCaller(
        base_url,
        auth_token=token,
        call_sid=str(start_body.get("callSid") or header.call_sid or "CA" + secrets.token_hex(16)),
        account_sid=str(start_body.get("accountSid") or "AC" + "0" * 32),
        from_=header.from_number or "+15550000000",
        to=header.to_number or "+15550000001",
    )
    call.stream_sid = str(start.msg.get("streamSid") or start_body.get("streamSid") or call.stream_sid)
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with call:
        status, body = await call.post_voice()
        if status != 200:
            result.errors.append(f"the webhook answered {status}: {body[:200]}")
            return
        call.accept_twiml(body)
        await _sleep_until(loop, began + start.t / 1000.0)
        await call.connect_stream()
        started = loop.time()
        stopped = False
        for event in caller_events:
            if event.kind in ("connected", "start", "mark"):
                continue  # sent afresh by the double / echoed by its own playback
            await _sleep_until(loop, started + (event.t - start.t) / 1000.0)
            if call.closed.is_set():
                break
            with contextlib.suppress(ConnectionResetError):
                await call.send_raw(event.wire)
            if event.kind == "stop":
                stopped = True
                break
        if not stopped:
            # The call ended from the bridge's side in the recording (or the capture simply ends): wait.
            rest = (recording.duration_ms - (caller_events[-1].t if caller_events else 0.0)) / 1000.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call.closed.wait(), rest + END_GRACE_S)
        result.clears = len(call.clears)
        result.heard_seconds = call.heard_seconds()
        result.duration_s = loop.time() - began


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    delay = when - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


def replay_file(
    path: str | Path,
    *,
    model: ModelChoice = "recorded",
    speed: Speed = "fast",
    url: str | None = None,
    auth_token: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ReplayResult:
    """Replay one recording synchronously (for scripts and tests): load, replay, compare. ``path`` is a
    file, or a blob URL (read with ``BRIDGE_STORAGE_KEY`` of ``environ``, else the managed identity)."""
    recording = load_recording_source(path, os.environ if environ is None else environ)
    coro = replay_recording(
        recording,
        name=Path(path).name,
        model=model,
        speed=speed,
        url=url,
        auth_token=auth_token,
        environ=environ,
    )
    return run(coro, speed=speed)

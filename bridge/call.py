"""Runs one call: owns its two sockets, feeds the :class:`~bridge.session.CallSession`, sends its outbox.

Life of a call
--------------
1. ``POST /twilio/voice`` makes a :class:`Call` and :meth:`Call.open_model` starts connecting to the
   Realtime service at once (pre-warm); the :class:`CallRegistry` keeps it until its stream arrives, or
   closes it after ``BRIDGE_PREWARM_TIMEOUT``.
2. The stream socket is authenticated by ``web.py``, which claims the call (or makes one, when the
   webhook went to another instance) and hands it the socket: :meth:`Call.run`.
3. Two readers -- Twilio and Realtime -- feed the session; every send goes through one write function per
   socket. Whichever side ends first sets :attr:`Call.finished`; ``run`` then closes both sockets and
   cancels both readers, so nothing outlives the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter
from typing import Any

from aiohttp import WSMsgType, web
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from bridge import __version__
from bridge import realtime as rt
from bridge import twilio as tw
from bridge.clock import Clock
from bridge.config import AudioPath
from bridge.errors import MalformedMessage, UpstreamError
from bridge.metrics import Metrics
from bridge.prompts import Profile, profile_to_mapping
from bridge.recordings import Direction, Header, RecordingFile, RecordingWriter, Source
from bridge.session import CallSession, ClearAudio, EndCall, Output, PlaceMark, PlayAudio
from bridge.store import CallRecord
from bridge.upstream import Upstream

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 1.0
"""How long to wait for a peer's close frame before dropping the TCP connection."""
MODEL_READY_TIMEOUT = 10.0
"""A stream whose model has not confirmed the session by then is ended (it would stay silent)."""
TWILIO_IDLE_TIMEOUT = 15.0
"""Twilio streams 50 frames a second for the whole call: this long without a message is a dead socket."""
GOODBYE_TIMEOUT = 10.0
"""At shutdown, how long the goodbye may take before calls are ended regardless."""
SEND_HIGH_WATER = 64 * 1024
"""Above this many bytes waiting in the Realtime socket's buffer, sends wait for it to drain."""
TIME_LIMIT_GOODBYE = (
    "I'm sorry, we have reached the time limit for this call. Thank you for calling, goodbye!"
)
TIME_LIMIT_GRACE = 20.0
"""After the time-limit goodbye starts, the call ends at the latest this much later."""

TranscriptListener = Callable[[str, str], Awaitable[None]]
"""Told ``(role, text)`` as each caller or assistant turn is transcribed (the admin page's test call)."""


class Call:
    """One phone call between a Twilio stream and a Realtime session."""

    def __init__(
        self,
        *,
        call_sid: str,
        profile: Profile,
        audio_path: AudioPath,
        upstream: Upstream,
        metrics: Metrics,
        clock: Clock,
        from_number: str = "",
        to_number: str = "",
        recordings_dir: Path | None = None,
        recording_suffix: str = ".jsonl",
        profile_id: int | None = None,
        profile_version: int | None = None,
        greeting_audio: bytes | None = None,
        test_call: bool = False,
        on_transcript: TranscriptListener | None = None,
        on_end: Callable[[Call], Awaitable[None]] | None = None,
    ) -> None:
        self.call_sid = call_sid
        self.session = CallSession(
            call_id=call_sid,
            profile=profile,
            audio_path=audio_path,
            clock=clock,
            greeting_audio=greeting_audio,
        )
        self.profile_id, self.profile_version = profile_id, profile_version
        self.from_number, self.to_number = from_number, to_number
        self.test_call = test_call
        self.model_failed = False
        """The model could not be reached or dropped the call: Twilio then speaks the fallback message."""
        self.started_wall = datetime.now(UTC)
        self._on_transcript = on_transcript
        self._on_end = on_end
        self.upstream = upstream
        self.metrics = metrics
        self.clock = clock
        self.finished = asyncio.Event()
        self.started_at = clock.now()
        self.end_reason: str | None = None
        self._twilio: web.WebSocketResponse | None = None
        self._model: ClientConnection | None = None
        self._adapter: rt.Adapter | None = None
        self._opening: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seen_unknown: set[str] = set()
        self._malformed: dict[str, int] = {}
        self._torn_down = False
        self._last_twilio = 0.0
        self.recording_path: Path | None = None
        self._recorder: RecordingWriter | None = None
        self._recording_file: RecordingFile | None = None
        if recordings_dir is not None:
            self._start_recording(
                recordings_dir, recording_suffix, profile, audio_path, from_number, to_number
            )

    # -- recording

    def _start_recording(
        self,
        directory: Path,
        suffix: str,
        profile: Profile,
        path: AudioPath,
        from_number: str,
        to_number: str,
    ) -> None:
        started = datetime.now(UTC)
        dialect = self.upstream.target.dialect
        header = Header(
            call_sid=self.call_sid,
            bridge_version=__version__,
            started_at=started.isoformat(timespec="milliseconds"),
            from_number=from_number,
            to_number=to_number,
            dialect=dialect.value,
            audio_path=path.value,
            session=rt.adapter_for(dialect).session_config(profile, path),
            profile=profile_to_mapping(profile),
            greeting_audio=self.session.greeting_audio or b"",
        )
        self.recording_path = directory / f"{started:%Y%m%dT%H%M%S}-{self.call_sid}{suffix}"
        try:
            self._recording_file = RecordingFile(self.recording_path)
        except OSError as exc:
            self._log(
                logging.ERROR,
                "cannot record to %s: %s; the call goes on unrecorded",
                self.recording_path,
                exc,
            )
            self.recording_path = None
            return
        self._recorder = RecordingWriter(header, self._recording_file)

    def _record(self, src: Source, direction: Direction, wire: str | bytes, at: float | None = None) -> None:
        recorder = self._recorder
        if recorder is not None:
            now = self.clock.now() if at is None else at
            try:
                recorder.write((now - self.started_at) * 1000.0, src, direction, wire)
            except OSError as exc:  # a full disk must not end the call
                self._log(logging.ERROR, "recording stopped: %s", exc)
                recorder.close()
                self._recorder = None

    # -- logging with the call's id

    def _log(self, level: int, message: str, *args: object) -> None:
        log.log(level, "call %s: " + message, self.call_sid, *args)

    # -- the Realtime side

    def open_model(self) -> asyncio.Task[None]:
        """Start connecting to the Realtime service (idempotent); returns the connecting task."""
        if self._opening is None:
            self._opening = self._spawn(self._open_model())
        return self._opening

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A bug, not a peer's fault: say so with the call id, and end the call rather than leave it mute.
            log.error("call %s: internal error in %s", self.call_sid, task.get_coro(), exc_info=exc)
            self._finish(f"internal error: {exc!r}")

    async def _open_model(self) -> None:
        began = perf_counter()
        try:
            self._model, self._adapter = await self.upstream.connect()
        except UpstreamError as exc:
            self.model_failed = True
            self.metrics.upstream_errors.inc(label="connect")
            self._log(logging.ERROR, "cannot open the Realtime session: %s", exc)
            self._finish(f"the model could not be reached: {exc}")
            return
        except Exception as exc:  # an unexpected failure must end the call, not leave it mute
            self.model_failed = True
            self.metrics.upstream_errors.inc(label="connect")
            self._log(logging.ERROR, "cannot open the Realtime session: %r", exc)
            self._finish(f"the model could not be reached: {exc!r}")
            return
        if self.finished.is_set():
            await self._model.close()
            return
        await self._dispatch(self.session.upstream_opened())
        self.metrics.connect_time.observe(perf_counter() - began)
        self._spawn(self._read_model())

    async def _read_model(self) -> None:
        model, adapter = self._model, self._adapter
        assert model is not None
        assert adapter is not None
        reason = "the model closed the connection"
        try:
            async for message in model:
                received = perf_counter()
                if self._recorder is not None:
                    self._record("model", "in", message)
                try:
                    event = adapter.parse(message)
                except MalformedMessage as exc:
                    if "dialect" in exc.reason:
                        self._log(logging.ERROR, "%s", exc.reason)
                        reason = exc.reason
                        break
                    self._skip("model", exc.reason)
                    continue
                if isinstance(event, rt.UnknownEvent):
                    self._once(event.type, "ignoring Realtime event %s (not used by the bridge)")
                    continue
                if isinstance(event, rt.ErrorEvent):
                    self._on_model_error(event)
                outputs = self.session.receive_realtime(event)
                if outputs:
                    await self._dispatch(outputs, received)
                if self._on_transcript is not None and isinstance(
                    event, rt.AssistantTranscript | rt.CallerTranscript
                ):
                    role = "assistant" if isinstance(event, rt.AssistantTranscript) else "caller"
                    with contextlib.suppress(Exception):  # a listener's failure is not the call's
                        await self._on_transcript(role, event.transcript)
        except ConnectionClosed as exc:
            reason = f"the model connection dropped ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
        finally:
            if model.close_code not in (None, 1000) and "dropped" not in reason:
                reason = f"the model closed the connection ({model.close_code} {model.close_reason})"
            if not self.finished.is_set():
                self.model_failed = True  # the model left a live call: the caller gets the fallback
            self._finish(reason)

    def _on_model_error(self, event: rt.ErrorEvent) -> None:
        if event.benign:
            self._log(logging.DEBUG, "benign Realtime error %s: %s", event.code, event.message)
            return
        self.metrics.upstream_errors.inc(label=event.code or "unknown")
        self._log(logging.WARNING, "Realtime error %s (%s): %s", event.code, event.param, event.message)

    # -- the Twilio side

    async def run(
        self,
        ws: web.WebSocketResponse,
        events: Sequence[tw.TwilioEvent],
        raw: Sequence[tuple[float, str | bytes]] = (),
    ) -> None:
        """Serve the stream ``ws`` until the call ends.

        ``events`` are the ones ``web.py`` read before handing over the socket (``connected``, ``start``);
        ``raw`` the messages they came from, with the clock time each arrived (for the recording).
        """
        for at, data in raw:
            self._record("twilio", "in", data, at)
        self._twilio = ws
        self.open_model()
        self.metrics.live_calls.inc()
        loop = asyncio.get_running_loop()
        ready_timer = loop.call_later(MODEL_READY_TIMEOUT, self._check_ready)
        limit_timer = loop.call_later(self.session.profile.max_call_seconds, self._time_limit)
        try:
            for event in events:
                await self._dispatch(self.session.receive_twilio(event))
            self._spawn(self._read_twilio(ws))
            await self.finished.wait()
        finally:
            ready_timer.cancel()
            limit_timer.cancel()
            self.metrics.live_calls.dec()
            await self.teardown()

    def _time_limit(self) -> None:
        """The profile's maximum call duration: say goodbye, and end the call soon after regardless."""
        if self.finished.is_set():
            return
        self._log(logging.INFO, "time limit of %d s reached", self.session.profile.max_call_seconds)
        self._spawn(self.goodbye(TIME_LIMIT_GOODBYE))
        asyncio.get_running_loop().call_later(
            TIME_LIMIT_GRACE, self._finish, "the call reached its time limit"
        )

    def _check_ready(self) -> None:
        if not self.session.live and not self.finished.is_set():
            self._log(
                logging.ERROR, "the model did not confirm the session within %.0f s", MODEL_READY_TIMEOUT
            )
            self._finish(f"the model did not confirm the session within {MODEL_READY_TIMEOUT:.0f} s")

    async def _read_twilio(self, ws: web.WebSocketResponse) -> None:
        session, metrics = self.session, self.metrics
        reason = "the Twilio stream closed"
        self._last_twilio = perf_counter()
        watchdog = asyncio.get_running_loop().call_later(TWILIO_IDLE_TIMEOUT / 3, self._watch_twilio)
        try:
            # No timeout per receive: a timer per frame costs more than the rest of the frame's handling.
            # The watchdog checks for a dead socket every few seconds instead.
            while True:
                msg = await ws.receive()
                received = self._last_twilio = perf_counter()
                if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                    if self._recorder is not None:
                        self._record("twilio", "in", msg.data)
                    try:
                        event = tw.parse_message(msg.data)
                    except MalformedMessage as exc:
                        self._skip("twilio", exc.reason)
                        continue
                else:
                    break  # close, closing, closed or error
                if isinstance(event, tw.UnknownEvent):
                    self._once(event.event, "ignoring unknown Twilio event %r")
                    continue
                outputs = session.receive_twilio(event)
                if outputs:
                    await self._dispatch(outputs, received)
                if type(event) is tw.Media:
                    metrics.frames_in.inc()
                    metrics.inbound_delay.observe(perf_counter() - received)
        finally:
            watchdog.cancel()
            self._finish(reason)

    def _watch_twilio(self) -> None:
        """Twilio sends 50 frames a second for the whole call: a long silence is a dead connection."""
        if self.finished.is_set():
            return
        if perf_counter() - self._last_twilio > TWILIO_IDLE_TIMEOUT:
            reason = f"nothing from Twilio for {TWILIO_IDLE_TIMEOUT:.0f} s: a dead connection"
            self._log(logging.WARNING, "%s", reason)
            self._finish(reason)
            return
        asyncio.get_running_loop().call_later(TWILIO_IDLE_TIMEOUT / 3, self._watch_twilio)

    # -- one write path per socket

    async def _dispatch(self, outputs: list[Output], received: float | None = None) -> None:
        generation = self.session.generation
        for out in outputs:
            kind = type(out)
            if (kind is PlayAudio or kind is PlaceMark) and self.session.generation != generation:
                continue  # a barge-in (from another task) happened while we were sending: drop the rest
            if kind is PlayAudio:
                assert isinstance(out, PlayAudio)
                await self._to_twilio(tw.serialize_media(self._sid(), out.payload))
                self.metrics.frames_out.inc()
                if received is not None:
                    self.metrics.outbound_delay.observe(perf_counter() - received)
            elif kind is PlaceMark:
                assert isinstance(out, PlaceMark)
                await self._to_twilio(tw.serialize_mark(self._sid(), out.name))
            elif kind is ClearAudio:
                await self._to_twilio(tw.serialize_clear(self._sid()))
                self.metrics.barge_ins.inc()
                if received is not None:
                    self.metrics.clear_delay.observe(perf_counter() - received)
            elif kind is EndCall:
                assert isinstance(out, EndCall)
                self._finish(out.reason)
            else:
                command: rt.ClientCommand = out  # type: ignore[assignment]
                if isinstance(command, rt.TruncateItem):
                    self.metrics.truncations.inc()
                    self._log(
                        logging.INFO,
                        "barge-in: truncating %s at %d ms",
                        command.item_id,
                        command.audio_end_ms,
                    )
                await self._to_model(command)

    def _sid(self) -> str:
        sid = self.session.stream_sid
        assert sid is not None, "nothing is sent to Twilio before its start event"
        return sid

    async def _to_twilio(self, text: str) -> None:
        ws = self._twilio
        if ws is None or ws.closed:
            return
        if self._recorder is not None:
            self._record("twilio", "out", text)
        try:
            await ws.send_str(text)
        except ConnectionError as exc:
            self._finish(f"the Twilio stream failed: {exc}")

    async def _to_model(self, command: rt.ClientCommand) -> None:
        model, adapter = self._model, self._adapter
        if model is None or adapter is None:
            self._log(
                logging.WARNING, "dropping %s: the Realtime session is not open", type(command).__name__
            )
            return
        wire = adapter.serialize(command)
        if self._recorder is not None:
            self._record("model", "out", wire)
        protocol, transport = model.protocol, model.transport
        if (
            protocol.state is State.OPEN
            and model.send_in_progress is None
            and transport.get_write_buffer_size() < SEND_HIGH_WATER
        ):
            # The hot path (50 appends a second per call): frame and write at once, as websockets' own
            # send would, without its per-message context manager and drain; backpressure still goes
            # through send() below once the transport's buffer fills.
            protocol.send_text(wire.encode())
            for data in protocol.data_to_send():
                if data:
                    transport.write(data)
            return
        try:
            await model.send(wire)
        except ConnectionClosed:
            self._finish("the model connection dropped")

    # -- bad input, logged and skipped

    def _skip(self, source: str, reason: str) -> None:
        self.metrics.malformed.inc(label=source)
        seen = self._malformed.get(reason, 0)
        self._malformed[reason] = seen + 1
        if seen == 0:
            self._log(logging.WARNING, "skipped a malformed %s message: %s", source, reason)

    def _once(self, key: str, message: str) -> None:
        if key not in self._seen_unknown:
            self._seen_unknown.add(key)
            self._log(logging.INFO, message, key)

    # -- the end

    def _finish(self, reason: str) -> None:
        if self.finished.is_set():
            return
        self.end_reason = reason
        self.session.end(reason)
        self.finished.set()

    async def goodbye(self, text: str) -> None:
        """Shutdown: have the model say ``text``; the call ends once the caller heard it."""
        await self._dispatch(self.session.say_goodbye(text))

    def abandon(self, reason: str) -> asyncio.Task[None]:
        """End a call that never got its stream (pre-warm timeout, shutdown)."""
        self._finish(reason)
        return asyncio.get_running_loop().create_task(self.teardown())

    async def teardown(self) -> None:
        """Close both sockets and stop every task of the call; idempotent."""
        if self._torn_down:
            return
        self._torn_down = True
        self._finish("ended")
        current = asyncio.current_task()
        closers: list[Any] = []
        if self._twilio is not None and not self._twilio.closed:
            closers.append(self._twilio.close(code=1000))
        if self._model is not None:
            closers.append(self._model.close())
        if closers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*closers, return_exceptions=True), CLOSE_TIMEOUT * 2)
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
        if self._recording_file is not None:
            self._recording_file.close()
        stats = self.session.stats
        outcome = "completed" if self.end_reason in ("the caller hung up", "said goodbye") else "ended"
        self.metrics.calls.inc(label=outcome)
        if self._on_end is not None:
            try:
                await self._on_end(self)
            except Exception:  # the record is not worth a crash at the end of a call
                log.exception("call %s: could not store its record", self.call_sid)
        self._log(
            logging.INFO,
            "ended after %.1f s (%s): %d frames in, %d out, %d barge-ins, truncations %s, %d upstream errors",
            self.clock.now() - self.started_at,
            self.end_reason,
            stats.frames_in,
            stats.frames_out,
            stats.barge_ins,
            stats.truncations,
            stats.upstream_errors,
        )

    def record(self) -> CallRecord:
        """What happened on the call, for the call log."""
        stats = self.session.stats
        turns = sorted(stats.turn_latencies_ms)
        latency: dict[str, float] = {}
        if turns:
            latency = {
                "turn_p50": round(turns[len(turns) // 2], 1),
                "turn_max": round(turns[-1], 1),
                "turns": float(len(turns)),
            }
        return CallRecord(
            call_sid=self.call_sid,
            started_at=self.started_wall,
            ended_at=datetime.now(UTC),
            from_number=self.from_number,
            to_number=self.to_number,
            profile_id=self.profile_id,
            profile_version=self.profile_version,
            end_reason=self.end_reason or "",
            transcript=tuple(stats.transcript),
            barge_ins=stats.barge_ins,
            truncations=tuple(stats.truncations),
            latency_ms=latency,
            upstream_errors=stats.upstream_errors,
            recording_path=str(self.recording_path) if self.recording_path else None,
            test_call=self.test_call,
        )

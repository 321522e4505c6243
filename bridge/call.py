"""Runs one call: owns its sockets, feeds the :class:`~bridge.session.CallSession`, sends what it queues.

Life of a call
--------------
1. ``POST /twilio/voice`` makes a :class:`Call` and :meth:`Call.open_model` starts connecting to the
   Realtime service at once (pre-warm); the registry (``registry.py``) keeps it until its stream arrives.
2. The stream socket is authenticated by ``web.py``, which claims the call (or makes one, when the
   webhook went to another instance) and hands it the socket: :meth:`Call.run`.
3. Readers -- Twilio's, and one per open Realtime session -- feed the session. After each event the driver
   takes what the session queued for each destination (:meth:`~bridge.session.CallSession.twilio_to_send`,
   :meth:`~bridge.session.CallSession.legs_to_send`, :meth:`~bridge.session.CallSession.model_to_send`)
   and sends it through that socket's one write path.
4. Time: one timer per call, set for :meth:`~bridge.session.CallSession.deadline`; when it fires the
   session's :meth:`~bridge.session.CallSession.tick` decides what is due (every timeout is the session's).
5. Twilio's side ending, or the session deciding the call is over (a Realtime session ending is the
   session's to handle), sets :attr:`Call.finished`; ``run`` then closes every socket and cancels every
   reader, so nothing outlives the call. :attr:`Call.end_reason` says why, as an
   :class:`~bridge.session.EndReason`.

The Realtime side is one :class:`~bridge.upstream.RealtimeConnection` per Realtime session of the call
(numbered 1, 2, 3…): the session decides when another is needed (a rollover, a reconnection; see
``rollover.py``) and queues :data:`~bridge.legs.LegCommand` values, which the driver carries out -- open
one (with the process's connect policy), send to one, close one -- before it sends the serving session's
commands, and it reports each socket's opening, failure and end back to the session. The recording tap
is a wrapper around each socket (:class:`~bridge.streams.TwilioStream`, and each connection's ``tap``), so
every message is recorded exactly where it crosses, with the number of its Realtime session
(:class:`~bridge.streams.CallRecorder`). A Realtime socket that must drain does so in a task of its own,
behind a bounded backlog (:class:`~bridge.streams.RealtimeLinks`): no reader waits for it, and one that
stalls is replaced. The call's figures reach the process's metrics through :class:`~bridge.tally.Tally`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from bridge import __version__, logs
from bridge import realtime as rt
from bridge import twilio as tw
from bridge.clock import Clock
from bridge.config import AudioPath
from bridge.errors import DialectMismatch, MalformedMessage, UpstreamError, UpstreamRejected
from bridge.legs import CloseLeg, LegCommand, OpenLeg
from bridge.metrics import Metrics
from bridge.prompts import Profile, profile_to_mapping
from bridge.recordings import Header, RecordingFile, RecordingWriter, Source
from bridge.session import DEFAULT_TIMEOUTS, CallSession
from bridge.states import EndReason, Timeouts
from bridge.streams import CallRecorder, RealtimeLinks, TwilioStream
from bridge.tally import Tally
from bridge.twilio import TwilioCommand
from bridge.upstream import RealtimeConnection, Tap, Upstream

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 1.0
"""How long to wait for a peer's close frame before dropping the TCP connection."""

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
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        from_number: str = "",
        to_number: str = "",
        recordings_dir: Path | None = None,
        recording_suffix: str = ".jsonl",
        profile_id: int | None = None,
        profile_version: int | None = None,
        greeting_audio: bytes | None = None,
        hold_audio: bytes | None = None,
        test_call: bool = False,
        on_transcript: TranscriptListener | None = None,
        on_end: Callable[[Call], Awaitable[None]] | None = None,
    ) -> None:
        self.call_sid = call_sid
        self._log_fields = {"call_sid": call_sid, "profile": profile.name}
        self._context = logs.call_context(self._log_fields)
        """The call's tasks run in it: their log lines carry the call's fields (``bridge.logs``)."""
        self.session = CallSession(
            call_id=call_sid,
            profile=profile,
            audio_path=audio_path,
            clock=clock,
            greeting_audio=greeting_audio,
            timeouts=timeouts,
        )
        self.session.hold_audio = hold_audio or None
        self.profile_id, self.profile_version = profile_id, profile_version
        self.from_number, self.to_number = from_number, to_number
        self.test_call = test_call
        self.upstream = upstream
        self.metrics = metrics
        self.clock = clock
        self.started_wall = datetime.fromtimestamp(clock.wall(), UTC)
        self.started_at = clock.now()
        self.finished = asyncio.Event()
        self._on_transcript = on_transcript
        self._on_end = on_end
        self._twilio: TwilioStream | None = None
        self.links = RealtimeLinks(self._write_failed, self._stalled, audio_path=audio_path, metrics=metrics)
        self._opening: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seen_unknown: set[str] = set()
        self._malformed: dict[str, int] = {}
        self._torn_down = False
        self.tally = Tally(self.session, metrics, clock)
        self.recorder: CallRecorder | None = None
        if recordings_dir is not None:
            self.recorder = self._open_recording(recordings_dir, recording_suffix)

    @property
    def end_reason(self) -> EndReason | None:
        """Why the call ended, once it has."""
        return self.session.end_reason

    @property
    def recording_path(self) -> Path | None:
        """Where the call is recorded, if it is."""
        return self.recorder.path if self.recorder is not None else None

    def _open_recording(self, directory: Path, suffix: str) -> CallRecorder | None:
        session, dialect = self.session, self.upstream.target.dialect
        header = Header(
            call_sid=self.call_sid,
            bridge_version=__version__,
            started_at=self.started_wall.isoformat(timespec="milliseconds"),
            from_number=self.from_number,
            to_number=self.to_number,
            dialect=dialect.value,
            audio_path=session.audio_path.value,
            session=rt.adapter_for(dialect).session_config(session.profile, session.audio_path),
            profile=profile_to_mapping(session.profile),
            rollover={
                "margin": session.timeouts.rollover_margin,
                "max_session": session.timeouts.max_session,
                "model_idle": session.timeouts.model_idle,
            },
            greeting_audio=session.greeting_audio or b"",
        )
        path = directory / f"{self.started_wall:%Y%m%dT%H%M%S}-{self.call_sid}{suffix}"
        try:
            sink = RecordingFile(path, self.clock)
        except OSError as exc:
            self._log(logging.ERROR, "cannot record to %s: %s; the call goes on unrecorded", path, exc)
            return None
        return CallRecorder(RecordingWriter(header, sink), sink, self.clock, self.started_at)

    def _tap(self, source: Source, session: int = 1) -> Tap | None:
        return self.recorder.tap(source, session) if self.recorder is not None else None

    def _log(self, level: int, message: str, *args: object, event: str | None = None) -> None:
        extra = {"event": event} if event else None
        log.log(level, "call %s: " + message, self.call_sid, *args, extra=extra)

    # -- tasks and the one timer

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, context=self._context)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._internal_error(task.get_coro(), exc)

    def _internal_error(self, where: object, exc: BaseException) -> None:
        """A bug, not a peer's fault: say so with the call id, and end the call rather than leave it mute."""
        log.error("call %s: internal error in %s", self.call_sid, where, exc_info=exc)
        self._end(EndReason.INTERNAL_ERROR, repr(exc))

    def _arm(self) -> None:
        """Set the call's one timer for the session's next deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.session.deadline()
        if deadline is not None and not self.finished.is_set():
            delay = max(0.0, deadline - self.clock.now())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        try:
            self.session.tick(self.clock.now())
        except Exception as exc:  # a loop callback has no task to report it: end the call here
            self._internal_error("the session's tick", exc)
            return
        self._spawn(self._flush())
        self._arm()

    # -- the Realtime side

    def open_model(self) -> asyncio.Task[None]:
        """Start connecting to the Realtime service (idempotent); returns the connecting task."""
        if self._opening is None:
            self._opening = self._spawn(self._open_model())
            self._arm()
        return self._opening

    async def _open_model(self) -> None:
        began = self.clock.now()
        try:
            model = await self.upstream.connect(tap=self._tap("model"))
        except Exception as exc:  # unexpected ones too: the model leg failed, the caller hears the fallback
            expected = isinstance(exc, UpstreamError)
            self.metrics.upstream_errors.inc(label="connect")
            log.error(
                "call %s: cannot open the Realtime session: %s",
                self.call_sid,
                exc if expected else repr(exc),
                exc_info=None if expected else exc,
            )
            self._end(EndReason.MODEL_UNREACHABLE, str(exc) if expected else repr(exc))
            return
        if self.finished.is_set():
            await model.close()
            return
        self.links.open[1] = model
        self.session.upstream_opened()
        await self._flush()
        self.metrics.connect_time.observe(self.clock.now() - began)
        self._spawn(self._read_model(1, model))

    async def _open_leg(self, command: OpenLeg) -> None:
        """Open Realtime session ``command.number`` for the session (a rollover or a reconnection)."""
        number = command.number
        try:
            model = await self.upstream.connect(
                tap=self._tap("model", number), budget=command.budget, wait_for_breaker=True
            )
        except UpstreamError as exc:
            self.metrics.upstream_errors.inc(label="connect")
            self._log(logging.WARNING, "cannot open Realtime session %d: %s", number, exc)
            self.session.leg_failed(number, str(exc), fatal=isinstance(exc, UpstreamRejected))
            await self._flush()
            return
        if self.finished.is_set():
            await model.close()
            return
        self.links.open[number] = model
        self.session.leg_opened(number)
        await self._flush()
        self._spawn(self._read_model(number, model))

    async def _read_model(self, number: int, model: RealtimeConnection) -> None:
        session, clock = self.session, self.clock
        reason, detail = EndReason.MODEL_CLOSED, ""
        try:
            while True:
                try:
                    event = await model.receive()
                except MalformedMessage as exc:
                    self._skip("model", exc.reason)
                    continue
                received = clock.now()
                if isinstance(event, rt.UnknownEvent):
                    self._once(event.type, "ignoring Realtime event %s (not used by the bridge)")
                    continue
                if isinstance(event, rt.ErrorEvent):
                    self._on_model_error(event)
                session.receive_realtime(event, number)
                await self._flush(received)
                if self._on_transcript is not None and isinstance(
                    event, rt.AssistantTranscript | rt.CallerTranscript
                ):
                    await self._tell_transcript(event)
        except DialectMismatch as exc:
            self._log(logging.ERROR, "%s", exc)
            reason, detail = EndReason.MODEL_WRONG_DIALECT, str(exc)
        except ConnectionClosedOK:
            if model.close_code not in (None, 1000):
                detail = f"{model.close_code} {model.close_reason}"
        except ConnectionClosed as exc:
            reason = EndReason.MODEL_DROPPED
            detail = str(exc.rcvd.code) if exc.rcvd else "no close frame"
        if self.links.open.get(number) is not model:
            return  # the bridge closed it (a rollover, or the call's end)
        del self.links.open[number]
        if not self.finished.is_set():
            self._log(
                logging.WARNING,
                "Realtime session %d: %s%s",
                number,
                reason.value,
                f" ({detail})" if detail else "",
            )
        self.session.leg_closed(number, reason, detail)
        if not self.session.ended:
            await self._flush()
        else:
            self._end(reason, detail)

    async def _tell_transcript(self, event: rt.AssistantTranscript | rt.CallerTranscript) -> None:
        listener = self._on_transcript
        assert listener is not None
        role = "assistant" if isinstance(event, rt.AssistantTranscript) else "caller"
        try:
            await listener(role, event.transcript)
        except (ConnectionError, RuntimeError) as exc:
            # The listener is a browser's socket (the admin test call): its failure is not the call's.
            self._log(logging.INFO, "the transcript listener failed (%r); the call goes on", exc)

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
        logs.CALL.set(self._log_fields)  # the handler's own lines too
        for event in events:
            if isinstance(event, tw.Start):
                self._log_fields["stream_sid"] = event.stream_sid
        if self.recorder is not None:
            for at, data in raw:
                self.recorder.write("twilio", "in", data, at)
        stream = self._twilio = TwilioStream(ws, self._tap("twilio"))
        self.open_model()
        self.metrics.live_calls.inc()
        try:
            for event in events:
                self.session.receive_twilio(event)
                await self._flush()
            self._arm()  # the stream has started: the session's deadlines are a live call's now
            self._spawn(self._read_twilio(stream))
            await self.finished.wait()
        finally:
            self.metrics.live_calls.dec()
            await self.teardown()

    async def _read_twilio(self, stream: TwilioStream) -> None:
        session, metrics, clock = self.session, self.metrics, self.clock
        # No timeout per receive: a timer per frame costs more than the rest of the frame's handling.
        # A dead socket is the session's to notice (Timeouts.twilio_idle), on the call's one timer.
        while True:
            msg = await stream.receive()
            received = clock.now()
            if msg.type is not WSMsgType.TEXT and msg.type is not WSMsgType.BINARY:
                break  # close, closing, closed or error
            try:
                event = tw.parse_message(msg.data)
            except MalformedMessage as exc:
                self._skip("twilio", exc.reason)
                continue
            if type(event) is tw.UnknownEvent:
                self._once(event.event, "ignoring unknown Twilio event %r")
                continue
            session.receive_twilio(event)
            await self._flush()  # (frames an echo lets go are not timed: outbound_delay times the model's)
            if type(event) is tw.Media:
                metrics.frames_in.inc()
                metrics.inbound_delay.observe(clock.now() - received)
        self._end(EndReason.TWILIO_CLOSED)

    # -- one write path per socket

    async def _flush(self, received: float | None = None) -> None:
        """Send what the session queued: Twilio's first (a barge-in's ``clear`` before its truncate), then
        what is owed to other Realtime sessions, then the serving session's commands."""
        session = self.session
        # Every queue is taken before the first await: a barge-in's truncate must never overtake its clear,
        # and the serving session is the one that was serving when its commands were queued.
        to_twilio = session.twilio_to_send()
        to_legs = session.legs_to_send()
        to_model = session.model_to_send()
        serving = session.leg
        if to_twilio:
            await self._send_twilio(to_twilio)
        if to_legs:
            self._do_legs(to_legs)
        if to_model:  # the hot path (50 appends a second): no coroutine unless the socket must drain
            draining = self.links.write(serving, to_model)
            if draining is not None:  # drained by a task of its own: this reader goes on (a bounded backlog)
                self._spawn(draining)
        self.tally.sent(received)
        if session.rearm:
            session.rearm = False
            self._arm()
        if session.ended and not self.finished.is_set():
            self._finished()  # the session decided (Twilio's stop, the goodbye heard, a timeout)

    def _stalled(self, number: int, unsent: list[bytes], detail: str) -> None:
        """Realtime session ``number``'s socket takes no more (``streams.RealtimeLinks``): the session
        replaces it (and says so), with the caller audio it never got."""
        self.session.leg_stalled(number, unsent, detail)
        self._spawn(self._flush())

    def _write_failed(self, number: int) -> None:
        """Writing to Realtime session ``number`` failed (its socket is gone): the session decides."""
        self.session.leg_closed(number, EndReason.MODEL_DROPPED, "while sending")
        if self.session.ended:
            self._end(EndReason.MODEL_DROPPED, "while sending")
        else:
            self._spawn(self._flush())  # (from a drain's task: no reader's flush follows)

    def _do_legs(self, commands: list[LegCommand]) -> None:
        """Carry out what the session asked of its other Realtime sessions, in order."""
        for command in commands:
            if isinstance(command, OpenLeg):
                self._spawn(self._open_leg(command))
            elif isinstance(command, CloseLeg):
                if command.grace > 0:
                    self._spawn(self._close_later(command.number, command.grace))
                else:
                    model = self.links.open.pop(command.number, None)
                    if model is not None:
                        self._spawn(model.close())
            else:
                draining = self.links.write(command.number, command.commands)
                if draining is not None:
                    self._spawn(draining)
        self.tally.legs()

    async def _close_later(self, number: int, grace: float) -> None:
        """Close session ``number`` after ``grace`` s (its reader hands the session what still comes)."""
        model = self.links.open.get(number)
        await asyncio.sleep(grace)
        if model is not None and self.links.open.get(number) is model:
            del self.links.open[number]
            await model.close()

    async def _send_twilio(self, commands: list[TwilioCommand]) -> None:
        session, stream = self.session, self._twilio
        sid = session.stream_sid
        if stream is None or sid is None:
            return  # the session queues nothing for Twilio before its start: a pre-warm ending
        generation = session.generation
        try:
            for command in commands:
                if session.generation != generation:
                    break  # a barge-in (by the other reader) happened while sending: the rest is stale
                pending = stream.send(command.wire(sid))
                if pending is not None:
                    await pending
        except ConnectionError as exc:
            self._end(EndReason.TWILIO_FAILED, str(exc))

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

    def _end(self, reason: EndReason, detail: str = "") -> None:
        """The call is over (the session's own reason, when it set one first, is kept)."""
        self.session.end(reason, detail)
        self._finished()

    def _finished(self) -> None:
        if not self.finished.is_set():
            self.finished.set()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    async def goodbye(self, text: str) -> None:
        """Shutdown: have the model say ``text``; the call ends once the caller heard it."""
        self.session.say_goodbye(text)
        await self._flush()

    def abandon(self, reason: EndReason) -> asyncio.Task[None]:
        """End a call that never got its stream (pre-warm timeout, shutdown)."""
        self._end(reason)
        return asyncio.get_running_loop().create_task(self.teardown(), context=self._context)

    async def teardown(self) -> None:
        """Close every socket and stop every task of the call; idempotent."""
        if self._torn_down:
            return
        self._torn_down = True
        self._end(EndReason.SHUTDOWN)
        current = asyncio.current_task()
        closers: list[Coroutine[Any, Any, None]] = []
        if self._twilio is not None and not self._twilio.ws.closed:
            closers.append(self._close_twilio(self._twilio.ws))
        closers.extend(model.close() for model in self.links.open.values())
        if closers:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT * 2):
                    results = await asyncio.gather(*closers, return_exceptions=True)
            except TimeoutError:
                self._log(logging.INFO, "a peer did not finish closing within %.0f s", CLOSE_TIMEOUT * 2)
            else:
                for result in results:
                    if isinstance(result, Exception):
                        self._log(logging.INFO, "closing a socket failed (it was gone): %r", result)
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.recorder is not None:
            self.recorder.close()
        self.tally.ended()
        stats = self.session.stats
        if self._on_end is not None:
            try:
                await self._on_end(self)
            except Exception:  # the record must not stop the teardown of the other calls (a drain)
                log.exception("call %s: its outcome or record could not be kept", self.call_sid)
        self._log(
            logging.INFO,
            "ended after %.1f s (%s): %d frames in, %d out, %d barge-ins, truncations %s, %d upstream errors",
            self.clock.now() - self.started_at,
            self.session.describe_end(),
            stats.frames_in,
            stats.frames_out,
            stats.barge_ins,
            stats.truncations,
            stats.upstream_errors,
            event="call_ended",
        )

    @staticmethod
    async def _close_twilio(ws: web.WebSocketResponse) -> None:
        await ws.close(code=1000)

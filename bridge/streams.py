"""The thin layers around a call's sockets: their one write path each, and the call's recording.

:class:`TwilioStream` wraps the Media Streams socket of one call (aiohttp's server WebSocket): every send
goes through it, and it taps each message for the recording. :class:`RealtimeLinks` holds the call's open
Realtime sessions by number and writes to each in order, even when a socket must drain while other
batches arrive, and gives up a socket that stalls with caller audio waiting for it (a bounded backlog).
:class:`CallRecorder` is the recording: each socket gets a tap (the Realtime sessions'
carry their number), and every message is written as it crossed, timed from the call's start. Kept apart
from ``call.py``, which drives the call.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMessage, WSMsgType, web
from websockets.exceptions import ConnectionClosed

from bridge import realtime as rt
from bridge.audio import model_bytes_to_ms
from bridge.clock import Clock
from bridge.config import AudioPath
from bridge.metrics import Metrics
from bridge.recordings import Direction, RecordingFile, RecordingWriter, Source
from bridge.upstream import RealtimeConnection, Tap

log = logging.getLogger(__name__)


class CallRecorder:
    """One call's recording: the header, then every message of its sockets, timed from the call's start.

    Each socket gets a :meth:`tap`; a write that fails (a full disk) stops the recording, never the call.
    """

    def __init__(self, writer: RecordingWriter, sink: RecordingFile, clock: Clock, started_at: float) -> None:
        self.path = sink.path
        self._writer: RecordingWriter | None = writer
        self._sink = sink
        self._clock = clock
        self._started_at = started_at

    def tap(self, source: Source, session: int = 1) -> Tap:
        """What a socket calls with each message that crosses it (``session``: its Realtime session)."""

        def tap(direction: Direction, wire: str | bytes) -> None:
            self.write(source, direction, wire, session=session)

        return tap

    def write(
        self,
        source: Source,
        direction: Direction,
        wire: str | bytes,
        at: float | None = None,
        session: int = 1,
    ) -> None:
        """Record one message (``at``: when it crossed, if not now)."""
        writer = self._writer
        if writer is None:
            return
        now = self._clock.now() if at is None else at
        try:
            writer.write((now - self._started_at) * 1000.0, source, direction, wire, session)
        except OSError as exc:  # a full disk must not end the call
            log.error("recording %s stopped: %s", self.path, exc)
            self.close()

    def close(self) -> None:
        """Flush and close the file; idempotent."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._sink.close()


class TwilioStream:
    """The Twilio Media Streams socket of one call: its one write path, and its recording tap."""

    def __init__(self, ws: web.WebSocketResponse, tap: Tap | None) -> None:
        self.ws = ws
        self._tap = tap

    def receive(self) -> Awaitable[WSMessage]:
        """What to await for the next message (recorded when it is data). Unrecorded, it is aiohttp's own
        ``receive``: no extra coroutine per frame."""
        return self.ws.receive() if self._tap is None else self._receive_recorded()

    async def _receive_recorded(self) -> WSMessage:
        msg = await self.ws.receive()
        if self._tap is not None and (msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY):
            self._tap("in", msg.data)
        return msg

    def send(self, text: str) -> Awaitable[None] | None:
        """Send one message: returns what to await, or ``None`` when the socket is closed (nothing is
        sent then; the reader ends the call). Awaiting raises ``ConnectionError`` if the send fails."""
        ws = self.ws
        if ws.closed:
            return None
        if self._tap is not None:
            self._tap("out", text)
        return ws.send_str(text)


MODEL_STALL_SECONDS = 2.0
"""A Realtime socket that takes nothing while this much caller audio is written to it is stalled."""
MODEL_BACKLOG_CAP_SECONDS = 10.0
"""A Realtime socket with this much caller audio waiting (beyond the batch that formed its backlog)
cannot keep up."""

Stalled = Callable[[int, list[bytes], str], None]
"""Told that a Realtime session's socket is stalled: its number, the caller audio it never got, and why."""


class RealtimeLinks:
    """A call's open Realtime sessions by number, and the one write path to each.

    :meth:`write` writes a batch of commands at once, as long as the socket takes them without waiting
    (no coroutine: the 50 appends a second of a call go this way). When the socket must drain, the rest
    of the batch, and every batch written to that session meanwhile by another reader's flush, wait in
    its backlog and go out in order: a caller frame never overtakes the held audio or the conversation
    carried into a new session.

    The backlog is bounded, in seconds of caller audio written to it after it formed (the batch that formed
    it is bounded where it comes from: the session holds at most 30 s while it reconnects). When the
    socket takes nothing while :data:`MODEL_STALL_SECONDS` of caller audio arrives, or more than
    :data:`MODEL_BACKLOG_CAP_SECONDS` beyond that batch waits, the socket is stalled: the backlog is dropped,
    its caller audio handed to ``on_stalled``, and the driver has the session replace it (a reconnection
    with the cause ``stalled``, the audio held for the next session). Nothing more is written to it. So the
    bridge holds at most the batch that formed a backlog and :data:`MODEL_BACKLOG_CAP_SECONDS` more per
    socket, besides what the transport buffers (``upstream.SEND_HIGH_WATER``) and the kernel's socket.
    """

    def __init__(
        self,
        on_write_failed: Callable[[int], None],
        on_stalled: Stalled | None = None,
        *,
        audio_path: AudioPath = AudioPath.PCM16,
        metrics: Metrics | None = None,
    ) -> None:
        self.open: dict[int, RealtimeConnection] = {}
        """The open Realtime sessions of the call, by number (the serving one is the session's ``leg``)."""
        self._backlog: dict[int, _Backlog] = {}
        self._stalled: set[int] = set()
        """Sessions given up as stalled: nothing more is written to them (the driver closes them)."""
        self._on_write_failed = on_write_failed
        self._on_stalled = on_stalled
        self._per_second = 1000.0 / model_bytes_to_ms(1, audio_path)  # bytes of caller audio a second
        self._stall_bytes = int(MODEL_STALL_SECONDS * self._per_second)
        self._cap_bytes = int(MODEL_BACKLOG_CAP_SECONDS * self._per_second)
        self._metrics = metrics

    def write(self, number: int, commands: list[rt.ClientCommand]) -> Coroutine[Any, Any, None] | None:
        """Write ``commands`` to session ``number`` (nothing when it is not open): ``None`` when all went
        out, else the coroutine that sends the rest (the caller runs it, as a task of its own)."""
        backlog = self._backlog.get(number)
        if backlog is not None:
            backlog.commands.extend(commands)  # behind the batch that is draining
            audio = _audio_bytes(commands)
            if audio:
                backlog.add(audio)
                if backlog.since_progress > self._stall_bytes or backlog.waiting > backlog.limit:
                    self._stall(number, backlog)
            return None
        model = self.open.get(number)
        if model is None or number in self._stalled:
            return None
        for i, command in enumerate(commands):
            pending = model.write(command)
            if pending is not None:
                rest = deque(commands[i + 1 :])
                waiting = _audio_bytes(rest)
                backlog = self._backlog[number] = _Backlog(rest, waiting, waiting + self._cap_bytes, waiting)
                return self._drain(number, model, pending, backlog)
        return None

    def backlog_seconds(self, number: int) -> float:
        """Seconds of caller audio waiting for session ``number``'s socket."""
        backlog = self._backlog.get(number)
        return 0.0 if backlog is None else backlog.waiting / self._per_second

    def _stall(self, number: int, backlog: _Backlog) -> None:
        del self._backlog[number]
        self._stalled.add(number)
        unsent = [c.audio for c in backlog.commands if type(c) is rt.AppendAudio]
        backlog.commands.clear()  # its drain sends nothing more
        per_second = self._per_second
        if self._metrics is not None:
            self._metrics.model_bound_hits.inc()
            self._metrics.model_backlog.observe(backlog.peak / per_second)
        if backlog.since_progress > self._stall_bytes:
            why = f"took nothing while {backlog.since_progress / per_second:.1f} s of caller audio came"
        else:
            why = f"had {backlog.waiting / per_second:.1f} s of caller audio waiting"
        if self._on_stalled is not None:
            self._on_stalled(number, unsent, f"stalled: its socket {why}")

    async def _drain(
        self, number: int, model: RealtimeConnection, pending: Awaitable[None], backlog: _Backlog
    ) -> None:
        commands = backlog.commands
        try:
            await pending
            while commands:
                backlog.since_progress = 0  # the socket took something: not stalled
                command = commands.popleft()
                if type(command) is rt.AppendAudio:
                    backlog.waiting -= len(command.audio)
                more = model.write(command)
                if more is not None:
                    await more
        except ConnectionClosed:
            if self.open.get(number) is model:
                del self.open[number]
                self._on_write_failed(number)
        finally:
            if self._backlog.get(number) is backlog:  # (not given up as stalled)
                del self._backlog[number]
                if self._metrics is not None:
                    self._metrics.model_backlog.observe(backlog.peak / self._per_second)


@dataclass(slots=True)
class _Backlog:
    """What waits for one Realtime socket to drain, and how much caller audio came to it."""

    commands: deque[rt.ClientCommand]
    waiting: int
    """Bytes of caller audio in :attr:`commands`."""
    limit: int
    """At most this much may wait: the batch that formed the backlog, plus the cap."""
    peak: int = 0
    since_progress: int = 0
    """Bytes of caller audio written to it since the socket last took a message."""

    def add(self, audio: int) -> None:
        self.waiting += audio
        self.peak = max(self.peak, self.waiting)
        self.since_progress += audio


def _audio_bytes(commands: Iterable[rt.ClientCommand]) -> int:
    return sum(len(c.audio) for c in commands if type(c) is rt.AppendAudio)

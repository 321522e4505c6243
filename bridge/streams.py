"""The thin layers around a call's sockets: their one write path each, and the call's recording.

:class:`TwilioStream` wraps the Media Streams socket of one call (aiohttp's server WebSocket): every send
goes through it, and it taps each message for the recording. :class:`RealtimeLinks` holds the call's open
Realtime sessions by number and writes to each in order, even when a socket must drain while other
batches arrive. :class:`CallRecorder` is the recording: each socket gets a tap (the Realtime sessions'
carry their number), and every message is written as it crossed, timed from the call's start. Kept apart
from ``call.py``, which drives the call.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable

from aiohttp import WSMessage, WSMsgType, web
from websockets.exceptions import ConnectionClosed

from bridge import realtime as rt
from bridge.clock import Clock
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


class RealtimeLinks:
    """A call's open Realtime sessions by number, and the one write path to each.

    :meth:`write` writes a batch of commands at once, as long as the socket takes them without waiting
    (no coroutine: the 50 appends a second of a call go this way). When the socket must drain, the rest
    of the batch, and every batch written to that session meanwhile by another reader's flush, wait in
    its backlog and go out in order: a caller frame never overtakes the held audio or the conversation
    carried into a new session.
    """

    def __init__(self, on_write_failed: Callable[[int], None]) -> None:
        self.open: dict[int, RealtimeConnection] = {}
        """The open Realtime sessions of the call, by number (the serving one is the session's ``leg``)."""
        self._backlog: dict[int, deque[rt.ClientCommand]] = {}
        self._on_write_failed = on_write_failed

    def write(self, number: int, commands: list[rt.ClientCommand]) -> Awaitable[None] | None:
        """Write ``commands`` to session ``number`` (nothing when it is not open): ``None`` when all went
        out, else what to await for the rest."""
        backlog = self._backlog.get(number)
        if backlog is not None:
            backlog.extend(commands)  # behind the batch that is draining
            return None
        model = self.open.get(number)
        if model is None:
            return None
        for i, command in enumerate(commands):
            pending = model.write(command)
            if pending is not None:
                self._backlog[number] = deque(commands[i + 1 :])
                return self._drain(number, model, pending)
        return None

    async def _drain(self, number: int, model: RealtimeConnection, pending: Awaitable[None]) -> None:
        backlog = self._backlog[number]
        try:
            await pending
            while backlog:
                more = model.write(backlog.popleft())
                if more is not None:
                    await more
        except ConnectionClosed:
            if self.open.get(number) is model:
                del self.open[number]
                self._on_write_failed(number)
        finally:
            del self._backlog[number]

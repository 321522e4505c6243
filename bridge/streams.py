"""The Twilio stream socket's one write path, and a call's recording: the thin layers around a call's sockets.

:class:`TwilioStream` wraps the Media Streams socket of one call (aiohttp's server WebSocket): every send
goes through it, and it taps each message for the recording. :class:`CallRecorder` is that recording:
each socket gets a tap (the Realtime sessions' carry their number), and every message is written as it
crossed, timed from the call's start. Kept apart from ``call.py``, which drives the call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from aiohttp import WSMessage, WSMsgType, web

from bridge.clock import Clock
from bridge.recordings import Direction, RecordingFile, RecordingWriter, Source
from bridge.upstream import Tap

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

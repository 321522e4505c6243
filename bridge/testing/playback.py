"""Twilio's playback of what a bridge sends on a media stream, as a model in loop time (no I/O).

Twilio plays a stream's outbound audio from one FIFO (docs/protocols.md §1.3): ``media`` payloads queue
and play at 8 bytes per ms; a ``mark`` queues behind the audio sent before it and is echoed when
playback reaches it (at once on an empty buffer); ``clear`` drops every buffered byte and echoes every
pending mark at once. After a clear, or whenever the FIFO runs dry, playback starts afresh with the
next audio: idle time is never counted as played.

:class:`Playback` is that FIFO. Its owner (the caller double) tells it what arrived and when, advances
it by elapsed time, and sends the echoes it returns.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = ["BYTES_PER_SECOND", "Playback", "PlayedMark"]

BYTES_PER_SECOND: Final = 8000
"""μ-law at 8 kHz: 8 bytes per ms, for playback and for ``heard_seconds``."""


@dataclass
class PlayedMark:
    """A mark the double echoed back to the bridge."""

    name: str
    played: bool
    """True: playback reached it; False: a ``clear`` flushed it first."""
    at: float
    """Loop time of the echo."""


class _QueuedMark:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class Playback:
    """One stream's playback FIFO of audio chunks and marks, advanced by elapsed time.

    Every method takes ``now`` (loop time) and first plays the FIFO up to it, so the caller may advance
    it as often or as rarely as it likes without drift. Methods return the names of the marks playback
    reached, in order, for the caller to echo; they are already in :attr:`marks`.
    """

    def __init__(self) -> None:
        self.played = bytearray()
        """μ-law actually played, in order; flushed audio is never in it."""
        self.marks: list[PlayedMark] = []
        """Every mark echoed so far, played or flushed, in echo order."""
        # The head chunk is played from _head_offset on. Played bytes are counted from _epoch (when
        # playback last started from empty), so there is no drift.
        self._queue: deque[bytes | _QueuedMark] = deque()
        self._head_offset = 0
        self._epoch = 0.0
        self._epoch_bytes = 0
        self.peak_buffered = 0
        """The most bytes ever queued and not yet played, as audio arrived."""

    @property
    def idle(self) -> bool:
        """Nothing is queued: no audio to play, no mark to reach."""
        return not self._queue

    def heard_seconds(self) -> float:
        """Seconds of audio played so far (as of the last advance)."""
        return len(self.played) / BYTES_PER_SECOND

    def buffered_seconds(self) -> float:
        """Seconds of audio queued and not yet played."""
        queued = sum(len(item) for item in self._queue if isinstance(item, bytes))
        return (queued - self._head_offset) / BYTES_PER_SECOND

    def media(self, payload: bytes, now: float) -> list[str]:
        """A ``media`` payload arrived: it queues behind what is playing."""
        reached = self.advance(now)  # catch up first
        if payload:
            self._queue.append(payload)
            queued = sum(len(item) for item in self._queue if isinstance(item, bytes)) - self._head_offset
            self.peak_buffered = max(self.peak_buffered, queued)
        return reached

    def mark(self, name: str, now: float) -> list[str]:
        """A ``mark`` arrived: it queues behind the audio; on an empty buffer it is reached at once."""
        reached = self.advance(now)
        self._queue.append(_QueuedMark(name))
        return reached + self.advance(now)

    def clear(self, now: float) -> tuple[list[str], list[str]]:
        """A ``clear`` arrived: what played until ``now`` is played, the rest is dropped.

        Returns the marks reached before the clear, then those flushed by it (recorded as not played).
        """
        reached = self.advance(now)
        flushed = [item.name for item in self._queue if isinstance(item, _QueuedMark)]
        self._queue.clear()
        self._head_offset = 0
        self._epoch = now
        self._epoch_bytes = 0
        self.marks.extend(PlayedMark(name, False, now) for name in flushed)
        return reached, flushed

    def advance(self, now: float) -> list[str]:
        """Play the FIFO up to ``now``; return the marks playback reached, in order."""
        queue = self._queue
        reached: list[str] = []
        budget = int((now - self._epoch) * BYTES_PER_SECOND) - self._epoch_bytes
        while queue:
            head = queue[0]
            if isinstance(head, _QueuedMark):
                queue.popleft()
                reached.append(head.name)
                continue
            if budget <= 0:
                break
            offset = self._head_offset
            take = min(len(head) - offset, budget)
            self.played += head[offset : offset + take]
            budget -= take
            self._epoch_bytes += take
            if offset + take == len(head):
                queue.popleft()
                self._head_offset = 0
            else:
                self._head_offset = offset + take
        if not queue:  # idle: the next audio starts playing when it arrives
            self._epoch = now
            self._epoch_bytes = 0
        for name in reached:
            self.marks.append(PlayedMark(name, True, now))
        return reached

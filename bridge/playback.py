"""The playback ledger of a call: what the caller heard of the model, proved by Twilio's marks. No I/O.

Every outbound frame is followed, every few frames, by a Twilio ``mark``. Marks are the only proof of what
the caller heard (Twilio's inbound ``timestamp`` is not): when a mark echoes, the item it closes has been
played up to that mark's byte position. Between echoes the position is interpolated with the clock, never
past the next unechoed mark. A ``mark`` echoed after a ``clear`` was flushed, not played, and proves nothing.

:class:`Playback` is the part of :class:`~bridge.session.CallSession` that keeps the ledger (a base class
of it, sharing its state); it is here so that each module stays readable on its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bridge import realtime as rt
from bridge.audio import Framer, OutboundTranscoder, model_bytes_to_ms
from bridge.clock import Clock
from bridge.config import AudioPath
from bridge.states import CallMachine
from bridge.twilio import PlaceMark, PlayAudio, TwilioCommand

ULAW_BYTES_PER_MS = 8


@dataclass(slots=True)
class Item:
    """One assistant message item and how much of its audio was generated, sent and heard."""

    item_id: str
    response_id: str
    model_bytes: int = 0
    """Bytes of model audio received (the model's own format): what truncate is clamped to."""
    sent_bytes: int = 0
    """μ-law bytes sent to Twilio for this item."""
    heard_bytes: int = 0
    """μ-law bytes proved played: the position of this item's last echoed mark."""
    local: bool = False
    """Audio the bridge played itself (a pre-rendered greeting): not the model's to truncate."""
    leg: int = 0
    """The Realtime session that generated it (0: the bridge's own audio)."""


@dataclass(slots=True)
class Mark:
    """A mark in flight: when it echoes, ``item`` was played up to ``position`` μ-law bytes."""

    seq: int
    item: Item
    position: int
    segment_sent_at: float
    """When the first frame between the previous mark and this one was sent."""


@dataclass(slots=True)
class Stats:
    """What happened on the call, for metrics and the call record."""

    frames_in: int = 0
    frames_out: int = 0
    frames_queued_dropped: int = 0
    marks_sent: int = 0
    marks_played: int = 0
    marks_ignored: int = 0
    barge_ins: int = 0
    truncations: list[tuple[str, int]] = field(default_factory=list)
    cancels: int = 0
    late_deltas_dropped: int = 0
    upstream_errors: int = 0
    dtmf: list[str] = field(default_factory=list)
    transcript: list[tuple[str, str]] = field(default_factory=list)
    turn_latencies_ms: list[float] = field(default_factory=list)
    """End of the caller's turn (``speech_stopped``) to the first frame of the answer sent."""
    rollovers: int = 0
    reconnects: list[str] = field(default_factory=list)
    """Why each lost session was lost (``dropped``, ``session_expired``, ``server_error``, ``idle``…)."""
    reconnect_gaps: list[float] = field(default_factory=list)
    """Seconds from each loss to the swap to the session that replaced it."""
    holds_played: int = 0
    frames_discarded: dict[str, int] = field(default_factory=dict)
    """Media that was not this call's caller audio, by why (before start, another stream, a track)."""
    sequence_gaps: int = 0
    """Times Twilio's sequence numbers of caller media jumped."""


class Playback(CallMachine):
    """Frames, marks and the ledger of the model's audio (see the module docstring)."""

    # The state this part reads and writes; :class:`~bridge.session.CallSession` sets it up.
    clock: Clock
    audio_path: AudioPath
    stats: Stats
    stream_sid: str | None
    _to_twilio: list[TwilioCommand]
    _mark_every: int
    _outbound: OutboundTranscoder
    _framer: Framer
    _items: dict[str, Item]
    _current: Item | None
    _active_response: str | None
    _turn_ended_at: float | None
    _ledger: deque[Mark]
    _mark_seq: int
    _unmarked_frames: int
    _unmarked_since: float
    _last_echo_at: float
    _dropped: set[str]
    _prestart: list[tuple[Item, bytes]]
    leg: int

    def _end_if_goodbye_heard(self) -> None:
        """Overridden by the session: a goodbye heard ends the call."""

    def _maybe_swap(self) -> None:
        """Overridden by :class:`~bridge.rollover.Rollover`: a turn boundary may be the moment to swap."""

    def _emit(self, frames: list[bytes], item: Item, *, final: bool) -> None:
        out = self._to_twilio
        now = self.clock.now()
        if frames and self._turn_ended_at is not None and not item.local:
            self.stats.turn_latencies_ms.append((now - self._turn_ended_at) * 1000.0)
            self._turn_ended_at = None
        for frame in frames:
            if self._unmarked_frames == 0:
                self._unmarked_since = now
            out.append(PlayAudio(frame))
            item.sent_bytes += len(frame)
            self._unmarked_frames += 1
            if self._unmarked_frames >= self._mark_every:
                out.append(self._mark(item))
        if final and self._unmarked_frames:
            out.append(self._mark(item))
        self.stats.frames_out += len(frames)

    def _mark(self, item: Item) -> PlaceMark:
        self._mark_seq += 1
        name = f"m{self._mark_seq}"
        self._ledger.append(Mark(self._mark_seq, item, item.sent_bytes, self._unmarked_since))
        self._unmarked_frames = 0
        self.stats.marks_sent += 1
        return PlaceMark(name)

    def _flush_outbound(self) -> None:
        item = self._current
        if item is None or self.stream_sid is None:
            return
        frames = self._framer.push(self._outbound.flush())
        tail = self._framer.flush()
        if tail is not None:
            frames.append(tail)
        self._emit(frames, item, final=True)

    def hearing_model(self) -> bool:
        """Whether the caller may be hearing model audio now (sent and not proved played)."""
        return bool(self._ledger) or self._unmarked_frames > 0 or self._framer.pending > 0

    def heard_position(self) -> tuple[Item, int] | None:
        """The item the caller is hearing and how many ms of its model audio they heard.

        Proved by the last echoed mark; from there interpolated with the clock since playback of the
        next segment can have begun (its first frame was sent, and the previous mark echoed), and never
        past the next unechoed mark. Clamped to the audio the model generated for the item. When all that
        was sent has been proved heard but the model is still generating the item, that is the position.
        """
        current = self._current
        if self._ledger:
            head = self._ledger[0]
            item, ceiling, since = head.item, head.position, head.segment_sent_at
        elif self._unmarked_frames and current is not None:
            item, ceiling, since = current, current.sent_bytes, self._unmarked_since
        elif current is not None and current.model_bytes and current.response_id == self._active_response:
            item, ceiling, since = current, current.sent_bytes, self.clock.now()
        else:
            return None
        anchor = max(self._last_echo_at, since)
        elapsed = max(0.0, self.clock.now() - anchor)
        played_bytes = min(item.heard_bytes + elapsed * 1000.0 * ULAW_BYTES_PER_MS, ceiling)
        heard_ms = played_bytes / ULAW_BYTES_PER_MS - self._outbound.delay_ms
        generated_ms = model_bytes_to_ms(item.model_bytes, self.audio_path)
        # Floor (never past what was generated), forgiving float noise such as 249.99999 for 250.
        return item, int(max(0.0, min(heard_ms, generated_ms)) + 1e-6)

    def _play_local(self, name: str, ulaw: bytes) -> None:
        """Play μ-law the bridge holds itself, framed and marked like the model's audio."""
        item = self._items[f"local:{name}"] = Item(f"local:{name}", "", model_bytes=len(ulaw), local=True)
        self._current = item
        framer = Framer()
        frames = framer.push(ulaw)
        tail = framer.flush()
        if tail is not None:
            frames.append(tail)
        self._emit(frames, item, final=True)

    def _on_mark(self, name: str) -> None:
        seq = int(name[1:]) if name[:1] == "m" and name[1:].isdigit() else -1
        ledger = self._ledger
        if not ledger or not ledger[0].seq <= seq <= ledger[-1].seq:
            # Flushed by a clear, or from before it: not proof of playback (docs/architecture.md).
            self.stats.marks_ignored += 1
            return
        now = self.clock.now()
        while ledger and ledger[0].seq <= seq:
            mark = ledger.popleft()
            mark.item.heard_bytes = mark.position
            self.stats.marks_played += 1
        self._last_echo_at = now
        self._end_if_goodbye_heard()
        if not ledger:
            self._maybe_swap()  # all the model said was heard: perhaps a turn boundary

    def _on_delta(self, event: rt.AudioDelta) -> None:
        if event.response_id in self._dropped:
            self.stats.late_deltas_dropped += 1
            return
        item = self._items.get(event.item_id)
        if item is None:
            item = self._items[event.item_id] = Item(event.item_id, event.response_id, leg=self.leg)
        self._current = item
        item.model_bytes += len(event.audio)
        frames = self._framer.push(self._outbound.convert(event.audio))
        if self.stream_sid is None:
            # Twilio has not started the stream: nothing may be sent to it yet (docs/protocols.md §5.8).
            self._prestart.extend((item, frame) for frame in frames)
            return
        self._emit(frames, item, final=False)

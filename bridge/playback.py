"""The playback ledger of a call: what the caller heard of the model, proved by Twilio's marks. No I/O.

Every outbound frame is followed, every few frames, by a Twilio ``mark``. Marks are the only proof of what
the caller heard (Twilio's inbound ``timestamp`` is not): when a mark echoes, the item it closes has been
played up to that mark's byte position. Between echoes the position is interpolated with the clock, never
past the next unechoed mark. A ``mark`` echoed after a ``clear`` was flushed, not played, and proves nothing.

Two bounds keep the ledger and what is queued towards Twilio finite, whatever Twilio does:

* **The send bound.** At most :data:`AHEAD_SECONDS` of audio is sent ahead of what the marks proved played
  (sent and not yet proved: the "ahead" figure). The model speaks faster than real time; what it says beyond
  the bound is held in the bridge, in order with its marks, and released as marks echo. Barge-in stays
  exact (a clear empties Twilio's buffer and the bridge's hold alike), and Twilio's buffer, the socket's
  and the bridge's stay small. The hold itself is capped at :data:`HELD_CAP_SECONDS`: a response that
  would hold more is cut there, as if the caller had interrupted it at the end of what is held (its item
  truncated there, the response cancelled, its later audio dropped; no ``clear``: what is held plays on).
* **Lost marks.** A mark not echoed :data:`MARK_GRACE` seconds after its audio should have finished
  playing is given up: taken as played at the time it should have been (Twilio plays in order, in real
  time), counted, logged once per call. The ledger moves on, so the caller is no longer taken to be
  hearing the model, a goodbye that waits for its last mark ends, and the heard position of what follows
  is interpolated from there. "Should have finished": the segment (the audio between the previous mark
  and this one) starts playing when it was sent or when the previous mark was proved, whichever is later.

:class:`Playback` is the part of :class:`~bridge.session.CallSession` that keeps the ledger (a base class
of it, sharing its state); it is here so that each module stays readable on its own.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from bridge import realtime as rt
from bridge.audio import Framer, OutboundTranscoder, model_bytes_to_ms
from bridge.clock import Clock
from bridge.config import AudioPath
from bridge.states import CallMachine
from bridge.twilio import PlaceMark, PlayAudio, TwilioCommand

log = logging.getLogger(__name__)

ULAW_BYTES_PER_MS = 8
ULAW_BYTES_PER_SECOND = 8000

AHEAD_SECONDS = 3.0
"""The send bound: at most this much audio is sent to Twilio ahead of what marks proved played. Above
:data:`MARK_GRACE`, so that even while no echo comes back, marks given up release audio before Twilio's
buffer runs dry; small enough that Twilio's buffer and the socket's stay small (about 50 kB)."""
HELD_CAP_SECONDS = 60.0
"""At most this much audio waits in the bridge behind the send bound (about 0.6 MB per call at most); a
response that would hold more is cut there (see the module docstring)."""
MARK_GRACE = 2.0
"""A mark not echoed this long after its audio should have finished playing is given up (counted)."""
_AHEAD_BYTES = int(AHEAD_SECONDS * ULAW_BYTES_PER_SECOND)
_HELD_CAP_BYTES = int(HELD_CAP_SECONDS * ULAW_BYTES_PER_SECOND)


@dataclass(slots=True)
class Item:
    """One assistant message item and how much of its audio was generated, sent and heard."""

    item_id: str
    response_id: str
    model_bytes: int = 0
    """Bytes of model audio received (the model's own format): what truncate is clamped to."""
    sent_bytes: int = 0
    """μ-law bytes framed for Twilio for this item: sent, or held behind the send bound to go in order."""
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
    size: int
    """μ-law bytes of its segment: the audio between the previous mark and this one."""
    end: int
    """Where it stands in all the audio of the stream (μ-law bytes since the last ``clear``)."""
    sent_at: float | None = None
    """When the first frame of its segment was sent to Twilio; ``None`` while it is held in the bridge."""


@dataclass(slots=True)
class Stats:
    """What happened on the call, for metrics and the call record."""

    frames_in: int = 0
    frames_out: int = 0
    frames_queued_dropped: int = 0
    marks_sent: int = 0
    marks_played: int = 0
    marks_ignored: int = 0
    marks_lost: int = 0
    """Marks given up: not echoed within :data:`MARK_GRACE` of when their audio should have played."""
    send_holds: int = 0
    """Times the send bound (:data:`AHEAD_SECONDS`) held model audio back in the bridge."""
    held_cuts: int = 0
    """Responses cut because the audio held for Twilio reached :data:`HELD_CAP_SECONDS`."""
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
    call_id: str
    clock: Clock
    audio_path: AudioPath
    stats: Stats
    stream_sid: str | None
    rearm: bool
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
    _last_echo_at: float
    _dropped: set[str]
    _prestart: list[tuple[Item, bytes]]
    leg: int

    def _init_playback(self) -> None:
        """Set up the ledger and the send bound's state (called by the session's ``__init__``)."""
        self._ledger = deque()
        self._mark_seq = 0
        self._unmarked_frames = 0
        self._last_echo_at = float("-inf")
        """When the last mark was proved played: its echo, or when a mark given up should have played."""
        self._outbox: deque[bytes | Mark] = deque()
        """Frames and marks held behind the send bound, in order."""
        self._held = 0
        """μ-law bytes in :attr:`_outbox`."""
        self._segment = 0
        """μ-law bytes framed since the last mark."""
        self._framed = 0
        self._sent = 0
        self._proved = 0
        """μ-law bytes of the stream (since the last clear) framed, sent to Twilio, and proved played."""
        self._sent_seq = 0
        """The last mark sent to Twilio: an echo of a later one is not proof of anything."""
        self._release_since: float | None = None
        """When the first frame sent of the segment whose mark is not sent yet went out."""
        self._holding = False

    def _end_if_goodbye_heard(self) -> None:
        """Overridden by the session: a goodbye heard ends the call."""

    def _maybe_swap(self) -> None:
        """Overridden by :class:`~bridge.rollover.Rollover`: a turn boundary may be the moment to swap."""

    def _hold_full(self, item: Item) -> None:
        """Overridden by the session: the hold reached its cap while the model spoke ``item``: cut it."""

    def _emit(self, frames: list[bytes], item: Item, *, final: bool) -> None:
        if frames and self._turn_ended_at is not None and not item.local:
            self.stats.turn_latencies_ms.append((self.clock.now() - self._turn_ended_at) * 1000.0)
            self._turn_ended_at = None
        outbox = self._outbox
        for frame in frames:
            outbox.append(frame)
            size = len(frame)
            item.sent_bytes += size
            self._held += size
            self._segment += size
            self._framed += size
            self._unmarked_frames += 1
            if self._unmarked_frames >= self._mark_every:
                outbox.append(self._mark(item))
        if final and self._unmarked_frames:
            outbox.append(self._mark(item))
        self._release()

    def _mark(self, item: Item) -> Mark:
        self._mark_seq += 1
        mark = Mark(self._mark_seq, item, item.sent_bytes, self._segment, self._framed)
        self._ledger.append(mark)
        self._unmarked_frames = 0
        self._segment = 0
        self.stats.marks_sent += 1
        return mark

    def _release(self) -> None:
        """Send what the send bound allows of what is held: frames while less than
        :data:`AHEAD_SECONDS` is sent and not proved played, and each mark right after its segment."""
        outbox = self._outbox
        out = self._to_twilio
        while outbox:
            entry = outbox[0]
            if type(entry) is Mark:
                outbox.popleft()
                if self._release_since is None:  # (a segment always has a frame: never the case)
                    self._release_since = self.clock.now()
                entry.sent_at, self._release_since = self._release_since, None
                self._sent_seq = entry.seq
                out.append(PlaceMark(f"m{entry.seq}"))
                if self._ledger[0] is entry:
                    self.rearm = True  # the first mark awaited: when to give it up is the nearest deadline
                continue
            assert type(entry) is bytes
            if self._sent - self._proved >= _AHEAD_BYTES:
                if not self._holding:
                    self._holding = True
                    self.stats.send_holds += 1
                break
            outbox.popleft()
            if self._release_since is None:
                self._release_since = self.clock.now()
            out.append(PlayAudio(entry))
            size = len(entry)
            self._sent += size
            self._held -= size
            self.stats.frames_out += 1
        else:
            self._holding = False

    def ahead_seconds(self) -> float:
        """Seconds of audio sent to Twilio and not yet proved played (less than :data:`AHEAD_SECONDS` and
        a frame)."""
        return (self._sent - self._proved) / ULAW_BYTES_PER_SECOND

    def held_seconds(self) -> float:
        """Seconds of audio held in the bridge behind the send bound."""
        return self._held / ULAW_BYTES_PER_SECOND

    def _reset_playback(self) -> None:
        """A ``clear``: nothing sent is queued at Twilio any more, nothing held will be sent, the next audio
        starts from a clean resampler and frame boundary."""
        self._ledger.clear()
        self._outbox.clear()
        self._held = self._segment = 0
        self._framed = self._proved = self._sent
        self._release_since = None
        self._holding = False
        self._unmarked_frames = 0
        self._framer.clear()
        self._outbound.reset()
        self._prestart.clear()

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
        """Whether the caller may be hearing model audio now (sent or held, and not proved played)."""
        return bool(self._ledger) or self._unmarked_frames > 0 or self._framer.pending > 0

    def heard_position(self) -> tuple[Item, int] | None:
        """The item the caller is hearing and how many ms of its model audio they heard.

        Proved by the last echoed mark; from there interpolated with the clock since playback of the
        next segment can have begun (its first frame was sent, and the previous mark proved), and never
        past the next unechoed mark. Clamped to the audio the model generated for the item. When all that
        was sent has been proved heard but the model is still generating the item, that is the position.
        """
        current = self._current
        now = self.clock.now()
        if self._ledger:
            head = self._ledger[0]
            item, ceiling, since = head.item, head.position, head.sent_at
            if since is None:  # held: nothing after the last proof is playing but what was sent of it
                since = self._release_since if self._release_since is not None else now
        elif self._unmarked_frames and current is not None:
            since = self._release_since if self._release_since is not None else now
            item, ceiling = current, current.sent_bytes
        elif current is not None and current.model_bytes and current.response_id == self._active_response:
            item, ceiling, since = current, current.sent_bytes, now
        else:
            return None
        anchor = max(self._last_echo_at, since)
        elapsed = max(0.0, now - anchor)
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
        if not ledger or not ledger[0].seq <= seq <= self._sent_seq:
            # Flushed by a clear, or from before it: not proof of playback (docs/architecture.md).
            self.stats.marks_ignored += 1
            return
        while ledger and ledger[0].seq <= seq:
            mark = ledger.popleft()
            mark.item.heard_bytes = mark.position
            self._proved = mark.end
            self.stats.marks_played += 1
        self._proved_played(self.clock.now())

    def _proved_played(self, at: float) -> None:
        """Marks were proved played (echoed, or given up), the last one at ``at``: send what the bound
        now allows, and see whether that was the end of what the caller was to hear."""
        self._last_echo_at = at
        self._release()
        self._end_if_goodbye_heard()
        if not self._ledger:
            self._maybe_swap()  # all the model said was heard: perhaps a turn boundary

    def _give_up_at(self) -> float | None:
        """When the first mark awaited is given up (``None``: none is awaited)."""
        if not self._ledger:
            return None
        head = self._ledger[0]
        if head.sent_at is None:
            return None
        return max(self._last_echo_at, head.sent_at) + head.size / ULAW_BYTES_PER_SECOND + MARK_GRACE

    def _give_up(self, now: float) -> None:
        """The first mark awaited never came back: take it as played when it should have been."""
        head = self._ledger.popleft()
        assert head.sent_at is not None
        played_at = max(self._last_echo_at, head.sent_at) + head.size / ULAW_BYTES_PER_SECOND
        if not self.stats.marks_lost:
            log.warning(
                "call %s: mark m%d not echoed %.0f s after its audio should have played; taken as played "
                "(counted, logged once)",
                self.call_id,
                head.seq,
                MARK_GRACE,
            )
        self.stats.marks_lost += 1
        head.item.heard_bytes = head.position
        self._proved = head.end
        self._proved_played(played_at)

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
        if self._held > _HELD_CAP_BYTES:
            self._hold_full(item)

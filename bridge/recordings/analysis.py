"""Analysis of a recorded call: the call's timeline (what the caller said, what was played and cleared,
the model VAD's speech, the responses) and the :func:`summary` of its figures.

Why a module of its own: the exports of a recording (:mod:`.wav`, the stereo WAV, and :mod:`.timeline`,
the SVG timeline) all start from the same reading of it, :func:`analyse`, so they agree on what
happened when. A recording (:mod:`bridge.recordings.format`) holds every message of both sockets with
the time it crossed; :func:`analyse` places them on the call's timeline, in ms of the call and in
samples of 8 kHz μ-law (:data:`SPMS` a ms):

* **the caller**: Twilio's inbound ``media`` payloads placed at their arrival time. Frames come every
  20 ms give or take network jitter, so each frame goes right after the previous one unless its arrival
  jumps more than :data:`GAP_MS` ahead of that (a real gap in the stream); jitter does not chop the
  audio.
* **what the caller heard of the model**: Twilio's playback simulated from the bridge's outbound
  messages. Twilio queues outbound ``media`` FIFO and plays it at real time (8 bytes a ms) from the
  moment the queue becomes non-empty; a ``clear`` drops everything not yet played at that moment
  (docs/protocols.md §1.3). The few tens of ms that may still be in flight after a clear are not modelled.
* **the caller's speech as the model's VAD saw it**: from ``input_audio_buffer.speech_started`` and
  ``speech_stopped``, whose ``audio_start_ms``/``audio_end_ms`` count the audio appended to the model;
  they are mapped onto the call's timeline through the caller frames the bridge forwarded (the oldest
  frames queued before the session was live may have been dropped: the difference between the caller
  audio received and the audio appended is taken off the front). When the call used several Realtime
  sessions (a rollover or a reconnection), each session counts its input audio from its own first
  append, so each is mapped on its own: its audio is taken to end with the caller audio received by its
  last append.
* the responses, the marks, the truncations, the DTMF digits and the hang-up, at their times; and each
  switch to a later Realtime session, at the first caller audio sent to it.

This module is core tier: pure functions, no I/O, no clock, no event loop.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import pybase64

from bridge.recordings.format import Event, Recording

__all__ = [
    "GAP_MS",
    "RATE",
    "SPMS",
    "CallTimeline",
    "Played",
    "Response",
    "Speech",
    "analyse",
    "first_time",
    "summarise",
    "summary",
]

RATE: Final = 8000
"""Sample rate of the call's audio on the timeline (Twilio's)."""
SPMS: Final = RATE // 1000
"""Samples (= μ-law bytes) per ms."""
GAP_MS: Final = 60.0
"""An inbound frame arriving this much later than the end of the previous one starts after a gap."""

_AUDIO_DELTAS: Final = frozenset({"response.output_audio.delta", "response.audio.delta"})


@dataclass(slots=True)
class Played:
    """One outbound media message: when it was sent, where in playback it starts, how much was played."""

    sent_ms: float
    start: int
    data: bytes
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(slots=True)
class Speech:
    """A speech segment of the model's VAD, in call ms."""

    start_ms: float
    end_ms: float | None = None
    started_t: float = 0.0
    stopped_t: float | None = None
    session: int = 1
    """The Realtime session whose VAD saw it (its ms count that session's input audio)."""


@dataclass(slots=True)
class Response:
    """One model response: when it was created and done, and the span and size of its audio deltas."""

    id: str
    created_t: float | None = None
    done_t: float | None = None
    status: str = ""
    first_audio_t: float | None = None
    last_audio_t: float | None = None
    audio_bytes: int = 0


@dataclass(slots=True)
class CallTimeline:
    """What happened when in a call, in call ms: what :func:`analyse` reads out of a recording."""

    duration_ms: float = 0.0
    caller: list[tuple[float, int, bytes]] = field(default_factory=list)
    """Inbound frames: (arrival ms, start sample, μ-law)."""
    played: list[Played] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    marks_sent: list[float] = field(default_factory=list)
    marks_echoed: list[float] = field(default_factory=list)
    dtmf: list[tuple[float, str]] = field(default_factory=list)
    stop_t: float | None = None
    speech: list[Speech] = field(default_factory=list)
    responses: dict[str, Response] = field(default_factory=dict)
    truncations: list[tuple[float, str, int]] = field(default_factory=list)
    """(time sent, item_id, audio_end_ms)."""
    swaps: list[tuple[float, int]] = field(default_factory=list)
    """(time of the first caller audio sent to it, its number) for each Realtime session after the first
    that was sent caller audio, in time order."""

    @property
    def samples(self) -> int:
        """Length of both tracks: the call, or the audio if it runs on after the last event."""
        caller_end = max((s + len(d) for _, s, d in self.caller), default=0)
        heard_end = max((p.end for p in self.played if p.length), default=0)
        return max(caller_end, heard_end, round(self.duration_ms * SPMS))

    def turns(self) -> list[tuple[float, float | None]]:
        """Each caller turn: (speech_stopped arrival, first model audio heard after it or None)."""
        stops = [s.stopped_t for s in self.speech if s.stopped_t is not None]
        starts = sorted(s.started_t for s in self.speech)
        out: list[tuple[float, float | None]] = []
        for stop in stops:
            nxt = bisect.bisect_right(starts, stop)
            until = starts[nxt] if nxt < len(starts) else math.inf
            heard = next(
                (p.start / SPMS for p in self.played if p.sent_ms >= stop and p.length > 0),
                None,
            )
            out.append((stop, heard if heard is not None and heard < until else None))
        return out


def _media_payload(msg: Mapping[str, Any]) -> bytes | None:
    media = msg.get("media")
    if not isinstance(media, Mapping):
        return None
    track = media.get("track")
    if isinstance(track, str) and track and not track.startswith("inbound"):
        return None
    payload = media.get("payload")
    if not isinstance(payload, str) or not payload:
        return None
    try:
        return pybase64.b64decode(payload, validate=True)
    except ValueError:
        return None


def _b64_length(text: object) -> int:
    """Decoded size of a base64 string, without decoding it."""
    if not isinstance(text, str):
        return 0
    text = text.rstrip()
    return max(0, len(text) * 3 // 4 - (len(text) - len(text.rstrip("="))))


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _response(call: CallTimeline, rid: str) -> Response:
    if rid not in call.responses:
        call.responses[rid] = Response(rid)
    return call.responses[rid]


def _caller_frame(call: CallTimeline, t: float, data: bytes, cursor: int | None) -> int:
    at = max(0, round(t * SPMS))
    start = at if cursor is None or at > cursor + GAP_MS * SPMS else cursor
    call.caller.append((t, start, data))
    return start + len(data)


def _play(call: CallTimeline, t: float, data: bytes, busy: int) -> int:
    start = max(round(t * SPMS), busy)
    call.played.append(Played(t, start, data, len(data)))
    return start + len(data)


def _clear(call: CallTimeline, t: float, unsettled: int) -> None:
    """Twilio ``clear`` at ``t``: cut everything queued from ``unsettled`` on at the playback point."""
    cut = round(t * SPMS)
    for p in call.played[unsettled:]:
        p.length = max(0, min(p.length, cut - p.start))


def _model_in(call: CallTimeline, e: Event, msg: Mapping[str, Any], rid_of: dict[str, str]) -> None:
    kind = e.kind
    if kind in _AUDIO_DELTAS:
        rid = _text(msg.get("response_id")) or rid_of.get(_text(msg.get("item_id")), "") or "?"
        r = _response(call, rid)
        r.first_audio_t = e.t if r.first_audio_t is None else r.first_audio_t
        r.last_audio_t = e.t
        r.audio_bytes += _b64_length(msg.get("delta"))
    elif kind in ("response.created", "response.done"):
        body = msg.get("response")
        body = body if isinstance(body, Mapping) else {}
        rid = _text(body.get("id"))
        if not rid:
            return
        r = _response(call, rid)
        if kind == "response.created":
            r.created_t = e.t
        else:
            r.done_t, r.status = e.t, _text(body.get("status"))
    elif kind == "response.output_item.added":
        item = msg.get("item")
        if isinstance(item, Mapping):
            rid_of[_text(item.get("id"))] = _text(msg.get("response_id"))
    elif kind == "input_audio_buffer.speech_started":
        ms = _number(msg.get("audio_start_ms"))
        if call.speech and call.speech[-1].stopped_t is None:  # a stop went missing: end it here
            same = call.speech[-1].session == e.session  # else its ms are another session's: use the time
            call.speech[-1].end_ms, call.speech[-1].stopped_t = (ms if same else -1.0), e.t
        call.speech.append(Speech(ms if ms is not None else -1.0, started_t=e.t, session=e.session))
    elif kind == "input_audio_buffer.speech_stopped" and call.speech and call.speech[-1].stopped_t is None:
        ms = _number(msg.get("audio_end_ms"))
        same = call.speech[-1].session == e.session
        call.speech[-1].end_ms = ms if ms is not None and same else -1.0
        call.speech[-1].stopped_t = e.t


def analyse(rec: Recording) -> CallTimeline:
    """Read a recording into the call's timeline (the module doc says how)."""
    call = CallTimeline(duration_ms=rec.duration_ms)
    cursor: int | None = None
    busy = 0
    unsettled = 0
    appended: dict[int, tuple[int, float]] = {}  # per session: (bytes appended, time of the last append)
    rid_of: dict[str, str] = {}
    for e in rec.events:
        msg = e.msg
        if msg is None:
            continue
        kind = e.kind
        if e.src == "twilio" and e.dir == "in":
            if kind == "media":
                data = _media_payload(msg)
                if data:
                    cursor = _caller_frame(call, e.t, data, cursor)
            elif kind == "mark":
                call.marks_echoed.append(e.t)
            elif kind == "dtmf":
                dtmf = msg.get("dtmf")
                digit = _text(dtmf.get("digit")) if isinstance(dtmf, Mapping) else ""
                call.dtmf.append((e.t, digit or "?"))
            elif kind == "stop" and call.stop_t is None:
                call.stop_t = e.t
                _clear(call, e.t, unsettled)  # the stream is gone: nothing more is played
                unsettled = len(call.played)
                busy = min(busy, round(e.t * SPMS))
        elif e.src == "twilio":
            if kind == "media":
                data = _media_payload(msg)
                if data:
                    busy = _play(call, e.t, data, busy)
            elif kind == "clear":
                call.clears.append(e.t)
                _clear(call, e.t, unsettled)
                unsettled = len(call.played)
                busy = min(busy, round(e.t * SPMS))
            elif kind == "mark":
                call.marks_sent.append(e.t)
        elif e.dir == "in":
            _model_in(call, e, msg, rid_of)
        elif kind == "input_audio_buffer.append":
            if e.session not in appended and e.session > 1:
                call.swaps.append((e.t, e.session))
            size = appended[e.session][0] if e.session in appended else 0
            appended[e.session] = (size + _b64_length(msg.get("audio")), e.t)
        elif kind == "conversation.item.truncate":
            end = _number(msg.get("audio_end_ms"))
            call.truncations.append((e.t, _text(msg.get("item_id")), int(end) if end is not None else -1))
    _place_speech(call, rec, appended)
    return call


def _place_speech(call: CallTimeline, rec: Recording, appended: Mapping[int, tuple[int, float]]) -> None:
    """Map the VAD's input-audio ms onto call ms through the caller frames (see the module doc);
    ``appended``: per Realtime session, the bytes of caller audio appended and the time of the last."""
    if not call.caller:
        for s in call.speech:  # nothing to map through: the events' arrival times
            s.start_ms = s.started_t
            s.end_ms = s.stopped_t
        return
    in_ms = 8.0 if rec.header.audio_path == "g711_ulaw" else 48.0  # bytes per ms the model was sent
    received = [len(d) / SPMS for _, _, d in call.caller]
    offsets = np.concatenate(([0.0], np.cumsum(received)))
    dropped: dict[int, float] = {}  # per session: the caller audio before its first append, in ms
    for session, (appended_bytes, last_append_t) in appended.items():
        arrived = sum(1 for t, _, _ in call.caller if t <= last_append_t)
        dropped[session] = max(0.0, float(offsets[arrived]) - appended_bytes / in_ms)

    def place(input_ms: float | None, fallback: float | None, session: int) -> float | None:
        if input_ms is None or input_ms < 0 or (session > 1 and session not in dropped):
            return fallback  # no ms, or a later session's ms with none of its audio to map them through
        pos = input_ms + dropped.get(session, 0.0)
        i = min(max(int(np.searchsorted(offsets, pos, side="right")) - 1, 0), len(received) - 1)
        return call.caller[i][1] / SPMS + (pos - float(offsets[i]))

    for s in call.speech:
        s.start_ms = place(s.start_ms, s.started_t, s.session) or 0.0
        s.end_ms = place(s.end_ms, s.stopped_t, s.session)


def summary(rec: Recording) -> dict[str, Any]:
    """The per-call figures the timeline shows.

    ``turn_latencies_ms``: for each caller turn answered, ms from the VAD's ``speech_stopped`` reaching
    the bridge to the first model audio the caller heard after it (``unanswered_turns`` counts the
    turns where the caller spoke again, or the call ended, first). ``truncations``: ``(item_id,
    audio_end_ms)`` as sent. ``vad_speech_ms``: the VAD's speech segments in call ms (end ``None``
    while still speaking when the recording ends). Seconds are rounded to ms. ``sessions``, only when the
    call used more than one Realtime session: how many it used.
    """
    return summarise(rec, analyse(rec))


def summarise(rec: Recording, call: CallTimeline) -> dict[str, Any]:
    """:func:`summary` of a recording already analysed (``call`` is ``analyse(rec)``)."""
    out_ms = 8.0 if rec.header.audio_path == "g711_ulaw" else 48.0
    turns = call.turns()
    latencies = [round(heard - stop, 1) for stop, heard in turns if heard is not None]
    speech_s = sum(
        max(0.0, (s.end_ms if s.end_ms is not None else call.duration_ms) - s.start_ms) for s in call.speech
    )
    responses = sorted(call.responses.values(), key=lambda r: first_time(r))
    sessions = {"sessions": rec.sessions} if rec.sessions > 1 else {}
    return {
        "call_sid": rec.header.call_sid,
        "dialect": rec.header.dialect,
        "audio_path": rec.header.audio_path,
        "caller_only": rec.header.caller_only,
        "truncated_recording": rec.truncated,
        "duration_s": round(call.duration_ms / 1000, 3),
        "caller_audio_s": round(sum(len(d) for _, _, d in call.caller) / RATE, 3),
        "caller_speech_s": round(speech_s / 1000, 3),
        "vad_speech_ms": [
            (round(s.start_ms, 1), round(s.end_ms, 1) if s.end_ms is not None else None) for s in call.speech
        ],
        "caller_turns": len(turns),
        "sent_s": round(sum(len(p.data) for p in call.played) / RATE, 3),
        "heard_s": round(sum(p.length for p in call.played) / RATE, 3),
        "barge_ins": len(call.clears),
        "truncations": [(item, ms) for _, item, ms in call.truncations],
        "dtmf": "".join(d for _, d in call.dtmf),
        "responses": len(call.responses),
        "response_ids": [r.id for r in responses],
        "generated_s": round(sum(r.audio_bytes for r in responses) / out_ms / 1000, 3),
        "turn_latencies_ms": latencies,
        "unanswered_turns": len(turns) - len(latencies),
        "marks_sent": len(call.marks_sent),
        "marks_echoed": len(call.marks_echoed),
        "hung_up": call.stop_t is not None,
        **sessions,
    }


def first_time(r: Response) -> float:
    """The earliest time known of a response: the order responses are listed and drawn in."""
    times = [t for t in (r.created_t, r.first_audio_t, r.done_t) if t is not None]
    return min(times, default=0.0)

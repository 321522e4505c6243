"""The SVG timeline of a recorded call: the whole call on one page, for a person to read.

Why a module of its own: it is the one export that is drawn rather than computed, and most of it is
layout (lanes, labels that must not overlap, a time axis for calls of seconds to tens of minutes).
:func:`timeline_svg` draws what :mod:`.analysis` read out of the recording and the loudness of the
tracks of :mod:`.wav`, with the figures of :func:`~bridge.recordings.analysis.summary` in its title;
the staff UI (``bridge.admin``) shows it and ``bridge export --timeline`` writes it.

This module is core tier: pure functions, no I/O (the SVG is built as text), no clock, no event loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final
from xml.sax.saxutils import escape

import numpy as np
import numpy.typing as npt

from bridge.recordings.analysis import SPMS, analyse, first_time, summarise
from bridge.recordings.format import Recording
from bridge.recordings.wav import Track, tracks

__all__ = ["timeline_svg"]

_WINDOW: Final = 160  # 20 ms envelope windows
_MAX_TICKS: Final = 240
"""At most this many mark ticks of each kind are drawn; beyond that an even subset."""
_FONT: Final = "font-family:DejaVu Sans,Verdana,Arial,sans-serif"
_CALLER: Final = "#1f6fb4"
_VAD: Final = "#8fbfe6"
_HEARD: Final = "#2e9a3e"
_GENERATED: Final = "#f08c1a"
_BARGE: Final = "#d62728"
_TRUNCATE: Final = "#8e44ad"
_DTMF: Final = "#8c564b"
_MARK: Final = "#5b6ee1"
_SESSION: Final = "#138a8a"
_GRID: Final = "#e4e4e4"
_INK: Final = "#222222"
_SOFT: Final = "#666666"
_TICK_STEPS_S: Final = (0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 1200)


class _Svg:
    """The elements of an SVG document, in drawing order."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(
        self, x: float, y: float, content: str, *, size: float = 11, fill: str = _INK, **attrs: str
    ) -> None:
        extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
        head = f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size:g}" fill="{fill}"{extra}>'
        self.add(f"{head}{escape(content)}</text>")

    def line(
        self, x1: float, y1: float, x2: float, y2: float, stroke: str, width: float = 1, dash: str = ""
    ) -> None:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
            f'stroke-width="{width:g}"{d}/>'
        )

    def rect(self, x: float, y: float, w: float, h: float, fill: str, **attrs: str) -> None:
        extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
        self.add(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{h:.1f}" fill="{fill}"{extra}/>'
        )


class _Rows:
    """Greedy placement of labels in a few rows so that they do not overlap."""

    def __init__(self, rows: int) -> None:
        self.ends = [-math.inf] * rows
        self.dropped = 0

    def place(self, x: float, width: float) -> int | None:
        for row, end in enumerate(self.ends):
            if x >= end + 6:
                self.ends[row] = x + width
                return row
        self.dropped += 1
        return None


def _text_width(text: str, size: float) -> float:
    return len(text) * size * 0.6


def _clock(seconds: float, step: float) -> str:
    if step < 1:
        return f"{seconds:.1f} s" if step != 0.25 else f"{seconds:.2f} s"
    if seconds < 60 and step < 60:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _envelope(track: Track) -> npt.NDArray[np.float64]:
    """Loudness per 20 ms window on 0..1: dBFS RMS from -55 dB (0) to -5 dB (1)."""
    n = len(track) // _WINDOW * _WINDOW
    if n == 0:
        return np.zeros(0)
    windows = track[:n].astype(np.float64).reshape(-1, _WINDOW) / 32768.0
    rms = np.sqrt(np.mean(windows * windows, axis=1))
    db = 20 * np.log10(np.maximum(rms, 1e-6))
    out: npt.NDArray[np.float64] = np.clip((db + 55) / 50, 0.0, 1.0)
    return out


def _band(
    svg: _Svg, env: npt.NDArray[np.float64], x0: float, px_per_ms: float, mid: float, half: float, fill: str
) -> None:
    """The envelope as a band mirrored around ``mid``, one point per pixel column at most."""
    if env.size == 0 or not env.any():
        svg.line(x0, mid, x0 + env.size * 20 * px_per_ms, mid, fill, 0.6)
        return
    columns = max(1, min(env.size, math.ceil(env.size * 20 * px_per_ms)))
    edges = np.linspace(0, env.size, columns + 1).astype(int)
    edges = np.unique(edges)
    peaks = np.maximum.reduceat(env, edges[:-1])
    xs = x0 + edges * 20 * px_per_ms
    top: list[str] = []
    bottom: list[str] = []
    for i, v in enumerate(peaks):
        h = max(float(v) * half, 0.4)
        top.append(f"{xs[i]:.1f},{mid - h:.1f} {xs[i + 1]:.1f},{mid - h:.1f}")
        bottom.append(f"{xs[i + 1]:.1f},{mid + h:.1f} {xs[i]:.1f},{mid + h:.1f}")
    points = " ".join(top + bottom[::-1])
    svg.add(f'<polygon points="{points}" fill="{fill}" stroke="none"/>')


def _subset(times: Sequence[float]) -> tuple[list[float], int]:
    if len(times) <= _MAX_TICKS:
        return list(times), 1
    every = math.ceil(len(times) / _MAX_TICKS)
    return list(times[::every]), every


def _short_id(rid: str) -> str:
    if rid.startswith("resp_") and len(rid) > 11:
        return rid[:11] + "…"
    return rid if len(rid) <= 12 else rid[:11] + "…"


def timeline_svg(rec: Recording, *, width: int = 1200) -> str:
    """An SVG timeline of the call, readable at ``width`` px for calls of seconds to tens of minutes.

    Three lanes on one time axis: the caller's speech (loudness envelope, and the model VAD's speech
    segments mapped onto call time, DTMF digits), the model speech the caller heard (its envelope, the
    Twilio marks sent and echoed, and for each caller turn the added latency from ``speech_stopped``
    to the first audio heard), and the model audio generated (first to last audio delta of each
    response). Barge-ins (``clear``), truncations, the hang-up and each switch to a later Realtime
    session ("session 2" at the first caller audio sent to it) are vertical lines across the lanes.
    """
    call = analyse(rec)
    left, right = tracks(call)
    facts = summarise(rec, call)
    h = rec.header

    width = max(width, 480)
    label_w = 180.0
    x0, x1 = label_w + 10, width - 20.0
    span_ms = max(call.samples / SPMS, 1000.0)
    px_per_ms = (x1 - x0) / span_ms

    def x(t_ms: float) -> float:
        return x0 + min(max(t_ms, 0.0), span_ms) * px_per_ms

    # vertical layout
    marker_top = 80.0
    marker_rows = 3
    lane1 = marker_top + marker_rows * 14 + 6
    lane_h = 96.0
    lane2 = lane1 + lane_h + 8
    lane3 = lane2 + lane_h + 8
    lane3_h = 70.0
    axis_y = lane3 + lane3_h + 4
    legend_y = axis_y + 52

    svg = _Svg()
    svg.add(f"<title>{escape('Call ' + h.call_sid)}</title>")

    # title
    duration = facts["duration_s"]
    kind = "caller-only capture" if h.caller_only else f"dialect {h.dialect} · audio {h.audio_path}"
    length = _clock(duration, 1) if duration >= 60 else f"{duration:.1f} s"
    title = f"Call {h.call_sid} — {kind} — {length}"
    svg.text(12, 26, title, size=17, font_weight="bold")
    sub = [f"caller audio {facts['caller_audio_s']:.1f} s"]
    if not h.caller_only:
        sub.append(f"model heard {facts['heard_s']:.1f} s")
        if facts["sent_s"] > facts["heard_s"]:
            sub.append(f"of {facts['sent_s']:.1f} s sent")
        sub.append(f"responses {facts['responses']}")
        sub.append(f"barge-ins {facts['barge_ins']}")
        sub.append(f"truncations {len(facts['truncations'])}")
        if "sessions" in facts:
            sub.append(f"Realtime sessions {facts['sessions']}")
    lat = facts["turn_latencies_ms"]
    if lat:
        sub.append(f"latency median {float(np.median(lat)):.0f} ms, max {max(lat):.0f} ms")
    if facts["dtmf"]:
        digits = facts["dtmf"]
        sub.append(f"DTMF {digits if len(digits) <= 12 else digits[:11] + '…'}")
    svg.text(12, 46, " · ".join(sub), size=12, fill=_SOFT)
    more = [f"started {h.started_at}"] if h.started_at else []
    if h.bridge_version:
        more.append(f"bridge {h.bridge_version}")
    if rec.truncated:
        more.append("recording cut short (the last line was incomplete)")
    svg.text(12, 62, " · ".join(more), size=11, fill=_SOFT)

    # grid and axis
    step = next((s for s in _TICK_STEPS_S if span_ms / 1000 / s <= (x1 - x0) / 80), _TICK_STEPS_S[-1])
    svg.line(x0, axis_y, x1, axis_y, _INK)
    k = 0
    while k * step * 1000 <= span_ms + 1e-6:
        tx = x(k * step * 1000)
        svg.line(tx, marker_top, tx, axis_y, _GRID)
        svg.line(tx, axis_y, tx, axis_y + 5, _INK)
        svg.text(tx, axis_y + 18, _clock(k * step, step), size=11, text_anchor="middle")
        k += 1
    svg.text(x1, axis_y + 34, "call time (from the webhook)", size=10, fill=_SOFT, text_anchor="end")

    # lanes
    for top, lh, name, note in (
        (lane1, lane_h, "caller speech", "Twilio inbound audio"),
        (lane2, lane_h, "model speech heard", "Twilio playback, clears applied"),
        (lane3, lane3_h, "model audio generated", "first → last audio delta"),
    ):
        svg.rect(x0, top, x1 - x0, lh, "#fafafa", stroke="#d0d0d0", stroke_width="1")
        svg.text(12, top + lh / 2 - 2, name, size=13, font_weight="bold")
        if h.caller_only and top != lane1:
            svg.text(
                (x0 + x1) / 2,
                top + 22,
                "no model side in a caller-only capture",
                size=11,
                fill=_SOFT,
                text_anchor="middle",
            )
        svg.text(12, top + lh / 2 + 14, note, size=10, fill=_SOFT)

    # lane 1: caller envelope, VAD segments, DTMF
    mid1 = lane1 + 40
    _band(svg, _envelope(left), x0, px_per_ms, mid1, 30, _CALLER)
    vad_y = lane1 + lane_h - 18
    for s in call.speech:
        end = s.end_ms if s.end_ms is not None else call.duration_ms
        svg.rect(
            x(s.start_ms), vad_y, max(x(end) - x(s.start_ms), 2), 10, _VAD, stroke=_CALLER, stroke_width="0.6"
        )
    groups: list[tuple[float, str]] = []  # digits pressed within a few pixels share one label
    for t, digit in call.dtmf:
        svg.line(x(t), lane1 + 4, x(t), lane1 + lane_h - 4, _DTMF, 1, "2,2")
        if groups and x(t) - groups[-1][0] < 7 * len(groups[-1][1]) + 12:
            groups[-1] = (groups[-1][0], groups[-1][1] + digit)
        else:
            groups.append((x(t), digit))
    dtmf_rows = _Rows(1)
    for gx, digits in groups:
        shown = digits if len(digits) <= 8 else digits[:7] + "…"
        bw = 7 * len(shown) + 9
        if dtmf_rows.place(gx - 8, bw) is not None:
            svg.rect(gx - 8, lane1 + 3, bw, 15, "#ffffff", stroke=_DTMF, rx="3")
            svg.text(gx - 3.5, lane1 + 14.5, shown, size=11, fill=_DTMF, font_weight="bold")

    # lane 2: heard envelope, marks, latency brackets
    mid2 = lane2 + 52
    _band(svg, _envelope(right), x0, px_per_ms, mid2, 30, _HEARD)
    sent, sent_every = _subset(call.marks_sent)
    echoed, echo_every = _subset(call.marks_echoed)
    for t in sent:
        svg.line(x(t), lane2 + lane_h - 10, x(t), lane2 + lane_h - 5, _MARK, 0.8)
    for t in echoed:
        svg.line(x(t), lane2 + lane_h - 5, x(t), lane2 + lane_h, _HEARD, 0.8)
    lat_rows = _Rows(1)
    for stop, heard in call.turns():
        if heard is None:
            continue
        a, b = x(stop), x(heard)
        label = f"+{heard - stop:.0f} ms"
        y = lane2 + 12
        svg.line(a, y, b, y, _INK, 1)
        svg.line(a, y - 4, a, y + 4, _INK, 1)
        svg.line(b, y - 4, b, y + 4, _INK, 1)
        lw = _text_width(label, 10)
        lx = (a + b) / 2 - lw / 2 if b - a > lw + 4 else b + 3
        if lat_rows.place(lx, lw) is not None:
            svg.text(lx, y + 14, label, size=10, fill=_INK)

    # lane 3: responses
    resp_rows = _Rows(2)
    bar_y = lane3 + 30
    for r in sorted(call.responses.values(), key=first_time):
        begin = r.created_t if r.created_t is not None else r.first_audio_t
        finish = r.done_t if r.done_t is not None else (r.last_audio_t or begin)
        if begin is not None and finish is not None:
            svg.line(x(begin), bar_y + 5, x(finish), bar_y + 5, "#b0b0b0", 1.5)
        if r.first_audio_t is not None and r.last_audio_t is not None:
            svg.rect(
                x(r.first_audio_t),
                bar_y,
                max(x(r.last_audio_t) - x(r.first_audio_t), 2),
                10,
                _GENERATED,
                rx="2",
            )
        label = _short_id(r.id)
        if r.status and r.status != "completed":
            label += f" ({r.status})"
        lx = min(x(begin if begin is not None else 0.0), x1 - _text_width(label, 10) - 2)
        row = resp_rows.place(lx, _text_width(label, 10))
        if row is not None:  # row 0 above the bar, row 1 below it
            svg.text(lx, lane3 + 22 if row == 0 else bar_y + 24, label, size=10, fill=_SOFT)

    # markers across the lanes: lines always, labels where there is room (hang-up first, then the switches
    # to a later Realtime session, then barge-ins with the truncate that follows each, then lone truncates)
    marker_rows_used = _Rows(marker_rows)

    def marker(t: float, pieces: list[tuple[str, str]]) -> None:
        mx = x(t)
        widths = [_text_width(text, 10) + 6 for text, _ in pieces]
        total = sum(widths)
        flip = mx + total > width - 4  # near the right edge: the label goes left of the line
        lx = mx - total if flip else mx
        row = marker_rows_used.place(lx - 2, total)
        if row is None:
            return
        ly = marker_top + row * 14 + 11
        svg.line(mx, ly - 2, mx, lane1, pieces[0][1], 0.8, "1,2")
        for (text, color), w in zip(pieces, widths, strict=True):
            svg.text(lx + 3, ly, text, size=10, fill=color, font_weight="bold")
            lx += w

    for t, _, _ in call.truncations:
        svg.line(x(t), lane2, x(t), axis_y, _TRUNCATE, 1.6, "4,3")
    for t in call.clears:
        svg.line(x(t), marker_top, x(t), axis_y, _BARGE, 1.6)
    if call.stop_t is not None:
        svg.line(x(call.stop_t), marker_top, x(call.stop_t), axis_y, _INK, 1.6)
        marker(call.stop_t, [("hang-up (stop)", _INK)])
    for t, number in call.swaps:
        svg.line(x(t), marker_top, x(t), axis_y, _SESSION, 1.6, "6,2,1,2")
        marker(t, [(f"session {number}", _SESSION)])
    pending = list(call.truncations)
    for t in call.clears:
        pieces = [("barge-in", _BARGE)]
        follow = next((tr for tr in pending if t <= tr[0] <= t + 250), None)
        if follow is not None:
            pending.remove(follow)
            pieces.append((f"truncate @ {follow[2]} ms", _TRUNCATE))
        marker(t, pieces)
    for t, _, ms in pending:
        marker(t, [(f"truncate @ {ms} ms", _TRUNCATE)])

    # legend
    candidates: list[tuple[bool, str, str]] = [
        (True, _CALLER, "caller loudness (RMS per 20 ms, -55 to -5 dBFS)"),
        (True, _HEARD, "model speech heard (simulated Twilio playback)"),
        (bool(call.responses), _GENERATED, "audio deltas of a response (grey: created → done)"),
        (bool(call.speech), _VAD, "model VAD speech (input ms mapped onto caller audio)"),
        (bool(call.clears), _BARGE, "barge-in: Twilio clear sent"),
        (bool(call.truncations), _TRUNCATE, "item truncate sent (ms of the item heard)"),
        (
            bool(call.marks_sent),
            _MARK,
            "ticks: marks sent" + (f" (1 in {sent_every} drawn)" if sent_every > 1 else ""),
        ),
        (
            bool(call.marks_echoed),
            _HEARD,
            "ticks: marks echoed" + (f" (1 in {echo_every} drawn)" if echo_every > 1 else ""),
        ),
        (any(h is not None for _, h in call.turns()), _INK, "+N ms: speech_stopped received → model heard"),
        (bool(call.dtmf), _DTMF, "DTMF digit pressed"),
        (call.stop_t is not None, _INK, "hang-up: Twilio stop received"),
        (bool(call.swaps), _SESSION, "session N: first caller audio sent to Realtime session N"),
    ]
    items = [(color, text) for shown, color, text in candidates if shown]
    if marker_rows_used.dropped:
        items.append((_SOFT, f"{marker_rows_used.dropped} marker labels left out (too close)"))
    columns = 3 if width >= 1000 else 2
    col_w = (width - 24) / columns
    for i, (color, text) in enumerate(items):
        lx = 12 + (i % columns) * col_w
        ly = legend_y + (i // columns) * 18
        svg.rect(lx, ly - 9, 14, 10, color, rx="2")
        svg.text(lx + 20, ly, text, size=10.5, fill=_INK)
    height = legend_y + math.ceil(len(items) / columns) * 18
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" '
        f'viewBox="0 0 {width} {height:.0f}" style="{_FONT}">\n'
        f'<rect x="0" y="0" width="{width}" height="{height:.0f}" fill="#ffffff"/>\n'
    )
    return head + "\n".join(svg.parts) + "\n</svg>\n"

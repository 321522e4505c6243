"""Exports of a recorded call, in the order of their modules: the analysis and summary
(bridge.recordings.analysis), the caller/heard tracks and the WAV (bridge.recordings.wav), the SVG
timeline (bridge.recordings.timeline); then all of them on the sample recordings in tests/recordings."""

from __future__ import annotations

import base64
import gzip
import io
import json
import wave
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.audio import ulaw_to_pcm16
from bridge.recordings import Header, Recording, RecordingWriter, parse_recording
from bridge.recordings.analysis import summary
from bridge.recordings.timeline import timeline_svg
from bridge.recordings.wav import caller_and_heard, wav_bytes

RECORDINGS = Path(__file__).parent / "recordings"
SVG = "{http://www.w3.org/2000/svg}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pcm(ulaw: bytes) -> np.ndarray:
    return np.frombuffer(ulaw_to_pcm16(ulaw), dtype="<i2")


def tone_frame(k: int) -> bytes:
    """160 bytes of μ-law, different for every k (so misplaced audio shows)."""
    return bytes((k * 7 + i) % 0x70 for i in range(160))


class CallBuilder:
    """Writes a synthetic recording the way the bridge does, into a list."""

    def __init__(
        self, *, call_sid: str = "CAexport1", dialect: str = "ga", audio_path: str = "g711_ulaw"
    ) -> None:
        self.lines: list[str] = []
        self.writer = RecordingWriter(
            Header(
                call_sid=call_sid, dialect=dialect, audio_path=audio_path, started_at="2025-01-01T00:00:00Z"
            ),
            self.lines.append,
        )
        self.audio_path = audio_path
        self.marks = 0

    def twilio_in(self, t: float, msg: dict[str, Any]) -> None:
        self.writer.write(t, "twilio", "in", json.dumps({"streamSid": "MZ1", **msg}))

    def twilio_out(self, t: float, msg: dict[str, Any]) -> None:
        self.writer.write(t, "twilio", "out", json.dumps({"streamSid": "MZ1", **msg}))

    def model_in(self, t: float, msg: dict[str, Any], session: int = 1) -> None:
        self.writer.write(t, "model", "in", json.dumps(msg), session)

    def model_out(self, t: float, msg: dict[str, Any], session: int = 1) -> None:
        self.writer.write(t, "model", "out", json.dumps(msg), session)

    def start(self, t: float = 10.0) -> None:
        self.twilio_in(t - 5, {"event": "connected", "protocol": "Call", "version": "1.0.0"})
        self.twilio_in(t, {"event": "start", "start": {"callSid": "CAexport1", "streamSid": "MZ1"}})

    def caller(self, t: float, frame: bytes, *, append: bool = True, session: int = 1) -> None:
        self.twilio_in(t, {"event": "media", "media": {"track": "inbound", "payload": b64(frame)}})
        if append:
            size = len(frame) * (1 if self.audio_path == "g711_ulaw" else 6)
            audio = {"type": "input_audio_buffer.append", "audio": b64(bytes(size))}
            self.model_out(t + 0.1, audio, session)

    def play(self, t: float, frames: list[bytes], *, mark_every: int = 5, step: float = 0.5) -> None:
        """Send frames to Twilio in a burst (``step`` ms apart), with a mark after every few."""
        for i, frame in enumerate(frames):
            self.twilio_out(t + i * step, {"event": "media", "media": {"payload": b64(frame)}})
            if (i + 1) % mark_every == 0 or i == len(frames) - 1:
                self.marks += 1
                self.twilio_out(t + i * step + 0.1, {"event": "mark", "mark": {"name": f"m{self.marks}"}})

    def echo(self, t: float, name: str) -> None:
        self.twilio_in(t, {"event": "mark", "mark": {"name": name}})

    def response(self, t: float, rid: str, item: str, audio: bytes, *, preview: bool = False) -> None:
        self.model_in(t, {"type": "response.created", "response": {"id": rid, "status": "in_progress"}})
        self.model_in(
            t + 1,
            {
                "type": "response.output_item.added",
                "response_id": rid,
                "item": {"id": item, "type": "message"},
            },
        )
        kind = "response.audio.delta" if preview else "response.output_audio.delta"
        for i in range(0, len(audio), 800):
            self.model_in(
                t + 10 + i / 80,
                {"type": kind, "response_id": rid, "item_id": item, "delta": b64(audio[i : i + 800])},
            )

    def recording(self) -> Recording:
        return parse_recording(self.lines)


JITTER = (0.0, 7.0, -3.0, 12.0)
ANSWER = [tone_frame(100 + k) for k in range(25)]  # 500 ms, sent in a burst
SECOND = [tone_frame(200 + k) for k in range(10)]  # 200 ms


def barge_in_call() -> CallBuilder:
    """3.3 s: the caller asks, the model answers, the caller barges in, the model answers again."""
    c = CallBuilder()
    c.model_out(0.0, {"type": "session.update", "session": {"type": "realtime"}})
    c.start()
    c.model_in(50.0, {"type": "session.created", "session": {}})
    for k in range(150):  # 3 s of caller audio from t = 20 ms, jittered
        c.caller(20.0 + 20 * k + JITTER[k % 4], tone_frame(k))
    c.model_in(420.0, {"type": "input_audio_buffer.speech_started", "audio_start_ms": 180, "item_id": "u1"})
    c.model_in(1750.0, {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 1200, "item_id": "u1"})
    c.response(1800.0, "resp_A1b2C3d4E5f6", "item_A", bytes(4000))
    c.play(1900.0, ANSWER)
    c.echo(2000.0, "m1")
    c.echo(2100.0, "m2")
    c.model_in(2140.0, {"type": "input_audio_buffer.speech_started", "audio_start_ms": 2050, "item_id": "u2"})
    c.twilio_out(2150.0, {"event": "clear"})
    c.model_out(
        2151.0,
        {"type": "conversation.item.truncate", "item_id": "item_A", "content_index": 0, "audio_end_ms": 250},
    )
    for name in ("m3", "m4", "m5"):
        c.echo(2152.0, name)
    c.model_in(
        2160.0, {"type": "response.done", "response": {"id": "resp_A1b2C3d4E5f6", "status": "cancelled"}}
    )
    c.twilio_in(2400.0, {"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "5"}})
    c.model_in(2700.0, {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 2600, "item_id": "u2"})
    c.response(2750.0, "resp_B", "item_B", bytes(1600))
    c.play(2900.0, SECOND)
    c.model_in(2905.0, {"type": "response.done", "response": {"id": "resp_B", "status": "completed"}})
    c.echo(3100.0, "m6")
    c.twilio_in(3300.0, {"event": "stop", "stop": {"callSid": "CAexport1"}})
    return c


# -- bridge.recordings.analysis: the call's timeline and its summary


def test_the_summary_has_the_figures_of_the_call() -> None:
    s = summary(barge_in_call().recording())
    assert s["call_sid"] == "CAexport1" and s["dialect"] == "ga" and s["audio_path"] == "g711_ulaw"
    assert s["duration_s"] == 3.3 and s["caller_audio_s"] == 3.0
    assert s["sent_s"] == 0.7 and s["heard_s"] == 0.45
    assert s["barge_ins"] == 1 and s["truncations"] == [("item_A", 250)]
    assert s["dtmf"] == "5" and s["hung_up"]
    assert s["responses"] == 2 and s["response_ids"] == ["resp_A1b2C3d4E5f6", "resp_B"]
    assert s["generated_s"] == 0.7  # 5600 μ-law bytes
    # VAD segments mapped onto the caller audio: 180-1200 ms and 2050-2600 ms of input, from 20 ms on.
    assert s["vad_speech_ms"] == [(200.0, 1220.0), (2070.0, 2620.0)] and s["caller_speech_s"] == 1.57
    assert s["turn_latencies_ms"] == [150.0, 200.0] and s["unanswered_turns"] == 0
    assert (s["marks_sent"], s["marks_echoed"]) == (7, 6)


def test_pcm16_and_preview_deltas_are_counted_in_their_own_format() -> None:
    c = CallBuilder(dialect="preview", audio_path="pcm16")
    c.response(100.0, "resp_P", "item_P", bytes(4800), preview=True)  # 100 ms at 24 kHz PCM16
    s = summary(c.recording())
    assert s["responses"] == 1 and s["generated_s"] == 0.1


def test_dropped_prestart_frames_shift_the_vad_mapping() -> None:
    c = CallBuilder()
    for k in range(10):  # the first 5 frames were never appended (dropped before the session was live)
        c.caller(20.0 * k, tone_frame(k), append=k >= 5)
    c.model_in(300.0, {"type": "input_audio_buffer.speech_started", "audio_start_ms": 20})
    c.model_in(350.0, {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 60})
    # 100 ms of caller audio was never appended: input 20-60 ms is call 120-160 ms.
    assert summary(c.recording())["vad_speech_ms"] == [(120.0, 160.0)]
    svg = timeline_svg(c.recording())
    ET.fromstring(svg)


# -- bridge.recordings.wav: the caller and heard tracks (where the analysis placed the audio) and the WAV


def test_the_caller_track_is_contiguous_despite_jitter() -> None:
    left, right = caller_and_heard(barge_in_call().recording())
    assert left.dtype == np.int16 and len(left) == len(right) == 3300 * 8
    expected = pcm(b"".join(tone_frame(k) for k in range(150)))
    assert np.array_equal(left[160 : 160 + len(expected)], expected)
    assert not left[:160].any() and not left[160 + len(expected) :].any()


def test_a_gap_in_the_inbound_stream_stays_a_gap() -> None:
    c = CallBuilder()
    for k, t in enumerate((0.0, 20.0, 40.0, 100.0, 400.0, 420.0)):
        c.caller(t, tone_frame(k), append=False)
    left, _ = caller_and_heard(c.recording())
    # 100 ms is 40 ms past the end of the third frame: jitter, placed right after it; 400 ms is a gap.
    assert np.array_equal(left[: 4 * 160], pcm(b"".join(tone_frame(k) for k in range(4))))
    assert not left[4 * 160 : 400 * 8].any()
    assert np.array_equal(left[400 * 8 : 440 * 8], pcm(tone_frame(4) + tone_frame(5)))


def test_the_heard_track_is_exactly_what_played_before_the_clear() -> None:
    _, right = caller_and_heard(barge_in_call().recording())
    answer = pcm(b"".join(ANSWER))
    # The burst starts playing at 1900 ms, at real time; the clear at 2150 ms leaves 250 ms heard.
    assert not right[: 1900 * 8].any()
    assert np.array_equal(right[1900 * 8 : 2150 * 8], answer[: 250 * 8])
    assert not right[2150 * 8 : 2900 * 8].any()
    assert np.array_equal(right[2900 * 8 : 3100 * 8], pcm(b"".join(SECOND)))
    assert not right[3100 * 8 :].any()


def test_outbound_audio_queues_behind_what_is_still_playing() -> None:
    c = CallBuilder()
    c.twilio_out(100.0, {"event": "media", "media": {"payload": b64(tone_frame(1) * 10)}})  # 200 ms
    c.twilio_out(150.0, {"event": "media", "media": {"payload": b64(tone_frame(2))}})
    c.twilio_out(700.0, {"event": "media", "media": {"payload": b64(tone_frame(3))}})  # queue empty again
    _, right = caller_and_heard(c.recording())
    assert np.array_equal(right[800:2400], pcm(tone_frame(1) * 10))
    assert np.array_equal(right[2400:2560], pcm(tone_frame(2)))
    assert not right[2560:5600].any()
    assert np.array_equal(right[5600:5760], pcm(tone_frame(3)))


def test_nothing_is_heard_after_the_stream_stops() -> None:
    c = CallBuilder()
    c.twilio_out(100.0, {"event": "media", "media": {"payload": b64(tone_frame(1) * 25)}})  # 500 ms
    c.twilio_in(300.0, {"event": "stop", "stop": {}})
    _, right = caller_and_heard(c.recording())
    assert len(right) == 300 * 8 and np.array_equal(right[800:], pcm(tone_frame(1) * 25)[:1600])
    assert summary(c.recording())["heard_s"] == 0.2


def test_the_wav_has_both_tracks_at_8_khz() -> None:
    left, right = caller_and_heard(barge_in_call().recording())
    data = wav_bytes(left, right)
    with wave.open(io.BytesIO(data), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (
            2,
            2,
            8000,
            len(left),
        )
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
    assert np.array_equal(frames[:, 0], left) and np.array_equal(frames[:, 1], right)


# -- bridge.recordings.timeline: the SVG timeline


def texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return [el.text or "" for el in root.iter(f"{SVG}text")]


def test_the_timeline_shows_barge_ins_truncations_and_latency() -> None:
    svg = timeline_svg(barge_in_call().recording())
    labels = texts(svg)
    assert any("CAexport1" in t for t in labels)
    assert "barge-in" in labels and "truncate @ 250 ms" in labels and "hang-up (stop)" in labels
    assert "+150 ms" in labels and "+200 ms" in labels
    assert "5" in labels  # the DTMF digit
    assert any(t.startswith("resp_A1b2C3") and "cancelled" in t for t in labels)
    assert any("caller speech" in t for t in labels) and any("model speech heard" in t for t in labels)


def test_text_from_the_recording_is_escaped() -> None:
    c = CallBuilder(call_sid='CA<&">')
    c.model_in(10.0, {"type": "response.created", "response": {"id": "<b>&"}})
    c.model_in(20.0, {"type": "response.output_audio.delta", "response_id": "<b>&", "delta": "AAAA"})
    labels = texts(timeline_svg(c.recording()))
    assert any('CA<&">' in t for t in labels) and "<b>&" in labels


def test_a_long_call_draws_a_bounded_number_of_ticks() -> None:
    c = CallBuilder()
    c.play(0.0, [tone_frame(k) for k in range(30_000)], step=20.0)  # 10 minutes, a mark every 100 ms
    for n in range(1, 6001):
        c.echo(100.0 * n, f"m{n}")
    svg = timeline_svg(c.recording())
    root = ET.fromstring(svg)
    assert len(list(root.iter(f"{SVG}line"))) < 1000
    assert len(svg) < 400_000
    assert any("1 in 25 drawn" in t for t in texts(svg))


# -- a call over two Realtime sessions (a rollover)


def rollover_call() -> CallBuilder:
    """2 s of caller audio: the first second goes to session 1, the rest to session 2 (from 1000 ms);
    each session's VAD hears speech 200-400 ms into its own input audio."""
    c = CallBuilder()
    c.start(5.0)
    c.model_in(1.0, {"type": "session.created", "session": {}})
    c.model_out(2.0, {"type": "session.update", "session": {"type": "realtime"}})
    c.model_in(950.0, {"type": "session.created", "session": {}}, 2)
    c.model_out(960.0, {"type": "session.update", "session": {"type": "realtime"}}, 2)
    for k in range(100):
        c.caller(20.0 * k, tone_frame(k), session=1 if k < 50 else 2)
    for session, base in ((1, 0.0), (2, 1000.0)):
        start = {"type": "input_audio_buffer.speech_started", "audio_start_ms": 200}
        stop = {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 400}
        c.model_in(base + 250.0, start, session)
        c.model_in(base + 450.0, stop, session)
    c.twilio_in(2100.0, {"event": "stop", "stop": {"callSid": "CAexport1"}})
    return c


@pytest.mark.timeout(30)
def test_a_rollover_is_a_marker_on_the_timeline_and_a_figure_of_the_summary() -> None:
    rec = rollover_call().recording()
    assert rec.sessions == 2
    s = summary(rec)
    assert s["sessions"] == 2
    # each session's VAD ms count its own input audio: session 2's 200 ms is 1200 ms of the call
    assert s["vad_speech_ms"] == [(200.0, 400.0), (1200.0, 1400.0)]
    svg = timeline_svg(rec)
    labels = texts(svg)
    assert "session 2" in labels and "hang-up (stop)" in labels
    assert any("Realtime sessions 2" in t for t in labels)
    assert any(t.startswith("session N: first caller audio") for t in labels)  # the legend
    root = ET.fromstring(svg)
    swap_lines = [el for el in root.iter(f"{SVG}line") if el.get("stroke") == "#138a8a"]
    assert swap_lines  # the line across the lanes, at the first append to session 2 (1000.1 ms)
    label = next(el for el in root.iter(f"{SVG}text") if el.text == "session 2")
    assert {el.get("x1") for el in swap_lines} == {f"{float(label.get('x', 0)) - 3:.1f}"}


@pytest.mark.timeout(30)
def test_a_one_session_call_has_no_session_marker() -> None:
    for rec in (barge_in_call().recording(), load(RECORDINGS / "barge-in.jsonl.gz")):
        assert rec.sessions == 1 and "sessions" not in summary(rec)
        labels = texts(timeline_svg(rec))
        assert not any(t.startswith("session ") or "Realtime sessions" in t for t in labels)


# -- all three on unusual recordings


def test_a_caller_only_capture_exports() -> None:
    capture = [
        json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
        json.dumps({"event": "start", "streamSid": "MZ1", "start": {"callSid": "CA9"}}),
    ]
    for k in range(50):
        media = {"track": "inbound", "timestamp": str(100 + 20 * k), "payload": b64(tone_frame(k))}
        capture.append(json.dumps({"event": "media", "streamSid": "MZ1", "media": media}))
    capture.append(json.dumps({"event": "stop", "streamSid": "MZ1", "stop": {"callSid": "CA9"}}))
    rec = parse_recording(capture)
    left, right = caller_and_heard(rec)
    assert np.array_equal(left[800 : 800 + 50 * 160], pcm(b"".join(tone_frame(k) for k in range(50))))
    assert not right.any() and len(left) == len(right)
    s = summary(rec)
    assert s["caller_only"] and s["heard_s"] == 0 and s["responses"] == 0 and s["turn_latencies_ms"] == []
    labels = texts(timeline_svg(rec))
    assert any("CA9" in t and "caller-only" in t for t in labels)


def test_an_empty_call_and_a_truncated_recording_export() -> None:
    empty = CallBuilder().recording()
    left, right = caller_and_heard(empty)
    assert len(left) == len(right) == 0
    with wave.open(io.BytesIO(wav_bytes(left, right)), "rb") as w:
        assert w.getnframes() == 0
    texts(timeline_svg(empty, width=600))
    assert summary(empty)["duration_s"] == 0

    lines = barge_in_call().lines
    cut = parse_recording(lines[:-1] + [lines[-1][:20]])
    assert cut.truncated and not summary(cut)["hung_up"]
    assert any("cut short" in t for t in texts(timeline_svg(cut)))


# -- the sample recordings made by the bridge (tests/recordings, part of the repository: never skipped)


def load(path: Path) -> Recording:
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return parse_recording(list(f), name=path.name)


REAL = sorted([*RECORDINGS.glob("*.jsonl.gz"), *RECORDINGS.glob("*.jsonl")]) or [RECORDINGS / "*.jsonl.gz"]
"""The sample recordings; none found gives one path that does not exist, so the tests fail, not skip."""


def test_the_recordings_directory_has_recordings() -> None:
    assert RECORDINGS.is_dir(), f"{RECORDINGS} is missing: the sample recordings are part of the repository"
    assert any(p.name.endswith(".jsonl.gz") and p.is_file() for p in REAL), (
        "tests/recordings has no *.jsonl.gz"
    )


@pytest.mark.parametrize("path", REAL, ids=[p.name for p in REAL])
def test_every_real_recording_exports(path: Path) -> None:
    rec = load(path)
    left, right = caller_and_heard(rec)
    assert len(left) == len(right) >= round(rec.duration_ms * 8)
    with wave.open(io.BytesIO(wav_bytes(left, right)), "rb") as w:
        assert w.getnframes() == len(left)
    labels = texts(timeline_svg(rec))
    assert any(rec.header.call_sid in t for t in labels)
    s = summary(rec)
    assert s["heard_s"] <= s["sent_s"]


def test_the_real_barge_in_recording_cuts_the_heard_audio() -> None:
    rec = load(RECORDINGS / "barge-in.jsonl.gz")
    s = summary(rec)
    assert s["barge_ins"] >= 1 and s["heard_s"] < s["sent_s"]
    _, right = caller_and_heard(rec)
    assert np.count_nonzero(right) < s["sent_s"] * 8000
    assert "barge-in" in texts(timeline_svg(rec))

"""The recording format (writer, reader, captures, truncation), recording files, and real calls recorded."""

from __future__ import annotations

import gzip
import json
import math
import zlib
from pathlib import Path
from typing import Any

import pytest

from bridge.clock import ManualClock
from bridge.errors import MalformedMessage
from bridge.local_model import LocalModel
from bridge.recordings import REDACTED, Event, Header, RecordingFile, RecordingWriter, parse_recording
from bridge.recordings.files import GZIP_FLUSH_SECONDS
from bridge.testing import TwilioCaller
from tests.conftest import AUTH_TOKEN, fixture_audio


def write(lines: list[str]) -> RecordingWriter:
    return RecordingWriter(
        Header(call_sid="CA1", dialect="preview", session={"voice": "alloy"}), lines.append
    )


def test_round_trip_keeps_every_message_as_it_crossed_the_wire() -> None:
    lines: list[str] = []
    writer = write(lines)
    start = {
        "event": "start",
        "start": {"callSid": "CA1", "customParameters": {"token": "secret", "To": "+1"}},
    }
    writer.write(0.04, "twilio", "in", json.dumps(start))
    writer.write(1.26, "twilio", "in", "{not json")
    writer.write(2.0, "twilio", "in", b"\x00\x01")
    writer.write(3.0, "model", "out", '{"type":"input_audio_buffer.append","audio":"AAA="}')
    rec = parse_recording(lines)
    assert rec.header.call_sid == "CA1" and rec.header.dialect == "preview"
    assert rec.header.session == {"voice": "alloy"}
    first, bad, binary, append = rec.events
    assert first.msg is not None and first.msg["start"]["customParameters"] == {"token": REDACTED, "To": "+1"}
    assert (first.t, first.kind) == (0.0, "start")
    assert bad.raw == "{not json" and bad.wire == "{not json"
    assert binary.data == b"\x00\x01" and binary.wire == b"\x00\x01"
    assert append.kind == "input_audio_buffer.append" and json.loads(append.wire)["audio"] == "AAA="
    assert "secret" not in "".join(lines)


def test_a_truncated_last_line_is_left_out_and_flagged() -> None:
    lines: list[str] = []
    writer = write(lines)
    writer.write(1.0, "model", "in", '{"type":"session.created"}')
    writer.write(2.0, "model", "in", '{"type":"response.created"}')
    cut = lines[:-1] + [lines[-1][:17]]
    rec = parse_recording(cut)
    assert rec.truncated and [e.kind for e in rec.events] == ["session.created"]


def test_edited_times_are_put_back_in_order() -> None:
    lines: list[str] = []
    writer = write(lines)
    writer.write(10.0, "twilio", "in", '{"event":"media"}')
    writer.write(20.0, "twilio", "in", '{"event":"stop"}')
    edited = lines[:1] + [lines[2], lines[1].replace('"t":10.0', '"t":30.0')]
    assert [e.kind for e in parse_recording(edited).events] == ["stop", "media"]


def test_a_plain_twilio_capture_is_a_caller_only_recording() -> None:
    capture = [
        json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
        json.dumps(
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": "MZ1",
                "start": {"callSid": "CA9", "customParameters": {"token": "t"}},
            }
        ),
        json.dumps({"event": "media", "streamSid": "MZ1", "media": {"timestamp": "40", "payload": "//8="}}),
        json.dumps({"event": "stop", "streamSid": "MZ1", "stop": {"callSid": "CA9"}}),
    ]
    rec = parse_recording(capture)
    assert rec.header.caller_only and rec.header.call_sid == "CA9"
    assert [(e.t, e.kind, e.src, e.dir) for e in rec.events] == [
        (0.0, "connected", "twilio", "in"),
        (0.0, "start", "twilio", "in"),
        (40.0, "media", "twilio", "in"),
        (40.0, "stop", "twilio", "in"),
    ]


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        ([], "empty"),
        (["[1]"], "not a JSON object"),
        (['{"hello": 1}'], "neither a bridge recording"),
        (['{"format": "bridge-call-recording", "version": 99}'], "newer than this bridge"),
        (
            [
                '{"format": "bridge-call-recording", "version": 1}',
                '{"t": "x", "src": "twilio", "dir": "in"}',
                '{"t": 1}',
            ],
            "'t' is not a number",
        ),
        (["nope", '{"t": 1}'], "is not JSON"),
    ],
)
def test_bad_files_say_what_is_wrong(lines: list[str], fragment: str) -> None:
    with pytest.raises(MalformedMessage, match=fragment):
        parse_recording(lines, name="x.jsonl")


def test_event_wire_of_a_json_message_is_compact_json() -> None:
    event = Event(1.0, "twilio", "in", msg={"event": "mark", "mark": {"name": "m1"}})
    assert json.loads(event.wire) == {"event": "mark", "mark": {"name": "m1"}}


# -- recording files


def readable_gzip_lines(path: Path) -> list[str]:
    """The complete lines a reader gets out of a gzip file now, while its writer still has it open."""
    text = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(path.read_bytes()).decode("utf-8")
    return [line for line in text.splitlines(keepends=True) if line.endswith("\n")]


def test_a_gzip_recording_is_flushed_once_the_flush_interval_of_clock_time_passed(tmp_path: Path) -> None:
    clock = ManualClock()
    path = tmp_path / "call.jsonl.gz"
    sink = RecordingFile(path, clock)
    lines = [f'{{"t": {n}}}\n' for n in range(6)]
    try:
        sink(lines[0])
        clock.set(GZIP_FLUSH_SECONDS / 2)
        sink(lines[1])
        clock.set(math.nextafter(GZIP_FLUSH_SECONDS, 0.0))  # the last instant before the interval is up
        sink(lines[2])
        assert readable_gzip_lines(path) == []
        clock.set(GZIP_FLUSH_SECONDS)
        sink(lines[3])  # the first line once the interval is up: everything so far can be read
        assert readable_gzip_lines(path) == lines[:4]
        sink(lines[4])  # the interval starts again from that flush
        clock.set(GZIP_FLUSH_SECONDS * 1.5)
        sink(lines[5])
        assert readable_gzip_lines(path) == lines[:4]
    finally:
        sink.close()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        assert list(f) == lines


def test_a_plain_recording_reaches_the_file_line_by_line(tmp_path: Path) -> None:
    clock = ManualClock()
    path = tmp_path / "call.jsonl"
    sink = RecordingFile(path, clock)
    try:
        sink('{"t": 0}\n')
        assert path.read_text(encoding="utf-8") == '{"t": 0}\n'
        sink('{"t": 1}\n')
        assert path.read_text(encoding="utf-8") == '{"t": 0}\n{"t": 1}\n'
    finally:
        sink.close()


# -- recording real calls


def read(path: Path) -> list[str]:
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return list(f)


@pytest.mark.parametrize("gz", ["0", "1"])
async def test_a_real_call_is_recorded_both_sockets_both_directions(
    start_bridge: Any, tmp_path: Path, gz: str
) -> None:
    recordings = tmp_path / "recordings"
    async with LocalModel(speed=8.0) as model:
        bridge = await start_bridge(
            model,
            BRIDGE_RECORDINGS_DIR=str(recordings),
            BRIDGE_RECORDINGS_GZIP=gz,
            AZURE_OPENAI_API_KEY="k-secret",
        )
        async with TwilioCaller(bridge.url, auth_token=AUTH_TOKEN, from_="+15550001111") as call:
            await call.dial()
            await call.wait_for_played(0.5)
            await call.speak(fixture_audio("hello.ulaw"))
            await call.hang_up()
    (path,) = recordings.iterdir()
    assert path.name.endswith(".jsonl.gz" if gz == "1" else ".jsonl")
    text = "".join(read(path))
    assert "k-secret" not in text and AUTH_TOKEN not in text
    rec = parse_recording(read(path))
    assert rec.header.from_number == "+15550001111" and rec.header.audio_path == "pcm16"
    assert rec.header.session["type"] == "realtime"  # GA session config
    kinds = {(e.src, e.dir, e.kind) for e in rec.events}
    assert {
        ("twilio", "in", "connected"),
        ("twilio", "in", "start"),
        ("twilio", "in", "media"),
        ("twilio", "in", "mark"),
        ("twilio", "in", "stop"),
        ("twilio", "out", "media"),
        ("twilio", "out", "mark"),
        ("model", "out", "session.update"),
        ("model", "out", "input_audio_buffer.append"),
        ("model", "in", "session.created"),
        ("model", "in", "response.output_audio.delta"),
    } <= kinds
    start = next(e for e in rec.events if e.kind == "start")
    assert start.msg is not None and start.msg["start"]["customParameters"]["token"] == REDACTED
    times = [e.t for e in rec.events]
    assert times == sorted(times) and times[0] >= 0


async def test_nothing_is_recorded_when_recording_is_off(start_bridge: Any, tmp_path: Path) -> None:
    async with LocalModel(speed=8.0) as model:
        bridge = await start_bridge(model)
        async with TwilioCaller(bridge.url, auth_token=AUTH_TOKEN) as call:
            await call.dial()
            await call.wait_for_played(0.2)
    assert not any(tmp_path.rglob("*.jsonl*"))


# -- several Realtime sessions in one call (format version 2)


def model_lines(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines[1:] if json.loads(line)["src"] == "model"]


@pytest.mark.timeout(10)
def test_a_two_session_call_round_trips_and_only_session_2_lines_say_so() -> None:
    lines: list[str] = []
    writer = write(lines)
    writer.write(1.0, "model", "in", '{"type":"session.created","session":{"id":"sess_1"}}')
    writer.write(2.0, "model", "out", '{"type":"session.update"}')
    writer.write(3.0, "twilio", "in", '{"event":"media"}')
    writer.write(900.0, "model", "in", '{"type":"session.created","session":{"id":"sess_2"}}', 2)
    writer.write(901.0, "model", "out", '{"type":"session.update"}', session=2)
    writer.write(902.0, "model", "out", b"\x01\x02", 2)
    writer.write(903.0, "model", "in", "not json", 2)
    assert json.loads(lines[0])["version"] == 2
    assert [line.get("s") for line in model_lines(lines)] == [None, None, 2, 2, 2, 2]
    rec = parse_recording(lines)
    assert rec.sessions == 2
    assert [(e.t, e.src, e.session) for e in rec.events] == [
        (1.0, "model", 1),
        (2.0, "model", 1),
        (3.0, "twilio", 1),
        (900.0, "model", 2),
        (901.0, "model", 2),
        (902.0, "model", 2),
        (903.0, "model", 2),
    ]
    assert rec.events[5].data == b"\x01\x02" and rec.events[6].raw == "not json"
    assert [e.t for e in rec.select("model", "out", session=2)] == [901.0, 902.0]
    assert [e.t for e in rec.select("model", "in", session=1)] == [1.0]
    assert [e.t for e in rec.select("model", "out")] == [2.0, 901.0, 902.0]
    assert rec.select("twilio", "in", session=2) == []


@pytest.mark.timeout(10)
def test_a_one_session_call_is_written_as_before_but_for_the_header_version() -> None:
    lines: list[str] = []
    writer = write(lines)
    writer.write(1.0, "model", "in", '{"type":"session.created"}', 1)
    writer.write(2.0, "twilio", "in", '{"event":"media"}')
    assert lines[1:] == [
        '{"t":1.0,"src":"model","dir":"in","msg":{"type":"session.created"}}\n',
        '{"t":2.0,"src":"twilio","dir":"in","msg":{"event":"media"}}\n',
    ]
    rec = parse_recording(lines)
    assert rec.header.version == 2 and rec.sessions == 1


@pytest.mark.timeout(10)
def test_a_version_1_file_still_parses_as_one_session() -> None:
    lines = [
        '{"format": "bridge-call-recording", "version": 1, "call_sid": "CA1", "dialect": "ga"}',
        '{"t": 1, "src": "model", "dir": "in", "msg": {"type": "session.created"}}',
        '{"t": 2, "src": "model", "dir": "out", "msg": {"type": "session.update"}}',
        '{"t": 3, "src": "twilio", "dir": "in", "msg": {"event": "start"}}',
    ]
    rec = parse_recording(lines)
    assert rec.header.version == 1 and rec.sessions == 1
    assert [(e.kind, e.session) for e in rec.events] == [
        ("session.created", 1),
        ("session.update", 1),
        ("start", 1),
    ]
    assert len(rec.select("model", "out", session=1)) == 1 and rec.select("model", "out", session=2) == []


@pytest.mark.timeout(10)
def test_the_sample_recordings_are_version_2_with_their_sessions() -> None:
    from bridge.recordings import load_recording

    samples = Path(__file__).parent / "recordings"
    for path in sorted(samples.glob("*.jsonl.gz")):
        rec = load_recording(path)
        assert rec.header.version == 2, path.name
        assert rec.sessions == (2 if path.name == "rollover.jsonl.gz" else 1), path.name
        assert rec.header.rollover["margin"] > 0, path.name  # what a replay needs to swap when the call did
        assert {e.session for e in rec.events} == set(range(1, rec.sessions + 1)), path.name


@pytest.mark.timeout(10)
def test_a_newer_version_is_refused_and_a_version_1_reader_refuses_version_2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(MalformedMessage, match=r"format version 3, newer than this bridge reads \(2\)"):
        parse_recording(['{"format": "bridge-call-recording", "version": 3}'], name="x.jsonl")
    lines: list[str] = []
    write(lines).write(1.0, "model", "in", '{"type":"session.created"}', 2)
    import bridge.recordings.format as fmt

    monkeypatch.setattr(fmt, "VERSION", 1)  # the reader of a bridge from before version 2
    with pytest.raises(MalformedMessage, match=r"format version 2, newer .* \(1\): upgrade the bridge"):
        parse_recording(lines, name="x.jsonl")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"t": 1, "src": "model", "dir": "in", "s": 0, "msg": {}}', "'s' .* is not a positive integer"),
        ('{"t": 1, "src": "model", "dir": "in", "s": "2", "msg": {}}', "'s' .* is not a positive integer"),
        ('{"t": 1, "src": "model", "dir": "in", "s": 2.0, "msg": {}}', "'s' .* is not a positive integer"),
        ('{"t": 1, "src": "model", "dir": "in", "s": true, "msg": {}}', "'s' .* is not a positive integer"),
        ('{"t": 1, "src": "twilio", "dir": "in", "s": 2, "msg": {}}', "'s' .* only for model messages"),
    ],
)
def test_a_bad_session_number_names_the_line(line: str, fragment: str) -> None:
    lines = ['{"format": "bridge-call-recording", "version": 2}', "", line]
    with pytest.raises(MalformedMessage, match=f"^x.jsonl:3: {fragment}"):
        parse_recording(lines, name="x.jsonl")


@pytest.mark.timeout(10)
def test_the_writer_refuses_a_session_number_the_reader_would_refuse() -> None:
    writer = write([])
    with pytest.raises(ValueError, match="positive int"):
        writer.write(1.0, "model", "in", "{}", 0)
    with pytest.raises(ValueError, match="only a model message"):
        writer.write(1.0, "twilio", "in", "{}", 2)
    assert Event(1.0, "twilio", "in", msg={}).session == 1


@pytest.mark.timeout(10)
def test_a_gzip_recording_cut_off_by_a_crash_is_read_up_to_the_cut(tmp_path: Path) -> None:
    from bridge.recordings import Header, RecordingWriter, load_recording

    clock = ManualClock()
    path = tmp_path / "crashed.jsonl.gz"
    sink = RecordingFile(path, clock)
    writer = RecordingWriter(Header(call_sid="CA" + "7" * 32), sink)
    for n in range(3):
        writer.write(float(n), "model", "in", json.dumps({"type": "session.created", "n": n}))
    clock.set(GZIP_FLUSH_SECONDS)
    writer.write(3.0, "model", "in", json.dumps({"type": "session.updated"}))  # flushed: readable
    writer.write(4.0, "model", "in", json.dumps({"type": "response.created"}))  # not flushed yet
    crashed = path.read_bytes()  # what is on disk when the process dies: no gzip trailer
    sink.close()
    path.write_bytes(crashed)
    rec = load_recording(path)  # not EOFError
    assert rec.truncated
    assert [e.kind for e in rec.events] == ["session.created"] * 3 + ["session.updated"]

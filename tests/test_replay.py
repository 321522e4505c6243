"""Replaying recorded calls: the committed samples pass, an edited recording diverges in plain words."""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from bridge.cli import main
from bridge.recordings import Header, Recording, RecordingWriter, load_recording, parse_recording
from bridge.replay import (
    RecordedModel,
    ReplayResult,
    VirtualTimeLoop,
    compare_client_events,
    compare_sessions,
    replay_file,
    run,
)

RECORDINGS = Path(__file__).parent / "recordings"
SAMPLES = sorted(p for p in RECORDINGS.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))


def test_the_samples_are_there() -> None:
    names = {p.name for p in SAMPLES}
    assert {
        "barge-in.jsonl.gz",
        "dtmf.jsonl.gz",
        "hangup-mid-answer.jsonl.gz",
        "twilio-capture.jsonl",
    } <= names


@pytest.mark.parametrize("path", [p for p in SAMPLES if not p.name.startswith("twilio-capture")], ids=str)
def test_every_sample_replays_against_its_recorded_model_without_divergence(path: Path) -> None:
    result = replay_file(path)
    assert result.passed, (result.divergences, result.errors)
    recorded = load_recording(path)
    # The rollover sample swaps sessions on replay when the call did: no more, no fewer.
    assert result.model_sessions == result.recorded_sessions == recorded.sessions
    clears = sum(1 for e in recorded.select("twilio", "out") if e.kind == "clear")
    assert result.clears == clears


def test_the_barge_in_sample_truncates_where_it_did_and_keeps_its_session_config() -> None:
    recording = load_recording(RECORDINGS / "barge-in.jsonl.gz")
    result = replay_file(RECORDINGS / "barge-in.jsonl.gz")
    (recorded_truncate,) = [
        e.msg for e in recording.select("model", "out") if e.kind == "conversation.item.truncate"
    ]
    assert recorded_truncate is not None
    ((item, end_ms),) = result.truncations
    assert item == recorded_truncate["item_id"]
    assert abs(end_ms - recorded_truncate["audio_end_ms"]) <= 25
    assert result.session_config == recording.header.session


def test_a_plain_twilio_capture_replays_against_the_local_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(RECORDINGS / "twilio-capture.jsonl")]) == 0
    assert "PASS twilio-capture.jsonl" in capsys.readouterr().out


def shifted(path: Path, tmp_path: Path, ms: float) -> Path:
    """The recording with the caller's speech moved ``ms`` later (what a person editing it would do)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        event = json.loads(line)
        if (
            event["src"] == "twilio"
            and event["dir"] == "in"
            and event.get("msg", {}).get("event") in ("media", "stop")
        ):
            event["t"] += ms
        out.append(json.dumps(event))
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(out) + "\n")
    return edited


def test_changing_the_callers_timing_gives_a_clear_diff_and_a_failing_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edited = shifted(RECORDINGS / "barge-in.jsonl.gz", tmp_path, 400)
    result = replay_file(edited)
    assert not result.passed
    assert any("conversation.item.truncate" in d and "in the recording" in d for d in result.divergences)
    assert main(["replay", str(edited), str(RECORDINGS / "dtmf.jsonl.gz")]) == 1
    out = capsys.readouterr().out
    assert "FAIL edited.jsonl" in out and "PASS dtmf.jsonl.gz" in out and "1 passed, 1 failed" in out


def test_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--json", str(RECORDINGS / "barge-in.jsonl.gz")]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["barge_ins"] == 1 and report["truncations"][0]["audio_end_ms"] > 0
    assert report["model_sessions"] == report["recorded_sessions"] == 1


def test_realtime_replay_of_a_short_call_also_passes() -> None:
    result = replay_file(RECORDINGS / "hangup-mid-answer.jsonl.gz", speed="realtime")
    assert result.passed, result.divergences
    assert set(result.added_latency_ms) == {"inbound", "outbound"}


def test_a_bad_file_is_an_error_not_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": "world"}\n')
    assert main(["replay", str(bad)]) == 1
    assert "neither a bridge recording" in capsys.readouterr().out


def test_the_virtual_clock_skips_idle_time_and_keeps_order() -> None:
    async def scenario() -> tuple[list[str], float]:
        order: list[str] = []
        loop = asyncio.get_running_loop()
        began = loop.time()

        async def after(delay: float, name: str) -> None:
            await asyncio.sleep(delay)
            order.append(name)

        await asyncio.gather(after(600, "ten minutes"), after(0.02, "a frame"), after(30, "half a minute"))
        return order, loop.time() - began

    loop = VirtualTimeLoop()
    try:
        order, elapsed = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert order == ["a frame", "half a minute", "ten minutes"]
    assert elapsed == pytest.approx(600)


def test_run_fast_uses_virtual_time() -> None:
    async def sleep_long() -> float:
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.sleep(3600)
        return loop.time() - began

    assert run(sleep_long(), speed="fast") == pytest.approx(3600)


def test_recorded_model_cues_wait_for_the_same_client_events() -> None:
    lines = [
        '{"format": "bridge-call-recording", "version": 1, "call_sid": "CA1"}',
        '{"t": 1, "src": "model", "dir": "in", "msg": {"type": "session.created"}}',
        '{"t": 2, "src": "model", "dir": "out", "msg": {"type": "session.update"}}',
        '{"t": 50, "src": "model", "dir": "in", "msg": {"type": "session.updated"}}',
    ]
    recording: Recording = parse_recording(lines)
    cues = RecordedModel._script(recording)
    assert [(c.event.kind, c.after, c.audio, round(c.lag, 3)) for c in cues] == [
        ("session.created", 0, False, 0.001),
        ("session.updated", 1, False, 0.048),
    ]


def test_compare_ignores_event_ids_and_names_what_changed() -> None:
    update = {"type": "session.update", "session": {"voice": "alloy"}, "event_id": "a"}
    same = {**update, "event_id": "b"}
    assert compare_client_events([update], [same], audio_path="pcm16", speed="fast") == []
    other = {"type": "session.update", "session": {"voice": "verse"}}
    (problem,) = compare_client_events([update], [other], audio_path="pcm16", speed="fast")
    assert problem == "#1 session.update: session.voice was 'alloy', now 'verse'"
    (missing,) = compare_client_events(
        [update, {"type": "response.cancel"}], [same], audio_path="pcm16", speed="fast"
    )
    assert missing.startswith("missing #2: response.cancel")


# -- calls over several Realtime sessions


def two_session_recording() -> Recording:
    """Session 1 answers a response.create; session 2 (a rollover) is set up and hears the caller."""
    lines: list[str] = []
    writer = RecordingWriter(Header(call_sid="CA2"), lines.append)

    def model(t: float, direction: str, msg: dict[str, object], session: int) -> None:
        writer.write(t, "model", "in" if direction == "in" else "out", json.dumps(msg), session)

    model(5, "in", {"type": "session.created", "session": {"id": "sess_1"}}, 1)
    model(10, "out", {"type": "session.update", "session": {"voice": "alloy"}}, 1)
    model(20, "in", {"type": "session.updated", "session": {"id": "sess_1"}}, 1)
    model(30, "out", {"type": "response.create"}, 1)
    model(40, "in", {"type": "response.created", "response": {"id": "resp_1"}}, 1)
    model(90, "in", {"type": "response.done", "response": {"id": "resp_1"}}, 1)
    model(1000, "in", {"type": "session.created", "session": {"id": "sess_2"}}, 2)
    model(1005, "out", {"type": "session.update", "session": {"voice": "alloy"}}, 2)
    model(1030, "in", {"type": "session.updated", "session": {"id": "sess_2"}}, 2)
    model(1100, "out", {"type": "input_audio_buffer.append", "audio": "AAAA"}, 2)
    model(1350, "in", {"type": "input_audio_buffer.speech_started", "audio_start_ms": 0}, 2)
    recording = parse_recording(lines)
    assert recording.sessions == 2
    return recording


async def receive(ws: ClientConnection) -> tuple[str, str, float]:
    """The next server event: its type, its session or response id, and when it arrived."""
    event = json.loads(await ws.recv())
    body = event.get("session") or event.get("response") or {}
    return event["type"], body.get("id", ""), asyncio.get_running_loop().time()


@pytest.mark.timeout(30)
def test_the_recorded_model_serves_each_connection_its_own_session() -> None:
    model = RecordedModel(two_session_recording())
    append = {"type": "input_audio_buffer.append", "audio": "AAAA"}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        await model.start()
        url = model.endpoint.replace("http", "ws")
        try:
            async with connect(url) as first:
                assert (await receive(first))[:2] == ("session.created", "sess_1")
                await first.send(json.dumps({"type": "session.update", "session": {"voice": "alloy"}}))
                assert (await receive(first))[:2] == ("session.updated", "sess_1")
                for _ in range(3):  # caller audio on session 1 must not count for session 2's cues
                    await first.send(json.dumps(append))
                await asyncio.sleep(1)  # virtual time: past the recorded pacing from session.updated
                await first.send(json.dumps({"type": "response.create"}))
                sent = loop.time()
                created, done = await receive(first), await receive(first)
                assert created[:2] == ("response.created", "resp_1") and done[:2] == (
                    "response.done",
                    "resp_1",
                )
                assert created[2] - sent == pytest.approx(0.010, abs=1e-3)  # paced as recorded
                assert done[2] - created[2] == pytest.approx(0.050, abs=1e-3)

                await asyncio.sleep(5)  # virtual time: the call goes on a while before the rollover
                async with connect(url) as second:
                    assert (await receive(second))[:2] == ("session.created", "sess_2")
                    await asyncio.sleep(1)
                    await second.send(json.dumps({"type": "session.update", "session": {"voice": "alloy"}}))
                    updated_sent = loop.time()
                    updated = await receive(second)
                    assert updated[:2] == ("session.updated", "sess_2")
                    assert updated[2] - updated_sent == pytest.approx(0.025, abs=1e-3)
                    # speech_started waits for session 2's own append, and comes the recorded 250 ms later
                    await asyncio.sleep(2)
                    appended = loop.time()
                    await second.send(json.dumps(append))
                    speech = await receive(second)
                    assert speech[0] == "input_audio_buffer.speech_started"
                    assert speech[2] - appended == pytest.approx(0.250, abs=1e-3)

                    async with connect(url) as third:  # beyond the recording: it only listens
                        await third.send(json.dumps({"type": "session.update"}))
                        with pytest.raises(TimeoutError):
                            await asyncio.wait_for(third.recv(), 60)
        finally:
            await model.close()

    run(scenario(), speed="fast")
    assert model.connections == 3
    first, second, third = model.received_by_connection
    assert [e["type"] for e in first] == ["session.update"] + ["input_audio_buffer.append"] * 3 + [
        "response.create"
    ]
    assert [e["type"] for e in second] == ["session.update", "input_audio_buffer.append"]
    assert third == [{"type": "session.update"}]
    assert model.received == first + second + third
    assert [(e["type"], (e.get("session") or {}).get("id")) for e in model.sent[:3]] == [
        ("session.created", "sess_1"),
        ("session.updated", "sess_1"),
        ("response.created", None),
    ]
    assert [e["type"] for e in model.sent[4:]] == [
        "session.created",
        "session.updated",
        "input_audio_buffer.speech_started",
    ]


@pytest.mark.timeout(10)
def test_the_cues_of_a_later_session_count_from_its_first_message() -> None:
    cues = RecordedModel._script(two_session_recording(), 2)
    assert [(c.event.kind, c.after, c.audio, round(c.lag, 3)) for c in cues] == [
        ("session.created", 0, False, 0.0),
        ("session.updated", 1, False, 0.025),
        ("input_audio_buffer.speech_started", 1, True, 0.25),
    ]
    assert RecordedModel._script(two_session_recording(), 3) == []


def by_session(recorded: list[list[dict[str, Any]]], replayed: list[list[dict[str, Any]]]) -> list[str]:
    return compare_sessions(recorded, replayed, audio_path="pcm16", speed="fast")


@pytest.mark.timeout(10)
def test_compare_goes_session_by_session_and_names_the_session() -> None:
    update = {"type": "session.update", "session": {"voice": "alloy"}}
    verse = {"type": "session.update", "session": {"voice": "verse"}}
    cancel = {"type": "response.cancel"}
    same = by_session([[update, cancel], [update]], [[update, cancel], [update]])
    assert same == []
    (problem,) = by_session([[update, cancel], [update]], [[update, cancel], [verse]])
    assert problem == "session 2: #1 session.update: session.voice was 'alloy', now 'verse'"
    # the same events, split differently between the sessions, diverge in both
    moved = by_session([[update, cancel], [update]], [[update], [update, cancel]])
    assert [p.split(":")[0] for p in moved] == ["session 1", "session 2"]
    assert moved[0].startswith("session 1: missing #2: response.cancel")
    assert moved[1].startswith("session 2: extra #2: response.cancel")
    (never,) = by_session([[update], [update, cancel]], [[update]])
    assert never == "session 2: the replay never opened it (the recording sent 2 client events in it)"
    (extra,) = by_session([[update]], [[update], [update]])
    assert extra.startswith("session 2: the replay opened it and sent 1 client events in it")
    assert by_session([[update]], [[update], []]) == []  # opened, never used: unknowable
    # one session on both sides: the messages are those of compare_client_events, unprefixed
    assert by_session([[update]], [[verse]]) == compare_client_events(
        [update], [verse], audio_path="pcm16", speed="fast"
    )


@pytest.mark.timeout(10)
def test_the_report_says_how_many_sessions_each_side_used(capsys: pytest.CaptureFixture[str]) -> None:
    from bridge.replay.cli import _report

    result = ReplayResult(name="r", model="recorded", speed="fast", model_sessions=1, recorded_sessions=2)
    assert result.to_json()["model_sessions"] == 1 and result.to_json()["recorded_sessions"] == 2
    _report(result, sys.stdout)
    assert "1 Realtime sessions (the recording 2)" in capsys.readouterr().out
    _report(
        ReplayResult(name="r", model="recorded", speed="fast", model_sessions=1, recorded_sessions=1),
        sys.stdout,
    )
    assert "Realtime sessions" not in capsys.readouterr().out

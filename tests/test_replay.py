"""Replaying recorded calls: the committed samples pass, an edited recording diverges in plain words."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.recordings import Recording, load_recording, parse_recording
from bridge.replay import (
    RecordedModel,
    VirtualTimeLoop,
    compare_client_events,
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

"""Regenerate the sample call recordings in tests/recordings/.

Each recording is a short call placed by the Twilio caller double (bridge.testing.TwilioCaller) through the
real bridge (bridge.testing.serve_bridge, on a loopback port) to the local Realtime model
(bridge.local_model.LocalModel, an echo test), with BRIDGE_RECORDINGS_DIR set. The script checks that each
scenario really happened, copies the recordings under stable names (gzip without a timestamp), parses them
back and prints a summary. Run:

    .venv/bin/python scripts/make_recordings.py

Call and stream SIDs are fixed per scenario and the caller's audio comes from tests/fixtures/, so re-running
gives equivalent calls; exact timings (and so the bytes of the files) vary a little from run to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bridge.local_model import LocalModel
from bridge.prompts import Profile
from bridge.recordings import Recording, parse_recording
from bridge.testing import TwilioCaller, serve_bridge

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = ROOT / "tests" / "recordings"
AUTH_TOKEN = "recordings-twilio-auth-token"
SPEED = 4.0
GREETING_SECONDS = 1.5
"""The local model's greeting is 1.5 s of tones whatever the profile's text."""
PROFILE = Profile(greeting="Hi!")
NO_GREETING = Profile(greeting="")
"""For calls about something else: the greeting's tones are ~70 kB of a gzip recording (tones do not
compress), so the DTMF and hang-up calls go without."""
LISTEN_STEP = 0.1
"""While listening the caller sends line silence in steps of this many seconds, as Twilio streams
continuously."""
FILE_BUDGET = 150_000
TOTAL_BUDGET = 600_000
PLACEHOLDER_TOKEN = "placeholder-stream-token"
ROLLOVER_SECONDS, ROLLOVER_MARGIN = 12.0, 2.0
"""The local model's session cap in the rollover call, and the bridge's margin: a swap is due at 10 s."""


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


HELLO = fixture("hello.ulaw")
QUESTION = fixture("question.ulaw")
INTERRUPT = fixture("interrupt.ulaw")


def sid(prefix: str, name: str) -> str:
    """A stable, Twilio-shaped SID (prefix + 32 hex digits) for a scenario."""
    return prefix + hashlib.sha256(f"{prefix}:{name}".encode()).hexdigest()[:32]


# --- the caller's helpers -----------------------------------------------------------------------------


async def listen_until(call: TwilioCaller, done: Callable[[], bool], limit: float, what: str) -> None:
    """Send line silence (as Twilio does while the caller is quiet) until ``done()``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not done():
        if call.closed.is_set():
            raise AssertionError(f"the stream closed while waiting for {what}")
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {limit:g} s waiting for {what}")
        await call.silence(LISTEN_STEP)


async def hear_to_the_end(call: TwilioCaller, media_before: int, what: str, limit: float = 15.0) -> None:
    """Listen until audio sent after ``media_before`` media messages has arrived and all of it played."""
    loop = asyncio.get_running_loop()

    def finished() -> bool:
        if len(call.received_media) <= media_before or call.buffered_seconds() > 0:
            return False
        return loop.time() - call.received_media[-1][0] >= 0.3  # and nothing more is coming

    await listen_until(call, finished, limit, what)


# --- scenarios -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a scenario observed on the caller's side, for the checks made on its recording."""

    call: TwilioCaller
    notes: dict[str, Any]


async def greeting_question(call: TwilioCaller) -> dict[str, Any]:
    await call.dial()
    await hear_to_the_end(call, 0, "the greeting")
    assert call.heard_seconds() >= GREETING_SECONDS - 0.02, call.heard_seconds()
    before = len(call.received_media)
    await call.speak(QUESTION)
    await hear_to_the_end(call, before, "the answer")
    await call.silence(0.2)
    await call.hang_up()
    return {}


async def barge_in(call: TwilioCaller) -> dict[str, Any]:
    await call.dial()
    await listen_until(call, lambda: call.heard_seconds() >= 0.6, 5, "0.6 s of the greeting")
    heard_at_barge_in = call.heard_seconds()
    speaking = asyncio.create_task(call.speak(INTERRUPT))
    await call.wait_for_clear(timeout=5)
    heard_at_clear = call.heard_seconds()
    await speaking
    before = len(call.received_media)
    await hear_to_the_end(call, before, "the answer")
    await call.silence(0.2)
    await call.hang_up()
    assert heard_at_clear < GREETING_SECONDS - 0.2, "the greeting played out before the clear"
    return {"heard_at_barge_in": heard_at_barge_in, "heard_at_clear": heard_at_clear}


async def dtmf(call: TwilioCaller) -> dict[str, Any]:
    await call.dial()
    await call.silence(0.2)
    before = len(call.received_media)
    await call.speak(HELLO)
    # The keys are pressed in the pause after the words (hello.ulaw ends in 0.3 s of silence), well before
    # the model's VAD ends the turn 0.5 s after the last word, so that both reach it before the commit.
    await call.send_dtmf("1")
    await call.silence(0.06)
    await call.send_dtmf("#")
    await hear_to_the_end(call, before, "the answer")
    await call.silence(0.2)
    await call.hang_up()
    return {}


async def hangup_mid_answer(call: TwilioCaller) -> dict[str, Any]:
    await call.dial()
    await call.silence(0.2)
    heard_before = call.heard_seconds()
    await call.speak(QUESTION)
    await listen_until(call, lambda: call.heard_seconds() >= heard_before + 0.5, 10, "0.5 s of the answer")
    buffered = call.buffered_seconds()
    await call.hang_up()
    assert buffered > 0.5, f"only {buffered:.2f} s of the answer was still buffered at the hang-up"
    return {"buffered_at_stop": buffered}


async def preview_g711(call: TwilioCaller) -> dict[str, Any]:
    await call.dial()
    await hear_to_the_end(call, 0, "the greeting")
    before = len(call.received_media)
    await call.speak(HELLO)
    await hear_to_the_end(call, before, "the answer")
    await call.silence(0.2)
    await call.hang_up()
    return {}


async def capture_call(call: TwilioCaller) -> dict[str, Any]:
    """A call with no greeting, hung up before the model answers: the caller side only speaks."""
    await call.dial()
    await call.silence(0.2)
    await call.speak(HELLO)
    await call.silence(0.1)
    await call.send_dtmf("1")
    await call.silence(0.1)
    await call.hang_up()
    assert call.received_media == [], "the bridge sent audio during the capture call"
    return {}


async def rollover(call: TwilioCaller) -> dict[str, Any]:
    await call.dial()
    await call.speak(HELLO)
    await hear_to_the_end(call, 0, "the first answer")
    # The local model's sessions last ROLLOVER_SECONDS: ROLLOVER_MARGIN before the end the bridge opens
    # the next one and swaps to it in this pause, the caller hearing nothing of it.
    swapped_at = call.frames_sent
    await call.silence(ROLLOVER_SECONDS - ROLLOVER_MARGIN - swapped_at * 0.02 + 0.8)
    before = len(call.received_media)
    await call.speak(QUESTION)
    await hear_to_the_end(call, before, "the answer of the second session")
    await call.silence(0.2)
    await call.hang_up()
    return {"frames_before_the_pause": swapped_at}


# --- running a call through the real bridge -----------------------------------------------------------


async def run_call(
    name: str,
    scenario: Callable[[TwilioCaller], Awaitable[dict[str, Any]]],
    workdir: Path,
    *,
    dialect: str = "ga",
    audio_path: str = "pcm16",
    profile: Profile = PROFILE,
    record: bool = True,
    session_seconds: float = 1800.0,
    env: dict[str, str] | None = None,
) -> tuple[Outcome, Path | None]:
    """Serve a bridge against a fresh local model, place one call, shut both down; return the recording."""
    recordings = workdir / name / "recordings"
    recordings.mkdir(parents=True)
    async with LocalModel(speed=SPEED, seed=0, session_seconds=session_seconds) as model:
        values = {
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "BRIDGE_DATA_DIR": str(workdir / name / "data"),
            "BRIDGE_AUDIO_PATH": audio_path,
            "AZURE_OPENAI_ENDPOINT": model.endpoint,
            "AZURE_OPENAI_DEPLOYMENT": "recordings-deployment",
            "AZURE_OPENAI_API_KEY": "recordings-api-key",
        }
        values |= env or {}
        if record:
            values |= {"BRIDGE_RECORDINGS_DIR": str(recordings), "BRIDGE_RECORDINGS_GZIP": "1"}
        if dialect == "preview":
            values["AZURE_OPENAI_API_VERSION"] = "2025-04-01-preview"
        # Leaving serve_bridge drains the call: its recording is closed after this block.
        async with serve_bridge(values, profile=profile) as bridge:
            call = TwilioCaller(bridge.url, auth_token=AUTH_TOKEN, call_sid=sid("CA", name))
            call.stream_sid = sid("MZ", name)
            async with call:
                async with asyncio.timeout(40):
                    notes = await scenario(call)
                assert call.violations == [], call.violations
    if not record:
        return Outcome(call, notes), None
    files = sorted(recordings.iterdir())
    assert len(files) == 1, files
    return Outcome(call, notes), files[0]


# --- checks on the recordings ----------------------------------------------------------------------------


def read_lines(path: Path) -> list[str]:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return list(f)
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def kinds(rec: Recording, src: str, direction: str) -> list[str]:
    return [e.kind for e in rec.events if e.src == src and e.dir == direction]


def first(rec: Recording, src: str, direction: str, kind: str) -> Any:
    return next(e for e in rec.events if e.src == src and e.dir == direction and e.kind == kind)


def check_common(rec: Recording, outcome: Outcome) -> None:
    assert not rec.truncated
    assert rec.header.call_sid == outcome.call.call_sid
    twilio_in = kinds(rec, "twilio", "in")
    assert twilio_in[:2] == ["connected", "start"], twilio_in[:3]
    assert twilio_in[-1] == "stop", twilio_in[-3:]
    start = first(rec, "twilio", "in", "start")
    assert start.msg["start"]["customParameters"].get("token") == "[redacted]"
    model_out = kinds(rec, "model", "out")
    assert model_out[0] == "session.update", model_out[:3]
    assert "input_audio_buffer.append" in model_out
    greeted = bool(rec.header.profile.get("greeting"))
    assert ("response.create" in model_out) is greeted  # the greeting, when the profile has one
    assert kinds(rec, "twilio", "out").count("media") > 0


def audio_deltas(rec: Recording) -> list[Any]:
    names = ("response.output_audio.delta", "response.audio.delta")
    return [e for e in rec.events if e.src == "model" and e.dir == "in" and e.kind in names]


def check_greeting_question(rec: Recording, outcome: Outcome) -> None:
    check_common(rec, outcome)
    assert "clear" not in kinds(rec, "twilio", "out")
    assert "conversation.item.truncate" not in kinds(rec, "model", "out")
    assert kinds(rec, "model", "in").count("response.done") == 2  # the greeting and the answer
    assert "input_audio_buffer.speech_stopped" in kinds(rec, "model", "in")


def check_barge_in(rec: Recording, outcome: Outcome) -> None:
    check_common(rec, outcome)
    assert kinds(rec, "twilio", "out").count("clear") == 1, "no Twilio clear went out"
    truncate = first(rec, "model", "out", "conversation.item.truncate")
    clear = first(rec, "twilio", "out", "clear")
    started = first(rec, "model", "in", "input_audio_buffer.speech_started")
    assert started.t <= clear.t <= truncate.t + 50
    end_ms = truncate.msg["audio_end_ms"]
    heard_ms = outcome.notes["heard_at_clear"] * 1000
    assert abs(end_ms - heard_ms) <= 60, (end_ms, heard_ms)
    assert "error" not in kinds(rec, "model", "in")
    assert kinds(rec, "model", "in").count("response.done") == 2


def check_dtmf(rec: Recording, outcome: Outcome) -> None:
    check_common(rec, outcome)
    digits = [e.msg["dtmf"]["digit"] for e in rec.events if e.src == "twilio" and e.kind == "dtmf"]
    assert digits == ["1", "#"], digits
    creates = [e for e in rec.events if e.kind == "conversation.item.create"]
    assert [c.msg["item"]["content"][0]["text"] for c in creates] == [
        "[The caller pressed 1 on the keypad.]",
        "[The caller pressed # on the keypad.]",
    ], creates
    # Both keys reached the model before the turn ended: the answer is the echo of the words.
    texts = [e for e in rec.events if e.kind == "conversation.item.added" and e.msg["item"]["role"] == "user"]
    committed = first(rec, "model", "in", "input_audio_buffer.committed")
    assert len(texts) == 3, [e.t for e in texts]
    assert all(e.t < committed.t for e in texts[:2]), ([e.t for e in texts], committed.t)
    assert kinds(rec, "model", "in").count("response.done") == 1


def check_hangup_mid_answer(rec: Recording, outcome: Outcome) -> None:
    check_common(rec, outcome)
    stop = first(rec, "twilio", "in", "stop")
    (answer_id,) = [e.msg["response"]["id"] for e in rec.events if e.kind == "response.created"]
    answer = [
        e
        for e in rec.events
        if e.src == "twilio" and e.dir == "out" and e.kind == "media" and e.t > started_at(rec, answer_id)
    ]
    sent_ulaw = sum(len(e.msg["media"]["payload"]) * 3 // 4 for e in answer if e.t <= stop.t)
    played_ulaw = (stop.t - answer[0].t) * 8  # 8 bytes per ms at most since the first frame went out
    unplayed_s = (sent_ulaw - played_ulaw) / 8000
    assert unplayed_s > 0.3, f"only {unplayed_s:.2f} s of the answer was unplayed at the stop"
    outcome.notes["unplayed_at_stop_per_recording"] = round(unplayed_s, 2)
    dones = [e for e in rec.events if e.kind == "response.done" and e.msg["response"]["id"] == answer_id]
    outcome.notes["answer_done_before_stop"] = bool(dones and dones[0].t < stop.t)


def check_rollover(rec: Recording, outcome: Outcome) -> None:
    check_common(rec, outcome)
    assert rec.sessions == 2, rec.sessions
    second = [e.kind for e in rec.select("model", "out", session=2)]
    assert second[0] == "session.update", second[:3]
    assert "conversation.item.create" in second
    assert "response.create" not in second
    appends = sum(k == "input_audio_buffer.append" for k in kinds(rec, "model", "out"))
    assert appends == outcome.call.frames_sent, (appends, outcome.call.frames_sent)  # none lost, none twice
    assert "response.done" in [e.kind for e in rec.select("model", "in", session=2)]


def started_at(rec: Recording, response_id: str) -> float:
    return next(
        e.t for e in rec.events if e.kind == "response.created" and e.msg["response"]["id"] == response_id
    )


def check_preview_g711(rec: Recording, outcome: Outcome) -> None:
    check_common(rec, outcome)
    assert rec.header.dialect == "preview", rec.header
    assert rec.header.audio_path == "g711_ulaw", rec.header
    session = first(rec, "model", "out", "session.update").msg["session"]
    assert session.get("input_audio_format") == "g711_ulaw", session
    assert session.get("output_audio_format") == "g711_ulaw", session
    assert all(e.kind == "response.audio.delta" for e in audio_deltas(rec))
    assert "clear" not in kinds(rec, "twilio", "out")
    assert kinds(rec, "model", "in").count("response.done") == 2


def check_capture(rec: Recording, outcome: Outcome) -> None:
    assert rec.header.caller_only
    assert rec.header.call_sid == outcome.call.call_sid
    seq = kinds(rec, "twilio", "in")
    assert seq[:2] == ["connected", "start"], seq[:3]
    assert seq[-1] == "stop", seq[-3:]
    assert set(seq[2:-1]) == {"media", "dtmf"}, set(seq)
    assert "mark" not in seq


# --- writing and summarising ------------------------------------------------------------------------------


def write_gzip(source: Path, target: Path) -> None:
    """Copy a recording, re-compressed without the file name and time gzip.open puts in its header."""
    target.write_bytes(gzip.compress(gzip.decompress(source.read_bytes()), compresslevel=9, mtime=0))


def write_capture(call: TwilioCaller, target: Path) -> None:
    """One Twilio→server JSON message per line, as a plain capture elsewhere would hold them."""
    lines = []
    for frame in call.sent:
        assert isinstance(frame, str)
        message = orjson.loads(frame)
        if message.get("event") == "start":
            params = message["start"]["customParameters"]
            if "token" in params:
                params["token"] = PLACEHOLDER_TOKEN
        lines.append(orjson.dumps(message).decode() + "\n")
    target.write_text("".join(lines), encoding="utf-8")


def summary(name: str, path: Path, rec: Recording, outcome: Outcome) -> str:
    counts = Counter((e.src, e.dir) for e in rec.events)
    per_socket = ", ".join(f"{s} {d} {counts[(s, d)]}" for s in ("twilio", "model") for d in ("in", "out"))
    clears = sum(1 for e in rec.events if e.src == "twilio" and e.dir == "out" and e.kind == "clear")
    truncates = [e.msg["audio_end_ms"] for e in rec.events if e.kind == "conversation.item.truncate"]
    digits = "".join(e.msg["dtmf"]["digit"] for e in rec.events if e.kind == "dtmf")
    lines = [
        f"{name}: {path.stat().st_size / 1000:.1f} kB, {rec.duration_ms / 1000:.2f} s, "
        f"{len(rec.events)} events ({per_socket})",
        f"    header: dialect {rec.header.dialect}, audio {rec.header.audio_path}"
        + (", caller only" if rec.header.caller_only else "")
        + f"; clears {clears}, truncates {truncates or 0}, dtmf {digits or '-'}; "
        f"heard {outcome.call.heard_seconds():.2f} s",
    ]
    if outcome.notes:
        notes = ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in outcome.notes.items()
        )
        lines.append(f"    {notes}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Scenario:
    name: str
    play: Callable[[TwilioCaller], Awaitable[dict[str, Any]]]
    check: Callable[[Recording, Outcome], None]
    options: dict[str, Any]


SCENARIOS = (
    Scenario("greeting-question.jsonl.gz", greeting_question, check_greeting_question, {}),
    Scenario("barge-in.jsonl.gz", barge_in, check_barge_in, {}),
    Scenario("dtmf.jsonl.gz", dtmf, check_dtmf, {"profile": NO_GREETING}),
    Scenario(
        "hangup-mid-answer.jsonl.gz", hangup_mid_answer, check_hangup_mid_answer, {"profile": NO_GREETING}
    ),
    Scenario(
        "preview-g711.jsonl.gz",
        preview_g711,
        check_preview_g711,
        {"dialect": "preview", "audio_path": "g711_ulaw"},
    ),
    Scenario(
        "rollover.jsonl.gz",
        rollover,
        check_rollover,
        {
            "audio_path": "g711_ulaw",
            "profile": NO_GREETING,
            "session_seconds": ROLLOVER_SECONDS,
            "env": {"BRIDGE_ROLLOVER_MARGIN": str(ROLLOVER_MARGIN)},
        },
    ),
    Scenario(
        "twilio-capture.jsonl",
        capture_call,
        check_capture,
        {"profile": NO_GREETING, "record": False},
    ),
)


async def main() -> int:
    """Place every call and check every recording first; only then replace the files in tests/recordings."""
    made: list[tuple[Path, Path]] = []
    reports: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bridge-recordings-") as tmp:
        calls, stage = Path(tmp) / "calls", Path(tmp) / "staged"
        stage.mkdir()
        for scenario in SCENARIOS:
            outcome, source = await run_call(scenario.name, scenario.play, calls, **scenario.options)
            staged = stage / scenario.name
            if source is None:
                write_capture(outcome.call, staged)
            else:
                write_gzip(source, staged)
            rec = parse_recording(read_lines(staged), name=scenario.name)
            scenario.check(rec, outcome)
            made.append((staged, OUT / scenario.name))
            reports.append(summary(scenario.name, staged, rec, outcome))
        OUT.mkdir(parents=True, exist_ok=True)
        total = 0
        for (staged, target), report in zip(made, reports, strict=True):
            shutil.copyfile(staged, target)
            size = target.stat().st_size
            total += size
            print(report)
            if size > FILE_BUDGET:
                print(f"    note: over the {FILE_BUDGET / 1000:.0f} kB aimed at for one file")
    print(f"total {total / 1000:.1f} kB in {OUT.relative_to(ROOT)}")
    if total > TOTAL_BUDGET:
        print(f"note: over the {TOTAL_BUDGET / 1000:.0f} kB aimed at for all recordings")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))

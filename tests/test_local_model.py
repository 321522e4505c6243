"""The local Realtime model, driven by a plain websockets client over real loopback sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bridge.local_model import LocalModel, threshold_to_rms
from tests.strict_openai import validate

with warnings.catch_warnings():  # stdlib audioop warns on 3.11-3.12; audioop-lts on 3.13 does not
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

pytestmark = pytest.mark.timeout(60)

PREVIEW_VERSION = "2025-04-01-preview"
# The service adds these to the session objects; the SDK's types do not list them.
SESSION_EXTRAS = {"object", "id", "expires_at"}


def url(model: LocalModel, dialect: str, deployment: str = "dep") -> str:
    base = f"ws://127.0.0.1:{model.port}"
    if dialect == "ga":
        return f"{base}/openai/v1/realtime?model={deployment}"
    return f"{base}/openai/realtime?api-version={PREVIEW_VERSION}&deployment={deployment}"


class Client:
    """A bare Realtime client: JSON events in and out, nothing else."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    async def send(self, **event: Any) -> None:
        await self.ws.send(json.dumps(event))

    async def append(self, audio: bytes, chunk: int) -> None:
        for i in range(0, len(audio), chunk):
            await self.send(
                type="input_audio_buffer.append", audio=base64.b64encode(audio[i : i + chunk]).decode()
            )

    async def recv(self, limit: float = 2.0) -> dict[str, Any]:
        async with asyncio.timeout(limit):
            event: dict[str, Any] = json.loads(await self.ws.recv())
        self.events.append(event)
        return event

    async def until(self, kind: str, limit: float = 2.0) -> list[dict[str, Any]]:
        """Every event up to and including the first of type ``kind``."""
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(limit):
            while not got or got[-1]["type"] != kind:
                got.append(await self.recv(limit))
        return got


@pytest.fixture
async def model() -> AsyncIterator[LocalModel]:
    async with LocalModel(speed=50) as m:
        m.response_delay = 0
        yield m


async def open_client(
    model: LocalModel, dialect: str = "ga", **headers: str
) -> tuple[Client, dict[str, Any]]:
    ws = await connect(url(model, dialect), additional_headers=headers or {"api-key": "key"})
    client = Client(ws)
    created = await client.recv()
    assert created["type"] == "session.created"
    return client, created


@pytest.fixture(params=["ga", "preview"])
async def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def tone(ms: int, rate: int = 24000, freq: float = 440.0, amp: float = 0.3) -> npt.NDArray[np.int16]:
    n = rate * ms // 1000
    return (np.sin(2 * np.pi * freq * np.arange(n) / rate) * amp * 32767).astype(np.int16)


def noise(ms: int, rate: int = 24000, rms: float = 30.0, seed: int = 1) -> npt.NDArray[np.int16]:
    """Low line noise, about -60 dBFS: must not count as speech."""
    return (np.random.default_rng(seed).standard_normal(rate * ms // 1000) * rms).astype(np.int16)


def pcm_bytes(*parts: npt.NDArray[np.int16]) -> bytes:
    return np.concatenate(parts).astype("<i2").tobytes()


def deltas(events: list[dict[str, Any]], kind: str) -> bytes:
    return b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == kind)


def check_types(dialect: str, events: list[dict[str, Any]]) -> None:
    """Every server event is valid against the openai SDK's own types, strictly."""
    for event in events:
        if event["type"] in ("session.created", "session.updated"):
            event = {
                **event,
                "session": {k: v for k, v in event["session"].items() if k not in SESSION_EXTRAS},
            }
        validate(dialect, "server", event)


def vad_update(dialect: str, **turn: Any) -> dict[str, Any]:
    td = {"type": "server_vad"} | turn
    if dialect == "ga":
        return {"type": "realtime", "audio": {"input": {"turn_detection": td}}}
    return {"turn_detection": td}


# --- handshake ---------------------------------------------------------------------------------------------


async def test_both_url_forms_pick_the_dialect_and_record_the_handshake(model: LocalModel) -> None:
    ga, _ = await open_client(model, "ga", authorization="Bearer token")
    preview, _ = await open_client(model, "preview", **{"api-key": "k"})
    first, second = model.connections
    assert (first.dialect, first.deployment, first.headers["authorization"]) == ("ga", "dep", "Bearer token")
    assert (second.dialect, second.headers["api-key"]) == ("preview", "k")
    assert model.endpoint == f"http://127.0.0.1:{model.port}"
    assert await model.wait_for_connection(2) is second
    await ga.ws.close()
    await preview.ws.close()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/openai/v1/realtime?model=dep&api-version=2025-04-01-preview", 400),
        ("/openai/v1/realtime", 400),
        ("/openai/realtime?deployment=dep", 400),
        ("/openai/realtime?api-version=2025-04-01-preview", 400),
        ("/openai/deployments/dep/realtime", 404),
    ],
)
async def test_bad_urls_are_refused(model: LocalModel, path: str, status: int) -> None:
    with pytest.raises(InvalidStatus) as info:
        await connect(f"ws://127.0.0.1:{model.port}{path}", additional_headers={"api-key": "k"})
    assert info.value.response.status_code == status
    assert json.loads(info.value.response.body or b"")["error"]["message"]


async def test_auth() -> None:
    async with LocalModel(api_key="right") as model:
        for headers in (
            {},
            {"api-key": "wrong"},
            {"authorization": "Bearer wrong"},
            {"authorization": "Basic x"},
        ):
            with pytest.raises(InvalidStatus) as info:
                await connect(url(model, "ga"), additional_headers=headers)
            assert info.value.response.status_code == 401
        for headers in ({"api-key": "right"}, {"authorization": "Bearer right"}):
            ws = await connect(url(model, "ga"), additional_headers=headers)
            await ws.close()
        ws = await connect(url(model, "preview") + "&api-key=right")
        await ws.close()
    async with LocalModel() as anyone:
        with pytest.raises(InvalidStatus) as info:
            await connect(url(anyone, "ga"), additional_headers={"api-key": ""})
        assert info.value.response.status_code == 401


async def test_reject_next_and_connect_delay(model: LocalModel) -> None:
    model.reject_next(429, count=2)
    for _ in range(2):
        with pytest.raises(InvalidStatus) as info:
            await connect(url(model, "ga"), additional_headers={"api-key": "k"})
        assert info.value.response.status_code == 429
        assert info.value.response.headers["Retry-After"] == "1"
    model.reject_next(503)
    with pytest.raises(InvalidStatus) as info:
        await connect(url(model, "ga"), additional_headers={"api-key": "k"})
    assert info.value.response.status_code == 503
    model.connect_delay = 0.2
    began = time.monotonic()
    client, _ = await open_client(model)
    assert time.monotonic() - began >= 0.19
    assert len(model.connections) == 1
    await client.ws.close()


async def test_reject_next_with_retry_after(model: LocalModel) -> None:
    model.reject_next(429, retry_after="7")
    model.reject_next(503, retry_after="30")
    model.reject_next(503)
    statuses = []
    for _ in range(3):
        with pytest.raises(InvalidStatus) as info:
            await connect(url(model, "ga"), additional_headers={"api-key": "k"})
        statuses.append((info.value.response.status_code, info.value.response.headers.get("Retry-After")))
    assert statuses == [(429, "7"), (503, "30"), (503, None)]


async def test_wait_for_connection_times_out(model: LocalModel) -> None:
    with pytest.raises(TimeoutError):
        await model.wait_for_connection(1, timeout=0.05)


# --- sessions ----------------------------------------------------------------------------------------------


async def test_session_created_shapes(model: LocalModel) -> None:
    ga, created = await open_client(model, "ga")
    session = created["session"]
    assert (session["type"], session["object"], session["output_modalities"]) == (
        "realtime",
        "realtime.session",
        ["audio"],
    )
    assert session["id"].startswith("sess_") and created["event_id"].startswith("event_")
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["output"]["voice"] == "alloy"
    assert 1790 < session["expires_at"] - time.time() <= 1800
    assert "modalities" not in session
    check_types("ga", [created])

    preview, created = await open_client(model, "preview")
    session = created["session"]
    assert session["modalities"] == ["audio", "text"]
    assert (session["input_audio_format"], session["voice"]) == ("pcm16", "alloy")
    assert session["turn_detection"]["type"] == "server_vad"
    assert "audio" not in session and "type" not in session
    check_types("preview", [created])
    await ga.ws.close()
    await preview.ws.close()


async def test_session_update_merges_into_the_effective_config(model: LocalModel) -> None:
    client, _ = await open_client(model, "ga")
    await client.send(
        type="session.update",
        session={
            "type": "realtime",
            "instructions": "Be brief.",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcmu"},
                    "noise_reduction": {"type": "near_field"},
                    "turn_detection": {"type": "server_vad", "silence_duration_ms": 400},
                },
                "output": {"voice": "marin"},
            },
        },
    )
    updated = (await client.recv())["session"]
    assert updated["instructions"] == "Be brief."
    assert updated["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert updated["audio"]["output"] == {
        "format": {"type": "audio/pcm", "rate": 24000},
        "voice": "marin",
        "speed": 1.0,
    }
    td = updated["audio"]["input"]["turn_detection"]
    assert (td["silence_duration_ms"], td["threshold"], td["prefix_padding_ms"], td["create_response"]) == (
        400,
        0.5,
        300,
        True,
    )
    # Only what is sent changes.
    await client.send(
        type="session.update", session={"type": "realtime", "audio": {"output": {"voice": "cedar"}}}
    )
    again = (await client.recv())["session"]
    assert again["audio"]["input"] == updated["audio"]["input"]
    assert model.connections[0].session == again
    check_types("ga", client.events)
    await client.ws.close()

    client, _ = await open_client(model, "preview")
    await client.send(
        type="session.update",
        session={"voice": "verse", "input_audio_format": "g711_ulaw", "turn_detection": None},
    )
    session = (await client.recv())["session"]
    assert (session["voice"], session["input_audio_format"], session["turn_detection"]) == (
        "verse",
        "g711_ulaw",
        None,
    )
    assert session["output_audio_format"] == "pcm16"
    check_types("preview", client.events)
    await client.ws.close()


TD = "session.turn_detection"
IN = "session.audio.input"
PCM_16K = {"type": "audio/pcm", "rate": 16000}
RT: dict[str, Any] = {"type": "realtime"}
GA_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    ({"instructions": "x"}, "missing_required_parameter", "session.type"),
    ({"type": "transcription"}, "invalid_value", "session.type"),
    (RT | {"modalities": ["audio"]}, "unknown_parameter", "session.modalities"),
    (RT | {"voice": "alloy"}, "unknown_parameter", "session.voice"),
    (RT | {"output_modalities": ["audio", "text"]}, "invalid_value", "session.output_modalities"),
    (RT | {"audio": {"output": {"voice": "bob"}}}, "invalid_value", "session.audio.output.voice"),
    (RT | {"audio": {"input": {"format": {"type": "audio/mulaw"}}}}, "invalid_value", f"{IN}.format.type"),
    (RT | {"audio": {"input": {"format": PCM_16K}}}, "invalid_value", f"{IN}.format.rate"),
    (RT | {"audio": {"input": {"vad": None}}}, "unknown_parameter", f"{IN}.vad"),
]
PREVIEW_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    ({"type": "realtime"}, "unknown_parameter", "session.type"),
    ({"audio": {"output": {"voice": "alloy"}}}, "unknown_parameter", "session.audio"),
    ({"voice": "marin"}, "invalid_value", "session.voice"),
    ({"input_audio_format": "mulaw"}, "invalid_value", "session.input_audio_format"),
    ({"modalities": ["audio"]}, "invalid_value", "session.modalities"),
    ({"turn_detection": {"type": "server_vad", "threshold": 1.5}}, "invalid_value", f"{TD}.threshold"),
    ({"turn_detection": {"type": "semantic_vad", "eagerness": "eager"}}, "invalid_value", f"{TD}.eagerness"),
    ({"turn_detection": {"type": "semantic_vad", "threshold": 0.5}}, "unknown_parameter", f"{TD}.threshold"),
    ({"turn_detection": {"type": "vad"}}, "invalid_value", f"{TD}.type"),
    (
        {"turn_detection": {"type": "server_vad", "silence_duration_ms": "5"}},
        "invalid_type",
        f"{TD}.silence_duration_ms",
    ),
    (
        {"input_audio_noise_reduction": {"type": "x"}},
        "invalid_value",
        "session.input_audio_noise_reduction.type",
    ),
    ({"input_audio_transcription": {"model": 1}}, "invalid_type", "session.input_audio_transcription.model"),
    ({"temperature": 2.0}, "invalid_value", "session.temperature"),
]


@pytest.mark.parametrize(
    ("dialect_", "session", "code", "param"),
    [("ga", *case) for case in GA_ERRORS] + [("preview", *case) for case in PREVIEW_ERRORS],
)
async def test_session_update_errors(
    model: LocalModel, dialect_: str, session: dict[str, Any], code: str, param: str
) -> None:
    client, created = await open_client(model, dialect_)
    await client.send(type="session.update", event_id="evt_client_1", session=session)
    error = await client.recv()
    assert error["type"] == "error"
    assert error["error"] | {"message": ""} == {
        "type": "invalid_request_error",
        "code": code,
        "message": "",
        "param": param,
        "event_id": "evt_client_1",
    }
    assert model.connections[0].session == created["session"]  # nothing changed
    check_types(dialect_, [error])
    await client.send(type="input_audio_buffer.clear")  # still open
    assert (await client.recv())["type"] == "input_audio_buffer.cleared"
    await client.ws.close()


async def test_malformed_and_unknown_events_get_errors_and_the_session_goes_on(model: LocalModel) -> None:
    client, _ = await open_client(model, "ga")
    await client.ws.send("{not json")
    assert (await client.recv())["error"]["code"] == "invalid_json"
    await client.send(type="response.explode", event_id="e1")
    error = (await client.recv())["error"]
    assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", "type", "e1")
    await client.send(event_id="e2")
    assert (await client.recv())["error"]["code"] == "missing_required_parameter"
    await client.send(type="conversation.item.truncate", item_id="x", content_index=0)
    error = (await client.recv())["error"]
    assert (error["code"], error["param"], error["event_id"]) == (
        "missing_required_parameter",
        "audio_end_ms",
        None,
    )
    await client.send(type="input_audio_buffer.append", audio="@@@")
    assert (await client.recv())["error"]["param"] == "audio"
    await client.send(type="input_audio_buffer.commit", extra=1)
    assert (await client.recv())["error"]["code"] == "unknown_parameter"
    await client.ws.send(b"\x00")
    assert (await client.recv())["type"] == "error"
    await client.send(type="input_audio_buffer.commit")
    error = (await client.recv())["error"]
    assert error["code"] == "input_audio_buffer_commit_empty"
    assert "buffer only has 0.00ms of audio" in error["message"]
    check_types("ga", client.events)
    assert model.connections[0].received_types()[-1] == "input_audio_buffer.commit"
    await client.send(type="input_audio_buffer.clear")
    assert (await client.recv())["type"] == "input_audio_buffer.cleared"
    await client.ws.close()


# --- VAD ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect_", "fmt"), [("ga", "pcm16"), ("preview", "pcm16"), ("preview", "g711_ulaw")]
)
async def test_vad_marks_speech_on_the_session_timeline(model: LocalModel, dialect_: str, fmt: str) -> None:
    client, _ = await open_client(model, dialect_)
    update = vad_update(dialect_, silence_duration_ms=300, prefix_padding_ms=200, create_response=False)
    if fmt == "g711_ulaw":
        update["input_audio_format"] = "g711_ulaw"
    update_tx = {"input_audio_transcription": {"model": "whisper-1"}} if dialect_ == "preview" else {}
    await client.send(type="session.update", session=update | update_tx)
    await client.until("session.updated")
    rate = 24000 if fmt == "pcm16" else 8000

    def encode(pcm: npt.NDArray[np.int16]) -> bytes:
        raw = pcm.astype("<i2").tobytes()
        return raw if fmt == "pcm16" else audioop.lin2ulaw(raw, 2)

    # Two turns: speech at 1005-1605 ms and at 2805-3205 ms, low noise elsewhere, sent in 20 ms chunks.
    audio = np.concatenate(
        [
            noise(1005, rate),
            tone(600, rate),
            noise(1200, rate, seed=2),
            tone(400, rate),
            noise(600, rate, seed=3),
        ]
    )
    await client.append(encode(audio), chunk=rate // 50 * (2 if fmt == "pcm16" else 1))
    events = await client.until("input_audio_buffer.committed")
    started, stopped = (e for e in events if e["type"].startswith("input_audio_buffer.speech"))
    assert abs(started["audio_start_ms"] - (1005 - 200)) <= 20
    assert abs(stopped["audio_end_ms"] - (1605 + 300)) <= 20
    assert started["item_id"] == stopped["item_id"] == events[-1]["item_id"]
    first = await client.until("input_audio_buffer.committed")
    started2 = next(e for e in first if e["type"] == "input_audio_buffer.speech_started")
    assert abs(started2["audio_start_ms"] - (2805 - 200)) <= 20
    item_event = "conversation.item.created" if dialect_ == "preview" else "conversation.item.done"
    await client.until(item_event)
    if dialect_ == "preview":
        completed = await client.until("conversation.item.input_audio_transcription.completed")
        assert completed[-1]["transcript"] == "(caller speech, 0.9 s)"  # 200 padding + 400 + 300 silence
    # A barrier, not a sleep: the model answers events in order, and "no active response" proves none began.
    await client.send(type="response.cancel")
    assert (await client.until("error"))[-1]["error"]["code"] == "response_cancel_not_active"
    conn = model.connections[0]
    assert "response.created" not in conn.sent_types()  # create_response false
    check_types(dialect_, conn.sent)
    await client.ws.close()


async def test_vad_threshold_mapping() -> None:
    assert threshold_to_rms(0.5) == pytest.approx(32768 * 10 ** (-40 / 20))
    assert threshold_to_rms(0.0) < threshold_to_rms(0.5) < threshold_to_rms(1.0)


async def test_semantic_vad_ends_turns_by_eagerness(model: LocalModel) -> None:
    client, _ = await open_client(model, "ga")
    td = {"type": "semantic_vad", "eagerness": "high", "create_response": False}
    await client.send(
        type="session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": td}}}
    )
    await client.until("session.updated")
    await client.append(pcm_bytes(noise(500), tone(300), noise(500)), chunk=4800)
    events = await client.until("input_audio_buffer.speech_stopped")
    assert abs(events[-1]["audio_end_ms"] - (800 + 300)) <= 20
    await client.ws.close()


# --- responses ---------------------------------------------------------------------------------------------


async def test_greeting_response_event_order_and_length(model: LocalModel, dialect: str) -> None:
    client, _ = await open_client(model, dialect)
    await client.send(
        type="session.update", session={"type": "realtime"} if dialect == "ga" else {"voice": "ash"}
    )
    await client.until("session.updated")
    await client.send(type="response.create")
    events = await client.until("response.done")
    ga = dialect == "ga"
    audio_delta = "response.output_audio.delta" if ga else "response.audio.delta"
    text_delta = "response.output_audio_transcript.delta" if ga else "response.audio_transcript.delta"
    order = [e["type"] for e in events if e["type"] not in (audio_delta, text_delta)]
    expected = ["response.created", "rate_limits.updated", "response.output_item.added"]
    expected += ["conversation.item.added"] if ga else ["conversation.item.created"]
    expected += ["response.content_part.added"]
    expected += (
        ["response.output_audio.done", "response.output_audio_transcript.done"]
        if ga
        else [
            "response.audio.done",
            "response.audio_transcript.done",
        ]
    )
    expected += ["response.content_part.done", "response.output_item.done"]
    expected += ["conversation.item.done"] if ga else []
    expected += ["response.done"]
    assert order == expected
    audio = deltas(events, audio_delta)
    assert len(audio) == 1500 * 48  # 1.5 s of pcm16 at 24 kHz
    samples = np.frombuffer(audio, "<i2").astype(np.float64)
    assert np.sqrt(np.mean(samples**2)) > 3000  # recognisably not silence
    assert sum(e["type"] == audio_delta for e in events) == 15  # one per 100 ms
    transcript = "".join(e["delta"] for e in events if e["type"] == text_delta)
    assert transcript == "Hello! This is the local test model."
    first_delta = next(e for e in events if e["type"] == audio_delta)
    item_id = events[2]["item"]["id"]
    assert (first_delta["item_id"], first_delta["output_index"], first_delta["content_index"]) == (
        item_id,
        0,
        0,
    )
    assert first_delta["response_id"] == events[0]["response"]["id"]
    done = events[-1]["response"]
    assert (done["status"], done["status_details"]) == ("completed", None)
    assert done["output"][0]["content"][0]["transcript"] == transcript
    assert done["usage"]["output_token_details"]["audio_tokens"] == 30
    check_types(dialect, events)
    await client.ws.close()


async def test_deltas_are_paced_at_speed() -> None:
    async with LocalModel(speed=10, delta_ms=100) as model:
        model.response_delay = 0
        client, _ = await open_client(model)
        await client.send(type="response.create")
        began = time.monotonic()
        await client.until("response.done")
        assert 0.12 <= time.monotonic() - began <= 0.6  # 1.5 s of audio at 10x: 14 gaps of 10 ms
        await client.ws.close()


@pytest.mark.parametrize("dialect_", ["ga", "preview"])
async def test_echo_plays_a_beep_and_the_callers_utterance(model: LocalModel, dialect_: str) -> None:
    client, _ = await open_client(model, dialect_)
    await client.send(type="session.update", session=vad_update(dialect_, silence_duration_ms=200))
    await client.until("session.updated")
    sent = pcm_bytes(noise(500), tone(400, freq=300), noise(400))
    await client.append(sent, chunk=4800)
    events = await client.until("response.done")
    started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
    stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
    audio = deltas(events, "response.output_audio.delta" if dialect_ == "ga" else "response.audio.delta")
    beep = 300 * 48
    caller = sent[started["audio_start_ms"] * 48 : stopped["audio_end_ms"] * 48]
    assert audio[beep:] == caller  # pcm16 in, pcm16 out: exactly what the caller said
    transcript_done = (
        "response.output_audio_transcript.done" if dialect_ == "ga" else "response.audio_transcript.done"
    )
    text = next(e for e in events if e["type"] == transcript_done)["transcript"]
    assert text == f"You said: ({len(caller) / 48000:.1f} s of audio)"
    check_types(dialect_, events)
    await client.ws.close()


async def test_g711_formats_both_ways(model: LocalModel) -> None:
    client, _ = await open_client(model, "preview")
    await client.send(
        type="session.update",
        session={
            "input_audio_format": "g711_ulaw",
            "output_audio_format": "g711_ulaw",
            "turn_detection": None,
        },
    )
    await client.until("session.updated")
    await client.send(type="response.create")
    events = await client.until("response.done")
    assert len(deltas(events, "response.audio.delta")) == 1500 * 8
    spoken = audioop.lin2ulaw(pcm_bytes(tone(500, rate=8000, freq=250)), 2)
    await client.append(spoken, chunk=800)
    await client.send(type="input_audio_buffer.commit")
    committed = await client.until("conversation.item.created")
    assert committed[0]["type"] == "input_audio_buffer.committed"
    await client.send(type="response.create")
    events = await client.until("response.done")
    audio = deltas(events, "response.audio.delta")
    assert audio[300 * 8 :] == spoken  # µ-law in, µ-law out, byte for byte
    await client.ws.close()

    client, _ = await open_client(model, "ga")
    fmt = {"type": "audio/pcma"}
    await client.send(
        type="session.update", session={"type": "realtime", "audio": {"output": {"format": fmt}}}
    )
    await client.until("session.updated")
    await client.send(
        type="response.create", response={"audio": {"output": {"format": {"type": "audio/pcmu"}}}}
    )
    events = await client.until("response.done")
    audio = deltas(events, "response.output_audio.delta")
    assert len(audio) == 1500 * 8
    assert events[0]["response"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    check_types("ga", events)
    await client.ws.close()


async def test_one_response_at_a_time_and_cancel(dialect: str) -> None:
    async with LocalModel(speed=2) as model:  # 1.5 s greeting takes 750 ms
        client, _ = await open_client(model, dialect)
        await client.send(type="response.cancel")
        error = (await client.recv())["error"]
        assert (error["code"], error["message"]) == (
            "response_cancel_not_active",
            "Cancellation failed: no active response found.",
        )
        await client.send(type="response.create")
        audio_delta = "response.output_audio.delta" if dialect == "ga" else "response.audio.delta"
        events = await client.until(audio_delta)
        await client.send(type="response.create")
        error = (await client.until("error"))[-1]["error"]
        assert error["code"] == "conversation_already_has_active_response"
        await client.send(type="response.cancel")
        events += await client.until("response.done")
        done = events[-1]["response"]
        assert (done["status"], done["status_details"]) == (
            "cancelled",
            {"type": "cancelled", "reason": "client_cancelled"},
        )
        assert done["output"][0]["status"] == "incomplete"
        generated = len(deltas(client.events, audio_delta))
        assert 0 < generated < 1500 * 48
        item_id = done["output"][0]["id"]
        assert model.connections[0].item_audio_ms(item_id) == generated / 48
        await client.send(type="response.cancel")  # answered in order: nothing came between the end and this
        assert (await client.recv())["error"]["code"] == "response_cancel_not_active"
        assert client.events[-2]["type"] == "response.done"  # nothing after the end
        check_types(dialect, client.events)
        await client.ws.close()


async def test_barge_in_cancels_the_response_with_turn_detected(dialect: str) -> None:
    async with LocalModel(speed=2) as model:
        client, _ = await open_client(model, dialect)
        await client.send(type="session.update", session=vad_update(dialect, create_response=False))
        await client.until("session.updated")
        await client.send(type="response.create")
        audio_delta = "response.output_audio.delta" if dialect == "ga" else "response.audio.delta"
        await client.until(audio_delta)
        await client.append(pcm_bytes(noise(100), tone(200)), chunk=2400)
        events = await client.until("response.done")
        kinds = [e["type"] for e in events]
        assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.content_part.done")
        done = events[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"]["reason"] == "turn_detected"
        after_start = kinds[kinds.index("input_audio_buffer.speech_started") :]
        assert audio_delta not in after_start
        # A barrier, not a sleep: "no active response" proves the cancelled one sends nothing more.
        await client.send(type="response.cancel")
        assert (await client.until("error"))[-1]["error"]["code"] == "response_cancel_not_active"
        sent = model.connections[0].sent
        last_done = max(i for i, e in enumerate(sent) if e["type"] == "response.done")
        assert all(e["type"] != audio_delta for e in sent[last_done:])
        check_types(dialect, client.events)
        await client.ws.close()


async def test_no_barge_in_when_interrupt_response_is_off() -> None:
    async with LocalModel(speed=3) as model:
        client, _ = await open_client(model, "ga")
        update = vad_update("ga", interrupt_response=False, create_response=False)
        await client.send(type="session.update", session=update)
        await client.until("session.updated")
        await client.send(type="response.create")
        await client.until("response.output_audio.delta")
        await client.append(pcm_bytes(tone(200)), chunk=2400)
        events = await client.until("response.done")
        assert "input_audio_buffer.speech_started" in [e["type"] for e in events]
        assert events[-1]["response"]["status"] == "completed"
        await client.ws.close()


async def test_truncate(model: LocalModel, dialect: str) -> None:
    client, _ = await open_client(model, dialect)
    await client.send(type="response.create")
    events = await client.until("response.done")
    item_id = events[-1]["response"]["output"][0]["id"]
    await client.send(type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=1600)
    error = (await client.recv())["error"]
    assert error["message"] == "Audio content of 1500ms is already shorter than 1600ms"
    await client.send(type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=1000)
    truncated = await client.recv()
    assert truncated == truncated | {
        "type": "conversation.item.truncated",
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": 1000,
    }
    conn = model.connections[0]
    assert conn.item_audio_ms(item_id) == 1000
    assert conn.items[-1]["content"][0]["transcript"] == ""  # the words are forgotten
    await client.send(type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=1200)
    assert (await client.recv())["error"][
        "message"
    ] == "Audio content of 1000ms is already shorter than 1200ms"
    await client.send(type="conversation.item.truncate", item_id="item_nope", content_index=0, audio_end_ms=0)
    assert (await client.recv())["error"]["code"] == "item_not_found"
    user = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
    await client.send(type="conversation.item.create", item=user)
    added = await client.until("conversation.item.done" if dialect == "ga" else "conversation.item.created")
    user_id = added[-1]["item"]["id"]
    await client.send(type="conversation.item.truncate", item_id=user_id, content_index=0, audio_end_ms=0)
    assert (await client.recv())["error"]["message"] == "Only assistant messages can be truncated."
    check_types(dialect, client.events)
    await client.ws.close()


async def test_items_and_voice_lock(model: LocalModel) -> None:
    client, _ = await open_client(model, "preview")
    assistant = {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "Earlier."}]}
    await client.send(type="conversation.item.create", item=assistant)
    created = await client.recv()
    assert created["type"] == "conversation.item.created" and created["previous_item_id"] is None
    await client.send(
        type="conversation.item.create",
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
    )
    second = await client.recv()
    assert second["previous_item_id"] == created["item"]["id"]
    await client.send(type="response.create", response={"modalities": ["text"]})
    events = await client.until("response.done")
    assert "response.text.delta" in [e["type"] for e in events]
    assert events[-1]["response"]["output"][0]["content"][0] == {"type": "text", "text": "You said: hi"}
    await client.send(type="session.update", session={"voice": "echo"})  # no audio yet: allowed
    assert (await client.recv())["type"] == "session.updated"
    await client.send(type="response.create")
    await client.until("response.done")
    await client.send(type="session.update", session={"voice": "sage"})
    assert (await client.recv())["error"]["code"] == "cannot_update_voice"
    await client.send(type="session.update", session={"voice": "echo"})  # unchanged: fine
    assert (await client.recv())["type"] == "session.updated"
    await client.send(type="conversation.item.delete", item_id=created["item"]["id"])
    assert (await client.recv())["type"] == "conversation.item.deleted"
    check_types("preview", client.events)
    await client.ws.close()


# --- faults and lifetime -----------------------------------------------------------------------------------


async def test_drop_all(model: LocalModel) -> None:
    a, _ = await open_client(model, "ga")
    b, _ = await open_client(model, "preview")
    await model.drop_all()
    for client in (a, b):
        with pytest.raises(ConnectionClosed) as info:
            await client.ws.recv()
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1011, "server error")
    for conn in model.connections:
        await asyncio.wait_for(conn.closed.wait(), 1)


async def test_close_ends_everything_mid_response() -> None:
    model = LocalModel(speed=1)
    await model.start()
    client, _ = await open_client(model)
    await client.send(type="response.create")
    await client.until("response.output_audio.delta")
    before = {t for t in asyncio.all_tasks() if t.get_name().startswith("local-model")}
    assert before
    await model.close()
    assert all(t.done() for t in before)
    assert not model._tasks
    assert model.connections[0].closed.is_set()
    async for _ in client.ws:  # the rest of what was sent, then the close
        pass
    assert client.ws.close_code == 1001
    with pytest.raises(OSError):
        await connect(url(model, "ga"), additional_headers={"api-key": "k"}, open_timeout=1)


async def test_expire_and_abort(model: LocalModel) -> None:
    client, _ = await open_client(model)
    conn = await model.wait_for_connection()
    await conn.expire()
    await expect_expiry(client, "Your session hit the maximum duration of 30 minutes.")
    other, _ = await open_client(model)
    model.connections[1].abort()
    with pytest.raises(ConnectionClosed) as info:
        await other.ws.recv()
    assert info.value.rcvd is None


def minimal_update(dialect: str, instructions: str) -> dict[str, Any]:
    return {"instructions": instructions} | ({"type": "realtime"} if dialect == "ga" else {})


async def test_expires_at_is_connect_time_plus_the_cap(dialect: str) -> None:
    async with LocalModel(session_seconds=90.5) as model:
        before = time.time()
        client, created = await open_client(model, dialect)
        after = time.time()
        expires_at = created["session"]["expires_at"]
        assert isinstance(expires_at, int)
        assert int(before + 90.5) <= expires_at <= int(after + 90.5)
        await client.send(type="session.update", session=minimal_update(dialect, "Be brief."))
        updated = (await client.until("session.updated"))[-1]["session"]
        assert (updated["expires_at"], updated["instructions"]) == (expires_at, "Be brief.")
        await client.ws.close()


def test_session_seconds_and_drop_after_are_checked() -> None:
    for cap in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError, match="session_seconds"):
            LocalModel(session_seconds=cap)
    with pytest.raises(ValueError, match="drop_after"):
        LocalModel(drop_after=-1)
    assert LocalModel(drop_after=2.5).drop_after == 2.5


async def expect_expiry(client: Client, message: str) -> dict[str, Any]:
    """Read up to the ``error``, check it is the cap's, then check that the socket closes with 1001."""
    error = (await client.until("error", limit=5))[-1]
    assert error["error"] == {
        "type": "invalid_request_error",
        "code": "session_expired",
        "message": message,
        "param": None,
        "event_id": None,
    }
    with pytest.raises(ConnectionClosed) as info:
        await client.recv()  # nothing after the error but the close
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "session expired")
    return error


async def test_session_cap_sends_session_expired_then_closes(dialect: str) -> None:
    async with LocalModel(session_seconds=0.5) as model:
        began = time.monotonic()
        client, _ = await open_client(model, dialect)
        conn = await model.wait_for_connection()
        await expect_expiry(client, "Your session hit the maximum duration of 0.5 seconds.")
        assert time.monotonic() - began >= 0.49  # timed from the accept, which came after `began`
        assert conn.sent_types() == ["session.created", "error"]
        check_types(dialect, client.events)
        await asyncio.wait_for(conn.closed.wait(), 1)
        if model._tasks:  # the clock: it ran expire() and is ending, or was cancelled with the connection
            await asyncio.wait(set(model._tasks), timeout=1)
        assert not model._tasks


async def test_session_cap_abandons_a_streaming_response(dialect: str) -> None:
    async with LocalModel(speed=1, session_seconds=0.5) as model:  # the 1.5 s greeting outlasts the cap
        client, _ = await open_client(model, dialect)
        await client.send(type="response.create")
        audio_delta = "response.output_audio.delta" if dialect == "ga" else "response.audio.delta"
        await expect_expiry(client, "Your session hit the maximum duration of 0.5 seconds.")
        kinds = [e["type"] for e in client.events]
        assert "response.created" in kinds and audio_delta in kinds  # it was streaming
        assert kinds[-1] == "error"
        ends = {"response.content_part.done", "response.output_item.done", "response.done"}
        assert not ends & set(kinds)  # abandoned without its end events
        conn = model.connections[0]
        await asyncio.wait_for(conn.closed.wait(), 1)
        assert conn.sent_types()[-1] == "error" and not ends & set(conn.sent_types())
        check_types(dialect, client.events)


async def test_cap_in_whole_minutes_and_the_clock_ends_with_the_connection() -> None:
    async with LocalModel(session_seconds=120) as model:
        client, _ = await open_client(model, "preview")
        clocks = {t for t in asyncio.all_tasks() if t.get_name().endswith(" clock")}
        assert len(clocks) == 1
        conn = await model.wait_for_connection()
        await client.send(type="response.create")  # read after expire() began: ignored
        await conn.expire()  # the cap's path, early: the message gives the cap
        await conn.send({"type": "rate_limits.updated", "rate_limits": []})  # nothing after the error
        await expect_expiry(client, "Your session hit the maximum duration of 2 minutes.")
        await asyncio.wait_for(conn.closed.wait(), 1)
        assert conn.sent_types() == ["session.created", "error"]
        done, _ = await asyncio.wait(clocks, timeout=1)
        assert done == clocks and all(t.cancelled() for t in clocks)
        assert not model._tasks


async def test_drop_after_aborts_connections_accepted_afterwards(dialect: str) -> None:
    async with LocalModel() as model:
        early, _ = await open_client(model, dialect)
        model.drop_after = 0.2
        began = time.monotonic()
        late, _ = await open_client(model, dialect)
        with pytest.raises(ConnectionClosed) as info:
            await late.recv(limit=3)
        assert info.value.rcvd is None  # no close frame: a network failure
        assert time.monotonic() - began >= 0.19
        await asyncio.wait_for(model.connections[1].closed.wait(), 1)
        # The first connection was accepted before drop_after was set: still served.
        await early.send(type="input_audio_buffer.clear")
        assert (await early.recv())["type"] == "input_audio_buffer.cleared"
        await early.ws.close()
    async with LocalModel(drop_after=0.1) as model:  # the constructor's argument
        client, _ = await open_client(model, dialect)
        with pytest.raises(ConnectionClosed) as info:
            await client.recv(limit=3)
        assert info.value.rcvd is None


async def test_fail_next_session_update(model: LocalModel, dialect: str) -> None:
    client, created = await open_client(model, dialect)
    model.fail_next_session_update()
    await client.send(type="session.update", event_id="evt_refused", session=minimal_update(dialect, "1"))
    error = await client.recv()
    assert error["type"] == "error"
    assert error["error"] | {"message": ""} == {
        "type": "invalid_request_error",
        "code": "invalid_value",
        "message": "",
        "param": None,
        "event_id": "evt_refused",
    }
    assert error["error"]["message"]
    assert model.connections[0].session == created["session"]  # not applied
    await client.send(type="session.update", session=minimal_update(dialect, "2"))
    updated = await client.recv()  # the next event: nothing was sent for the refused update
    assert (updated["type"], updated["session"]["instructions"]) == ("session.updated", "2")
    # On any connection, with the caller's code and message.
    model.fail_next_session_update("feature_not_supported", "Not with this deployment.")
    other, _ = await open_client(model, dialect)
    await other.send(type="session.update", event_id="evt_2", session=minimal_update(dialect, "3"))
    refused = (await other.recv())["error"]
    assert (refused["code"], refused["message"], refused["event_id"]) == (
        "feature_not_supported",
        "Not with this deployment.",
        "evt_2",
    )
    check_types(dialect, client.events + other.events)
    await client.ws.close()
    await other.ws.close()


async def test_record_false_keeps_only_open_connections() -> None:
    async with LocalModel(speed=50, record=False) as model:
        client, _ = await open_client(model)
        await client.send(type="response.create")
        await client.until("response.done")
        (conn,) = model.connections
        assert conn.sent == [] and conn.received == []
        await client.ws.close()
        await asyncio.wait_for(conn.closed.wait(), 1)
        assert model.connections == []


async def test_ga_text_only_response(model: LocalModel) -> None:
    client, _ = await open_client(model, "ga")
    await client.send(type="response.create", response={"output_modalities": ["text"]})
    events = await client.until("response.done")
    kinds = [e["type"] for e in events]
    assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds
    assert not any("audio" in kind for kind in kinds)
    part_done = next(e for e in events if e["type"] == "response.content_part.done")
    assert part_done["part"] == {"type": "text", "text": "Hello! This is the local test model."}
    assert events[-1]["response"]["output"][0]["content"][0]["type"] == "output_text"
    check_types("ga", events)
    await client.ws.close()

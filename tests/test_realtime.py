"""Both dialect adapters: client events valid against the openai SDK's types, server events parsed."""

from __future__ import annotations

import base64
import json

import pytest

from bridge import realtime as rt
from bridge.config import AudioPath, Dialect
from bridge.errors import DialectMismatch, MalformedMessage
from bridge.prompts import Profile, Transcription, TurnDetection
from tests.strict_openai import validate

PROFILES = [
    Profile(),
    Profile(
        voice="verse",
        noise_reduction=None,
        transcription=Transcription("whisper-1", "en"),
        turn_detection=TurnDetection(type="semantic_vad", eagerness="low", interrupt_response=False),
    ),
]
COMMANDS: list[rt.ClientCommand] = [
    rt.AppendAudio(b"\x01\x02" * 80),
    rt.CreateResponse(),
    rt.CreateResponse("Say hello."),
    rt.CancelResponse("resp_1"),
    rt.TruncateItem("item_1", 1234),
    rt.DeleteItem("item_2"),
    rt.AddTextItem("user", "[The caller pressed 5 on the keypad.]"),
    rt.AddTextItem("assistant", "Hello! How can I help you today?"),
]


@pytest.mark.parametrize("dialect", list(Dialect))
@pytest.mark.parametrize("path", list(AudioPath))
@pytest.mark.parametrize("profile", PROFILES)
def test_session_update_is_valid_in_each_dialect(dialect: Dialect, path: AudioPath, profile: Profile) -> None:
    adapter = rt.adapter_for(dialect)
    event = json.loads(adapter.serialize(rt.UpdateSession(profile, path)))
    validate(dialect.value, "client", event)
    session = event["session"]
    if dialect is Dialect.GA:
        assert session["type"] == "realtime"
        assert session["audio"]["output"]["voice"] == profile.voice
        fmt = session["audio"]["input"]["format"]
        assert fmt == (
            {"type": "audio/pcm", "rate": 24000} if path is AudioPath.PCM16 else {"type": "audio/pcmu"}
        )
        td = session["audio"]["input"]["turn_detection"]
    else:
        assert "type" not in session and "audio" not in session
        assert session["input_audio_format"] == session["output_audio_format"] == path.value
        td = session["turn_detection"]
    assert td["type"] == profile.turn_detection.type
    assert td["interrupt_response"] is profile.turn_detection.interrupt_response


@pytest.mark.parametrize("dialect", list(Dialect))
@pytest.mark.parametrize("command", COMMANDS)
def test_every_client_command_is_valid(dialect: Dialect, command: rt.ClientCommand) -> None:
    adapter = rt.adapter_for(dialect)
    event = json.loads(adapter.serialize(command))
    validate(dialect.value, "client", event)
    if isinstance(command, rt.AppendAudio):
        assert base64.b64decode(event["audio"]) == command.audio
    if isinstance(command, rt.TruncateItem):
        assert (event["item_id"], event["content_index"], event["audio_end_ms"]) == ("item_1", 0, 1234)


def server_events(dialect: Dialect) -> list[tuple[dict[str, object], object]]:
    audio = "response.output_audio" if dialect is Dialect.GA else "response.audio"
    transcript = "response.output_audio_transcript" if dialect is Dialect.GA else "response.audio_transcript"
    ids = {"event_id": "e1", "response_id": "r1", "item_id": "i1", "output_index": 0, "content_index": 0}
    return [
        (
            {"type": f"{audio}.delta", **ids, "delta": base64.b64encode(b"abc").decode()},
            rt.AudioDelta("r1", "i1", b"abc"),
        ),
        ({"type": f"{audio}.done", **ids}, rt.AudioDone("r1", "i1")),
        (
            {"type": f"{transcript}.done", **ids, "transcript": "Hello"},
            rt.AssistantTranscript("r1", "i1", "Hello"),
        ),
        (
            {
                "type": "input_audio_buffer.speech_started",
                "event_id": "e",
                "audio_start_ms": 1500,
                "item_id": "u1",
            },
            rt.SpeechStarted(1500, "u1"),
        ),
        (
            {
                "type": "input_audio_buffer.speech_stopped",
                "event_id": "e",
                "audio_end_ms": 2500,
                "item_id": "u1",
            },
            rt.SpeechStopped(2500, "u1"),
        ),
        (
            {
                "type": "response.created",
                "event_id": "e",
                "response": {"id": "r1", "status": "in_progress", "object": "realtime.response"},
            },
            rt.ResponseCreated("r1"),
        ),
        (
            {
                "type": "response.done",
                "event_id": "e",
                "response": {
                    "id": "r1",
                    "status": "cancelled",
                    "object": "realtime.response",
                    "status_details": {"type": "cancelled", "reason": "turn_detected"},
                },
            },
            rt.ResponseDone("r1", "cancelled", "turn_detected"),
        ),
        (
            {
                "type": "conversation.item.truncated",
                "event_id": "e",
                "item_id": "i1",
                "content_index": 0,
                "audio_end_ms": 640,
            },
            rt.ItemTruncated("i1", 640),
        ),
        (
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "event_id": "e",
                "item_id": "u1",
                "content_index": 0,
                "transcript": "hi",
            },
            rt.CallerTranscript("u1", "hi"),
        ),
        (
            {
                "type": "error",
                "event_id": "e",
                "error": {
                    "type": "invalid_request_error",
                    "code": "response_cancel_not_active",
                    "message": "no active response",
                    "param": None,
                    "event_id": None,
                },
            },
            rt.ErrorEvent(
                "response_cancel_not_active", "no active response", "invalid_request_error", None, None
            ),
        ),
        (
            {"type": "rate_limits.updated", "event_id": "e", "rate_limits": []},
            rt.OtherEvent("rate_limits.updated"),
        ),
    ]


@pytest.mark.parametrize("dialect", list(Dialect))
def test_server_events_parse_to_typed_events(dialect: Dialect) -> None:
    adapter = rt.adapter_for(dialect)
    for wire, expected in server_events(dialect):
        assert adapter.parse(json.dumps(wire)) == expected, wire["type"]
    assert rt.ErrorEvent("response_cancel_not_active", "", None, None, None).benign


def test_each_adapter_refuses_the_other_dialects_audio_names() -> None:
    ga_delta = json.dumps(
        {"type": "response.output_audio.delta", "response_id": "r", "item_id": "i", "delta": ""}
    )
    assert rt.adapter_for(Dialect.PREVIEW).parse(ga_delta) == rt.UnknownEvent("response.output_audio.delta")
    preview_delta = ga_delta.replace("output_audio", "audio")
    assert rt.adapter_for(Dialect.GA).parse(preview_delta) == rt.UnknownEvent("response.audio.delta")


def test_session_created_of_the_wrong_dialect_says_what_to_fix() -> None:
    ga_session = json.dumps({"type": "session.created", "session": {"type": "realtime", "audio": {}}})
    preview_session = json.dumps(
        {
            "type": "session.created",
            "session": {"modalities": ["audio", "text"], "input_audio_format": "pcm16"},
        }
    )
    assert isinstance(rt.adapter_for(Dialect.GA).parse(ga_session), rt.SessionCreated)
    assert isinstance(rt.adapter_for(Dialect.PREVIEW).parse(preview_session), rt.SessionCreated)
    # Its own error, not a malformed message: the driver ends the call on it instead of skipping it.
    assert not issubclass(DialectMismatch, MalformedMessage)
    with pytest.raises(DialectMismatch, match="AZURE_OPENAI_API_VERSION"):
        rt.adapter_for(Dialect.GA).parse(preview_session)
    with pytest.raises(DialectMismatch, match="unset AZURE_OPENAI_API_VERSION"):
        rt.adapter_for(Dialect.PREVIEW).parse(ga_session)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1,2]",
        b'{"no":"type"}',
        b'{"type":"response.output_audio.delta","delta":"!!","response_id":"r","item_id":"i"}',
        b'{"type":"input_audio_buffer.speech_started"}',
    ],
)
def test_malformed_server_messages_raise(raw: bytes) -> None:
    with pytest.raises(MalformedMessage):
        rt.adapter_for(Dialect.GA).parse(raw)

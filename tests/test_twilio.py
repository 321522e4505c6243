"""Tests for bridge.twilio: parsing and serializing Media Streams events (the HTTP side: test_webhooks.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pybase64
import pytest

from bridge.errors import MalformedMessage
from bridge.twilio import (
    MAX_MESSAGE_BYTES,
    Connected,
    Dtmf,
    Mark,
    Media,
    Start,
    Stop,
    UnknownEvent,
    _new_media,
    parse_message,
    serialize_clear,
    serialize_mark,
    serialize_media,
)

STREAM_SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
ACCOUNT_SID = "AC25e16e9a716a4a1786a7c83f58e30482"
CALL_SID = "CA6d85d7d9aa3e3e0f8e3f3a1f1e9e5c7b"
AUDIO = bytes(range(256))[:160]


def dumps(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def start_message(**start_overrides: Any) -> dict[str, Any]:
    start: dict[str, Any] = {
        "accountSid": ACCOUNT_SID,
        "streamSid": STREAM_SID,
        "callSid": CALL_SID,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"CallSid": CALL_SID, "token": "abc"},
    }
    start.update(start_overrides)
    return {"event": "start", "sequenceNumber": "1", "start": start, "streamSid": STREAM_SID}


def media_message(**media_overrides: Any) -> dict[str, Any]:
    media: dict[str, Any] = {
        "track": "inbound",
        "chunk": "1",
        "timestamp": "12",
        "payload": pybase64.b64encode_as_string(AUDIO),
    }
    media.update(media_overrides)
    return {"event": "media", "sequenceNumber": "3", "media": media, "streamSid": STREAM_SID}


# --- parsing: every event --------------------------------------------------------------------------------


def test_parse_connected() -> None:
    event = parse_message('{"event":"connected","protocol":"Call","version":"1.0.0"}')
    assert event == Connected(protocol="Call", version="1.0.0")


def test_parse_start_as_twilio_sends_it() -> None:
    event = parse_message(dumps(start_message()))
    assert isinstance(event, Start)
    assert event.stream_sid == STREAM_SID
    assert event.account_sid == ACCOUNT_SID
    assert event.call_sid == CALL_SID
    assert event.tracks == ("inbound",)
    assert dict(event.custom_parameters) == {"CallSid": CALL_SID, "token": "abc"}
    assert (event.encoding, event.sample_rate, event.channels) == ("audio/x-mulaw", 8000, 1)
    assert event.sequence_number == 1


def test_parse_start_custom_parameters_are_read_only() -> None:
    event = parse_message(dumps(start_message()))
    assert isinstance(event, Start)
    with pytest.raises(TypeError):
        event.custom_parameters["token"] = "other"  # type: ignore[index]


def test_parse_start_tolerates_missing_optional_fields() -> None:
    message = start_message()
    for key in ("customParameters", "mediaFormat", "tracks"):
        del message["start"][key]
    del message["sequenceNumber"]
    event = parse_message(dumps(message))
    assert isinstance(event, Start)
    assert dict(event.custom_parameters) == {}
    assert (event.encoding, event.sample_rate, event.channels) == ("audio/x-mulaw", 8000, 1)
    assert event.tracks == ("inbound",)
    assert event.sequence_number == 0


def test_parse_start_null_custom_parameters_and_string_rate() -> None:
    message = start_message(customParameters=None, mediaFormat={"sampleRate": "8000"})
    event = parse_message(dumps(message))
    assert isinstance(event, Start)
    assert dict(event.custom_parameters) == {}
    assert (event.encoding, event.sample_rate, event.channels) == ("audio/x-mulaw", 8000, 1)


def test_parse_start_stream_sid_only_inside_start() -> None:
    message = start_message()
    del message["streamSid"]
    event = parse_message(dumps(message))
    assert isinstance(event, Start)
    assert event.stream_sid == STREAM_SID


def test_parse_media_with_string_counters() -> None:
    event = parse_message(dumps(media_message()))
    assert event == Media(STREAM_SID, "inbound", 1, 12, AUDIO, 3)


def test_parse_media_with_int_counters_and_no_track() -> None:
    message = media_message(chunk=7, timestamp=140)
    del message["media"]["track"]
    message["sequenceNumber"] = 9
    event = parse_message(dumps(message))
    assert event == Media(STREAM_SID, "inbound", 7, 140, AUDIO, 9)


def test_parse_media_without_counters() -> None:
    message = media_message()
    del message["media"]["chunk"]
    del message["media"]["timestamp"]
    message["sequenceNumber"] = None
    assert parse_message(dumps(message)) == Media(STREAM_SID, "inbound", 0, 0, AUDIO, 0)


def test_parse_media_first_timestamp_not_zero_and_no_sequence_number() -> None:
    message = media_message(timestamp="4321")
    del message["sequenceNumber"]
    event = parse_message(dumps(message))
    assert isinstance(event, Media)
    assert (event.timestamp, event.sequence_number) == (4321, 0)


def test_parse_media_any_length_and_empty_payload() -> None:
    for audio in (b"", b"\xff", bytes(1000)):
        event = parse_message(dumps(media_message(payload=pybase64.b64encode_as_string(audio))))
        assert isinstance(event, Media)
        assert event.payload == audio


def test_parse_media_from_bytes_of_str_is_refused_as_binary() -> None:
    with pytest.raises(MalformedMessage) as info:
        parse_message(dumps(media_message()).encode())
    assert info.value.reason == "binary frame"


def test_fast_media_constructor_matches_dataclass() -> None:
    fast = _new_media(STREAM_SID, "inbound", 1, 2, b"x", 3)
    slow = Media(STREAM_SID, "inbound", 1, 2, b"x", 3)
    assert fast == slow
    assert repr(fast) == repr(slow)
    assert [f.name for f in dataclasses.fields(Media)] == [
        "stream_sid",
        "track",
        "chunk",
        "timestamp",
        "payload",
        "sequence_number",
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.chunk = 5  # type: ignore[misc]


def test_parse_mark() -> None:
    message = {"event": "mark", "sequenceNumber": "4", "streamSid": STREAM_SID, "mark": {"name": "r1:7"}}
    assert parse_message(dumps(message)) == Mark(STREAM_SID, "r1:7", 4)


def test_parse_dtmf() -> None:
    message = {
        "event": "dtmf",
        "streamSid": STREAM_SID,
        "sequenceNumber": "5",
        "dtmf": {"track": "inbound_track", "digit": "1"},
    }
    assert parse_message(dumps(message)) == Dtmf(STREAM_SID, "inbound_track", "1", 5)
    del message["dtmf"]["track"]  # type: ignore[attr-defined]
    assert parse_message(dumps(message)) == Dtmf(STREAM_SID, "inbound_track", "1", 5)


def test_parse_stop() -> None:
    message = {
        "event": "stop",
        "sequenceNumber": "5",
        "streamSid": STREAM_SID,
        "stop": {"accountSid": ACCOUNT_SID, "callSid": CALL_SID},
    }
    assert parse_message(dumps(message)) == Stop(STREAM_SID, ACCOUNT_SID, CALL_SID, 5)


def test_parse_stop_without_details_is_still_a_stop() -> None:
    event = parse_message(dumps({"event": "stop", "streamSid": STREAM_SID}))
    assert event == Stop(STREAM_SID, "", "", 0)


def test_parse_unknown_event_is_a_value() -> None:
    assert parse_message('{"event":"transcription","streamSid":"MZ1"}') == UnknownEvent("transcription")


def test_events_are_frozen_and_slotted() -> None:
    for cls in (Connected, Start, Media, Mark, Dtmf, Stop, UnknownEvent):
        params = getattr(cls, "__dataclass_params__")  # noqa: B009
        assert params.frozen, cls
        assert "__slots__" in cls.__dict__, cls


# --- parsing: malformed input ----------------------------------------------------------------------------


def _reason(data: str | bytes) -> str:
    with pytest.raises(MalformedMessage) as info:
        parse_message(data)
    assert str(info.value) == info.value.reason
    return info.value.reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"event":"connected"}', "binary frame"),
        ("x" * (MAX_MESSAGE_BYTES + 1), f"message is larger than {MAX_MESSAGE_BYTES} bytes"),
        ('{"event":', "message is not valid JSON"),
        ("", "message is not valid JSON"),
        ("[1, 2]", "message is not a JSON object"),
        ('"media"', "message is not a JSON object"),
        ('{"streamSid":"MZ1"}', "event is missing"),
        ('{"event":7}', "event is not a string"),
        ('{"event":"connected","version":"1.0.0"}', "protocol is missing"),
        ('{"event":"connected","protocol":1,"version":"1.0.0"}', "protocol is not a string"),
    ],
)
def test_malformed_frames(data: str | bytes, reason: str) -> None:
    assert _reason(data) == reason


def test_oversized_by_bytes_not_characters() -> None:
    # 30,000 three-byte characters: under the limit in characters, over it in bytes.
    data = '{"event":"x","pad":"' + "€" * 30_000 + '"}'
    assert len(data) < MAX_MESSAGE_BYTES < len(data.encode())
    assert _reason(data) == f"message is larger than {MAX_MESSAGE_BYTES} bytes"


def test_lone_surrogate_is_refused_cleanly() -> None:
    assert _reason('{"event":"\ud800"}') == "message is not valid JSON"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"payload": "not base64!"}, "media.payload is not valid base64"),
        ({"payload": "YWJj\n"}, "media.payload is not valid base64"),
        ({"payload": "YWJ"}, "media.payload is not valid base64"),
        ({"payload": "é"}, "media.payload is not valid base64"),
        ({"payload": 123}, "media.payload is not a string"),
        ({"payload": None}, "media.payload is missing"),
        ({"chunk": "one"}, "media.chunk is not an integer"),
        ({"chunk": "-1"}, "media.chunk is not an integer"),
        ({"chunk": -1}, "media.chunk is not an integer"),
        ({"chunk": "1.5"}, "media.chunk is not an integer"),
        ({"chunk": 1.0}, "media.chunk is not an integer"),
        ({"chunk": True}, "media.chunk is not an integer"),
        ({"chunk": "²"}, "media.chunk is not an integer"),
        ({"chunk": "9" * 5000}, "media.chunk is not an integer"),
        ({"timestamp": ""}, "media.timestamp is not an integer"),
        ({"timestamp": "1e3"}, "media.timestamp is not an integer"),
        ({"track": 1}, "media.track is not a string"),
    ],
)
def test_malformed_media(change: dict[str, Any], reason: str) -> None:
    message = media_message()
    for key, value in change.items():
        if value is None:
            del message["media"][key]
        else:
            message["media"][key] = value
    assert _reason(dumps(message)) == reason


def test_malformed_media_envelope() -> None:
    message = media_message()
    del message["streamSid"]
    assert _reason(dumps(message)) == "streamSid is missing"
    message = media_message()
    message["streamSid"] = 5
    assert _reason(dumps(message)) == "streamSid is not a string"
    message = media_message()
    message["sequenceNumber"] = "x"
    assert _reason(dumps(message)) == "sequenceNumber is not an integer"
    assert _reason('{"event":"media","streamSid":"MZ1"}') == "media is missing"
    assert _reason('{"event":"media","streamSid":"MZ1","media":[]}') == "media is not an object"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"callSid": None}, "start.callSid is missing"),
        ({"accountSid": 5}, "start.accountSid is not a string"),
        ({"tracks": "inbound"}, "start.tracks is not a list of strings"),
        ({"tracks": [1]}, "start.tracks is not a list of strings"),
        ({"customParameters": {"a": 1}}, "start.customParameters is not an object of strings"),
        ({"customParameters": ["a"]}, "start.customParameters is not an object of strings"),
        ({"mediaFormat": "mulaw"}, "start.mediaFormat is not an object"),
        ({"mediaFormat": {"sampleRate": "fast"}}, "start.mediaFormat.sampleRate is not an integer"),
        ({"mediaFormat": {"channels": 1.5}}, "start.mediaFormat.channels is not an integer"),
        ({"mediaFormat": {"encoding": 0}}, "start.mediaFormat.encoding is not a string"),
        ({"streamSid": "MZother"}, "start.streamSid differs from streamSid"),
    ],
)
def test_malformed_start(change: dict[str, Any], reason: str) -> None:
    message = start_message()
    for key, value in change.items():
        if value is None:
            del message["start"][key]
        else:
            message["start"][key] = value
    assert _reason(dumps(message)) == reason


def test_malformed_start_envelope() -> None:
    assert _reason('{"event":"start","streamSid":"MZ1"}') == "start is missing"
    message = start_message()
    del message["streamSid"]
    del message["start"]["streamSid"]
    assert _reason(dumps(message)) == "streamSid is missing"


def test_malformed_mark_dtmf_stop() -> None:
    assert _reason('{"event":"mark","streamSid":"MZ1"}') == "mark is missing"
    assert _reason('{"event":"mark","streamSid":"MZ1","mark":{}}') == "mark.name is missing"
    assert _reason('{"event":"mark","streamSid":"MZ1","mark":{"name":3}}') == "mark.name is not a string"
    assert _reason('{"event":"mark","mark":{"name":"a"}}') == "streamSid is missing"
    assert _reason('{"event":"dtmf","streamSid":"MZ1","dtmf":{"digit":""}}') == "dtmf.digit is empty"
    assert _reason('{"event":"dtmf","streamSid":"MZ1","dtmf":{"digit":1}}') == "dtmf.digit is not a string"
    assert _reason('{"event":"stop","streamSid":"MZ1","stop":"now"}') == "stop is not an object"
    assert (
        _reason('{"event":"stop","streamSid":"MZ1","stop":{"callSid":1}}') == "stop.callSid is not a string"
    )
    assert _reason('{"event":"stop"}') == "streamSid is missing"


# --- serializing -----------------------------------------------------------------------------------------


def test_serialize_media_shape_and_round_trip() -> None:
    text = serialize_media(STREAM_SID, AUDIO)
    assert orjson.loads(text) == {
        "event": "media",
        "streamSid": STREAM_SID,
        "media": {"payload": pybase64.b64encode_as_string(AUDIO)},
    }
    # parse-compatible: what Twilio adds inbound (track, counters) takes its defaults
    assert parse_message(text) == Media(STREAM_SID, "inbound", 0, 0, AUDIO, 0)


def test_serialize_media_escapes_odd_stream_sids() -> None:
    for sid in ('MZ"1', "MZ\\1", "MZ\n1", "MZ-1"):
        assert orjson.loads(serialize_media(sid, b"\x00"))["streamSid"] == sid


def test_serialize_media_empty_and_long_payloads() -> None:
    for audio in (b"", bytes(range(256)) * 40):
        payload = orjson.loads(serialize_media(STREAM_SID, audio))["media"]["payload"]
        assert pybase64.b64decode(payload, validate=True) == audio


def test_serialize_mark_shape_and_round_trip() -> None:
    text = serialize_mark(STREAM_SID, 'r"1:7')
    assert orjson.loads(text) == {"event": "mark", "streamSid": STREAM_SID, "mark": {"name": 'r"1:7'}}
    assert parse_message(text) == Mark(STREAM_SID, 'r"1:7', 0)


def test_serialize_clear_shape() -> None:
    assert orjson.loads(serialize_clear(STREAM_SID)) == {"event": "clear", "streamSid": STREAM_SID}
    assert parse_message(serialize_clear(STREAM_SID)) == UnknownEvent("clear")

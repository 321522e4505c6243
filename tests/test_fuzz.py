"""Property-based fuzzing of the bridge's three input parsers (hypothesis).

Every input gives a typed value or a typed error, never a traceback, never a dropped call:

* Twilio Media Streams frames (:func:`bridge.twilio.parse_message`): one of the typed events, or
  :class:`~bridge.errors.MalformedMessage`;
* Realtime server events in both dialects (:meth:`bridge.realtime.Adapter.parse`): one of the typed events,
  :class:`~bridge.errors.MalformedMessage`, or :class:`~bridge.errors.DialectMismatch` for a
  ``session.created`` of the other dialect;
* the admin profile form (:mod:`bridge.admin.forms`) and profile validation (:mod:`bridge.prompts`): a valid
  :class:`~bridge.prompts.Profile`, or :class:`~bridge.prompts.ProfileError` with one problem per field, each
  shown next to an input of the form.

Inputs are arbitrary text and bytes, and "near-valid" messages: the real shapes with fields deleted, added,
or replaced by awkward values (wrong types, huge numbers, bad base64, odd unicode). The last test feeds
malformed frames into live calls over real sockets and checks that each call goes on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any

import orjson
import pybase64
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge import realtime as rt
from bridge import twilio as tw
from bridge.admin.forms import (
    CHECKBOXES,
    FORM_LABELS,
    TEXT_FIELDS,
    form_errors,
    mapping_from_values,
    values_from_form,
    values_from_profile,
)
from bridge.config import AudioPath, Dialect
from bridge.errors import ConfigError, DialectMismatch, MalformedMessage
from bridge.keys import METRICS, REGISTRY
from bridge.local_model import LocalModel
from bridge.prompts import (
    DEFAULT_PROFILE,
    EAGERNESS,
    GA_VOICES,
    NOISE_REDUCTION,
    Profile,
    ProfileError,
    parse_profile,
    profile_from_mapping,
    profile_to_mapping,
)
from bridge.session import EndReason
from bridge.testing import TwilioCaller
from tests.conftest import AUTH_TOKEN, Bridge
from tests.test_e2e import settle

FAST = settings(max_examples=400, deadline=None, database=None)
"""Parsers are cheap: a few hundred examples per property in well under a second each."""

# --- checking that a value is what its type says ------------------------------------------------------


def conforms(value: object, hint: Any) -> bool:
    """Whether ``value`` is of the (resolved) type ``hint``: the shapes the parsers' dataclasses use."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, tuple) and all(conforms(item, args[0]) for item in value)
    if origin is Mapping:
        return isinstance(value, Mapping) and all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items()
        )
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint) and fully_typed(value)
    assert isinstance(hint, type), hint
    return isinstance(value, hint)


def fully_typed(value: object) -> bool:
    """Every field of the dataclass ``value`` holds a value of its annotated type (recursively)."""
    hints = typing.get_type_hints(type(value))
    for field in dataclasses.fields(value):  # type: ignore[arg-type]
        if not conforms(getattr(value, field.name), hints[field.name]):
            raise AssertionError(f"{type(value).__name__}.{field.name} = {getattr(value, field.name)!r}")
    return True


def checked_malformed(exc: MalformedMessage) -> MalformedMessage:
    """A MalformedMessage says why, in a few words (what the call's log shows)."""
    assert isinstance(exc.reason, str) and exc.reason and str(exc) == exc.reason
    return exc


def checked_problems(exc: ProfileError) -> ProfileError:
    """A ProfileError lists at least one problem, each a field name with a message."""
    assert exc.problems and str(exc)
    for field, message in exc.problems.items():
        assert isinstance(field, str) and isinstance(message, str) and message.strip(), (field, message)
    return exc


# --- shared strategies --------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
AWKWARD_VALUES = [
    None, True, False, 0, -1, 1.5, -0.0, 1e308, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30, float("nan"),
    float("inf"), "", " ", "0", "007", "²", "١٢", "12 ", "+1", "-1", "1_0", "0x1f", "1e3", "9" * 5000, "***",
    "AAA", "AA==", "====", "Zm9v\n", "\x00", "\u2028", "é", "😀", "\ud800", [], {}, [1], ["inbound"],
    {"a": None},
]  # fmt: skip
awkward = st.one_of(
    st.sampled_from(AWKWARD_VALUES).map(copy.deepcopy),  # a fresh copy: mutated() may change what it added
    json_scalars,
    st.lists(json_values, max_size=2),
    st.dictionaries(st.text(max_size=5), json_values, max_size=2),
)
"""Values that tend to break parsers: wrong types, edge numbers, digits int() refuses, bad base64."""

real_sids = st.builds(
    lambda prefix, digits: prefix + digits.hex(),
    st.sampled_from(["MZ", "AC", "CA"]),
    st.binary(min_size=16, max_size=16),
)
sids = st.one_of(real_sids, st.text(max_size=12))
b64 = st.binary(max_size=200).map(pybase64.b64encode_as_string)
counters = st.integers(min_value=0, max_value=2**40).flatmap(lambda n: st.sampled_from([n, str(n)]))


def _slots(value: Any, out: list[tuple[Any, Any]]) -> None:
    """Every (container, key) inside a JSON value, nested ones included."""
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((value, key))
            _slots(item, out)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.append((value, index))
            _slots(item, out)


@st.composite
def mutated(draw: st.DrawFn, messages: st.SearchStrategy[dict[str, Any]], keys: tuple[str, ...]) -> Any:
    """A message from ``messages`` with one to three fields deleted, replaced or added."""
    message = copy.deepcopy(draw(messages))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        slots: list[tuple[Any, Any]] = []
        _slots(message, slots)
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "add" or not slots:
            dicts = [message] + [c[k] for c, k in slots if isinstance(c[k], dict)]
            target = draw(st.sampled_from(dicts))
            target[draw(st.sampled_from(keys) | st.text(max_size=8))] = draw(awkward)
            continue
        container, key = draw(st.sampled_from(slots))
        if action == "replace":
            container[key] = draw(awkward)
        else:
            del container[key]
    return message


class Leaves:
    """Fills the fields of a message: each one its real value, or, at the example's drawn rate (5, 15 or
    30 %), an awkward one; so that a deep field is as likely to be wrong as a shallow one."""

    def __init__(self, draw: st.DrawFn, *, awkward_too: bool) -> None:
        self.draw = draw
        self.rate = draw(st.sampled_from([5, 15, 30])) if awkward_too else 0

    def __call__(self, value: Any) -> Any:
        if self.rate and self.draw(st.integers(min_value=0, max_value=99)) < self.rate:
            return self.draw(awkward)
        return value

    def of(self, strategy: st.SearchStrategy[Any]) -> Any:
        return self(self.draw(strategy))


@st.composite
def as_json(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> str:
    """``values`` as JSON text: ASCII-escaped or raw unicode; NaN and big integers as Python writes them."""
    return json.dumps(draw(values), ensure_ascii=draw(st.booleans()))


def arbitrary_frames(text: st.SearchStrategy[str]) -> st.SearchStrategy[str | bytes]:
    return st.one_of(text, st.binary(max_size=300), as_json(json_values), as_json(st.just(None)))


# --- 1. Twilio Media Streams messages -----------------------------------------------------------------

TWILIO_EVENTS = (tw.Connected, tw.Start, tw.Media, tw.Mark, tw.Dtmf, tw.Stop, tw.UnknownEvent)
TWILIO_KEYS = (
    "event", "streamSid", "sequenceNumber", "protocol", "version", "start", "media", "mark", "dtmf", "stop",
    "accountSid", "callSid", "tracks", "customParameters", "mediaFormat", "encoding", "sampleRate",
    "channels", "track", "chunk", "timestamp", "payload", "name", "digit",
)  # fmt: skip


@st.composite
def twilio_messages(draw: st.DrawFn, *, awkward_too: bool = False) -> dict[str, Any]:
    """A message as Twilio sends it; with ``awkward_too``, some of its fields replaced by awkward values."""
    v = Leaves(draw, awkward_too=awkward_too)
    kind = draw(st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop"]))
    sid = draw(sids)
    message: dict[str, Any] = {"event": kind, "sequenceNumber": v.of(counters), "streamSid": v(sid)}
    if kind == "connected":
        return {"event": kind, "protocol": v("Call"), "version": v.of(st.sampled_from(["1.0.0", ""]))}
    if kind == "start":
        media_format = {"encoding": v("audio/x-mulaw"), "sampleRate": v.of(counters), "channels": v(1)}
        parameters = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=4))
        message["start"] = v(
            {
                "accountSid": v.of(sids),
                "streamSid": v(sid),
                "callSid": v.of(sids),
                "tracks": v.of(st.lists(st.sampled_from(["inbound", "outbound"]), max_size=2)),
                "mediaFormat": v(media_format),
                "customParameters": v({k: v(x) for k, x in parameters.items()}),
            }
        )
    elif kind == "media":
        message["media"] = v(
            {
                "track": v.of(st.sampled_from(["inbound", "outbound"])),
                "chunk": v.of(counters),
                "timestamp": v.of(counters),
                "payload": v.of(b64),
            }
        )
    elif kind == "mark":
        message["mark"] = v({"name": v.of(st.text(max_size=20))})
    elif kind == "dtmf":
        message["dtmf"] = v({"track": v("inbound_track"), "digit": v.of(st.sampled_from("0123456789*#"))})
    else:
        message["stop"] = v({"accountSid": v.of(sids), "callSid": v.of(sids)})
    return message


twilio_near_valid = twilio_messages(awkward_too=True) | mutated(
    twilio_messages(awkward_too=True), TWILIO_KEYS
)


def parse_twilio(data: str | bytes) -> tw.TwilioEvent | MalformedMessage:
    """The property: a typed event whose counters are non-negative ints, or a MalformedMessage with a
    reason. Any other exception propagates and fails the test."""
    try:
        event = tw.parse_message(data)
    except MalformedMessage as exc:
        return checked_malformed(exc)
    assert type(event) in TWILIO_EVENTS
    assert fully_typed(event)
    for counter in ("chunk", "timestamp", "sequence_number", "sample_rate", "channels"):
        if hasattr(event, counter):
            value = getattr(event, counter)
            assert type(value) is int and value >= 0, (counter, value)
    return event


@FAST
@given(arbitrary_frames(st.text(max_size=300)))
@example("")
@example(b"\xff\xfe")
@example('{"event":"media","media":{"payload":"","chunk":"\u00b2"},"streamSid":"MZ"}')
@example('{"event":"media","media":{"payload":"","chunk":"' + "9" * 5000 + '"},"streamSid":"MZ"}')
def test_any_twilio_frame_is_an_event_or_a_malformed_message(data: str | bytes) -> None:
    result = parse_twilio(data)
    if isinstance(data, bytes):
        assert isinstance(result, MalformedMessage) and result.reason == "binary frame"


@FAST
@given(as_json(twilio_near_valid))
def test_near_valid_twilio_messages_are_an_event_or_a_malformed_message(data: str) -> None:
    result = parse_twilio(data)
    if isinstance(result, TWILIO_EVENTS[:-1]):
        # A typed event is the event the message names, never another one.
        assert orjson.loads(data)["event"] == type(result).__name__.lower()


@settings(max_examples=150, deadline=None, database=None)
@given(twilio_messages(), st.booleans())
def test_valid_twilio_messages_parse_to_what_they_say(message: dict[str, Any], ascii_only: bool) -> None:
    event = parse_twilio(json.dumps(message, ensure_ascii=ascii_only))
    assert type(event).__name__.lower() == message["event"]
    if isinstance(event, tw.Media):
        assert event.payload == pybase64.b64decode(message["media"]["payload"])
        assert event.chunk == int(message["media"]["chunk"])
        assert event.timestamp == int(message["media"]["timestamp"])
    if isinstance(event, tw.Start | tw.Media | tw.Mark | tw.Dtmf | tw.Stop):
        assert event.stream_sid == message["streamSid"]
        assert event.sequence_number == int(message["sequenceNumber"])


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.integers(min_value=tw.MAX_MESSAGE_BYTES - 40, max_value=tw.MAX_MESSAGE_BYTES + 40),
    st.sampled_from(["a", "é", "€", "😀"]),
)
def test_frames_near_the_size_limit_are_measured_in_bytes(size: int, char: str) -> None:
    head, tail = '{"event":"x","pad":"', '"}'
    count = max(0, (size - len(head) - len(tail)) // len(char.encode()))
    data = head + char * count + tail
    result = parse_twilio(data)
    if len(data.encode()) > tw.MAX_MESSAGE_BYTES:
        assert isinstance(result, MalformedMessage) and "larger than" in result.reason
    else:
        assert result == tw.UnknownEvent("x")


# --- 2. Realtime server events, both dialects ---------------------------------------------------------

REALTIME_EVENTS = typing.get_args(rt.ServerEvent)
GA, PREVIEW = rt.adapter_for(Dialect.GA), rt.adapter_for(Dialect.PREVIEW)
ERROR_CODES = sorted(rt.FATAL_ERROR_CODES) + [
    "response_cancel_not_active",
    "session_expired",
    "invalid_value",
    "rate_limit_exceeded",
]
OTHER_TYPES = sorted(rt._COMMON_OTHER | GA._known_other | PREVIEW._known_other)
REALTIME_KEYS = (
    "type", "event_id", "response_id", "item_id", "delta", "transcript", "audio_start_ms", "audio_end_ms",
    "response", "item", "error", "session", "id", "status", "status_details", "reason", "code", "message",
    "param", "expires_at", "audio", "input", "output", "format", "voice", "input_audio_format",
    "output_audio_format", "modalities",
)  # fmt: skip
ids = st.one_of(
    st.builds(
        lambda prefix, tail: prefix + tail,
        st.sampled_from(["resp_", "item_", "evt_", "sess_"]),
        st.text("ABCXYZabcxyz0123456789", min_size=1, max_size=12),
    ),
    st.text(max_size=8),
)
millis = st.integers(min_value=0, max_value=10**7)


def _ga_session(v: Leaves) -> dict[str, Any]:
    fmt = v.of(st.sampled_from([{"type": "audio/pcm", "rate": 24000}, {"type": "audio/pcmu"}, {}]))
    if isinstance(fmt, dict):
        fmt = {k: v(x) for k, x in fmt.items()}
    return {
        "type": v("realtime"),
        "id": v.of(ids),
        "expires_at": v.of(st.integers(min_value=0, max_value=2**40)),
        "audio": v(
            {
                "input": v({"format": fmt, "turn_detection": v({"type": "server_vad"})}),
                "output": v({"format": fmt, "voice": v.of(st.sampled_from(GA_VOICES))}),
            }
        ),
    }


def _preview_session(v: Leaves) -> dict[str, Any]:
    fmt = v.draw(st.sampled_from(["pcm16", "g711_ulaw", "g711_alaw"]))
    return {
        "id": v.of(ids),
        "expires_at": v.of(st.integers(min_value=0, max_value=2**40)),
        "modalities": v(["text", "audio"]),
        "voice": v.of(st.sampled_from(GA_VOICES)),
        "input_audio_format": v(fmt),
        "output_audio_format": v(fmt),
    }


REALTIME_KINDS = [
    "audio_delta", "audio_done", "transcript_delta", "transcript_done", "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped", "response.created", "response.done", "response.output_item.added",
    "conversation.item.input_audio_transcription.completed", "conversation.item.truncated", "error",
    "session.created", "session.updated", "other", "unknown",
]  # fmt: skip
"""What :func:`realtime_events` builds: the events the adapters parse (the dialect's names for the audio
and transcript ones), the known events they pass over, and unknown ones."""


@st.composite
def realtime_events(draw: st.DrawFn, *, awkward_too: bool = False) -> dict[str, Any]:
    """A server event of either dialect, as the service sends it; with ``awkward_too``, some of its fields
    replaced by awkward values (its ``type`` always kept)."""
    v = Leaves(draw, awkward_too=awkward_too)
    dialect = draw(st.sampled_from([GA, PREVIEW]))
    kind = draw(st.sampled_from(REALTIME_KINDS))
    event: dict[str, Any] = {"event_id": v.of(ids)}
    response_id, item_id = v.of(ids), v.of(ids)
    if kind == "audio_delta":
        event |= {"type": dialect._audio_delta, "response_id": response_id, "item_id": item_id}
        event |= {"output_index": v(0), "content_index": v(0), "delta": v.of(b64)}
    elif kind in ("audio_done", "transcript_delta", "transcript_done"):
        event |= {"type": getattr(dialect, "_" + kind), "response_id": response_id, "item_id": item_id}
        if kind == "transcript_delta":
            event["delta"] = v.of(st.text(max_size=30))
        elif kind == "transcript_done":
            event["transcript"] = v.of(st.text(max_size=30))
    elif kind == "input_audio_buffer.speech_started":
        event |= {"type": kind, "audio_start_ms": v.of(millis), "item_id": item_id}
    elif kind in ("input_audio_buffer.speech_stopped", "conversation.item.truncated"):
        event |= {"type": kind, "audio_end_ms": v.of(millis), "item_id": item_id, "content_index": v(0)}
    elif kind == "response.created":
        event |= {
            "type": kind,
            "response": v({"id": response_id, "status": v("in_progress"), "output": v([])}),
        }
    elif kind == "response.done":
        status = draw(st.sampled_from(["completed", "cancelled", "failed", "incomplete"]))
        reason = v.of(
            st.sampled_from(["turn_detected", "client_cancelled", "max_output_tokens", "content_filter"])
        )
        details = v(draw(st.none() | st.just({"type": v(status), "reason": reason})))
        response = {"id": response_id, "status": v(status), "status_details": details}
        event |= {"type": kind, "response": v(response)}
    elif kind == "response.output_item.added":
        item = v({"id": item_id, "type": v.of(st.sampled_from(["message", "function_call"]))})
        event |= {"type": kind, "response_id": response_id, "output_index": v(0), "item": item}
    elif kind == "conversation.item.input_audio_transcription.completed":
        event |= {"type": kind, "item_id": item_id, "content_index": v(0), "transcript": v.of(st.text())}
    elif kind == "error":
        error = {
            "type": v.of(st.sampled_from(["invalid_request_error", "server_error", "authentication_error"])),
            "code": v.of(st.sampled_from(ERROR_CODES) | st.none()),
            "message": v.of(st.text(max_size=40)),
            "param": v.of(st.none() | st.text(max_size=10)),
            "event_id": v.of(st.none() | ids),
        }
        event |= {"type": kind, "error": v(error)}
    elif kind in ("session.created", "session.updated"):
        session = _ga_session(v) if dialect is GA else _preview_session(v)
        event |= {"type": kind, "session": v(session)}
    elif kind == "other":
        event["type"] = draw(st.sampled_from(OTHER_TYPES))
    else:
        event["type"] = draw(st.text(max_size=30))
    return event


realtime_near_valid = realtime_events(awkward_too=True) | mutated(
    realtime_events(awkward_too=True), REALTIME_KEYS
)


@st.composite
def realtime_frames(draw: st.DrawFn, messages: st.SearchStrategy[Any]) -> str | bytes:
    """JSON of ``messages``, as text or as UTF-8 bytes (websockets hands over either)."""
    text = draw(as_json(messages))
    return text.encode("utf-8", "surrogatepass") if draw(st.booleans()) else text


def parse_realtime(adapter: rt.Adapter, data: str | bytes) -> rt.ServerEvent | Exception:
    """The property: a typed event, a MalformedMessage, or a DialectMismatch for a session.created."""
    try:
        event = adapter.parse(data)
    except MalformedMessage as exc:
        return checked_malformed(exc)
    except DialectMismatch as exc:
        mismatch = exc
    else:
        assert type(event) in REALTIME_EVENTS
        assert fully_typed(event)
        if isinstance(event, rt.ErrorEvent):
            assert {type(event.benign), type(event.fatal), type(event.session_lost)} == {bool}
        return event
    assert orjson.loads(data)["type"] == "session.created"
    assert "AZURE_OPENAI_API_VERSION" in str(mismatch)  # it says what to change
    return mismatch


@FAST
@given(arbitrary_frames(st.text(max_size=300)))
@example(b"\xff\xfe")
@example('{"type":"input_audio_buffer.speech_started","audio_start_ms":1e300,"item_id":"i"}')
def test_any_realtime_frame_is_an_event_or_a_malformed_message(data: str | bytes) -> None:
    for adapter in (GA, PREVIEW):
        assert parse_realtime(adapter, data) is not None


@settings(max_examples=800, deadline=None, database=None)
@given(realtime_frames(realtime_near_valid))
# Found by this test: a GA session.updated whose audio format type was not a string raised TypeError
# (unhashable type) in GAAdapter._session_updated.
@example('{"type":"session.updated","session":{"audio":{"input":{"format":{"type":[]}}}}}')
@example('{"type":"session.updated","session":{"audio":{"output":{"format":{"type":{}}}}}}')
# Found by this test: response.done's status_details.reason was passed through whatever its type.
@example('{"type":"response.done","response":{"id":"r","status_details":{"reason":[1]}}}')
def test_near_valid_realtime_events_are_an_event_or_a_typed_error(data: str | bytes) -> None:
    for adapter in (GA, PREVIEW):
        assert parse_realtime(adapter, data) is not None


@settings(max_examples=200, deadline=None, database=None)
@given(realtime_events(), st.sampled_from([GA, PREVIEW]))
def test_valid_realtime_events_of_either_dialect_parse_or_are_refused_plainly(
    message: dict[str, Any], adapter: rt.Adapter
) -> None:
    result = parse_realtime(adapter, orjson.dumps(message))
    # An event of the other dialect is never taken for one of this dialect's: it is unknown, or a mismatch.
    other = PREVIEW if adapter is GA else GA
    own_names = {
        adapter._audio_delta,
        adapter._audio_done,
        adapter._transcript_delta,
        adapter._transcript_done,
    }
    other_names = {other._audio_delta, other._audio_done, other._transcript_delta, other._transcript_done}
    if message["type"] in other_names:
        assert result == rt.UnknownEvent(message["type"])
    elif message["type"] in own_names or message["type"] in rt._COMMON_OTHER:
        assert isinstance(result, REALTIME_EVENTS) and not isinstance(result, rt.UnknownEvent)
    if message["type"] == "session.created" and not isinstance(result, DialectMismatch):
        assert result == rt.SessionCreated(message["session"]["id"], message["session"]["expires_at"])


# --- 3. The admin profile form and profile validation -------------------------------------------------

FORM_SAMPLES = [
    "", " ", "0", "-1", "1e999", "-1e999", "nan", "inf", "0.5", "0.1234567", "1_000", "٣", "²", "0x10",
    "9" * 5000, " 12 ", "\x00", "EN", "de", "alloy", "marin", "server_vad", "semantic_vad", "off", "pcm16",
    "g711_ulaw", "+14155550123", "+14155550123\n+14155550123", "+1 (415) 555-0123; +4930123456",
    *EAGERNESS, *NOISE_REDUCTION, "x" * 20_001,
]  # fmt: skip
FORM_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zl", "Zp", "Zs", "Nd", "No"]), max_size=20),
    st.sampled_from(FORM_SAMPLES),
)
FORM_VALUES = st.one_of(FORM_TEXT, st.binary(max_size=10), st.integers(), st.none())
"""What a POSTed field may hold: text, or (for a multipart POST) a file, or anything else."""


@st.composite
def forms(draw: st.DrawFn) -> dict[str, Any]:
    """A POSTed form: the form as shown for the default profile with fields changed, dropped and added,
    or any mapping of field names at all."""
    if draw(st.booleans()):
        keys = st.sampled_from(TEXT_FIELDS + CHECKBOXES) | st.text(max_size=10)
        return draw(st.dictionaries(keys, FORM_VALUES, max_size=12))
    form = posted(values_from_profile(DEFAULT_PROFILE)) | {"name": "fuzz"}
    changes = draw(st.dictionaries(st.sampled_from(TEXT_FIELDS + CHECKBOXES), FORM_VALUES, max_size=5))
    dropped = draw(st.sets(st.sampled_from(TEXT_FIELDS + CHECKBOXES), max_size=3))
    extra = draw(st.dictionaries(st.text(max_size=10), FORM_VALUES, max_size=2))
    return {k: v for k, v in (form | changes).items() if k not in dropped} | extra


def posted(values: Mapping[str, Any]) -> dict[str, Any]:
    """What a browser POSTs for the form showing ``values``: an unchecked box is left out."""
    return {k: v for k, v in values.items() if v is not False}


def validate_form(form: Mapping[str, Any], dialect: Dialect) -> tuple[Profile | None, dict[str, str]]:
    """What the admin's profile pages do with a POSTed form (``bridge.admin.views._validate``)."""
    values = values_from_form(form)
    assert set(values) == set(TEXT_FIELDS) | set(CHECKBOXES)
    assert all(isinstance(values[k], str) for k in TEXT_FIELDS)
    assert all(isinstance(values[k], bool) for k in CHECKBOXES)
    data, problems = mapping_from_values(values)
    try:
        profile = profile_from_mapping(data, dialect=dialect)
    except ProfileError as exc:
        return None, form_errors(problems | checked_problems(exc).problems)
    assert isinstance(profile, Profile) and fully_typed(profile)
    return (None if problems else profile), form_errors(problems)


@settings(max_examples=300, deadline=None, database=None)
@given(forms(), st.sampled_from([Dialect.GA, Dialect.PREVIEW]))
@example({"max_call_minutes": "9" * 5000, "threshold": "1e999", "prefix_padding_ms": "٣"}, Dialect.GA)
@example(posted(values_from_profile(DEFAULT_PROFILE)) | {"name": "n", "threshold": "0.1234567"}, Dialect.GA)
def test_any_form_gives_a_profile_or_problems_next_to_its_inputs(
    form: dict[str, Any], dialect: Dialect
) -> None:
    profile, errors = validate_form(form, dialect)
    assert (profile is None) == bool(errors)
    for field, message in errors.items():
        assert field in FORM_LABELS, field  # every problem is shown next to an input that exists
        assert isinstance(message, str) and message.strip()
    if profile is not None:
        # Shown again in the form and saved unchanged, a valid profile stays the same profile (but for the
        # threshold, which the form shows to 6 significant digits).
        again, errors = validate_form(posted(values_from_profile(profile)), dialect)
        turn = profile.turn_detection
        shown = dataclasses.replace(turn, threshold=float(f"{turn.threshold:g}"))
        assert errors == {} and again == dataclasses.replace(profile, turn_detection=shown)


PROFILE_KEYS = tuple(profile_to_mapping(DEFAULT_PROFILE)) + ("type", "threshold", "model", "eagerness")


def check_profile_outcome(data: Any, dialect: Dialect = Dialect.GA) -> Profile | ProfileError:
    try:
        profile = profile_from_mapping(data, dialect=dialect)
    except ProfileError as exc:
        return checked_problems(exc)
    assert fully_typed(profile)
    return profile


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.one_of(
        st.dictionaries(st.sampled_from(PROFILE_KEYS) | st.text(max_size=10), awkward, max_size=8),
        mutated(st.builds(lambda: profile_to_mapping(DEFAULT_PROFILE)), PROFILE_KEYS),
    ),
    st.sampled_from([Dialect.GA, Dialect.PREVIEW]),
)
@example({"audio_path": []}, Dialect.GA)
@example({"turn_detection": {"threshold": float("nan")}}, Dialect.GA)
def test_any_profile_data_is_a_profile_or_a_profile_error(data: dict[str, Any], dialect: Dialect) -> None:
    result = check_profile_outcome(data, dialect)
    if isinstance(result, Profile):
        assert check_profile_outcome(profile_to_mapping(result), dialect) == result


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.one_of(st.text(max_size=200), as_json(json_values), as_json(st.builds(dict))),
    st.sampled_from(["profile.toml", "profile.json", "PROFILE.JSON"]),
)
# Found while writing this test: a deeply nested document raised RecursionError, not ConfigError.
@example("[" * (sys.getrecursionlimit() + 10), "profile.json")
@example("a = " + "[" * (sys.getrecursionlimit() + 10), "profile.toml")
@example("voice = " + "1" * 5000, "profile.toml")
def test_any_profile_file_is_a_profile_or_a_config_error(text: str, filename: str) -> None:
    try:
        profile = parse_profile(text, filename=filename)
    except ConfigError as exc:
        error: ConfigError = exc
    else:
        assert fully_typed(profile)
        return
    assert str(error).startswith(f"BRIDGE_PROFILE {filename!r}"), str(error)  # it names the file
    if isinstance(error, ProfileError):
        checked_problems(error)


def test_the_type_check_itself_catches_a_wrong_value() -> None:
    # The properties above lean on fully_typed(): make sure it does refuse a mistyped field.
    with pytest.raises(AssertionError, match="reason"):
        fully_typed(rt.ResponseDone("r", "completed", [1]))  # type: ignore[arg-type]
    assert conforms(AudioPath.PCM16, AudioPath | None)
    assert not conforms(True, float)


# --- 4. Never a dropped call: malformed frames inside live calls --------------------------------------

FRAME = b"\xff" * 160


def skipped(frame: str | bytes) -> bool:
    """The bridge skips this frame (malformed, or an event it does not know) rather than acting on it."""
    try:
        return type(tw.parse_message(frame)) is tw.UnknownEvent
    except MalformedMessage:
        return True


clean_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=200)  # what a socket can carry
junk_frames = st.one_of(
    clean_text,
    st.binary(max_size=200),
    twilio_near_valid.map(json.dumps),
    json_values.map(json.dumps),
).filter(skipped)


@pytest.fixture
async def served(model: LocalModel, start_bridge: Any) -> Bridge:
    bridge: Bridge = await start_bridge(model, profile=Profile(greeting=""))
    return bridge


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(junk=st.lists(junk_frames, min_size=1, max_size=6))
async def test_malformed_frames_in_a_live_call_are_skipped_and_the_call_goes_on(
    model: LocalModel, served: Bridge, junk: list[str | bytes]
) -> None:
    # One bridge for all examples, a new call for each.
    metrics, registry = served.app[METRICS], served.app[REGISTRY]
    malformed_before, frames_before = metrics.malformed.get("twilio"), metrics.frames_in.get()
    expected_malformed = sum(1 for frame in junk if isinstance(parse_twilio(frame), MalformedMessage))
    connections = len(model.connections)
    async with TwilioCaller(served.url, auth_token=AUTH_TOKEN) as call:
        await call.dial()
        conn = await model.wait_for_connection(connections + 1)
        for frame in junk:
            await call.speak(FRAME, realtime=False)
            await call.send_raw(frame)
        await call.speak(FRAME * 3, realtime=False)
        # Frames are read in order: once the last audio frame is counted, every junk frame was handled.
        await settle(
            lambda: call.closed.is_set() or metrics.frames_in.get() - frames_before >= call.frames_sent
        )
        assert not call.closed.is_set(), f"the call was dropped (close code {call.close_code})"
        assert metrics.malformed.get("twilio") - malformed_before == expected_malformed
        await settle(lambda: "input_audio_buffer.append" in conn.received_types())  # audio still flows
        assert not call.closed.is_set()  # and the call is still up
        assert call.violations == []
        await call.hang_up()
    await settle(lambda: call.call_sid in registry.outcomes)
    assert registry.outcomes[call.call_sid].reason is EndReason.CALLER_HUNG_UP

"""Realtime events and the two dialect adapters (docs/protocols.md §2).

The Azure OpenAI Realtime API speaks two dialects: **GA** (``/openai/v1/realtime``, nested ``audio``
session, ``response.output_audio.*``) and **preview** (``/openai/realtime?api-version=…``, flat session,
``response.audio.*``). One :class:`Adapter` per dialect turns wire events into the same frozen, typed
events and typed client commands into wire JSON; nothing outside this module knows which dialect is in
use.

Each adapter accepts only its own dialect's event names: a GA adapter fed preview events would otherwise
sit silent (docs/protocols.md §5.9). ``session.created`` is checked for the dialect's shape, so a deployment
that speaks the other dialect is reported at the start of the first call, in plain words.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from itertools import count
from typing import Any

import orjson
import pybase64

from bridge.config import AudioPath, Dialect
from bridge.errors import DialectMismatch, MalformedMessage
from bridge.prompts import Profile, Transcription
from bridge.realtime_events import (
    FATAL_ERROR_CODES,
    AddTextItem,
    AppendAudio,
    AssistantTranscript,
    AssistantTranscriptDelta,
    AudioDelta,
    AudioDone,
    CallerTranscript,
    CancelResponse,
    ClientCommand,
    CreateResponse,
    DeleteItem,
    ErrorEvent,
    ItemTruncated,
    OtherEvent,
    OutputItemAdded,
    ResponseCreated,
    ResponseDone,
    ServerEvent,
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TruncateItem,
    UnknownEvent,
    UpdateSession,
)

__all__ = [
    "DEFAULT_TRANSCRIPTION",
    "FATAL_ERROR_CODES",
    "GA_FORMATS",
    "PREVIEW_FORMATS",
    "Adapter",
    "AddTextItem",
    "AppendAudio",
    "AssistantTranscript",
    "AssistantTranscriptDelta",
    "AudioDelta",
    "AudioDone",
    "CallerTranscript",
    "CancelResponse",
    "ClientCommand",
    "CreateResponse",
    "DeleteItem",
    "ErrorEvent",
    "GAAdapter",
    "ItemTruncated",
    "OtherEvent",
    "OutputItemAdded",
    "PreviewAdapter",
    "ResponseCreated",
    "ResponseDone",
    "ServerEvent",
    "SessionCreated",
    "SessionUpdated",
    "SpeechStarted",
    "SpeechStopped",
    "TruncateItem",
    "UnknownEvent",
    "UpdateSession",
    "adapter_for",
    "turn_detection_wire",
]

# --- shared helpers -------------------------------------------------------------------------------


def _str(d: dict[str, Any], key: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise MalformedMessage(f"{d.get('type', 'event')}.{key} is missing or not text")
    return value


def _int(d: dict[str, Any], key: str) -> int:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedMessage(f"{d.get('type', 'event')}.{key} is missing or not a number")
    return int(value)


def _obj(d: dict[str, Any], key: str) -> dict[str, Any]:
    value = d.get(key)
    if not isinstance(value, dict):
        raise MalformedMessage(f"{d.get('type', 'event')}.{key} is missing or not an object")
    return value


def turn_detection_wire(profile: Profile) -> dict[str, Any]:
    """The ``turn_detection`` object, the same in both dialects (only its place differs)."""
    td = profile.turn_detection
    if td.type == "semantic_vad":
        return {
            "type": "semantic_vad",
            "eagerness": td.eagerness,
            "create_response": td.create_response,
            "interrupt_response": td.interrupt_response,
        }
    return {
        "type": "server_vad",
        "threshold": td.threshold,
        "prefix_padding_ms": td.prefix_padding_ms,
        "silence_duration_ms": td.silence_duration_ms,
        "create_response": td.create_response,
        "interrupt_response": td.interrupt_response,
    }


DEFAULT_TRANSCRIPTION = Transcription()
"""Used when a profile asks for none: the caller's words are what a new session is told of the call
(``bridge.conversation``), so every session transcribes them."""


def _transcription_wire(profile: Profile) -> dict[str, Any]:
    transcription = profile.transcription or DEFAULT_TRANSCRIPTION
    out: dict[str, Any] = {"model": transcription.model}
    if transcription.language:
        out["language"] = transcription.language
    return out


class Adapter(ABC):
    """Base of the dialect adapters: parse server events, serialize client commands."""

    dialect: Dialect
    _audio_delta = ""
    _audio_done = ""
    _transcript_done = ""
    _transcript_delta = ""
    _known_other: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self._ids = count(1)
        self._append_prefix = '{"type":"input_audio_buffer.append","audio":"'

    # -- client side

    def _event_id(self) -> str:
        return f"evt_bridge_{next(self._ids)}"

    def serialize(self, command: ClientCommand) -> str:
        """The wire JSON of one client command."""
        if isinstance(command, AppendAudio):
            # The hot path: a template is several times cheaper than building and dumping a dict.
            return self._append_prefix + pybase64.b64encode(command.audio).decode("ascii") + '"}'
        return orjson.dumps(self.client_event(command)).decode()

    def client_event(self, command: ClientCommand) -> dict[str, Any]:
        """The client event of one command, as a dict (for recordings and tests)."""
        event: dict[str, Any]
        if isinstance(command, AppendAudio):
            event = {"type": "input_audio_buffer.append", "audio": pybase64.b64encode(command.audio).decode()}
        elif isinstance(command, UpdateSession):
            event = {
                "type": "session.update",
                "session": self.session_config(command.profile, command.audio_path),
            }
        elif isinstance(command, CreateResponse):
            event = {"type": "response.create"}
            if command.instructions is not None:
                event["response"] = {"instructions": command.instructions}
        elif isinstance(command, CancelResponse):
            event = {"type": "response.cancel", "response_id": command.response_id}
        elif isinstance(command, TruncateItem):
            event = {
                "type": "conversation.item.truncate",
                "item_id": command.item_id,
                "content_index": 0,
                "audio_end_ms": command.audio_end_ms,
            }
        elif isinstance(command, DeleteItem):
            event = {"type": "conversation.item.delete", "item_id": command.item_id}
        else:
            item = self._text_item(command.role, command.text)
            if command.item_id is not None:
                item = {"id": command.item_id, **item}
            event = {"type": "conversation.item.create", "item": item}
        event["event_id"] = self._event_id()
        return event

    _assistant_text = "text"

    def _text_item(self, role: str, text: str) -> dict[str, Any]:
        kind = "input_text" if role in ("user", "system") else self._assistant_text
        return {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}

    @abstractmethod
    def session_config(self, profile: Profile, audio_path: AudioPath) -> dict[str, Any]:
        """The ``session`` object of ``session.update`` in this dialect."""

    @abstractmethod
    def check_session_shape(self, session: dict[str, Any]) -> str | None:
        """Why ``session.created``'s session is not of this dialect, or ``None`` when it is."""

    # -- server side

    def parse(self, data: str | bytes) -> ServerEvent:
        """Parse one server message; raise :class:`MalformedMessage` when it is not a usable event, and
        :class:`~bridge.errors.DialectMismatch` when the service speaks the other dialect."""
        try:
            d = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise MalformedMessage(f"not JSON: {exc}") from None
        if not isinstance(d, dict):
            raise MalformedMessage("not a JSON object")
        kind = d.get("type")
        if not isinstance(kind, str):
            raise MalformedMessage("event without a type")
        if kind == self._audio_delta:
            try:
                audio = pybase64.b64decode(_str(d, "delta"), validate=True)
            except ValueError:
                raise MalformedMessage(f"{kind}.delta is not valid base64") from None
            return AudioDelta(_str(d, "response_id"), _str(d, "item_id"), audio)
        if kind == "input_audio_buffer.speech_started":
            return SpeechStarted(_int(d, "audio_start_ms"), _str(d, "item_id"))
        if kind == "input_audio_buffer.speech_stopped":
            return SpeechStopped(_int(d, "audio_end_ms"), _str(d, "item_id"))
        if kind == "response.created":
            return ResponseCreated(_str(_obj(d, "response"), "id"))
        if kind == "response.done":
            response = _obj(d, "response")
            details = response.get("status_details")
            reason = _opt(details.get("reason")) if isinstance(details, dict) else None
            return ResponseDone(_str(response, "id"), str(response.get("status", "")), reason)
        if kind == "response.output_item.added":
            item = _obj(d, "item")
            return OutputItemAdded(_str(d, "response_id"), _str(item, "id"), str(item.get("type", "")))
        if kind == self._audio_done:
            return AudioDone(_str(d, "response_id"), _str(d, "item_id"))
        if kind == self._transcript_delta:
            return AssistantTranscriptDelta(_str(d, "response_id"), _str(d, "item_id"), _str(d, "delta"))
        if kind == self._transcript_done:
            return AssistantTranscript(_str(d, "response_id"), _str(d, "item_id"), _str(d, "transcript"))
        if kind == "conversation.item.input_audio_transcription.completed":
            return CallerTranscript(_str(d, "item_id"), _str(d, "transcript"))
        if kind == "conversation.item.truncated":
            return ItemTruncated(_str(d, "item_id"), _int(d, "audio_end_ms"))
        if kind == "error":
            err = _obj(d, "error")
            return ErrorEvent(
                code=_opt(err.get("code")),
                message=str(err.get("message", "")),
                error_type=_opt(err.get("type")),
                param=_opt(err.get("param")),
                event_id=_opt(err.get("event_id")),
            )
        if kind == "session.created":
            session = _obj(d, "session")
            problem = self.check_session_shape(session)
            if problem:
                raise DialectMismatch(problem)
            expires = session.get("expires_at")
            return SessionCreated(str(session.get("id", "")), expires if isinstance(expires, int) else None)
        if kind == "session.updated":
            return self._session_updated(_obj(d, "session"))
        if kind in self._known_other or kind in _COMMON_OTHER:
            return OtherEvent(kind)
        return UnknownEvent(kind)

    @abstractmethod
    def _session_updated(self, session: dict[str, Any]) -> SessionUpdated:
        """The typed ``session.updated`` of this dialect's session shape."""


def _opt(value: Any) -> str | None:
    return value if isinstance(value, str) else None


_COMMON_OTHER = frozenset(
    {
        "input_audio_buffer.committed",
        "input_audio_buffer.cleared",
        "conversation.item.created",
        "conversation.item.deleted",
        "conversation.item.retrieved",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.failed",
        "response.output_item.done",
        "response.content_part.added",
        "response.content_part.done",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "rate_limits.updated",
    }
)

GA_FORMATS = {
    AudioPath.PCM16: {"type": "audio/pcm", "rate": 24000},
    AudioPath.G711_ULAW: {"type": "audio/pcmu"},
}
PREVIEW_FORMATS = {AudioPath.PCM16: "pcm16", AudioPath.G711_ULAW: "g711_ulaw"}


class GAAdapter(Adapter):
    """The GA dialect (``/openai/v1/realtime``), the default."""

    dialect = Dialect.GA
    _assistant_text = "output_text"  # GA renamed assistant content parts (docs/protocols.md §2.7)
    _audio_delta = "response.output_audio.delta"
    _audio_done = "response.output_audio.done"
    _transcript_done = "response.output_audio_transcript.done"
    _transcript_delta = "response.output_audio_transcript.delta"
    _known_other = frozenset(
        {
            "conversation.item.added",
            "conversation.item.done",
            "conversation.item.input_audio_transcription.segment",
            "input_audio_buffer.timeout_triggered",
            "response.output_text.delta",
            "response.output_text.done",
        }
    )

    def session_config(self, profile: Profile, audio_path: AudioPath) -> dict[str, Any]:
        """A GA ``session``: ``type`` is required, audio settings nest under ``audio`` (§2.7)."""
        fmt = GA_FORMATS[audio_path]
        return {
            "type": "realtime",
            "instructions": profile.effective_instructions(),
            "max_output_tokens": profile.max_response_tokens or "inf",
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": fmt,
                    "noise_reduction": {"type": profile.noise_reduction} if profile.noise_reduction else None,
                    "transcription": _transcription_wire(profile),
                    "turn_detection": turn_detection_wire(profile),
                },
                "output": {"format": fmt, "voice": profile.voice},
            },
        }

    def check_session_shape(self, session: dict[str, Any]) -> str | None:
        """GA sessions carry ``type: realtime`` and an ``audio`` object (§2.8)."""
        if session.get("type") == "realtime" or isinstance(session.get("audio"), dict):
            return None
        return (
            "the Realtime service answered in the preview dialect but the bridge speaks GA: "
            "set AZURE_OPENAI_API_VERSION (e.g. 2025-04-01-preview) or use a GA deployment"
        )

    def _session_updated(self, session: dict[str, Any]) -> SessionUpdated:
        audio = session.get("audio") if isinstance(session.get("audio"), dict) else {}
        assert isinstance(audio, dict)
        inp = audio.get("input") or {}
        out = audio.get("output") or {}

        def fmt(part: Any) -> str | None:
            if isinstance(part, dict) and isinstance(part.get("format"), dict):
                kind = part["format"].get("type")
                if not isinstance(kind, str):  # a list or an object is not a key: no TypeError
                    return None
                return {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}.get(kind)
            return None

        voice = out.get("voice") if isinstance(out, dict) else None
        return SessionUpdated(str(session.get("id", "")), _opt(voice), fmt(inp), fmt(out))


class PreviewAdapter(Adapter):
    """The preview dialect (``/openai/realtime?api-version=…``), chosen when an api-version is set."""

    dialect = Dialect.PREVIEW
    _audio_delta = "response.audio.delta"
    _audio_done = "response.audio.done"
    _transcript_done = "response.audio_transcript.done"
    _transcript_delta = "response.audio_transcript.delta"
    _known_other = frozenset({"response.text.delta", "response.text.done", "response.cancelled"})

    def session_config(self, profile: Profile, audio_path: AudioPath) -> dict[str, Any]:
        """A flat preview ``session`` (§2.2)."""
        fmt = PREVIEW_FORMATS[audio_path]
        return {
            "modalities": ["text", "audio"],
            "instructions": profile.effective_instructions(),
            "max_response_output_tokens": profile.max_response_tokens or "inf",
            "voice": profile.voice,
            "input_audio_format": fmt,
            "output_audio_format": fmt,
            "input_audio_noise_reduction": (
                {"type": profile.noise_reduction} if profile.noise_reduction else None
            ),
            "input_audio_transcription": _transcription_wire(profile),
            "turn_detection": turn_detection_wire(profile),
        }

    def check_session_shape(self, session: dict[str, Any]) -> str | None:
        """Preview sessions are flat: ``modalities`` and ``input_audio_format``, no ``audio`` (§2.8)."""
        if session.get("type") == "realtime" or isinstance(session.get("audio"), dict):
            return (
                "the Realtime service answered in the GA dialect but the bridge speaks preview: "
                "unset AZURE_OPENAI_API_VERSION to use GA"
            )
        return None

    def _session_updated(self, session: dict[str, Any]) -> SessionUpdated:
        return SessionUpdated(
            str(session.get("id", "")),
            _opt(session.get("voice")),
            _opt(session.get("input_audio_format")),
            _opt(session.get("output_audio_format")),
        )


def adapter_for(dialect: Dialect) -> Adapter:
    """A fresh adapter for one connection in ``dialect``."""
    return GAAdapter() if dialect is Dialect.GA else PreviewAdapter()

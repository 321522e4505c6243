"""The typed Realtime events and client commands: what :mod:`bridge.realtime`'s dialect adapters parse
server messages into and serialize client commands from (docs/protocols.md §2). Frozen values, no I/O;
``realtime.py`` re-exports every name, so code reads them as ``rt.AudioDelta`` and the like."""

from __future__ import annotations

from dataclasses import dataclass

from bridge.config import AudioPath
from bridge.prompts import Profile

# --- server events (Realtime → bridge) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionCreated:
    """``session.created``: the first event of every connection."""

    session_id: str
    expires_at: int | None


@dataclass(frozen=True, slots=True)
class SessionUpdated:
    """``session.updated``: our ``session.update`` took effect."""

    session_id: str
    voice: str | None
    input_format: str | None
    output_format: str | None


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """``input_audio_buffer.speech_started``: the barge-in trigger."""

    audio_start_ms: int
    item_id: str


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """``input_audio_buffer.speech_stopped``."""

    audio_end_ms: int
    item_id: str


@dataclass(frozen=True, slots=True)
class ResponseCreated:
    """``response.created``: a response is now active."""

    response_id: str


@dataclass(frozen=True, slots=True)
class ResponseDone:
    """``response.done``: always sent, whether the response completed, was cancelled or failed."""

    response_id: str
    status: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class OutputItemAdded:
    """``response.output_item.added``: a message (or function call) item of a response."""

    response_id: str
    item_id: str
    item_type: str


@dataclass(frozen=True, slots=True)
class AudioDelta:
    """``response.output_audio.delta`` (GA) / ``response.audio.delta`` (preview), decoded."""

    response_id: str
    item_id: str
    audio: bytes


@dataclass(frozen=True, slots=True)
class AudioDone:
    """``response.output_audio.done`` / ``response.audio.done``: no more audio for this item."""

    response_id: str
    item_id: str


@dataclass(frozen=True, slots=True)
class AssistantTranscript:
    """``response.output_audio_transcript.done`` / ``response.audio_transcript.done``."""

    response_id: str
    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class AssistantTranscriptDelta:
    """``response.output_audio_transcript.delta`` / ``response.audio_transcript.delta``: what the model is
    saying, as it says it (what a new session is told of an answer cut off by a drop)."""

    response_id: str
    item_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class CallerTranscript:
    """``conversation.item.input_audio_transcription.completed``: what the caller said."""

    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class ItemTruncated:
    """``conversation.item.truncated``: the server cut an assistant item where we told it."""

    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """``error``: most are recoverable; :attr:`benign` ones are expected in normal operation."""

    code: str | None
    message: str
    error_type: str | None
    param: str | None
    event_id: str | None

    @property
    def benign(self) -> bool:
        """``response_cancel_not_active``: our cancel raced the server's own (docs/protocols.md §5.2)."""
        return self.code == "response_cancel_not_active"

    @property
    def fatal(self) -> bool:
        """The service will not serve this call on any session: a bad key, no quota, a policy refusal.
        Retrying cannot help; the caller hears the profile's fallback message."""
        return self.code in FATAL_ERROR_CODES

    @property
    def session_lost(self) -> bool:
        """The session is ending or broken (``session_expired`` at the cap, a ``server_error``): the bridge
        moves the call to a new session."""
        return self.code == "session_expired" or self.error_type == "server_error"


FATAL_ERROR_CODES = frozenset(
    {
        "invalid_api_key",
        "insufficient_quota",
        "account_deactivated",
        "billing_hard_limit_reached",
        "billing_not_active",
        "unauthorized",
        "access_denied",
        "content_policy_violation",
        "DeploymentNotFound",
        "model_not_found",
    }
)
"""``error`` codes after which no session will serve the call (docs/protocols.md §2.4)."""


@dataclass(frozen=True, slots=True)
class OtherEvent:
    """A known event the bridge does not act on (``rate_limits.updated``, ``conversation.item.*``…)."""

    type: str


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event type this dialect does not define: an explicit value, logged once per type."""

    type: str


ServerEvent = (
    SessionCreated
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | ResponseCreated
    | ResponseDone
    | OutputItemAdded
    | AudioDelta
    | AudioDone
    | AssistantTranscript
    | AssistantTranscriptDelta
    | CallerTranscript
    | ItemTruncated
    | ErrorEvent
    | OtherEvent
    | UnknownEvent
)

# --- client commands (bridge → Realtime) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpdateSession:
    """``session.update`` built from a prompt profile."""

    profile: Profile
    audio_path: AudioPath


@dataclass(frozen=True, slots=True)
class AppendAudio:
    """``input_audio_buffer.append`` with audio in the session's input format."""

    audio: bytes


@dataclass(frozen=True, slots=True)
class CreateResponse:
    """``response.create``, optionally with instructions for this response only (the greeting)."""

    instructions: str | None = None


@dataclass(frozen=True, slots=True)
class CancelResponse:
    """``response.cancel`` for one response."""

    response_id: str


@dataclass(frozen=True, slots=True)
class TruncateItem:
    """``conversation.item.truncate``: the caller heard only ``audio_end_ms`` of this item."""

    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class DeleteItem:
    """``conversation.item.delete``: an assistant item the caller never heard."""

    item_id: str


@dataclass(frozen=True, slots=True)
class AddTextItem:
    """``conversation.item.create`` with a text message (a DTMF digit, a note for the model, a turn carried
    into a new session); ``item_id``: the id the bridge gives the item, when it must refer to it later."""

    role: str
    text: str
    item_id: str | None = None


ClientCommand = (
    UpdateSession | AppendAudio | CreateResponse | CancelResponse | TruncateItem | DeleteItem | AddTextItem
)

"""Conversation items and responses of the local Realtime model (:mod:`bridge.local_model`), and their JSON.

The state a connection keeps about its conversation, without its socket or its timing: the items (user
audio, assistant answers, function calls) and what ``conversation.item.create`` and ``.truncate`` do to
them, the responses and what they say (the echo test's content), and the JSON objects the server sends
about both (``realtime.item``, ``realtime.response``, the usage).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bridge.local_model.audio import BEEP, GREETING, GREETING_TEXT, Pcm, encode, resample
from bridge.local_model.names import BYTES_PER_MS, GA_FORMAT_JSON, RATES
from bridge.local_model.validation import (
    InvalidEvent,
    bad_type,
    choice_field,
    object_field,
    required_field,
    string_field,
)

# --- conversation items ------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class ConversationItem:
    """An item of the conversation: a message (user, assistant or system), a function call or its output."""

    id: str
    role: str
    kind: str = "message"
    status: str = "completed"
    content: list[dict[str, Any]] = field(default_factory=list)
    pcm: Pcm | None = None
    """Caller audio of a user item, at ``rate``; kept for the latest user item only (the echo)."""
    rate: int = 24000
    seconds: float = 0.0
    """Duration of a user item's audio."""
    audio: bytearray = field(default_factory=bytearray)
    """Assistant audio actually sent in deltas, in ``audio_format``."""
    audio_format: str = "pcm16"
    transcript: str = ""
    text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def audio_ms(self) -> float:
        return len(self.audio) / BYTES_PER_MS[self.audio_format]


@dataclass(slots=True, eq=False)
class ModelResponse:
    """A response under way: its assistant item, what it will say, and how its task is told to stop."""

    id: str
    item: ConversationItem
    text_only: bool
    audio: bytes
    text: str
    in_conversation: bool
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str | None = None
    task: asyncio.Task[None] | None = None


def item_json(item: ConversationItem) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": item.id,
        "object": "realtime.item",
        "type": item.kind,
        "status": item.status,
    }
    if item.kind == "message":
        out["role"] = item.role
        out["content"] = [dict(part) for part in item.content]
        if item.role == "assistant" and out["content"] and "transcript" in out["content"][0]:
            out["content"][0]["transcript"] = item.transcript
    return out | item.extra


def new_item(
    event: dict[str, Any], names: dict[str, str], existing: Container[str], new_id: Callable[[], str]
) -> ConversationItem:
    """The item a ``conversation.item.create`` adds (``existing``: the ids in the conversation)."""
    raw = object_field(required_field(event, "item"), "item")
    kind = choice_field(
        raw.get("type", "message"), ("message", "function_call", "function_call_output"), "item.type"
    )
    item_id = raw.get("id") or new_id()
    if not isinstance(item_id, str) or item_id in existing:
        raise InvalidEvent("invalid_value", f"Item with id {item_id!r} already exists.", "item.id")
    previous = event.get("previous_item_id")
    if previous not in (None, "root") and previous not in existing:
        raise InvalidEvent(
            "invalid_value", f"Previous item with id {previous!r} not found.", "previous_item_id"
        )
    if kind != "message":
        fields = ("call_id", "name", "arguments", "output")
        object_field(raw, "item", ("id", "type", "object", "status", *fields))
        string_field(required_field(raw, "call_id", "item.call_id"), "item.call_id")
        return ConversationItem(item_id, "", kind=kind, extra={k: raw[k] for k in fields if k in raw})
    object_field(raw, "item", ("id", "type", "object", "status", "role", "content"))
    role = choice_field(
        required_field(raw, "role", "item.role"), ("user", "assistant", "system"), "item.role"
    )
    content = required_field(raw, "content", "item.content")
    if not isinstance(content, list):
        raise bad_type("item.content", "an array", content)
    allowed = {
        "user": ("input_text", "input_audio"),
        "system": ("input_text",),
        "assistant": (names["text part"], names["audio part"]),
    }[role]
    text: str | None = None
    transcript = ""
    for i, part in enumerate(content):
        p = f"item.content[{i}]"
        if choice_field(object_field(part, p).get("type"), allowed, f"{p}.type").endswith("text"):
            text = string_field(required_field(part, "text", f"{p}.text"), f"{p}.text")
        elif part.get("transcript") is not None:
            transcript = string_field(part["transcript"], f"{p}.transcript")
    item = ConversationItem(item_id, role, content=list(content), text=text)
    item.transcript = (transcript or text or "") if role == "assistant" else ""
    return item


def truncate_item(item: ConversationItem, index: int, end_ms: int) -> None:
    """Cut an assistant item's audio at ``end_ms`` and forget its words (``conversation.item.truncate``), or
    raise :class:`InvalidEvent` as the service would."""
    if item.role != "assistant" or item.kind != "message":
        raise InvalidEvent("invalid_value", "Only assistant messages can be truncated.", "item_id")
    if index != 0 or not item.content:
        raise InvalidEvent("invalid_value", f"Item '{item.id}' has no content part {index}.", "content_index")
    if end_ms > item.audio_ms:
        raise InvalidEvent(
            "invalid_value",
            f"Audio content of {int(item.audio_ms)}ms is already shorter than {end_ms}ms",
            "audio_end_ms",
        )
    del item.audio[end_ms * BYTES_PER_MS[item.audio_format] :]
    item.transcript = ""  # the service forgets the words, heard or not


# --- responses ---------------------------------------------------------------------------------------------


RATE_LIMITS: tuple[dict[str, Any], ...] = (
    {"name": "requests", "limit": 1000, "remaining": 999, "reset_seconds": 0.06},
    {"name": "tokens", "limit": 100_000, "remaining": 95_000, "reset_seconds": 3.0},
)
"""What ``rate_limits.updated`` says at the start of every response."""


def _echo_content(fmt: str, last: ConversationItem | None) -> tuple[bytes, str]:
    """What the echo test says, given the last user item: the greeting, or a beep and the caller's words."""
    rate = RATES[fmt]
    if last is not None and last.pcm is not None:
        pcm = np.concatenate([resample(BEEP, 24000, rate), resample(last.pcm, last.rate, rate)])
        return encode(fmt, pcm), f"You said: ({len(last.pcm) / last.rate:.1f} s of audio)"
    text = GREETING_TEXT if last is None else f"You said: {last.text or ''}"
    return encode(fmt, resample(GREETING, 24000, rate)), text


def new_response(
    response_id: str,
    item_id: str,
    fmt: str,
    text_only: bool,
    in_conversation: bool,
    names: dict[str, str],
    last: ConversationItem | None,
) -> ModelResponse:
    """A response that starts now, with its assistant item in progress: the echo of ``last`` (the last user
    item) in ``fmt``, or only its words when ``text_only``."""
    audio, text = _echo_content(fmt, last)
    part: dict[str, Any] = (
        {"type": names["text part"], "text": ""}
        if text_only
        else {"type": names["audio part"], "transcript": ""}
    )
    item = ConversationItem(item_id, "assistant", status="in_progress", content=[part], audio_format=fmt)
    return ModelResponse(response_id, item, text_only, b"" if text_only else audio, text, in_conversation)


def response_json(
    r: ModelResponse,
    status: str,
    details: dict[str, Any] | None,
    dialect: str,
    voice: str,
    session: dict[str, Any],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "object": "realtime.response",
        "id": r.id,
        "status": status,
        "status_details": details,
        "output": [],
        "conversation_id": "conv_local",
        "max_output_tokens": "inf",
        "metadata": None,
        "usage": None,
    }
    fmt = r.item.audio_format
    if dialect == "ga":
        out["output_modalities"] = ["text"] if r.text_only else ["audio"]
        out["audio"] = {"output": {"format": dict(GA_FORMAT_JSON[fmt]), "voice": voice}}
    else:
        out |= {
            "modalities": ["text"] if r.text_only else ["audio", "text"],
            "voice": voice,
            "output_audio_format": fmt,
            "temperature": session["temperature"],
        }
    return out


def usage_json(
    item: ConversationItem, conversation: Iterable[ConversationItem], instructions: str
) -> dict[str, Any]:
    """Token counts in the service's proportions: about 10 audio tokens/s in and 20/s out."""
    out_audio, out_text = round(item.audio_ms / 50), len(item.transcript.split())
    in_audio = sum(round(i.seconds * 10) for i in conversation)
    in_text = len(instructions) // 4
    return {
        "total_tokens": in_audio + in_text + out_audio + out_text,
        "input_tokens": in_audio + in_text,
        "output_tokens": out_audio + out_text,
        "input_token_details": {"cached_tokens": 0, "text_tokens": in_text, "audio_tokens": in_audio},
        "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
    }

"""The vocabulary of the two Realtime dialects, as the local model (:mod:`bridge.local_model`) speaks them.

Audio formats and their rates, what ``session.model`` reports, the server event names that differ between
GA and preview, and the client events with the fields each may carry: plain data that the validation, the
conversation items and the connection all read. Written on its own, never through ``bridge.realtime``.
"""

from __future__ import annotations

from typing import Any

RATES = {"pcm16": 24000, "g711_ulaw": 8000, "g711_alaw": 8000}
"""The sample rate of each (preview-named) audio format."""
BYTES_PER_MS = {"pcm16": 48, "g711_ulaw": 8, "g711_alaw": 8}
GA_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
"""GA format ``type`` → the preview name of the same format, which the local model uses throughout."""
GA_FORMAT_JSON: dict[str, dict[str, Any]] = {
    "pcm16": {"type": "audio/pcm", "rate": 24000},
    "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"},
}
"""The GA JSON of each format."""
MODELS = {"ga": "gpt-realtime-2025-08-28", "preview": "gpt-4o-realtime-preview-2024-12-17"}
"""What ``session.model`` reports, whatever the deployment is called (as Azure does)."""

# Server event names that differ between the dialects (docs/protocols.md §2.8).
DIALECT_NAMES = {
    "ga": {
        "audio.delta": "response.output_audio.delta",
        "audio.done": "response.output_audio.done",
        "transcript.delta": "response.output_audio_transcript.delta",
        "transcript.done": "response.output_audio_transcript.done",
        "text.delta": "response.output_text.delta",
        "text.done": "response.output_text.done",
        "audio part": "output_audio",
        "text part": "output_text",
    },
    "preview": {
        "audio.delta": "response.audio.delta",
        "audio.done": "response.audio.done",
        "transcript.delta": "response.audio_transcript.delta",
        "transcript.done": "response.audio_transcript.done",
        "text.delta": "response.text.delta",
        "text.done": "response.text.done",
        "audio part": "audio",
        "text part": "text",
    },
}

CLIENT_EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "session.update": ("session",),
    "input_audio_buffer.append": ("audio",),
    "input_audio_buffer.commit": (),
    "input_audio_buffer.clear": (),
    "conversation.item.create": ("item", "previous_item_id"),
    "conversation.item.truncate": ("item_id", "content_index", "audio_end_ms"),
    "conversation.item.delete": ("item_id",),
    "conversation.item.retrieve": ("item_id",),
    "response.create": ("response",),
    "response.cancel": ("response_id",),
}
"""Client events and the fields each may carry besides ``type`` and ``event_id``."""
APPEND_FIELDS = frozenset(("type", "event_id", "audio"))
"""All the fields of an ``input_audio_buffer.append``: those without others take the short path."""

"""Call recordings: the JSON Lines format (:mod:`.format`), the files calls are written to and read from
(:mod:`.files`), and their export as a stereo WAV, a summary and an SVG timeline (:mod:`.export`)."""

from __future__ import annotations

from bridge.recordings.files import RecordingFile, load_recording
from bridge.recordings.format import (
    FORMAT,
    REDACTED,
    SECRET_PARAMETERS,
    VERSION,
    Direction,
    Event,
    Header,
    Recording,
    RecordingWriter,
    Source,
    encode_event,
    parse_recording,
    redact,
)

__all__ = [
    "FORMAT",
    "REDACTED",
    "SECRET_PARAMETERS",
    "VERSION",
    "Direction",
    "Event",
    "Header",
    "Recording",
    "RecordingFile",
    "RecordingWriter",
    "Source",
    "encode_event",
    "load_recording",
    "parse_recording",
    "redact",
]

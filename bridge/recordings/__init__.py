"""Call recordings: the JSON Lines format (:mod:`.format`), the files calls are written to and read from
(:mod:`.files`), and their exports: the analysis of a call into its timeline and summary
(:mod:`.analysis`), the stereo WAV of what each side heard (:mod:`.wav`) and the SVG timeline
(:mod:`.timeline`). The exports (numpy) are imported from their modules, not re-exported here, so that
the call path does not load them."""

from __future__ import annotations

from bridge.recordings.files import RecordingFile, load_recording, load_recording_bytes
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
    "load_recording_bytes",
    "parse_recording",
    "redact",
]

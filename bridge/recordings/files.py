"""Recording files: the sink a call writes its recording to, and the loader that reads one back.

The file I/O of a call's recording, kept out of the pure :mod:`.format`. Time comes only from the
injected :class:`~bridge.clock.Clock` (the call's), so that tests drive the gzip flush with a manual clock.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from bridge.clock import Clock
from bridge.recordings.format import Recording, parse_recording

GZIP_FLUSH_SECONDS = 1.0
"""A gzip recording is sync-flushed this often: a crash loses at most this much of it."""


def load_recording(path: Path) -> Recording:
    """Read a recording file, plain or gzip-compressed (by its magic bytes, not its name)."""
    with path.open("rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    opener: Any = gzip.open if compressed else open
    lines: list[str] = []
    cut = False
    with opener(path, "rt", encoding="utf-8", errors="replace") as text:
        try:
            lines.extend(text)
        except EOFError:  # a gzip stream a crash cut off: what was flushed before the cut is readable
            cut = True
    recording = parse_recording(lines, name=path.name)
    return replace(recording, truncated=True) if cut else recording


def load_recording_bytes(data: bytes, name: str) -> Recording:
    """A recording held in memory (read from Blob Storage), plain or gzip-compressed, as
    :func:`load_recording` reads a file."""
    text: IO[str] = (
        gzip.open(io.BytesIO(data), "rt", encoding="utf-8", errors="replace")  # noqa: SIM115 - with text
        if data[:2] == b"\x1f\x8b"
        else io.StringIO(data.decode("utf-8", errors="replace"))
    )
    lines: list[str] = []
    cut = False
    with text:
        try:
            lines.extend(text)
        except EOFError:  # a gzip stream a crash cut off
            cut = True
    recording = parse_recording(lines, name=name)
    return replace(recording, truncated=True) if cut else recording


class RecordingFile:
    """The sink of one call's recording: every line reaches the OS at once (gzip: every second).

    A gzip file is sync-flushed on the first line written once :data:`GZIP_FLUSH_SECONDS` of ``clock``
    time have passed since the last flush (or the opening): then everything written so far can be read
    back, though the file is still open.
    """

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self._clock = clock
        self._gzip = path.name.endswith(".gz")
        self._file: IO[str] = (
            gzip.open(path, "wt", encoding="utf-8")  # noqa: SIM115 - closed by close()
            if self._gzip
            else open(path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed by close()
        )
        self._flushed = clock.now()

    def __call__(self, line: str) -> None:
        self._file.write(line)
        if self._gzip:
            now = self._clock.now()
            if now - self._flushed >= GZIP_FLUSH_SECONDS:
                self._file.flush()
                self._flushed = now

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()

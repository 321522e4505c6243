"""Recording files: the sink a call writes its recording to, and the loader that reads one back."""

from __future__ import annotations

import gzip
from pathlib import Path
from time import monotonic
from typing import IO, Any

from bridge.recordings.format import Recording, parse_recording

GZIP_FLUSH_SECONDS = 1.0
"""A gzip recording is sync-flushed this often: a crash loses at most this much of it."""


def load_recording(path: Path) -> Recording:
    """Read a recording file, plain or gzip-compressed (by its magic bytes, not its name)."""
    with path.open("rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    opener: Any = gzip.open if compressed else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as text:
        return parse_recording(text, name=path.name)


class RecordingFile:
    """The sink of one call's recording: every line reaches the OS at once (gzip: every second)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._gzip = path.name.endswith(".gz")
        self._file: IO[str] = (
            gzip.open(path, "wt", encoding="utf-8")  # noqa: SIM115 - closed by close()
            if self._gzip
            else open(path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed by close()
        )
        self._flushed = monotonic()

    def __call__(self, line: str) -> None:
        self._file.write(line)
        if self._gzip and monotonic() - self._flushed >= GZIP_FLUSH_SECONDS:
            self._file.flush()
            self._flushed = monotonic()

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()

"""Regenerate the speech fixtures in tests/fixtures/: raw μ-law, 8 kHz, mono, no header.

Needs Debian's espeak-ng and sox (``apt-get install -y espeak-ng sox``). espeak-ng speaks each sentence
with the en-us voice into a WAV file; sox normalises it to -3 dBFS peak, resamples to 8 kHz and writes
raw μ-law, without dither so that the same tools give the same bytes. Run:

    .venv/bin/python scripts/make_fixtures.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SENTENCES = {
    "question.ulaw": "What time does the store open tomorrow?",
    "interrupt.ulaw": "Wait, stop. I have another question.",
    "hello.ulaw": "Hello, can you hear me?",
}
MAX_BYTES = 40_000


def make(name: str, text: str, workdir: Path) -> int:
    """Speak ``text`` into ``FIXTURES / name``; return its size in bytes."""
    wav = workdir / (name + ".wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), text], check=True)
    out = FIXTURES / name
    subprocess.run(
        ["sox", "-R", "-D", str(wav), "-r", "8000", "-c", "1", "-t", "ul", str(out), "norm", "-3"],
        check=True,
    )
    size = out.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{name} is {size} bytes, over the {MAX_BYTES} byte budget: shorten the sentence")
    return size


def main() -> None:
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing {' and '.join(missing)}: apt-get install -y espeak-ng sox")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in SENTENCES.items():
            size = make(name, text, Path(tmp))
            print(f"{name}: {size} bytes, {size / 8000:.2f} s  {text!r}")


if __name__ == "__main__":
    main()

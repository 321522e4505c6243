"""Helpers for the browser tests: Debian's Chromium under Playwright, and the fake microphone's speech.

Playwright's own browser download cannot be used here, so Chromium is always Debian's ``/usr/bin/chromium``
(``scripts/install-browser`` installs it), launched through ``executable_path``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import wave
from pathlib import Path

from bridge.audio import ulaw_to_pcm16

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
INSTALL_SCRIPT = ROOT / "scripts" / "install-browser"
FIXTURES = Path(__file__).parent / "fixtures"

LEAD_SILENCE_S = 2.5
"""Silence before the speech in the fake microphone's file: the greeting (1.5 s) plays out undisturbed."""
TRAIL_SILENCE_S = 2.0
"""Silence after it (Chromium loops the file): the echo answer plays out before the caller speaks again."""


def ensure_chromium() -> str | None:
    """``None`` when Debian's Chromium is there (installed now if it was missing), else why it is not."""
    if CHROMIUM.exists():
        return None
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and there is no apt-get to install it"
    try:
        done = subprocess.run(  # our own script, no shell
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{CHROMIUM} is missing and scripts/install-browser failed: {exc}"
    if done.returncode != 0 or not CHROMIUM.exists():
        return (
            f"{CHROMIUM} is missing and not installable here: {(done.stderr or done.stdout).strip()[-300:]}"
        )
    return None


def chromium_args(fake_audio: Path | None = None) -> list[str]:
    """Command-line flags for a quiet, sandbox-free headless Chromium with a fake microphone and camera."""
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
    ]
    if fake_audio is not None:
        args.append(f"--use-file-for-fake-audio-capture={fake_audio}")
    return args


def write_speech_wav(path: Path, source: str = "question.ulaw") -> Path:
    """A 16-bit PCM WAV (8 kHz, mono) of a committed μ-law fixture, with silence around it (see above)."""
    ulaw = (FIXTURES / source).read_bytes()
    pcm = ulaw_to_pcm16(ulaw)
    rate = 8000
    lead = b"\x00\x00" * int(LEAD_SILENCE_S * rate)
    trail = b"\x00\x00" * int(TRAIL_SILENCE_S * rate)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(lead + pcm + trail)
    return path


def screenshot_dir(default: Path) -> Path:
    """Where screenshots go: ``$BRIDGE_SCREENSHOTS`` (``docs`` refreshes the README's), else ``default``."""
    chosen = os.environ.get("BRIDGE_SCREENSHOTS")
    path = Path(chosen) if chosen else default
    if not path.is_absolute():
        path = ROOT / path
    path.mkdir(parents=True, exist_ok=True)
    return path

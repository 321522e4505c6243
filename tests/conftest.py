"""Shared fixtures: the local model and a bridge served on a real loopback port."""

from __future__ import annotations

import contextlib
import struct
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from bridge.local_model import LocalModel
from bridge.prompts import Profile
from bridge.testing import ServedBridge, serve_bridge
from tests import azurite_support
from tests.azurite_support import azurite, azurite_server  # noqa: F401
from tests.postgres_support import install_if_needed, postgres_database, postgres_server  # noqa: F401

FIXTURES = Path(__file__).parent / "fixtures"
AUTH_TOKEN = "test-twilio-auth-token"

Bridge = ServedBridge
"""A running bridge: its app, its base URL (the settings' public URL too), ``get(path)``."""


def fixture_audio(name: str) -> bytes:
    """A committed speech fixture: raw 8 kHz μ-law (see tests/fixtures/README.md)."""
    return (FIXTURES / name).read_bytes()


def wav_file(
    channels: Sequence[np.ndarray],
    rate: int,
    *,
    encoding: str = "pcm16",
    extensible: bool = False,
    before_data: bytes = b"",
) -> bytes:
    """A WAV file written by hand (``wave`` writes PCM only): float samples in [-32768, 32767] per
    channel, stored as ``pcm16``, ``ulaw`` (format tag 7) or ``alaw`` (6), optionally as
    WAVE_FORMAT_EXTENSIBLE; ``before_data`` is raw chunk bytes placed between the fmt and data chunks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    interleaved = np.stack([np.asarray(c, dtype=np.float64) for c in channels], axis=1).reshape(-1)
    pcm = np.clip(np.rint(interleaved), -32768, 32767).astype("<i2").tobytes()
    tag, width = {"pcm16": (1, 2), "ulaw": (7, 1), "alaw": (6, 1)}[encoding]
    data = {"pcm16": pcm, "ulaw": audioop.lin2ulaw(pcm, 2), "alaw": audioop.lin2alaw(pcm, 2)}[encoding]
    n = len(channels)
    head = struct.pack("<HIIHH", n, rate, rate * n * width, n * width, 8 * width)
    if extensible:
        guid = struct.pack("<H", tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<H", 0xFFFE) + head + struct.pack("<HHI", 22, 8 * width, 0) + guid
    else:
        fmt = struct.pack("<H", tag) + head
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + before_data
    body += b"data" + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) & 1)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    install_if_needed(items)  # PostgreSQL for the store's tests, when missing: outside their time limits
    azurite_support.install_if_needed(items)  # Azurite for the Blob Storage tests, likewise


@pytest.fixture
async def model() -> AsyncIterator[LocalModel]:
    async with LocalModel(speed=4.0) as local:
        yield local


@pytest.fixture
async def start_bridge(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """Start bridges on real ports; every one is cleaned up (and drained) at the end of the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            model: LocalModel | None,
            *,
            dialect: str = "ga",
            audio_path: str = "pcm16",
            profile: Profile | None = None,
            render_greetings: bool = False,
            **env: str,
        ) -> Bridge:
            values = {
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "BRIDGE_DATA_DIR": str(tmp_path / "data"),
                "BRIDGE_AUDIO_PATH": audio_path,
                **env,
            }
            if model is not None:
                values |= {
                    "AZURE_OPENAI_ENDPOINT": model.endpoint,
                    "AZURE_OPENAI_DEPLOYMENT": "test-deployment",
                    "AZURE_OPENAI_API_KEY": "test-api-key",
                }
                if dialect == "preview":
                    values["AZURE_OPENAI_API_VERSION"] = "2025-04-01-preview"
            served = serve_bridge(values, profile=profile, render_greetings=render_greetings)
            return await stack.enter_async_context(served)

        yield start

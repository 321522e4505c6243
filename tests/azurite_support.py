"""Azurite (the Blob Storage emulator, npm package ``azurite``) for the tests of ``BRIDGE_STORAGE_URL``.

Installed with ``npm install --prefix DIR azurite@VERSION`` when missing (DIR: ``$BRIDGE_AZURITE_DIR``,
else ``bridge-azurite@VERSION`` in the temp directory; Node.js and npm from Debian's packages when they
are missing too; outside the tests' time limits, at collection), started once a session on a free
loopback port with a temp data directory, stopped at the end. Without npm or Azurite the tests fail,
saying why (never skipped).

The account is Azurite's published development account (``devstoreaccount1`` and its well-known key),
a public constant of the emulator, not a secret.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from bridge.config import Secret
from bridge.recordings.blob import BlobStorage
from tests.postgres_support import apt_install

ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""Azurite's well-known development account key (published in its README)."""
NEEDS = ("azurite", "azurite_server")
INSTALL_TIMEOUT = 300.0
START_TIMEOUT = 30.0

_install_problem: str | None = None


AZURITE_VERSION = "3.35.0"
AZURITE = f"azurite@{AZURITE_VERSION}"
"""The Azurite the tests run (pinned: a new release must not change the tests' engine unseen)."""


def install_dir() -> Path:
    return Path(os.environ.get("BRIDGE_AZURITE_DIR") or Path(tempfile.gettempdir()) / f"bridge-{AZURITE}")


def find_bin() -> Path | None:
    path = install_dir() / "node_modules" / ".bin" / "azurite-blob"
    return path if path.exists() else None


def install() -> str | None:
    """Install Azurite with npm; the problem, or ``None`` when it is there."""
    if find_bin() is not None:
        return None
    npm = shutil.which("npm")
    if npm is None:  # a fresh Debian machine: Node.js and npm from Debian's packages
        problem = apt_install("nodejs", "npm")
        npm = shutil.which("npm")
        if npm is None:
            return problem or "npm is not installed: cannot install Azurite"
    install_dir().mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(install_dir()),
                "--no-audit",
                "--no-fund",
                f"azurite@{AZURITE_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"npm install azurite failed: {exc}"
    if done.returncode != 0 or find_bin() is None:
        return f"npm install azurite failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
    return None


def install_if_needed(items: Sequence[pytest.Item]) -> None:
    """At collection (outside the time limits): install Azurite when a collected test needs it."""
    global _install_problem
    if any(name in item.fixturenames for item in items for name in NEEDS):
        _install_problem = install()


def _unavailable(why: str) -> None:
    pytest.fail(f"Azurite is needed by these tests and could not be started: {why}", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Azurite:
    """One Azurite blob service on ``127.0.0.1:port``."""

    def __init__(self, binary: Path, location: Path) -> None:
        self.port = _free_port()
        self.location = location
        self.process = subprocess.Popen(
            [
                str(binary),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--location",
                str(location),
                "--silent",
                "--skipApiVersionCheck",
                "--loose",
                "--disableTelemetry",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.started_in = self._wait()

    def _wait(self) -> float:
        start = time.monotonic()
        while time.monotonic() - start < START_TIMEOUT:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"azurite-blob exited ({self.process.returncode}): {err.strip()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return time.monotonic() - start
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"azurite-blob did not listen on port {self.port} within {START_TIMEOUT:.0f} s")

    def container_url(self, container: str) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}/{container}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite's blob service, one per session."""
    if _install_problem is not None:
        _unavailable(_install_problem)
    binary = find_bin()
    if binary is None:
        _unavailable(install() or "azurite-blob not found after installing")
        raise AssertionError("unreachable")
    try:
        server = Azurite(binary, tmp_path_factory.mktemp("azurite"))
    except (OSError, RuntimeError) as exc:
        _unavailable(str(exc))
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def azurite(azurite_server: Azurite) -> str:
    """A fresh, empty container in Azurite for one test: its URL (the key is :data:`KEY`)."""
    url = azurite_server.container_url(f"test-{uuid.uuid4().hex[:12]}")
    async with BlobStorage(url, key=Secret(KEY)) as storage:
        await storage.create_container()
    return url

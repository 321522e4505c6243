"""A throw-away PostgreSQL server for the store's tests: Debian's ``postgresql``, installed when missing.

``postgres_server`` (session-scoped) starts a fresh cluster under a temporary directory: initdb, then
postgres listening on 127.0.0.1 on a free port (its Unix socket in that directory), fsync off; stopped and
deleted at the end of the session. As root it runs as the ``postgres`` user (else ``nobody``): PostgreSQL
refuses root. The superuser signs in over the socket; the tests' roles use passwords over TCP, so the
password and Entra-token paths are real. ``postgres_database`` is a fresh database per test.

The binaries are found on PATH, else under /usr/lib/postgresql/*/bin; when they are missing, collection
(:func:`install_if_needed`, outside the tests' time limits) installs Debian's ``postgresql`` with apt-get,
as scripts/install-browser installs Chromium. Where that is impossible, the tests that need the server
fail, saying why (never skipped).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

ADMIN = "bridge_admin"
TEST_ROLE, TEST_PASSWORD = "bridge_test", "test-password-1"
ENTRA_ROLE = "bridge_entra"
ENTRA_TOKEN = "fake-entra-token-for-tests"
"""The password of ENTRA_ROLE: what the fake credential of the Entra tests hands out as its token."""
NEEDS = ("postgres_server", "postgres_database")

_problem: str | None = None
_checked = False


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: PATH first, then Debian's versioned ones."""
    candidates: list[Path] = []
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).resolve().parent)
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)] or [0],
        reverse=True,
    )
    candidates += versions
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def apt_install(*packages: str) -> str | None:
    """Install Debian ``packages`` with apt-get (as root, or with ``sudo -n``); ``None``, else why not."""
    what = " ".join(packages)
    if shutil.which("apt-get") is None:
        return f"{what} is missing and there is no apt-get to install it"
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None or subprocess.run(["sudo", "-n", "true"], check=False).returncode:
            return f"{what} is missing and installing it needs root: apt-get install -y {what}"
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"tests: installing Debian's {what} (apt-get) ...", file=sys.stderr)
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        try:
            done = subprocess.run(
                prefix + command, capture_output=True, text=True, timeout=600, check=False, env=env
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{what} is missing and {' '.join(command)} failed: {exc}"
        if done.returncode != 0:
            return f"{what} is missing and {' '.join(command)} failed: {done.stderr.strip()[-300:]}"
    return None


def install() -> str | None:
    """Install Debian's postgresql; ``None`` when it worked, else why not."""
    problem = apt_install("postgresql")
    if problem is not None:
        return problem
    return None if find_bindir() else "apt-get installed postgresql but initdb/pg_ctl/postgres are not found"


def ensure_installed() -> str | None:
    """``None`` when the server's binaries are here (installed now if need be), else why not. Once."""
    global _problem, _checked
    if not _checked:
        _checked = True
        _problem = None if find_bindir() else install()
    return _problem


def install_if_needed(items: Sequence[pytest.Item]) -> None:
    """At collection: install PostgreSQL when a collected test needs the server (outside its timeout)."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(name in item.fixturenames for name in NEEDS) or params.get("backend") == "postgresql":
            ensure_installed()
            return


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """A running throw-away cluster: its port, admin connections, databases per test."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        # /tmp: short enough for the Unix socket's path, and open to the user PostgreSQL runs as.
        self.root = Path(tempfile.mkdtemp(prefix="bridge-pg-", dir="/tmp" if Path("/tmp").is_dir() else None))
        self.data = self.root / "data"
        self.port = 0
        self.started_in_s = 0.0
        self._names = itertools.count(1)
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    self._user = pwd.getpwnam(name)
                    break
            if self._user is None:
                raise RuntimeError(
                    "running as root and there is no postgres or nobody user to run PostgreSQL"
                )
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self.root.chmod(0o700)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        as_user: dict[str, Any] = {}
        if self._user is not None:
            as_user = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
            env=env,
            **as_user,
        )

    def start(self) -> None:
        began = time.monotonic()
        pwfile = self.root / "pw"
        pwfile.write_text("admin-password\n")
        if self._user is not None:
            os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        done = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            ADMIN,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {(done.stderr or done.stdout).strip()[-800:]}")
        for _ in range(3):  # another process may take the free port in between: try another
            self.port = _free_port()
            options = (
                f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                "-c shared_buffers=32MB"
            )
            log = self.root / "server.log"
            done = self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(log), "-w", "-t", "30", "-o", options, "start"
            )
            if done.returncode == 0:
                break
        else:
            text = log.read_text(errors="replace")[-800:] if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {(done.stderr or done.stdout).strip()} {text}")
        with self.admin() as conn:
            conn.execute(f"CREATE ROLE {TEST_ROLE} LOGIN PASSWORD '{TEST_PASSWORD}'")
            conn.execute(f"CREATE ROLE {ENTRA_ROLE} LOGIN PASSWORD '{ENTRA_TOKEN}'")
        self.started_in_s = time.monotonic() - began

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        """A superuser connection over the Unix socket (autocommit)."""
        return psycopg.connect(
            host=str(self.root), port=self.port, user=ADMIN, dbname=dbname, autocommit=True
        )

    def create_database(self, owner: str = TEST_ROLE) -> str:
        name = f"test_{os.getpid()}_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {owner} TEMPLATE template0")
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def url(self, dbname: str, user: str = TEST_ROLE, password: str | None = TEST_PASSWORD) -> str:
        """A TCP URL to ``dbname`` (no password in it when ``password`` is ``None``)."""
        secret = "" if password is None else f":{password}"
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/{dbname}"


def _unavailable(reason: str) -> None:
    pytest.fail(f"no PostgreSQL server for the store's tests: {reason}", pytrace=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL cluster for the session (see the module's docstring)."""
    problem = ensure_installed()
    bindir = find_bindir()
    if problem or bindir is None:
        _unavailable(problem or "initdb, pg_ctl and postgres are not found")
        raise AssertionError("unreachable")
    server = PostgresServer(bindir)
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired, psycopg.Error) as exc:
        server.stop()
        _unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database owned by the test role, dropped after the test: its URL (with password)."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)

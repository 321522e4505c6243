"""The SQLite store's schema: migrations, opening a database file, and mapping rows to records and back.

:mod:`bridge.store.sqlite` runs the operations; this module knows the tables: the migrations that build
them (``PRAGMA user_version`` counts the applied ones), the column lists the queries select, and how a
row becomes a :class:`~bridge.store.base.ProfileVersion` or :class:`~bridge.store.base.CallRecord`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.errors import ConfigError
from bridge.prompts import ProfileError, profile_from_mapping
from bridge.store.base import CallRecord, CallStatus, ModelSession, ProfileVersion, UnreadableProfile

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the initial schema. A profile's name and numbers are its latest version's; they are copied into
    # profiles.name and routes so that uniqueness and routing look at the latest versions only.
    (
        """CREATE TABLE profiles (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            latest_version INTEGER NOT NULL,
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE profile_versions (
            profile_id INTEGER NOT NULL REFERENCES profiles(id),
            version INTEGER NOT NULL CHECK (version >= 1),
            data TEXT NOT NULL,
            author TEXT NOT NULL,
            created_at TEXT NOT NULL,
            comment TEXT NOT NULL DEFAULT '',
            rolled_back_from INTEGER,
            greeting_audio BLOB,
            PRIMARY KEY (profile_id, version)
        )""",
        """CREATE TABLE routes (
            number TEXT PRIMARY KEY,
            profile_id INTEGER NOT NULL REFERENCES profiles(id)
        )""",
        "CREATE INDEX routes_by_profile ON routes(profile_id)",
        """CREATE TABLE default_profile (
            only INTEGER PRIMARY KEY CHECK (only = 1),
            profile_id INTEGER NOT NULL REFERENCES profiles(id)
        )""",
        """CREATE TABLE calls (
            call_sid TEXT PRIMARY KEY,
            started_at TEXT NOT NULL,
            ended_at TEXT NOT NULL,
            from_number TEXT NOT NULL DEFAULT '',
            to_number TEXT NOT NULL DEFAULT '',
            profile_id INTEGER,
            profile_version INTEGER,
            end_reason TEXT NOT NULL DEFAULT '',
            transcript TEXT NOT NULL DEFAULT '[]',
            barge_ins INTEGER NOT NULL DEFAULT 0,
            truncations TEXT NOT NULL DEFAULT '[]',
            latency TEXT NOT NULL DEFAULT '{}',
            upstream_errors INTEGER NOT NULL DEFAULT 0,
            recording_path TEXT,
            test_call INTEGER NOT NULL DEFAULT 0
        )""",
    ),
    # 2: the call list is read newest first, overall and per profile.
    (
        "CREATE INDEX calls_by_start ON calls(started_at)",
        "CREATE INDEX calls_by_profile ON calls(profile_id, started_at)",
    ),
    # 3: a call may use several Realtime sessions (rollover, reconnect): a JSON list of them, see
    # sessions_text. Rows from before read as no sessions.
    ("ALTER TABLE calls ADD COLUMN sessions TEXT NOT NULL DEFAULT '[]'",),
    # 4: hardening. A call record is written when the call starts (status 'in progress') and by which
    # instance; instances beat so that another can tell a crashed one. A CallSid is answered once and
    # streamed once (call_answers), across instances. Admin sessions live here so sign-out is durable.
    (
        "ALTER TABLE calls ADD COLUMN status TEXT NOT NULL DEFAULT 'completed'",
        "ALTER TABLE calls ADD COLUMN instance TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX calls_in_progress ON calls(instance) WHERE status = 'in progress'",
        """CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            seen_at TEXT NOT NULL
        )""",
        """CREATE TABLE call_answers (
            call_sid TEXT PRIMARY KEY,
            answered_at TEXT NOT NULL,
            token_nonce TEXT NOT NULL,
            token_expiry REAL NOT NULL,
            streamed_at TEXT
        )""",
        """CREATE TABLE admin_sessions (
            sid TEXT PRIMARY KEY,
            user TEXT NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            revoked_at TEXT
        )""",
    ),
)
"""Schema migrations, applied in order on open, one transaction each; ``PRAGMA user_version`` counts them.
Never edit one that has shipped: append."""

BUSY_TIMEOUT_MS = 10_000
"""How long an operation waits for another connection's write lock (``PRAGMA busy_timeout``)."""

VERSION_COLUMNS = (
    "v.profile_id, v.version, v.data, v.author, v.created_at, v.comment, v.rolled_back_from, "
    "v.greeting_audio IS NOT NULL"
)
"""The columns of a profile version (alias ``v``) that :func:`version_of` reads, in its order."""

LATEST_JOIN = "profiles p JOIN profile_versions v ON v.profile_id = p.id AND v.version = p.latest_version"
"""Profiles (``p``) joined to their latest versions (``v``)."""

CALL_COLUMNS = (
    "call_sid, started_at, ended_at, from_number, to_number, profile_id, profile_version, end_reason, "
    "transcript, barge_ins, truncations, latency, upstream_errors, recording_path, test_call, sessions, "
    "status, instance"
)
"""The columns of a call record, in the order of :func:`call_of` and :func:`call_values`."""


def utc_now() -> datetime:
    """The default clock of a store: now, in UTC."""
    return datetime.now(UTC)


def time_text(moment: datetime) -> str:
    """ISO-8601 UTC with a fixed width, so that text order is time order. Naive times are taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def parse_time(text: str) -> datetime:
    """A time stored by :func:`time_text`, back as an aware UTC datetime."""
    return datetime.fromisoformat(text).astimezone(UTC)


def version_of(row: Sequence[Any]) -> ProfileVersion:
    """A row of :data:`VERSION_COLUMNS` as a version; raises :class:`UnreadableProfile` for bad data."""
    profile_id, version, data, author, created_at, comment, rolled_back_from, has_audio = row
    try:
        mapping = json.loads(data)
        if not isinstance(mapping, dict):
            raise ValueError("not a JSON object")
        profile = profile_from_mapping(mapping)
    except ProfileError as exc:
        raise UnreadableProfile(profile_id, version, exc.problems) from exc
    except ValueError as exc:
        raise UnreadableProfile(profile_id, version, {"data": f"is not a profile: {exc}"}) from exc
    return ProfileVersion(
        profile_id=int(profile_id),
        version=int(version),
        profile=profile,
        author=str(author),
        created_at=parse_time(created_at),
        comment=str(comment),
        rolled_back_from=None if rolled_back_from is None else int(rolled_back_from),
        has_greeting_audio=bool(has_audio),
    )


def call_of(row: Sequence[Any]) -> CallRecord:
    """A row of :data:`CALL_COLUMNS` as a call record."""
    return CallRecord(
        call_sid=row[0],
        started_at=parse_time(row[1]),
        ended_at=parse_time(row[2]),
        from_number=row[3],
        to_number=row[4],
        profile_id=row[5],
        profile_version=row[6],
        end_reason=row[7],
        transcript=tuple((str(role), str(text)) for role, text in json.loads(row[8])),
        barge_ins=int(row[9]),
        truncations=tuple((str(item), int(ms)) for item, ms in json.loads(row[10])),
        latency_ms={str(k): float(v) for k, v in json.loads(row[11]).items()},
        upstream_errors=int(row[12]),
        recording_path=row[13],
        test_call=bool(row[14]),
        sessions=sessions_of(row[15]),
        status=CallStatus(row[16]),
        instance=str(row[17]),
    )


def call_values(record: CallRecord) -> tuple[Any, ...]:
    """The values of ``record`` for the columns :data:`CALL_COLUMNS`, in that order."""
    return (
        record.call_sid,
        time_text(record.started_at),
        time_text(record.ended_at),
        record.from_number,
        record.to_number,
        record.profile_id,
        record.profile_version,
        record.end_reason,
        json.dumps([list(pair) for pair in record.transcript], ensure_ascii=False),
        record.barge_ins,
        json.dumps([list(pair) for pair in record.truncations]),
        json.dumps(dict(record.latency_ms)),
        record.upstream_errors,
        record.recording_path,
        int(record.test_call),
        sessions_text(record.sessions),
        record.status.value,
        record.instance,
    )


def sessions_text(sessions: Sequence[ModelSession]) -> str:
    """A call's model sessions as the ``calls.sessions`` column holds them: a JSON list of objects with
    ``number``, ``started_at``, ``ended_at`` (:func:`time_text`, or null), ``began``, ``ended`` and
    ``session_id``."""
    return json.dumps(
        [
            {
                "number": s.number,
                "started_at": time_text(s.started_at),
                "ended_at": None if s.ended_at is None else time_text(s.ended_at),
                "began": s.began,
                "ended": s.ended,
                "session_id": s.session_id,
            }
            for s in sessions
        ],
        ensure_ascii=False,
    )


def sessions_of(text: str | None) -> tuple[ModelSession, ...]:
    """The model sessions of a ``calls.sessions`` value (:func:`sessions_text`); missing fields default."""
    if not text:
        return ()
    return tuple(
        ModelSession(
            number=int(item["number"]),
            started_at=parse_time(item["started_at"]),
            ended_at=None if item.get("ended_at") is None else parse_time(item["ended_at"]),
            began=str(item.get("began", "first")),
            ended=str(item.get("ended", "")),
            session_id=str(item.get("session_id", "")),
        )
        for item in json.loads(text)
    )


def migrate(conn: sqlite3.Connection, migrations: Sequence[Sequence[str]], where: str) -> None:
    """Apply the ``migrations`` the database at ``where`` lacks; ConfigError if it is newer than them."""
    for target in range(1, len(migrations) + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if current > len(migrations):
                raise ConfigError(
                    f"BRIDGE_DATABASE: {where} was written by a newer bridge (schema version {current}, "
                    f"this bridge knows {len(migrations)}): upgrade the bridge"
                )
            if current < target:
                for statement in migrations[target - 1]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _set_up(conn: sqlite3.Connection, migrations: Sequence[Sequence[str]], path: str) -> None:
    """WAL, then the migrations; retried while another process holds the file (several instances or
    workers opening a new file at once: switching to WAL fails at once when busy, the busy timeout aside)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            migrate(conn, migrations, path)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # in the store's worker thread (or at start-up), never on the event loop


def connect(path: str, migrations: Sequence[Sequence[str]]) -> sqlite3.Connection:
    """Open (creating its directory) and migrate the database at ``path``; raises ConfigError."""
    if path != ":memory:":
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"BRIDGE_DATABASE: cannot create the directory of {path}: {exc.strerror or exc}"
            ) from exc
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise ConfigError(f"BRIDGE_DATABASE: cannot open {path}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        _set_up(conn, migrations, path)
    except sqlite3.Error as exc:
        conn.close()
        raise ConfigError(f"BRIDGE_DATABASE: {path} is not a usable SQLite database: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn

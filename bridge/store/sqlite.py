"""The SQLite backend of :class:`~bridge.store.Store`: one file, created on first start, schema migrations.

One connection per store, used from worker threads (``asyncio.to_thread``) one operation at a time: an
asyncio lock queues the operations without tying up threads, a thread lock keeps the connection safe
even when an awaiting task is cancelled while its thread still runs. Every operation is one transaction;
writes take the write lock up front (BEGIN IMMEDIATE), so a save's version check and its insert see the
same database, also across processes sharing the file (WAL, busy_timeout). The tables, their migrations
and the mapping of rows to records are :mod:`bridge.store.schema`.
"""

# SQL text is composed from this module's constants only; values always go through placeholders.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from bridge.errors import LocalError, StoreError
from bridge.prompts import Profile, profile_from_mapping, profile_to_mapping
from bridge.store import calls_sql
from bridge.store.base import (
    AdminSession,
    Answer,
    CallRecord,
    Conflict,
    NotFound,
    ProfileChange,
    ProfileSummary,
    ProfileVersion,
    StaleVersion,
)
from bridge.store.schema import (
    LATEST_JOIN,
    MIGRATIONS,
    VERSION_COLUMNS,
    connect,
    parse_time,
    time_text,
    utc_now,
    version_of,
)

_T = TypeVar("_T")


def _latest_version(conn: sqlite3.Connection, profile_id: int) -> int:
    row = conn.execute("SELECT latest_version FROM profiles WHERE id = ?", (profile_id,)).fetchone()
    if row is None:
        raise NotFound(f"no profile {profile_id}")
    return int(row[0])


def _conflicts(conn: sqlite3.Connection, proposed: Sequence[tuple[int | None, Profile]]) -> dict[str, str]:
    """What would clash if the ``proposed`` profiles became the latest versions (``None``: new ones)."""
    changing = {profile_id for profile_id, _ in proposed if profile_id is not None}
    names = {name for pid, name in conn.execute("SELECT id, name FROM profiles") if pid not in changing}
    owners = {
        number: name
        for number, pid, name in conn.execute(
            "SELECT r.number, p.id, p.name FROM routes r JOIN profiles p ON p.id = r.profile_id"
        )
        if pid not in changing
    }
    name_problems: list[str] = []
    number_problems: list[str] = []
    for _, profile in proposed:
        if profile.name in names:
            name_problems.append(f"a profile named {profile.name!r} already exists")
        names.add(profile.name)
        for number in profile.numbers:
            owner = owners.get(number)
            if owner is None:
                owners[number] = profile.name
            else:
                number_problems.append(f"{number} is already routed to profile {owner!r}")
    problems = {}
    if name_problems:
        problems["name"] = "; ".join(name_problems)
    if number_problems:
        problems["numbers"] = "; ".join(number_problems)
    return problems


class SQLiteStore:
    """The default :class:`Store`: one SQLite file, created with its directory on first open.

    Open with :meth:`open` (or :func:`open_store`), close with :meth:`close` or ``async with``.
    """

    def __init__(self, conn: sqlite3.Connection, path: str, now: Callable[[], datetime]) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._now = now
        self._queue = asyncio.Lock()
        self._thread_lock = threading.Lock()

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        now: Callable[[], datetime] = utc_now,
        migrations: Sequence[Sequence[str]] = MIGRATIONS,
    ) -> SQLiteStore:
        """Open (creating or upgrading) the database at ``path``; ``":memory:"`` for a private one.

        ``now`` gives version times (tests inject one); ``migrations`` is for tests of old schemas.
        Raises :class:`~bridge.errors.ConfigError` when the file cannot be used.
        """
        where = os.fspath(path)
        conn = await asyncio.to_thread(connect, where, migrations)
        return cls(conn, where, now)

    async def __aenter__(self) -> SQLiteStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release the database (waits for an operation in progress); later calls raise StoreError."""
        async with self._queue:
            conn, self._conn = self._conn, None
            if conn is not None:
                await asyncio.to_thread(self._close, conn)

    def _close(self, conn: sqlite3.Connection) -> None:
        with self._thread_lock:
            conn.close()

    async def _run(self, work: Callable[[sqlite3.Connection], _T], *, write: bool = False) -> _T:
        """Run ``work`` in one transaction in a worker thread."""
        async with self._queue:
            return await asyncio.to_thread(self._transaction, work, write)

    def _transaction(self, work: Callable[[sqlite3.Connection], _T], write: bool) -> _T:
        with self._thread_lock:
            conn = self._conn
            if conn is None:
                raise StoreError("the store is closed")
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    # The original error is what matters; a failing rollback adds nothing to it.
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"database {self.path}: {exc}") from exc
                raise
            return result

    # --- profiles ---

    async def list_profiles(self) -> list[ProfileSummary]:
        """Every profile's latest version, by name."""

        def work(conn: sqlite3.Connection) -> list[ProfileSummary]:
            rows = conn.execute(
                f"SELECT d.profile_id IS NOT NULL, {VERSION_COLUMNS} FROM {LATEST_JOIN} "
                "LEFT JOIN default_profile d ON d.profile_id = p.id ORDER BY p.name COLLATE NOCASE, p.id"
            ).fetchall()
            return [ProfileSummary(int(row[1]), version_of(row[1:]), bool(row[0])) for row in rows]

        return await self._run(work)

    async def get(self, profile_id: int, version: int | None = None) -> ProfileVersion:
        """One version (default: the latest); raises :class:`NotFound`."""

        def work(conn: sqlite3.Connection) -> ProfileVersion:
            if version is None:
                row = conn.execute(
                    f"SELECT {VERSION_COLUMNS} FROM {LATEST_JOIN} WHERE p.id = ?", (profile_id,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"no profile {profile_id}")
            else:
                row = conn.execute(
                    f"SELECT {VERSION_COLUMNS} FROM profile_versions v "
                    "WHERE v.profile_id = ? AND v.version = ?",
                    (profile_id, version),
                ).fetchone()
                if row is None:
                    _latest_version(conn, profile_id)
                    raise NotFound(f"profile {profile_id} has no version {version}")
            return version_of(row)

        return await self._run(work)

    async def history(self, profile_id: int) -> list[ProfileVersion]:
        """Every version of a profile, newest first; raises :class:`NotFound`."""

        def work(conn: sqlite3.Connection) -> list[ProfileVersion]:
            _latest_version(conn, profile_id)
            rows = conn.execute(
                f"SELECT {VERSION_COLUMNS} FROM profile_versions v "
                "WHERE v.profile_id = ? ORDER BY v.version DESC",
                (profile_id,),
            ).fetchall()
            return [version_of(row) for row in rows]

        return await self._run(work)

    async def create(self, profile: Profile, *, author: str, comment: str = "") -> ProfileVersion:
        """A new profile at version 1; raises :class:`Conflict`, or ProfileError for an invalid profile.

        The first profile becomes the default.
        """
        (created,) = await self.save_many([ProfileChange(profile)], author=author, comment=comment)
        return created

    async def save(
        self, profile_id: int, profile: Profile, *, expected_version: int, author: str, comment: str = ""
    ) -> ProfileVersion:
        """A new version; raises :class:`StaleVersion`, :class:`Conflict`, :class:`NotFound`."""
        change = ProfileChange(profile, profile_id, expected_version)
        (saved,) = await self.save_many([change], author=author, comment=comment)
        return saved

    async def save_many(
        self, changes: Sequence[ProfileChange], *, author: str, comment: str = ""
    ) -> list[ProfileVersion]:
        """Write several profiles in one transaction: all of them, or (on any error) none.

        Names and numbers are checked against the state after all the changes, so profiles may swap
        numbers. Raises like :meth:`save`; :class:`ProfileError` when a profile does not validate.
        """
        ids = [change.profile_id for change in changes if change.profile_id is not None]
        if len(set(ids)) != len(ids):
            raise LocalError("save_many: a profile appears twice")
        # Store what reads back: a Profile built by hand gets the same checks as one from a file.
        normal = [(change, profile_from_mapping(profile_to_mapping(change.profile))) for change in changes]
        return await self._run(lambda conn: self._write(conn, normal, author, comment), write=True)

    async def rollback(
        self, profile_id: int, to_version: int, *, expected_version: int, author: str, comment: str = ""
    ) -> ProfileVersion:
        """A new version with the content (and greeting audio) of ``to_version``; raises like :meth:`save`."""

        def work(conn: sqlite3.Connection) -> ProfileVersion:
            _latest_version(conn, profile_id)
            row = conn.execute(
                f"SELECT {VERSION_COLUMNS}, v.greeting_audio FROM profile_versions v "
                "WHERE v.profile_id = ? AND v.version = ?",
                (profile_id, to_version),
            ).fetchone()
            if row is None:
                raise NotFound(f"profile {profile_id} has no version {to_version}")
            old = version_of(row[:-1])
            change = ProfileChange(old.profile, profile_id, expected_version)
            note = comment or f"rollback to version {to_version}"
            (written,) = self._write(conn, [(change, old.profile)], author, note, to_version, row[-1])
            return written

        return await self._run(work, write=True)

    def _write(
        self,
        conn: sqlite3.Connection,
        changes: Sequence[tuple[ProfileChange, Profile]],
        author: str,
        comment: str,
        rolled_back_from: int | None = None,
        greeting_audio: bytes | None = None,
    ) -> list[ProfileVersion]:
        for change, _ in changes:
            if change.profile_id is not None:
                current = _latest_version(conn, change.profile_id)
                if current != change.expected_version:
                    raise StaleVersion(change.profile_id, change.expected_version, current)
        problems = _conflicts(conn, [(change.profile_id, profile) for change, profile in changes])
        if problems:
            raise Conflict(problems)
        created_at = time_text(self._now())
        written: list[ProfileVersion] = []
        for change, profile in changes:
            if change.profile_id is None:
                cursor = conn.execute(
                    "INSERT INTO profiles (name, latest_version, created_at) VALUES (?, 1, ?)",
                    (profile.name, created_at),
                )
                assert cursor.lastrowid is not None
                profile_id, version = cursor.lastrowid, 1
            else:
                profile_id, version = change.profile_id, change.expected_version + 1
                conn.execute(
                    "UPDATE profiles SET name = ?, latest_version = ? WHERE id = ?",
                    (profile.name, version, profile_id),
                )
                conn.execute("DELETE FROM routes WHERE profile_id = ?", (profile_id,))
            conn.execute(
                "INSERT INTO profile_versions (profile_id, version, data, author, created_at, comment, "
                "rolled_back_from, greeting_audio) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    profile_id,
                    version,
                    json.dumps(profile_to_mapping(profile), ensure_ascii=False),
                    author,
                    created_at,
                    comment,
                    rolled_back_from,
                    greeting_audio,
                ),
            )
            written.append(
                ProfileVersion(
                    profile_id=profile_id,
                    version=version,
                    profile=profile,
                    author=author,
                    created_at=parse_time(created_at),
                    comment=comment,
                    rolled_back_from=rolled_back_from,
                    has_greeting_audio=greeting_audio is not None,
                )
            )
        # Routes after every old route of the changed profiles is gone, so that numbers may move between them.
        for saved in written:
            conn.executemany(
                "INSERT INTO routes (number, profile_id) VALUES (?, ?)",
                [(number, saved.profile_id) for number in saved.profile.numbers],
            )
        if written and conn.execute("SELECT 1 FROM default_profile").fetchone() is None:
            conn.execute(
                "INSERT INTO default_profile (only, profile_id) VALUES (1, ?)", (written[0].profile_id,)
            )
        return written

    async def set_default(self, profile_id: int) -> None:
        """Make this the profile for numbers no profile claims; raises :class:`NotFound`."""

        def work(conn: sqlite3.Connection) -> None:
            _latest_version(conn, profile_id)
            conn.execute(
                "INSERT INTO default_profile (only, profile_id) VALUES (1, ?) "
                "ON CONFLICT (only) DO UPDATE SET profile_id = excluded.profile_id",
                (profile_id,),
            )

        await self._run(work, write=True)

    async def default_profile(self) -> ProfileVersion | None:
        """The default profile's latest version (``None`` in an empty store)."""

        def work(conn: sqlite3.Connection) -> ProfileVersion | None:
            row = conn.execute(
                f"SELECT {VERSION_COLUMNS} FROM {LATEST_JOIN} JOIN default_profile d ON d.profile_id = p.id"
            ).fetchone()
            return None if row is None else version_of(row)

        return await self._run(work)

    async def for_number(self, number: str) -> ProfileVersion | None:
        """The latest version of the profile routing ``number`` (E.164), else the default's."""
        number = re.sub(r"[\s().-]", "", number)

        def work(conn: sqlite3.Connection) -> ProfileVersion | None:
            row = conn.execute(
                f"SELECT {VERSION_COLUMNS} FROM {LATEST_JOIN} "
                "JOIN routes r ON r.profile_id = p.id WHERE r.number = ?",
                (number,),
            ).fetchone()
            if row is None:
                row = conn.execute(
                    f"SELECT {VERSION_COLUMNS} FROM {LATEST_JOIN} "
                    "JOIN default_profile d ON d.profile_id = p.id"
                ).fetchone()
            return None if row is None else version_of(row)

        return await self._run(work)

    # --- greetings ---

    async def set_greeting_audio(self, profile_id: int, version: int, audio: bytes) -> None:
        """Store a version's pre-rendered greeting (raw μ-law, 8 kHz); raises :class:`NotFound`."""
        data = bytes(audio)

        def work(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                "UPDATE profile_versions SET greeting_audio = ? WHERE profile_id = ? AND version = ?",
                (data, profile_id, version),
            )
            if cursor.rowcount == 0:
                raise NotFound(f"profile {profile_id} has no version {version}")

        await self._run(work, write=True)

    async def greeting_audio(self, profile_id: int, version: int) -> bytes | None:
        """A version's pre-rendered greeting, or ``None`` (also for an unknown version)."""

        def work(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT greeting_audio FROM profile_versions WHERE profile_id = ? AND version = ?",
                (profile_id, version),
            ).fetchone()
            return None if row is None or row[0] is None else bytes(row[0])

        return await self._run(work)

    # --- calls (the SQL is bridge.store.calls_sql) ---

    async def start_call(self, record: CallRecord) -> None:
        """Write a call's record as it starts; raises :class:`Conflict` when the CallSid has one."""
        await self._run(calls_sql.start_call(record), write=True)

    async def add_call(self, record: CallRecord) -> None:
        """Write a call's final record over its own (in progress, or interrupted while its instance was
        silent), or new; raises :class:`Conflict` when another call's record holds the CallSid."""
        await self._run(calls_sql.finish_call(record), write=True)

    async def calls(
        self, *, limit: int = 50, before: datetime | None = None, profile_id: int | None = None
    ) -> list[CallRecord]:
        """Call records, newest first: at most ``limit``, started before ``before``, of one profile."""
        return await self._run(calls_sql.calls(limit, before, profile_id))

    async def call(self, call_sid: str) -> CallRecord:
        """One call record; raises :class:`NotFound`."""
        return await self._run(calls_sql.call(call_sid))

    async def interrupt_calls(self, *, stale_before: datetime, restarted: str | None = None) -> int:
        """Mark interrupted what instances silent since ``stale_before``, and ``restarted``'s last run,
        left in progress; how many."""
        return await self._run(calls_sql.interrupt_calls(stale_before, restarted), write=True)

    async def heartbeat(self, instance: str) -> None:
        """Note that ``instance`` is alive now."""
        await self._run(calls_sql.heartbeat(instance, self._now()), write=True)

    async def answer_call(self, call_sid: str, token_nonce: str, token_expiry: float) -> Answer | None:
        """Record the first answer to ``call_sid`` (``None``), else return the earlier :class:`Answer`."""
        return await self._run(
            calls_sql.answer_call(call_sid, token_nonce, token_expiry, self._now()), write=True
        )

    async def claim_stream(self, call_sid: str) -> bool:
        """Whether this is ``call_sid``'s first media stream ever (then it is recorded)."""
        return await self._run(calls_sql.claim_stream(call_sid, self._now()), write=True)

    # --- admin sessions ---

    async def add_admin_session(self, sid: str, user: str, expires_at: datetime) -> None:
        """Keep a new admin session (and forget expired ones)."""
        await self._run(calls_sql.add_admin_session(sid, user, expires_at, self._now()), write=True)

    async def admin_session(self, sid: str) -> AdminSession | None:
        """A live admin session; ``None`` when unknown, expired or signed out."""
        return await self._run(calls_sql.admin_session(sid, self._now()))

    async def revoke_admin_session(self, sid: str) -> None:
        """Sign a session out, for good and on every instance."""
        await self._run(calls_sql.revoke_admin_session(sid, self._now()), write=True)

"""The PostgreSQL backend of :class:`~bridge.store.Store`, for instances that share one database.

``BRIDGE_DATABASE=postgresql://user[:password]@host[:port]/database[?sslmode=require…]`` (libpq's URL).
Without a password, the password is an Entra ID token (``azure.identity.aio.DefaultAzureCredential``,
scope :data:`ENTRA_SCOPE`), fetched again for new connections before it expires: Azure Database for
PostgreSQL with Entra authentication, the role named as the URL's user.

psycopg 3 (async) with a connection pool. Every operation is one transaction; every profile write first
takes a transaction-level advisory lock (:data:`~bridge.store.postgres_schema.PROFILE_LOCK`), as SQLite's
writes take its write lock, so a save's version check and its writes see the same database on every
instance. Calls, answers, stream claims, beats and admin sessions are single conditional statements
(``INSERT … ON CONFLICT``), the same as SQLite's. Driver errors surface as :class:`StoreError`; at open, as
:class:`~bridge.errors.ConfigError` saying what to fix. The password never appears in either.
"""

# SQL text is composed from this module's constants only; values always go through placeholders.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from bridge.errors import ConfigError, LocalError, StoreError
from bridge.prompts import Profile, profile_from_mapping, profile_to_mapping
from bridge.store import postgres_calls
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
from bridge.store.postgres_calls import Conn, one, rows
from bridge.store.postgres_schema import (
    MIGRATIONS,
    PROFILE_LOCK,
    clashes,
    describe,
    migrate,
    one_line,
    utc,
    version_from,
)
from bridge.store.schema import LATEST_JOIN, VERSION_COLUMNS, utc_now

_T = TypeVar("_T")
_VERSION = f"SELECT {VERSION_COLUMNS} FROM profile_versions v"
_DEFAULT = f"SELECT {VERSION_COLUMNS} FROM {LATEST_JOIN} JOIN default_profile d ON d.profile_id = p.id"

ENTRA_SCOPE = "https://ossrdbms-aad.database.windows.net/.default"
"""The scope of Entra ID tokens for Azure Database for PostgreSQL."""
TOKEN_MARGIN_S = 300.0
"""A token this close to its expiry is fetched anew before a connection uses it."""
CONNECT_TIMEOUT_S = 10
"""How long opening one connection may take (unless the URL says ``connect_timeout``)."""
POOL_TIMEOUT_S = 10.0
"""How long an operation waits for a free connection before it fails (StoreError)."""
POOL_SIZE = 4
"""Connections per store (per process) at most: replicas × workers × this must fit the server's
``max_connections`` (about 50 on the smallest Azure tier)."""


class TokenCredential(Protocol):
    """What the store needs of an Entra credential (``azure.identity.aio`` credentials are ones)."""

    async def get_token(self, *scopes: str) -> Any: ...


class EntraPassword:
    """The password of new connections: an Entra token, fetched anew when it is close to its expiry."""

    def __init__(self, credential: TokenCredential, owned: bool) -> None:
        self.credential, self.owned = credential, owned
        self._token: str | None = None
        self._expires_on = 0.0
        self._lock = asyncio.Lock()

    @property
    def current(self) -> str | None:
        """The token last fetched (to keep it out of messages)."""
        return self._token

    async def __call__(self) -> str:
        async with self._lock:
            if self._token is None or self._expires_on - time.time() < TOKEN_MARGIN_S:
                token = await self.credential.get_token(ENTRA_SCOPE)
                self._token, self._expires_on = str(token.token), float(token.expires_on)
            return self._token

    async def close(self) -> None:
        close = getattr(self.credential, "close", None)
        if self.owned and close is not None:
            await close()


async def _latest_version(conn: Conn, profile_id: int) -> int:
    cursor = await conn.execute("SELECT latest_version FROM profiles WHERE id = %s", (profile_id,))
    row = await cursor.fetchone()
    if row is None:
        raise NotFound(f"no profile {profile_id}")
    return int(row[0])


class PostgresStore:
    """A :class:`Store` in a PostgreSQL database, shared by any number of bridge instances.

    Open with :meth:`open` (or :func:`~bridge.store.open_store`), close with :meth:`close` or ``async with``.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Conn],
        where: str,
        now: Callable[[], datetime],
        entra: EntraPassword | None,
        password: str | None,
    ) -> None:
        self.where = where
        """``user@host:port/database``: the URL without its password."""
        self._pool: AsyncConnectionPool[Conn] | None = pool
        self._now = now
        self._entra = entra
        self._password = password

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        now: Callable[[], datetime] = utc_now,
        migrations: Sequence[Sequence[str]] = MIGRATIONS,
        credential: TokenCredential | None = None,
        pool_size: int = POOL_SIZE,
    ) -> PostgresStore:
        """Connect to the database at ``url`` (a ``postgresql://`` URL) and apply its migrations.

        Without a password in ``url`` the password is an Entra token from ``credential`` (default:
        ``DefaultAzureCredential``). ``now`` gives version times; ``migrations`` is for tests.
        Raises :class:`~bridge.errors.ConfigError` when the database cannot be used.
        """
        where = describe(url)
        try:
            parts = conninfo_to_dict(url)
        except psycopg.Error:
            raise ConfigError(
                "BRIDGE_DATABASE: not a readable PostgreSQL URL: use postgresql://user:password@host:port/db"
            ) from None
        password = None if parts.get("password") is None else str(parts["password"])
        base: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in parts:
            base["connect_timeout"] = CONNECT_TIMEOUT_S
        if "application_name" not in parts:
            base["application_name"] = "bridge"
        entra: EntraPassword | None = None
        if not password:
            if credential is None:
                from azure.identity.aio import DefaultAzureCredential

                entra = EntraPassword(DefaultAzureCredential(), owned=True)
            else:
                entra = EntraPassword(credential, owned=False)
        try:
            store = await cls._connect(url, base, where, now, migrations, entra, password, pool_size)
        except BaseException:
            if entra is not None:
                await entra.close()
            raise
        return store

    @classmethod
    async def _connect(
        cls,
        url: str,
        base: dict[str, Any],
        where: str,
        now: Callable[[], datetime],
        migrations: Sequence[Sequence[str]],
        entra: EntraPassword | None,
        password: str | None,
        pool_size: int,
    ) -> PostgresStore:
        async def kwargs() -> dict[str, Any]:
            return base if entra is None else {**base, "password": await entra()}

        try:
            first = await kwargs()
        except Exception as exc:  # the credential's errors are many: any of them stops start-up
            raise ConfigError(
                f"BRIDGE_DATABASE: no password in the URL, and no Entra token for {where}: "
                f"{one_line(exc)}: sign in to Azure (managed identity, az login) or put the password in "
                "the URL"
            ) from None
        secret = password or (entra.current if entra else None)
        try:
            conn = await AsyncConnection.connect(url, **first)
        except psycopg.Error as exc:
            raise ConfigError(
                f"BRIDGE_DATABASE: cannot connect to PostgreSQL {where}: {one_line(exc, secret)} "
                "(check the host, port, database, user and password or Entra role)"
            ) from None
        try:
            async with conn:
                await migrate(conn, migrations, where)
        except psycopg.Error as exc:
            raise ConfigError(
                f"BRIDGE_DATABASE: cannot set up the tables in {where}: {one_line(exc, secret)}"
            ) from None
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            url,
            kwargs=kwargs,
            min_size=1,
            max_size=max(1, pool_size),
            open=False,
            check=AsyncConnectionPool.check_connection,
            timeout=POOL_TIMEOUT_S,
            name="bridge-store",
        )
        try:
            await pool.open(wait=True, timeout=POOL_TIMEOUT_S)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, psycopg.Error):
                raise ConfigError(
                    f"BRIDGE_DATABASE: cannot connect to PostgreSQL {where}: {one_line(exc, secret)}"
                ) from None
            raise
        return cls(pool, where, now, entra, password)

    async def __aenter__(self) -> PostgresStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pool (and a credential of the store's own); later calls raise StoreError."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
            if self._entra is not None:
                await self._entra.close()

    async def _run(self, work: Callable[[Conn], Awaitable[_T]], *, write: bool = False) -> _T:
        """Run ``work`` in one transaction; a profile write holds :data:`PROFILE_LOCK` through it."""
        pool = self._pool
        if pool is None:
            raise StoreError("the store is closed")
        try:
            async with pool.connection() as conn, conn.transaction():
                if write:
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PROFILE_LOCK,))
                return await work(conn)
        except psycopg.Error as exc:
            secret = self._password or (self._entra.current if self._entra else None)
            raise StoreError(f"database {self.where}: {one_line(exc, secret)}") from None

    # --- profiles ---

    async def list_profiles(self) -> list[ProfileSummary]:
        """Every profile's latest version, by name."""

        async def work(conn: Conn) -> list[ProfileSummary]:
            found = await rows(
                conn,
                f"SELECT d.profile_id IS NOT NULL, {VERSION_COLUMNS} FROM {LATEST_JOIN} "
                "LEFT JOIN default_profile d ON d.profile_id = p.id ORDER BY lower(p.name), p.id",
            )
            return [ProfileSummary(int(row[1]), version_from(row[1:]), bool(row[0])) for row in found]

        return await self._run(work)

    async def get(self, profile_id: int, version: int | None = None) -> ProfileVersion:
        """One version (default: the latest); raises :class:`NotFound`."""

        async def work(conn: Conn) -> ProfileVersion:
            if version is None:
                row = await one(
                    conn, f"SELECT {VERSION_COLUMNS} FROM {LATEST_JOIN} WHERE p.id = %s", (profile_id,)
                )
                if row is None:
                    raise NotFound(f"no profile {profile_id}")
            else:
                row = await one(
                    conn,
                    f"{_VERSION} WHERE v.profile_id = %s AND v.version = %s",
                    (profile_id, version),
                )
                if row is None:
                    await _latest_version(conn, profile_id)
                    raise NotFound(f"profile {profile_id} has no version {version}")
            return version_from(row)

        return await self._run(work)

    async def history(self, profile_id: int) -> list[ProfileVersion]:
        """Every version of a profile, newest first; raises :class:`NotFound`."""

        async def work(conn: Conn) -> list[ProfileVersion]:
            await _latest_version(conn, profile_id)
            found = await rows(
                conn,
                f"SELECT {VERSION_COLUMNS} FROM profile_versions v WHERE v.profile_id = %s "
                "ORDER BY v.version DESC",
                (profile_id,),
            )
            return [version_from(row) for row in found]

        return await self._run(work)

    async def create(self, profile: Profile, *, author: str, comment: str = "") -> ProfileVersion:
        """A new profile at version 1 (the first becomes the default); raises :class:`Conflict`."""
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
        """Write several profiles in one transaction: all of them, or (on any error) none; names and
        numbers are checked against the state after all the changes. Raises like :meth:`save`."""
        ids = [change.profile_id for change in changes if change.profile_id is not None]
        if len(set(ids)) != len(ids):
            raise LocalError("save_many: a profile appears twice")
        normal = [(change, profile_from_mapping(profile_to_mapping(change.profile))) for change in changes]

        async def work(conn: Conn) -> list[ProfileVersion]:
            return await self._write(conn, normal, author, comment)

        return await self._run(work, write=True)

    async def rollback(
        self, profile_id: int, to_version: int, *, expected_version: int, author: str, comment: str = ""
    ) -> ProfileVersion:
        """A new version with the content (and greeting audio) of ``to_version``; raises like :meth:`save`."""

        async def work(conn: Conn) -> ProfileVersion:
            await _latest_version(conn, profile_id)
            row = await one(
                conn,
                f"SELECT {VERSION_COLUMNS}, v.greeting_audio FROM profile_versions v "
                "WHERE v.profile_id = %s AND v.version = %s",
                (profile_id, to_version),
            )
            if row is None:
                raise NotFound(f"profile {profile_id} has no version {to_version}")
            old = version_from(row[:-1])
            change = ProfileChange(old.profile, profile_id, expected_version)
            note = comment or f"rollback to version {to_version}"
            audio = None if row[-1] is None else bytes(row[-1])
            (written,) = await self._write(conn, [(change, old.profile)], author, note, to_version, audio)
            return written

        return await self._run(work, write=True)

    async def _write(
        self,
        conn: Conn,
        changes: Sequence[tuple[ProfileChange, Profile]],
        author: str,
        comment: str,
        rolled_back_from: int | None = None,
        greeting_audio: bytes | None = None,
    ) -> list[ProfileVersion]:
        for change, _ in changes:
            if change.profile_id is not None:
                current = await _latest_version(conn, change.profile_id)
                if current != change.expected_version:
                    raise StaleVersion(change.profile_id, change.expected_version, current)
        problems = clashes(
            await rows(conn, "SELECT id, name FROM profiles"),
            await rows(
                conn, "SELECT r.number, p.id, p.name FROM routes r JOIN profiles p ON p.id = r.profile_id"
            ),
            [(change.profile_id, profile) for change, profile in changes],
        )
        if problems:
            raise Conflict(problems)
        created_at = utc(self._now())
        written: list[ProfileVersion] = []
        for change, profile in changes:
            if change.profile_id is None:
                row = await one(
                    conn,
                    "INSERT INTO profiles (name, latest_version, created_at) VALUES (%s, 1, %s) RETURNING id",
                    (profile.name, created_at),
                )
                assert row is not None
                profile_id, version = int(row[0]), 1
            else:
                profile_id, version = change.profile_id, change.expected_version + 1
                await conn.execute(
                    "UPDATE profiles SET name = %s, latest_version = %s WHERE id = %s",
                    (profile.name, version, profile_id),
                )
                await conn.execute("DELETE FROM routes WHERE profile_id = %s", (profile_id,))
            await conn.execute(
                "INSERT INTO profile_versions (profile_id, version, data, author, created_at, comment, "
                "rolled_back_from, greeting_audio) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    profile_id,
                    version,
                    _profile_json(profile),
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
                    created_at=created_at,
                    comment=comment,
                    rolled_back_from=rolled_back_from,
                    has_greeting_audio=greeting_audio is not None,
                )
            )
        # Routes after every old route of the changed profiles is gone, so that numbers may move between them.
        async with conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO routes (number, profile_id) VALUES (%s, %s)",
                [(number, saved.profile_id) for saved in written for number in saved.profile.numbers],
            )
        if written and await one(conn, "SELECT 1 FROM default_profile") is None:
            await conn.execute(
                "INSERT INTO default_profile (profile_id) VALUES (%s)", (written[0].profile_id,)
            )
        return written

    async def set_default(self, profile_id: int) -> None:
        """Make this the profile for numbers no profile claims; raises :class:`NotFound`."""

        async def work(conn: Conn) -> None:
            await _latest_version(conn, profile_id)
            await conn.execute(
                "INSERT INTO default_profile (profile_id) VALUES (%s) "
                "ON CONFLICT (one) DO UPDATE SET profile_id = excluded.profile_id",
                (profile_id,),
            )

        await self._run(work, write=True)

    async def default_profile(self) -> ProfileVersion | None:
        """The default profile's latest version (``None`` in an empty store)."""

        async def work(conn: Conn) -> ProfileVersion | None:
            row = await one(
                conn,
                _DEFAULT,
            )
            return None if row is None else version_from(row)

        return await self._run(work)

    async def for_number(self, number: str) -> ProfileVersion | None:
        """The latest version of the profile routing ``number`` (E.164), else the default's."""
        number = re.sub(r"[\s().-]", "", number)

        async def work(conn: Conn) -> ProfileVersion | None:
            row = await one(
                conn,
                f"SELECT {VERSION_COLUMNS} FROM {LATEST_JOIN} JOIN routes r ON r.profile_id = p.id "
                "WHERE r.number = %s",
                (number,),
            )
            if row is None:
                row = await one(
                    conn,
                    _DEFAULT,
                )
            return None if row is None else version_from(row)

        return await self._run(work)

    # --- greetings ---

    async def set_greeting_audio(self, profile_id: int, version: int, audio: bytes) -> None:
        """Store a version's pre-rendered greeting (raw μ-law, 8 kHz); raises :class:`NotFound`."""
        data = bytes(audio)

        async def work(conn: Conn) -> None:
            cursor = await conn.execute(
                "UPDATE profile_versions SET greeting_audio = %s WHERE profile_id = %s AND version = %s",
                (data, profile_id, version),
            )
            if cursor.rowcount == 0:
                raise NotFound(f"profile {profile_id} has no version {version}")

        await self._run(work)

    async def greeting_audio(self, profile_id: int, version: int) -> bytes | None:
        """A version's pre-rendered greeting, or ``None`` (also for an unknown version)."""

        async def work(conn: Conn) -> bytes | None:
            row = await one(
                conn,
                "SELECT greeting_audio FROM profile_versions WHERE profile_id = %s AND version = %s",
                (profile_id, version),
            )
            return None if row is None or row[0] is None else bytes(row[0])

        return await self._run(work)

    # --- calls, answers, stream claims, beats, admin sessions (the SQL is bridge.store.postgres_calls) ---

    async def start_call(self, record: CallRecord) -> None:
        """Write a call's record as it starts; raises :class:`Conflict` when the CallSid has one."""
        await self._run(postgres_calls.start_call(record))

    async def add_call(self, record: CallRecord) -> None:
        """Write a call's final record over its own (in progress, or interrupted while its instance was
        silent), or new; raises :class:`Conflict` when another call's record holds the CallSid."""
        await self._run(postgres_calls.finish_call(record))

    async def calls(
        self, *, limit: int = 50, before: datetime | None = None, profile_id: int | None = None
    ) -> list[CallRecord]:
        """Call records, newest first: at most ``limit``, started before ``before``, of one profile."""
        return await self._run(postgres_calls.calls(limit, before, profile_id))

    async def call(self, call_sid: str) -> CallRecord:
        """One call record; raises :class:`NotFound`."""
        return await self._run(postgres_calls.call(call_sid))

    async def interrupt_calls(self, *, stale_before: datetime, restarted: str | None = None) -> int:
        """Mark interrupted what instances silent since ``stale_before``, and ``restarted``'s last run,
        left in progress; how many."""
        return await self._run(postgres_calls.interrupt_calls(stale_before, restarted))

    async def heartbeat(self, instance: str) -> None:
        """Note that ``instance`` is alive now."""
        await self._run(postgres_calls.heartbeat(instance, self._now()))

    async def answer_call(self, call_sid: str, token_nonce: str, token_expiry: float) -> Answer | None:
        """Record the first answer to ``call_sid`` (``None``), else return the earlier :class:`Answer`."""
        return await self._run(postgres_calls.answer_call(call_sid, token_nonce, token_expiry, self._now()))

    async def claim_stream(self, call_sid: str) -> bool:
        """Whether this is ``call_sid``'s first media stream ever (then it is recorded)."""
        return await self._run(postgres_calls.claim_stream(call_sid, self._now()))

    async def add_admin_session(self, sid: str, user: str, expires_at: datetime) -> None:
        """Keep a new admin session (and forget expired ones)."""
        await self._run(postgres_calls.add_admin_session(sid, user, expires_at, self._now()))

    async def admin_session(self, sid: str) -> AdminSession | None:
        """A live admin session; ``None`` when unknown, expired or signed out."""
        return await self._run(postgres_calls.admin_session(sid, self._now()))

    async def revoke_admin_session(self, sid: str) -> None:
        """Sign a session out, for good and on every instance."""
        await self._run(postgres_calls.revoke_admin_session(sid, self._now()))


def _profile_json(profile: Profile) -> str:
    return json.dumps(profile_to_mapping(profile), ensure_ascii=False)

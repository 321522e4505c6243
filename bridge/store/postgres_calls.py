"""The PostgreSQL store's work on calls: records, answers and stream claims, instances, admin sessions.

Each function returns the ``work`` that :class:`~bridge.store.postgres.PostgresStore` runs in one
transaction. Every check-and-write is one conditional statement (``INSERT … ON CONFLICT``), the same as
SQLite's in :mod:`bridge.store.calls_sql`: atomic across instances without a lock.
"""

# SQL text is composed from this module's constants only; values always go through placeholders.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from bridge.store.base import AdminSession, Answer, CallRecord, CallStatus, Conflict, NotFound
from bridge.store.calls_sql import INTERRUPTED
from bridge.store.postgres_schema import CALL_PLACEHOLDERS, CALL_UPDATES, call_from, call_params, utc
from bridge.store.schema import CALL_COLUMNS

Conn = AsyncConnection[tuple[Any, ...]]
Work = Callable[[Conn], Awaitable[Any]]


async def one(conn: Conn, query: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
    """The first row of ``query``, or ``None``."""
    cursor = await conn.execute(query, params)
    return await cursor.fetchone()


async def rows(conn: Conn, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Every row of ``query``."""
    cursor = await conn.execute(query, params)
    return await cursor.fetchall()


def start_call(record: CallRecord) -> Callable[[Conn], Awaitable[None]]:
    """Insert ``record`` as in progress; :class:`Conflict` when its CallSid has a record already."""
    values = call_params(record)

    async def work(conn: Conn) -> None:
        cursor = await conn.execute(
            f"INSERT INTO calls ({CALL_COLUMNS}) VALUES ({CALL_PLACEHOLDERS}) "
            "ON CONFLICT (call_sid) DO NOTHING",
            values,
        )
        if cursor.rowcount == 0:
            raise Conflict({"call_sid": f"{record.call_sid} already has a call record"})

    return work


def finish_call(record: CallRecord) -> Callable[[Conn], Awaitable[None]]:
    """Write ``record`` over its own record (same CallSid and start, in progress, or taken for
    interrupted while its instance was silent), or as a new one."""
    values = call_params(record)

    async def work(conn: Conn) -> None:
        cursor = await conn.execute(
            f"INSERT INTO calls ({CALL_COLUMNS}) VALUES ({CALL_PLACEHOLDERS}) "
            f"ON CONFLICT (call_sid) DO UPDATE SET {CALL_UPDATES} "
            "WHERE calls.started_at = excluded.started_at AND (calls.status = 'in progress' OR "
            "(calls.status = 'interrupted' AND calls.instance = excluded.instance))",
            values,
        )
        if cursor.rowcount == 0:
            raise Conflict({"call_sid": f"{record.call_sid} belongs to another call's record"})

    return work


def calls(
    limit: int, before: datetime | None, profile_id: int | None
) -> Callable[[Conn], Awaitable[list[CallRecord]]]:
    """Call records, newest first: at most ``limit``, started before ``before``, of one profile."""
    where: list[str] = []
    params: list[Any] = []
    if before is not None:
        where.append("started_at < %s")
        params.append(utc(before))
    if profile_id is not None:
        where.append("profile_id = %s")
        params.append(profile_id)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    params.append(max(0, limit))

    async def work(conn: Conn) -> list[CallRecord]:
        found = await rows(
            conn,
            f"SELECT {CALL_COLUMNS} FROM calls {clause} ORDER BY started_at DESC, call_sid DESC LIMIT %s",
            params,
        )
        return [call_from(row) for row in found]

    return work


def call(call_sid: str) -> Callable[[Conn], Awaitable[CallRecord]]:
    """One call record; :class:`NotFound`."""

    async def work(conn: Conn) -> CallRecord:
        row = await one(conn, f"SELECT {CALL_COLUMNS} FROM calls WHERE call_sid = %s", (call_sid,))
        if row is None:
            raise NotFound(f"no call {call_sid}")
        return call_from(row)

    return work


def interrupt_calls(stale_before: datetime, restarted: str | None) -> Callable[[Conn], Awaitable[int]]:
    """Mark interrupted what a silent instance, or ``restarted`` (its last run), left in progress."""

    async def work(conn: Conn) -> int:
        # The end is the instance's last beat (when it was last known alive), never before the start.
        cursor = await conn.execute(
            "UPDATE calls SET status = %s, end_reason = %s, ended_at = GREATEST(started_at, COALESCE("
            "(SELECT seen_at FROM instances i WHERE i.id = calls.instance), started_at)) "
            "WHERE status = 'in progress' AND (instance = %s OR instance NOT IN "
            "(SELECT id FROM instances WHERE seen_at >= %s))",
            (CallStatus.INTERRUPTED.value, INTERRUPTED, restarted, utc(stale_before)),
        )
        return cursor.rowcount

    return work


def heartbeat(instance: str, now: datetime) -> Callable[[Conn], Awaitable[None]]:
    """Note that ``instance`` is alive at ``now``."""

    async def work(conn: Conn) -> None:
        await conn.execute(
            "INSERT INTO instances (id, seen_at) VALUES (%s, %s) "
            "ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
            (instance, utc(now)),
        )

    return work


def answer_call(
    call_sid: str, nonce: str, expiry: float, now: datetime
) -> Callable[[Conn], Awaitable[Answer | None]]:
    """Record the first answer to ``call_sid``; else return the earlier one, unchanged."""

    async def work(conn: Conn) -> Answer | None:
        cursor = await conn.execute(
            "INSERT INTO call_answers (call_sid, answered_at, token_nonce, token_expiry) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (call_sid) DO NOTHING",
            (call_sid, utc(now), nonce, float(expiry)),
        )
        if cursor.rowcount == 1:
            return None
        # Read committed: this statement sees the row whose insert the one above waited for.
        row = await one(
            conn,
            "SELECT answered_at, token_nonce, token_expiry, streamed_at IS NOT NULL "
            "FROM call_answers WHERE call_sid = %s",
            (call_sid,),
        )
        if row is None:
            raise NotFound(f"no answer to {call_sid}")
        return Answer(call_sid, utc(row[0]), str(row[1]), float(row[2]), bool(row[3]))

    return work


def claim_stream(call_sid: str, now: datetime) -> Callable[[Conn], Awaitable[bool]]:
    """Claim ``call_sid``'s one media stream; False when a stream had it already."""

    async def work(conn: Conn) -> bool:
        # A stream whose answer is not recorded (the store was down at the webhook) claims a new row.
        cursor = await conn.execute(
            "INSERT INTO call_answers (call_sid, answered_at, token_nonce, token_expiry, streamed_at) "
            "VALUES (%s, %s, '', 0, %s) ON CONFLICT (call_sid) DO UPDATE SET "
            "streamed_at = excluded.streamed_at WHERE call_answers.streamed_at IS NULL",
            (call_sid, utc(now), utc(now)),
        )
        return cursor.rowcount == 1

    return work


def add_admin_session(
    sid: str, user: str, expires_at: datetime, now: datetime
) -> Callable[[Conn], Awaitable[None]]:
    """Keep a new admin session; forget those that have expired."""

    async def work(conn: Conn) -> None:
        await conn.execute("DELETE FROM admin_sessions WHERE expires_at <= %s", (utc(now),))
        await conn.execute(
            "INSERT INTO admin_sessions (sid, user_name, created_at, expires_at) VALUES (%s, %s, %s, %s)",
            (sid, user, utc(now), utc(expires_at)),
        )

    return work


def admin_session(sid: str, now: datetime) -> Callable[[Conn], Awaitable[AdminSession | None]]:
    """The live session ``sid``, or ``None``."""

    async def work(conn: Conn) -> AdminSession | None:
        row = await one(
            conn,
            "SELECT user_name, expires_at FROM admin_sessions "
            "WHERE sid = %s AND revoked_at IS NULL AND expires_at > %s",
            (sid, utc(now)),
        )
        return None if row is None else AdminSession(sid, str(row[0]), utc(row[1]))

    return work


def revoke_admin_session(sid: str, now: datetime) -> Callable[[Conn], Awaitable[None]]:
    """Sign ``sid`` out."""

    async def work(conn: Conn) -> None:
        await conn.execute(
            "UPDATE admin_sessions SET revoked_at = %s WHERE sid = %s AND revoked_at IS NULL", (utc(now), sid)
        )

    return work

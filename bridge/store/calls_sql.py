"""The SQLite store's work on calls: records, answers and stream claims, instances, admin sessions.

Each function here returns the ``work`` that :class:`~bridge.store.sqlite.SQLiteStore` runs in one
transaction (write transactions take the write lock up front, so a check and its write see the same
database, across processes sharing the file). The tables are migration 4 of :mod:`bridge.store.schema`.
"""

# SQL text is composed from this module's constants only; values always go through placeholders.
# ruff: noqa: S608

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime
from typing import Any

from bridge.store.base import AdminSession, Answer, CallRecord, CallStatus, Conflict, NotFound
from bridge.store.schema import CALL_COLUMNS, call_of, call_values, parse_time, time_text

_PLACEHOLDERS = ", ".join("?" * len(CALL_COLUMNS.split(",")))
_UPDATES = ", ".join(f"{c.strip()} = excluded.{c.strip()}" for c in CALL_COLUMNS.split(",")[1:])
INTERRUPTED = "the bridge stopped during the call (a crash or a forced restart)"
"""The end reason of a record found in progress after its instance stopped."""


def start_call(record: CallRecord) -> Callable[[sqlite3.Connection], None]:
    """Insert ``record`` as in progress; :class:`Conflict` when its CallSid has a record already."""
    values = call_values(record)

    def work(conn: sqlite3.Connection) -> None:
        try:
            conn.execute(f"INSERT INTO calls ({CALL_COLUMNS}) VALUES ({_PLACEHOLDERS})", values)
        except sqlite3.IntegrityError:
            raise Conflict({"call_sid": f"{record.call_sid} already has a call record"}) from None

    return work


def finish_call(record: CallRecord) -> Callable[[sqlite3.Connection], None]:
    """Write ``record`` over its own record (same CallSid and start, in progress, or taken for
    interrupted while its instance was silent), or as a new one."""
    values = call_values(record)

    def work(conn: sqlite3.Connection) -> None:
        cursor = conn.execute(
            f"INSERT INTO calls ({CALL_COLUMNS}) VALUES ({_PLACEHOLDERS}) "
            f"ON CONFLICT (call_sid) DO UPDATE SET {_UPDATES} "
            "WHERE calls.started_at = excluded.started_at AND (calls.status = 'in progress' OR "
            "(calls.status = 'interrupted' AND calls.instance = excluded.instance))",
            values,
        )
        if cursor.rowcount == 0:
            raise Conflict({"call_sid": f"{record.call_sid} belongs to another call's record"})

    return work


def calls(
    limit: int, before: datetime | None, profile_id: int | None
) -> Callable[[sqlite3.Connection], list[CallRecord]]:
    """Call records, newest first: at most ``limit``, started before ``before``, of one profile."""
    where: list[str] = []
    params: list[Any] = []
    if before is not None:
        where.append("started_at < ?")
        params.append(time_text(before))
    if profile_id is not None:
        where.append("profile_id = ?")
        params.append(profile_id)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    params.append(max(0, limit))

    def work(conn: sqlite3.Connection) -> list[CallRecord]:
        rows = conn.execute(
            f"SELECT {CALL_COLUMNS} FROM calls {clause} ORDER BY started_at DESC, call_sid DESC LIMIT ?",
            params,
        ).fetchall()
        return [call_of(row) for row in rows]

    return work


def call(call_sid: str) -> Callable[[sqlite3.Connection], CallRecord]:
    """One call record; :class:`NotFound`."""

    def work(conn: sqlite3.Connection) -> CallRecord:
        row = conn.execute(f"SELECT {CALL_COLUMNS} FROM calls WHERE call_sid = ?", (call_sid,)).fetchone()
        if row is None:
            raise NotFound(f"no call {call_sid}")
        return call_of(row)

    return work


def interrupt_calls(stale_before: datetime, restarted: str | None) -> Callable[[sqlite3.Connection], int]:
    """Mark interrupted what a silent instance, or ``restarted`` (its last run), left in progress."""

    def work(conn: sqlite3.Connection) -> int:
        # The end is the instance's last beat (when it was last known alive), never before the start.
        cursor = conn.execute(
            "UPDATE calls SET status = ?, end_reason = ?, ended_at = MAX(started_at, COALESCE("
            "(SELECT seen_at FROM instances i WHERE i.id = calls.instance), started_at)) "
            "WHERE status = 'in progress' AND (instance = ? OR instance NOT IN "
            "(SELECT id FROM instances WHERE seen_at >= ?))",
            (CallStatus.INTERRUPTED.value, INTERRUPTED, restarted, time_text(stale_before)),
        )
        return cursor.rowcount

    return work


def heartbeat(instance: str, now: datetime) -> Callable[[sqlite3.Connection], None]:
    """Note that ``instance`` is alive at ``now``."""

    def work(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO instances (id, seen_at) VALUES (?, ?) "
            "ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
            (instance, time_text(now)),
        )

    return work


def answer_call(
    call_sid: str, nonce: str, expiry: float, now: datetime
) -> Callable[[sqlite3.Connection], Answer | None]:
    """Record the first answer to ``call_sid``; else return the earlier one, unchanged."""

    def work(conn: sqlite3.Connection) -> Answer | None:
        cursor = conn.execute(
            "INSERT INTO call_answers (call_sid, answered_at, token_nonce, token_expiry) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (call_sid) DO NOTHING",
            (call_sid, time_text(now), nonce, expiry),
        )
        if cursor.rowcount == 1:
            return None
        row = conn.execute(
            "SELECT answered_at, token_nonce, token_expiry, streamed_at IS NOT NULL "
            "FROM call_answers WHERE call_sid = ?",
            (call_sid,),
        ).fetchone()
        return Answer(call_sid, parse_time(row[0]), str(row[1]), float(row[2]), bool(row[3]))

    return work


def claim_stream(call_sid: str, now: datetime) -> Callable[[sqlite3.Connection], bool]:
    """Claim ``call_sid``'s one media stream; False when a stream had it already."""

    def work(conn: sqlite3.Connection) -> bool:
        # A stream whose answer is not recorded (the store was down at the webhook) claims a new row.
        cursor = conn.execute(
            "INSERT INTO call_answers (call_sid, answered_at, token_nonce, token_expiry, streamed_at) "
            "VALUES (?, ?, '', 0, ?) ON CONFLICT (call_sid) DO UPDATE SET streamed_at = excluded.streamed_at "
            "WHERE call_answers.streamed_at IS NULL",
            (call_sid, time_text(now), time_text(now)),
        )
        return cursor.rowcount == 1

    return work


def add_admin_session(
    sid: str, user: str, expires_at: datetime, now: datetime
) -> Callable[[sqlite3.Connection], None]:
    """Keep a new admin session; forget those that have expired."""

    def work(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM admin_sessions WHERE expires_at <= ?", (time_text(now),))
        conn.execute(
            "INSERT INTO admin_sessions (sid, user, created_at, expires_at) VALUES (?, ?, ?, ?)",
            (sid, user, time_text(now), time_text(expires_at)),
        )

    return work


def admin_session(sid: str, now: datetime) -> Callable[[sqlite3.Connection], AdminSession | None]:
    """The live session ``sid``, or ``None``."""

    def work(conn: sqlite3.Connection) -> AdminSession | None:
        row = conn.execute(
            "SELECT user, expires_at FROM admin_sessions "
            "WHERE sid = ? AND revoked_at IS NULL AND expires_at > ?",
            (sid, time_text(now)),
        ).fetchone()
        return None if row is None else AdminSession(sid, str(row[0]), parse_time(row[1]))

    return work


def revoke_admin_session(sid: str, now: datetime) -> Callable[[sqlite3.Connection], None]:
    """Sign ``sid`` out."""

    def work(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE admin_sessions SET revoked_at = ? WHERE sid = ? AND revoked_at IS NULL",
            (time_text(now), sid),
        )

    return work

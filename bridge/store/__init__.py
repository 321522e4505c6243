"""The store: prompt profiles with their version history, pre-rendered greetings and call records.

``open_store(database)`` picks the backend that ``BRIDGE_DATABASE`` names; the rest of the bridge sees only
the :class:`Store` protocol (:mod:`bridge.store.base`). Backends: SQLite (:mod:`bridge.store.sqlite`,
its tables in :mod:`bridge.store.schema`), the default; PostgreSQL for ``postgresql://`` URLs
(:mod:`bridge.store.postgres`, its tables in :mod:`bridge.store.postgres_schema`).
``bridge prompts export|import`` is :mod:`bridge.store.cli`.
"""

from __future__ import annotations

from bridge.errors import StoreError
from bridge.store.base import (
    AdminSession,
    Answer,
    CallRecord,
    CallStatus,
    Conflict,
    ModelSession,
    NotFound,
    ProfileChange,
    ProfileSummary,
    ProfileVersion,
    StaleVersion,
    Store,
    UnreadableProfile,
    postgres_url,
    redacted,
    sqlite_path,
)
from bridge.store.postgres import PostgresStore
from bridge.store.sqlite import SQLiteStore

__all__ = [
    "AdminSession",
    "Answer",
    "CallRecord",
    "CallStatus",
    "Conflict",
    "ModelSession",
    "NotFound",
    "PostgresStore",
    "ProfileChange",
    "ProfileSummary",
    "ProfileVersion",
    "SQLiteStore",
    "StaleVersion",
    "Store",
    "StoreError",
    "UnreadableProfile",
    "open_store",
    "postgres_url",
    "redacted",
    "sqlite_path",
]


async def open_store(database: str) -> Store:
    """Open the store that ``BRIDGE_DATABASE`` names: PostgreSQL for a ``postgresql://`` URL (see
    :func:`postgres_url`), else a SQLite file (see :func:`sqlite_path`); raises ConfigError."""
    url = postgres_url(database)
    if url is not None:
        return await PostgresStore.open(url)
    return await SQLiteStore.open(sqlite_path(database))

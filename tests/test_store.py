"""The store's contract on SQLite and on PostgreSQL: versions, optimistic concurrency, routing, greetings,
calls, answers, stream claims, admin sessions; then each backend's own concerns (migrations, files, URLs).

Every test taking ``store`` or ``backend`` runs on both backends; PostgreSQL is a throw-away server that
tests/postgres_support.py starts (installing Debian's postgresql when missing)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from bridge.errors import ConfigError
from bridge.prompts import Profile, ProfileError, Transcription, TurnDetection
from bridge.store import (
    AdminSession,
    CallRecord,
    CallStatus,
    Conflict,
    ModelSession,
    NotFound,
    PostgresStore,
    ProfileChange,
    StaleVersion,
    Store,
    StoreError,
    UnreadableProfile,
    open_store,
    redacted,
    sqlite_path,
)
from bridge.store.postgres import ENTRA_SCOPE, EntraPassword
from bridge.store.postgres_schema import MIGRATIONS as PG_MIGRATIONS
from bridge.store.schema import MIGRATIONS, call_values, connect, utc_now
from bridge.store.sqlite import SQLiteStore
from tests.postgres_support import ENTRA_ROLE, ENTRA_TOKEN, TEST_PASSWORD, PostgresServer

AnyStore = SQLiteStore | PostgresStore

SALES = Profile(name="sales", instructions="Sell.", numbers=("+14155550100", "+14155550101"))
SUPPORT = Profile(
    name="support",
    voice="marin",
    transcription=Transcription(language="en"),
    turn_detection=TurnDetection(type="semantic_vad", eagerness="high"),
    numbers=("+14155550200",),
)


class Backend:
    """One database of one backend: stores opened on it share it, as instances share one database."""

    def __init__(self, name: str, where: str) -> None:
        self.name, self.where = name, where

    async def open(self, now: Callable[[], datetime] = utc_now) -> AnyStore:
        if self.name == "sqlite":
            return await SQLiteStore.open(self.where, now=now)
        return await PostgresStore.open(self.where, now=now)

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Run ``sql`` (``?`` placeholders) on the database directly, behind the stores' backs."""
        if self.name == "sqlite":
            with sqlite3.connect(self.where) as conn:
                found = conn.execute(sql, params).fetchall()
            conn.close()
            return found
        with psycopg.connect(self.where, autocommit=True) as pg:
            cursor = pg.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "bridge.sqlite3"))
    return Backend("postgresql", request.getfixturevalue("postgres_database"))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[AnyStore]:
    async with await backend.open() as opened:
        yield opened


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    conn.close()
    return version


def indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    return names


async def test_it_is_a_store(store: AnyStore) -> None:
    as_protocol: Store = store
    assert await as_protocol.list_profiles() == []


async def test_create_get_and_history(store: AnyStore) -> None:
    created = await store.create(SUPPORT, author="ana", comment="first")
    assert (created.version, created.author, created.comment, created.rolled_back_from) == (
        1,
        "ana",
        "first",
        None,
    )
    assert created.profile == SUPPORT and not created.has_greeting_audio
    assert created.created_at.tzinfo is UTC
    assert await store.get(created.profile_id) == created
    assert await store.get(created.profile_id, 1) == created

    changed = dataclasses.replace(SUPPORT, instructions="Help, briefly.")
    saved = await store.save(created.profile_id, changed, expected_version=1, author="bo", comment="shorter")
    assert (saved.version, saved.author, saved.profile) == (2, "bo", changed)
    assert await store.get(created.profile_id) == saved
    assert [v.version for v in await store.history(created.profile_id)] == [2, 1]

    with pytest.raises(NotFound):
        await store.get(99)
    with pytest.raises(NotFound):
        await store.get(created.profile_id, 3)
    with pytest.raises(NotFound):
        await store.history(99)
    with pytest.raises(NotFound):
        await store.save(99, SALES, expected_version=1, author="x")


async def test_version_times_come_from_the_injected_clock(backend: Backend) -> None:
    moment = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    async with await backend.open(now=lambda: moment) as store:
        created = await store.create(SALES, author="a")
        assert created.created_at == moment and created.created_at.tzinfo is UTC
        assert (await store.get(created.profile_id)).created_at == datetime(2025, 3, 1, 10, 0, 0, 123456, UTC)


async def test_old_versions_never_change(store: AnyStore) -> None:
    v1 = await store.create(SALES, author="a")
    snapshot = dataclasses.replace(v1)
    await store.save(v1.profile_id, dataclasses.replace(SALES, voice="echo"), expected_version=1, author="b")
    assert v1 == snapshot and v1.profile.voice == "alloy"
    assert await store.get(v1.profile_id, 1) == snapshot
    assert (await store.get(v1.profile_id)).profile.voice == "echo"
    with pytest.raises(dataclasses.FrozenInstanceError):
        v1.version = 5  # type: ignore[misc]


async def test_a_stale_save_is_refused_and_changes_nothing(store: AnyStore) -> None:
    v1 = await store.create(SALES, author="a")
    await store.save(v1.profile_id, dataclasses.replace(SALES, voice="echo"), expected_version=1, author="a")
    with pytest.raises(StaleVersion) as info:
        await store.save(
            v1.profile_id, dataclasses.replace(SALES, voice="sage"), expected_version=1, author="b"
        )
    assert (info.value.profile_id, info.value.expected, info.value.current) == (v1.profile_id, 1, 2)
    assert len(await store.history(v1.profile_id)) == 2
    assert (await store.get(v1.profile_id)).profile.voice == "echo"


async def test_concurrent_saves_from_one_version_one_wins(store: AnyStore) -> None:
    v1 = await store.create(SALES, author="a")
    edits = [dataclasses.replace(SALES, voice="echo"), dataclasses.replace(SALES, voice="sage")]
    results = await asyncio.gather(
        *(store.save(v1.profile_id, p, expected_version=1, author=p.voice) for p in edits),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], StaleVersion)
    assert lost[0].current == 2
    assert won[0].version == 2
    assert await store.get(v1.profile_id) == won[0]
    assert [v.version for v in await store.history(v1.profile_id)] == [2, 1]


async def test_concurrent_saves_through_two_stores_on_one_database(backend: Backend) -> None:
    async with await backend.open() as first, await backend.open() as second:
        v1 = await first.create(SALES, author="a")
        for round_ in range(5):
            expected = v1.version + round_
            results = await asyncio.gather(
                first.save(
                    v1.profile_id,
                    dataclasses.replace(SALES, voice="echo"),
                    expected_version=expected,
                    author="1",
                ),
                second.save(
                    v1.profile_id,
                    dataclasses.replace(SALES, voice="sage"),
                    expected_version=expected,
                    author="2",
                ),
                return_exceptions=True,
            )
            won = [r for r in results if not isinstance(r, BaseException)]
            lost = [r for r in results if isinstance(r, BaseException)]
            assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], StaleVersion), results
            assert won[0].version == expected + 1
            assert await first.get(v1.profile_id) == won[0] == await second.get(v1.profile_id)
        assert len(await second.history(v1.profile_id)) == 6


async def test_rollback_writes_a_new_version_with_old_content(store: AnyStore) -> None:
    v1 = await store.create(SALES, author="a")
    await store.set_greeting_audio(v1.profile_id, 1, b"\xff" * 80)
    v2 = await store.save(
        v1.profile_id, dataclasses.replace(SALES, greeting="Hi."), expected_version=1, author="a"
    )
    v3 = await store.rollback(v1.profile_id, 1, expected_version=2, author="b")
    assert (v3.version, v3.profile, v3.rolled_back_from, v3.comment) == (3, SALES, 1, "rollback to version 1")
    assert v3.has_greeting_audio and await store.greeting_audio(v1.profile_id, 3) == b"\xff" * 80
    assert await store.get(v1.profile_id) == v3
    assert await store.get(v1.profile_id, 2) == v2

    v4 = await store.rollback(v1.profile_id, 2, expected_version=3, author="b", comment="greeting back")
    assert (v4.profile, v4.comment, v4.rolled_back_from) == (v2.profile, "greeting back", 2)
    with pytest.raises(StaleVersion):
        await store.rollback(v1.profile_id, 1, expected_version=3, author="b")
    with pytest.raises(NotFound):
        await store.rollback(v1.profile_id, 9, expected_version=4, author="b")
    with pytest.raises(NotFound):
        await store.rollback(42, 1, expected_version=1, author="b")
    assert len(await store.history(v1.profile_id)) == 4


async def test_names_are_unique_among_latest_versions(store: AnyStore) -> None:
    sales = await store.create(SALES, author="a")
    support = await store.create(SUPPORT, author="a")
    with pytest.raises(Conflict) as info:
        await store.create(Profile(name="sales"), author="a")
    assert info.value.problems == {"name": "a profile named 'sales' already exists"}
    with pytest.raises(Conflict):
        await store.save(support.profile_id, Profile(name="sales"), expected_version=1, author="a")
    # Saving under its own name is fine; renaming frees the old name.
    await store.save(
        sales.profile_id, dataclasses.replace(SALES, name="sales-east"), expected_version=1, author="a"
    )
    await store.create(Profile(name="sales"), author="a")
    # A rollback to a name now taken clashes too.
    with pytest.raises(Conflict):
        await store.rollback(sales.profile_id, 1, expected_version=2, author="a")


async def test_a_number_routes_to_at_most_one_profile(store: AnyStore) -> None:
    sales = await store.create(SALES, author="a")
    with pytest.raises(Conflict) as info:
        await store.create(Profile(name="other", numbers=("+14155550101", "+14155550999")), author="a")
    assert info.value.problems == {"numbers": "+14155550101 is already routed to profile 'sales'"}
    assert len(await store.list_profiles()) == 1

    # Once the latest version of sales gives the number up, another profile may take it.
    await store.save(
        sales.profile_id,
        dataclasses.replace(SALES, numbers=("+14155550100",)),
        expected_version=1,
        author="a",
    )
    other = await store.create(Profile(name="other", numbers=("+14155550101",)), author="a")
    assert (await store.for_number("+14155550101")) == other


async def test_for_number_and_the_default(store: AnyStore) -> None:
    assert await store.for_number("+14155550100") is None
    assert await store.default_profile() is None
    sales = await store.create(SALES, author="a")
    support = await store.create(SUPPORT, author="a")
    assert await store.default_profile() == sales  # the first profile created
    assert await store.for_number("+14155550200") == support
    assert await store.for_number("+1 (415) 555-0200") == support
    assert await store.for_number("+19995550000") == sales

    await store.set_default(support.profile_id)
    assert await store.for_number("+19995550000") == support
    with pytest.raises(NotFound):
        await store.set_default(77)
    listing = await store.list_profiles()
    assert [(s.latest.profile.name, s.is_default) for s in listing] == [("sales", False), ("support", True)]

    # Routing follows the latest version only.
    v2 = await store.save(
        sales.profile_id, dataclasses.replace(SALES, numbers=()), expected_version=1, author="a"
    )
    assert await store.for_number("+14155550100") == support
    assert (await store.get(sales.profile_id, 1)).profile.numbers == SALES.numbers
    assert (await store.list_profiles())[0].latest == v2


async def test_profiles_can_swap_numbers_in_one_save(store: AnyStore) -> None:
    sales = await store.create(SALES, author="a")
    support = await store.create(SUPPORT, author="a")
    written = await store.save_many(
        [
            ProfileChange(dataclasses.replace(SALES, numbers=SUPPORT.numbers), sales.profile_id, 1),
            ProfileChange(dataclasses.replace(SUPPORT, numbers=SALES.numbers), support.profile_id, 1),
        ],
        author="a",
        comment="swap",
    )
    assert [v.version for v in written] == [2, 2]
    assert (await store.for_number("+14155550200")).profile_id == sales.profile_id  # type: ignore[union-attr]
    assert (await store.for_number("+14155550100")).profile_id == support.profile_id  # type: ignore[union-attr]

    # All or nothing: one clash and neither profile changes.
    with pytest.raises(Conflict):
        await store.save_many(
            [
                ProfileChange(dataclasses.replace(SALES, voice="echo"), sales.profile_id, 2),
                ProfileChange(Profile(name="new", numbers=("+14155550200",))),
            ],
            author="a",
        )
    assert (await store.get(sales.profile_id)).version == 2
    assert len(await store.list_profiles()) == 2


async def test_invalid_profiles_are_not_stored(store: AnyStore) -> None:
    with pytest.raises(ProfileError) as info:
        await store.create(Profile(name="bad", numbers=("555-1234",)), author="a")
    assert "numbers" in info.value.problems
    assert await store.list_profiles() == []


async def test_greeting_audio(store: AnyStore) -> None:
    v1 = await store.create(SALES, author="a")
    assert await store.greeting_audio(v1.profile_id, 1) is None
    await store.set_greeting_audio(v1.profile_id, 1, b"\x7f\x00" * 400)
    assert await store.greeting_audio(v1.profile_id, 1) == b"\x7f\x00" * 400
    assert (await store.get(v1.profile_id)).has_greeting_audio
    assert (await store.list_profiles())[0].latest.has_greeting_audio
    v2 = await store.save(v1.profile_id, SUPPORT, expected_version=1, author="a")
    assert not v2.has_greeting_audio and await store.greeting_audio(v1.profile_id, 2) is None
    assert await store.greeting_audio(v1.profile_id, 9) is None
    with pytest.raises(NotFound):
        await store.set_greeting_audio(v1.profile_id, 9, b"x")


def record(sid: str, minute: int, **fields: object) -> CallRecord:
    start = datetime(2025, 1, 1, 9, minute, tzinfo=UTC)
    return CallRecord(sid, start, start + timedelta(seconds=42), **fields)  # type: ignore[arg-type]


async def test_calls(store: AnyStore) -> None:
    full = record(
        "CA1",
        1,
        from_number="+14155550100",
        to_number="+14155550200",
        profile_id=1,
        profile_version=2,
        end_reason="caller hung up",
        transcript=(("assistant", "Hello!"), ("caller", "Hi, ünïcode")),
        barge_ins=1,
        truncations=(("item_1", 1234),),
        latency_ms={"turn_p50": 512.5, "turn_max": 900.0},
        upstream_errors=0,
        recording_path="/rec/CA1.jsonl",
        test_call=True,
    )
    await store.add_call(full)
    assert await store.call("CA1") == full
    assert (await store.call("CA1")).duration_s == 42.0
    for index in range(2, 6):
        await store.add_call(record(f"CA{index}", index, profile_id=index % 2))
    assert [c.call_sid for c in await store.calls()] == ["CA5", "CA4", "CA3", "CA2", "CA1"]
    assert [c.call_sid for c in await store.calls(limit=2)] == ["CA5", "CA4"]
    before = datetime(2025, 1, 1, 9, 4, tzinfo=UTC)
    assert [c.call_sid for c in await store.calls(before=before)] == ["CA3", "CA2", "CA1"]
    assert [c.call_sid for c in await store.calls(profile_id=1)] == ["CA5", "CA3", "CA1"]
    assert [c.call_sid for c in await store.calls(profile_id=1, before=before, limit=1)] == ["CA3"]

    # A finished record is never overwritten by another call's on the same CallSid.
    with pytest.raises(Conflict, match="CA1"):
        await store.add_call(dataclasses.replace(full, end_reason="replaced"))
    assert (await store.call("CA1")).end_reason == "caller hung up"
    assert len(await store.calls()) == 5
    assert (await store.call("CA2")).started_at.tzinfo is UTC
    with pytest.raises(NotFound):
        await store.call("CA404")


async def test_a_new_file_gets_every_migration(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "bridge.sqlite3"
    async with await SQLiteStore.open(path):
        pass
    assert user_version(path) == len(MIGRATIONS) == 4
    assert {"calls_by_start", "calls_by_profile"} <= indexes(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


OLD_CALL_COLUMNS = (
    "call_sid, started_at, ended_at, from_number, to_number, profile_id, profile_version, end_reason, "
    "transcript, barge_ins, truncations, latency, upstream_errors, recording_path, test_call"
)
"""The calls table's columns before migration 3 (model sessions)."""


def add_old_call(path: Path, call: CallRecord) -> None:
    """Write ``call`` as a bridge from before migration 3 did: without the sessions column."""
    values = call_values(call)[:15]
    with sqlite3.connect(path) as conn:
        conn.execute(f"INSERT INTO calls ({OLD_CALL_COLUMNS}) VALUES ({', '.join('?' * 15)})", values)
    conn.close()


def call_columns(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        names = [row[1] for row in conn.execute("PRAGMA table_info(calls)")]
    conn.close()
    return names


async def test_an_old_database_is_upgraded_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    async with await SQLiteStore.open(path, migrations=MIGRATIONS[:1]) as old:
        created = await old.create(SALES, author="a")
    add_old_call(path, record("CA1", 1))
    assert user_version(path) == 1
    assert "calls_by_start" not in indexes(path)

    async with await SQLiteStore.open(path) as store:
        assert await store.get(created.profile_id) == created
        assert [c.call_sid for c in await store.calls()] == ["CA1"]
    assert user_version(path) == len(MIGRATIONS)
    assert {"calls_by_start", "calls_by_profile"} <= indexes(path)


def at(minute: int, second: int = 0, micro: int = 0) -> datetime:
    return datetime(2025, 1, 1, 9, minute, second, micro, tzinfo=UTC)


SESSIONS = (
    ModelSession(
        1, at(1), at(29, 30), began="first", ended="rolled over to session 2", session_id="sess_ABC"
    ),
    ModelSession(2, at(29, 30, 250_000), at(31, 5), "rollover", "dropped (1006) – ünïcode", "sess_DEF"),
    ModelSession(3, at(31, 6), began="reconnect"),
)


@pytest.mark.timeout(30)
async def test_call_sessions_round_trip(store: AnyStore) -> None:
    with_sessions = record("CAs", 1, end_reason="caller hung up", sessions=SESSIONS)
    without = record("CAn", 2)
    await store.add_call(with_sessions)
    await store.add_call(without)

    read = await store.call("CAs")
    assert read == with_sessions
    assert read.sessions == SESSIONS
    assert [s.number for s in read.sessions] == [1, 2, 3]
    assert all(s.started_at.tzinfo is UTC for s in read.sessions)
    assert read.sessions[1].started_at.microsecond == 250_000
    assert read.sessions[0].duration_s == 28 * 60 + 30
    assert read.sessions[2].ended_at is None and read.sessions[2].duration_s is None
    assert read.sessions[2].ended == "" and read.sessions[2].session_id == ""
    assert (await store.call("CAn")).sessions == ()
    assert {c.call_sid: len(c.sessions) for c in await store.calls()} == {"CAs": 3, "CAn": 0}

    # Completing an in-progress record replaces its sessions too.
    started = record("CAp", 3, status=CallStatus.IN_PROGRESS, sessions=SESSIONS)
    await store.start_call(started)
    await store.add_call(dataclasses.replace(started, status=CallStatus.COMPLETED, sessions=SESSIONS[:1]))
    assert (await store.call("CAp")).sessions == SESSIONS[:1]


@pytest.mark.timeout(30)
async def test_call_sessions_are_stored_as_json_with_time_text(tmp_path: Path) -> None:
    path = tmp_path / "bridge.sqlite3"
    async with await SQLiteStore.open(path) as store:
        await store.add_call(record("CAs", 1, sessions=SESSIONS[1:]))
        with sqlite3.connect(path) as conn:
            (text,) = conn.execute("SELECT sessions FROM calls WHERE call_sid = 'CAs'").fetchone()
            stored = json.loads(text)
            assert stored[0] == {
                "number": 2,
                "started_at": "2025-01-01T09:29:30.250000+00:00",
                "ended_at": "2025-01-01T09:31:05.000000+00:00",
                "began": "rollover",
                "ended": "dropped (1006) – ünïcode",
                "session_id": "sess_DEF",
            }
            assert stored[1]["ended_at"] is None
            # Written by hand, or by a bridge that knew fewer fields: what is missing takes its default.
            sparse = json.dumps([{"number": 1, "started_at": "2025-01-01T09:01:00.000000+00:00"}])
            conn.execute("UPDATE calls SET sessions = ? WHERE call_sid = 'CAs'", (sparse,))
        conn.close()
        (only,) = (await store.call("CAs")).sessions
        assert only == ModelSession(1, datetime(2025, 1, 1, 9, 1, tzinfo=UTC))
        assert (only.began, only.ended, only.ended_at) == ("first", "", None)


@pytest.mark.timeout(30)
async def test_a_database_before_sessions_is_upgraded_and_its_calls_read_without_sessions(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v2.sqlite3"
    async with await SQLiteStore.open(path, migrations=MIGRATIONS[:2]):
        pass
    assert user_version(path) == 2 and "sessions" not in call_columns(path)
    old_call = record(
        "CAold",
        1,
        from_number="+14155550100",
        profile_id=1,
        profile_version=1,
        end_reason="caller hung up",
        transcript=(("assistant", "Hello!"),),
        latency_ms={"turn_p50": 400.0},
        test_call=True,
    )
    add_old_call(path, old_call)

    async with await SQLiteStore.open(path) as store:
        assert user_version(path) == len(MIGRATIONS) == 4
        assert call_columns(path)[-3:] == ["sessions", "status", "instance"]
        read = await store.call("CAold")
        assert read == old_call and read.sessions == ()
        assert [c.sessions for c in await store.calls()] == [()]
        # New calls on the upgraded file keep their sessions.
        await store.add_call(record("CAnew", 2, sessions=SESSIONS))
        assert (await store.call("CAnew")).sessions == SESSIONS
        assert (await store.call("CAold")).sessions == ()


async def test_a_database_from_a_newer_bridge_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    async with await SQLiteStore.open(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ConfigError, match="newer bridge"):
        await SQLiteStore.open(path)


async def test_unreadable_profile_data_names_the_profile_and_the_problems(backend: Backend) -> None:
    async with await backend.open() as store:
        created = await store.create(SALES, author="a")
        data = json.dumps({"name": "sales", "voice": "alloy", "mood": "cheerful"})
        backend.execute(
            "UPDATE profile_versions SET data = ? WHERE profile_id = ?", (data, created.profile_id)
        )
        with pytest.raises(StoreError) as info:
            await store.get(created.profile_id)
        assert isinstance(info.value, UnreadableProfile)
        assert info.value.profile_id == created.profile_id and "mood" in info.value.problems
        assert f"profile {created.profile_id} version 1" in str(info.value) and "mood" in str(info.value)
        with pytest.raises(UnreadableProfile):
            await store.for_number("+14155550100")

        backend.execute("UPDATE profile_versions SET data = '[1' WHERE profile_id = ?", (created.profile_id,))
        with pytest.raises(UnreadableProfile, match="data"):
            await store.list_profiles()


async def test_a_closed_store_refuses_work(backend: Backend) -> None:
    store = await backend.open()
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.list_profiles()


async def test_open_store_accepts_paths_and_sqlite_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for database, created in [
        (str(tmp_path / "a" / "plain.sqlite3"), tmp_path / "a" / "plain.sqlite3"),
        ("sqlite:///rel/relative.sqlite3", tmp_path / "rel" / "relative.sqlite3"),
        (f"sqlite:///{tmp_path}/abs/absolute.sqlite3", tmp_path / "abs" / "absolute.sqlite3"),
    ]:
        store = await open_store(database)
        try:
            await store.create(SALES, author="a")
        finally:
            await store.close()
        assert created.is_file(), database
    assert sqlite_path("sqlite:///:memory:") == ":memory:"
    memory = await open_store("sqlite:///:memory:")
    await memory.close()


@pytest.mark.parametrize(
    ("database", "message"),
    [
        ("postgresql+asyncpg://u:secret@db/x", "BRIDGE_DATABASE: write a PostgreSQL URL as postgresql://"),
        ("mysql://db/bridge", "BRIDGE_DATABASE: 'mysql://db/bridge' is not supported"),
        ("mysql://u:secret@db/bridge", "BRIDGE_DATABASE: 'mysql://u:***@db/bridge' is not supported"),
        ("sqlite://host/x", "is not supported"),
        ("  ", "BRIDGE_DATABASE is empty"),
    ],
)
async def test_open_store_refuses_other_databases(database: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        await open_store(database)
    assert str(info.value).startswith(message) or message in str(info.value)
    assert "\n" not in str(info.value) and "secret" not in str(info.value)


async def test_unusable_files_stop_start_up_with_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database, just some text " * 100)
    with pytest.raises(ConfigError, match="not a usable SQLite database"):
        await open_store(str(junk))
    with pytest.raises(ConfigError, match="cannot open"):
        await open_store(str(tmp_path))  # a directory
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create the directory"):
        await open_store(str(blocker / "sub" / "db.sqlite3"))


@pytest.mark.timeout(30)
async def test_a_call_record_is_written_at_the_start_and_completed_at_the_end(store: AnyStore) -> None:
    started = record("CAx", 1, status=CallStatus.IN_PROGRESS, instance="host-a:8080")
    await store.start_call(started)
    assert (await store.call("CAx")).status is CallStatus.IN_PROGRESS
    # A second call on the same CallSid can neither start a record nor finish over this one.
    other = record("CAx", 5, status=CallStatus.IN_PROGRESS, instance="host-b:8080")
    with pytest.raises(Conflict):
        await store.start_call(other)
    with pytest.raises(Conflict):
        await store.add_call(dataclasses.replace(other, status=CallStatus.COMPLETED))
    done = dataclasses.replace(started, status=CallStatus.COMPLETED, end_reason="caller hung up")
    await store.add_call(done)
    assert await store.call("CAx") == done
    # Once completed, it stays: finishing it again is another call's write.
    with pytest.raises(Conflict):
        await store.add_call(dataclasses.replace(done, end_reason="again"))
    # A record whose start was never written (the store was down then) is written at the end.
    await store.add_call(record("CAy", 2))
    assert (await store.call("CAy")).status is CallStatus.COMPLETED


@pytest.mark.timeout(30)
async def test_records_left_in_progress_are_interrupted_by_their_restart_or_a_stale_beat(
    backend: Backend,
) -> None:
    clock = [datetime(2025, 1, 1, 9, 0, tzinfo=UTC)]
    async with await backend.open(now=lambda: clock[0]) as store:
        await store.heartbeat("a")
        await store.heartbeat("b")
        for sid, instance in (("CA-a", "a"), ("CA-b", "b"), ("CA-c", "c")):
            await store.start_call(record(sid, 1, status=CallStatus.IN_PROGRESS, instance=instance))
        clock[0] += timedelta(minutes=30)
        await store.heartbeat("b")
        # "a" restarts: its own calls died with it; "b" beats, "c" never did.
        fresh = clock[0] - timedelta(minutes=2)
        assert await store.interrupt_calls(stale_before=fresh, restarted="a") == 2
        await store.heartbeat("a")
        a, b, c = [await store.call(sid) for sid in ("CA-a", "CA-b", "CA-c")]
        assert (a.status, b.status, c.status) == (
            CallStatus.INTERRUPTED,
            CallStatus.IN_PROGRESS,
            CallStatus.INTERRUPTED,
        )
        assert "stopped during the call" in a.end_reason
        assert a.ended_at == datetime(2025, 1, 1, 9, 1, tzinfo=UTC)  # its last beat was before the start
        # A live instance's beats never touch its own calls.
        await store.start_call(record("CA-a2", 40, status=CallStatus.IN_PROGRESS, instance="a"))
        assert await store.interrupt_calls(stale_before=fresh) == 0
        # "b" falls silent: another instance marks its calls once the beat is stale.
        clock[0] += timedelta(minutes=10)
        await store.heartbeat("a")
        assert await store.interrupt_calls(stale_before=clock[0] - timedelta(minutes=2)) == 1
        b = await store.call("CA-b")
        assert b.status is CallStatus.INTERRUPTED and b.ended_at == datetime(2025, 1, 1, 9, 30, tzinfo=UTC)
        assert (await store.call("CA-a2")).status is CallStatus.IN_PROGRESS
        # "b" was only late: its call, when it ends, completes its own record after all.
        done = record("CA-b", 1, status=CallStatus.COMPLETED, instance="b", end_reason="caller hung up")
        await store.add_call(done)
        assert await store.call("CA-b") == done
        # ... but another instance's record on that CallSid is not its to complete.
        with pytest.raises(Conflict):
            await store.add_call(record("CA-c", 1, status=CallStatus.COMPLETED, instance="b"))


@pytest.mark.timeout(30)
async def test_a_call_sid_is_answered_once_and_streamed_once_across_stores(backend: Backend) -> None:
    async with await backend.open() as one, await backend.open() as two:
        assert await one.answer_call("CA1", "nonce1", 1000.0) is None
        again = await two.answer_call("CA1", "nonce2", 2000.0)
        assert again is not None
        assert (again.token_nonce, again.token_expiry, again.streamed) == ("nonce1", 1000.0, False)
        assert await two.claim_stream("CA1") is True
        assert await one.claim_stream("CA1") is False
        assert await two.claim_stream("CA1") is False
        streamed = await one.answer_call("CA1", "nonce3", 3000.0)
        assert streamed is not None and streamed.streamed and streamed.token_nonce == "nonce1"
        # A stream whose answer was never recorded still claims once.
        assert await one.claim_stream("CA2") is True
        assert await two.claim_stream("CA2") is False


@pytest.mark.timeout(30)
async def test_admin_sessions_are_kept_until_they_expire_or_are_revoked(backend: Backend) -> None:
    clock = [datetime(2025, 1, 1, 9, 0, tzinfo=UTC)]
    later = clock[0] + timedelta(hours=8)
    async with await backend.open(now=lambda: clock[0]) as one:
        await one.add_admin_session("s1", "ana", later)
        await one.add_admin_session("s2", "bo", later)
        assert await one.admin_session("s1") == AdminSession("s1", "ana", later)
        assert await one.admin_session("nope") is None
    async with await backend.open(now=lambda: clock[0]) as two:  # a restart
        await two.revoke_admin_session("s1")
        assert await two.admin_session("s1") is None
        assert await two.admin_session("s2") is not None
        clock[0] = later
        assert await two.admin_session("s2") is None  # expired
        await two.add_admin_session("s3", "cy", later + timedelta(hours=8))
        # Expired sessions are forgotten on the next sign-in.
        assert {row[0] for row in backend.execute("SELECT sid FROM admin_sessions")} == {"s3"}
        # A sign-out on one instance holds on another at once.
        async with await backend.open(now=lambda: clock[0]) as three:
            assert await three.admin_session("s3") is not None
            await two.revoke_admin_session("s3")
            assert await three.admin_session("s3") is None


@pytest.mark.timeout(30)
async def test_racing_creates_and_claims_through_two_stores_have_one_winner(backend: Backend) -> None:
    async with await backend.open() as one, await backend.open() as two:
        results = await asyncio.gather(
            *(s.create(Profile(name="same"), author=str(i)) for i, s in enumerate([one, two] * 3)),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException)), results
        numbers = await asyncio.gather(
            *(
                s.create(Profile(name=f"p{i}", numbers=("+14155550300",)), author="a")
                for i, s in enumerate([one, two] * 3)
            ),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in numbers) == 1
        claims = await asyncio.gather(*(s.claim_stream("CA1") for s in [one, two] * 4))
        assert claims.count(True) == 1
        answers = await asyncio.gather(
            *(s.answer_call("CA2", f"n{i}", 1.0) for i, s in enumerate([one, two] * 4))
        )
        assert answers.count(None) == 1
        assert len({a.token_nonce for a in answers if a is not None}) == 1


# --- PostgreSQL's own concerns ---


async def test_open_store_picks_postgresql_for_its_urls(postgres_database: str) -> None:
    for index, url in enumerate(
        [postgres_database, postgres_database.replace("postgresql://", "postgres://")]
    ):
        store = await open_store(f"  {url} ")
        try:
            assert isinstance(store, PostgresStore)
            assert (await store.create(Profile(name=f"p{index}"), author="a")).profile_id == index + 1
            assert TEST_PASSWORD not in store.where and "@127.0.0.1:" in store.where
        finally:
            await store.close()
    with pytest.raises(
        ConfigError, match="PostgreSQL is not supported yet here: this needs a SQLite file path"
    ):
        sqlite_path(postgres_database)


@pytest.mark.timeout(30)
async def test_postgres_migrations_are_applied_once_by_instances_starting_together(
    postgres_database: str,
) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(postgres_database) for _ in range(4)))
    try:
        created = await stores[0].create(SALES, author="a")
        assert [await s.get(created.profile_id) for s in stores] == [created] * 4
    finally:
        for store in stores:
            await store.close()
    with psycopg.connect(postgres_database) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert rows == [(n,) for n in range(1, len(PG_MIGRATIONS) + 1)]
    async with await PostgresStore.open(postgres_database) as again:  # a restart applies nothing
        assert [s.latest for s in await again.list_profiles()] == [created]


async def test_postgres_database_from_a_newer_bridge_is_refused(postgres_database: str) -> None:
    async with await PostgresStore.open(postgres_database):
        pass
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (99)")
    with pytest.raises(ConfigError, match="newer bridge") as info:
        await PostgresStore.open(postgres_database)
    assert "schema version 99" in str(info.value) and TEST_PASSWORD not in str(info.value)


class FakeToken:
    def __init__(self, token: str, expires_on: float) -> None:
        self.token, self.expires_on = token, int(expires_on)


class FakeCredential:
    """An Entra credential that hands out a fixed token (the test role's real password)."""

    def __init__(self, token: str = ENTRA_TOKEN, lifetime_s: float = 3600, fail: bool = False) -> None:
        self.token, self.lifetime_s, self.fail = token, lifetime_s, fail
        self.scopes: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str) -> FakeToken:
        self.scopes.append(scopes)
        if self.fail:
            raise RuntimeError("DefaultAzureCredential failed to retrieve a token:\n  no identity here")
        return FakeToken(self.token, datetime.now(UTC).timestamp() + self.lifetime_s)


@pytest.mark.timeout(30)
async def test_postgres_without_a_password_signs_in_with_an_entra_token(
    postgres_server: PostgresServer,
) -> None:
    name = postgres_server.create_database(owner=ENTRA_ROLE)
    try:
        url = postgres_server.url(name, user=ENTRA_ROLE, password=None)
        credential = FakeCredential()
        async with await PostgresStore.open(url, credential=credential, pool_size=3) as store:
            created = await store.create(SALES, author="entra")
            # Enough at once that the pool opens more connections: each asks for the password again.
            got = await asyncio.gather(*(store.get(created.profile_id) for _ in range(12)))
            assert got == [created] * 12
        assert credential.scopes and set(credential.scopes) == {(ENTRA_SCOPE,)}

        with pytest.raises(ConfigError, match="cannot connect to PostgreSQL") as info:
            await PostgresStore.open(url, credential=FakeCredential(token="a-wrong-token"))
        assert "a-wrong-token" not in str(info.value) and ENTRA_ROLE in str(info.value)
        with pytest.raises(ConfigError, match="no Entra token") as info:
            await PostgresStore.open(url, credential=FakeCredential(fail=True))
        assert "\n" not in str(info.value)
    finally:
        postgres_server.drop_database(name)


async def test_an_entra_token_is_fetched_again_only_near_its_expiry() -> None:
    lasting = FakeCredential(lifetime_s=3600)
    password = EntraPassword(lasting, owned=False)
    assert [await password() for _ in range(3)] == [ENTRA_TOKEN] * 3
    assert len(lasting.scopes) == 1
    expiring = FakeCredential(lifetime_s=60)  # inside the margin: every new connection asks again
    password = EntraPassword(expiring, owned=False)
    assert [await password() for _ in range(3)] == [ENTRA_TOKEN] * 3
    assert len(expiring.scopes) == 3


async def test_postgres_connection_failures_at_open_say_what_to_fix(postgres_server: PostgresServer) -> None:
    name = postgres_server.create_database()
    try:
        wrong = postgres_server.url(name, password="not-the-password-42")
        with pytest.raises(ConfigError, match=r"cannot connect to PostgreSQL bridge_test@127\.0") as info:
            await PostgresStore.open(wrong)
        assert "not-the-password-42" not in str(info.value) and "\n" not in str(info.value)
        assert "password" in str(info.value)
        missing = postgres_server.url("no_such_database")
        with pytest.raises(ConfigError, match="no_such_database") as info:
            await PostgresStore.open(missing)
        assert TEST_PASSWORD not in str(info.value)
    finally:
        postgres_server.drop_database(name)


async def test_postgres_driver_errors_surface_as_store_errors(postgres_database: str) -> None:
    async with await PostgresStore.open(postgres_database) as store:
        await store.create(SALES, author="a")
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            conn.execute("DROP TABLE calls")
        with pytest.raises(StoreError) as info:
            await store.calls()
        assert not isinstance(info.value, psycopg.Error) and info.value.__cause__ is None
        assert "calls" in str(info.value) and TEST_PASSWORD not in str(info.value)
        with pytest.raises(StoreError):
            await store.add_call(record("CA1", 1))
        # The failed transactions were rolled back: the connections serve the next operations.
        assert [s.latest.profile for s in await store.list_profiles()] == [SALES]


def test_a_database_url_is_shown_without_its_password() -> None:
    assert redacted("postgresql://bridge:s3cret@db:5432/bridge") == "postgresql://bridge:***@db:5432/bridge"
    shown = redacted("postgresql://bridge@db/bridge?sslmode=require&password=s3cret&x=1")
    assert "s3cret" not in shown and shown.endswith("password=***&x=1")
    assert redacted("/var/lib/bridge/bridge.sqlite3") == "/var/lib/bridge/bridge.sqlite3"


@pytest.mark.timeout(60)
def test_many_processes_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    # Instances or workers starting together on a fresh file all switch it to WAL and migrate it; SQLite
    # answers "database is locked" at once (no busy wait) to some of them. Threads stand in for them.
    from concurrent.futures import ThreadPoolExecutor

    for round_ in range(15):
        path = str(tmp_path / f"new-{round_}.sqlite3")
        with ThreadPoolExecutor(8) as pool:
            conns = list(pool.map(connect, [path] * 8, [MIGRATIONS] * 8))
        for conn in conns:
            conn.close()
        assert user_version(Path(path)) == len(MIGRATIONS)

"""``bridge prompts export`` / ``import``: round trips, validation with nothing written, idempotence."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from bridge.prompts import Profile, Transcription, TurnDetection, profile_to_mapping
from bridge.store import ProfileSummary
from bridge.store.cli import default_database, export_command, import_command, to_toml
from bridge.store.sqlite import SQLiteStore

SALES = Profile(
    name="sales",
    instructions='Sell "politely".\nNever promise\tdelivery dates.\n\\o/',
    numbers=("+14155550100", "+14155550101"),
    language="en",
    max_response_tokens=300,
)
SUPPORT = Profile(
    name="support",
    voice="marin",
    transcription=Transcription(language="en"),
    turn_detection=TurnDetection(type="semantic_vad", eagerness="high", threshold=0.25),
    noise_reduction=None,
    numbers=("+14155550200",),
)


def args(file: Path, database: Path | str) -> argparse.Namespace:
    return argparse.Namespace(file=file, author="cli", database=str(database))


def seed(database: Path, *profiles: Profile, default: str | None = None) -> None:
    async def run() -> None:
        async with await SQLiteStore.open(database) as store:
            for profile in profiles:
                created = await store.create(profile, author="seed")
                if profile.name == default:
                    await store.set_default(created.profile_id)

    asyncio.run(run())


def listing(database: Path) -> list[ProfileSummary]:
    async def run() -> list[ProfileSummary]:
        async with await SQLiteStore.open(database) as store:
            return await store.list_profiles()

    return asyncio.run(run())


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_export_then_import_into_a_fresh_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    source, target = tmp_path / "source.sqlite3", tmp_path / "target.sqlite3"
    seed(source, SALES, SUPPORT, default="support")
    file = tmp_path / f"prompts{suffix}"
    assert export_command(args(file, source)) == 0
    assert "exported 2 profiles" in capsys.readouterr().out

    text = file.read_text(encoding="utf-8")
    document = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    assert (document["format"], document["version"], document["default"]) == ("bridge-prompts", 1, "support")
    assert [p["name"] for p in document["profiles"]] == ["sales", "support"]

    assert import_command(args(file, target)) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["created sales", "created support", "default is now support"]
    imported = listing(target)
    assert [s.latest.profile for s in imported] == [SALES, SUPPORT]
    assert [s.is_default for s in imported] == [False, True]
    assert {s.latest.comment for s in imported} == {f"imported from {file.name}"}
    assert {s.latest.author for s in imported} == {"cli"}


def test_importing_twice_changes_nothing_and_edits_make_new_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "bridge.sqlite3"
    file = tmp_path / "prompts.json"
    document = {
        "format": "bridge-prompts",
        "version": 1,
        "default": "sales",
        "profiles": [profile_to_mapping(SALES), profile_to_mapping(SUPPORT)],
    }
    file.write_text(json.dumps(document))
    assert import_command(args(file, database)) == 0
    capsys.readouterr()
    assert import_command(args(file, database)) == 0
    assert capsys.readouterr().out.splitlines() == [
        "unchanged sales (version 1)",
        "unchanged support (version 1)",
    ]
    assert [s.latest.version for s in listing(database)] == [1, 1]

    edited = dataclasses.replace(SUPPORT, greeting="Support here.")
    document["profiles"] = [profile_to_mapping(SALES), profile_to_mapping(edited)]
    document["default"] = "support"
    file.write_text(json.dumps(document))
    assert import_command(args(file, database)) == 0
    assert capsys.readouterr().out.splitlines() == [
        "unchanged sales (version 1)",
        "updated support to version 2",
        "default is now support",
    ]
    after = listing(database)
    assert [s.latest.profile for s in after] == [SALES, edited]
    assert [s.is_default for s in after] == [False, True]


def test_an_invalid_file_is_reported_per_profile_and_field_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "bridge.sqlite3"
    seed(database, Profile(name="existing"))
    file = tmp_path / "prompts.json"
    file.write_text(
        json.dumps(
            {
                "format": "bridge-prompts",
                "version": 1,
                "default": "nobody",
                "profiles": [
                    {"name": "good", "numbers": ["+14155550100"]},
                    {"name": "loud", "voice": "robot", "max_call_seconds": -1},
                    {"name": "wrong", "numbers": ["555-1234"], "turn_detection": {"type": "push_to_talk"}},
                    {"name": "twin", "numbers": ["+14155550100"]},
                    "not a profile",
                ],
            }
        )
    )
    assert import_command(args(file, database)) == 2
    err = capsys.readouterr().err
    assert "profile 2 ('loud'): voice: 'robot' is not a voice" in err
    assert "profile 2 ('loud'): max_call_seconds: must be whole seconds" in err
    assert "profile 3 ('wrong'): numbers: not in E.164 form" in err
    assert "profile 3 ('wrong'): turn_detection.type:" in err
    assert "profile 'twin': numbers: +14155550100 is also routed to 'good'" in err
    assert "profile 5: must be an object" in err
    assert "default: no profile named 'nobody'" in err
    assert "nothing was imported" in err
    assert [s.latest.profile.name for s in listing(database)] == ["existing"]


def test_a_file_that_clashes_with_the_store_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "bridge.sqlite3"
    seed(database, Profile(name="existing", numbers=("+14155550200",)))
    file = tmp_path / "prompts.json"
    file.write_text(
        json.dumps(
            {
                "format": "bridge-prompts",
                "version": 1,
                "profiles": [profile_to_mapping(SALES), profile_to_mapping(SUPPORT)],
            }
        )
    )
    assert import_command(args(file, database)) == 2
    err = capsys.readouterr().err
    assert "numbers: +14155550200 is already routed to profile 'existing'" in err
    assert [s.latest.profile.name for s in listing(database)] == ["existing"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "cannot be parsed as JSON"),
        ("[]", "must be an object"),
        ('{"format": "other", "version": 1, "profiles": []}', "format: must be 'bridge-prompts'"),
        ('{"format": "bridge-prompts", "version": 7, "profiles": []}', "written by a newer bridge"),
        ('{"format": "bridge-prompts", "version": 1, "profiles": {}}', "profiles: must be a list"),
        ('{"format": "bridge-prompts", "version": 1, "profiles": [], "extra": 1}', "extra: unknown field"),
    ],
)
def test_malformed_documents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, problem: str
) -> None:
    file = tmp_path / "prompts.json"
    file.write_text(text)
    database = tmp_path / "bridge.sqlite3"
    assert import_command(args(file, database)) == 2
    assert problem in capsys.readouterr().err
    assert not database.exists()


def test_export_needs_an_existing_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_command(args(tmp_path / "out.json", tmp_path / "none.sqlite3")) == 1
    assert "no database at" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
    unreachable = "postgresql://bridge:secret-pw@127.0.0.1:1/bridge"
    assert export_command(args(tmp_path / "out.json", unreachable)) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "secret-pw" not in err


@pytest.mark.timeout(60)
def test_export_and_import_work_on_postgresql(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_database: str
) -> None:
    source = tmp_path / "source.sqlite3"
    seed(source, SALES, SUPPORT, default="support")
    file, again = tmp_path / "prompts.toml", tmp_path / "again.toml"
    assert export_command(args(file, source)) == 0
    assert import_command(args(file, postgres_database)) == 0
    assert "default is now support" in capsys.readouterr().out
    assert export_command(args(again, postgres_database)) == 0
    assert tomllib.loads(again.read_text()) == tomllib.loads(file.read_text())


def test_an_empty_store_exports_an_empty_document(tmp_path: Path) -> None:
    database = tmp_path / "bridge.sqlite3"
    seed(database)
    file = tmp_path / "prompts.toml"
    assert export_command(args(file, database)) == 0
    assert tomllib.loads(file.read_text()) == {"format": "bridge-prompts", "version": 1}
    assert import_command(args(file, tmp_path / "other.sqlite3")) == 0


def test_toml_strings_survive_every_character() -> None:
    nasty = 'a "quote", a \\ backslash, """ triple, \x7f del, \x01 control, \r return,\n\nnew lines\n'
    document = {"format": "bridge-prompts", "profiles": [{"name": "x", "instructions": nasty, "n": [1, 0.5]}]}
    assert tomllib.loads(to_toml(document)) == document
    single = {"profiles": [{"name": 'just "one" line\t\\'}]}
    assert tomllib.loads(to_toml(single)) == single


def test_the_default_database() -> None:
    assert (
        default_database({"BRIDGE_DATABASE": "sqlite:///x.db", "BRIDGE_DATA_DIR": "/d"}) == "sqlite:///x.db"
    )
    assert default_database({"BRIDGE_DATA_DIR": "/srv/bridge"}) == str(Path("/srv/bridge") / "bridge.sqlite3")
    assert default_database({}) == str(Path("data") / "bridge.sqlite3")

"""``bridge prompts export FILE`` and ``bridge prompts import FILE``: prompt profiles as one file.

The file holds every profile's latest version and names the default profile::

    {"format": "bridge-prompts", "version": 1, "default": "support", "profiles": [{"name": ...}, ...]}

It is JSON, or TOML when FILE ends in ``.toml`` (``null`` fields are left out there: TOML has no null,
and every field that can be null is null by default). Import checks the whole file first and writes
nothing when anything is wrong, listing every problem by profile and field (exit status 2). Then it
writes every change in one transaction: profiles are matched by name; a missing one is created, a
changed one gets a new version commented "imported from FILE", an identical one is left alone (so
importing the same file twice changes nothing). Profiles in the store but not in the file are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridge.errors import BridgeError, ConfigError
from bridge.prompts import Profile, ProfileError, profile_from_mapping, profile_to_mapping
from bridge.store.base import Conflict, ProfileChange, StaleVersion, postgres_url, sqlite_path
from bridge.store.postgres import PostgresStore
from bridge.store.sqlite import SQLiteStore

FORMAT = "bridge-prompts"
FORMAT_VERSION = 1


def default_database(env: Mapping[str, str] | None = None) -> str:
    """``BRIDGE_DATABASE``, else ``bridge.sqlite3`` under ``BRIDGE_DATA_DIR`` (default ``./data``)."""
    env = os.environ if env is None else env
    database = env.get("BRIDGE_DATABASE", "").strip()
    if database:
        return database
    return str(Path(env.get("BRIDGE_DATA_DIR", "").strip() or "data") / "bridge.sqlite3")


def _database(args: argparse.Namespace) -> str:
    database: str | None = getattr(args, "database", None)
    return database or default_database()


def _fail(message: str, status: int) -> int:
    print(f"bridge: {message}", file=sys.stderr)
    return status


# --- export ---


def export_command(args: argparse.Namespace) -> int:
    """Write every profile's latest version and the default's name to ``args.file``."""
    file: Path = args.file
    try:
        path = _location(_database(args))
        if postgres_url(path) is None and path != ":memory:" and not Path(path).exists():
            return _fail(f"no database at {path} (set BRIDGE_DATABASE or --database)", 1)
        document = asyncio.run(_document(path))
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", 2)
    except BridgeError as exc:
        return _fail(str(exc), 1)
    text = to_toml(document) if file.suffix.lower() == ".toml" else json.dumps(document, indent=2) + "\n"
    try:
        file.write_text(text, encoding="utf-8")
    except OSError as exc:
        return _fail(f"cannot write {file}: {exc.strerror or exc}", 1)
    count = len(document["profiles"])
    print(f"exported {count} profile{'s' * (count != 1)} to {file}")
    return 0


def _location(database: str) -> str:
    """A PostgreSQL URL as it is, else the SQLite file's path; raises ConfigError."""
    return database.strip() if postgres_url(database) is not None else sqlite_path(database)


async def _open(location: str) -> SQLiteStore | PostgresStore:
    """The store at ``location`` (:func:`_location`): both backends write several profiles at once."""
    url = postgres_url(location)
    return await (PostgresStore.open(url) if url is not None else SQLiteStore.open(location))


async def _document(path: str) -> dict[str, Any]:
    async with await _open(path) as store:
        summaries = await store.list_profiles()
    default = next((s.latest.profile.name for s in summaries if s.is_default), None)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "default": default,
        "profiles": [profile_to_mapping(s.latest.profile) for s in summaries],
    }


def to_toml(document: Mapping[str, Any]) -> str:
    """The export document as TOML: top-level keys, then one ``[[profiles]]`` table per profile."""
    lines = [
        f"{key} = {_toml_value(value)}"
        for key, value in document.items()
        if key != "profiles" and value is not None
    ]
    for profile in document["profiles"]:
        lines += ["", "[[profiles]]"]
        tables: list[tuple[str, Mapping[str, Any]]] = []
        for key, value in profile.items():
            if isinstance(value, Mapping):
                tables.append((key, value))
            elif value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        for key, table in tables:
            lines += ["", f"[profiles.{key}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _toml_string(text: str) -> str:
    """A basic string; a multi-line one when ``text`` has line breaks, so instructions stay readable."""
    multiline = "\n" in text
    out: list[str] = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\t" or (char == "\n" and multiline):
            out.append(char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    body = "".join(out)
    # The line break right after the opening quotes is not part of the string (TOML 1.0).
    return f'"""\n{body}"""' if multiline else f'"{body}"'


# --- import ---


def import_command(args: argparse.Namespace) -> int:
    """Create or update the profiles in ``args.file``; exit 2 (nothing written) when it is invalid."""
    file: Path = args.file
    author: str = getattr(args, "author", None) or "cli"
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}", 1)
    profiles, default, problems = parse_document(text, toml=file.suffix.lower() == ".toml")
    if problems:
        for problem in problems:
            print(f"{file}: {problem}", file=sys.stderr)
        return _fail(f"{file} is invalid: nothing was imported", 2)
    try:
        path = _location(_database(args))
        lines = asyncio.run(_import(path, profiles, default, author, f"imported from {file.name}"))
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", 2)
    except Conflict as exc:
        for field, why in exc.problems.items():
            print(f"{file}: {field}: {why}", file=sys.stderr)
        return _fail("the file clashes with profiles in the store: nothing was imported", 2)
    except StaleVersion as exc:
        return _fail(f"{exc}: nothing was imported; try again", 1)
    except BridgeError as exc:
        return _fail(str(exc), 1)
    for line in lines:
        print(line)
    return 0


def parse_document(text: str, *, toml: bool) -> tuple[list[Profile], str | None, list[str]]:
    """The profiles and default an export document holds, and every problem found in it."""
    try:
        data = tomllib.loads(text) if toml else json.loads(text)
    except ValueError as exc:
        return [], None, [f"cannot be parsed as {'TOML' if toml else 'JSON'}: {exc}"]
    if not isinstance(data, dict):
        return [], None, ["must be an object with format, version, default and profiles"]
    problems: list[str] = []
    for key in sorted(set(data) - {"format", "version", "default", "profiles"}):
        problems.append(f"{key}: unknown field (known: default, format, profiles, version)")
    if data.get("format") != FORMAT:
        problems.append(f"format: must be {FORMAT!r} (a file written by bridge prompts export)")
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        problems.append(f"version: {version} was written by a newer bridge (this one reads {FORMAT_VERSION})")
    elif version != FORMAT_VERSION:
        problems.append(f"version: must be {FORMAT_VERSION}")
    raw_profiles = data.get("profiles", [])
    if not isinstance(raw_profiles, list):
        problems.append("profiles: must be a list of profiles")
        raw_profiles = []
    profiles: list[Profile] = []
    for index, raw in enumerate(raw_profiles, 1):
        name = raw.get("name") if isinstance(raw, dict) else None
        label = f"profile {index}" + (f" ({name!r})" if isinstance(name, str) else "")
        if not isinstance(raw, dict):
            problems.append(f"{label}: must be an object of profile fields")
            continue
        try:
            profiles.append(profile_from_mapping(raw))
        except ProfileError as exc:
            problems.extend(f"{label}: {field}: {why}" for field, why in exc.problems.items())
    problems.extend(_clashes(profiles))
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        problems.append("default: must be the name of a profile in the file")
        default = None
    elif default is not None and default not in {raw.get("name") for raw in _dicts(raw_profiles)}:
        problems.append(f"default: no profile named {default!r} in the file")
    return profiles, default, problems


def _dicts(items: list[Any]) -> list[dict[str, Any]]:
    return [item for item in items if isinstance(item, dict)]


def _clashes(profiles: list[Profile]) -> list[str]:
    """Names and numbers used twice within the file."""
    problems: list[str] = []
    names: set[str] = set()
    owners: dict[str, str] = {}
    for profile in profiles:
        if profile.name in names:
            problems.append(f"profile {profile.name!r}: name: used by more than one profile in the file")
        names.add(profile.name)
        for number in profile.numbers:
            owner = owners.setdefault(number, profile.name)
            if owner != profile.name:
                problems.append(f"profile {profile.name!r}: numbers: {number} is also routed to {owner!r}")
    return problems


async def _import(
    path: str, profiles: list[Profile], default: str | None, author: str, comment: str
) -> list[str]:
    async with await _open(path) as store:
        existing = {summary.latest.profile.name: summary for summary in await store.list_profiles()}
        changes: list[ProfileChange] = []
        for profile in profiles:
            summary = existing.get(profile.name)
            if summary is None:
                changes.append(ProfileChange(profile))
            elif summary.latest.profile != profile:
                changes.append(ProfileChange(profile, summary.profile_id, summary.latest.version))
        written = await store.save_many(changes, author=author, comment=comment) if changes else []
        outcome = {version.profile.name: version for version in written}
        lines: list[str] = []
        for profile in profiles:
            version = outcome.get(profile.name)
            if version is None:
                lines.append(f"unchanged {profile.name} (version {existing[profile.name].latest.version})")
            elif version.version == 1:
                lines.append(f"created {profile.name}")
            else:
                lines.append(f"updated {profile.name} to version {version.version}")
        if default is not None:
            target = outcome[default].profile_id if default in outcome else existing[default].profile_id
            current = await store.default_profile()
            if current is None or current.profile_id != target:
                await store.set_default(target)
                lines.append(f"default is now {default}")
        return lines

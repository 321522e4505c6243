"""The call log: the list of calls, one call's record, its recording and its timeline picture.

Recordings are served only from the configured recording directories: a record's ``recording_path`` is
resolved (symlinks and ``..`` included) and must lie inside one of them, so a tampered or stale record
cannot make the admin UI hand out arbitrary files. A recording uploaded to Blob Storage
(``BRIDGE_STORAGE_URL``) is read from there: its ``recording_path`` is the blob's URL, and only a URL in
the configured container is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from bridge.admin.render import page
from bridge.config import Settings
from bridge.errors import BridgeError
from bridge.keys import BLOBS, STORE
from bridge.recordings import load_recording, load_recording_bytes
from bridge.recordings.blob import BlobError, BlobNotFound, BlobStorage
from bridge.recordings.timeline import timeline_svg
from bridge.store import CallRecord, ModelSession, NotFound

log = logging.getLogger(__name__)

PAGE_SIZE = 50
RECORDING_ROOTS = web.AppKey("bridge_admin_recording_roots", tuple[Path, ...])
LATENCY_COUNTS = {"turns": ("turn", "turns")}
"""Entries of a record's ``latency_ms`` that are counts, not milliseconds: key -> (singular, plural)."""
BEGAN_LABELS = {
    "first": "first",
    "rollover": "rollover (planned swap)",
    "reconnect": "reconnect (after a drop)",
}
"""How a model session began (:attr:`ModelSession.began`), as the call page says it."""


def recording_roots(settings: Settings) -> tuple[Path, ...]:
    """Where recordings may be served from: ``BRIDGE_RECORDINGS_DIR`` and the data directory's own."""
    roots = [settings.recordings_dir] if settings.recordings_dir is not None else []
    roots.append(settings.data_dir / "recordings")
    return tuple(roots)


def recording_file(record: CallRecord, roots: tuple[Path, ...]) -> Path | None:
    """The record's recording file, if it exists inside one of ``roots`` (path traversal refused)."""
    if not record.recording_path:
        return None
    try:
        path = Path(record.recording_path).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    for root in roots:
        try:
            inside = path.is_relative_to(root.resolve())
        except (OSError, RuntimeError):
            continue
        if inside and path.is_file():
            return path
    return None


def recording_blob(record: CallRecord, blobs: BlobStorage | None) -> str | None:
    """The blob name of the record's recording, when it is a URL in the configured container."""
    if blobs is None or not record.recording_path:
        return None
    return blobs.name_of(record.recording_path)


def parse_before(raw: str | None) -> datetime | None:
    """The ``before`` query parameter: an ISO 8601 time (naive means UTC); raises HTTPBadRequest."""
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace(" ", "+"))  # a "+" not %-encoded arrives as a space
    except ValueError:
        raise web.HTTPBadRequest(
            text="before must be an ISO 8601 time, e.g. 2025-01-31T14:05:00+00:00\n"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def parse_profile_filter(raw: str | None) -> int | None:
    """The ``profile`` query parameter: a profile id; raises HTTPBadRequest."""
    if not raw:
        return None
    if not raw.isdigit():
        raise web.HTTPBadRequest(text="profile must be a profile id\n")
    return int(raw)


async def call_list(request: web.Request) -> web.Response:
    """``GET /admin/calls``: calls, newest first, :data:`PAGE_SIZE` a page (``?before=…``, ``?profile=…``)."""
    store = request.app[STORE]
    before = parse_before(request.query.get("before"))
    only = parse_profile_filter(request.query.get("profile"))
    records = await store.calls(limit=PAGE_SIZE, before=before, profile_id=only)
    names = {s.profile_id: s.latest.profile.name for s in await store.list_profiles()}
    older = None
    if len(records) == PAGE_SIZE:
        query: dict[str, Any] = {"before": records[-1].started_at.isoformat()}
        if only is not None:
            query["profile"] = only
        older = "/admin/calls?" + urlencode(query)
    summaries = {r.call_sid: sessions_summary(r.sessions) for r in records if len(r.sessions) > 1}
    context = {
        "records": records,
        "names": names,
        "older": older,
        "filtered": only is not None,
        "summaries": summaries,
    }
    return page(request, "calls.html", context, title="Calls")


async def call_detail(request: web.Request) -> web.Response:
    """``GET /admin/calls/{sid}``: one call: model sessions, transcript, barge-ins, latency, recording."""
    store = request.app[STORE]
    try:
        record = await store.call(request.match_info["sid"])
    except NotFound:
        return page(
            request, "error.html", {"message": "This call is not in the log."}, status=404, title="Not found"
        )
    names = {s.profile_id: s.latest.profile.name for s in await store.list_profiles()}
    recorded = recording_file(record, request.app[RECORDING_ROOTS]) is not None
    blobs, blob = request.app.get(BLOBS), recording_blob(record, request.app.get(BLOBS))
    if blobs is not None and blob is not None:
        try:
            recorded = await blobs.exists(blob)
        except BlobError as exc:
            recorded = True  # offer it: the download says what is wrong
            log.warning("call %s: its recording in Blob Storage cannot be checked: %s", record.call_sid, exc)
    latency = latency_facts(record.latency_ms)
    context = {
        "record": record,
        "names": names,
        "recorded": recorded,
        "latency": latency,
        "sessions_summary": sessions_summary(record.sessions),
        "began_labels": BEGAN_LABELS,
    }
    return page(request, "call.html", context, title=f"Call {record.call_sid}")


def sessions_summary(sessions: Sequence[ModelSession]) -> str:
    """How many model sessions a call used and how the later ones came: ``"2 model sessions: 1 rollover"``,
    ``"3 model sessions: 1 rollover, 1 reconnect"``, ``"1 model session"`` (``""`` for none)."""
    if not sessions:
        return ""
    count = len(sessions)
    head = f"{count} model session{'' if count == 1 else 's'}"
    kinds = Counter(s.began for s in sessions if s.began != "first")
    parts = [f"{n} {kind}{'' if n == 1 else 's'}" for kind, n in kinds.items()]
    return f"{head}: {', '.join(parts)}" if parts else head


def latency_facts(latency_ms: Mapping[str, float]) -> list[tuple[str, str]]:
    """A record's latency figures for the page: ``("turn p50", "420 ms")``, ``("turns", "3 turns")``."""
    facts: list[tuple[str, str]] = []
    for key, value in latency_ms.items():
        label = key.replace("_", " ")
        if key in LATENCY_COUNTS:
            singular, plural = LATENCY_COUNTS[key]
            count = round(value)
            facts.append((label, f"{count} {singular if count == 1 else plural}"))
        else:
            facts.append((label, f"{value:.0f} ms"))
    return facts


async def _recorded(request: web.Request) -> tuple[CallRecord, Path | tuple[BlobStorage, str]]:
    """The call's record and its recording: a local file, or a blob (the container and the name)."""
    try:
        record = await request.app[STORE].call(request.match_info["sid"])
    except NotFound:
        raise web.HTTPNotFound(text="This call is not in the log.\n") from None
    blobs = request.app.get(BLOBS)
    blob = recording_blob(record, blobs)
    if blobs is not None and blob is not None:
        return record, (blobs, blob)
    path = recording_file(record, request.app[RECORDING_ROOTS])
    if path is None:
        raise web.HTTPNotFound(text="This call has no recording here.\n")
    return record, path


async def _blob_bytes(blobs: BlobStorage, name: str) -> bytes:
    try:
        return await blobs.get(name)
    except BlobNotFound:
        raise web.HTTPNotFound(text="This call's recording is not in Blob Storage.\n") from None
    except BlobError as exc:
        log.error("a recording could not be read from Blob Storage: %s", exc)
        raise web.HTTPBadGateway(text="The recording cannot be read from Blob Storage now.\n") from None


async def recording(request: web.Request) -> web.StreamResponse:
    """``GET /admin/calls/{sid}/recording``: the recording file, as a download."""
    _, where = await _recorded(request)
    name = where.name if isinstance(where, Path) else where[1].rsplit("/", 1)[-1]
    kind = "application/gzip" if name.endswith(".gz") else "application/x-ndjson"
    headers = {"Content-Type": kind, "Content-Disposition": f'attachment; filename="{_ascii(name)}"'}
    if isinstance(where, Path):
        return web.FileResponse(where, headers=headers)
    return web.Response(body=await _blob_bytes(*where), headers=headers)


def _ascii(name: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)


def _timeline(path: Path) -> str:
    return timeline_svg(load_recording(path))


async def timeline(request: web.Request) -> web.Response:
    """``GET /admin/calls/{sid}/timeline.svg``: the call drawn from its recording."""
    _, where = await _recorded(request)
    try:
        # Parsing and drawing a long call takes a while; keep the event loop (and live calls) free.
        if isinstance(where, Path):
            svg = await asyncio.to_thread(_timeline, where)
        else:
            data = await _blob_bytes(*where)
            name = where[1].rsplit("/", 1)[-1]
            svg = await asyncio.to_thread(lambda: timeline_svg(load_recording_bytes(data, name)))
    except (BridgeError, OSError, EOFError, ValueError) as exc:
        raise web.HTTPUnprocessableEntity(text=f"The recording cannot be read: {exc}\n") from None
    response = web.Response(text=svg, content_type="image/svg+xml")
    # Opened on its own, an SVG is a document: let it run nothing.
    response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"
    return response

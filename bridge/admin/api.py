"""The JSON API under ``/admin/api/``: what the pages do, for scripts and automation.

Authentication: the session cookie plus ``X-CSRF-Token`` on writes, or ``Authorization: Bearer
<BRIDGE_ADMIN_TOKEN>`` (see :mod:`bridge.admin.auth`). A profile is ``profile_to_mapping`` plus
``id``, ``version``, ``author``, ``created_at``, ``comment``, ``is_default`` (and ``rolled_back_from``,
``has_greeting_audio``), so what ``GET`` returns can be edited and ``PUT`` back as is: those extra keys
are ignored on input, except ``expected_version`` (required on ``PUT``), ``comment``, and ``default`` /
``is_default`` (``true`` makes the profile the default).

Errors are ``{"error": code, "message": text, …}``: 400 ``bad_request``, 404 ``not_found``,
409 ``stale_version`` (with ``current_version`` and ``current``), 422 ``invalid`` or ``conflict``
(with ``problems``: field → message).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import orjson
from aiohttp import web

from bridge.admin.calls import PAGE_SIZE, RECORDING_ROOTS, parse_before, parse_profile_filter, recording_file
from bridge.admin.forms import COMMENT_LIMIT
from bridge.admin.views import author, greeting_status, prepare_greeting, profile_id, store_of
from bridge.keys import SETTINGS
from bridge.prompts import ProfileError, profile_from_mapping, profile_to_mapping
from bridge.store import CallRecord, Conflict, ModelSession, NotFound, ProfileVersion, StaleVersion

META_KEYS = frozenset(
    {"id", "version", "author", "created_at", "comment", "is_default", "default", "rolled_back_from",
     "has_greeting_audio", "expected_version"}
)  # fmt: skip
MAX_LIMIT = 200


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def version_json(version: ProfileVersion, *, is_default: bool) -> dict[str, Any]:
    """A profile version as the API shows it."""
    return profile_to_mapping(version.profile) | {
        "id": version.profile_id,
        "version": version.version,
        "author": version.author,
        "created_at": version.created_at.isoformat(),
        "comment": version.comment,
        "is_default": is_default,
        "rolled_back_from": version.rolled_back_from,
        "has_greeting_audio": version.has_greeting_audio,
    }


def session_json(session: ModelSession) -> dict[str, Any]:
    """A call's model (Realtime) session as the API shows it."""
    return {
        "number": session.number,
        "began": session.began,
        "started_at": session.started_at.isoformat(),
        "ended_at": session.ended_at.isoformat() if session.ended_at is not None else None,
        "duration_s": session.duration_s,
        "ended": session.ended,
        "session_id": session.session_id,
    }


def call_json(record: CallRecord, *, recorded: bool) -> dict[str, Any]:
    """A call record as the API shows it."""
    sid = record.call_sid
    return {
        "call_sid": sid,
        "started_at": record.started_at.isoformat(),
        "ended_at": record.ended_at.isoformat(),
        "duration_s": record.duration_s,
        "from": record.from_number,
        "to": record.to_number,
        "profile_id": record.profile_id,
        "profile_version": record.profile_version,
        "end_reason": record.end_reason,
        "transcript": [{"role": role, "text": text} for role, text in record.transcript],
        "barge_ins": record.barge_ins,
        "truncations": [{"item_id": item, "audio_end_ms": ms} for item, ms in record.truncations],
        "latency_ms": dict(record.latency_ms),
        "upstream_errors": record.upstream_errors,
        "test_call": record.test_call,
        "sessions": [session_json(s) for s in record.sessions],
        "recording": f"/admin/calls/{sid}/recording" if recorded else None,
        "timeline": f"/admin/calls/{sid}/timeline.svg" if recorded else None,
    }


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise _error(400, "bad_request", f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _error(400, "bad_request", "the body must be a JSON object")
    return data


_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    404: web.HTTPNotFound,
    409: web.HTTPConflict,
    422: web.HTTPUnprocessableEntity,
}


def _error(status: int, error: str, message: str, **extra: Any) -> web.HTTPException:
    # An exception, so that helpers can bail out from anywhere; its body is the JSON error.
    text = orjson.dumps({"error": error, "message": message, **extra}).decode()
    return _ERRORS[status](text=text, content_type="application/json")


def _profile(request: web.Request, data: dict[str, Any]) -> Any:
    fields = {k: v for k, v in data.items() if k not in META_KEYS}
    try:
        return profile_from_mapping(fields, dialect=request.app[SETTINGS].dialect)
    except ProfileError as exc:
        raise _error(422, "invalid", str(exc), problems=exc.problems) from None


def _comment(data: dict[str, Any]) -> str:
    comment = data.get("comment", "")
    if not isinstance(comment, str) or len(comment) > COMMENT_LIMIT:
        problem = f"must be text of at most {COMMENT_LIMIT} characters"
        raise _error(422, "invalid", f"comment {problem}", problems={"comment": problem})
    return comment.strip()


def _wants_default(data: dict[str, Any]) -> bool:
    return data.get("default") is True or data.get("is_default") is True


async def _version_json(request: web.Request, version: ProfileVersion) -> dict[str, Any]:
    default = await store_of(request).default_profile()
    return version_json(version, is_default=default is not None and default.profile_id == version.profile_id)


async def list_profiles(request: web.Request) -> web.Response:
    """``GET /admin/api/profiles``: every profile's latest version."""
    summaries = await store_of(request).list_profiles()
    return _json([version_json(s.latest, is_default=s.is_default) for s in summaries])


async def get_profile(request: web.Request) -> web.Response:
    """``GET /admin/api/profiles/{id}[?version=N]``: the latest (or one) version."""
    raw = request.query.get("version")
    if raw is not None and not raw.isdigit():
        raise _error(400, "bad_request", "version must be a version number")
    try:
        version = await store_of(request).get(profile_id(request), int(raw) if raw else None)
    except NotFound:
        raise _error(404, "not_found", "no such profile or version") from None
    return _json(await _version_json(request, version))


async def create_profile(request: web.Request) -> web.Response:
    """``POST /admin/api/profiles``: version 1 of a new profile (201)."""
    data = await _body(request)
    profile, comment = _profile(request, data), _comment(data)
    store = store_of(request)
    try:
        saved = await store.create(profile, author=author(request), comment=comment)
    except Conflict as exc:
        raise _error(422, "conflict", str(exc), problems=exc.problems) from None
    if _wants_default(data):
        await store.set_default(saved.profile_id)
    prepare_greeting(request, saved)
    response = _json(await _version_json(request, saved), status=201)
    response.headers["Location"] = f"/admin/api/profiles/{saved.profile_id}"
    return response


async def save_profile(request: web.Request) -> web.Response:
    """``PUT /admin/api/profiles/{id}``: a new version; 409 if ``expected_version`` is not the latest."""
    data = await _body(request)
    expected = data.get("expected_version")
    if isinstance(expected, bool) or not isinstance(expected, int):
        message = "required: the version your change is based on"
        raise _error(422, "invalid", f"expected_version is {message}", problems={"expected_version": message})
    profile, comment = _profile(request, data), _comment(data)
    store, pid = store_of(request), profile_id(request)
    saved = await _write(
        request,
        pid,
        store.save(pid, profile, expected_version=expected, author=author(request), comment=comment),
        "no such profile",
    )
    if _wants_default(data):
        await store.set_default(pid)
    prepare_greeting(request, saved)
    return _json(await _version_json(request, saved))


async def _write(
    request: web.Request, pid: int, write: Awaitable[ProfileVersion], missing: str
) -> ProfileVersion:
    """Await a save or rollback; turn the store's refusals into the API's 404, 409 and 422 answers."""
    try:
        return await write
    except NotFound:
        raise _error(404, "not_found", missing) from None
    except StaleVersion as exc:
        current = await _version_json(request, await store_of(request).get(pid))
        raise _error(409, "stale_version", str(exc), current_version=exc.current, current=current) from None
    except Conflict as exc:
        raise _error(422, "conflict", str(exc), problems=exc.problems) from None


async def history(request: web.Request) -> web.Response:
    """``GET /admin/api/profiles/{id}/history``: every version, newest first."""
    store = store_of(request)
    try:
        versions = await store.history(profile_id(request))
    except NotFound:
        raise _error(404, "not_found", "no such profile") from None
    default = await store.default_profile()
    is_default = default is not None and default.profile_id == profile_id(request)
    return _json([version_json(v, is_default=is_default) for v in versions])


async def rollback(request: web.Request) -> web.Response:
    """``POST /admin/api/profiles/{id}/rollback`` ``{"to_version", "expected_version"[, "comment"]}``."""
    data = await _body(request)
    numbers = {k: data.get(k) for k in ("to_version", "expected_version")}
    bad = {
        k: "required: a version number"
        for k, v in numbers.items()
        if isinstance(v, bool) or not isinstance(v, int)
    }
    if bad:
        raise _error(422, "invalid", "; ".join(f"{k}: {v}" for k, v in bad.items()), problems=bad)
    store, pid = store_of(request), profile_id(request)
    to_version, expected = int(numbers["to_version"] or 0), int(numbers["expected_version"] or 0)
    saved = await _write(
        request,
        pid,
        store.rollback(
            pid, to_version, expected_version=expected, author=author(request), comment=_comment(data)
        ),
        "no such profile or version",
    )
    prepare_greeting(request, saved)
    return _json(await _version_json(request, saved))


async def set_default(request: web.Request) -> web.Response:
    """``POST /admin/api/profiles/{id}/default``: make it the profile for unclaimed numbers."""
    store, pid = store_of(request), profile_id(request)
    try:
        await store.set_default(pid)
        version = await store.get(pid)
    except NotFound:
        raise _error(404, "not_found", "no such profile") from None
    return _json(version_json(version, is_default=True))


async def greeting(request: web.Request) -> web.Response:
    """``GET /admin/api/profiles/{id}/versions/{v}/greeting``: ``{"state", "message", "url"}``."""
    try:
        version = await store_of(request).get(profile_id(request), int(request.match_info["v"]))
    except NotFound:
        raise _error(404, "not_found", "no such profile or version") from None
    status = await greeting_status(request, version)
    return _json({"state": status.state, "message": status.message, "url": status.url or None})


async def list_calls(request: web.Request) -> web.Response:
    """``GET /admin/api/calls[?limit=&before=&profile=]``: call records, newest first, and the next page."""
    raw = request.query.get("limit", str(PAGE_SIZE))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise _error(400, "bad_request", f"limit must be a number from 1 to {MAX_LIMIT}")
    try:
        before = parse_before(request.query.get("before"))
        only = parse_profile_filter(request.query.get("profile"))
    except web.HTTPBadRequest as exc:
        raise _error(400, "bad_request", (exc.text or "").strip()) from None
    records = await store_of(request).calls(limit=int(raw), before=before, profile_id=only)
    roots = request.app[RECORDING_ROOTS]
    calls = [call_json(r, recorded=recording_file(r, roots) is not None) for r in records]
    after = records[-1].started_at.isoformat() if len(records) == int(raw) else None
    return _json({"calls": calls, "next_before": after})


async def get_call(request: web.Request) -> web.Response:
    """``GET /admin/api/calls/{sid}``: one call record."""
    try:
        record = await store_of(request).call(request.match_info["sid"])
    except NotFound:
        raise _error(404, "not_found", "no such call") from None
    recorded = recording_file(record, request.app[RECORDING_ROOTS]) is not None
    return _json(call_json(record, recorded=recorded))

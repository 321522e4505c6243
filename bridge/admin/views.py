"""The admin pages: sign-in, the profile list, the edit form, version history and rollback, greetings.

Every handler here runs behind :func:`bridge.admin.auth.admin_middleware` (signed in, CSRF checked for
writes); the sign-in handlers are the only public ones. Saves follow post/redirect/get: a successful
POST answers 303 with a one-time flash message, a failed one re-renders the form with the staff's input
and a message next to each field (422), or with a note that someone else saved first (409).
"""

from __future__ import annotations

import io
import logging
import math
import re
import wave
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from bridge.admin import auth, throttle
from bridge.admin.forms import (
    FORM_ANCHORS,
    FORM_LABELS,
    diff,
    form_errors,
    mapping_from_values,
    new_profile_values,
    values_from_form,
    values_from_profile,
)
from bridge.admin.render import page
from bridge.audio import ulaw_to_pcm16
from bridge.greeting import Greetings
from bridge.keys import GREETINGS, METRICS, SETTINGS, STORE
from bridge.prompts import EAGERNESS, NOISE_REDUCTION, Profile, ProfileError, profile_from_mapping, voices_for
from bridge.store import Conflict, NotFound, ProfileVersion, StaleVersion, Store, StoreError

log = logging.getLogger(__name__)

NAME_LIMIT = 60


def store_of(request: web.Request) -> Store:
    """The app's store."""
    return request.app[STORE]


def greetings_of(request: web.Request) -> Greetings | None:
    """The greeting renderer, when the app has one."""
    return request.app.get(GREETINGS)


def not_found(request: web.Request, what: str) -> web.Response:
    """A 404 page."""
    return page(request, "error.html", {"message": f"{what} does not exist."}, status=404, title="Not found")


def see_other(request: web.Request, location: str, flash: str | None = None) -> web.Response:
    """303 to ``location`` (post/redirect/get), with an optional one-time message."""
    response = web.Response(status=303, headers={"Location": location})
    if flash:
        auth.set_flash(request.app[auth.GUARD], response, flash)
    return response


def profile_id(request: web.Request) -> int:
    """The ``{id}`` of the path (the route only matches digits)."""
    return int(request.match_info["id"])


def author(request: web.Request) -> str:
    """Who is recorded as the author of a change made by this request."""
    return auth.current_user(request) or auth.DEFAULT_USER


# -- sign-in


async def sign_in_page(request: web.Request) -> web.Response:
    """``GET /admin/sign-in``."""
    target = auth.safe_next(request.query.get("next"))
    try:
        signed_in = await request.app[auth.GUARD].load_session(request) is not None
    except StoreError as exc:  # the form itself still shows; signing in will say what is wrong
        request.app[METRICS].store_errors.inc(label="admin_session")
        log.error("admin: sessions cannot be checked: %s", exc)
        signed_in = False
    if signed_in:
        raise web.HTTPSeeOther(location=target)
    return page(request, "sign_in.html", {"next": target, "name": "", "error": None}, title="Sign in")


async def sign_in(request: web.Request) -> web.Response:
    """``POST /admin/sign-in``: check the token, keep the session in the store, set the cookie.

    The right token is accepted at once; a wrong one is answered late (:class:`throttle.Throttle`).
    """
    guard = request.app[auth.GUARD]
    if request.content_length is None or request.content_length > auth.SIGN_IN_MAX_BYTES:
        return web.Response(status=413, text="The sign-in form is larger than a sign-in form can be.\n")
    form = await request.post()
    target = auth.safe_next(_text(form, "next"))
    name = _clean_name(_text(form, "name"))
    address = throttle.client_address(request)
    context: dict[str, Any] = {"next": target, "name": name}
    if not guard.signer.token_matches(_text(form, "token").strip()):
        # Counted, logged (never the token) and answered late there; 429 at once when too many wait.
        if not await guard.throttle.wrong_token(request, throttle.REASON_SIGN_IN):
            error = "Too many wrong tokens are being tried right now. Wait a few seconds and try again."
            response = page(request, "sign_in.html", context | {"error": error}, status=429, title="Sign in")
            response.headers["Retry-After"] = str(math.ceil(throttle.MAX_DELAY))
            return response
        return page(
            request,
            "sign_in.html",
            context | {"error": "That is not the admin token. Check it and try again."},
            status=401,
            title="Sign in",
        )
    try:
        value, session = await guard.start_session(request, name or auth.DEFAULT_USER)
    except StoreError as exc:
        request.app[METRICS].store_errors.inc(label="admin_session")
        log.error("admin sign-in from %s failed: the session could not be stored: %s", address, exc)
        error = "Signing in is unavailable: the session store cannot be written. Try again in a moment."
        response = page(request, "sign_in.html", context | {"error": error}, status=503, title="Sign in")
        response.headers["Retry-After"] = "5"
        return response
    log.info("admin sign-in from %s as %r", address, session.user)
    response = web.Response(status=303, headers={"Location": target})
    auth.set_session_cookie(guard, response, value)
    return response


async def sign_out(request: web.Request) -> web.Response:
    """``POST /admin/sign-out``: revoke the session in the store (every instance, for good), drop the
    cookie."""
    session = request.app[auth.GUARD].session(request)  # the middleware found it (else: to sign-in)
    if session is not None:
        try:
            await store_of(request).revoke_admin_session(session.sid)
        except StoreError as exc:
            request.app[METRICS].store_errors.inc(label="admin_session")
            log.error("admin sign-out of %r failed: the session could not be revoked: %s", session.user, exc)
            return page(
                request,
                "error.html",
                {
                    "message": "You are not signed out yet: the session store is unavailable, so the "
                    "sign-out could not be recorded. Try again in a moment."
                },
                status=503,
                title="Sign-out failed",
            )
        log.info("admin sign-out of %r", session.user)
    response = see_other(request, auth.SIGN_IN, "You are signed out.")
    auth.clear_session_cookie(response)
    return response


def _text(form: Any, key: str) -> str:
    value = form.get(key, "")
    return value if isinstance(value, str) else ""


def _clean_name(raw: str) -> str:
    # Shown in history and logs: printable, one line, short.
    return re.sub(r"\s+", " ", "".join(c for c in raw if c.isprintable())).strip()[:NAME_LIMIT]


# -- profiles


async def profiles(request: web.Request) -> web.Response:
    """``GET /admin``: every profile's latest version."""
    summaries = await store_of(request).list_profiles()
    return page(request, "profiles.html", {"profiles": summaries}, title="Profiles")


@dataclass(frozen=True, slots=True)
class GreetingStatus:
    """Where a version's pre-rendered greeting stands."""

    state: str
    """``ready``, ``rendering``, ``failed``, ``empty`` (no greeting text) or ``missing`` (not rendered)."""
    message: str = ""
    url: str = ""


async def greeting_status(request: web.Request, version: ProfileVersion) -> GreetingStatus:
    """The greeting status of ``version`` (shown on its page and polled by its script)."""
    pid, number = version.profile_id, version.version
    url = f"/admin/profiles/{pid}/versions/{number}/greeting.wav"
    greetings = greetings_of(request)
    if greetings is not None and greetings.pending(pid, number):
        return GreetingStatus("rendering")
    if version.has_greeting_audio or await store_of(request).greeting_audio(pid, number) is not None:
        return GreetingStatus("ready", url=url)
    if not version.profile.greeting.strip():
        return GreetingStatus("empty")
    if greetings is not None and (pid, number) in greetings.failures:
        return GreetingStatus("failed", greetings.failures[(pid, number)])
    return GreetingStatus("missing")


def prepare_greeting(request: web.Request, version: ProfileVersion) -> None:
    """Start rendering a new version's greeting, so staff can listen to it before calls do."""
    greetings = greetings_of(request)
    if greetings is not None and version.profile.greeting.strip() and not version.has_greeting_audio:
        greetings.prepare(version)


async def _is_default(store: Store, pid: int) -> bool:
    default = await store.default_profile()
    return default is not None and default.profile_id == pid


async def _form_page(
    request: web.Request,
    *,
    current: ProfileVersion | None,
    values: dict[str, Any],
    expected_version: int | None,
    errors: dict[str, str] | None = None,
    stale: StaleVersion | None = None,
    status: int = 200,
) -> web.Response:
    store = store_of(request)
    is_default = current is not None and await _is_default(store, current.profile_id)
    voices = voices_for(request.app[SETTINGS].dialect)
    context = {
        "current": current,
        "values": values,
        "errors": errors or {},
        "expected_version": expected_version,
        "stale": stale,
        "is_default": is_default,
        "voices": voices if values["voice"] in voices else (*voices, values["voice"]),
        "eagerness_choices": EAGERNESS,
        "noise_choices": ("off", *NOISE_REDUCTION),
        "greeting": await greeting_status(request, current) if current is not None else None,
        "can_render": greetings_of(request) is not None,
        "labels": FORM_LABELS,
        "anchors": FORM_ANCHORS,
    }
    title = f"Edit {current.profile.name}" if current is not None else "New profile"
    return page(request, "profile.html", context, status=status, title=title)


async def new_profile_page(request: web.Request) -> web.Response:
    """``GET /admin/profiles/new``: the form with the default settings."""
    return await _form_page(request, current=None, values=new_profile_values(), expected_version=None)


async def profile_page(request: web.Request) -> web.Response:
    """``GET /admin/profiles/{id}``: the latest version in the edit form, its greeting, the test call."""
    try:
        current = await store_of(request).get(profile_id(request))
    except NotFound:
        return not_found(request, "This profile")
    is_default = await _is_default(store_of(request), current.profile_id)
    values = values_from_profile(current.profile, is_default=is_default)
    return await _form_page(request, current=current, values=values, expected_version=current.version)


def _validate(request: web.Request, values: dict[str, Any]) -> tuple[Profile | None, dict[str, str]]:
    data, problems = mapping_from_values(values)
    try:
        profile = profile_from_mapping(data, dialect=request.app[SETTINGS].dialect)
    except ProfileError as exc:
        return None, form_errors(problems | exc.problems)
    if problems:
        return None, form_errors(problems)
    return profile, {}


async def create_profile(request: web.Request) -> web.Response:
    """``POST /admin/profiles/new``: version 1 of a new profile."""
    store = store_of(request)
    values = values_from_form(await request.post())
    profile, errors = _validate(request, values)
    if profile is None:
        return await _form_page(
            request, current=None, values=values, expected_version=None, errors=errors, status=422
        )
    try:
        saved = await store.create(profile, author=author(request), comment=values["comment"].strip())
    except Conflict as exc:
        errors = form_errors(exc.problems)
        return await _form_page(
            request, current=None, values=values, expected_version=None, errors=errors, status=422
        )
    if values["make_default"]:
        await store.set_default(saved.profile_id)
    prepare_greeting(request, saved)
    return see_other(request, f"/admin/profiles/{saved.profile_id}", f"Created {profile.name}: version 1.")


async def save_profile(request: web.Request) -> web.Response:
    """``POST /admin/profiles/{id}``: a new version, unless someone saved since the form was loaded."""
    store, pid = store_of(request), profile_id(request)
    form = await request.post()
    values = values_from_form(form)
    try:
        current = await store.get(pid)
    except NotFound:
        return not_found(request, "This profile")
    try:
        expected = int(_text(form, "expected_version"))
    except ValueError:
        raise web.HTTPBadRequest(text="expected_version is missing: reload the page\n") from None
    profile, errors = _validate(request, values)
    if profile is None:
        return await _form_page(
            request, current=current, values=values, expected_version=expected, errors=errors, status=422
        )
    comment = values["comment"].strip()
    if (
        profile == current.profile
        and expected == current.version
        and not comment
        and not values["make_default"]
    ):
        return see_other(request, f"/admin/profiles/{pid}", "Nothing changed, so no new version was saved.")
    try:
        saved = await store.save(
            pid, profile, expected_version=expected, author=author(request), comment=comment
        )
    except StaleVersion as exc:
        # Keep everything typed; the next save is against the version they have now seen.
        current = await store.get(pid)
        return await _form_page(
            request, current=current, values=values, expected_version=exc.current, stale=exc, status=409
        )
    except Conflict as exc:
        errors = form_errors(exc.problems)
        return await _form_page(
            request, current=current, values=values, expected_version=expected, errors=errors, status=422
        )
    if values["make_default"]:
        await store.set_default(pid)
    prepare_greeting(request, saved)
    return see_other(request, f"/admin/profiles/{pid}", f"Saved version {saved.version}.")


async def set_default(request: web.Request) -> web.Response:
    """``POST /admin/profiles/{id}/default``: route numbers no profile claims to this one."""
    pid = profile_id(request)
    try:
        await store_of(request).set_default(pid)
        current = await store_of(request).get(pid)
    except NotFound:
        return not_found(request, "This profile")
    return see_other(request, "/admin", f"{current.profile.name} is now the default profile.")


# -- history


async def history(request: web.Request) -> web.Response:
    """``GET /admin/profiles/{id}/history``: every version, newest first, with what each changed."""
    try:
        versions = await store_of(request).history(profile_id(request))
    except NotFound:
        return not_found(request, "This profile")
    entries = []
    for i, version in enumerate(versions):
        previous = versions[i + 1] if i + 1 < len(versions) else None
        entries.append(
            {"version": version, "changes": diff(previous.profile, version.profile) if previous else None}
        )
    latest = versions[0]
    context = {"latest": latest, "entries": entries}
    return page(request, "history.html", context, title=f"History of {latest.profile.name}")


async def rollback(request: web.Request) -> web.Response:
    """``POST /admin/profiles/{id}/rollback``: a new version with an old version's content."""
    store, pid = store_of(request), profile_id(request)
    form = await request.post()
    try:
        to_version, expected = int(_text(form, "to_version")), int(_text(form, "expected_version"))
    except ValueError:
        raise web.HTTPBadRequest(
            text="to_version and expected_version are required: reload the page\n"
        ) from None
    back = f"/admin/profiles/{pid}/history"
    try:
        saved = await store.rollback(
            pid,
            to_version,
            expected_version=expected,
            author=author(request),
            comment=_text(form, "comment").strip(),
        )
    except NotFound:
        return not_found(request, "This version")
    except StaleVersion as exc:
        return see_other(
            request,
            back,
            f"Nothing was rolled back: someone saved version {exc.current} meanwhile. "
            "Review it and try again.",
        )
    except Conflict as exc:
        problems = "; ".join(exc.problems.values())
        return see_other(request, back, f"Version {to_version} cannot be restored: {problems}")
    prepare_greeting(request, saved)
    return see_other(
        request, back, f"Rolled back: version {saved.version} has the content of version {to_version}."
    )


# -- greetings


async def greeting_wav(request: web.Request) -> web.Response:
    """``GET …/versions/{v}/greeting.wav``: the pre-rendered greeting as an 8 kHz WAV, to listen to."""
    pid, number = profile_id(request), int(request.match_info["v"])
    audio = await store_of(request).greeting_audio(pid, number)
    if not audio:
        raise web.HTTPNotFound(text="This version has no rendered greeting.\n")
    return web.Response(body=ulaw_wav(audio), content_type="audio/wav")


def ulaw_wav(audio: bytes) -> bytes:
    """A mono 16-bit 8 kHz WAV file of raw μ-law audio (browsers do not all play μ-law WAVs)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(ulaw_to_pcm16(audio))
    return out.getvalue()


async def render_greeting(request: web.Request) -> web.Response:
    """``POST …/versions/{v}/greeting``: render (again) a greeting that failed or was never rendered."""
    pid, number = profile_id(request), int(request.match_info["v"])
    try:
        version = await store_of(request).get(pid, number)
    except NotFound:
        return not_found(request, "This version")
    greetings = greetings_of(request)
    if greetings is None:
        return see_other(request, f"/admin/profiles/{pid}", "Greetings cannot be rendered on this bridge.")
    greetings.failures.pop((pid, number), None)
    greetings.prepare(version)
    return see_other(request, f"/admin/profiles/{pid}", f"Rendering the greeting of version {number}…")

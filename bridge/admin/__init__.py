"""The staff web UI under ``/admin``: prompt profiles, their versions and greetings, the call log.

Server-rendered HTML (Jinja, autoescaped) with a little vanilla JavaScript, served by the bridge's own
aiohttp app, plus a JSON API under ``/admin/api/`` for automation. ``BRIDGE_ADMIN_TOKEN`` signs staff
in (:mod:`bridge.admin.auth`); without it the app calls :func:`closed` instead of :func:`setup`.

Routes (every one but sign-in and ``/admin/static/`` needs a session or, for the API, the bearer token)::

    GET  /admin                                  profiles
    GET  /admin/sign-in, POST /admin/sign-in     sign in;  POST /admin/sign-out
    GET  /admin/profiles/new, POST …/new         create a profile
    GET  /admin/profiles/{id}, POST …            edit (save a new version), greeting, test call
    POST /admin/profiles/{id}/default            make it the default profile
    GET  /admin/profiles/{id}/history            versions with diffs;  POST …/rollback
    GET  /admin/profiles/{id}/versions/{v}/greeting.wav;  POST …/greeting (render again)
    GET  /admin/calls, /admin/calls/{sid}        call log, one call
    GET  /admin/calls/{sid}/recording, …/timeline.svg
    GET  /admin/test-call?profile=…&csrf=…       WebSocket: the in-browser test call (bridge.admin.testcall)
    /admin/api/…                                 JSON: see bridge.admin.api
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from bridge.admin import api, calls, testcall, views
from bridge.admin.auth import (
    GUARD,
    Guard,
    SessionSigner,
    admin_middleware,
    csrf_token,
    current_user,
    security_headers,
)
from bridge.admin.render import TEMPLATES, make_environment
from bridge.keys import SETTINGS

__all__ = ["closed", "csrf_token", "current_user", "setup"]

STATIC_DIR = Path(__file__).parent / "static"
CLOSED_MESSAGE = "The admin UI is closed: set BRIDGE_ADMIN_TOKEN to open it.\n"


def setup(app: web.Application) -> None:
    """Register the admin UI on ``app`` (which must hold SETTINGS with an admin token, and STORE)."""
    settings = app[SETTINGS]
    if settings.admin_token is None:
        raise ValueError("the admin UI needs BRIDGE_ADMIN_TOKEN; use bridge.admin.closed(app) without it")
    guard = app[GUARD] = Guard(SessionSigner(settings.admin_token.reveal()), settings)
    app[testcall.SLOTS] = testcall.StaffCallSlots()

    async def close_failure_log(app: web.Application) -> None:
        guard.throttle.log.close()  # the last summary of wrong tokens, and no timer left behind

    app.on_cleanup.append(close_failure_log)
    app[TEMPLATES] = make_environment()
    app[calls.RECORDING_ROOTS] = calls.recording_roots(settings)
    # A middleware rather than per-handler checks: it also guards routes other modules add under
    # /admin (the test call) and unknown /admin paths, so nothing there is reachable by accident.
    app.middlewares.append(admin_middleware)
    app.on_response_prepare.append(security_headers)

    r = app.router
    profile, version = r"/admin/profiles/{id:\d+}", r"/admin/profiles/{id:\d+}/versions/{v:\d+}"
    r.add_get("/admin", views.profiles, name="admin")
    r.add_get("/admin/", views.profiles)
    r.add_get("/admin/sign-in", views.sign_in_page, name="admin_sign_in")
    r.add_post("/admin/sign-in", views.sign_in)
    r.add_post("/admin/sign-out", views.sign_out, name="admin_sign_out")
    r.add_get("/admin/profiles/new", views.new_profile_page, name="admin_new_profile")
    r.add_post("/admin/profiles/new", views.create_profile)
    r.add_get(profile, views.profile_page, name="admin_profile")
    r.add_post(profile, views.save_profile)
    r.add_post(profile + "/default", views.set_default)
    r.add_get(profile + "/history", views.history, name="admin_history")
    r.add_post(profile + "/rollback", views.rollback)
    r.add_get(version + "/greeting.wav", views.greeting_wav, name="admin_greeting_wav")
    r.add_post(version + "/greeting", views.render_greeting)
    r.add_get("/admin/calls", calls.call_list, name="admin_calls")
    r.add_get("/admin/calls/{sid}", calls.call_detail, name="admin_call")
    r.add_get("/admin/calls/{sid}/recording", calls.recording, name="admin_recording")
    r.add_get("/admin/calls/{sid}/timeline.svg", calls.timeline, name="admin_timeline")

    a, a_profile = "/admin/api", r"/admin/api/profiles/{id:\d+}"
    r.add_get(a + "/profiles", api.list_profiles, name="admin_api_profiles")
    r.add_post(a + "/profiles", api.create_profile)
    r.add_get(a_profile, api.get_profile, name="admin_api_profile")
    r.add_put(a_profile, api.save_profile)
    r.add_get(a_profile + "/history", api.history)
    r.add_post(a_profile + "/rollback", api.rollback)
    r.add_post(a_profile + "/default", api.set_default)
    r.add_get(a_profile + r"/versions/{v:\d+}/greeting", api.greeting)
    r.add_get(a + "/calls", api.list_calls, name="admin_api_calls")
    r.add_get(a + "/calls/{sid}", api.get_call, name="admin_api_call")

    r.add_get(testcall.PATH, testcall.test_call, name="admin_test_call")
    r.add_static("/admin/static/", STATIC_DIR, name="admin_static", append_version=False)


async def _closed(request: web.Request) -> web.Response:
    return web.Response(status=404, text=CLOSED_MESSAGE)


def closed(app: web.Application) -> None:
    """Without ``BRIDGE_ADMIN_TOKEN``: every ``/admin`` path answers 404 saying how to open the UI."""
    app.router.add_route("*", "/admin", _closed)
    app.router.add_route("*", "/admin/{tail:.*}", _closed)

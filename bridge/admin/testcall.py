"""The in-browser test call: ``GET /admin/test-call?profile=ID&csrf=TOKEN``, a WebSocket upgrade.

The profile page's script (``static/testcall.js``) plays Twilio's part: it sends ``connected``, ``start``
and 20 ms μ-law ``media`` frames from the microphone, plays what comes back at 8 kHz μ-law quality, echoes
``mark``s when its playback reaches them and obeys ``clear``. This handler hands the socket to
:func:`bridge.web.run_media_stream`, the same path a Twilio stream takes, so staff hear exactly what a
caller would. The one difference is authorisation: instead of a Twilio signature and a one-time token,
the upgrade needs a signed-in admin session, the session's CSRF token in the query (a cross-site page
cannot read it) and an ``Origin`` that is this site. Every refusal is an HTTP error *before* the upgrade
(403, or 429 past the limit below), so the browser sees a failed handshake (with a JSON reason), never a
half-open call.

Test calls have their own id space: the server chooses the CallSid (``test-`` and 32 hex digits; Twilio's
are ``CA`` and 32 hex digits), whatever the browser's ``start`` says, so a test call can never write over
a real call's record. Each staff member (the name typed at sign-in) may have at most
:data:`TEST_CALLS_PER_USER` test calls at once on an instance; the next is refused until one ends.

Besides Twilio's own messages the socket carries two extra kinds, server to browser only:
``{"event": "call", "callSid": "test-…"}`` first, the id the call is recorded under, and
``{"event": "transcript", "role": "caller"|"assistant", "text": …}`` as turns are transcribed.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson
from aiohttp import hdrs, web

from bridge.admin.auth import csrf_token, current_user, json_error
from bridge.keys import METRICS, REGISTRY, SETTINGS, STORE
from bridge.store import NotFound, ProfileVersion, StoreError
from bridge.web import WS_MAX_MESSAGE, run_media_stream

log = logging.getLogger(__name__)

PATH = "/admin/test-call"
"""Where :func:`test_call` is routed (``app.router.add_get(PATH, test_call)``)."""
TEST_CALLS_PER_USER = 2
"""Test calls one staff member may have at once (on one instance)."""
SID_PREFIX = "test-"
"""Test calls' CallSids: this and 32 hex digits. Twilio's start with ``CA``, so they never meet."""


def new_call_sid() -> str:
    """A fresh CallSid for a test call, chosen by the server."""
    return SID_PREFIX + secrets.token_hex(16)


@dataclass
class StaffCallSlots:
    """The test calls each staff member has going, against :data:`TEST_CALLS_PER_USER`."""

    limit: int = TEST_CALLS_PER_USER
    live: Counter[str] = field(default_factory=Counter)

    def take(self, user: str) -> bool:
        """Take a slot for ``user``'s new test call; ``False`` when they have ``limit`` going."""
        if self.live[user] >= self.limit:
            return False
        self.live[user] += 1
        return True

    def give_back(self, user: str) -> None:
        """A test call of ``user`` has ended."""
        self.live[user] -= 1
        if self.live[user] <= 0:
            del self.live[user]


SLOTS = web.AppKey("bridge_admin_test_call_slots", StaffCallSlots)


def _origin_ok(request: web.Request) -> bool:
    """Whether the upgrade's ``Origin`` is this site: ``BRIDGE_PUBLIC_URL``'s origin or the requested host.

    Browsers always send ``Origin`` on WebSocket upgrades, and the session cookie would ride along on a
    cross-site one, so a missing or foreign ``Origin`` is refused.
    """
    origin = request.headers.get(hdrs.ORIGIN)
    if not origin or origin == "null":
        return False
    parts = urlsplit(origin)
    scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
    if scheme not in ("http", "https") or not netloc:
        return False
    public = urlsplit(request.app[SETTINGS].public_url)
    if (scheme, netloc) == (public.scheme.lower(), public.netloc.lower()):
        return True
    # Staff may reach the admin UI on an internal address; the page's own host is then its origin.
    return netloc == request.host.lower()


async def test_call(request: web.Request) -> web.StreamResponse:
    """Serve one test call of a profile's latest version over a WebSocket, as if Twilio had placed it."""
    user = current_user(request)
    if user is None:
        return json_error(403, "forbidden", "Sign in to place a test call.")
    expected = csrf_token(request)
    given = request.query.get("csrf", "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        return json_error(403, "forbidden", "The page has expired: reload it and try again.")
    if not _origin_ok(request):
        return json_error(403, "forbidden", "This test call was started from another site.")
    try:
        profile_id = int(request.query.get("profile", ""))
    except ValueError:
        return json_error(400, "bad_request", "profile must be the id of a profile.")
    try:
        version: ProfileVersion = await request.app[STORE].get(profile_id)
    except NotFound:
        return json_error(404, "not_found", f"There is no profile {profile_id}.")
    except StoreError as exc:
        log.error("test call: profile %d could not be loaded: %s", profile_id, exc)
        return json_error(503, "unavailable", "The profile store is unavailable; try again shortly.")

    ws = web.WebSocketResponse(max_msg_size=WS_MAX_MESSAGE, autoping=True)
    if not ws.can_prepare(request).ok:
        return json_error(400, "bad_request", "This URL takes a WebSocket upgrade.")
    registry, settings = request.app[REGISTRY], request.app[SETTINGS]
    if registry.active >= settings.max_calls:  # test calls count against the process's capacity too
        request.app[METRICS].refused.inc(label="full")
        return json_error(503, "full", f"The bridge has {settings.max_calls} calls going; try again shortly.")
    slots = request.app[SLOTS]
    if not slots.take(user):
        metrics = request.app.get(METRICS)
        if metrics is not None:
            metrics.refused.inc(label="test_call_limit")
        log.info("test call by %s refused: %d going already", user, slots.limit)
        return json_error(
            429,
            "too_many_test_calls",
            f"You have {slots.limit} test calls going already: hang one up first.",
        )
    try:
        return await _serve(request, ws, version, user)
    finally:
        slots.give_back(user)


async def _serve(
    request: web.Request, ws: web.WebSocketResponse, version: ProfileVersion, user: str
) -> web.WebSocketResponse:
    call_sid = new_call_sid()
    await ws.prepare(request)
    log.info(
        "test call %s of profile %d version %d (%r) by %s",
        call_sid,
        version.profile_id,
        version.version,
        version.profile.name,
        user,
    )
    await ws.send_str(orjson.dumps({"event": "call", "callSid": call_sid}).decode())

    async def send_transcript(role: str, text: str) -> None:
        """Show each transcribed turn on the page (not a Twilio message: the browser only displays it)."""
        if ws.closed:
            return
        message = orjson.dumps({"event": "transcript", "role": role, "text": text}).decode()
        await ws.send_str(message)

    await run_media_stream(
        request.app,
        ws,
        check_token=False,
        version=version,
        test_call=True,
        on_transcript=send_transcript,
        call_sid=call_sid,  # the browser's start does not choose it
    )
    if not ws.closed:
        await ws.close()
    return ws

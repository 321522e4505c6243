"""The in-browser test call: ``GET /admin/test-call?profile=ID&csrf=TOKEN``, a WebSocket upgrade.

The profile page's script (``static/testcall.js``) plays Twilio's part: it sends ``connected``, ``start``
and 20 ms μ-law ``media`` frames from the microphone, plays what comes back at 8 kHz μ-law quality, echoes
``mark``s when its playback reaches them and obeys ``clear``. This handler hands the socket to
:func:`bridge.web.run_media_stream`, the same path a Twilio stream takes, so staff hear exactly what a
caller would. The one difference is authorisation: instead of a Twilio signature and a one-time token,
the upgrade needs a signed-in admin session, the session's CSRF token in the query (a cross-site page
cannot read it) and an ``Origin`` that is this site. Every refusal is an HTTP 403 *before* the upgrade,
so the browser sees a failed handshake (with a JSON reason), never a half-open call.

Besides Twilio's own messages the socket carries one extra kind, server to browser only:
``{"event": "transcript", "role": "caller"|"assistant", "text": …}`` as turns are transcribed.
"""

from __future__ import annotations

import hmac
import logging
from urllib.parse import urlsplit

import orjson
from aiohttp import hdrs, web

from bridge.admin.auth import csrf_token, current_user, json_error
from bridge.keys import SETTINGS, STORE
from bridge.store import NotFound, ProfileVersion, StoreError
from bridge.web import WS_MAX_MESSAGE, run_media_stream

log = logging.getLogger(__name__)

PATH = "/admin/test-call"
"""Where :func:`test_call` is routed (``app.router.add_get(PATH, test_call)``)."""


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
    await ws.prepare(request)
    log.info(
        "test call of profile %d version %d (%r) by %s",
        version.profile_id,
        version.version,
        version.profile.name,
        user,
    )

    async def send_transcript(role: str, text: str) -> None:
        """Show each transcribed turn on the page (not a Twilio message: the browser only displays it)."""
        if ws.closed:
            return
        message = orjson.dumps({"event": "transcript", "role": role, "text": text}).decode()
        await ws.send_str(message)

    await run_media_stream(
        request.app, ws, check_token=False, version=version, test_call=True, on_transcript=send_transcript
    )
    if not ws.closed:
        await ws.close()
    return ws

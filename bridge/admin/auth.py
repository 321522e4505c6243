"""Staff sign-in, sessions and CSRF protection for everything under ``/admin``.

Theory of operation
-------------------
* **Sign-in** compares the typed token with ``BRIDGE_ADMIN_TOKEN`` in constant time. On success a session
  is written to the store (``{session id, name, expiry}``) and the browser gets one cookie holding the same
  and an HMAC-SHA256 over it. The HMAC key is derived from the admin token with a fixed label, so changing
  the token signs everyone out.
* **Sessions live in the store**: a request's session is valid only while its cookie's HMAC is right, it
  has not expired, and the store still has it, unexpired and not signed out. So a sign-out holds for good
  (across restarts) and on every instance sharing the store. When the store cannot be read, signed-in
  requests are refused with 503 and a log line (fail closed); the bearer token does not need the store.
* **Every** request under ``/admin`` goes through :func:`admin_middleware`: only the sign-in page (and
  its POST) and ``/admin/static/`` are public. Pages answer an anonymous visitor with 303 to sign-in;
  the JSON API and WebSocket upgrades answer 401 JSON. The JSON API also takes
  ``Authorization: Bearer <BRIDGE_ADMIN_TOKEN>`` for automation.
* **CSRF**: each session has a token, an HMAC of its session id (so it needs no storage). Every
  POST/PUT/PATCH/DELETE must carry it (forms: field ``csrf``; JSON: header ``X-CSRF-Token``), and when
  the browser says where the request comes from (``Origin``, else ``Referer``) that must be this site.
  Bearer requests carry no cookie, so they cannot be forged cross-site and need no CSRF token.
  WebSocket upgrades (the test call) must carry an ``Origin`` of this site: browsers always send one.
* **Wrong tokens** (the sign-in form and the bearer header alike, :class:`Throttle`): the right token is
  checked first and always accepted at once, whatever came before, so nobody is ever locked out (staff
  behind one proxy share an address). A wrong one is counted (``bridge_refused_total{reason="sign_in"}``
  or ``{reason="admin_token"}``), logged without the guess (the first at once, then one summary a minute
  while they go on) and answered late: after 3 recent failures from an address, 0.25 s doubling per
  failure, and after 30 recent failures from anywhere, 0.25 s doubling every 5; at most 5 s. Failures are
  forgotten gradually (half-life 5 min per address, 1 min overall). At most 1,000 late answers are held at
  once; beyond that a wrong guess is answered 429 at once rather than held (bounded memory; such a flood
  learns sooner that those guesses were wrong, so what makes guessing hopeless is the token's length, at
  least 16 characters: the delays and the log make trying slow and visible). The sign-in form is refused
  (413) above 8 KiB, before it is read.
* **Sign-out** clears the cookie and revokes the session in the store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import hdrs, web

from bridge.admin.throttle import MAX_DELAY, REASON_BEARER, Throttle
from bridge.config import Settings
from bridge.errors import StoreError
from bridge.keys import METRICS, STORE

log = logging.getLogger(__name__)

COOKIE = "bridge_admin"
FLASH_COOKIE = "bridge_admin_flash"
SESSION_SECONDS = 8 * 3600
PREFIX = "/admin"
SIGN_IN = "/admin/sign-in"
SIGN_OUT = "/admin/sign-out"
API_PREFIX = "/admin/api/"
STATIC_PREFIX = "/admin/static/"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BEARER_USER = "api"
"""The author recorded for changes made with the bearer token (no name was typed)."""
DEFAULT_USER = "staff"
_KEY_LABEL = b"bridge admin session v1"
SIGN_IN_MAX_BYTES = 8 * 1024
"""The sign-in form is tiny: a larger (or unsized) body is refused before it is read."""


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in staff member, as the cookie says (and the store confirms)."""

    sid: str
    user: str
    expires: float


class SessionSigner:
    """Signs and checks session cookies and derives CSRF tokens; the key comes from the admin token."""

    def __init__(self, admin_token: str, now: Callable[[], float] = time.time) -> None:
        # Derived, not the token itself: a leaked cookie signature says nothing about the token.
        self._key = hmac.new(admin_token.encode(), _KEY_LABEL, hashlib.sha256).digest()
        self._token_digest = hashlib.sha256(admin_token.encode()).digest()
        self.now = now
        """Wall-clock time (expiry must survive restarts, so not the monotonic clock); tests replace it."""

    def token_matches(self, candidate: str) -> bool:
        """Whether ``candidate`` is the admin token (constant time, its length included)."""
        given = hashlib.sha256(candidate.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(given, self._token_digest)

    def _mac(self, label: bytes, data: bytes) -> bytes:
        return hmac.new(self._key, label + b"\0" + data, hashlib.sha256).digest()

    def issue(self, user: str) -> tuple[str, Session]:
        """A new session for ``user``: the cookie value and what it holds."""
        session = Session(secrets.token_urlsafe(18), user, float(int(self.now()) + SESSION_SECONDS))
        payload = orjson.dumps({"sid": session.sid, "user": session.user, "exp": int(session.expires)})
        return self.sign("session", payload), session

    def verify(self, value: str | None) -> Session | None:
        """The session a cookie value holds, or ``None`` when it is forged, malformed or expired."""
        payload = self.unsign("session", value)
        if payload is None:
            return None
        try:
            data = orjson.loads(payload)
            session = Session(str(data["sid"]), str(data["user"]), float(data["exp"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return session if session.expires > self.now() else None

    def sign(self, label: str, payload: bytes) -> str:
        """``payload`` with an HMAC bound to ``label`` (so one kind of cookie cannot pass for another)."""
        mac = self._mac(label.encode(), payload)
        return f"{_b64(payload)}.{_b64(mac)}"

    def unsign(self, label: str, value: str | None) -> bytes | None:
        """The payload of a :meth:`sign`-ed value, or ``None`` when its HMAC does not match."""
        if not value or value.count(".") != 1:
            return None
        body, mac = value.split(".")
        try:
            payload, given = _unb64(body), _unb64(mac)
        except (ValueError, binascii.Error):
            return None
        return payload if hmac.compare_digest(given, self._mac(label.encode(), payload)) else None

    def csrf(self, session: Session) -> str:
        """The CSRF token of a session: stable for its lifetime, useless for any other session."""
        return _b64(self._mac(b"csrf", session.sid.encode()))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- sessions


@dataclass(frozen=True, slots=True)
class _Resolved:
    session: Session | None


_RESOLVED = web.RequestKey("bridge_admin_session", _Resolved)


@dataclass
class Guard:
    """Everything authentication needs at request time (one per app)."""

    signer: SessionSigner
    settings: Settings
    throttle: Throttle = field(default_factory=Throttle)

    @property
    def secure_cookies(self) -> bool:
        """Cookies get ``Secure`` when the bridge is reached over https."""
        return self.settings.public_url.lower().startswith("https://")

    async def load_session(self, request: web.Request) -> Session | None:
        """The request's session: its cookie is signed and unexpired, and the store still has it.

        Remembered on the request (:meth:`session`); raises :class:`StoreError` when the store fails.
        """
        resolved: _Resolved | None = request.get(_RESOLVED)
        if resolved is not None:
            return resolved.session
        session = self.signer.verify(request.cookies.get(COOKIE))
        if session is not None:
            stored = await request.app[STORE].admin_session(session.sid)
            if stored is None or stored.user != session.user:
                session = None  # signed out, expired, or never written here
        request[_RESOLVED] = _Resolved(session)
        return session

    def session(self, request: web.Request) -> Session | None:
        """The session :meth:`load_session` found for this request (``None`` before it ran)."""
        resolved: _Resolved | None = request.get(_RESOLVED)
        return resolved.session if resolved is not None else None

    async def start_session(self, request: web.Request, user: str) -> tuple[str, Session]:
        """A new session for ``user``, written to the store: the cookie value and the session.

        Raises :class:`StoreError` when it cannot be written.
        """
        value, session = self.signer.issue(user)
        expires_at = datetime.fromtimestamp(session.expires, UTC)
        await request.app[STORE].add_admin_session(session.sid, session.user, expires_at)
        return value, session

    def bearer_ok(self, request: web.Request) -> bool:
        """Whether the request carries ``Authorization: Bearer <BRIDGE_ADMIN_TOKEN>``."""
        scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        return scheme.lower() == "bearer" and self.signer.token_matches(value.strip())

    def same_origin(self, request: web.Request) -> bool:
        """Whether ``Origin`` (else ``Referer``), when the browser sends one, is this site.

        This site is ``BRIDGE_PUBLIC_URL``'s origin, or the host the request was sent to (staff may
        reach the admin UI on an internal address); a cross-site page can forge neither header.
        """
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or origin == "null":
            referer = request.headers.get(hdrs.REFERER)
            if referer is None:
                return origin is None  # "null" (sandboxed or privacy-stripped) is not trusted
            origin = referer
        parts = urlsplit(origin)
        if not parts.scheme or not parts.netloc:
            return False
        public = urlsplit(self.settings.public_url)
        if (parts.scheme.lower(), parts.netloc.lower()) == (public.scheme.lower(), public.netloc.lower()):
            return True
        return parts.netloc.lower() == request.host.lower()


GUARD = web.AppKey("bridge_admin_guard", Guard)


def current_user(request: web.Request) -> str | None:
    """Who is making this admin request: the name typed at sign-in, ``api`` for the bearer token, or None.

    The session is the one :func:`admin_middleware` found (public pages look it up themselves).
    """
    guard = request.app[GUARD]
    session = guard.session(request)
    if session is not None:
        return session.user
    if request.path.startswith(API_PREFIX) and guard.bearer_ok(request):
        return BEARER_USER
    return None


def csrf_token(request: web.Request) -> str:
    """The CSRF token of the request's session (``""`` without one), for forms and ``data-csrf``."""
    guard = request.app[GUARD]
    session = guard.session(request)
    return guard.signer.csrf(session) if session is not None else ""


def is_admin_path(path: str) -> bool:
    """Whether ``path`` belongs to the admin UI."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def _public(request: web.Request) -> bool:
    path = request.path
    return path == SIGN_IN or path.startswith(STATIC_PREFIX)


def _wants_json(request: web.Request) -> bool:
    if request.path.startswith(API_PREFIX):
        return True
    if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
        return True
    accept = request.headers.get(hdrs.ACCEPT, "")
    return "application/json" in accept and "text/html" not in accept


def json_error(status: int, error: str, message: str, **extra: Any) -> web.Response:
    """A JSON error body ``{"error": …, "message": …}`` with ``status``."""
    body = orjson.dumps({"error": error, "message": message, **extra})
    return web.Response(body=body, status=status, content_type="application/json")


def _forbidden(request: web.Request, message: str) -> web.Response:
    if _wants_json(request):
        return json_error(403, "forbidden", message)
    return web.Response(status=403, text=message + "\n")


def too_many_attempts(request: web.Request) -> web.Response:
    """429: too many wrong tokens are being answered late already (see :class:`Throttle`)."""
    message = "Too many wrong tokens are being tried right now: wait a few seconds and try again."
    response = json_error(429, "too_many_attempts", message)
    response.headers[hdrs.RETRY_AFTER] = str(math.ceil(MAX_DELAY))
    return response


def store_unavailable(request: web.Request, what: str) -> web.Response:
    """503 when admin sessions cannot be read or written: nothing goes through unchecked."""
    message = f"{what}: the session store is unavailable. Try again in a moment."
    response = (
        json_error(503, "unavailable", message)
        if _wants_json(request)
        else web.Response(status=503, text=message + "\n")
    )
    response.headers[hdrs.RETRY_AFTER] = "5"
    return response


def _unauthorized(request: web.Request) -> web.Response:
    if _wants_json(request):
        response = json_error(
            401, "unauthorized", "Sign in, or send Authorization: Bearer <BRIDGE_ADMIN_TOKEN>."
        )
        response.headers[hdrs.WWW_AUTHENTICATE] = 'Bearer realm="bridge admin"'
        return response
    target = request.path_qs if request.method in SAFE_METHODS else PREFIX
    raise web.HTTPSeeOther(location=f"{SIGN_IN}?next={_quote(target)}")


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def safe_next(value: str | None) -> str:
    """Where to go after sign-in: a path inside the admin UI only (never another site)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return PREFIX  # "//host" and "/\\host" are other sites to a browser
    if not is_admin_path(urlsplit(value).path) or value.startswith(SIGN_IN):
        return PREFIX
    return value


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let nothing under ``/admin`` through without a session (or the bearer token), nor a forged write."""
    if not is_admin_path(request.path):
        return await handler(request)
    guard = request.app[GUARD]
    writes = request.method not in SAFE_METHODS
    upgrade = request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
    if _public(request):
        if writes and not guard.same_origin(request):  # login CSRF: signing a victim in as someone else
            return _forbidden(request, "This form was sent from another site.")
        return await handler(request)
    if request.path.startswith(API_PREFIX) and hdrs.AUTHORIZATION in request.headers:
        if guard.bearer_ok(request):  # the right token first: accepted at once, whatever came before
            return await handler(request)  # no cookie involved: a cross-site page cannot send this header
        if not await guard.throttle.wrong_token(request, REASON_BEARER):
            return too_many_attempts(request)
        return json_error(401, "unauthorized", "The bearer token is not BRIDGE_ADMIN_TOKEN.")
    try:
        session = await guard.load_session(request)
    except StoreError as exc:
        request.app[METRICS].store_errors.inc(label="admin_session")
        log.error("admin: %s %s refused: sessions cannot be checked: %s", request.method, request.path, exc)
        return store_unavailable(request, "Your session cannot be checked")
    if session is None:
        return _unauthorized(request)
    if upgrade and hdrs.ORIGIN not in request.headers:
        # Browsers always send Origin on WebSocket upgrades, and the cookie rides along cross-site.
        return _forbidden(request, "A WebSocket upgrade must say where it comes from (Origin).")
    if (writes or upgrade) and not guard.same_origin(request):
        return _forbidden(request, "This request came from another site.")
    if writes:
        given = request.headers.get(CSRF_HEADER)
        if given is None and request.content_type in (
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ):
            value = (await request.post()).get(CSRF_FIELD)
            given = value if isinstance(value, str) else None
        if given is None or not hmac.compare_digest(given.encode(), guard.signer.csrf(session).encode()):
            return _forbidden(
                request, "The form has expired or was not sent from this site: reload and try again."
            )
    return await handler(request)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: admin pages may not be framed, sniffed, cached or load foreign content."""
    if not is_admin_path(request.path):
        return
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "media-src 'self' blob:; worker-src 'self' blob:; connect-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    )
    if not request.path.startswith(STATIC_PREFIX):
        headers.setdefault(hdrs.CACHE_CONTROL, "no-store")


def set_session_cookie(guard: Guard, response: web.StreamResponse, value: str) -> None:
    """The session cookie: script-proof, same-site only, scoped to the admin UI."""
    response.set_cookie(
        COOKIE,
        value,
        max_age=SESSION_SECONDS,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=guard.secure_cookies,
    )


def clear_session_cookie(response: web.StreamResponse) -> None:
    """Tell the browser to forget the session cookie."""
    response.del_cookie(COOKIE, path=PREFIX)


def set_flash(guard: Guard, response: web.StreamResponse, message: str) -> None:
    """A one-time message for the next page (signed: it is shown to staff as our own words)."""
    response.set_cookie(
        FLASH_COOKIE,
        guard.signer.sign("flash", message.encode()),
        max_age=120,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=guard.secure_cookies,
    )


def take_flash(request: web.Request, response: web.StreamResponse | None = None) -> str | None:
    """The pending one-time message, if any; clears it on ``response``."""
    value = request.cookies.get(FLASH_COOKIE)
    if value is None:
        return None
    if response is not None:
        response.del_cookie(FLASH_COOKIE, path=PREFIX)
    payload = request.app[GUARD].signer.unsign("flash", value)
    return payload.decode("utf-8", "replace") if payload is not None else None

"""Staff sign-in, sessions and CSRF protection for everything under ``/admin``.

Theory of operation
-------------------
* **Sign-in** compares the typed token with ``BRIDGE_ADMIN_TOKEN`` in constant time. On success the
  browser gets one cookie holding ``{session id, name, expiry}`` and an HMAC-SHA256 over it. The HMAC key
  is derived from the admin token with a fixed label, so changing the token signs everyone out, and no
  server-side session table is needed (any instance behind a balancer accepts the cookie).
* **Every** request under ``/admin`` goes through :func:`admin_middleware`: only the sign-in page (and
  its POST) and ``/admin/static/`` are public. Pages answer an anonymous visitor with 303 to sign-in;
  the JSON API and WebSocket upgrades answer 401 JSON. The JSON API also takes
  ``Authorization: Bearer <BRIDGE_ADMIN_TOKEN>`` for automation.
* **CSRF**: each session has a token, an HMAC of its session id (so it needs no storage either). Every
  POST/PUT/PATCH/DELETE must carry it (forms: field ``csrf``; JSON: header ``X-CSRF-Token``), and when
  the browser says where the request comes from (``Origin``, else ``Referer``) that must be this site.
  Bearer requests carry no cookie, so they cannot be forged cross-site and need no CSRF token.
  WebSocket upgrades (the test call) must carry an ``Origin`` of this site: browsers always send one.
* **Failed sign-ins** back off per client address, doubling up to five minutes; the token is never logged.
* **Sign-out** clears the cookie and revokes its session id on this instance until it would have expired.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import hdrs, web

from bridge.config import Settings

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
_FREE_FAILURES = 3
"""Failed sign-ins from one address before the backoff starts (typos happen)."""
_MAX_BACKOFF = 300.0
_LIMITER_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in staff member, as the cookie says."""

    sid: str
    user: str
    expires: float


class SessionSigner:
    """Signs and checks session cookies and derives CSRF tokens; the key comes from the admin token."""

    def __init__(self, admin_token: str, now: Callable[[], float] = time.time) -> None:
        # Derived, not the token itself: a leaked cookie signature says nothing about the token.
        self._key = hmac.new(admin_token.encode(), _KEY_LABEL, hashlib.sha256).digest()
        self._token = admin_token.encode()
        self.now = now
        """Wall-clock time (expiry must survive restarts, so not the monotonic clock); tests replace it."""

    def token_matches(self, candidate: str) -> bool:
        """Whether ``candidate`` is the admin token (constant time)."""
        return hmac.compare_digest(candidate.encode(), self._token)

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


@dataclass
class SignInLimiter:
    """Per-address backoff after failed sign-ins: a few free tries, then 1, 2, 4 … s, at most 5 min."""

    failures: dict[str, tuple[int, float]] = field(default_factory=dict)
    """address → (failures in a row, earliest time of the next try)."""

    def wait(self, address: str, now: float) -> float:
        """Seconds ``address`` must still wait before it may try again (0: go ahead)."""
        entry = self.failures.get(address)
        return max(0.0, entry[1] - now) if entry else 0.0

    def failed(self, address: str, now: float) -> None:
        """Count a failed try."""
        count = self.failures.get(address, (0, now))[0] + 1
        delay = 0.0 if count <= _FREE_FAILURES else min(2.0 ** (count - _FREE_FAILURES - 1), _MAX_BACKOFF)
        self.failures[address] = (count, now + delay)
        if len(self.failures) > _LIMITER_SIZE:
            # Bounded memory under a spray of addresses: forget those whose backoff ended long ago.
            stale = [a for a, (_, until) in self.failures.items() if until < now - _MAX_BACKOFF]
            for a in stale:
                del self.failures[a]

    def succeeded(self, address: str) -> None:
        """Forget the failures of an address that signed in."""
        self.failures.pop(address, None)


@dataclass
class Guard:
    """Everything authentication needs at request time (one per app)."""

    signer: SessionSigner
    settings: Settings
    limiter: SignInLimiter = field(default_factory=SignInLimiter)
    revoked: dict[str, float] = field(default_factory=dict)
    """Signed-out session ids → their expiry; kept until then so a copied cookie stops working."""

    @property
    def secure_cookies(self) -> bool:
        """Cookies get ``Secure`` when the bridge is reached over https."""
        return self.settings.public_url.lower().startswith("https://")

    def session(self, request: web.Request) -> Session | None:
        """The request's valid, unrevoked session, if any."""
        session = self.signer.verify(request.cookies.get(COOKIE))
        if session is None or session.sid in self.revoked:
            return None
        return session

    def revoke(self, session: Session) -> None:
        """End a session on this instance (sign-out)."""
        now = self.signer.now()
        for sid in [s for s, until in self.revoked.items() if until < now]:
            del self.revoked[sid]
        self.revoked[session.sid] = session.expires

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
    """Who is making this admin request: the name typed at sign-in, ``api`` for the bearer token, or None."""
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
        if not guard.bearer_ok(request):
            return json_error(401, "unauthorized", "The bearer token is not BRIDGE_ADMIN_TOKEN.")
        return await handler(request)  # no cookie involved: a cross-site page cannot send this header
    session = guard.session(request)
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


def client_address(request: web.Request) -> str:
    """The peer address for the sign-in backoff (not X-Forwarded-For, which a client can forge)."""
    return request.remote or "unknown"

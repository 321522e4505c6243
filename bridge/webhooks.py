"""The HTTP side of the Twilio leg: TwiML answers, request signatures and one-time stream tokens.

The voice webhook answers with TwiML (:func:`connect_twiml`, :func:`reject_twiml`). Authentication of the
stream socket has two gates: Twilio's signature on the upgrade request (:func:`check_signature` over
:func:`websocket_signature_urls`) and a one-time token bound to the CallSid, which the webhook puts in a
``<Parameter>`` and the stream hands back in ``start.customParameters`` (:func:`make_stream_token`,
:func:`verify_stream_token`, :class:`TokenLedger`). The names of those parameters and the stream's own
events are :mod:`bridge.twilio`.

Core: no I/O, no clock. Times come in as ``now`` (seconds of the caller's clock).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import secrets
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

import pybase64
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from bridge.errors import AuthenticationFailed, LocalError

__all__ = [
    "MAX_PARAMETER_CHARS",
    "TokenLedger",
    "check_signature",
    "connect_twiml",
    "make_stream_token",
    "reject_twiml",
    "render_stream_token",
    "verify_stream_token",
    "websocket_signature_urls",
]

MAX_PARAMETER_CHARS: Final = 500
"""Twilio's limit on a <Parameter>'s name plus value (docs/protocols.md §1.1, secondary source)."""


# --- TwiML --------------------------------------------------------------------------------------------


def connect_twiml(
    stream_url: str,
    parameters: Mapping[str, str],
    *,
    status_callback: str | None = None,
    action: str | None = None,
    say_first: str | None = None,
) -> str:
    """``<Response><Connect><Stream url=…><Parameter …/>…</Stream></Connect></Response>``.

    ``stream_url`` must be an absolute ``ws(s)://`` URL without a query string (a query string can fail
    Twilio's handshake, error 31920); per-call values go in ``parameters``. When the bridge closes the
    stream socket, Twilio requests ``action`` (if given) for what to do next, else hangs up.
    ``say_first`` is spoken by Twilio before the stream connects (e.g. a recording notice).
    """
    parts = urlsplit(stream_url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise LocalError(f"stream URL {stream_url!r} is not an absolute ws:// or wss:// URL")
    if parts.query or parts.fragment or "?" in stream_url:
        raise LocalError(f"stream URL {stream_url!r} has a query string: pass values as parameters")
    for name, value in parameters.items():
        if len(name) + len(value) >= MAX_PARAMETER_CHARS:
            raise LocalError(f"TwiML parameter {name!r} is too long for Twilio ({MAX_PARAMETER_CHARS} chars)")
    response = VoiceResponse()
    if say_first:
        response.say(say_first)
    connect = response.connect() if action is None else response.connect(action=action, method="POST")
    if status_callback is None:
        stream = connect.stream(url=stream_url)
    else:
        stream = connect.stream(url=stream_url, status_callback=status_callback)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    return str(response)


def reject_twiml(message: str) -> str:
    """``<Response><Say>message</Say><Hangup/></Response>``: refuse a call politely (draining, full)."""
    response = VoiceResponse()
    if message:
        response.say(message)
    response.hangup()
    return str(response)


# --- signatures ---------------------------------------------------------------------------------------


def check_signature(auth_token: str, url: str, params: Mapping[str, str], signature: str | None) -> bool:
    """True if ``signature`` (the ``X-Twilio-Signature`` header) signs ``url`` and the POST ``params``.

    ``url`` is the public URL Twilio requested, built from configuration, never from ``Host`` or
    ``X-Forwarded-*``. A missing or empty signature, or an empty auth token, never passes.
    """
    if not signature or not auth_token:
        return False
    # Passed as is: a MultiDict (aiohttp's request.post()) keeps repeated fields, which Twilio signs too.
    return bool(RequestValidator(auth_token).validate(url, params, signature))


def websocket_signature_urls(stream_url: str) -> tuple[str, ...]:
    """The URL forms whose signature is accepted on the stream upgrade (docs/protocols.md §1.4).

    Twilio signs the ``wss://`` URL exactly as written in the TwiML; its ``https://`` twin is accepted
    too, since which form Twilio signs is not documented and the HMAC key is secret either way. Ports are
    handled by :func:`check_signature`, which tries each URL with and without one.
    """
    scheme, sep, rest = stream_url.partition("://")
    twin = {"wss": "https", "ws": "http", "https": "wss", "http": "ws"}.get(scheme.lower())
    if not sep or twin is None:
        return (stream_url,)
    return (stream_url, twin + "://" + rest)


# --- one-time stream tokens ---------------------------------------------------------------------------
# Format: "<expiry>.<nonce>.<mac>"; expiry in whole seconds of the clock the caller passes as `now`,
# nonce from secrets.token_urlsafe, mac = urlsafe-b64(HMAC-SHA256(secret, "<call_sid>.<expiry>.<nonce>"))
# without padding. The CallSid is not in the token: it is bound by the MAC.

_NONCE_BYTES: Final = 16
_MAC_CHARS: Final = 43  # 32 bytes of HMAC-SHA256, base64 without padding
_MAX_TOKEN_CHARS: Final = 256
_URLSAFE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _token_mac(secret: bytes, call_sid: str, expiry: str, nonce: str) -> str:
    digest = hmac.new(secret, f"{call_sid}.{expiry}.{nonce}".encode(), hashlib.sha256).digest()
    return pybase64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def make_stream_token(secret: bytes, call_sid: str, *, now: float, ttl: float) -> str:
    """A one-time token for the ``token`` parameter, bound to ``call_sid``, valid until ``now + ttl``."""
    if not secret:
        raise LocalError("the stream token secret is empty")
    if not ttl > 0:
        raise LocalError(f"stream token ttl must be positive, not {ttl!r}")
    return render_stream_token(secret, call_sid, secrets.token_urlsafe(_NONCE_BYTES), math.ceil(now + ttl))


def render_stream_token(secret: bytes, call_sid: str, nonce: str, expiry: float) -> str:
    """The token of ``nonce`` and ``expiry`` (whole seconds) for ``call_sid``: what
    :func:`make_stream_token` handed out, written again for a webhook Twilio retried."""
    if not secret:
        raise LocalError("the stream token secret is empty")
    whole = str(int(expiry))
    return f"{whole}.{nonce}.{_token_mac(secret, call_sid, whole, nonce)}"


def verify_stream_token(secret: bytes, call_sid: str, token: str, *, now: float) -> tuple[str, float]:
    """Check a token from ``start.customParameters``; return ``(nonce, expiry)`` for the ledger.

    Raises :class:`AuthenticationFailed` with ``"stream token malformed"``, ``"stream token is for
    another call (or was altered)"`` or ``"stream token expired"``. The MAC is checked before the expiry,
    so an altered expiry is reported as altered, not as expired. Pass the result to
    :meth:`TokenLedger.use` to make the token one-time.
    """
    if not secret:
        raise LocalError("the stream token secret is empty")
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS:
        raise AuthenticationFailed("stream token malformed")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthenticationFailed("stream token malformed")
    expiry, nonce, mac = parts
    if (
        not (expiry.isascii() and expiry.isdigit() and len(expiry) <= 15)
        or not nonce
        or not _URLSAFE.issuperset(nonce)
        or len(mac) != _MAC_CHARS
        or not _URLSAFE.issuperset(mac)
    ):
        raise AuthenticationFailed("stream token malformed")
    if not hmac.compare_digest(_token_mac(secret, call_sid, expiry, nonce), mac):
        raise AuthenticationFailed("stream token is for another call (or was altered)")
    expires_at = float(int(expiry))
    if now >= expires_at:
        raise AuthenticationFailed("stream token expired")
    return nonce, expires_at


class TokenLedger:
    """Remembers used nonces until they expire, so each token is accepted once.

    Per process: behind a load balancer a token could be replayed on another instance within its ttl,
    which the short ttl and the CallSid binding keep harmless.
    """

    __slots__ = ("_expiries", "_used")

    def __init__(self) -> None:
        self._used: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []  # a heap, for pruning in expiry order

    def __len__(self) -> int:
        return len(self._used)

    def use(self, nonce: str, expiry: float, *, now: float) -> bool:
        """Record ``nonce`` as used; False if it was used before or has already expired.

        Entries whose expiry has passed are pruned first; an expired nonce is refused rather than
        recorded, so pruning can never make a token usable again.
        """
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, old = heapq.heappop(heap)
            self._used.pop(old, None)
        if expiry <= now or nonce in self._used:
            return False
        self._used[nonce] = expiry
        heapq.heappush(heap, (expiry, nonce))
        return True

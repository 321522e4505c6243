"""HTTP and WebSocket routes: the Twilio webhook and stream, status callbacks, health and metrics.

Every Twilio request is authenticated: webhooks by ``X-Twilio-Signature`` over ``BRIDGE_PUBLIC_URL`` +
path + form fields (never over ``Host`` or ``X-Forwarded-*``); the stream's upgrade by its signature over
the ``ws(s)://`` URL written in the TwiML, and its ``start`` by a one-time token bound to the CallSid.
A stream that fails either check is closed with 1008 and the reason is logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from bridge import twilio as tw
from bridge.call import Call, CallRegistry
from bridge.clock import Clock
from bridge.config import STATUS_PATH, STREAM_PATH, VOICE_PATH, Settings
from bridge.errors import AuthenticationFailed, MalformedMessage
from bridge.greeting import Greetings
from bridge.metrics import Metrics
from bridge.prompts import Profile
from bridge.store import Store
from bridge.upstream import Upstream

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
"""How long a stream may take between the upgrade and its ``start`` event."""
WS_MAX_MESSAGE = 4 * 1024 * 1024
"""aiohttp would close the socket on a larger frame; ours are checked (and skipped) by ``twilio.py``."""
REFUSAL = "We're sorry, this line is busy right now. Please call again in a few minutes."
GOODBYE = "I'm sorry, I have to end our call now. Please call back in a moment. Goodbye!"


@dataclass
class StreamTokens:
    """The secret the one-time stream tokens are signed with, and the ledger of used ones."""

    secret: bytes
    ledger: tw.TokenLedger = field(default_factory=tw.TokenLedger)

    @classmethod
    def for_settings(cls, settings: Settings) -> StreamTokens:
        """Derived from the Twilio auth token, so every instance behind a balancer accepts them."""
        if settings.twilio_auth_token is None:
            return cls(secrets.token_bytes(32))
        key = settings.twilio_auth_token.reveal().encode()
        return cls(hmac.new(key, b"bridge stream token v1", hashlib.sha256).digest())


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
REGISTRY = web.AppKey("registry", CallRegistry)
UPSTREAM = web.AppKey("upstream", Upstream)
PROFILE = web.AppKey("profile", Profile)
TOKENS = web.AppKey("tokens", StreamTokens)
CLOCK = web.AppKey("clock", Clock)
STORE = web.AppKey("store", Store)
GREETINGS = web.AppKey("greetings", Greetings)


def _signature_ok(request: web.Request, url: str, params: Mapping[str, Any]) -> bool:
    token = request.app[SETTINGS].twilio_auth_token
    if token is None:
        return True  # BRIDGE_INSECURE_DEV on loopback, warned about at start-up
    return tw.check_signature(token.reveal(), url, params, request.headers.get("X-Twilio-Signature"))


def _twiml(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/xml")


async def voice(request: web.Request) -> web.Response:
    """``POST /twilio/voice``: answer with ``<Connect><Stream>`` and pre-warm the Realtime session."""
    app = request.app
    settings, metrics, registry = app[SETTINGS], app[METRICS], app[REGISTRY]
    post = await request.post()  # a MultiDict: repeated fields count in the signature
    form = {k: v for k, v in post.items() if isinstance(v, str)}
    url = settings.public_url + request.raw_path  # exactly as Twilio requested it, still percent-encoded
    if not _signature_ok(request, url, post):
        metrics.refused.inc(label="bad_signature")
        log.warning("refused %s: X-Twilio-Signature does not match %s", VOICE_PATH, url)
        raise web.HTTPForbidden(text="invalid Twilio signature\n")
    call_sid = form.get("CallSid", "")
    if not call_sid:
        raise web.HTTPBadRequest(text="CallSid is missing\n")
    if registry.draining:
        metrics.refused.inc(label="draining")
        log.info("call %s: refused politely, the bridge is shutting down", call_sid)
        return _twiml(tw.reject_twiml(REFUSAL))
    tokens = app[TOKENS]
    token = tw.make_stream_token(tokens.secret, call_sid, now=time.time(), ttl=settings.stream_token_ttl)
    parameters = {
        tw.PARAM_CALL_SID: call_sid,
        tw.PARAM_FROM: form.get("From", ""),
        tw.PARAM_TO: form.get("To", ""),
        tw.PARAM_TOKEN: token,
    }
    registry.prewarm(_new_call(app, call_sid, form.get("From", ""), form.get("To", "")))
    log.info("call %s: answering, stream %s", call_sid, settings.stream_url)
    return _twiml(
        tw.connect_twiml(settings.stream_url, parameters, status_callback=settings.public_url + STATUS_PATH)
    )


def _new_call(app: web.Application, call_sid: str, from_number: str = "", to_number: str = "") -> Call:
    settings, profile = app[SETTINGS], app[PROFILE]
    return Call(
        from_number=from_number,
        to_number=to_number,
        recordings_dir=settings.recordings_dir,
        recording_suffix=".jsonl.gz" if settings.recordings_gzip else ".jsonl",
        call_sid=call_sid,
        profile=profile,
        audio_path=profile.audio_path or settings.audio_path,
        upstream=app[UPSTREAM],
        metrics=app[METRICS],
        clock=app[CLOCK],
    )


async def _refuse(
    ws: web.WebSocketResponse, metrics: Metrics, reason: str, why: str
) -> web.WebSocketResponse:
    metrics.refused.inc(label=reason)
    log.warning("refused a media stream: %s", why)
    await ws.close(code=1008, message=why.encode()[:120])
    return ws


async def stream(request: web.Request) -> web.StreamResponse:
    """The media stream socket: check the upgrade's signature and the ``start`` token, then run the call."""
    app = request.app
    settings, metrics, registry = app[SETTINGS], app[METRICS], app[REGISTRY]
    ws = web.WebSocketResponse(max_msg_size=WS_MAX_MESSAGE, timeout=1.0, autoping=True)
    await ws.prepare(request)
    signature = request.headers.get("X-Twilio-Signature")
    if settings.twilio_auth_token is not None and not any(
        tw.check_signature(settings.twilio_auth_token.reveal(), url, {}, signature)
        for url in tw.websocket_signature_urls(settings.stream_url)
    ):
        why = "missing X-Twilio-Signature" if not signature else "X-Twilio-Signature does not match"
        return await _refuse(ws, metrics, "bad_signature", f"{why} {settings.stream_url}")

    before: list[tw.TwilioEvent] = []
    raw: list[tuple[float, str | bytes]] = []
    clock = app[CLOCK]
    start: tw.Start | None = None
    try:
        async with asyncio.timeout(START_TIMEOUT):
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                raw.append((clock.now(), msg.data))
                try:
                    event = tw.parse_message(msg.data)
                except MalformedMessage as exc:
                    metrics.malformed.inc(label="twilio")
                    log.warning("skipped a malformed message before start: %s", exc.reason)
                    continue
                before.append(event)
                if isinstance(event, tw.Start):
                    start = event
                    break
    except TimeoutError:
        return await _refuse(ws, metrics, "no_start", f"no start event within {START_TIMEOUT:.0f} s")
    if start is None:
        log.info("a media stream closed before its start event")
        return ws

    token = start.custom_parameters.get(tw.PARAM_TOKEN, "")
    tokens = app[TOKENS]
    now = time.time()
    try:
        nonce, expiry = tw.verify_stream_token(tokens.secret, start.call_sid, token, now=now)
    except AuthenticationFailed as exc:
        return await _refuse(ws, metrics, "bad_token", f"call {start.call_sid}: {exc}")
    if not tokens.ledger.use(nonce, expiry, now=now):
        return await _refuse(ws, metrics, "token_reused", f"call {start.call_sid}: stream token already used")

    call = registry.claim(start.call_sid)
    if call is None:
        # The webhook reached another instance (or the pre-warm expired): connect now (design.md §4).
        log.info("call %s: no pre-warmed session here; connecting now", start.call_sid)
        params = start.custom_parameters
        call = _new_call(app, start.call_sid, params.get(tw.PARAM_FROM, ""), params.get(tw.PARAM_TO, ""))
    registry.live.add(call)
    try:
        await call.run(ws, before, raw)
    finally:
        registry.live.discard(call)
    return ws


async def status(request: web.Request) -> web.Response:
    """``POST /twilio/status``: stream status callbacks, the only place Twilio reports handshake errors."""
    settings = request.app[SETTINGS]
    post = await request.post()
    form = {k: v for k, v in post.items() if isinstance(v, str)}
    if not _signature_ok(request, settings.public_url + request.raw_path, post):
        request.app[METRICS].refused.inc(label="bad_signature")
        raise web.HTTPForbidden(text="invalid Twilio signature\n")
    event = form.get("StreamEvent", "")
    level = logging.WARNING if event == "stream-error" else logging.INFO
    log.log(level, "call %s: %s %s", form.get("CallSid", "?"), event, form.get("StreamError", ""))
    return web.Response(status=204)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves requests."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Readiness: false while draining, so balancers stop sending new calls."""
    if request.app[REGISTRY].draining:
        return web.Response(status=503, text="draining\n")
    return web.Response(text="ready\n")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    return web.Response(text=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


def add_routes(app: web.Application) -> None:
    """Register every route of design.md §3."""
    app.router.add_post(VOICE_PATH, voice)
    app.router.add_get(STREAM_PATH, stream)
    app.router.add_post(STATUS_PATH, status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)

"""HTTP and WebSocket routes: the Twilio webhook and stream, status callbacks, health and metrics.

Every Twilio request is authenticated: webhooks by ``X-Twilio-Signature`` over ``BRIDGE_PUBLIC_URL`` +
path + form fields (never over ``Host`` or ``X-Forwarded-*``); the stream's upgrade by its signature over
the ``ws(s)://`` URL written in the TwiML, and its ``start`` by a one-time token bound to the CallSid.
A stream that fails either check is closed with 1008 and the reason is logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from bridge import twilio as tw
from bridge import webhooks
from bridge.call import Call, TranscriptListener
from bridge.config import AFTER_STREAM_PATH, STATUS_PATH, STREAM_PATH, VOICE_PATH
from bridge.errors import AuthenticationFailed, MalformedMessage
from bridge.keys import CLOCK, GREETINGS, METRICS, PROFILE, REGISTRY, SETTINGS, STORE, TOKENS, UPSTREAM
from bridge.metrics import Metrics
from bridge.states import EndReason, Timeouts
from bridge.store import Answer, ProfileVersion, StoreError

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
"""How long a stream may take between the upgrade and its ``start`` event."""
WS_MAX_MESSAGE = 64 * 1024
"""A Media Streams message is under 1 KiB (a ``start`` with parameters a few): aiohttp closes the socket
(1009) on a larger one, before it is held in memory."""
PRESTART_MESSAGES, PRESTART_BYTES = 20, 64 * 1024
"""What a stream may send before its ``start`` (Twilio sends ``connected``, then ``start``): beyond either,
it is refused (1008) instead of held."""
STORE_TIMEOUT = 2.0
"""How long the webhook and the stream wait for the store to record an answer or a stream claim before
deciding from this process's memory: Twilio waits 15 s for the webhook, and a caller for the greeting."""
REFUSAL = "We're sorry, this line is busy right now. Please call again in a few minutes."


def _signature_ok(request: web.Request, url: str, params: Mapping[str, Any]) -> bool:
    token = request.app[SETTINGS].twilio_auth_token
    if token is None:
        return True  # BRIDGE_INSECURE_DEV on loopback, warned about at start-up
    return webhooks.check_signature(token.reveal(), url, params, request.headers.get("X-Twilio-Signature"))


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
        return _twiml(webhooks.reject_twiml(REFUSAL))
    from_number, to_number = form.get("From", ""), form.get("To", "")
    full = registry.active >= settings.max_calls and not registry.answered(call_sid)
    if full or app[UPSTREAM].breaker.wait() > 0:
        # Full, or the Realtime service has been refusing connections: the fallback message at once, and
        # no Realtime session opened.
        version = await _profile_for(app, to_number)
        fallback = (version.profile if version is not None else app[PROFILE]).fallback_message
        metrics.refused.inc(label="full" if full else "model_unavailable")
        why = (
            f"{settings.max_calls} calls already (BRIDGE_MAX_CALLS)"
            if full
            else "the connect breaker is open"
        )
        log.warning("call %s: answered with the fallback message: %s", call_sid, why)
        return _twiml(webhooks.reject_twiml(fallback))
    tokens = app[TOKENS]
    now = app[CLOCK].wall()
    token = webhooks.make_stream_token(tokens.secret, call_sid, now=now, ttl=settings.stream_token_ttl)
    earlier = await _answer_once(app, call_sid, token, now)
    if earlier is not None:
        if earlier.streamed or earlier.token_expiry <= now:
            metrics.refused.inc(label="webhook_replayed")
            why = "its stream has run" if earlier.streamed else "its stream token has expired"
            log.warning("call %s: refused a repeated voice webhook: %s", call_sid, why)
            return _twiml(webhooks.reject_twiml(""))
        # Twilio retried (or someone replayed) the webhook before the stream came: the same answer, with
        # the same one-time token, and no second Realtime session.
        log.info("call %s: the voice webhook came again before its stream; the same answer", call_sid)
        token = webhooks.render_stream_token(
            tokens.secret, call_sid, earlier.token_nonce, earlier.token_expiry
        )
        version = await _profile_for(app, to_number)
        profile = version.profile if version is not None else app[PROFILE]
    else:
        call = await new_call(app, call_sid, from_number, to_number)
        registry.prewarm(call)
        profile = call.session.profile
    parameters = {
        tw.PARAM_CALL_SID: call_sid,
        tw.PARAM_FROM: from_number,
        tw.PARAM_TO: to_number,
        tw.PARAM_TOKEN: token,
    }
    log.info(
        "call %s: answering with profile %r, stream %s",
        call_sid,
        profile.name,
        settings.stream_url,
        extra={"event": "call_answered", "call_sid": call_sid, "profile": profile.name},
    )
    return _twiml(
        webhooks.connect_twiml(
            settings.stream_url,
            parameters,
            status_callback=settings.public_url + STATUS_PATH,
            action=settings.public_url + AFTER_STREAM_PATH,
            say_first=profile.consent_message if profile.record_calls else None,
        )
    )


async def _answer_once(app: web.Application, call_sid: str, token: str, now: float) -> Answer | None:
    """Record the answer to ``call_sid`` in the store (every instance sees it); the earlier answer when
    there was one. When the store fails or is slow (:data:`STORE_TIMEOUT`), this process's memory of its
    own answers decides, so a repeated webhook still opens nothing here (logged and counted)."""
    nonce, expiry = webhooks.verify_stream_token(app[TOKENS].secret, call_sid, token, now=now)
    try:
        async with asyncio.timeout(STORE_TIMEOUT):
            return await app[STORE].answer_call(call_sid, nonce, expiry)
    except (StoreError, TimeoutError) as exc:
        app[METRICS].store_errors.inc(label="call_answer")
        why = str(exc) or f"no answer within {STORE_TIMEOUT:g} s"
        log.error("call %s: the store could not record the answer (%s); answering from memory", call_sid, why)
    earlier = app[REGISTRY].answer_here(call_sid, nonce, expiry)
    if earlier is None:
        return None
    return Answer(call_sid, datetime.now(UTC), earlier[0], earlier[1], streamed=False)


async def _claim_stream(app: web.Application, call_sid: str) -> bool:
    """Whether this is ``call_sid``'s first stream on any instance (the store keeps the fact)."""
    try:
        async with asyncio.timeout(STORE_TIMEOUT):
            return await app[STORE].claim_stream(call_sid)
    except (StoreError, TimeoutError) as exc:  # the one-time token, checked in this process, still holds
        app[METRICS].store_errors.inc(label="stream_claim")
        why = str(exc) or f"no answer within {STORE_TIMEOUT:g} s"
        log.error("call %s: the store could not record its stream (%s); letting it in", call_sid, why)
        return True


async def after_stream(request: web.Request) -> web.Response:
    """``<Connect action>``: the stream has ended; speak the profile's fallback if the model failed."""
    app = request.app
    post = await request.post()
    if not _signature_ok(request, app[SETTINGS].public_url + request.raw_path, post):
        app[METRICS].refused.inc(label="bad_signature")
        raise web.HTTPForbidden(text="invalid Twilio signature\n")
    call_sid = str(post.get("CallSid", ""))
    outcome = await app[REGISTRY].outcome(call_sid)  # this instance's call, or another's from the store
    if outcome is not None and outcome.model_failed:
        log.info(
            "call %s: the model failed (%s); Twilio speaks the fallback message",
            call_sid,
            outcome.reason.value,
        )
        return _twiml(webhooks.reject_twiml(outcome.fallback_message or app[PROFILE].fallback_message))
    return _twiml(webhooks.reject_twiml(""))


async def _profile_for(app: web.Application, to_number: str) -> ProfileVersion | None:
    try:
        return await app[STORE].for_number(to_number)
    except StoreError as exc:  # a broken store must not stop calls: fall back to the configured profile
        log.error("profile store failed (%s); using the configured default profile", exc)
        return None


async def new_call(
    app: web.Application,
    call_sid: str,
    from_number: str = "",
    to_number: str = "",
    *,
    version: ProfileVersion | None = None,
    test_call: bool = False,
    on_transcript: TranscriptListener | None = None,
) -> Call:
    """A call with the profile version routed to ``to_number`` (or ``version``), ready to pre-warm."""
    settings = app[SETTINGS]
    if version is None:
        version = await _profile_for(app, to_number)
    profile = version.profile if version is not None else app[PROFILE]
    greeting: bytes | None = None
    if version is not None and version.has_greeting_audio:
        try:
            greeting = await app[STORE].greeting_audio(version.profile_id, version.version)
        except StoreError as exc:
            log.warning("call %s: pre-rendered greeting unavailable: %s", call_sid, exc)
    audio_path = profile.audio_path or settings.audio_path
    recordings = settings.recordings_dir
    if recordings is None and profile.record_calls:
        recordings = settings.data_dir / "recordings"
        recordings.mkdir(parents=True, exist_ok=True)
    registry = app[REGISTRY]
    return Call(
        call_sid=call_sid,
        profile=profile,
        audio_path=audio_path,
        upstream=app[UPSTREAM],
        metrics=app[METRICS],
        clock=app[CLOCK],
        timeouts=Timeouts(
            prewarm=settings.prewarm_timeout,
            rollover_margin=settings.rollover_margin,
            max_session=settings.max_session_seconds,
            model_idle=settings.model_idle_timeout,
        ),
        from_number=from_number,
        to_number=to_number,
        recordings_dir=recordings,
        recording_suffix=".jsonl.gz" if settings.recordings_gzip else ".jsonl",
        profile_id=version.profile_id if version is not None else None,
        profile_version=version.version if version is not None else None,
        greeting_audio=greeting,
        hold_audio=app[GREETINGS].hold_audio(profile, audio_path),
        test_call=test_call,
        on_transcript=on_transcript,
        on_end=registry.ended,
    )


async def _refuse(
    ws: web.WebSocketResponse, metrics: Metrics, reason: str, why: str
) -> web.WebSocketResponse:
    metrics.refused.inc(label=reason)
    log.warning("refused a media stream: %s", why, extra={"event": "stream_refused"})
    await ws.close(code=1008, message=why.encode()[:120])
    return ws


async def stream(request: web.Request) -> web.StreamResponse:
    """The media stream socket: check the upgrade's signature and the ``start`` token, then run the call."""
    app = request.app
    settings, metrics = app[SETTINGS], app[METRICS]
    ws = web.WebSocketResponse(max_msg_size=WS_MAX_MESSAGE, timeout=1.0, autoping=True)
    await ws.prepare(request)
    signature = request.headers.get("X-Twilio-Signature")
    if settings.twilio_auth_token is not None and not any(
        webhooks.check_signature(settings.twilio_auth_token.reveal(), url, {}, signature)
        for url in webhooks.websocket_signature_urls(settings.stream_url)
    ):
        why = "missing X-Twilio-Signature" if not signature else "X-Twilio-Signature does not match"
        return await _refuse(ws, metrics, "bad_signature", f"{why} {settings.stream_url}")
    await run_media_stream(app, ws, check_token=True)
    return ws


async def run_media_stream(
    app: web.Application,
    ws: web.WebSocketResponse,
    *,
    check_token: bool,
    version: ProfileVersion | None = None,
    test_call: bool = False,
    on_transcript: TranscriptListener | None = None,
    call_sid: str | None = None,
) -> None:
    """Serve a prepared Media Streams socket as a call: read up to ``start``, then run the call.

    The Twilio stream checks the one-time token (``check_token``) and claims its CallSid's one stream in
    the store; the admin page's test call is authorised by the signed-in session instead, runs
    ``version`` of a profile, and is given its ``call_sid`` by the server (the browser's is ignored).
    Both take the same path from here on, so staff hear exactly what a caller would.
    """
    metrics, registry = app[METRICS], app[REGISTRY]
    before: list[tw.TwilioEvent] = []
    raw: list[tuple[float, str | bytes]] = []
    malformed = 0
    clock = app[CLOCK]
    start: tw.Start | None = None
    held = 0
    try:
        async with asyncio.timeout(START_TIMEOUT):
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                held += len(msg.data)
                if len(raw) >= PRESTART_MESSAGES or held > PRESTART_BYTES:
                    why = f"more than {PRESTART_MESSAGES} messages or {PRESTART_BYTES} bytes before start"
                    await _refuse(ws, metrics, "no_start", why)
                    return
                raw.append((clock.now(), msg.data))
                try:
                    event = tw.parse_message(msg.data)
                except MalformedMessage as exc:
                    metrics.malformed.inc(label="twilio")
                    if not malformed:
                        log.warning("skipped a malformed message before start: %s (logged once)", exc.reason)
                    malformed += 1
                    continue
                before.append(event)
                if isinstance(event, tw.Start):
                    start = event
                    break
    except TimeoutError:
        await _refuse(ws, metrics, "no_start", f"no start event within {START_TIMEOUT:.0f} s")
        return
    if start is None:
        log.info("a media stream closed before its start event")
        return
    if call_sid is not None and start.call_sid != call_sid:
        start = dataclasses.replace(start, call_sid=call_sid)
        before = [start if isinstance(event, tw.Start) else event for event in before]

    if check_token:
        token = start.custom_parameters.get(tw.PARAM_TOKEN, "")
        tokens = app[TOKENS]
        now = clock.wall()
        try:
            nonce, expiry = webhooks.verify_stream_token(tokens.secret, start.call_sid, token, now=now)
        except AuthenticationFailed as exc:
            await _refuse(ws, metrics, "bad_token", f"call {start.call_sid}: {exc}")
            return
        if not tokens.ledger.use(nonce, expiry, now=now):
            await _refuse(ws, metrics, "token_reused", f"call {start.call_sid}: stream token already used")
            return

    call = None if test_call else registry.claim(start.call_sid)
    if check_token and not await _claim_stream(app, start.call_sid):
        if call is not None:  # a pre-warmed call of this CallSid cannot be its: it was answered again
            registry.abandon(call, EndReason.REPLACED)
        await _refuse(ws, metrics, "stream_reused", f"call {start.call_sid}: its stream has run already")
        return
    if call is None:
        # The webhook reached another instance (or the pre-warm expired), or a test call: connect now.
        if not test_call:
            log.info("call %s: no pre-warmed session here; connecting now", start.call_sid)
        params = start.custom_parameters
        call = await new_call(
            app,
            start.call_sid,
            params.get(tw.PARAM_FROM, ""),
            params.get(tw.PARAM_TO, ""),
            version=version,
            test_call=test_call,
            on_transcript=on_transcript,
        )
    registry.live.add(call)
    try:
        registry.started(call)
        await call.run(ws, before, raw)
    finally:
        registry.live.discard(call)


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
    registry = request.app[REGISTRY]
    if registry.draining:
        return web.Response(status=503, text="draining\n")
    if registry.active >= request.app[SETTINGS].max_calls:
        return web.Response(status=503, text="full\n")  # a load balancer sends calls elsewhere meanwhile
    return web.Response(text="ready\n")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition; behind ``Authorization: Bearer BRIDGE_METRICS_TOKEN`` when that is set."""
    token = request.app[SETTINGS].metrics_token
    if token is not None:
        given = request.headers.get("Authorization", "")
        expected = "Bearer " + token.reveal()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            request.app[METRICS].refused.inc(label="metrics_token")
            return web.Response(
                status=401, text="a bearer token is required\n", headers={"WWW-Authenticate": "Bearer"}
            )
    return web.Response(text=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


def add_routes(app: web.Application) -> None:
    """Register every route: the Twilio webhooks and stream, health, readiness and metrics."""
    app.router.add_post(VOICE_PATH, voice)
    app.router.add_get(STREAM_PATH, stream)
    app.router.add_post(STATUS_PATH, status)
    app.router.add_post(AFTER_STREAM_PATH, after_stream)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)

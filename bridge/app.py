"""The application factory: ``create_app(settings)`` and the shutdown that drains live calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

from aiohttp import web

from bridge.clock import Clock, MonotonicClock
from bridge.config import Settings
from bridge.greeting import Greetings
from bridge.keys import (
    BLOBS,
    CLOCK,
    GREETINGS,
    METRICS,
    PROFILE,
    REGISTRY,
    SETTINGS,
    STORE,
    TOKENS,
    UPSTREAM,
    StreamTokens,
)
from bridge.local_model import LocalModel
from bridge.metrics import Metrics
from bridge.prompts import DEFAULT_PROFILE, Profile, parse_profile, voices_for
from bridge.recordings.blob import BlobStorage
from bridge.registry import GOODBYE, CallRegistry
from bridge.store import Conflict, StoreError, open_store, redacted
from bridge.upstream import Target, Upstream
from bridge.web import add_routes

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOCAL_DEPLOYMENT = "local-model"
BEAT_SECONDS = 30.0
"""How often an instance notes in the store that it is alive."""
STALE_AFTER = 120.0
"""An instance silent this long has stopped: its calls in progress are marked interrupted."""
IDLE_TIMEOUT = 30.0
"""An HTTP connection whose request headers are not complete this long after it opened (or after its
last response) is closed: a slow client cannot hold a connection open for ever."""


def load_profile(settings: Settings) -> Profile:
    """The prompt profile of ``BRIDGE_PROFILE``, or the built-in default; raises ConfigError."""
    if settings.profile_path is None:
        if DEFAULT_PROFILE.voice not in voices_for(settings.dialect):  # pragma: no cover - a guard
            raise AssertionError("the default voice must exist in every dialect")
        return DEFAULT_PROFILE
    text = settings.profile_path.read_text(encoding="utf-8")
    return parse_profile(text, filename=str(settings.profile_path), dialect=settings.dialect)


def create_app(
    settings: Settings,
    *,
    profile: Profile | None = None,
    clock: Clock | None = None,
    render_greetings: bool = True,
) -> web.Application:
    """Build the app: routes, shared objects under typed keys, their lifetimes in ``cleanup_ctx``.

    What needs no I/O is made here. The rest is made at start-up by the cleanup contexts, in order, each
    from what the ones before it made, and closed in reverse: the Realtime target (the built-in local
    model is started first when no Azure deployment is set, so its port is known), the store, the
    greeting renderer, the call registry. No shared object is changed after it is made.
    """
    app = web.Application(middlewares=[body_deadline])
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[PROFILE] = profile if profile is not None else load_profile(settings)
    app[TOKENS] = StreamTokens.for_settings(settings)
    app[CLOCK] = clock or MonotonicClock()
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_blobs)
    app.cleanup_ctx.append(_greetings(render_greetings))
    app.cleanup_ctx.append(_calls)
    add_routes(app)
    from bridge import admin

    if settings.admin_token is not None:
        admin.setup(app)
    else:
        admin.closed(app)
    return app


@web.middleware
async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request body must arrive within :data:`IDLE_TIMEOUT` (408 otherwise): it is read here, before any
    handler (the webhooks read theirs before their signature can be checked). Multipart bodies, which
    nothing of the bridge takes, are left to their handler."""
    if request.body_exists and request.content_type != "multipart/form-data":
        try:
            async with asyncio.timeout(IDLE_TIMEOUT):
                await request.read()  # kept by aiohttp: post() and json() read it from memory
        except TimeoutError:
            request.app[METRICS].refused.inc(label="slow_body")
            log.warning(
                "%s %s: the request body did not arrive within %g s",
                request.method,
                request.path,
                IDLE_TIMEOUT,
            )
            raise web.HTTPRequestTimeout(text="the request body did not arrive in time\n") from None
    return await handler(request)


def make_runner(app: web.Application, *, shutdown_timeout: float) -> web.AppRunner:
    """The runner ``bridge serve`` (and :func:`bridge.testing.serve_bridge`) serves ``app`` with, with
    the header and idle timeout :data:`IDLE_TIMEOUT`."""
    return web.AppRunner(
        app, handle_signals=False, shutdown_timeout=shutdown_timeout, keepalive_timeout=IDLE_TIMEOUT
    )


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    """Where calls' Realtime sessions go: Azure, or the built-in local model started here."""
    settings = app[SETTINGS]
    model: LocalModel | None = None
    if settings.azure is not None:
        target = Target.from_azure(settings.azure)
    else:
        model = LocalModel(record=False, session_seconds=settings.local_model_session_seconds)
        await model.start()
        target = Target(model.endpoint, LOCAL_DEPLOYMENT, settings.dialect, None, "local")
        log.warning(
            "no AZURE_OPENAI_ENDPOINT: calls are answered by the built-in local model at %s (an echo test)",
            model.endpoint,
        )
    upstream = app[UPSTREAM] = Upstream(target, clock=app[CLOCK], metrics=app[METRICS])
    try:
        yield
    finally:
        await upstream.close()
        if model is not None:
            await model.close()


async def _store(app: web.Application) -> AsyncIterator[None]:
    """Open the store (created and migrated on first start)."""
    store = app[STORE] = await open_store(app[SETTINGS].database)
    try:
        yield
    finally:
        await store.close()


async def _blobs(app: web.Application) -> AsyncIterator[None]:
    """The Blob Storage container of ``BRIDGE_STORAGE_URL``, when it is set (call recordings)."""
    blobs = BlobStorage.from_settings(app[SETTINGS])
    if blobs is None:
        yield
        return
    app[BLOBS] = blobs
    try:
        yield
    finally:
        await blobs.close()


def _greetings(render: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        """The greeting renderer; seeds a fresh store with the first prompt profile, greeting rendered."""
        settings, store = app[SETTINGS], app[STORE]
        greetings = app[GREETINGS] = Greetings(app[UPSTREAM], store, settings.audio_path, render=render)
        try:
            if not await store.list_profiles():
                try:
                    first = await store.create(app[PROFILE], author="bridge", comment="first start")
                except Conflict:  # another instance or worker, starting at the same moment, seeded it
                    log.info("the first prompt profile was created by another instance starting too")
                else:
                    where = redacted(settings.database)
                    log.info("created the first prompt profile %r in %s", first.profile.name, where)
                    if render:
                        greetings.prepare(first)
            if render:  # "one moment, please" in each profile's voice, ready before a call needs it
                for summary in await store.list_profiles():
                    profile = summary.latest.profile
                    greetings.hold_audio(profile, profile.audio_path or settings.audio_path)
            yield
        finally:
            await greetings.close()

    return ctx


async def _calls(app: web.Application) -> AsyncIterator[None]:
    """The call registry; at start-up, records a crash left in progress are marked interrupted; while
    running, this instance beats in the store; at shutdown, calls still going are ended."""
    settings, store = app[SETTINGS], app[STORE]
    registry = app[REGISTRY] = CallRegistry(
        store, metrics=app[METRICS], instance=settings.instance_id, blobs=app.get(BLOBS)
    )
    await _sweep(app, restarted=True)
    beats = asyncio.get_running_loop().create_task(_beat(app))
    try:
        yield
    finally:
        beats.cancel()
        await asyncio.gather(beats, return_exceptions=True)
        await registry.drain(0.0, GOODBYE)


async def _sweep(app: web.Application, *, restarted: bool = False) -> None:
    """Mark interrupted the records in progress of instances that stopped beating and, at start-up
    (``restarted``), of this instance's last run; and beat. A failure is logged and counted; calls go on.

    At start-up the marking comes first (an interrupted call ends at its instance's last beat, which this
    beat would move), and there are no calls of this run yet; later the beat comes first, so that no
    other instance takes this one's live calls for a crash's."""
    if not restarted:
        await _heartbeat(app)
    settings, store, metrics = app[SETTINGS], app[STORE], app[METRICS]
    stale = datetime.now(UTC) - timedelta(seconds=STALE_AFTER)
    try:
        interrupted = await store.interrupt_calls(
            stale_before=stale, restarted=settings.instance_id if restarted else None
        )
    except StoreError as exc:  # tried again at the next beat
        metrics.store_errors.inc(label="interrupted_calls")
        log.error("could not look for call records a crash left in progress: %s", exc)
    else:
        if interrupted:
            log.warning("%d call records were left in progress by a crash: marked interrupted", interrupted)
    if restarted:
        await _heartbeat(app)


async def _heartbeat(app: web.Application) -> None:
    try:
        await app[STORE].heartbeat(app[SETTINGS].instance_id)
    except StoreError as exc:
        app[METRICS].store_errors.inc(label="heartbeat")
        log.error("the store missed this instance's heartbeat: %s", exc)


async def _beat(app: web.Application) -> None:
    """Every :data:`BEAT_SECONDS`: :func:`_sweep`."""
    while True:
        await asyncio.sleep(BEAT_SECONDS)
        await _sweep(app)


async def drain(app: web.Application, deadline: float | None = None) -> None:
    """Stop taking calls (``/readyz`` turns false), let live ones finish until the deadline, then end them."""
    settings = app[SETTINGS]
    await app[REGISTRY].drain(settings.drain_seconds if deadline is None else deadline, GOODBYE)

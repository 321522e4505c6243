"""The application factory: ``create_app(settings)`` and the shutdown that drains live calls."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, cast

from aiohttp import web

from bridge.clock import Clock, MonotonicClock
from bridge.config import Settings
from bridge.greeting import Greetings
from bridge.keys import (
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
from bridge.registry import GOODBYE, CallRegistry
from bridge.store import Store, open_store
from bridge.upstream import Target, Upstream
from bridge.web import add_routes

log = logging.getLogger(__name__)

LOCAL_DEPLOYMENT = "local-model"


def load_profile(settings: Settings) -> Profile:
    """The prompt profile of ``BRIDGE_PROFILE``, or the built-in default; raises ConfigError."""
    if settings.profile_path is None:
        if DEFAULT_PROFILE.voice not in voices_for(settings.dialect):  # pragma: no cover - a guard
            raise AssertionError("the default voice must exist in every dialect")
        return DEFAULT_PROFILE
    text = settings.profile_path.read_text(encoding="utf-8")
    return parse_profile(text, filename=str(settings.profile_path), dialect=settings.dialect)


class StoreSlot:
    """Stands in for the store from app creation until start-up has opened it (the app is frozen by then).

    Every attribute is the opened store's; before start-up there is none to use.
    """

    def __init__(self) -> None:
        self.inner: Store | None = None

    def __getattr__(self, name: str) -> Any:
        if self.inner is None:
            raise RuntimeError("the store is used before the app started")
        return getattr(self.inner, name)


def create_app(
    settings: Settings,
    *,
    profile: Profile | None = None,
    clock: Clock | None = None,
    render_greetings: bool = True,
) -> web.Application:
    """Build the app: routes, shared objects under typed keys, their lifetimes in ``cleanup_ctx``."""
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    slot = StoreSlot()
    store = cast(Store, slot)
    app[STORE] = store
    app[REGISTRY] = CallRegistry(settings.prewarm_timeout, store)
    app[PROFILE] = profile if profile is not None else load_profile(settings)
    app[TOKENS] = StreamTokens.for_settings(settings)
    app[CLOCK] = clock or MonotonicClock()
    if settings.azure is not None:
        app[UPSTREAM] = Upstream(Target.from_azure(settings.azure))
    else:
        # Filled in by _local_model once it listens: its port is known only then.
        app[UPSTREAM] = Upstream(
            Target("http://127.0.0.1:0", LOCAL_DEPLOYMENT, settings.dialect, None, "local")
        )
    app[GREETINGS] = Greetings(app[UPSTREAM], store, settings.audio_path)
    app.cleanup_ctx.append(_local_model)
    app.cleanup_ctx.append(_store(slot, render_greetings))
    app.cleanup_ctx.append(_calls)
    add_routes(app)
    from bridge import admin

    if settings.admin_token is not None:
        admin.setup(app)
    else:
        admin.closed(app)
    return app


def _store(slot: StoreSlot, render_greetings: bool) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        """Open the store (created and migrated on first start) and seed the first profile."""
        settings = app[SETTINGS]
        store = await open_store(settings.database)
        slot.inner = store
        try:
            if not await store.list_profiles():
                first = await store.create(app[PROFILE], author="bridge", comment="first start")
                log.info("created the first prompt profile %r in %s", first.profile.name, settings.database)
                if render_greetings:
                    app[GREETINGS].prepare(first)
            yield
        finally:
            await app[GREETINGS].close()
            await store.close()
            slot.inner = None

    return ctx


async def _local_model(app: web.Application) -> AsyncIterator[None]:
    """The built-in local model, when no Azure deployment is configured."""
    settings = app[SETTINGS]
    if settings.azure is not None:
        yield
        return
    model = LocalModel(record=False)
    await model.start()
    upstream = app[UPSTREAM]
    upstream.target = Target(model.endpoint, LOCAL_DEPLOYMENT, upstream.target.dialect, None, "local")
    log.warning(
        "no AZURE_OPENAI_ENDPOINT: calls are answered by the built-in local model at %s (an echo test)",
        model.endpoint,
    )
    try:
        yield
    finally:
        await model.close()


async def _calls(app: web.Application) -> AsyncIterator[None]:
    yield
    await drain(app, deadline=0.0)
    await app[UPSTREAM].close()


async def drain(app: web.Application, deadline: float | None = None) -> None:
    """Stop taking calls (``/readyz`` turns false), let live ones finish until the deadline, then end them."""
    settings = app[SETTINGS]
    await app[REGISTRY].drain(settings.drain_seconds if deadline is None else deadline, GOODBYE)

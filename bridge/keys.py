"""The app's shared objects, under typed ``AppKey``s (aiohttp's way to keep them off globals).

One small module, so that the app factory, the routes, the admin UI, the replay engine and the command
line reach the same objects without importing each other. Each object is made once, by
:func:`bridge.app.create_app` or one of its cleanup contexts, and is not reassigned afterwards.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from aiohttp import web

from bridge import webhooks
from bridge.clock import Clock
from bridge.config import Settings
from bridge.greeting import Greetings
from bridge.metrics import Metrics
from bridge.prompts import Profile
from bridge.recordings.blob import BlobStorage
from bridge.registry import CallRegistry
from bridge.store import Store
from bridge.upstream import Upstream


@dataclass
class StreamTokens:
    """The secret the one-time stream tokens are signed with, and the ledger of used ones."""

    secret: bytes
    ledger: webhooks.TokenLedger = field(default_factory=webhooks.TokenLedger)

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
BLOBS = web.AppKey("blobs", BlobStorage)
"""The Blob Storage container (``BRIDGE_STORAGE_URL``); absent when it is not set."""

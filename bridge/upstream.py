"""The Realtime connection: URL per dialect, authentication, connect with retry, and the connection object
a call holds.

A call talks to the model through one :class:`RealtimeConnection`: the socket and its dialect adapter
behind a small interface (``send`` a typed command, ``receive`` a typed event, ``close``), so that the
call can replace it in the middle of a call without anything else knowing. The fast send path leans on
websockets' internals; that lives in :class:`FastWriter` alone, and ``tests/test_upstream.py`` pins the
behaviour it relies on.

Authentication is by ``api-key`` header when a key is configured, otherwise by an Entra ID token from
``azure.identity.aio.DefaultAzureCredential`` (scope ``https://cognitiveservices.azure.com/.default``),
asked of the credential on every connect: the credential caches and refreshes tokens itself, we never
keep one (docs/protocols.md §4).

Connect policy, for the whole process (:class:`Upstream`): a 429, a 5xx or a network failure is retried
with exponential back-off and jitter (the first try at once) within a budget -- a few seconds for a new
call, what is left of :attr:`~bridge.states.Timeouts.reconnect` for a call's reconnection -- each
handshake bounded by what is left of it. A ``Retry-After`` holds every connect of the process until
then (or fails one whose budget it passes). 401/403/404 are fatal: reported at once with what to fix,
never retried. A :class:`Breaker` counts connects that failed (with all their retries) in a row, across
calls: after :data:`BREAKER_THRESHOLD` it opens, and new calls fail at once (the webhook answers with
the fallback message) instead of each spending handshakes on a service that refuses them. After a
cooldown one attempt is let through as the probe: its success closes the breaker, its failure doubles
the cooldown; a probe abandoned (its call ended) or not done within :data:`PROBE_TIMEOUT` lets the
next one through.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote, urlencode, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.protocol import State

from bridge.clock import Clock, MonotonicClock
from bridge.config import AzureSettings, Dialect
from bridge.errors import UpstreamRejected, UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.realtime import Adapter, ClientCommand, ServerEvent, adapter_for

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

log = logging.getLogger(__name__)
_WS_LOG = logging.getLogger("bridge.upstream.websockets")
_WS_LOG.setLevel(logging.WARNING)  # at DEBUG websockets logs handshake headers: the api-key among them

ENTRA_SCOPE = "https://cognitiveservices.azure.com/.default"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""The Realtime leg carries large audio deltas; websockets' 1 MiB default is too small (§5.10)."""
CONNECT_BUDGET = 4.0
"""Seconds a new call's connect may take with its retries (a reconnection has its own budget)."""
BACKOFF_BASE, BACKOFF_CAP = 0.25, 2.0
"""The n-th retry waits up to ``min(BACKOFF_CAP, BACKOFF_BASE * 2**n)`` s, jittered down to half of it."""
BREAKER_THRESHOLD = 5
"""Failed connects in a row (across calls) that open the breaker."""
BREAKER_COOLDOWN, BREAKER_MAX_COOLDOWN = 5.0, 60.0
PROBE_TIMEOUT = 30.0
"""A probe not finished in this long is taken as lost: the next attempt probes instead."""
SEND_HIGH_WATER = 64 * 1024
"""Above this many bytes waiting in the socket's buffer, sends wait for it to drain."""

Tap = Callable[[Literal["in", "out"], "str | bytes"], None]
"""Told every message that crosses a socket, as it crossed: the call's recording."""


def realtime_url(endpoint: str, deployment: str, dialect: Dialect, api_version: str | None) -> str:
    """The ``wss://`` (or loopback ``ws://``) URL of a deployment in one dialect (docs/protocols.md §2.1)."""
    parts = urlsplit(endpoint.rstrip("/"))
    base = ("wss" if parts.scheme.lower() == "https" else "ws") + "://" + parts.netloc
    if dialect is Dialect.GA:
        return f"{base}/openai/v1/realtime?model={quote(deployment, safe='')}"
    query = urlencode({"api-version": api_version or "", "deployment": deployment})
    return f"{base}/openai/realtime?{query}"


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect: Azure, or the built-in local model posing as it."""

    endpoint: str
    deployment: str
    dialect: Dialect
    api_version: str | None
    api_key: str | None = field(repr=False)

    @classmethod
    def from_azure(cls, azure: AzureSettings) -> Target:
        """The target of the configured Azure deployment."""
        key = azure.api_key.reveal() if azure.api_key else None
        return cls(azure.endpoint, azure.deployment, azure.dialect, azure.api_version, key)

    @property
    def url(self) -> str:
        """The URL dialled."""
        return realtime_url(self.endpoint, self.deployment, self.dialect, self.api_version)


class FastWriter:
    """Frames and writes a text message at once, without waiting, when websockets would not wait either.

    websockets' ``send`` costs a context manager and a drain per message; for 50 small appends a second
    per call that was a fifth of the bridge's CPU. When the connection is open, no fragmented send is in
    progress and the transport's buffer is below :data:`SEND_HIGH_WATER`, the frame is built by the
    sans-I/O protocol and written to the transport directly, which is what ``send`` would do. Otherwise
    the caller falls back to ``send`` (backpressure, closing). This is the one place that relies on
    websockets' internals: ``ClientConnection.protocol`` (``state``, ``send_text``, ``data_to_send``),
    ``send_in_progress`` and ``transport``.
    """

    __slots__ = ("_ws",)

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    def try_write(self, text: str) -> bool:
        """Write ``text`` as one frame now and return True, or return False when ``send`` must do it."""
        ws = self._ws
        protocol, transport = ws.protocol, ws.transport
        if (
            protocol.state is not State.OPEN
            or ws.send_in_progress is not None
            or transport.get_write_buffer_size() >= SEND_HIGH_WATER
        ):
            return False
        protocol.send_text(text.encode())
        for data in protocol.data_to_send():
            if data:
                transport.write(data)
        return True


class RealtimeConnection:
    """One open Realtime session: the socket, its dialect adapter, and the call's recording tap.

    ``receive`` and ``send`` raise websockets' ``ConnectionClosed`` when the socket is gone;
    ``receive`` raises :class:`~bridge.errors.MalformedMessage` for a message it cannot use (the caller
    skips it) and :class:`~bridge.errors.DialectMismatch` when the service speaks the other dialect.
    """

    def __init__(self, ws: ClientConnection, adapter: Adapter, *, tap: Tap | None = None) -> None:
        self.ws = ws
        self.adapter = adapter
        self.dialect = adapter.dialect
        self._tap = tap
        self._writer = FastWriter(ws)

    async def receive(self) -> ServerEvent:
        """The next server event (recorded as it arrived)."""
        message = await self.ws.recv()
        if self._tap is not None:
            self._tap("in", message)
        return self.adapter.parse(message)

    def write(self, command: ClientCommand) -> Awaitable[None] | None:
        """Send one client command (recorded as sent): written at once, returning ``None``, or, when the
        socket cannot take it now, returning what to await to send it. The hot path (50 appends a second
        per call) thus costs no coroutine."""
        wire = self.adapter.serialize(command)
        if self._tap is not None:
            self._tap("out", wire)
        return None if self._writer.try_write(wire) else self.ws.send(wire)

    async def send(self, command: ClientCommand) -> None:
        """Send one client command (recorded as sent)."""
        pending = self.write(command)
        if pending is not None:
            await pending

    @property
    def close_code(self) -> int | None:
        """The code the connection closed with, or ``None`` while open or when no close frame came."""
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        """The reason the connection closed with."""
        return self.ws.close_reason

    async def close(self) -> None:
        """Close the socket (a close frame, then the TCP connection)."""
        await self.ws.close()


class Breaker:
    """A circuit breaker on connects, for the whole process (see the module docstring)."""

    CLOSED, OPEN, PROBING = "closed", "open", "probing"

    def __init__(self, clock: Clock, metrics: Metrics | None = None) -> None:
        self.clock = clock
        self.metrics = metrics
        self.state = self.CLOSED
        self.failures = 0
        self.cooldown = BREAKER_COOLDOWN
        self.opened_at = 0.0
        self.probing_since = 0.0
        self.not_before = 0.0
        """No connect before this (the clock's time): the service's last ``Retry-After``."""

    def allow(self) -> bool:
        """Whether an attempt may be made now (after the cooldown, the first one is the probe)."""
        now = self.clock.now()
        if self.state == self.CLOSED:
            return True
        if self.state == self.PROBING and now < self.probing_since + PROBE_TIMEOUT:
            return False
        if self.state == self.OPEN and now < self.opened_at + self.cooldown:
            return False
        self.probing_since = now
        self._set(self.PROBING)
        log.info("realtime connects: the breaker lets one probe through")
        return True

    @property
    def is_open(self) -> bool:
        """Open (or probing): new calls are answered with the fallback message without a connect."""
        return self.state != self.CLOSED

    def wait(self) -> float:
        """Seconds until a probe may go (0 while connects are allowed)."""
        if self.state == self.CLOSED:
            return 0.0
        if self.state == self.PROBING:
            return max(0.0, self.probing_since + PROBE_TIMEOUT - self.clock.now())
        return max(0.0, self.opened_at + self.cooldown - self.clock.now())

    def abandoned(self) -> None:
        """The probe ended without an answer (its call ended, a bug): let the next attempt probe."""
        if self.state == self.PROBING:
            self.opened_at = self.clock.now() - self.cooldown
            self._set(self.OPEN)

    def hold(self, seconds: float) -> None:
        """The service asked every client to wait ``seconds`` (``Retry-After``)."""
        self.not_before = max(self.not_before, self.clock.now() + seconds)

    def succeeded(self) -> None:
        """A connect succeeded: the service is back."""
        if self.state != self.CLOSED:
            log.warning("realtime connects: the service answers again; the breaker is closed")
        self.failures, self.cooldown = 0, BREAKER_COOLDOWN
        self._set(self.CLOSED)

    def failed(self) -> None:
        """A connect failed, with all its retries (or the probe failed)."""
        self.failures += 1
        if self.state == self.PROBING:
            self.cooldown = min(self.cooldown * 2, BREAKER_MAX_COOLDOWN)
        elif self.state == self.OPEN or self.failures < BREAKER_THRESHOLD:
            return
        self.opened_at = self.clock.now()
        self._set(self.OPEN)
        log.error(
            "realtime connects: %d failed in a row; new calls get the fallback message for %.0f s",
            self.failures,
            self.cooldown,
        )

    def _set(self, state: str) -> None:
        self.state = state
        if self.metrics is not None:
            self.metrics.breaker.value = {self.CLOSED: 0.0, self.PROBING: 0.5, self.OPEN: 1.0}[state]


class Upstream:
    """Opens Realtime connections; one per app, shared by every call."""

    def __init__(
        self,
        target: Target,
        *,
        open_timeout: float = 10.0,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.target = target
        self.open_timeout = open_timeout
        self.clock = clock or MonotonicClock()
        self.breaker = Breaker(self.clock, metrics)
        self._credential: AsyncTokenCredential | None = None

    async def _headers(self) -> dict[str, str]:
        if self.target.api_key:
            return {"api-key": self.target.api_key}
        if self._credential is None:
            from azure.identity.aio import DefaultAzureCredential

            self._credential = DefaultAzureCredential()
        token = await self._credential.get_token(ENTRA_SCOPE)
        return {"Authorization": f"Bearer {token.token}"}

    async def connect(
        self,
        *,
        tap: Tap | None = None,
        budget: float | None = None,
        wait_for_breaker: bool = False,
        may_probe: bool = True,
    ) -> RealtimeConnection:
        """Open a connection, retrying what may pass within ``budget`` seconds (default
        :data:`CONNECT_BUDGET`); raise :class:`UpstreamRejected` (fatal) or :class:`UpstreamUnavailable`.
        While the breaker is open, or its probe is under way, this fails at once, unless
        ``wait_for_breaker`` (a live call's reconnection looks again every quarter second, within its
        budget). ``may_probe``: False for work no caller waits for (rendering a prompt), which must not
        take the probe from a call."""
        clock, breaker = self.clock, self.breaker
        until = clock.now() + (CONNECT_BUDGET if budget is None else budget)
        last: UpstreamUnavailable | None = None
        attempt = 0
        while True:
            now = clock.now()
            if breaker.not_before > now:  # the service's Retry-After holds every connect
                wait = breaker.not_before - now
            elif (may_probe or breaker.state == Breaker.CLOSED) and breaker.allow():
                probe = breaker.state == Breaker.PROBING
                try:
                    ws = await self._connect_once(max(0.1, min(self.open_timeout, until - now)))
                except UpstreamRejected:
                    breaker.failed()
                    raise
                except UpstreamUnavailable as exc:
                    last = exc
                    log.warning("realtime connect attempt %d failed: %s", attempt + 1, exc)
                    if probe:
                        breaker.failed()
                    if exc.retry_after:
                        breaker.hold(exc.retry_after)
                    wait = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt) * random.uniform(0.5, 1.0)
                    attempt += 1
                except BaseException:
                    if probe:
                        breaker.abandoned()
                    raise
                else:
                    breaker.succeeded()
                    return RealtimeConnection(ws, adapter_for(self.target.dialect), tap=tap)
            else:
                if not wait_for_breaker:
                    raise UpstreamUnavailable(
                        "the Realtime service has been refusing connections: new calls get the fallback "
                        f"message for {breaker.wait():.0f} s more (circuit breaker open)"
                    )
                wait = min(0.25, max(0.05, breaker.wait())) * random.uniform(1.0, 1.2)
            if clock.now() + wait > until:
                break
            await asyncio.sleep(wait)
        if last is None:
            last = UpstreamUnavailable("the Realtime service asked to wait longer than this connect may")
        if breaker.state == Breaker.CLOSED:
            breaker.failed()
        raise last

    async def _connect_once(self, open_timeout: float) -> ClientConnection:
        url = self.target.url
        try:
            headers = await self._headers()
        except Exception as exc:  # azure-identity raises many types; all mean "no token"
            raise UpstreamRejected(
                f"no Entra ID token for the Realtime deployment ({type(exc).__name__}: {exc}); "
                "set AZURE_OPENAI_API_KEY or sign in (az login / managed identity) with the role "
                "'Cognitive Services OpenAI User'"
            ) from exc
        try:
            return await connect(
                url,
                additional_headers=headers,
                max_size=MAX_MESSAGE_BYTES,
                open_timeout=open_timeout,
                ping_interval=20,
                ping_timeout=20,
                close_timeout=2,
                compression=None,
                logger=_WS_LOG,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise UpstreamRejected(
                    f"the Realtime service refused our credentials (HTTP {status}): check "
                    "AZURE_OPENAI_API_KEY, or the Entra role 'Cognitive Services OpenAI User'"
                ) from exc
            if status == 404:
                raise UpstreamRejected(
                    f"no Realtime deployment at {url.split('?')[0]} (HTTP 404): check AZURE_OPENAI_ENDPOINT "
                    "and AZURE_OPENAI_DEPLOYMENT"
                ) from exc
            if status in (408, 429) or status >= 500:
                raise UpstreamUnavailable(
                    f"the Realtime service answered HTTP {status}",
                    retry_after=_retry_after(exc.response.headers.get("Retry-After")),
                ) from exc
            raise UpstreamRejected(f"the Realtime service refused the connection (HTTP {status})") from exc
        except InvalidURI as exc:
            raise UpstreamRejected(
                f"bad Realtime URL {url.split('?')[0]}: check AZURE_OPENAI_ENDPOINT"
            ) from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise UpstreamUnavailable(
                f"cannot reach the Realtime service: {type(exc).__name__}: {exc}"
            ) from exc

    async def close(self) -> None:
        """Release the credential, if one was made."""
        if self._credential is not None:
            await self._credential.close()
            self._credential = None


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the HTTP-date form is not used by the service; it is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 3600 else None

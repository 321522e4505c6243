"""The local Realtime model's server (:mod:`bridge.local_model`): the listener, the handshake, the lifecycle.

:class:`LocalModel` listens on a loopback port, answers each WebSocket handshake as the service does and
hands every accepted socket to a :class:`~bridge.local_model.connection.ModelConnection`. It holds what
the connections share: the settings (pace, size of deltas, observers, the session cap), the seeded id
generator, the injected faults, and the tasks it must stop on :meth:`LocalModel.close` (responses and
each session's clock).

The handshake (``process_request``) picks the dialect from the URL: ``/openai/v1/realtime?model=DEP`` is
GA, ``/openai/realtime?api-version=V&deployment=DEP`` is preview. It checks auth (``api-key`` header,
``Authorization: Bearer``, or ``?api-key=``) and applies injected faults (:meth:`LocalModel.reject_next`,
:attr:`LocalModel.connect_delay`).

Faults after the handshake, for demos and tests of the bridge's rollover and reconnection: the session cap
(:attr:`LocalModel.session_seconds`, 30 minutes as on Azure, then a ``session_expired`` error and a close
with 1001), a network failure some time after each accept (:attr:`LocalModel.drop_after`), closes on demand
(:meth:`LocalModel.drop_all`, :meth:`ModelConnection.close`, :meth:`ModelConnection.abort`), and a refused
configuration (:meth:`LocalModel.fail_next_session_update`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from bridge.local_model.connection import ModelConnection
from bridge.local_model.validation import SESSION_SECONDS, InvalidEvent

__all__ = ["EventHook", "LocalModel"]

EventHook = Callable[[ModelConnection, dict[str, Any]], None]
"""An observer of the events of one connection: :attr:`LocalModel.on_client_event`, ``on_server_event``."""

_MAX_MESSAGE = 32 * 2**20  # 15 MiB of audio per append is 20 MiB of base64


class LocalModel:
    """The loopback Realtime model server (see the module docstring): ``async with LocalModel() as m``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        speed: float = 4.0,
        delta_ms: int = 100,
        seed: int = 0,
        record: bool = True,
        on_client_event: EventHook | None = None,
        on_server_event: EventHook | None = None,
        fast_appends: bool = False,
        session_seconds: float = SESSION_SECONDS,
        drop_after: float | None = None,
    ) -> None:
        if speed <= 0 or delta_ms <= 0:
            raise ValueError("speed and delta_ms must be positive")
        if not 0 < session_seconds < math.inf:
            raise ValueError("session_seconds must be positive (and finite)")
        if drop_after is not None and not 0 <= drop_after < math.inf:
            raise ValueError("drop_after must be None or a non-negative number of seconds")
        self.host = host
        self.api_key = api_key
        """``None``: any non-empty key or bearer token passes; else exactly this one must be given."""
        self.speed = speed
        """How much faster than real time audio deltas are sent (4.0: 1 s of audio every 250 ms)."""
        self.delta_ms = delta_ms
        """Audio per delta, in ms."""
        self.connect_delay = 0.0
        """Seconds to wait before answering a handshake."""
        self.response_delay = 0.05
        """Seconds from ``response.create`` (or the end of a turn) to the first delta."""
        self.record = record
        """Keep every connection and its events for inspection (tests). ``bridge serve`` passes ``False``
        so that a long-running server holds only its open connections, without their event logs."""
        self.on_client_event = on_client_event
        """Called with every client event (a parsed JSON object) as it is received, before it is handled:
        an observer for benchmarks (``scripts/bench``). It must be cheap and must not change the event."""
        self.on_server_event = on_server_event
        """Called with every server event just before it is written to the socket, with the same rules."""
        self.fast_appends = fast_appends
        """Handle ``input_audio_buffer.append`` on a shorter path, for load generators: the same checks and
        VAD, with frame energies summed exactly in integers (not float32) and fewer Python and numpy calls."""
        self.session_seconds = session_seconds
        """The session cap: each connection's ``expires_at`` is its connect time plus this, and when it is
        reached (timed from the accept) the session ends as on Azure (:meth:`ModelConnection.expire`).
        Read at each accept: a change applies to the connections accepted afterwards."""
        self.drop_after = drop_after
        """``None``, or seconds after which every connection accepted from now on is aborted (a TCP reset,
        no close frame, as a network failure would), for demos of reconnection. Read at each accept."""
        self.connections: list[ModelConnection] = []
        """Every accepted connection, in order (with ``record=False``: the open ones)."""
        self._port = port
        self._rng = random.Random(seed)
        self._count = 0
        self._rejects: list[tuple[int, str | None]] = []
        self._refusals: list[InvalidEvent] = []
        self._server: Server | None = None
        self._closing = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Condition()

    async def start(self) -> None:
        """Start listening; :attr:`port` and :attr:`endpoint` are valid afterwards."""
        if self._server is not None:
            raise RuntimeError("the local model is already started")
        self._server = await serve(
            self._handle,
            self.host,
            self._port,
            process_request=self._process_request,
            max_size=_MAX_MESSAGE,
            compression=None,
            close_timeout=2,
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Close every connection and the server; no task started here outlives this call."""
        self._closing.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        while self._tasks:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> LocalModel:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The TCP port listened on (the real one when 0 was asked for)."""
        return self._port

    @property
    def endpoint(self) -> str:
        """What ``AZURE_OPENAI_ENDPOINT`` is set to for this server: ``http://127.0.0.1:PORT``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    def reject_next(self, status: int = 429, count: int = 1, retry_after: str | None = None) -> None:
        """Answer the next ``count`` handshakes with HTTP ``status`` (429, 500, 503 …). ``retry_after`` is
        the ``Retry-After`` header's value; ``None``: ``"1"`` for a 429, no header for other statuses."""
        self._rejects.extend([(status, retry_after)] * count)

    def fail_next_session_update(
        self,
        code: str = "invalid_value",
        message: str = "The session configuration was refused: it could not be applied.",
    ) -> None:
        """Refuse the next ``session.update`` received, on any connection, as the service refuses a
        configuration: an ``error`` (``invalid_request_error``, this ``code`` and ``message``, the client's
        ``event_id``) and the session unchanged. Each call refuses one more update."""
        self._refusals.append(InvalidEvent(code, message))

    def take_session_update_refusal(self) -> InvalidEvent | None:
        """For :class:`ModelConnection`: the refusal queued by :meth:`fail_next_session_update` for the
        ``session.update`` just received (it is used up), or ``None``."""
        return self._refusals.pop(0) if self._refusals else None

    async def drop_all(self, code: int = 1011, reason: str = "server error") -> None:
        """Close every open connection with ``code`` and ``reason``."""
        await asyncio.gather(*(c.close(code, reason) for c in self.connections if not c.closed.is_set()))

    def wait_for_connection(self, n: int = 1, timeout: float = 5) -> Awaitable[ModelConnection]:
        """Wait until the ``n``-th connection (1-based) has been accepted, and return it (``record=True``)."""
        return self._wait_for_connection(n, timeout)

    async def _wait_for_connection(self, n: int, limit: float) -> ModelConnection:
        async with asyncio.timeout(limit), self._arrived:
            await self._arrived.wait_for(lambda: len(self.connections) >= n)
        return self.connections[n - 1]

    def new_id(self, prefix: str) -> str:
        """A new id for a session, item, response or event (``prefix_…``), unique on this server and the same
        from run to run for a given ``seed`` and sequence of events."""
        self._count += 1
        return f"{prefix}_{self._rng.getrandbits(64):016x}{self._count:x}"

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task that :meth:`close` cancels and waits for (a connection's responses)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """The handshake: injected faults, then the URL per dialect, then auth (docs/protocols.md §2.1)."""
        if self.connect_delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.connect_delay)
        if self._rejects:
            status, retry_after = self._rejects.pop(0)
            if status == 429:
                message = "Requests to the Realtime API have exceeded the rate limit."
            else:
                message = "The server had an error while processing your request."
            return _http_error(connection, status, message, retry_after)
        problem = _handshake_problem(request, self.api_key)
        return None if problem is None else _http_error(connection, *problem)

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        url = urlsplit(ws.request.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        ga = url.path.rstrip("/") == "/openai/v1/realtime"
        conn = ModelConnection(self, ws, "ga" if ga else "preview", query["model" if ga else "deployment"])
        async with self._arrived:
            self.connections.append(conn)
            self._arrived.notify_all()
        try:
            await conn.serve()
        finally:
            if not self.record:
                self.connections.remove(conn)


# --- the handshake -----------------------------------------------------------------------------------------


def _handshake_problem(request: Request, api_key: str | None) -> tuple[int, str] | None:
    """What is wrong with a handshake, as (HTTP status, message): the URL per dialect, then auth
    (docs/protocols.md §2.1). ``api_key`` ``None``: any non-empty key or bearer token passes."""
    url = urlsplit(request.path)
    query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
    path = url.path.rstrip("/")
    if path == "/openai/v1/realtime":
        if "api-version" in query:
            return (
                400,
                "api-version is not allowed on /openai/v1 (the GA protocol has no api-version): remove it.",
            )
        if not query.get("model"):
            return 400, "Missing required query parameter: model."
    elif path == "/openai/realtime":
        if not query.get("api-version") or not query.get("deployment"):
            return 400, "Missing required query parameters: api-version, deployment."
    else:
        return 404, "Resource not found."
    auth = request.headers.get("Authorization", "")
    bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    given = [k for k in (request.headers.get("api-key", ""), query.get("api-key", ""), bearer) if k]
    if not given or (api_key is not None and api_key not in given):
        return (
            401,
            "Access denied due to invalid subscription key or wrong API "
            "endpoint. Make sure to provide a valid key for an active subscription and use a "
            "correct regional API endpoint for your resource.",
        )
    return None


def _http_error(
    connection: ServerConnection, status: int, message: str, retry_after: str | None = None
) -> Response:
    """A refused handshake as the service answers it; ``Retry-After`` is ``retry_after``, else ``"1"`` on a
    429."""
    body = orjson.dumps({"error": {"code": str(status), "message": message}}).decode()
    response = connection.respond(status, body)
    response.headers["Content-Type"] = "application/json"
    if retry_after is None and status == 429:
        retry_after = "1"
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response

"""The local Realtime model: a loopback WebSocket server speaking both Azure OpenAI Realtime dialects.

It is the embedded default model of ``bridge serve`` (when no Azure settings are given) and the test double
of the suite and the benchmarks. It implements the wire protocol on its own (protocols.md §2), never through
``bridge.realtime``, so that a mistake in our adapter cannot be mirrored here and go unnoticed.

Theory of operation, per connection (:class:`ModelConnection`):

* The handshake (``process_request``) picks the dialect from the URL: ``/openai/v1/realtime?model=DEP`` is
  GA, ``/openai/realtime?api-version=V&deployment=DEP`` is preview. It checks auth (``api-key`` header,
  ``Authorization: Bearer``, or ``?api-key=``) and applies injected faults (:meth:`LocalModel.reject_next`,
  :attr:`LocalModel.connect_delay`).
* One reader handles client events in order. Every server event goes through :meth:`ModelConnection._send`,
  which stamps an ``event_id``, records the event in :attr:`ModelConnection.sent` and writes it.
* ``input_audio_buffer.append`` extends the input timeline (ms of all audio appended this session) and,
  with ``server_vad``/``semantic_vad``, feeds an energy VAD over 10 ms frames. ``threshold`` t maps
  linearly in dB to a frame RMS of ``-70 + 60·t`` dBFS: 0.5 is -40 dBFS, well under telephone speech
  (about -30 to -15 dBFS) and well over line silence and low noise (under -55 dBFS). ``semantic_vad`` is the
  same detector at threshold 0.5, its ``eagerness`` choosing the silence that ends a turn
  (:data:`EAGERNESS_SILENCE_MS`).
* A response runs as one task that paces audio deltas at ``speed``× real time. Barge-in and
  ``response.cancel`` set its stop reason and wait for it; the task always sends the end events itself, so
  no delta can follow ``response.done``. Content is an echo test: a greeting signal (C-E-G tones) while the
  caller has said nothing, else a 660 Hz beep followed by the caller's last utterance.
* Each assistant item counts the audio actually sent in its deltas; ``conversation.item.truncate`` is
  checked against that ("Audio content of Xms is already shorter than Yms").

The protocol's names, validation and JSON shapes are in :mod:`bridge.local_model.wire`; G.711, resampling,
tones and the input timeline in :mod:`bridge.local_model.audio`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pybase64
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bridge.local_model.audio import FRAME_MS, InputAudio, threshold_to_rms
from bridge.local_model.wire import (
    APPEND_FIELDS,
    BYTES_PER_MS,
    EAGERNESS_SILENCE_MS,
    EVENT_KEYS,
    MODELS,
    NAMES,
    RATE_LIMITS,
    RATES,
    ConversationItem,
    EffectiveSession,
    InvalidEvent,
    ModelResponse,
    choice,
    default_session,
    echo_content,
    field_integer,
    field_required,
    field_string,
    handshake_problem,
    http_error,
    item_json,
    new_item,
    obj,
    parse_event,
    response_json,
    response_overrides,
    update_ga,
    update_preview,
    usage_json,
    vad_params,
)

__all__ = ["EAGERNESS_SILENCE_MS", "LocalModel", "ModelConnection", "threshold_to_rms"]

EventHook = Callable[["ModelConnection", dict[str, Any]], None]
"""An observer of the events of one connection: :attr:`LocalModel.on_client_event`, ``on_server_event``."""

_MAX_MESSAGE = 32 * 2**20  # 15 MiB of audio per append is 20 MiB of base64
_MAX_APPEND = 15 * 2**20


class ModelConnection:
    """One accepted Realtime session. Public attributes are for tests to inspect; treat them as read-only."""

    def __init__(self, model: LocalModel, ws: ServerConnection, dialect: str, deployment: str) -> None:
        self._model = model
        self._ws = ws
        self.dialect = dialect
        """``"ga"`` or ``"preview"``, from the URL dialled."""
        self.deployment = deployment
        self.headers: dict[str, str] = (
            {k.lower(): v for k, v in ws.request.headers.raw_items()} if ws.request else {}
        )
        """Handshake headers, lower-case names."""
        self.received: list[dict[str, Any]] = []
        """Every client event received (parsed JSON objects), in order."""
        self.sent: list[dict[str, Any]] = []
        """Every server event sent, in order."""
        self.closed = asyncio.Event()
        self.session = default_session(dialect, model._new_id("sess"), MODELS[dialect])
        """The effective session config, in the dialect's shape (what ``session.updated`` carries)."""
        self._eff = EffectiveSession.of(self.session, dialect)
        self._names = NAMES[dialect]
        self._send_lock = asyncio.Lock()
        self._items: dict[str, ConversationItem] = {}
        self._order: list[str] = []
        self._response: ModelResponse | None = None
        self._audio_produced = False  # locks the voice
        self._input = InputAudio(RATES[self._eff.input_format])
        # The energy VAD.
        self._speaking = False
        self._speech_start_ms = 0
        self._silence_ms = 0
        self._user_item_id: str | None = None

    # --- for tests ---

    def received_types(self) -> list[str]:
        """The ``type`` of every client event received, in order."""
        return [str(e.get("type")) for e in self.received]

    def sent_types(self) -> list[str]:
        """The ``type`` of every server event sent, in order."""
        return [str(e.get("type")) for e in self.sent]

    @property
    def items(self) -> list[dict[str, Any]]:
        """The conversation, item objects in order (transcripts as truncation left them)."""
        return [item_json(self._items[i]) for i in self._order]

    def item_audio_ms(self, item_id: str) -> float:
        """How much audio an assistant item holds now: what was sent, less what truncation cut."""
        return self._items[item_id].audio_ms

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close this socket from the server side (1000: clean; 1011: a server error)."""
        await self._ws.close(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake, as a network failure would."""
        if self._ws.transport is not None:
            self._ws.transport.abort()

    async def send(self, event: dict[str, Any]) -> None:
        """Send any server event (an ``event_id`` is added when missing), to inject what tests need."""
        await self._send(dict(event))

    async def expire(self) -> None:
        """Do what Azure does at the session cap: a ``session_expired`` error, then a close."""
        message = "Your session hit the maximum duration of 30 minutes."
        await self._send_error(InvalidEvent("session_expired", message), None)
        await self.close(1001, "session expired")

    # --- plumbing ---

    async def _send(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", self._model._new_id("event"))
        async with self._send_lock:
            if self._model.record:
                self.sent.append(event)
            if self._model.on_server_event is not None:
                self._model.on_server_event(self, event)
            await self._ws.send(orjson.dumps(event).decode())

    async def _send_error(self, exc: InvalidEvent, client_event_id: str | None) -> None:
        error = {
            "type": "invalid_request_error",
            "code": exc.code,
            "message": exc.message,
            "param": exc.param,
            "event_id": client_event_id,
        }
        await self._send({"type": "error", "error": error})

    async def _run(self) -> None:
        await self._send({"type": "session.created", "session": self.session})
        async for message in self._ws:
            await self._dispatch(message)

    async def _dispatch(self, message: str | bytes) -> None:
        """Handle one client event; a malformed or unknown one gets an ``error`` and the session goes on."""
        event_id: str | None = None
        try:
            event = parse_event(message)
            if self._model.record:
                self.received.append(event)
            if self._model.on_client_event is not None:
                self._model.on_client_event(self, event)
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            if (
                self._model.fast_appends
                and event.get("type") == "input_audio_buffer.append"
                and event.keys() <= APPEND_FIELDS
            ):
                await self._on_input_audio_buffer_append(event)
                return
            kind = choice(field_required(event, "type"), tuple(EVENT_KEYS), "type")
            obj(event, "", ("type", "event_id", *EVENT_KEYS[kind]))
            handler: Callable[[dict[str, Any]], Awaitable[None]] = getattr(
                self, "_on_" + kind.replace(".", "_")
            )
            await handler(event)
        except InvalidEvent as exc:
            await self._send_error(exc, event_id)

    def _find(self, item_id: str) -> ConversationItem:
        item = self._items.get(item_id)
        if item is None:
            raise InvalidEvent(
                "item_not_found", f"Conversation item with id '{item_id}' not found.", "item_id"
            )
        return item

    async def _add_item(self, item: ConversationItem) -> None:
        """Add to the conversation: preview ``conversation.item.created``; GA ``.added`` (and ``.done``)."""
        previous = self._order[-1] if self._order else None
        self._items[item.id] = item
        self._order.append(item.id)
        body = {"previous_item_id": previous, "item": item_json(item)}
        if self.dialect == "preview":
            await self._send({"type": "conversation.item.created", **body})
            return
        await self._send({"type": "conversation.item.added", **body})
        if item.status != "in_progress":
            await self._send({"type": "conversation.item.done", **body})

    # --- session.update ---

    async def _on_session_update(self, event: dict[str, Any]) -> None:
        update = obj(field_required(event, "session"), "session")
        change = update_ga if self.dialect == "ga" else update_preview
        session = change(self.session, update, self._audio_produced)
        eff = EffectiveSession.of(session, self.dialect)
        if eff.input_format != self._eff.input_format:
            self._input.change_rate(RATES[eff.input_format])
        if eff.vad is None:
            self._speaking, self._silence_ms = False, 0
        self.session, self._eff = session, eff
        await self._send({"type": "session.updated", "session": session})

    # --- input audio and the VAD ---

    async def _on_input_audio_buffer_append(self, event: dict[str, Any]) -> None:
        try:
            data = pybase64.b64decode(field_string(field_required(event, "audio"), "audio"), validate=True)
        except ValueError:
            raise InvalidEvent(
                "invalid_value", "Invalid 'audio': expected base64-encoded audio.", "audio"
            ) from None
        if len(data) > _MAX_APPEND:
            raise InvalidEvent(
                "invalid_value", "Invalid 'audio': at most 15 MiB of audio per event.", "audio"
            )
        pcm, start = self._input.append(self._eff.input_format, data)
        if not len(pcm) or self._eff.vad is None:
            return
        # fast_appends: exact integer energies, one numpy reduction. Either way, a frame goes to _vad_frame
        # only when it can change something (speech, or while speaking).
        levels, first, size = self._input.vad_frames(pcm, start, exact=self._model.fast_appends)
        threshold = vad_params(self._eff.vad)[0]
        for i, level in enumerate(levels):
            if self._speaking or level >= threshold:
                await self._vad_frame(level, self._input.sample_ms(first + i * size))
        if not self._speaking:
            self._input.trim(vad_params(self._eff.vad)[1] + 2 * FRAME_MS)

    async def _vad_frame(self, level: float, frame_ms: float) -> None:
        threshold, padding, silence = vad_params(self._eff.vad)
        if level >= threshold:
            self._silence_ms = 0
            if self._speaking:
                return
            # input_audio_buffer.speech_started: audio_start_ms includes the prefix padding.
            self._speaking = True
            self._speech_start_ms = max(round(self._input.buf_start_ms), round(frame_ms) - padding, 0)
            self._user_item_id = self._model._new_id("item")
            await self._send(
                {
                    "type": "input_audio_buffer.speech_started",
                    "audio_start_ms": self._speech_start_ms,
                    "item_id": self._user_item_id,
                }
            )
            r = self._response
            if r is not None and self._eff.vad is not None and self._eff.vad["interrupt_response"]:
                await self._stop_response(r, "turn_detected")  # barge-in
        elif self._speaking:
            self._silence_ms += FRAME_MS
            if self._silence_ms < silence:
                return
            # input_audio_buffer.speech_stopped: audio_end_ms includes the silence that ended the turn.
            end_ms = round(frame_ms) + FRAME_MS
            item_id = self._user_item_id or self._model._new_id("item")
            self._speaking, self._silence_ms, self._user_item_id = False, 0, None
            await self._send(
                {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms, "item_id": item_id}
            )
            await self._commit(self._speech_start_ms, end_ms, item_id)
            if self._eff.vad is not None and self._eff.vad["create_response"] and self._response is None:
                await self._start_response({})

    async def _commit(self, start_ms: float, end_ms: float, item_id: str) -> None:
        pcm, rate = self._input.take(start_ms, end_ms), self._input.rate
        previous = self._order[-1] if self._order else None
        await self._send(
            {"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id}
        )
        for older in self._items.values():
            older.pcm = None  # only the latest utterance is echoed; a long call must not hoard audio
        part: dict[str, Any] = {"type": "input_audio", "transcript": None}
        seconds = len(pcm) / rate
        await self._add_item(
            ConversationItem(item_id, "user", content=[part], pcm=pcm, rate=rate, seconds=seconds)
        )
        if self._eff.transcribe:  # there is no ASR: a deterministic stand-in
            part["transcript"] = text = f"(caller speech, {len(pcm) / rate:.1f} s)"
            await self._send(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item_id,
                    "content_index": 0,
                    "transcript": text,
                    "usage": {"type": "duration", "seconds": round(len(pcm) / rate, 3)},
                }
            )

    async def _on_input_audio_buffer_commit(self, event: dict[str, Any]) -> None:
        have = self._input.buf_len * 1000 / self._input.rate
        if have < 100:
            raise InvalidEvent(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too "
                f"small. Expected at least 100ms of audio, but buffer only has {have:.2f}ms of audio.",
            )
        item_id = self._user_item_id if self._speaking and self._user_item_id else self._model._new_id("item")
        self._speaking, self._silence_ms, self._user_item_id = False, 0, None
        await self._commit(self._input.buf_start_ms, self._input.now_ms(), item_id)

    async def _on_input_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        self._input.take(self._input.now_ms(), self._input.now_ms())
        self._speaking, self._silence_ms, self._user_item_id = False, 0, None
        await self._send({"type": "input_audio_buffer.cleared"})

    # --- conversation items ---

    async def _on_conversation_item_create(self, event: dict[str, Any]) -> None:
        item = new_item(event, self._names, self._items, lambda: self._model._new_id("item"))
        await self._add_item(item)

    async def _on_conversation_item_truncate(self, event: dict[str, Any]) -> None:
        """``conversation.item.truncate`` (protocols.md §2.5): cut an assistant item's audio and text."""
        item_id = field_string(field_required(event, "item_id"), "item_id")
        index = field_integer(field_required(event, "content_index"), "content_index")
        end_ms = field_integer(field_required(event, "audio_end_ms"), "audio_end_ms")
        item = self._find(item_id)
        if item.role != "assistant" or item.kind != "message":
            raise InvalidEvent("invalid_value", "Only assistant messages can be truncated.", "item_id")
        if index != 0 or not item.content:
            raise InvalidEvent(
                "invalid_value", f"Item '{item_id}' has no content part {index}.", "content_index"
            )
        if end_ms > item.audio_ms:
            raise InvalidEvent(
                "invalid_value",
                f"Audio content of {int(item.audio_ms)}ms is already shorter than {end_ms}ms",
                "audio_end_ms",
            )
        del item.audio[end_ms * BYTES_PER_MS[item.audio_format] :]
        item.transcript = ""  # the service forgets the words, heard or not
        await self._send(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": index,
                "audio_end_ms": end_ms,
            }
        )

    async def _on_conversation_item_delete(self, event: dict[str, Any]) -> None:
        item = self._find(field_string(field_required(event, "item_id"), "item_id"))
        del self._items[item.id]
        self._order.remove(item.id)
        await self._send({"type": "conversation.item.deleted", "item_id": item.id})

    async def _on_conversation_item_retrieve(self, event: dict[str, Any]) -> None:
        item = self._find(field_string(field_required(event, "item_id"), "item_id"))
        await self._send({"type": "conversation.item.retrieved", "item": item_json(item)})

    # --- responses ---

    async def _on_response_create(self, event: dict[str, Any]) -> None:
        if self._response is not None:
            raise InvalidEvent(
                "conversation_already_has_active_response",
                "Conversation already has an active "
                f"response in progress: {self._response.id}. Wait until the response is finished "
                "before creating a new one.",
            )
        await self._start_response(obj(event.get("response", {}), "response"))

    async def _start_response(self, body: dict[str, Any]) -> None:
        """Send the opening events of a response, then leave the deltas and the end to :meth:`_stream`."""
        fmt, text_only, in_conversation = response_overrides(body, self.dialect, self._eff)
        last = next((self._items[i] for i in reversed(self._order) if self._items[i].role == "user"), None)
        audio, text = echo_content(fmt, last)
        part: dict[str, Any] = (
            {"type": self._names["text part"], "text": ""}
            if text_only
            else {"type": self._names["audio part"], "transcript": ""}
        )
        item = ConversationItem(
            self._model._new_id("item"), "assistant", status="in_progress", content=[part], audio_format=fmt
        )
        r = ModelResponse(
            self._model._new_id("resp"), item, text_only, b"" if text_only else audio, text, in_conversation
        )
        self._response = r
        await self._send(
            {
                "type": "response.created",
                "response": response_json(
                    r, "in_progress", None, self.dialect, self._eff.voice, self.session
                ),
            }
        )
        await self._send({"type": "rate_limits.updated", "rate_limits": [dict(x) for x in RATE_LIMITS]})
        await self._send(
            {
                "type": "response.output_item.added",
                "response_id": r.id,
                "output_index": 0,
                "item": item_json(item),
            }
        )
        if in_conversation:
            await self._add_item(item)
        await self._send(
            {
                "type": "response.content_part.added",
                "response_id": r.id,
                "item_id": item.id,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "text", "text": ""} if text_only else {"type": "audio", "transcript": ""},
            }
        )
        r.task = self._model._spawn(self._stream(r), f"local-model {r.id}")

    async def _stream(self, r: ModelResponse) -> None:
        """Pace the deltas at ``speed``× real time, then send the end events whatever stopped the response."""
        model, item = self._model, r.item
        ids = {"response_id": r.id, "item_id": item.id, "output_index": 0, "content_index": 0}
        text_delta = self._names["text.delta" if r.text_only else "transcript.delta"]
        step = model.delta_ms * BYTES_PER_MS[item.audio_format]
        chunks = [r.audio[i : i + step] for i in range(0, len(r.audio), step)] or [b""]
        words = re.findall(r"\S+\s*", r.text)
        loop = asyncio.get_running_loop()
        start = loop.time() + model.response_delay
        words_sent = 0
        try:
            for n, chunk in enumerate(chunks):
                delay = start + n * model.delta_ms / 1000 / model.speed - loop.time()
                if delay > 0 and not r.stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(r.stop.wait(), delay)
                if r.stop_reason is not None:
                    break
                if chunk:
                    delta = pybase64.b64encode(chunk).decode()
                    await self._send({"type": self._names["audio.delta"], **ids, "delta": delta})
                    item.audio += chunk
                    self._audio_produced = True
                upto = math.ceil((n + 1) * len(words) / len(chunks))  # transcript keeps pace with the audio
                if upto > words_sent:
                    delta = "".join(words[words_sent:upto])
                    words_sent = upto
                    item.transcript += delta
                    await self._send({"type": text_delta, **ids, "delta": delta})
            await self._finish(r, ids)
        except ConnectionClosed:
            pass
        finally:
            if self._response is r:
                self._response = None

    async def _finish(self, r: ModelResponse, ids: dict[str, Any]) -> None:
        item = r.item
        cancelled = r.stop_reason is not None
        item.status = "incomplete" if cancelled else "completed"
        part = dict(item.content[0])
        if r.text_only:
            item.content[0] = part = part | {"text": item.transcript}
            await self._send({"type": self._names["text.done"], **ids, "text": item.transcript})
        else:
            part["transcript"] = item.transcript
            await self._send({"type": self._names["audio.done"], **ids})
            await self._send({"type": self._names["transcript.done"], **ids, "transcript": item.transcript})
        # The part events say "audio"/"text" in both dialects; only GA items say "output_audio"/"output_text".
        part = part | {"type": "text" if r.text_only else "audio"}
        await self._send({"type": "response.content_part.done", **ids, "part": part})
        body = item_json(item)
        await self._send(
            {"type": "response.output_item.done", "response_id": r.id, "output_index": 0, "item": body}
        )
        if self.dialect == "ga" and item.id in self._order:
            at = self._order.index(item.id)
            previous = self._order[at - 1] if at else None
            await self._send({"type": "conversation.item.done", "previous_item_id": previous, "item": body})
        details = {"type": "cancelled", "reason": r.stop_reason} if cancelled else None
        status = "cancelled" if cancelled else "completed"
        done = response_json(r, status, details, self.dialect, self._eff.voice, self.session)
        done["output"] = [body]
        done["usage"] = usage_json(item, self._items.values(), self.session["instructions"])
        await self._send({"type": "response.done", "response": done})

    async def _stop_response(self, r: ModelResponse, reason: str) -> None:
        """Stop a response (``turn_detected`` or ``client_cancelled``) and wait until its end is sent."""
        if r.stop_reason is None:
            r.stop_reason = reason
            r.stop.set()
        if r.task is not None:
            await asyncio.shield(r.task)

    async def _on_response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        if wanted is not None:
            field_string(wanted, "response_id")
        r = self._response
        if r is None or r.stop_reason is not None or wanted not in (None, r.id):
            raise InvalidEvent("response_cancel_not_active", "Cancellation failed: no active response found.")
        await self._stop_response(r, "client_cancelled")

    def _abandon(self) -> None:
        """The socket is gone: stop the response without its end events."""
        if self._response is not None and self._response.task is not None:
            self._response.task.cancel()


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
    ) -> None:
        if speed <= 0 or delta_ms <= 0:
            raise ValueError("speed and delta_ms must be positive")
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
        self.connections: list[ModelConnection] = []
        """Every accepted connection, in order (with ``record=False``: the open ones)."""
        self._port = port
        self._rng = random.Random(seed)
        self._count = 0
        self._rejects: list[int] = []
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

    def reject_next(self, status: int = 429, count: int = 1) -> None:
        """Answer the next ``count`` handshakes with HTTP ``status`` (429, 500, 503 …)."""
        self._rejects.extend([status] * count)

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

    def _new_id(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._rng.getrandbits(64):016x}{self._count:x}"

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """The handshake: injected faults, then the URL per dialect, then auth (protocols.md §2.1)."""
        if self.connect_delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.connect_delay)
        if self._rejects:
            status = self._rejects.pop(0)
            if status == 429:
                return http_error(
                    connection, 429, "Requests to the Realtime API have exceeded the rate limit."
                )
            return http_error(connection, status, "The server had an error while processing your request.")
        problem = handshake_problem(request, self.api_key)
        return None if problem is None else http_error(connection, *problem)

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
            await conn._run()
        except ConnectionClosed:
            pass
        finally:
            conn._abandon()
            conn.closed.set()
            if not self.record:
                self.connections.remove(conn)

"""One session of the local Realtime model (:mod:`bridge.local_model`): the per-connection protocol handler.

:class:`ModelConnection` reads the client events of one accepted WebSocket in order and answers them as
the service does. It owns the session's state and its timing; the checks, the dialect's names and the
JSON shapes come from :mod:`.validation`, :mod:`.names` and :mod:`.items`, the audio from :mod:`.audio`.

Theory of operation:

* One reader handles client events in order. Every server event goes through :meth:`ModelConnection._send`,
  which stamps an ``event_id``, records the event in :attr:`ModelConnection.sent` and writes it.
* ``input_audio_buffer.append`` extends the input timeline (ms of all audio appended this session) and,
  with ``server_vad``/``semantic_vad``, feeds an energy VAD over 10 ms frames (its scale:
  :func:`~bridge.local_model.audio.threshold_to_rms`). ``semantic_vad`` is the same detector at threshold
  0.5, its ``eagerness`` choosing the silence that ends a turn
  (:data:`~bridge.local_model.validation.EAGERNESS_SILENCE_MS`).
* A response runs as one task that paces audio deltas at ``speed``× real time. Barge-in and
  ``response.cancel`` set its stop reason and wait for it; the task always sends the end events itself, so
  no delta can follow ``response.done``. Content is an echo test: a greeting signal (C-E-G tones) while the
  caller has said nothing, else a 660 Hz beep followed by the caller's last utterance.
* Each assistant item counts the audio actually sent in its deltas; ``conversation.item.truncate`` is
  checked against that ("Audio content of Xms is already shorter than Yms").
* Each session has a clock, a task started when the socket is accepted and cancelled when it ends. At
  :attr:`~bridge.local_model.server.LocalModel.session_seconds` (the ``expires_at`` of the session) it ends
  the session as Azure does (:meth:`ModelConnection.expire`): from then on client events are ignored and
  nothing is sent but a ``session_expired`` error; a response in progress is abandoned without its end
  events; then the socket closes with 1001. With :attr:`~bridge.local_model.server.LocalModel.drop_after`
  set at the accept, the clock instead aborts the TCP connection at that time, if it comes first.
* A refusal queued by :meth:`~bridge.local_model.server.LocalModel.fail_next_session_update` answers the
  next ``session.update`` (on any connection) with an ``error`` before any check, and nothing is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
import pybase64
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from bridge.local_model.audio import FRAME_MS, InputAudio
from bridge.local_model.items import (
    RATE_LIMITS,
    ConversationItem,
    ModelResponse,
    item_json,
    new_item,
    new_response,
    response_json,
    truncate_item,
    usage_json,
)
from bridge.local_model.names import (
    APPEND_FIELDS,
    BYTES_PER_MS,
    CLIENT_EVENT_FIELDS,
    DIALECT_NAMES,
    MODELS,
    RATES,
)
from bridge.local_model.validation import (
    EffectiveSession,
    InvalidEvent,
    choice_field,
    default_session,
    integer_field,
    object_field,
    parse_event,
    required_field,
    response_overrides,
    session_expired,
    string_field,
    update_ga,
    update_preview,
    vad_params,
)

if TYPE_CHECKING:
    from bridge.local_model.server import LocalModel

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
        self._accepted = asyncio.get_running_loop().time()
        self._cap, self._drop_after = model.session_seconds, model.drop_after
        self._clock: asyncio.Task[None] | None = None
        self._ending = False  # expire() has begun: client events are ignored, only its error goes out
        self.session = default_session(dialect, model.new_id("sess"), MODELS[dialect], self._cap)
        """The effective session config, in the dialect's shape (what ``session.updated`` carries)."""
        self._eff = EffectiveSession.of(self.session, dialect)
        self._names = DIALECT_NAMES[dialect]
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

    async def serve(self) -> None:
        """Serve this session until its socket is gone; :class:`LocalModel` calls this once per connection."""
        self._clock = self._model.spawn(self._run_clock(), f"local-model {self.session['id']} clock")
        try:
            await self._send({"type": "session.created", "session": self.session})
            async for message in self._ws:
                await self._dispatch(message)
        except ConnectionClosed:
            pass
        finally:
            self._clock.cancel()  # if it is in expire(), harmless: the socket is already gone
            self._abandon()
            self.closed.set()

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
        """Send any server event (an ``event_id`` is added when missing), to inject what tests need. Once
        :meth:`expire` has begun, nothing more is sent."""
        await self._send(dict(event))

    async def expire(self) -> None:
        """End the session now as Azure does at its cap (what the session's clock does at
        ``session_seconds``): a response in progress is abandoned without its end events, client events are
        ignored, then a ``session_expired`` error is the last event sent and the socket closes with 1001
        ("session expired"). Once begun, a second call does nothing."""
        if self._ending:
            return
        self._ending = True
        r = self._response
        if r is not None and r.task is not None:
            r.task.cancel()
            await asyncio.wait([r.task])
        with contextlib.suppress(ConnectionClosed):
            await self._send(_error_event(session_expired(self._cap), None), last=True)
        await self.close(1001, "session expired")

    # --- plumbing ---

    async def _run_clock(self) -> None:
        """The session's clock, from the accept: abort at ``drop_after`` or expire at the cap, which first."""
        loop = asyncio.get_running_loop()
        drop = self._drop_after
        if drop is not None and drop < self._cap:
            await asyncio.sleep(self._accepted + drop - loop.time())
            self.abort()
        else:
            await asyncio.sleep(self._accepted + self._cap - loop.time())
            await self.expire()

    async def _send(self, event: dict[str, Any], last: bool = False) -> None:
        """Stamp, record and write a server event; once :meth:`expire` has begun, only its ``last`` one."""
        event.setdefault("event_id", self._model.new_id("event"))
        async with self._send_lock:
            if self._ending and not last:
                return
            if self._model.record:
                self.sent.append(event)
            if self._model.on_server_event is not None:
                self._model.on_server_event(self, event)
            await self._ws.send(orjson.dumps(event).decode())

    async def _dispatch(self, message: str | bytes) -> None:
        """Handle one client event; a malformed or unknown one gets an ``error`` and the session goes on."""
        if self._ending:
            return
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
            kind = choice_field(required_field(event, "type"), tuple(CLIENT_EVENT_FIELDS), "type")
            object_field(event, "", ("type", "event_id", *CLIENT_EVENT_FIELDS[kind]))
            handler: Callable[[dict[str, Any]], Awaitable[None]] = getattr(
                self, "_on_" + kind.replace(".", "_")
            )
            await handler(event)
        except InvalidEvent as exc:
            await self._send(_error_event(exc, event_id))

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
        refusal = self._model.take_session_update_refusal()
        if refusal is not None:
            raise refusal
        update = object_field(required_field(event, "session"), "session")
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
            data = pybase64.b64decode(string_field(required_field(event, "audio"), "audio"), validate=True)
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
            self._user_item_id = self._model.new_id("item")
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
            item_id = self._user_item_id or self._model.new_id("item")
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
        item_id = self._user_item_id if self._speaking and self._user_item_id else self._model.new_id("item")
        self._speaking, self._silence_ms, self._user_item_id = False, 0, None
        await self._commit(self._input.buf_start_ms, self._input.now_ms(), item_id)

    async def _on_input_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        self._input.take(self._input.now_ms(), self._input.now_ms())
        self._speaking, self._silence_ms, self._user_item_id = False, 0, None
        await self._send({"type": "input_audio_buffer.cleared"})

    # --- conversation items ---

    async def _on_conversation_item_create(self, event: dict[str, Any]) -> None:
        item = new_item(event, self._names, self._items, lambda: self._model.new_id("item"))
        await self._add_item(item)

    async def _on_conversation_item_truncate(self, event: dict[str, Any]) -> None:
        """``conversation.item.truncate`` (docs/protocols.md §2.5): cut an assistant item's audio and text."""
        item_id = string_field(required_field(event, "item_id"), "item_id")
        index = integer_field(required_field(event, "content_index"), "content_index")
        end_ms = integer_field(required_field(event, "audio_end_ms"), "audio_end_ms")
        truncate_item(self._find(item_id), index, end_ms)
        await self._send(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": index,
                "audio_end_ms": end_ms,
            }
        )

    async def _on_conversation_item_delete(self, event: dict[str, Any]) -> None:
        item = self._find(string_field(required_field(event, "item_id"), "item_id"))
        del self._items[item.id]
        self._order.remove(item.id)
        await self._send({"type": "conversation.item.deleted", "item_id": item.id})

    async def _on_conversation_item_retrieve(self, event: dict[str, Any]) -> None:
        item = self._find(string_field(required_field(event, "item_id"), "item_id"))
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
        await self._start_response(object_field(event.get("response", {}), "response"))

    async def _start_response(self, body: dict[str, Any]) -> None:
        """Send the opening events of a response, then leave the deltas and the end to :meth:`_stream`."""
        fmt, text_only, in_conversation = response_overrides(body, self.dialect, self._eff)
        last = next((self._items[i] for i in reversed(self._order) if self._items[i].role == "user"), None)
        item_id = self._model.new_id("item")  # before the response's: a seed's ids must not change
        r = new_response(
            self._model.new_id("resp"), item_id, fmt, text_only, in_conversation, self._names, last
        )
        item = r.item
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
        r.task = self._model.spawn(self._stream(r), f"local-model {r.id}")

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
            task = r.task
            await asyncio.wait([task])  # not cancelled with this waiter, nor raising if expire() cancels it
            if not task.cancelled():
                task.result()

    async def _on_response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        if wanted is not None:
            string_field(wanted, "response_id")
        r = self._response
        if r is None or r.stop_reason is not None or wanted not in (None, r.id):
            raise InvalidEvent("response_cancel_not_active", "Cancellation failed: no active response found.")
        await self._stop_response(r, "client_cancelled")

    def _abandon(self) -> None:
        """The socket is gone: stop the response without its end events."""
        if self._response is not None and self._response.task is not None:
            self._response.task.cancel()


def _error_event(exc: InvalidEvent, client_event_id: str | None) -> dict[str, Any]:
    """The ``error`` server event for ``exc``, answering the client event ``client_event_id``."""
    error = {
        "type": "invalid_request_error",
        "code": exc.code,
        "message": exc.message,
        "param": exc.param,
        "event_id": client_event_id,
    }
    return {"type": "error", "error": error}

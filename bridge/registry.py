"""The calls of one process: pre-warmed calls waiting for their stream, live calls, recent outcomes, the
drain at shutdown, and each call's record for the call log (:func:`call_record`): written when the call
starts (in progress) and completed when it ends, each write retried before it is logged and counted."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.call import Call
from bridge.metrics import Metrics
from bridge.recordings.blob import BlobStorage, upload_recording
from bridge.states import EndReason
from bridge.store import CallRecord, CallStatus, Conflict, ModelSession, NotFound, Store, StoreError

log = logging.getLogger(__name__)

GOODBYE = "I'm sorry, I have to end our call now. Please call back in a moment. Goodbye!"
"""Said to live calls still going when the drain's deadline passes."""
GOODBYE_TIMEOUT = 10.0
"""At shutdown, how long the goodbye may take before calls are ended regardless."""
OUTCOME_WAIT = 8.0
"""How long ``<Connect action>`` waits for a call of another instance to complete its record (which may
wait for the recording's upload, :data:`UPLOAD_BUDGET`); Twilio waits 15 s for the answer."""
ENDING_BUDGET = 12.0
"""At shutdown, how long the records (and recordings) of calls that ended meanwhile may still take."""
UPLOAD_BUDGET = 6.0
"""At a call's end, how long the recording's upload (with its retries) may hold the final record back;
beyond it the local file is kept, logged and counted, and the record points at it."""
STORE_RETRIES = (0.1, 0.5, 1.5)
"""Pauses between the tries of a call record write that failed (a busy or briefly unreachable store)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended, kept briefly for Twilio's ``<Connect action>`` request."""

    reason: EndReason
    fallback_message: str

    @property
    def model_failed(self) -> bool:
        """The model failed the call: Twilio speaks the profile's fallback message."""
        return self.reason.model_failed


class CallRegistry:
    """Pre-warmed calls waiting for their stream, live calls, and recent outcomes; one per app.

    A pre-warmed call ends itself when no stream claims it in time (its session's pre-warm timeout); the
    registry then forgets it and closes its Realtime session.
    """

    OUTCOMES_KEPT = 1000

    def __init__(
        self,
        store: Store | None = None,
        *,
        metrics: Metrics | None = None,
        instance: str = "",
        blobs: BlobStorage | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        """``BRIDGE_STORAGE_URL``: where a call's recording is uploaded when the call ends."""
        self.metrics = metrics
        self.instance = instance
        """``BRIDGE_INSTANCE_ID``: written on each call record, so a crash's records can be found."""
        self.outcomes: OrderedDict[str, Outcome] = OrderedDict()
        self.draining = False
        self.live: set[Call] = set()
        self._answers: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._starting: dict[Call, asyncio.Task[None]] = {}
        self._ending: set[asyncio.Task[Any]] = set()
        """The tasks completing a call's record (and uploading its recording) right now."""
        self._prewarmed: dict[str, tuple[Call, asyncio.Task[None]]] = {}
        self._cleanup: set[asyncio.Task[None]] = set()

    async def outcome(self, call_sid: str) -> Outcome | None:
        """How ``call_sid`` ended, for ``<Connect action>``: from this process's memory, else from the
        call's record in the store (the call may have run on another instance; its record may still be
        completing, for up to :data:`OUTCOME_WAIT`). ``None`` when it is not known."""
        known = self.outcomes.get(call_sid)
        if known is not None or self.store is None:
            return known
        loop = asyncio.get_running_loop()
        until = loop.time() + OUTCOME_WAIT
        try:
            record = await self.store.call(call_sid)
            while record.status is CallStatus.IN_PROGRESS and loop.time() < until:
                await asyncio.sleep(0.05)  # another process completes it: nothing here to wait on
                known = self.outcomes.get(call_sid)  # (or this one, which has just learnt it)
                if known is not None:
                    return known
                record = await self.store.call(call_sid)
            if record.status is CallStatus.IN_PROGRESS:
                return None
            reason = next((r for r in EndReason if _ended_with(record.end_reason, r)), None)
            if reason is None:
                return None
            fallback = ""
            if reason.model_failed and record.profile_id is not None and record.profile_version is not None:
                fallback = (
                    await self.store.get(record.profile_id, record.profile_version)
                ).profile.fallback_message
        except NotFound:
            return None
        except StoreError as exc:
            log.error("call %s: how it ended cannot be read from the store: %s", call_sid, exc)
            return None
        return Outcome(reason, fallback)

    def answer_here(self, call_sid: str, nonce: str, expiry: float) -> tuple[str, float] | None:
        """When the store cannot say: note this process's answer to ``call_sid`` (its token's nonce and
        expiry), or return the earlier one."""
        earlier = self._answers.get(call_sid)
        if earlier is not None:
            return earlier
        self._answers[call_sid] = (nonce, expiry)
        while len(self._answers) > self.OUTCOMES_KEPT:
            self._answers.popitem(last=False)
        return None

    def started(self, call: Call) -> None:
        """A call's stream has started: write its record, in progress, so that a crash leaves a trace.

        In a task of its own: the call never waits on the store; :meth:`ended` waits for it."""
        if self.store is not None:
            record = call_record(call, CallStatus.IN_PROGRESS, self.instance)
            task = asyncio.get_running_loop().create_task(
                self._write(self.store.start_call, record, "started")
            )
            self._starting[call] = task

    async def ended(self, call: Call) -> None:
        """A call has ended: remember how (for ``<Connect action>``), upload its recording (when
        ``BRIDGE_STORAGE_URL`` is set) and complete its record. A drain waits for this."""
        task = asyncio.current_task()
        if task is not None:
            self._ending.add(task)
        try:
            await self._ended(call)
        finally:
            if task is not None:
                self._ending.discard(task)

    async def _ended(self, call: Call) -> None:
        reason = call.end_reason or EndReason.SHUTDOWN
        self.outcomes[call.call_sid] = Outcome(reason, call.session.profile.fallback_message)
        while len(self.outcomes) > self.OUTCOMES_KEPT:
            self.outcomes.popitem(last=False)
        starting = self._starting.pop(call, None)
        if starting is not None:
            await starting  # the final record goes over the first one
        uploaded = None
        if self.blobs is not None and call.recording_path is not None:
            try:
                async with asyncio.timeout(UPLOAD_BUDGET):
                    uploaded = await upload_recording(self.blobs, call.recording_path, self.metrics)
            except TimeoutError:
                if self.metrics is not None:
                    self.metrics.store_errors.inc(label="recording_upload")
                log.error(
                    "call %s: the recording was not uploaded within %.0f s; it stays at %s",
                    call.call_sid,
                    UPLOAD_BUDGET,
                    call.recording_path,
                )
        if self.store is not None and (call.session.start is not None or starting is not None):
            # Also a call that ended before its session took in the stream's start: its first record
            # gets its last.
            record = call_record(call, CallStatus.COMPLETED, self.instance)
            if uploaded is not None:  # the blob's URL; a failed upload leaves the local path
                record = replace(record, recording_path=uploaded)
            await self._write(self.store.add_call, record, "ended")

    async def _write(
        self, write: Callable[[CallRecord], Awaitable[None]], record: CallRecord, when: str
    ) -> None:
        """``write`` the record, retried on a store error; at last logged (what it held) and counted."""
        for attempt, pause in enumerate((*STORE_RETRIES, None), start=1):
            try:
                await write(record)
                return
            except Conflict as exc:  # another call's record: retrying cannot help, and it must stay
                problem = str(exc)
                break
            except StoreError as exc:
                problem = str(exc)
                if pause is None:
                    break
                log.warning("call %s: writing its record failed (try %d): %s", record.call_sid, attempt, exc)
                await asyncio.sleep(pause)
        if self.metrics is not None:
            self.metrics.store_errors.inc(label="call_record")
        log.error(
            "call %s: its record (%s) was not stored: %s; it held: from %s to %s, started %s, %s, %s",
            record.call_sid,
            when,
            problem,
            record.from_number or "?",
            record.to_number or "?",
            record.started_at.isoformat(timespec="seconds"),
            record.status.value,
            record.end_reason or "no end yet",
        )

    @property
    def active(self) -> int:
        """Calls answered and not over: pre-warmed (waiting for their stream) and live."""
        return len(self.live) + len(self._prewarmed)

    def answered(self, call_sid: str) -> bool:
        """Whether ``call_sid`` was answered and waits for its stream (a webhook Twilio retried)."""
        return call_sid in self._prewarmed

    def prewarm(self, call: Call) -> None:
        """Start ``call``'s Realtime connection and keep it for its stream, until its pre-warm ends."""
        old = self._prewarmed.pop(call.call_sid, None)
        if old is not None:  # only when a webhook's answer was forgotten (web.voice answers each once)
            old[1].cancel()
            self._track(old[0].abandon(EndReason.REPLACED))
        call.open_model()
        watcher = asyncio.get_running_loop().create_task(self._unclaimed(call))
        self._track(watcher)
        self._prewarmed[call.call_sid] = (call, watcher)

    async def _unclaimed(self, call: Call) -> None:
        """Close a pre-warmed call that ended (no stream in time, or its model failed) before a claim."""
        await call.finished.wait()
        entry = self._prewarmed.get(call.call_sid)
        if entry is None or entry[0] is not call:
            return
        del self._prewarmed[call.call_sid]
        if call.end_reason is EndReason.NO_STREAM:
            log.info("call %s: no stream in time; closing its Realtime session", call.call_sid)
        await call.teardown()

    def claim(self, call_sid: str) -> Call | None:
        """The pre-warmed call for ``call_sid``, now owned by its stream; ``None`` if there is none."""
        entry = self._prewarmed.pop(call_sid, None)
        if entry is None:
            return None
        call, watcher = entry
        watcher.cancel()
        if call.finished.is_set():
            # Its Realtime session failed or closed while waiting: better to connect afresh now.
            self._track(call.abandon(EndReason.PREWARM_FAILED))
            return None
        return call

    def abandon(self, call: Call, reason: EndReason) -> None:
        """End a claimed call that will not run (its stream was refused), closing its Realtime session."""
        self._track(call.abandon(reason))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    async def drain(self, deadline: float, goodbye: str) -> None:
        """Shutdown: refuse new calls, let live ones (and answered ones still to connect) finish until
        ``deadline`` s, then have the model say ``goodbye`` and end them."""
        self.draining = True
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline
        if self.live or self._prewarmed:
            log.info("draining: up to %.0f s for %d live calls", deadline, len(self.live))
        while (self.live or self._prewarmed) and loop.time() < until:  # noqa: ASYNC110 - polling two sets
            await asyncio.sleep(0.05)
        for call, watcher in self._prewarmed.values():
            watcher.cancel()
            self._track(call.abandon(EndReason.SHUTDOWN))
        self._prewarmed.clear()
        remaining = [c for c in self.live if not c.finished.is_set()]
        if remaining:
            try:
                async with asyncio.timeout(GOODBYE_TIMEOUT):
                    said = await asyncio.gather(
                        *(c.goodbye(goodbye) for c in remaining), return_exceptions=True
                    )
                    for call, result in zip(remaining, said, strict=True):
                        if isinstance(result, Exception):
                            log.error("call %s: the goodbye failed", call.call_sid, exc_info=result)
                    await asyncio.gather(*(c.finished.wait() for c in remaining))
            except TimeoutError:
                log.info("draining: %d calls did not finish their goodbye in time", len(remaining))
        results = await asyncio.gather(*(c.teardown() for c in list(self.live)), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("draining: ending a call failed", exc_info=result)
        # A call already tearing down when the drain came is still writing its record (and uploading its
        # recording): the process must not stop under it.
        ending = [task for task in self._ending if task is not asyncio.current_task()]
        if ending:
            _, late = await asyncio.wait(ending, timeout=ENDING_BUDGET)
            if late:
                log.error(
                    "draining: %d calls' records were still being written after %.0f s",
                    len(late),
                    ENDING_BUDGET,
                )
        if self._cleanup:
            results = await asyncio.gather(*self._cleanup, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    log.error("draining: closing a call failed", exc_info=result)


def _ended_with(end_reason: str, reason: EndReason) -> bool:
    """Whether a call record's ``end_reason`` (``describe_end``: the reason, then a detail) is ``reason``."""
    return end_reason == reason.value or end_reason.startswith(reason.value + ": ")


def call_record(call: Call, status: CallStatus = CallStatus.COMPLETED, instance: str = "") -> CallRecord:
    """What happened on ``call`` so far, for the call log."""
    stats = call.session.stats
    turns = sorted(stats.turn_latencies_ms)
    latency: dict[str, float] = {}
    if turns:
        latency = {
            "turn_p50": round(turns[len(turns) // 2], 1),
            "turn_max": round(turns[-1], 1),
            "turns": float(len(turns)),
        }
    return CallRecord(
        call_sid=call.call_sid,
        started_at=call.started_wall,
        ended_at=datetime.fromtimestamp(call.clock.wall(), UTC),
        from_number=call.from_number,
        to_number=call.to_number,
        profile_id=call.profile_id,
        profile_version=call.profile_version,
        end_reason=call.session.describe_end(),
        transcript=tuple(stats.transcript),
        barge_ins=stats.barge_ins,
        truncations=tuple(stats.truncations),
        latency_ms=latency,
        upstream_errors=stats.upstream_errors,
        recording_path=str(call.recording_path) if call.recording_path else None,
        test_call=call.test_call,
        sessions=_sessions(call),
        status=status,
        instance=instance,
    )


def _sessions(call: Call) -> tuple[ModelSession, ...]:
    """The call's Realtime sessions, with wall-clock times, for the call record."""

    def wall(t: float) -> datetime:
        return call.started_wall + timedelta(seconds=t - call.started_at)

    now = call.clock.now()
    return tuple(
        ModelSession(
            number=info.number,
            started_at=wall(info.opened_at),
            ended_at=wall(info.ended_at if info.ended_at is not None else now),
            began=info.began,
            ended=info.ended or "the call ended",
            session_id=info.session_id,
        )
        for info in call.session.legs.values()
    )

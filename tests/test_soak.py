"""The short soak (``scripts/soak`` is the long one, docs/soak.md): after a burst of calls has ended, the
process is back where it was -- the same open file descriptors, the same asyncio tasks, and (almost) no
memory kept.

The bridge and the local model run in this process on real loopback sockets, as in tests/test_e2e.py, so
``/proc/self/fd`` and ``asyncio.all_tasks()`` see the sockets and tasks of all three sides (the caller
doubles, the bridge, the model). A first burst of calls warms everything up that is made once and kept
(the store's files, the TwiML parser's name cache, caches of URLs ...); after it has ended, the baseline is
taken and memory tracing starts; a second, identical burst follows; after it has ended, descriptors and
tasks must be exactly at the baseline again, and memory still allocated since the baseline must stay under
:data:`MEMORY_BOUND`.

"Ended" is waited for, never slept for: every call's caller has hung up and closed, the bridge's registry
holds no call, the model no connection, and descriptors and tasks have come back -- polled every 20 ms
up to a deadline (:data:`CLEANUP_DEADLINE`), after which the comparison is made and fails with what is
left over. A leaked socket, a leaked task or a leaked call makes it fail (checked by leaking each on
purpose: one socket or one ``asyncio.sleep(3600)`` task per call ended, or every ended ``Call`` kept).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.keys import REGISTRY
from bridge.local_model import LocalModel
from bridge.testing import ServedBridge, TwilioCaller
from tests.conftest import AUTH_TOKEN, fixture_audio

HELLO = fixture_audio("hello.ulaw")
INTERRUPT = fixture_audio("interrupt.ulaw")

CALLS = 10
"""Concurrent calls per burst: half of them talk over the greeting (a barge-in), half say hello."""
CLEANUP_DEADLINE = 5.0
"""Seconds a burst's clean-up may take after the last caller has hung up (it takes < 0.1 s here)."""
MEMORY_BOUND = 256 * 1024
"""Bytes still allocated after the second burst that were allocated since the baseline. What stays, by
design: each call's outcome (``CallRegistry.outcomes``, the last 1000 calls), each stream token's nonce
until it expires (``TokenLedger``, 30 s), and small caches (yarl's URLs, the local model's interned event
names): 15-50 KiB for 10 calls here. A leak of what one call holds, once per call, is far above it:
keeping every ended ``Call`` (its session, buffers and sockets' objects) keeps ~640 KiB for 10 calls."""


def open_fds() -> dict[int, str]:
    """This process's open file descriptors → what each is (``socket:[…]``, a path, ``anon_inode:…``)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the listing's own descriptor, closed by now
            continue
    return out


def task_names() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks())


def tasks_beyond(names: list[str]) -> list[str]:
    """The running tasks not in ``names``, each with its coroutine (where it was left waiting)."""
    return sorted(f"{t.get_name()}: {t.get_coro()}" for t in asyncio.all_tasks() if t.get_name() not in names)


@dataclass
class Heard:
    """What one caller got, kept small (no audio) so that the test itself keeps nothing of a call."""

    seconds: float
    clears: int
    violations: int


async def one_call(url: str, index: int) -> Heard:
    """Dial; odd calls talk over the greeting (a barge-in: the bridge must clear), even ones say hello
    after it has started; hear some of the reply; hang up as Twilio does (``stop``, then close)."""
    async with TwilioCaller(url, auth_token=AUTH_TOKEN, from_=f"+1555000{index:04d}") as call:
        await call.dial()
        await call.wait_for_played(0.3, timeout=10)
        if index % 2:
            await call.speak(INTERRUPT)
            await call.wait_for_clear(timeout=10)
        else:
            await call.speak(HELLO)
        await call.silence(0.6)  # the end of the turn: the model answers
        await call.wait_for_played(call.heard_seconds() + 0.3, timeout=10)
        await call.hang_up()
        return Heard(call.heard_seconds(), len(call.clears), len(call.violations))


async def burst(bridge: ServedBridge) -> list[Heard]:
    heard = await asyncio.gather(*(one_call(bridge.url, i) for i in range(CALLS)))
    # The calls were real: every one heard audio, no message broke Twilio's rules, the barge-ins cleared.
    assert all(h.seconds > 0.5 and h.violations == 0 for h in heard), heard
    assert [h.clears > 0 for h in heard[1::2]] == [True] * (CALLS // 2), heard
    return heard


async def until(condition: Callable[[], bool], deadline: float) -> bool:
    """Poll ``condition`` every 20 ms until it holds (True) or ``deadline`` (perf_counter) passes (False)."""
    while not condition():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def wait_for_cleanup(bridge: ServedBridge, model: LocalModel, back: Callable[[], bool]) -> None:
    """Wait until the bridge has ended every call, the model has closed every session and ``back()``
    (descriptors and tasks at their baseline) holds, or the deadline passes (the caller then asserts)."""
    registry = bridge.app[REGISTRY]
    deadline = time.perf_counter() + CLEANUP_DEADLINE
    ended = await until(lambda: registry.active == 0 and not model.connections, deadline)
    assert ended, f"calls still up {CLEANUP_DEADLINE:g} s after the last hang-up: {registry.active} calls"
    await until(back, deadline)


async def test_after_a_burst_of_calls_descriptors_tasks_and_memory_return_to_the_baseline(
    start_bridge: Any,
) -> None:
    async with LocalModel(speed=4.0, record=False) as model:  # record=False: it keeps no ended session
        bridge = await start_bridge(model)
        idle_tasks = task_names()  # no call yet: this test's own task (and anything the app runs always)

        # Burst 1, the warm-up. Its calls' tasks must all be gone afterwards too.
        await burst(bridge)
        await wait_for_cleanup(bridge, model, lambda: task_names() == idle_tasks)
        assert task_names() == idle_tasks, f"tasks left running: {tasks_beyond(idle_tasks)}"

        # The baseline: what is open and running now is what every later idle moment must match.
        gc.collect()
        fds, tasks = open_fds(), task_names()
        objects = len(gc.get_objects())
        tracemalloc.start()
        try:
            # Burst 2: the same calls again.
            await burst(bridge)
            await wait_for_cleanup(
                bridge, model, lambda: len(open_fds()) <= len(fds) and len(task_names()) <= len(tasks)
            )
            gc.collect()
            kept, _peak = tracemalloc.get_traced_memory()
            top = tracemalloc.take_snapshot().statistics("lineno")[:8] if kept >= MEMORY_BOUND else []
        finally:
            tracemalloc.stop()

        now_fds = open_fds()
        leaked_fds = {fd: what for fd, what in now_fds.items() if fds.get(fd) != what}
        assert sorted(now_fds.values()) == sorted(fds.values()), f"descriptors left open: {leaked_fds}"
        assert task_names() == tasks, f"tasks left running: {tasks_beyond(tasks)}"
        objects_kept = len(gc.get_objects()) - objects
        assert kept < MEMORY_BOUND, (
            f"{kept / 1024:.0f} KiB kept after {CALLS} calls ({objects_kept} more objects); "
            + "; ".join(str(s) for s in top)
        )

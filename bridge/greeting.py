"""Pre-rendered prompts: a profile version's greeting, and "one moment, please", spoken once in its voice.

When staff save a version, its greeting is rendered through the configured model (the local model when
there is none) and stored with the version; calls play it the instant the stream starts, without
waiting for the model, and the model is told it was said.

The hold prompt ("one moment, please") is played when a call's Realtime session is being replaced and the
caller would otherwise hear silence (``rollover.py``). It is rendered the same way, once per voice and
audio path in each process -- at start-up for the voices of the stored profiles, and for another voice
when its first call begins -- and kept in memory: it is a second of audio and never changes.
"""

from __future__ import annotations

import asyncio
import logging

from websockets.exceptions import ConnectionClosed

from bridge import realtime as rt
from bridge.audio import OutboundTranscoder
from bridge.config import AudioPath
from bridge.errors import BridgeError, MalformedMessage
from bridge.prompts import Profile
from bridge.store import ProfileVersion, Store
from bridge.upstream import Upstream

log = logging.getLogger(__name__)

RENDER_TIMEOUT = 30.0


HOLD_TEXT = "One moment, please."
HOLD_INSTRUCTIONS = f"Say exactly this, calmly, and nothing else: {HOLD_TEXT}"


async def render_greeting(upstream: Upstream, profile: Profile, audio_path: AudioPath) -> bytes:
    """Have the model say ``profile``'s greeting; return it as raw μ-law 8 kHz (what Twilio plays)."""
    instructions = profile.greeting_instructions()
    if instructions is None:
        return b""
    return await render_speech(upstream, profile, audio_path, instructions)


async def render_speech(
    upstream: Upstream, profile: Profile, audio_path: AudioPath, instructions: str
) -> bytes:
    """Have the model say what ``instructions`` ask in ``profile``'s voice; return raw μ-law 8 kHz. (Never
    the breaker's probe: no caller waits for this.)"""
    model = await upstream.connect(may_probe=False)
    transcoder = OutboundTranscoder(audio_path)
    audio = bytearray()
    try:
        async with asyncio.timeout(RENDER_TIMEOUT):
            await model.send(rt.UpdateSession(profile, audio_path))
            await model.send(rt.CreateResponse(instructions))
            while True:
                try:
                    event = await model.receive()
                except MalformedMessage as exc:
                    log.debug("greeting render: skipped a malformed message: %s", exc.reason)
                    continue
                if isinstance(event, rt.AudioDelta):
                    audio += transcoder.convert(event.audio)
                elif isinstance(event, rt.ErrorEvent) and not event.benign:
                    raise BridgeError(
                        f"the model refused to render the greeting: {event.code}: {event.message}"
                    )
                elif isinstance(event, rt.ResponseDone):
                    break
    except ConnectionClosed as exc:
        raise BridgeError(f"the model closed the connection while rendering the greeting: {exc}") from exc
    finally:
        await model.close()
    audio += transcoder.flush()
    return bytes(audio)


class Greetings:
    """Renders greetings in the background and stores them with their version, and keeps the hold prompt
    of each voice; one per app (``render``: False renders nothing, for tests that do not need it)."""

    def __init__(
        self, upstream: Upstream, store: Store, audio_path: AudioPath, *, render: bool = True
    ) -> None:
        self.upstream, self.store, self.audio_path = upstream, store, audio_path
        self.render = render
        self._tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self.failures: dict[tuple[int, int], str] = {}
        self._holds: dict[tuple[str, AudioPath], bytes] = {}
        self._hold_tasks: dict[tuple[str, AudioPath], asyncio.Task[None]] = {}

    def hold_audio(self, profile: Profile, audio_path: AudioPath) -> bytes | None:
        """The hold prompt in ``profile``'s voice, or ``None`` while it is rendered (started here)."""
        key = (profile.voice, audio_path)
        audio = self._holds.get(key)
        if audio is None and self.render and key not in self._hold_tasks:
            task = asyncio.get_running_loop().create_task(self._render_hold(key, profile))
            self._hold_tasks[key] = task
            task.add_done_callback(lambda _: self._hold_tasks.pop(key, None))
        return audio

    async def _render_hold(self, key: tuple[str, AudioPath], profile: Profile) -> None:
        try:
            audio = await render_speech(self.upstream, profile, key[1], HOLD_INSTRUCTIONS)
        except (BridgeError, OSError, TimeoutError) as exc:
            log.warning("hold prompt in voice %s not rendered: %s", key[0], exc)
            return
        if audio:
            self._holds[key] = audio

    def prepare(self, version: ProfileVersion) -> asyncio.Task[None]:
        """Start rendering ``version``'s greeting (idempotent); the task stores it when done."""
        key = (version.profile_id, version.version)
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._render(version))
            self._tasks[key] = task
            task.add_done_callback(lambda _: self._tasks.pop(key, None))
        return task

    def pending(self, profile_id: int, version: int) -> bool:
        """Whether that greeting is being rendered now."""
        return (profile_id, version) in self._tasks

    async def _render(self, version: ProfileVersion) -> None:
        key = (version.profile_id, version.version)
        path = version.profile.audio_path or self.audio_path
        try:
            audio = await render_greeting(self.upstream, version.profile, path)
        except (BridgeError, OSError, TimeoutError) as exc:
            self.failures[key] = str(exc) or type(exc).__name__
            log.warning("greeting of profile %d v%d not rendered: %s", *key, self.failures[key])
            return
        if audio:
            await self.store.set_greeting_audio(version.profile_id, version.version, audio)
            self.failures.pop(key, None)
            log.info("greeting of profile %d v%d rendered: %.1f s", *key, len(audio) / 8000)

    async def close(self) -> None:
        """Stop renders in progress."""
        tasks = [*self._tasks.values(), *self._hold_tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

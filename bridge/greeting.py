"""Pre-rendered greetings: a profile version's greeting spoken once, in its voice, and stored.

When staff save a version, its greeting is rendered through the configured model (the local model when
there is none) and stored with the version; calls play it the instant the stream starts, without
waiting for the model, and the model is told it was said.
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


async def render_greeting(upstream: Upstream, profile: Profile, audio_path: AudioPath) -> bytes:
    """Have the model say ``profile``'s greeting; return it as raw μ-law 8 kHz (what Twilio plays)."""
    instructions = profile.greeting_instructions()
    if instructions is None:
        return b""
    model = await upstream.connect()
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
    """Renders greetings in the background and stores them with their version; one per app."""

    def __init__(self, upstream: Upstream, store: Store, audio_path: AudioPath) -> None:
        self.upstream, self.store, self.audio_path = upstream, store, audio_path
        self._tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self.failures: dict[tuple[int, int], str] = {}

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
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

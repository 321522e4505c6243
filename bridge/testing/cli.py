"""``bridge call``: one simulated phone call into a running bridge, placed by the Twilio caller double."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import numpy as np

from bridge.audio import wav_to_ulaw
from bridge.errors import BridgeError, MalformedMessage
from bridge.testing.caller import TwilioCaller


class SpeechFileError(BridgeError):
    """A ``--say`` file cannot be read or used; the message names the file, what is wrong and the fix."""


def _speech(path: Path) -> bytes:
    """The caller's speech in ``path`` as 8 kHz μ-law: a WAV (PCM16, μ-law or A-law; any rate; mono or
    stereo) converted by :func:`bridge.audio.wav_to_ulaw`, anything else taken as raw 8 kHz μ-law."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpeechFileError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    if path.suffix.lower() != ".wav" and not data.startswith(b"RIFF"):
        return data  # raw μ-law (.ulaw), as Twilio sends it
    try:
        return wav_to_ulaw(data)
    except MalformedMessage as exc:
        raise SpeechFileError(f"{path}: {exc.reason}") from exc


async def _listen(call: TwilioCaller, limit: float, quiet: float = 1.0) -> None:
    """Stream line silence (as Twilio does) until an answer has played and ``quiet`` s passed after it."""
    loop = asyncio.get_running_loop()
    until = loop.time() + limit
    before = call.heard_seconds()
    while loop.time() < until and not call.closed.is_set():
        await call.silence(0.2)
        last = call.received_media[-1][0] if call.received_media else 0.0
        answered = call.heard_seconds() > before
        if answered and call.buffered_seconds() == 0 and loop.time() - last >= quiet:
            return


async def _call(args: argparse.Namespace, speech: list[bytes]) -> TwilioCaller:
    token = args.auth_token or os.environ.get("TWILIO_AUTH_TOKEN") or None
    call = TwilioCaller(args.url, auth_token=token)
    async with call:
        await call.dial()
        await _listen(call, args.listen)  # the greeting
        for ulaw in speech:
            before = call.heard_seconds()
            await call.speak(ulaw)
            await _listen(call, args.listen)
            print(f"said {len(ulaw) / 8000:.1f} s, heard {call.heard_seconds() - before:.1f} s back")
        if not call.closed.is_set():
            await call.hang_up()
    return call


def call_command(args: argparse.Namespace) -> int:
    """``bridge call``: one simulated call; exit 1 when the bridge refused it or said nothing, 2 when a
    ``--say`` file is unusable."""
    try:
        speech = [_speech(path) for path in args.say]
    except SpeechFileError as exc:
        print(f"bridge call: {exc}", file=sys.stderr)
        return 2
    try:
        call = asyncio.run(_call(args, speech))
    except (BridgeError, OSError, AssertionError) as exc:
        print(f"bridge call: {exc}", file=sys.stderr)
        return 1
    print(
        f"call {call.call_sid}: heard {call.heard_seconds():.1f} s of the model, "
        f"{len(call.clears)} barge-ins, stream closed with {call.close_code}"
    )
    if args.heard is not None:
        from bridge.audio import ulaw_to_pcm16
        from bridge.recordings.wav import wav_bytes

        heard = np.frombuffer(ulaw_to_pcm16(bytes(call.played)), dtype="<i2")
        args.heard.write_bytes(wav_bytes(heard, heard))
        print(f"wrote {args.heard}")
    return 0 if call.heard_seconds() > 0 else 1

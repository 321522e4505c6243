"""The audio of a recorded call: the caller and what the caller heard, as two tracks and a stereo WAV.

Why a module of its own: the tracks are what a person listens to when checking a call (``bridge
export --wav``) and what the timeline draws its loudness from; the WAV file is a format of its own.
:func:`tracks` renders the call's timeline (:mod:`.analysis`) into two int16 8 kHz tracks of the same
length, sample ``i`` at ``i / 8`` ms of the call:

* **left, the caller**: the inbound frames where the analysis placed them;
* **right, what the caller heard of the model**: the outbound audio as Twilio played it, clears applied.

Silence (μ-law ``0xff``) fills the rest. :func:`wav_bytes` packs two tracks into a stereo 16-bit PCM WAV.

This module is core tier: pure functions, no I/O (the WAV is built in memory), no clock, no event loop.
"""

from __future__ import annotations

import io
import wave

import numpy as np
import numpy.typing as npt

from bridge.audio import ulaw_to_pcm16
from bridge.recordings.analysis import RATE, CallTimeline, analyse
from bridge.recordings.format import Recording

__all__ = ["Track", "caller_and_heard", "tracks", "wav_bytes"]

Track = npt.NDArray[np.int16]
"""One track of audio: int16 samples at 8 kHz."""


def _decode(buffer: bytearray) -> Track:
    return np.frombuffer(ulaw_to_pcm16(bytes(buffer)), dtype="<i2").astype(np.int16)


def tracks(call: CallTimeline) -> tuple[Track, Track]:
    """The two tracks of an analysed call: the caller (left) and what the caller heard (right)."""
    n = call.samples
    left = bytearray(b"\xff" * n)
    for _, start, data in call.caller:
        left[start : start + len(data)] = data
    right = bytearray(b"\xff" * n)
    for p in call.played:
        right[p.start : p.end] = p.data[: p.length]
    return _decode(left), _decode(right)


def caller_and_heard(rec: Recording) -> tuple[Track, Track]:
    """The caller's audio and what the caller heard of the model: two int16 8 kHz tracks, same length.

    Sample ``i`` of either is at ``i / 8`` ms of the call (:mod:`.analysis`). A caller-only recording gives a
    silent right track; a recording without audio gives two tracks of the call's length in silence.
    """
    return tracks(analyse(rec))


def wav_bytes(left: Track, right: Track, rate: int = RATE) -> bytes:
    """A stereo 16-bit PCM WAV file of two tracks (the shorter is padded with silence)."""
    n = max(len(left), len(right))
    frames = np.zeros((n, 2), dtype="<i2")
    frames[: len(left), 0] = left
    frames[: len(right), 1] = right
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())
    return out.getvalue()

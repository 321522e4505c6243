"""Audio for the local Realtime model (:mod:`bridge.local_model`): G.711, resampling, tones, the VAD scale.

Our own code, independent of ``bridge.audio`` on purpose: a mistake there must not be mirrored here.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

Pcm = npt.NDArray[np.int16]

FRAME_MS = 10
"""The energy VAD looks at frames of this many ms."""

GREETING_TEXT = "Hello! This is the local test model."


# --- G.711 and resampling (our own, independent of bridge.audio on purpose) --------------------------------


def _ulaw_tables() -> tuple[Pcm, npt.NDArray[np.uint8]]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    mag = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)
    decode = np.where(u & 0x80, 0x84 - mag, mag - 0x84).astype(np.int16)
    v = np.arange(-32768, 32768, dtype=np.int32) >> 2  # the classic 14-bit encoder, as audioop has it
    m = np.minimum(np.abs(v), 8159) + 0x21
    exp = np.zeros_like(m)
    for e in range(1, 8):
        exp[m >= (0x40 << (e - 1))] = e
    code = np.where(m >= 0x2000, 0x7F, (exp << 4) | ((m >> (exp + 1)) & 0x0F))
    return decode, (code ^ np.where(v < 0, 0x7F, 0xFF)).astype(np.uint8)


def _alaw_tables() -> tuple[Pcm, npt.NDArray[np.uint8]]:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exp, mant = (a >> 4) & 7, a & 0x0F
    mag = np.where(exp == 0, (mant << 4) + 8, ((mant << 4) + 0x108) << np.maximum(exp - 1, 0))
    decode = np.where(a & 0x80, mag, -mag).astype(np.int16)
    s = np.arange(-32768, 32768, dtype=np.int32) >> 3
    m = np.where(s >= 0, s, -s - 1)
    exp = np.zeros_like(m)
    for e in range(1, 8):
        exp[m >= (16 << e)] = e
    mant = np.where(exp == 0, m >> 1, m >> exp) & 0x0F
    return decode, (((exp << 4) | mant) ^ np.where(s >= 0, 0xD5, 0x55)).astype(np.uint8)


_ULAW_DECODE, _ULAW_ENCODE = _ulaw_tables()
_ALAW_DECODE, _ALAW_ENCODE = _alaw_tables()


def _decode(fmt: str, data: bytes) -> Pcm:
    """Wire bytes in ``fmt`` → PCM16 samples at the format's own rate."""
    if fmt == "pcm16":
        return np.frombuffer(data, dtype="<i2").astype(np.int16)
    table = _ULAW_DECODE if fmt == "g711_ulaw" else _ALAW_DECODE
    out: Pcm = table[np.frombuffer(data, dtype=np.uint8)]
    return out


def encode(fmt: str, pcm: Pcm) -> bytes:
    """PCM16 samples (already at the format's rate) → wire bytes in ``fmt``."""
    if fmt == "pcm16":
        return pcm.astype("<i2").tobytes()
    table = _ULAW_ENCODE if fmt == "g711_ulaw" else _ALAW_ENCODE
    return table[pcm.astype(np.int32) + 32768].tobytes()


def resample(pcm: Pcm, src: int, dst: int) -> Pcm:
    """A crude resampler (quality does not matter for a test model): box filter down, linear up."""
    if src == dst or not len(pcm):
        return pcm
    out: Pcm
    if src == 3 * dst:
        out = pcm[: len(pcm) // 3 * 3].astype(np.int32).reshape(-1, 3).mean(axis=1).astype(np.int16)
    else:
        x = np.arange(max(1, round(len(pcm) * dst / src))) * (src / dst)
        out = np.interp(x, np.arange(len(pcm)), pcm.astype(np.float64)).astype(np.int16)
    return out


def _tone(freq: float, ms: int, rate: int = 24000, amp: float = 0.3) -> Pcm:
    n = rate * ms // 1000
    ramp = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (rate * 0.01))  # 10 ms fades
    return (np.sin(2 * np.pi * freq * np.arange(n) / rate) * ramp * amp * 32767).astype(np.int16)


GREETING = np.concatenate([_tone(523.25, 500), _tone(659.25, 500), _tone(783.99, 500)])
BEEP = _tone(660.0, 300)


def threshold_to_rms(threshold: float) -> float:
    """The frame RMS (PCM16 units) that counts as speech for a VAD ``threshold``: ``-70 + 60·t`` dBFS.

    ``threshold`` t maps linearly in dB: 0.5 is -40 dBFS, well under telephone speech (about -30 to -15 dBFS)
    and well over line silence and low noise (under -55 dBFS)."""
    return 32768.0 * 10 ** ((-70.0 + 60.0 * threshold) / 20.0)


# --- the input timeline ------------------------------------------------------------------------------------


class InputAudio:
    """The caller's audio in one session, without its events: the input timeline (ms of all audio appended
    this session; it survives input format changes), the uncommitted input buffer on it, and the frames of
    the energy VAD."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.base_ms = 0.0
        self.samples = 0  # appended at rate since base_ms
        self.odd_byte = b""
        # The uncommitted input buffer, which starts at buf_start_ms on the timeline.
        self.buf: list[Pcm] = []
        self.buf_len = 0
        self.buf_start_ms = 0.0
        self.vad_rest: Pcm = np.zeros(0, dtype=np.int16)  # the VAD's incomplete last frame

    def now_ms(self) -> float:
        return self.base_ms + self.samples * 1000 / self.rate

    def sample_ms(self, sample: int) -> float:
        """Where the timeline sample ``sample`` (counted at :attr:`rate` since :attr:`base_ms`) is, in ms."""
        return self.base_ms + sample * 1000 / self.rate

    def change_rate(self, rate: int) -> None:
        self.base_ms, self.samples = self.now_ms(), 0
        self.buf = [resample(np.concatenate(self.buf), self.rate, rate)] if self.buf else []
        self.buf_len = sum(len(b) for b in self.buf)
        self.vad_rest = np.zeros(0, dtype=np.int16)
        self.odd_byte = b""
        self.rate = rate

    def append(self, fmt: str, data: bytes) -> tuple[Pcm, int]:
        """Decode ``data`` (in ``fmt``) onto the timeline and into the buffer; return the new samples and the
        timeline sample of the first. A ``pcm16`` append's odd byte waits for the next append."""
        if fmt == "pcm16":
            data = self.odd_byte + data
            cut = len(data) // 2 * 2
            data, self.odd_byte = data[:cut], data[cut:]
        pcm = _decode(fmt, data)
        start = self.samples
        if len(pcm):
            self.samples += len(pcm)
            self.buf.append(pcm)
            self.buf_len += len(pcm)
        return pcm, start

    def vad_frames(self, pcm: Pcm, start: int, exact: bool) -> tuple[list[float], int, int]:
        """The RMS level of each VAD frame of ``pcm`` (appended at timeline sample ``start``) after the rest
        held back from the last append, whose own incomplete last frame is held back in turn. Returns the
        levels, the timeline sample of the first frame and the frame size. ``exact``: frame energies summed
        in integers, in one numpy reduction (else in float32)."""
        rest = self.vad_rest
        frames = np.concatenate([rest, pcm]) if len(rest) or not exact else pcm
        first = start - len(rest)  # the timeline sample of frames[0]
        size = self.rate * FRAME_MS // 1000
        n = len(frames) // size
        self.vad_rest = frames[n * size :]
        if exact:
            block = frames[: n * size].reshape(n, size).astype(np.int64)
            return [math.sqrt(energy / size) for energy in (block * block).sum(axis=1).tolist()], first, size
        floats = frames[: n * size].astype(np.float32).reshape(n, size)
        levels: list[float] = np.sqrt(np.mean(floats * floats, axis=1)).tolist()
        return levels, first, size

    def take(self, start_ms: float, end_ms: float) -> Pcm:
        """Drop the buffer up to ``end_ms``; return the audio from ``start_ms`` to ``end_ms``."""
        whole = np.concatenate(self.buf) if self.buf else np.zeros(0, dtype=np.int16)
        a = max(0, round((start_ms - self.buf_start_ms) * self.rate / 1000))
        b = min(len(whole), max(a, round((end_ms - self.buf_start_ms) * self.rate / 1000)))
        rest = whole[b:]
        self.buf, self.buf_len = ([rest] if len(rest) else []), len(rest)
        self.buf_start_ms = self.now_ms() - len(rest) * 1000 / self.rate
        return whole[a:b]

    def trim(self, keep_ms: float) -> None:
        """While nobody speaks, keep only what the prefix padding may reach back to (trimmed in batches)."""
        if self.buf_len * 1000 / self.rate > 2 * keep_ms + 1000:
            self.take(0, self.now_ms() - keep_ms)

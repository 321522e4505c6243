"""Audio for one call: μ-law ⇄ PCM16, 8 kHz ⇄ 24 kHz resampling, and 20 ms framing.

Theory of operation. Twilio sends and expects μ-law at 8 kHz in 20 ms frames (160 bytes). In the
``pcm16`` audio path the model hears and speaks PCM16 at 24 kHz, so each call has two transcoders:
:class:`InboundTranscoder` (caller → model: μ-law decode, then up by 3) and
:class:`OutboundTranscoder` (model → caller: down by 3, then μ-law encode), each with its own
:class:`StreamResampler`. In the ``g711_ulaw`` path the model speaks μ-law itself and both pass bytes
through. :class:`Framer` cuts the outbound μ-law into Twilio's 20 ms frames.

Why our own resampler and not soxr: soxr's filtered qualities release output in blocks and add 23-85 ms
with 20 ms chunks, and its quick quality does not filter, so the model's 4-12 kHz content would fold into
the phone band (docs/resampling.md, scripts/bench_resample.py). Ours is a linear-phase Kaiser-windowed
sinc lowpass (181 taps at 24 kHz: flat to 3.4 kHz within 0.03 %, ≥ 70 dB down from 4 kHz) run as a
polyphase filter that emits every output the moment its input is there. It adds its group delay,
3.75 ms, and nothing else. Each call keeps only the last 60 (up) or ≤ 182 (down) input samples.

Per-chunk cost is dominated by numpy call overhead, so the filter runs as one matrix product per chunk:
the input is cut into overlapping rows, one row per block of outputs, against a precomputed banded
matrix shared by all calls. Streaming is exact: any chunking gives the same bytes as one call.

This module is core tier: no I/O, no clock, no event loop.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Final

import numpy as np
import numpy.typing as npt
import soxr

from bridge.config import AudioPath
from bridge.errors import MalformedMessage

with warnings.catch_warnings():
    # Python 3.11-3.12 warn that stdlib audioop leaves in 3.13; from 3.13 on the audioop-lts package
    # provides the same module, so the warning is no news to us.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "FRAME_BYTES",
    "FRAME_MS",
    "ULAW_SILENCE",
    "Framer",
    "InboundTranscoder",
    "OutboundTranscoder",
    "StreamResampler",
    "model_bytes_to_ms",
    "pcm16_to_ulaw",
    "ulaw_to_pcm16",
    "wav_to_ulaw",
]

ULAW_SILENCE: Final = b"\xff"
"""One byte of μ-law silence (the code for 0; 0x7F is its negative twin)."""
FRAME_BYTES: Final = 160
"""One Twilio media frame: 20 ms of 8 kHz μ-law."""
FRAME_MS: Final = 20

_Float = npt.NDArray[np.float64]
_PCM16: Final = np.dtype("<i2")

# Filter design, in units of the lower of the two rates so that any integer ratio gets the same response
# (at 8 kHz: passband to 3.4 kHz, cutoff 3.7 kHz, stopband from 4 kHz).
_HALF_SPAN: Final = 30
"""Half the filter length in low-rate samples: the group delay (3.75 ms at 8 kHz)."""
_PHASE_TAPS: Final = 2 * _HALF_SPAN + 1
"""Taps per polyphase branch (61)."""
_CUTOFF: Final = 0.4625
"""-6 dB point in cycles per low-rate sample (3.7 kHz at 8 kHz), midway in the 3.4-4 kHz transition."""
_KAISER_BETA: Final = 7.0
"""≈ 70 dB stopband and passband ripple for the length above."""
_BLOCK: Final = 40
"""Low-rate samples per matrix row: 160 (one 20 ms frame at 8 kHz) is four rows, no padding."""

_INT16_MIN: Final = np.array(-32768.0)  # 0-d arrays: numpy's ufuncs take them faster than scalars
_INT16_MAX: Final = np.array(32767.0)


def ulaw_to_pcm16(data: bytes) -> bytes:
    """Decode G.711 μ-law to PCM16 little-endian mono, one sample per byte."""
    out: bytes = audioop.ulaw2lin(data, 2)
    return out


def pcm16_to_ulaw(data: bytes) -> bytes:
    """Encode PCM16 little-endian mono (an even number of bytes) to G.711 μ-law.

    Raises :class:`ValueError` for an odd byte count; streams that may split a sample go through a
    :class:`StreamResampler` or :class:`OutboundTranscoder`, which keep the odd byte for later.
    """
    if len(data) & 1:
        raise ValueError(f"PCM16 needs an even number of bytes, got {len(data)}")
    out: bytes = audioop.lin2ulaw(data, 2)
    return out


def model_bytes_to_ms(nbytes: int, path: AudioPath) -> float:
    """Duration of ``nbytes`` of model audio: PCM16 24 kHz is 48 bytes/ms, μ-law 8 kHz is 8 bytes/ms."""
    return nbytes / 48.0 if path == AudioPath.PCM16 else nbytes / 8.0


def _lowpass(factor: int) -> _Float:
    """Kaiser-windowed sinc at the high rate, unity DC gain, padded with zeros to ``_PHASE_TAPS * factor``."""
    taps = 2 * _HALF_SPAN * factor + 1
    n = np.arange(taps, dtype=np.float64) - (taps - 1) / 2
    fc = _CUTOFF / factor  # cycles per high-rate sample
    h = 2 * fc * np.sinc(2 * fc * n) * np.kaiser(taps, _KAISER_BETA)
    h /= h.sum()
    return np.concatenate((h, np.zeros(_PHASE_TAPS * factor - taps)))


@dataclass(frozen=True, slots=True)
class _Bank:
    """The precomputed filter of one integer ratio and direction, shared read-only by all calls."""

    factor: int
    up: bool
    matrix: _Float
    """Rows of input (one per block of outputs) @ matrix = outputs of that block."""
    keep: int
    """Input samples a fresh stream holds as history (zeros)."""
    row: int
    """Input samples per matrix row."""
    stride: int
    """Input samples between the starts of two rows."""


@cache
def _bank(factor: int, up: bool) -> _Bank:
    h = _lowpass(factor)
    f, j, b = factor, _PHASE_TAPS, _BLOCK
    if up:
        # y[f*m + r] = sum_j f*h[f*j + r] * x[m - j]: branch r is h's r-th phase at the low rate.
        # A row holds x[m0 - (J-1) .. m0 + B - 1] and yields y[f*m0 .. f*(m0 + B) - 1].
        branches = (f * h).reshape(j, f)[::-1]  # row t: the weights of x[m - (J-1) + t]
        matrix = np.zeros((b + j - 1, f * b))
        for a in range(b):
            matrix[a : a + j, f * a : f * (a + 1)] = branches
        bank = _Bank(f, True, matrix, keep=j - 1, row=b + j - 1, stride=b)
    else:
        # y[n] = sum_k h[k] * x[f*n - k]; the window of y[n] starts at x[f*n - (f*J - 1)].
        # A row holds the windows of B consecutive outputs, f*(B + J - 1) samples.
        matrix = np.zeros((f * (b + j - 1), b))
        window = h[::-1]
        for a in range(b):
            matrix[f * a : f * a + f * j, a] = window
        bank = _Bank(f, False, matrix, keep=f * j - 1, row=f * (b + j - 1), stride=f * b)
    bank.matrix.flags.writeable = False
    return bank


class StreamResampler:
    """Streaming PCM16 mono resampler for one direction of one call.

    Supports integer ratios (8000 → 24000, 24000 → 8000, and likewise 16000 ⇄ 8000 …). Every output
    sample is released as soon as its input has arrived; the only delay is the filter's own,
    :attr:`delay_ms`. Chunking never changes the result: ``process(a) + process(b)`` is the same bytes
    as ``process(a + b)``, odd byte counts included (the odd byte waits for its partner).
    """

    __slots__ = ("_bank", "_delay_ms", "_fed", "_history", "_odd", "in_rate", "out_rate")

    def __init__(self, in_rate: int, out_rate: int) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} → {out_rate}")
        high, low = max(in_rate, out_rate), min(in_rate, out_rate)
        if high == low or high % low:
            raise ValueError(f"only integer ratios ≥ 2 are supported, got {in_rate} → {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._bank = _bank(high // low, out_rate > in_rate)
        self._delay_ms = _HALF_SPAN * 1000.0 / low
        self._history: _Float = np.zeros(self._bank.keep)
        self._odd = b""
        self._fed = False

    @property
    def delay_ms(self) -> float:
        """The group delay the filter adds (3.75 ms for 8 kHz ⇄ 24 kHz); nothing is held back beyond it."""
        return self._delay_ms

    def process(self, pcm: bytes) -> bytes:
        """Resample the next chunk (any length); return every output sample that is ready."""
        if self._odd:
            pcm = self._odd + pcm
            self._odd = b""
        if len(pcm) & 1:
            self._odd = pcm[-1:]
            pcm = pcm[:-1]
        if not pcm:
            return b""
        self._fed = True
        return self._run(np.frombuffer(pcm, dtype=_PCM16))

    def flush(self) -> bytes:
        """Emit the tail still inside the filter (its delay's worth of output), then :meth:`reset`.

        Nothing since the last reset: nothing to emit. An odd byte still waiting for its partner is dropped.
        """
        bank = self._bank
        # Feeding the group delay's worth of zeros pushes the last real sample's response out.
        tail = self._run(np.zeros(_HALF_SPAN if bank.up else _HALF_SPAN * bank.factor)) if self._fed else b""
        self.reset()
        return tail

    def reset(self) -> None:
        """Forget all history, as if new: the next sound fades in through the filter, without a click."""
        self._history = np.zeros(self._bank.keep)
        self._odd = b""
        self._fed = False

    def _run(self, x: npt.NDArray[np.int16] | _Float) -> bytes:
        bank = self._bank
        history = self._history
        total = history.size + x.size
        if bank.up:
            ready = x.size  # every input sample completes `factor` outputs
            keep_from, keep_to = x.size, x.size + bank.keep  # the last J-1 inputs
        else:
            span = _PHASE_TAPS * bank.factor
            ready = (total - span) // bank.factor + 1 if total >= span else 0
            # Keep from where the next output's window starts: that is how the decimation phase
            # survives chunks whose length is not a multiple of the factor.
            keep_from, keep_to = ready * bank.factor, total
        rows = -(-ready // _BLOCK)
        buf = np.zeros(max(total, (rows - 1) * bank.stride + bank.row))
        buf[: history.size] = history
        buf[history.size : total] = x
        self._history = buf[keep_from:keep_to].copy()
        if ready == 0:
            return b""
        item = buf.itemsize
        windows: _Float = np.ndarray(
            (rows, bank.row), dtype=np.float64, buffer=buf, strides=(bank.stride * item, item)
        )
        y = (windows.copy() @ bank.matrix).reshape(-1)[: ready * bank.factor if bank.up else ready]
        np.rint(y, out=y)
        np.minimum(y, _INT16_MAX, out=y)
        np.maximum(y, _INT16_MIN, out=y)
        return y.astype(_PCM16).tobytes()


class InboundTranscoder:
    """Caller → model for one call: Twilio's μ-law 8 kHz to what the model expects."""

    __slots__ = ("_resampler", "path")

    def __init__(self, path: AudioPath) -> None:
        self.path = AudioPath(path)  # a plain "pcm16" from a profile works too; an unknown value raises
        self._resampler = StreamResampler(8000, 24000) if self.path is AudioPath.PCM16 else None

    @property
    def delay_ms(self) -> float:
        """What transcoding adds to the caller's audio on its way to the model."""
        return self._resampler.delay_ms if self._resampler else 0.0

    def convert(self, ulaw: bytes) -> bytes:
        """``pcm16``: μ-law 8 kHz → PCM16 24 kHz (ready samples only); ``g711_ulaw``: the input unchanged."""
        if self._resampler is None:
            return ulaw
        return self._resampler.process(ulaw_to_pcm16(ulaw))

    def reset(self) -> None:
        """Drop the resampler's history, e.g. when the model connection is replaced."""
        if self._resampler:
            self._resampler.reset()


class OutboundTranscoder:
    """Model → caller for one call: the model's audio to Twilio's μ-law 8 kHz."""

    __slots__ = ("_resampler", "path")

    def __init__(self, path: AudioPath) -> None:
        self.path = AudioPath(path)  # a plain "pcm16" from a profile works too; an unknown value raises
        self._resampler = StreamResampler(24000, 8000) if self.path is AudioPath.PCM16 else None

    @property
    def delay_ms(self) -> float:
        """What transcoding adds to the model's audio on its way to the caller."""
        return self._resampler.delay_ms if self._resampler else 0.0

    def convert(self, model_audio: bytes) -> bytes:
        """``pcm16``: PCM16 24 kHz → μ-law 8 kHz (ready samples only); ``g711_ulaw``: the input unchanged."""
        if self._resampler is None:
            return model_audio
        return pcm16_to_ulaw(self._resampler.process(model_audio))

    def flush(self) -> bytes:
        """End of a response (``response.output_audio.done``): the audio still in the filter, as μ-law."""
        if self._resampler is None:
            return b""
        return pcm16_to_ulaw(self._resampler.flush())

    def reset(self) -> None:
        """Barge-in: drop everything held, so the next response starts from silence."""
        if self._resampler:
            self._resampler.reset()


class Framer:
    """Cuts μ-law into 160-byte / 20 ms frames."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held, less than one frame after every :meth:`push`."""
        return len(self._buf)

    def push(self, ulaw: bytes) -> list[bytes]:
        """Add μ-law; return the complete frames now ready, in order, and keep the remainder."""
        buf = self._buf
        buf += ulaw
        whole = len(buf) - len(buf) % FRAME_BYTES
        if not whole:
            return []
        frames = [bytes(buf[i : i + FRAME_BYTES]) for i in range(0, whole, FRAME_BYTES)]
        del buf[:whole]
        return frames

    def flush(self) -> bytes | None:
        """The partial remainder padded to a full frame with μ-law silence, or ``None`` if nothing is held."""
        if not self._buf:
            return None
        frame = bytes(self._buf).ljust(FRAME_BYTES, ULAW_SILENCE)
        self._buf.clear()
        return frame

    def clear(self) -> None:
        """Drop the remainder (barge-in)."""
        self._buf.clear()


def wav_to_ulaw(data: bytes) -> bytes:
    """A WAV file's audio as 8 kHz mono μ-law: what a caller says on a Twilio media stream.

    Reads the RIFF chunks itself (Python's ``wave`` takes plain PCM only): 16-bit PCM, μ-law (format 7,
    as in Twilio's own recordings) or A-law (6), also inside ``WAVE_FORMAT_EXTENSIBLE``; any sample rate;
    any number of channels, mixed down to mono by their mean. Another rate is converted to 8 kHz with
    soxr at high quality, the whole file in one go. 8 kHz mono μ-law comes back as it is.

    Raises :class:`~bridge.errors.MalformedMessage` saying what is wrong or unsupported (24-bit, float,
    ADPCM, ...) and how to convert the file with sox.
    """
    convert = "convert it with: sox in.wav -r 8000 -c 1 -e signed-integer -b 16 out.wav"
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        kind = {b"RF64": "an RF64 WAV", b"RIFX": "a big-endian (RIFX) WAV"}.get(data[:4])
        if kind is not None:
            raise MalformedMessage(f"{kind} is not supported: {convert}")
        raise MalformedMessage(f"not a WAV file (no RIFF/WAVE header): {convert}")
    fmt: bytes | None = None
    audio: bytes | None = None
    pos = 12
    while pos + 8 <= len(data):  # chunks: id, little-endian size, body, a pad byte after an odd size
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = data[pos + 8 : pos + 8 + size]  # a writer that never set the size: keep what is there
        if chunk_id == b"fmt " and fmt is None:
            fmt = body
        elif chunk_id == b"data" and audio is None:
            audio = body
        pos += 8 + size + (size & 1)
    if fmt is None or len(fmt) < 16:
        raise MalformedMessage(f"the WAV file has no complete fmt chunk: {convert}")
    if audio is None:
        raise MalformedMessage(f"the WAV file has no data chunk: {convert}")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == 0xFFFE:  # WAVE_FORMAT_EXTENSIBLE: the real format tag opens the subformat GUID
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        if len(fmt) < 40 or fmt[26:40] != guid_tail:
            raise MalformedMessage(f"a WAVE_FORMAT_EXTENSIBLE WAV with an unknown subformat: {convert}")
        (tag,) = struct.unpack_from("<H", fmt, 24)
    names = {1: f"{bits}-bit PCM", 3: f"{bits}-bit float", 6: "A-law", 7: "μ-law", 2: "MS ADPCM"}
    names |= {0x11: "IMA ADPCM", 0x31: "GSM 6.10", 0x55: "MP3", 0x50: "MPEG", 0x40: "G.721 ADPCM"}
    if (tag, bits) not in ((1, 16), (6, 8), (7, 8)):
        what = names.get(tag, f"format tag {tag:#06x}")
        raise MalformedMessage(
            f"{what} WAV is not supported (use 16-bit PCM, 8-bit μ-law or 8-bit A-law): {convert}"
        )
    if channels < 1 or rate < 1:
        raise MalformedMessage(f"the WAV file says {channels} channels at {rate} Hz: {convert}")
    frame = channels * bits // 8
    audio = audio[: len(audio) - len(audio) % frame]  # a partial last frame is dropped
    if tag == 7 and channels == 1 and rate == 8000:
        return bytes(audio)
    pcm: bytes = audio if tag == 1 else ulaw_to_pcm16(audio) if tag == 7 else audioop.alaw2lin(audio, 2)
    x: _Float = np.frombuffer(pcm, dtype=_PCM16).astype(np.float64)
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    if rate != 8000 and x.size:
        x = np.asarray(soxr.resample(x, rate, 8000, quality="HQ"), dtype=np.float64)
    return pcm16_to_ulaw(np.clip(np.rint(x), -32768, 32767).astype(_PCM16).tobytes())

"""Tests of bridge.audio: G.711 μ-law, the streaming resampler, transcoders and framing.

The resampler is judged against a near-ideal reference: ``scipy.signal.resample_poly`` given a 0.1 s
Kaiser lowpass (2401 taps at 24 kHz: flat to 3.76 kHz, > 110 dB down from 3.84 kHz). With its default
61-tap filter it starts to droop at 3.3 kHz and would measure its own error rather than ours.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from scipy import signal

from bridge.audio import (
    FRAME_BYTES,
    ULAW_SILENCE,
    Framer,
    InboundTranscoder,
    OutboundTranscoder,
    StreamResampler,
    model_bytes_to_ms,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
    wav_to_ulaw,
)
from bridge.config import AudioPath
from bridge.errors import MalformedMessage
from tests.conftest import wav_file

Float = npt.NDArray[np.float64]
Int16 = npt.NDArray[np.int16]

FIXTURES = Path(__file__).parent / "fixtures"
DIRECTIONS = [(8000, 24000), (24000, 8000)]


# ---------------------------------------------------------------------------------------------- helpers


def pcm(samples: Float | Int16) -> bytes:
    return np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes()


def samples(data: bytes) -> Int16:
    return np.frombuffer(data, dtype="<i2")


def ideal(x: Float | Int16, in_rate: int, out_rate: int) -> Float:
    """Near-ideal, zero-delay resampling of the whole signal at once."""
    up, down = (out_rate // in_rate, 1) if out_rate > in_rate else (1, in_rate // out_rate)
    high = max(in_rate, out_rate)
    lowpass = signal.firwin(high // 10 + 1, 3800, window=("kaiser", 12.0), fs=high)
    return np.asarray(signal.resample_poly(np.asarray(x, float), up, down, window=lowpass))


def stream(in_rate: int, out_rate: int, data: bytes, chunk: int | None = None) -> tuple[Int16, int]:
    """Run ``data`` through a fresh resampler (in chunks of ``chunk`` bytes), flush it; return the output
    and the delay to drop from its start, in output samples."""
    r = StreamResampler(in_rate, out_rate)
    step = chunk or len(data) or 1
    out = b"".join(r.process(data[i : i + step]) for i in range(0, len(data), step)) + r.flush()
    lag = round(r.delay_ms * out_rate / 1000)
    assert lag == r.delay_ms * out_rate / 1000, "the delay is a whole number of output samples"
    return samples(out), lag


def inband_snr_db(got: Int16 | Float, want: Float, rate: int, band: float = 4000.0) -> float:
    """SNR of ``got`` against ``want`` counting only error below ``band`` Hz; 0.1 s edges are left out."""
    trim = rate // 10
    g = np.asarray(got, float)[trim : len(want) - trim]
    w = want[trim:-trim]
    window = np.hanning(len(w))
    freqs = np.fft.rfftfreq(len(w), 1 / rate)
    in_band = freqs < band
    err = np.abs(np.fft.rfft((g - w) * window))[in_band]
    sig = np.abs(np.fft.rfft(w * window))[in_band]
    return float(10 * np.log10(np.sum(sig**2) / np.sum(err**2)))


def tone(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 12000.0) -> Float:
    t = np.arange(int(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t + 0.3)


def band_noise(rate: int, low: float, high: float, rms: float, seconds: float = 1.0, seed: int = 7) -> Float:
    """Gaussian noise with every component outside [low, high] Hz removed."""
    n = int(rate * seconds)
    spec = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spec[(freqs < low) | (freqs > high)] = 0
    x = np.fft.irfft(spec, n)
    return np.asarray(x * rms / np.sqrt(np.mean(x**2)))


def multitone(rate: int, seconds: float = 1.0) -> Float:
    """A vowel-like sum: a 140 Hz voice's harmonics up to 3.4 kHz with falling level."""
    t = np.arange(int(rate * seconds)) / rate
    x = sum((3000.0 / k**0.7) * np.sin(2 * np.pi * 140 * k * t + k) for k in range(1, 3400 // 140 + 1))
    return np.asarray(x)


def resample_snr(x: Float, in_rate: int, out_rate: int, band: float = 4000.0) -> float:
    data = pcm(x)
    got, lag = stream(in_rate, out_rate, data, chunk=2 * in_rate // 50)
    want = ideal(samples(data), in_rate, out_rate)
    return inband_snr_db(got[lag : lag + len(want)], want, out_rate, band)


# ------------------------------------------------------------------------------------------------ μ-law


def g711_ulaw_decode(code: int) -> int:
    """G.711 μ-law expansion, from the spec: the code is sent inverted; sign, 3-bit segment s, 4-bit
    step q; the magnitude is (2q + 33)·2^s − 33 in 14-bit units, scaled here by 4 to 16 bits."""
    u = ~code & 0xFF
    segment = (u >> 4) & 0x07
    step = u & 0x0F
    magnitude = ((2 * step + 33) << segment) - 33
    return 4 * (-magnitude if u & 0x80 else magnitude)


def test_ulaw_decode_matches_the_g711_table_for_all_256_codes() -> None:
    table = [g711_ulaw_decode(code) for code in range(256)]
    assert table[0xFF] == 0 and table[0x80] == 32124 and table[0x00] == -32124  # the table's anchors
    assert samples(ulaw_to_pcm16(bytes(range(256)))).tolist() == table


def test_ulaw_encode_round_trips_every_int16_within_one_step_of_its_segment() -> None:
    every = np.arange(-32768, 32768, dtype=np.int16)
    codes = np.frombuffer(pcm16_to_ulaw(every.tobytes()), np.uint8)
    decoded = samples(ulaw_to_pcm16(codes.tobytes())).astype(int)
    segment = ((~codes.astype(int) & 0xFF) >> 4) & 0x07
    step = 8 << segment  # one quantisation step of that segment in 16-bit units
    assert np.all(np.abs(decoded - every) <= step)
    # and the codes of the table's own values are exact
    assert pcm16_to_ulaw(ulaw_to_pcm16(bytes(range(256)))) == bytes(range(127)) + b"\xff" + bytes(
        range(128, 256)
    )


def test_ulaw_silence_is_0xff_both_ways() -> None:
    assert ULAW_SILENCE == b"\xff"
    assert pcm16_to_ulaw(bytes(320)) == ULAW_SILENCE * 160
    assert ulaw_to_pcm16(ULAW_SILENCE * 160) == bytes(320)


def test_pcm16_to_ulaw_refuses_half_a_sample() -> None:
    with pytest.raises(ValueError, match="even"):
        pcm16_to_ulaw(b"\x00\x01\x02")


# ------------------------------------------------------------------------------------ resampler quality


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
@pytest.mark.parametrize("freq", [300, 1000, 2000, 3000, 3400])
def test_sine_in_band_snr_at_least_45_db(in_rate: int, out_rate: int, freq: int) -> None:
    assert resample_snr(tone(freq, in_rate), in_rate, out_rate) >= 45


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_multitone_in_band_snr_at_least_45_db(in_rate: int, out_rate: int) -> None:
    assert resample_snr(multitone(in_rate), in_rate, out_rate) >= 45


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_band_limited_noise_in_band_snr_at_least_45_db(in_rate: int, out_rate: int) -> None:
    assert resample_snr(band_noise(in_rate, 100, 3400, 5000), in_rate, out_rate) >= 45


def test_model_speech_with_high_frequencies_keeps_in_band_snr() -> None:
    # What the model really sends: speech-band content plus sibilance up to 11 kHz, which must go.
    x = band_noise(24000, 100, 3400, 5000) + band_noise(24000, 4000, 11000, 3000, seed=8)
    assert resample_snr(x, 24000, 8000) >= 45


def test_recorded_speech_survives_both_directions() -> None:
    # The espeak-ng fixtures (tests/fixtures/README.md); error counted in the telephone band, 0-3.4 kHz.
    for name in ("question.ulaw", "interrupt.ulaw", "hello.ulaw"):
        caller = samples(ulaw_to_pcm16((FIXTURES / name).read_bytes())).astype(float)
        assert resample_snr(caller, 8000, 24000, band=3400) >= 45, name
        assert resample_snr(ideal(caller, 8000, 24000), 24000, 8000, band=3400) >= 45, name


@pytest.mark.parametrize("freq", [4000, 4500, 5000, 6000, 8000, 10000, 11900])
def test_down_rejects_content_above_4khz_by_60_db(freq: int) -> None:
    x = tone(freq, 24000, amplitude=16000)
    got, _ = stream(24000, 8000, pcm(x), chunk=960)
    residue = got[800:-800].astype(float)  # leave out the start and the flushed tail
    assert np.sqrt(np.mean(residue**2)) <= np.sqrt(np.mean(x**2)) * 10 ** (-60 / 20)


@pytest.mark.parametrize("freq", [300, 2000, 3400])
def test_up_images_are_60_db_down(freq: int) -> None:
    # Upsampling mirrors f to 8k ± f; those images must not reach the model.
    got, lag = stream(8000, 24000, pcm(tone(freq, 8000)), chunk=320)
    y = got[lag + 2400 : lag + 21600].astype(float)
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    freqs = np.fft.rfftfreq(len(y), 1 / 24000)
    assert 20 * np.log10(spec[freqs > 4000].max() / spec.max()) <= -60


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
@pytest.mark.parametrize("level", [1000, -1000, 12345, -32768, 32767])
def test_a_steady_level_comes_out_exactly(in_rate: int, out_rate: int, level: int) -> None:
    # Unity gain at DC, rounded to nearest: no drift, no off-by-one from truncation.
    got, lag = stream(in_rate, out_rate, pcm(np.full(in_rate // 10, float(level))))
    settled = got[2 * lag : len(got) - 2 * lag]
    assert settled.size and np.all(settled == level)


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_full_scale_overshoot_clips_instead_of_wrapping(in_rate: int, out_rate: int) -> None:
    # A full-scale 2 kHz square: its band-limited shape peaks above full scale, so the output must clip.
    period = in_rate // 2000
    x = np.tile(np.repeat([32767.0, -32767.0], period // 2), in_rate // period)
    got, lag = stream(in_rate, out_rate, pcm(x))
    want = np.clip(np.rint(ideal(x, in_rate, out_rate)), -32768, 32767)
    middle = slice(out_rate // 10, -out_rate // 10)
    assert got.min() == -32768 and got.max() == 32767
    assert np.abs(got[lag : lag + len(want)][middle] - want[middle]).max() <= 50  # clipped, never wrapped


# ----------------------------------------------------------------------------------- streaming behaviour


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_chunking_gives_the_one_shot_bytes(in_rate: int, out_rate: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = pcm(rng.normal(0, 8000, in_rate))  # 1 s
    one = StreamResampler(in_rate, out_rate)
    whole = one.process(data) + one.flush()
    r = StreamResampler(in_rate, out_rate)
    parts, i = [], 0
    twenty_ms = 2 * in_rate // 50
    while i < len(data):
        size = int(rng.choice([0, 1, 2, 3, 5, 7, 159, twenty_ms, twenty_ms + 1, int(rng.integers(1, 3000))]))
        parts.append(r.process(data[i : i + size]))
        i += size
    parts.append(r.flush())
    assert b"".join(parts) == whole


@pytest.mark.parametrize("sizes", [[1, 2], [2, 4, 6], [4, 2], [1000, 2, 998]])
def test_down_keeps_its_decimation_phase_across_chunks(sizes: list[int]) -> None:
    # Chunks of 1, 2 or 3 samples (2, 4, 6 bytes) put every chunk start on every phase of the 3:1 cycle.
    data = pcm(np.random.default_rng(4).normal(0, 8000, 24000))
    one = StreamResampler(24000, 8000)
    whole = one.process(data)
    r = StreamResampler(24000, 8000)
    out, i, k = [], 0, 0
    while i < len(data):
        out.append(r.process(data[i : i + sizes[k % len(sizes)]]))
        i += sizes[k % len(sizes)]
        k += 1
    assert b"".join(out) == whole


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_twenty_ms_chunks_are_answered_at_once(in_rate: int, out_rate: int) -> None:
    # Nothing is held back beyond the filter delay: 20 ms in, 20 ms out, from the first chunk on.
    r = StreamResampler(in_rate, out_rate)
    chunk = pcm(tone(1000, in_rate, 0.02))
    for _ in range(10):
        assert len(r.process(chunk)) == 2 * out_rate // 50


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_impulse_delay_is_delay_ms_and_at_most_10_ms(in_rate: int, out_rate: int) -> None:
    x = np.zeros(in_rate // 10)
    at = 3 * 67  # on the decimation grid, so the impulse's peak falls on an output sample
    x[at] = 30000
    r = StreamResampler(in_rate, out_rate)
    out = samples(b"".join(r.process(c) for c in _chunks(pcm(x), 2 * in_rate // 50)))
    peak = int(np.argmax(np.abs(out)))
    measured_ms = (peak / out_rate - at / in_rate) * 1000
    assert measured_ms == pytest.approx(r.delay_ms, abs=1e-9)
    assert 0 < measured_ms <= 10


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_cross_correlation_delay_is_delay_ms(in_rate: int, out_rate: int) -> None:
    x = band_noise(in_rate, 100, 3400, 5000)
    got, _ = stream(in_rate, out_rate, pcm(x), chunk=2 * in_rate // 50)
    want = ideal(x, in_rate, out_rate)
    corr = signal.correlate(got.astype(float), want, mode="full")
    lag = int(np.argmax(corr)) - (len(want) - 1)
    assert lag / out_rate * 1000 == pytest.approx(StreamResampler(in_rate, out_rate).delay_ms)
    assert StreamResampler(in_rate, out_rate).delay_ms <= 10


def test_delay_ms_is_3_75_both_ways() -> None:
    assert StreamResampler(8000, 24000).delay_ms == 3.75
    assert StreamResampler(24000, 8000).delay_ms == 3.75


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_odd_byte_waits_for_its_partner(in_rate: int, out_rate: int) -> None:
    data = pcm(tone(700, in_rate, 0.1))
    one = StreamResampler(in_rate, out_rate)
    whole = one.process(data)
    r = StreamResampler(in_rate, out_rate)
    assert r.process(data[:1]) == b""
    assert r.process(data[1:2]) + r.process(data[2:961]) + r.process(data[961:]) == whole


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_flush_emits_the_delay_tail_then_starts_afresh(in_rate: int, out_rate: int) -> None:
    data = pcm(tone(700, in_rate, 0.1, amplitude=20000))
    r = StreamResampler(in_rate, out_rate)
    body = r.process(data)
    tail = r.flush()
    assert len(tail) == 2 * round(r.delay_ms * out_rate / 1000)
    assert np.abs(samples(tail)).max() > 1000  # the end of the tone was still in the filter
    assert r.flush() == b""  # nothing left
    assert r.process(data) == body  # as good as new


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_reset_drops_history_so_the_next_sound_starts_clean(in_rate: int, out_rate: int) -> None:
    r = StreamResampler(in_rate, out_rate)
    r.process(pcm(tone(700, in_rate, 0.1, amplitude=30000)) + b"\x01")  # loud, and an odd byte held
    r.reset()
    assert r.process(bytes(2 * in_rate // 50)) == bytes(2 * out_rate // 50)  # silence, no click
    r.reset()
    fresh = StreamResampler(in_rate, out_rate)
    data = pcm(tone(300, in_rate, 0.05))
    assert r.process(data) == fresh.process(data)


def test_without_reset_the_old_sound_would_ring_on() -> None:
    r = StreamResampler(24000, 8000)
    r.process(pcm(tone(700, 24000, 0.1, amplitude=30000)))
    assert samples(r.process(bytes(960))).any()  # what reset() is there to prevent


def test_empty_input_is_fine() -> None:
    for in_rate, out_rate in DIRECTIONS:
        r = StreamResampler(in_rate, out_rate)
        assert r.process(b"") == b""
        assert r.flush() == b""  # nothing went in: no tail to give


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 8000), (8000, 12000), (0, 8000), (24000, -8000)])
def test_unsupported_ratios_are_refused(in_rate: int, out_rate: int) -> None:
    with pytest.raises(ValueError, match=r"ratio|positive"):
        StreamResampler(in_rate, out_rate)


def test_other_integer_ratios_work_too() -> None:
    # 16 kHz <-> 8 kHz uses the same design scaled: same delay, same quality.
    assert StreamResampler(8000, 16000).delay_ms == 3.75
    assert resample_snr(band_noise(8000, 100, 3400, 5000), 8000, 16000) >= 45
    assert resample_snr(band_noise(16000, 100, 3400, 5000), 16000, 8000) >= 45


# ---------------------------------------------------------------------------------------- transcoders


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _speech_ulaw() -> bytes:
    return pcm16_to_ulaw(pcm(multitone(8000, 0.2)))


def test_inbound_pcm16_decodes_and_upsamples_each_frame() -> None:
    ulaw = _speech_ulaw()
    t = InboundTranscoder(AudioPath.PCM16)
    reference = StreamResampler(8000, 24000)
    for frame in _chunks(ulaw, FRAME_BYTES):
        out = t.convert(frame)
        assert len(out) == 6 * len(frame)  # 160 bytes μ-law 8 kHz -> 960 bytes PCM16 24 kHz
        assert out == reference.process(ulaw_to_pcm16(frame))
    assert t.delay_ms == 3.75


def test_inbound_reset_forgets_the_previous_audio() -> None:
    t = InboundTranscoder(AudioPath.PCM16)
    t.convert(_speech_ulaw())
    t.reset()
    assert t.convert(ULAW_SILENCE * 160) == bytes(960)


def test_inbound_g711_passes_through() -> None:
    t = InboundTranscoder(AudioPath.G711_ULAW)
    ulaw = _speech_ulaw()
    assert t.convert(ulaw) == ulaw
    assert t.delay_ms == 0
    t.reset()


def test_outbound_pcm16_downsamples_encodes_and_flushes_the_tail() -> None:
    model = pcm(multitone(24000, 0.2))
    t = OutboundTranscoder(AudioPath.PCM16)
    reference = StreamResampler(24000, 8000)
    out = b""
    for delta in _chunks(model, 4801):  # odd sizes, as a careless sender might cut them
        piece = t.convert(delta)
        assert piece == pcm16_to_ulaw(reference.process(delta))
        out += piece
    assert len(out) == 1600  # 200 ms at 8 kHz, released at once
    tail = t.flush()
    assert tail == pcm16_to_ulaw(reference.flush())
    assert len(tail) == 30  # 3.75 ms
    assert t.flush() == b""
    assert t.delay_ms == 3.75


def test_outbound_reset_after_barge_in_starts_from_silence() -> None:
    t = OutboundTranscoder(AudioPath.PCM16)
    t.convert(pcm(tone(700, 24000, 0.1, amplitude=30000)))
    t.reset()
    assert t.flush() == b""  # the cut-off response leaves nothing behind
    assert t.convert(bytes(960)) == ULAW_SILENCE * 160
    assert t.flush() == ULAW_SILENCE * 30


def test_outbound_g711_passes_through() -> None:
    t = OutboundTranscoder(AudioPath.G711_ULAW)
    ulaw = _speech_ulaw()
    assert t.convert(ulaw) == ulaw
    assert t.flush() == b""
    t.reset()
    assert t.delay_ms == 0


def test_round_trip_through_both_transcoders_keeps_the_speech() -> None:
    ulaw = (FIXTURES / "hello.ulaw").read_bytes()
    inbound, outbound = InboundTranscoder(AudioPath.PCM16), OutboundTranscoder(AudioPath.PCM16)
    back = b"".join(outbound.convert(inbound.convert(f)) for f in _chunks(ulaw, FRAME_BYTES))
    back += outbound.flush()
    lag = round((inbound.delay_ms + outbound.delay_ms) * 8)
    original = samples(ulaw_to_pcm16(ulaw)).astype(float)
    heard = samples(ulaw_to_pcm16(back)).astype(float)[lag : lag + len(original)]
    # Two μ-law codings (~38 dB each) and two filters: still well above what a phone line gives.
    assert inband_snr_db(heard, original, 8000, band=3400) >= 25


# -------------------------------------------------------------------------------------------- framing


def test_framer_cuts_20_ms_frames_and_keeps_the_rest() -> None:
    f = Framer()
    data = bytes(range(256)) * 3  # 768 bytes
    assert f.push(data[:100]) == []
    assert f.pending == 100
    frames = f.push(data[100:500])
    assert [len(x) for x in frames] == [160, 160, 160]
    assert f.pending == 20
    frames += f.push(data[500:])
    assert len(frames) == 4 and f.pending == 128
    last = f.flush()
    assert last is not None and len(last) == FRAME_BYTES
    assert b"".join(frames) + last == data + ULAW_SILENCE * 32
    assert f.pending == 0
    assert f.flush() is None


def test_framer_exact_frames_leave_nothing() -> None:
    f = Framer()
    assert f.push(ULAW_SILENCE * 320) == [ULAW_SILENCE * 160] * 2
    assert f.pending == 0
    assert f.flush() is None
    assert f.push(b"") == []


def test_framer_clear_drops_the_remainder() -> None:
    f = Framer()
    f.push(b"\x01" * 170)
    f.clear()
    assert f.pending == 0
    assert f.flush() is None
    assert f.push(b"\x02" * 160) == [b"\x02" * 160]


# ----------------------------------------------------------------------------------------------- timing


def test_model_bytes_to_ms() -> None:
    assert model_bytes_to_ms(4800, AudioPath.PCM16) == 100.0
    assert model_bytes_to_ms(800, AudioPath.G711_ULAW) == 100.0
    assert model_bytes_to_ms(48, AudioPath.PCM16) == 1.0
    assert model_bytes_to_ms(0, AudioPath.G711_ULAW) == 0.0


# ------------------------------------------------------------------------------------------ WAV files


def sine(freq: float, rate: int, seconds: float, amplitude: float) -> Float:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(round(rate * seconds)) / rate)


def spectrum(ulaw: bytes) -> tuple[Float, Float]:
    """Frequencies and amplitudes (in PCM16 units) of decoded μ-law at 8 kHz, Hann-windowed."""
    x = samples(ulaw_to_pcm16(ulaw)).astype(np.float64)
    window = np.hanning(len(x))
    amplitude = 2 * np.abs(np.fft.rfft(x * window)) / window.sum()
    return np.fft.rfftfreq(len(x), 1 / 8000), amplitude


def peak(ulaw: bytes, near: float) -> tuple[float, float]:
    """The strongest frequency within 100 Hz of ``near`` and its amplitude."""
    freqs, amplitude = spectrum(ulaw)
    band = np.abs(freqs - near) <= 100
    i = int(np.argmax(np.where(band, amplitude, 0)))
    return float(freqs[i]), float(amplitude[i])


def test_wav_pcm16_stereo_at_16_khz_is_mixed_down_and_resampled() -> None:
    left, right = sine(1000, 16000, 0.5, 12000), sine(2500, 16000, 0.5, 8000)
    ulaw = wav_to_ulaw(wav_file([left, right], 16000))
    assert len(ulaw) == 4000  # 0.5 s at 8 kHz
    for freq, level in ((1000, 6000), (2500, 4000)):  # each channel at half its level: the mean
        found, amplitude = peak(ulaw, freq)
        assert found == pytest.approx(freq, abs=2)
        assert 20 * np.log10(amplitude / level) == pytest.approx(0, abs=0.5)


def test_wav_at_44_1_khz_keeps_the_tone_and_drops_what_the_phone_cannot_carry() -> None:
    tone = sine(440, 44100, 1.0, 10000) + sine(6000, 44100, 1.0, 10000)  # 6 kHz: above 4 kHz Nyquist
    ulaw = wav_to_ulaw(wav_file([tone], 44100))
    assert len(ulaw) == 8000
    found, amplitude = peak(ulaw, 440)
    assert found == pytest.approx(440, abs=2)
    assert 20 * np.log10(amplitude / 10000) == pytest.approx(0, abs=0.5)
    freqs, spec = spectrum(ulaw)
    assert spec[np.abs(freqs - 2000) <= 50].max() < 100  # 6 kHz would alias to 2 kHz: filtered out


def test_a_mulaw_wav_at_8_khz_mono_is_its_data_as_is() -> None:
    """Twilio's own recordings: WAVE format tag 7, which Python's ``wave`` refuses."""
    tone = sine(1000, 8000, 0.25, 8000)
    wav = wav_file([tone], 8000, encoding="ulaw")
    assert wav_to_ulaw(wav) == pcm16_to_ulaw(pcm(tone))
    stereo = wav_to_ulaw(wav_file([tone, tone], 8000, encoding="ulaw"))
    assert stereo == pcm16_to_ulaw(pcm(tone))  # a mean of equal channels changes nothing


def test_an_alaw_wav_is_decoded() -> None:
    ulaw = wav_to_ulaw(wav_file([sine(1000, 8000, 0.5, 8000)], 8000, encoding="alaw"))
    assert len(ulaw) == 4000
    found, amplitude = peak(ulaw, 1000)
    assert found == pytest.approx(1000, abs=2)
    assert 20 * np.log10(amplitude / 8000) == pytest.approx(0, abs=0.5)


def test_extensible_wav_odd_chunks_and_an_unset_data_size() -> None:
    tone = sine(1000, 16000, 0.1, 8000)
    odd = b"LIST" + (3).to_bytes(4, "little") + b"abc" + b"\x00"  # an odd chunk and its pad byte
    wav = wav_file([tone], 16000, extensible=True, before_data=odd)
    expected = wav_to_ulaw(wav_file([tone], 16000))
    assert len(expected) == 800
    assert wav_to_ulaw(wav) == expected
    mulaw = wav_file([tone], 8000, encoding="ulaw", extensible=True)
    assert wav_to_ulaw(mulaw) == wav_to_ulaw(wav_file([tone], 8000, encoding="ulaw"))
    streamed = bytearray(wav_file([tone], 16000))  # a writer that never went back to set the sizes
    streamed[40:44] = b"\xff\xff\xff\xff"
    assert wav_to_ulaw(bytes(streamed)) == expected


def with_format(wav: bytes, tag: int, bits: int) -> bytes:
    """``wav`` with its fmt chunk's format tag and bits per sample changed (the data left alone)."""
    out = bytearray(wav)
    out[20:22] = tag.to_bytes(2, "little")
    out[34:36] = bits.to_bytes(2, "little")
    return bytes(out)


@pytest.mark.parametrize(
    ("tag", "bits", "named"),
    [
        (1, 24, "24-bit PCM"),
        (1, 8, "8-bit PCM"),
        (3, 32, "32-bit float"),
        (2, 4, "MS ADPCM"),
        (0x1234, 8, "format tag 0x1234"),
    ],
)
def test_unsupported_wav_formats_are_named_with_the_sox_fix(tag: int, bits: int, named: str) -> None:
    wav = with_format(wav_file([sine(1000, 8000, 0.1, 8000)], 8000), tag, bits)
    with pytest.raises(MalformedMessage) as info:
        wav_to_ulaw(wav)
    assert named in info.value.reason and "not supported" in info.value.reason
    assert "sox in.wav -r 8000 -c 1 -e signed-integer -b 16 out.wav" in info.value.reason


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\xff" * 100, "not a WAV file"),
        (b"RIFF\x04\x00\x00\x00WAVE", "no complete fmt chunk"),
        (
            b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00"
            + struct.pack("<HHIIHH", 1, 0, 0, 0, 0, 16)
            + b"data\x00\x00\x00\x00",
            "0 channels at 0 Hz",
        ),
    ],
)
def test_broken_wav_files_are_a_clear_error(data: bytes, fragment: str) -> None:
    with pytest.raises(MalformedMessage, match=fragment):
        wav_to_ulaw(data)
    no_data = wav_file([sine(1000, 8000, 0.1, 8000)], 8000)[:36]
    with pytest.raises(MalformedMessage, match="no data chunk"):
        wav_to_ulaw(no_data)

"""The audio front-end: scipy and kaldi parity, streaming = offline, loading and resampling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile
import torch
import torchaudio

from avloc.core.audio import (
    FrontEnd,
    FrontEndConfig,
    StreamingFrontEnd,
    crop_window,
    load_audio,
    periodic_tukey,
    resample,
)
from avloc.core.errors import DataError, UserError

STAMPS = Path("/usr/share/tuxpaint/stamps")


def scipy_reference(wave: np.ndarray) -> np.ndarray:
    """The SSL-Align/LVS dataloader's spectrogram, verbatim (float64 as soundfile returns)."""
    _, _, spec = scipy.signal.spectrogram(wave.astype(np.float64), 16000, nperseg=512, noverlap=353)
    return np.log(spec + 1e-7) / 12.0


def real_recording() -> np.ndarray | None:
    sounds = sorted(p for p in STAMPS.glob("animals/**/*.ogg") if "_desc" not in p.name)
    return load_audio(sounds[0]) if sounds else None


@pytest.mark.parametrize("n", [512, 511, 8])
@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.99])
def test_periodic_tukey_is_scipys(n: int, alpha: float) -> None:
    assert np.array_equal(periodic_tukey(n, alpha), scipy.signal.windows.tukey(n, alpha, sym=False))


def test_a_linear_front_end_does_not_import_scipy_signal() -> None:
    """scipy.signal's import (~1.5 s) would delay a replay the launcher lets go, and every capture's start."""
    code = (
        "import sys; from avloc.core.audio import FrontEnd, FrontEndConfig; FrontEnd(FrontEndConfig(kind='linear'));"
        "print('scipy.signal' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


@pytest.mark.parametrize("amplitude", [1.0, 0.05, 1e-4])
def test_linear_matches_scipy_on_random_audio(amplitude: float) -> None:
    rng = np.random.default_rng(int(amplitude * 1000))
    # A DC offset makes scipy's per-segment mean removal (detrend="constant") matter.
    wave = (amplitude * (rng.uniform(-1, 1, 48000) + 0.3)).astype(np.float32)
    out = FrontEnd(FrontEndConfig()).compute(wave)
    ref = scipy_reference(wave)
    assert out.shape == (1, 257, 299) == FrontEndConfig().output_shape()
    assert np.abs(out[0] - ref).max() < 1e-4


def test_linear_matches_scipy_on_real_audio() -> None:
    wave = real_recording()
    if wave is None:
        pytest.skip("tuxpaint-stamps-default not installed")
    window = crop_window(wave, 48000)
    out = FrontEnd(FrontEndConfig()).compute(window)
    assert np.abs(out[0] - scipy_reference(window)).max() < 1e-4


def test_linear_batch_and_longer_input() -> None:
    rng = np.random.default_rng(1)
    waves = rng.uniform(-1, 1, (3, 48000 + 159 * 4)).astype(np.float32)
    out = FrontEnd(FrontEndConfig()).compute(waves)
    assert out.shape == (3, 1, 257, 303)
    for b in range(3):
        assert np.abs(out[b, 0] - scipy_reference(waves[b])).max() < 1e-4


def test_fbank_matches_kaldi_and_shape() -> None:
    import torchaudio.compliance.kaldi as kaldi

    config = FrontEndConfig(kind="fbank", window_seconds=10.0)
    assert config.output_shape() == (1, 998, 128)
    rng = np.random.default_rng(2)
    waves = rng.uniform(-0.5, 0.5, (2, config.num_samples)).astype(np.float32)
    out = FrontEnd(config)(torch.from_numpy(waves))
    assert out.shape == (2, 1, 998, 128)
    for b in range(2):
        direct = kaldi.fbank(
            torch.from_numpy(waves[b : b + 1]) * 2**15,
            num_mel_bins=128,
            frame_length=25,
            frame_shift=10,
            sample_frequency=16000,
        )
        torch.testing.assert_close(out[b, 0], (direct - 15.41663) / (2 * 6.55582))


def test_mel_peaks_at_tone_frequency() -> None:
    config = FrontEndConfig(kind="mel", window_seconds=1.0, n_mels=64)
    t = np.arange(config.num_samples) / 16000
    wave = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    out = FrontEnd(config).compute(wave)
    assert out.shape == config.output_shape() == (1, 64, 101)
    fbanks = torchaudio.functional.melscale_fbanks(257, 0.0, 8000.0, 64, 16000)  # [freq, mel]
    expected_bin = int(fbanks[round(1000 / 16000 * 512)].argmax())  # the filter weighting 1 kHz most
    assert int(np.median(out[0].argmax(axis=0))) == expected_bin
    # log(x + 1e-6) floor: digital silence maps to log(1e-6).
    silent = FrontEnd(config).compute(np.zeros(config.num_samples, np.float32))
    np.testing.assert_allclose(silent, np.log(1e-6), rtol=1e-5)


@pytest.mark.parametrize(
    "config,hop",
    [
        (FrontEndConfig(kind="linear", window_seconds=1.0), 159 * 10),
        (FrontEndConfig(kind="mel", window_seconds=0.5), 800),
        (FrontEndConfig(kind="fbank", window_seconds=1.0), 1600),
    ],
)
def test_streaming_equals_offline(config: FrontEndConfig, hop: int) -> None:
    rng = np.random.default_rng(3)
    total = config.num_samples + 7 * hop + 123
    wave = rng.uniform(-1, 1, total).astype(np.float32)
    streaming = StreamingFrontEnd(config, hop_samples=hop)
    results: list[tuple[int, np.ndarray]] = []
    pos = 0
    while pos < total:  # random block sizes: tiny, around the hop, and larger than the window
        size = int(rng.choice([1, 37, hop - 1, hop + 5, config.num_samples + 11]))
        results += streaming.push(wave[pos : pos + size])
        pos += size
    ends = [end for end, _ in results]
    assert ends == list(range(config.num_samples, total + 1, hop))
    offline = FrontEnd(config)
    for end, spec in results:
        assert spec.shape == config.output_shape()
        expected = offline.compute(wave[end - config.num_samples : end])
        np.testing.assert_array_equal(spec, expected)
    if config.kind == "linear":
        # Windows starting on the 159-sample frame grid are exactly columns of the whole-clip spectrogram.
        whole = offline.compute(wave)[0]
        frames = config.output_shape()[2]
        for end, spec in results:
            first = (end - config.num_samples) // 159
            np.testing.assert_allclose(spec[0], whole[:, first : first + frames], atol=1e-6)


def test_streaming_stereo_blocks_and_reset() -> None:
    config = FrontEndConfig(kind="mel", window_seconds=0.25)
    stereo = np.random.default_rng(4).uniform(-1, 1, (config.num_samples, 2)).astype(np.float32)
    streaming = StreamingFrontEnd(config, hop_samples=1000)
    ((end, spec),) = streaming.push(stereo)
    assert end == config.num_samples
    np.testing.assert_array_equal(spec, FrontEnd(config).compute(stereo.mean(axis=1)))
    streaming.reset()
    assert streaming.push(stereo[:100]) == []


def test_crop_window_tiles_pads_and_centres() -> None:
    wave = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(crop_window(wave, 12), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    np.testing.assert_array_equal(crop_window(wave, 7, pad="zero"), [0, 1, 2, 3, 4, 0, 0])
    long = np.arange(100, dtype=np.float32)
    np.testing.assert_array_equal(crop_window(long, 10), np.arange(10))
    np.testing.assert_array_equal(crop_window(long, 10, center=50), np.arange(45, 55))
    np.testing.assert_array_equal(crop_window(long, 10, start=95), np.arange(90, 100))  # clamped
    np.testing.assert_array_equal(crop_window(long, 10, center=2), np.arange(10))


@pytest.mark.parametrize("fmt", ["wav", "ogg", "flac"])
def test_load_audio_resamples_stereo_to_16k_mono(tmp_path: Path, fmt: str) -> None:
    sr, seconds = 44100, 0.5
    t = np.arange(int(sr * seconds)) / sr
    left = 0.6 * np.sin(2 * np.pi * 440 * t)
    right = 0.2 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / f"tone.{fmt}"
    soundfile.write(path, np.stack([left, right], axis=1), sr)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - round(len(t) * 16000 / sr)) <= 1
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440) < 4
    # Channels are averaged: the mean of 0.6 and 0.2 amplitude sines is a 0.4 sine (lossy codecs: loosely).
    peak = np.abs(wave[len(wave) // 4 : -len(wave) // 4]).max()
    assert abs(peak - 0.4) < (0.01 if fmt != "ogg" else 0.05)


def test_resample_identity_and_length() -> None:
    wave = np.random.default_rng(5).uniform(-1, 1, 4410).astype(np.float32)
    assert resample(wave, 16000, 16000) is not None
    np.testing.assert_array_equal(resample(wave, 16000, 16000), wave)
    assert resample(wave, 44100, 16000).shape == (1600,)


def test_load_audio_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.wav: audio file not found"):
        load_audio(tmp_path / "missing.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all" * 10)
    with pytest.raises(DataError, match="junk.wav: unreadable audio"):
        load_audio(junk)
    full = tmp_path / "full.wav"
    soundfile.write(full, np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[:12000])
    with pytest.raises(DataError, match="cut.wav: truncated"):
        load_audio(cut)


def test_config_round_trip_and_validation() -> None:
    config = FrontEndConfig(kind="mel", window_seconds=2.0, n_mels=80)
    assert FrontEndConfig.from_dict(config.to_dict()) == config
    assert config.num_samples == 32000
    with pytest.raises(UserError, match="kind"):
        FrontEndConfig.from_dict({"kind": "cqt"})
    with pytest.raises(UserError, match="unknown key"):
        FrontEndConfig.from_dict({"hop": 3})
    with pytest.raises(UserError, match="16000"):
        FrontEndConfig(kind="linear", sample_rate=22050)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,seconds", [("linear", 3.0), ("mel", 1.0), ("fbank", 2.0)])
def test_frontend_on_cuda_matches_cpu(kind: str, seconds: float) -> None:
    config = FrontEndConfig(kind=kind, window_seconds=seconds)
    rng = np.random.default_rng(6)
    waves = torch.from_numpy(rng.uniform(-1, 1, (2, config.num_samples)).astype(np.float32))
    frontend = FrontEnd(config)
    expected = frontend(waves)
    torch.testing.assert_close(frontend.cuda()(waves.cuda()).cpu(), expected, atol=1e-4, rtol=1e-4)


def test_frame_window_ends_at_or_centres_on_the_frame():
    from avloc.core.audio import FrontEndConfig, frame_window

    wave = np.arange(48000, dtype=np.float32)  # 3 s at 16 kHz
    end = FrontEndConfig(kind="mel", window_seconds=1.0)
    centre = FrontEndConfig(kind="mel", window_seconds=1.0, anchor="center")
    np.testing.assert_array_equal(frame_window(wave, end), wave[8000:24000])  # ends at the clip's centre
    np.testing.assert_array_equal(frame_window(wave, centre), wave[16000:32000])
    np.testing.assert_array_equal(frame_window(wave, end, 40000), wave[24000:40000])
    np.testing.assert_array_equal(frame_window(wave, centre, 47000), wave[32000:48000])  # clamped inside
    np.testing.assert_array_equal(frame_window(wave, end, 5000), wave[:16000])
    with pytest.raises(UserError, match="anchor"):
        FrontEndConfig(anchor="start")


def _tone_mix(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.4 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)
    return np.clip(wave, -1, 1).astype(np.float32)


@pytest.mark.parametrize("kind", ["mel", "yamnet", "linear"])
def test_level_window_rms_cancels_gain(kind: str) -> None:
    """level: window_rms -- the spectrogram of a clip at -30 dB equals the 0 dB one (the gain cancels); the
    raw front-end (the old behaviour) moves by the gain in log space."""
    wave = _tone_mix()
    quiet = wave * np.float32(10 ** (-30 / 20))
    norm = FrontEnd(FrontEndConfig(kind=kind, level="window_rms"))
    raw = FrontEnd(FrontEndConfig(kind=kind))
    a, b = norm.compute(wave), norm.compute(quiet)
    np.testing.assert_allclose(b, a, atol=2e-3 if kind == "linear" else 1e-4)
    assert np.abs(raw.compute(wave) - raw.compute(quiet)).mean() > 0.1


def test_level_window_rms_leaves_silence_quiet() -> None:
    """Near-silence is not blown up to a full-level window (the gain is capped), and digital silence stays
    the front-end's floor: the silence gate sees a silent window as silent."""
    from avloc.core.audio import LEVEL_MAX_GAIN, LEVEL_TARGET_RMS

    fe = FrontEnd(FrontEndConfig(kind="yamnet", level="window_rms"))
    hiss = (1e-6 * np.random.default_rng(1).standard_normal(48000)).astype(np.float32)
    scaled = fe.level_normalize(torch.from_numpy(hiss)[None])
    rms = float(scaled.pow(2).mean().sqrt())
    assert rms == pytest.approx(1e-6 * LEVEL_MAX_GAIN, rel=0.05) and rms < LEVEL_TARGET_RMS / 100
    zeros = np.zeros(48000, np.float32)
    np.testing.assert_array_equal(fe.compute(zeros), FrontEnd(FrontEndConfig(kind="yamnet")).compute(zeros))
    loud = fe.compute(_tone_mix())
    assert fe.compute(hiss).mean() < loud.mean() - 3  # far below a sounding window in log-mel


def test_level_streaming_matches_offline_at_any_gain() -> None:
    """The live path (StreamingFrontEnd, microphone / replay) runs the same level normalization."""
    cfg = FrontEndConfig(kind="mel", window_seconds=1.0, level="window_rms")
    wave = _tone_mix(2.0) * np.float32(0.03)
    stream = StreamingFrontEnd(cfg, hop_samples=4000)
    got = [spec for block in np.array_split(wave, 7) for _, spec in stream.push(block)]
    offline = FrontEnd(cfg)
    ends = [16000 + 4000 * k for k in range(len(got))]
    for end, spec in zip(ends, got):
        np.testing.assert_allclose(spec, offline.compute(wave[end - 16000 : end] / 0.03), atol=1e-4)


def test_level_config_validated() -> None:
    with pytest.raises(UserError, match="front-end level 'loud'"):
        FrontEndConfig(level="loud")
    assert FrontEndConfig(kind="yamnet").output_shape() == (1, 64, 297)

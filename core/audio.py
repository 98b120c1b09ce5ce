"""The one audio front-end: loading, resampling, fixed windows and spectrograms (training, capture, export).

Three spectrogram kinds, all computed in torch:

- ``linear``: the SSL-Align / LVS reference, ``scipy.signal.spectrogram(x, 16000, nperseg=512,
  noverlap=353)`` (Tukey(0.25) periodic window, constant detrend per segment, density scaling, one-sided),
  then ``log(S + 1e-7) / 12``: 3 s -> 1x257x299.
- ``mel``: log-mel (``torchaudio.transforms.MelSpectrogram``), ``log(M + 1e-6)``, for live use.
- ``fbank``: ACL, ``torchaudio.compliance.kaldi.fbank`` of ``wave * 2**15`` (128 bins, 25/10 ms),
  normalized ``(fbank - 15.41663) / (2 * 6.55582)``: 10 s -> 1x998x128 (time-major).
- ``yamnet``: YAMNet's own log-mel (AudioSet; ``avloc.core.pretrained``): 25 ms periodic-Hann STFT magnitude,
  64 HTK mel bands 125-7500 Hz, ``log(mel + 0.001)``, no centre padding: 3 s -> 1x64x297.

``level: window_rms`` (any kind) makes the front-end insensitive to the input level: each window is scaled to
an RMS of ``LEVEL_TARGET_RMS`` before the spectrogram (a gain cancels exactly), the gain capped at
``LEVEL_MAX_GAIN`` so that near-silence (quieter than ``LEVEL_TARGET_RMS / LEVEL_MAX_GAIN``) is not blown up
to a full-level noise: the silence gate still sees a silent window as silent. ``raw`` (the default) leaves
the level alone.

The config is stored with every checkpoint and engine so live capture computes what the model was trained on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchaudio

from avloc.core.config import from_dict as _config_from_dict
from avloc.core.config import to_dict as _config_to_dict
from avloc.core.errors import DataError, UserError

SOUNDFILE_SUFFIXES = (".wav", ".ogg", ".flac", ".oga")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4a")

# Reference constants (SSL-Align/LVS dataloader; ACL's BEATs front-end).
_LINEAR_NPERSEG = 512
_LINEAR_NOVERLAP = 353
_LINEAR_HOP = _LINEAR_NPERSEG - _LINEAR_NOVERLAP  # 159
_LINEAR_EPS = 1e-7
_LINEAR_SCALE = 12.0
_MEL_EPS = 1e-6
_FBANK_BINS = 128
_YAMNET_EPS = 1e-3
LEVEL_TARGET_RMS = 0.1  # about the RMS of a clip peaking at 0.3-0.9, the level training clips have
LEVEL_MAX_GAIN = 10 ** (50 / 20)  # +50 dB: a -30 dB (or -40 dB) microphone is normalized fully, silence is not
_FBANK_MEAN = 15.41663
_FBANK_STD = 6.55582


@dataclass(frozen=True)
class FrontEndConfig:
    """Which spectrogram a model consumes; serialized into checkpoints and engine manifests."""

    kind: Literal["linear", "mel", "fbank", "yamnet"] = "linear"
    sample_rate: int = 16000
    window_seconds: float = 3.0  # linear: 3 s -> 1x257x299; fbank: 10 s -> 1x998x128
    n_mels: int = 64  # mel only
    mel_n_fft: int = 512
    mel_win_length: int = 400  # 25 ms
    mel_hop_length: int = 160  # 10 ms
    # Where the window sits relative to its frame's time: "end" = the window ends at the frame (what a live
    # capture can do: only past audio exists), "center" = centred on it (the papers' loaders). One
    # definition for training, evaluation, export and the inference worker (see frame_window).
    anchor: Literal["end", "center"] = "end"
    # "window_rms": each window scaled to LEVEL_TARGET_RMS before the spectrogram (see the module doc)
    level: Literal["raw", "window_rms"] = "raw"

    def __post_init__(self) -> None:
        if self.level not in ("raw", "window_rms"):
            raise UserError(f"front-end level {self.level!r}: expected one of raw, window_rms")
        if self.anchor not in ("end", "center"):
            raise UserError(f"front-end anchor {self.anchor!r}: expected one of end, center")
        if self.kind not in ("linear", "mel", "fbank", "yamnet"):
            raise UserError(f"front-end kind {self.kind!r}: expected one of linear, mel, fbank, yamnet")
        if self.sample_rate <= 0 or self.window_seconds <= 0:
            raise UserError(
                f"front-end sample_rate={self.sample_rate}, window_seconds={self.window_seconds}: must be > 0"
            )
        if self.kind in ("linear", "fbank", "yamnet") and self.sample_rate != 16000:
            raise UserError(f"front-end kind {self.kind!r} is defined at 16000 Hz, got sample_rate={self.sample_rate}")
        if self.kind == "mel" and not (0 < self.mel_win_length <= self.mel_n_fft and self.mel_hop_length > 0):
            raise UserError(
                f"front-end mel: need 0 < mel_win_length ({self.mel_win_length})"
                f" <= mel_n_fft ({self.mel_n_fft}) and mel_hop_length ({self.mel_hop_length}) > 0"
            )
        min_samples = {"linear": _LINEAR_NPERSEG, "mel": 1, "fbank": 400, "yamnet": 512 + 160 * 95}[self.kind]
        if self.num_samples < min_samples:
            raise UserError(
                f"front-end window_seconds={self.window_seconds}: shorter than one {self.kind} frame "
                f"({min_samples} samples)"
            )

    @property
    def num_samples(self) -> int:
        """Samples in one window."""
        return int(round(self.window_seconds * self.sample_rate))

    @property
    def pad_mode(self) -> Literal["tile", "zero"]:
        """How a clip shorter than the window is filled: SSL-Align tiles it, ACL pads with zeros."""
        return "zero" if self.kind == "fbank" else "tile"

    def output_shape(self) -> tuple[int, int, int]:
        """(1, F, T) of one window's spectrogram (fbank is time-major: (1, T, 128))."""
        n = self.num_samples
        if self.kind == "linear":
            return (1, _LINEAR_NPERSEG // 2 + 1, (n - _LINEAR_NPERSEG) // _LINEAR_HOP + 1)
        if self.kind == "mel":
            return (1, self.n_mels, n // self.mel_hop_length + 1)  # center=True framing
        if self.kind == "yamnet":
            return (1, 64, (n - 512) // 160 + 1)  # center=False framing
        frame, shift = 400, 160  # 25 ms / 10 ms at 16 kHz, snip_edges=True
        return (1, (n - frame) // shift + 1, _FBANK_BINS)

    def to_dict(self) -> dict[str, Any]:
        return _config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "frontend") -> FrontEndConfig:
        return _config_from_dict(cls, data, where)


# ---------------------------------------------------------------------------------------------- waveforms


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample along the last axis with ``torchaudio.functional.resample`` (windowed sinc); float32 out."""
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == new_sr:
        return wave
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    out = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(wave)), orig_sr, new_sr)
    return out.numpy().astype(np.float32, copy=False)


def to_mono(wave: np.ndarray) -> np.ndarray:
    """[N] or [N, C] (soundfile layout) -> [N] float32, averaging channels."""
    wave = np.asarray(wave, dtype=np.float32)
    return wave.mean(axis=1) if wave.ndim == 2 else wave


def read_audio_file(path: str | Path) -> tuple[np.ndarray, int]:
    """Read wav/ogg/flac with soundfile at its own rate: ``(float32 mono, sample_rate)``.

    DataError when the file is missing, not decodable, empty, or a WAV whose data chunk is cut short.
    """
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "audio file not found")
    try:
        info = soundfile.info(str(path))
        data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:  # libsndfile reports corrupt/unknown files here
        raise DataError(path, f"unreadable audio ({_one_line(err)})") from None
    # libsndfile reads a cut-short WAV without error; its header report says "data : N (should be M)".
    cut = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", info.extra_info or "", re.MULTILINE)
    if cut and int(cut.group(2)) < int(cut.group(1)):
        raise DataError(path, f"truncated: header declares {cut.group(1)} data bytes, file holds {cut.group(2)}")
    if data.shape[0] == 0:
        raise DataError(path, "audio file holds no samples")
    return to_mono(data), int(sr)


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Read wav/ogg/flac (soundfile) or a video's audio track (PyAV): float32 mono in [-1, 1], resampled."""
    path = Path(path)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        from avloc.core.media import read_video_audio

        return read_video_audio(path, sample_rate)
    wave, sr = read_audio_file(path)
    # The reference loaders clip to [-1, 1] (resampling can overshoot slightly).
    return np.clip(resample(wave, sr, sample_rate), -1.0, 1.0)


def frame_window(wave: np.ndarray, config: FrontEndConfig, frame_sample: int | None = None) -> np.ndarray:
    """The window paired with the frame at sample ``frame_sample`` of ``wave`` (default: the clip's centre,
    where a dataset's still frame is taken): ending there (``anchor: end``) or centred on it (``center``),
    clamped inside the clip; tiled / zero-padded when the clip is shorter than the window."""
    n = config.num_samples
    t = wave.shape[-1] // 2 if frame_sample is None else int(frame_sample)
    start = t - n if config.anchor == "end" else t - n // 2
    return crop_window(wave, n, start=start, pad=config.pad_mode)


def crop_window(
    wave: np.ndarray,
    num_samples: int,
    start: int | None = None,
    center: int | None = None,
    pad: Literal["tile", "zero"] = "tile",
) -> np.ndarray:
    """Exactly ``num_samples`` samples of ``wave``.

    A clip shorter than the window is tiled (``np.tile`` as the SSL-Align/LVS loaders do) or, with
    ``pad="zero"``, zero-padded at the end (ACL). Otherwise the window starts at ``start``, or is centred on
    ``center``, clamped inside the clip; with neither, it starts at 0 as the reference does.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    n = wave.shape[-1]
    if n == 0:
        raise ValueError("cannot take a window of an empty waveform")
    if n < num_samples:
        if pad == "zero":
            out = np.zeros(wave.shape[:-1] + (num_samples,), dtype=np.float32)
            out[..., :n] = wave
            return out
        reps = -(-num_samples // n)
        return np.tile(wave, reps)[..., :num_samples].copy()
    if start is None:
        start = 0 if center is None else center - num_samples // 2
    start = min(max(int(start), 0), n - num_samples)
    return wave[..., start : start + num_samples].copy()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or err.__class__.__name__


# ---------------------------------------------------------------------------------------------- spectrograms


def yamnet_melspectrogram() -> torchaudio.transforms.MelSpectrogram:
    """YAMNet's mel filterbank (16 kHz, 25 ms window in a 512-point STFT, 10 ms hop, 64 HTK bands 125-7500 Hz,
    magnitude): the one definition for the ``yamnet`` front-end and the YAMNet feature extractor."""
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=16000,
        n_fft=512,
        win_length=400,
        hop_length=160,
        f_min=125.0,
        f_max=7500.0,
        n_mels=64,
        power=1.0,
        center=False,
        mel_scale="htk",
        norm=None,
    )


def periodic_tukey(n: int, alpha: float) -> np.ndarray:
    """``scipy.signal.windows.tukey(n, alpha, sym=False)`` (0 < alpha < 1), the same float64 operations, without
    importing scipy.signal: that import takes ~1.5 s, which a replay would pay after the launcher lets it go (its
    other imports overlap the engine's loading) and every capture process at start."""
    if not 0 < alpha < 1:
        raise ValueError(f"periodic_tukey: alpha must be in (0, 1), got {alpha}")
    m = n + 1  # periodic: the symmetric window of n + 1 points without its last
    k = np.arange(0, m, dtype=np.float64)
    width = int(math.floor(alpha * (m - 1) / 2.0))
    head = 0.5 * (1 + np.cos(np.pi * (-1 + 2.0 * k[: width + 1] / alpha / (m - 1))))
    tail = 0.5 * (1 + np.cos(np.pi * (-2.0 / alpha + 1 + 2.0 * k[m - width - 1 :] / alpha / (m - 1))))
    return np.concatenate((head, np.ones(m - 2 * (width + 1)), tail))[:-1]


class FrontEnd(torch.nn.Module):
    """Waveform batch [B, N] (float32, 16 kHz, [-1, 1]) -> spectrogram batch [B, 1, F, T].

    ``N`` is normally ``config.num_samples``; any length of at least one frame works (whole clips too).
    """

    def __init__(self, config: FrontEndConfig) -> None:
        super().__init__()
        self.config = config
        if config.kind == "linear":
            # scipy.signal.get_window(("tukey", 0.25), 512) is the periodic (sym=False) window.
            window = torch.from_numpy(periodic_tukey(_LINEAR_NPERSEG, 0.25))
            self.register_buffer("window", window.to(torch.float64), persistent=False)
            # Density scaling: |X|^2 / (fs * sum(w^2)), every bin but DC and Nyquist doubled (one-sided).
            density = 2.0 / (config.sample_rate * float((window**2).sum()))
            scale = torch.full((_LINEAR_NPERSEG // 2 + 1,), density)
            scale[0] /= 2
            scale[-1] /= 2
            self.register_buffer("psd_scale", scale.to(torch.float64), persistent=False)
            # DFT of the window: removing a segment's mean m from X is X - m * W (scipy detrend="constant").
            self.register_buffer("window_dft", torch.fft.rfft(window), persistent=False)
        elif config.kind == "mel":
            self.mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=config.sample_rate,
                n_fft=config.mel_n_fft,
                win_length=config.mel_win_length,
                hop_length=config.mel_hop_length,
                n_mels=config.n_mels,
            )
        elif config.kind == "yamnet":
            self.mel = yamnet_melspectrogram()

    def level_normalize(self, wave: torch.Tensor) -> torch.Tensor:
        """``level: window_rms``: each window [B, N] scaled to LEVEL_TARGET_RMS (gain capped); else as is."""
        if self.config.level == "raw":
            return wave
        rms = wave.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
        return wave * (LEVEL_TARGET_RMS / rms.clamp_min(LEVEL_TARGET_RMS / LEVEL_MAX_GAIN)).to(wave.dtype)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.ndim != 2:
            raise ValueError(f"FrontEnd expects a waveform batch [B, N], got shape {tuple(wave.shape)}")
        wave = self.level_normalize(wave)
        if self.config.kind == "yamnet":
            return torch.log(self.mel(wave.float()) + _YAMNET_EPS).unsqueeze(1)
        if self.config.kind == "linear":
            return self._linear(wave)
        if self.config.kind == "mel":
            return torch.log(self.mel(wave.float()) + _MEL_EPS).unsqueeze(1)
        return self._fbank(wave)

    def _linear(self, wave: torch.Tensor) -> torch.Tensor:
        # float64 inside: log(S + 1e-7) amplifies errors of tiny bins and the batch is only 299x512.
        x = wave.to(torch.float64)
        spec = torch.stft(
            x,
            n_fft=_LINEAR_NPERSEG,
            hop_length=_LINEAR_HOP,
            window=self.window.double(),
            center=False,
            onesided=True,
            return_complex=True,
        )  # [B, 257, T]
        seg_mean = x.unfold(-1, _LINEAR_NPERSEG, _LINEAR_HOP).mean(-1)  # [B, T]
        spec = spec - seg_mean.unsqueeze(1) * self.window_dft.to(spec.dtype).unsqueeze(-1)
        power = (spec.real**2 + spec.imag**2) * self.psd_scale.double().unsqueeze(-1)
        out = torch.log(power + _LINEAR_EPS) / _LINEAR_SCALE
        return out.to(torch.float32).unsqueeze(1)

    def _fbank(self, wave: torch.Tensor) -> torch.Tensor:
        import torchaudio.compliance.kaldi as kaldi

        # kaldi.fbank takes one waveform [1, N]; loop over the batch.
        feats = [
            kaldi.fbank(
                w.unsqueeze(0).float() * 2**15,
                num_mel_bins=_FBANK_BINS,
                frame_length=25.0,
                frame_shift=10.0,
                sample_frequency=float(self.config.sample_rate),
            )
            for w in wave
        ]
        out = (torch.stack(feats) - _FBANK_MEAN) / (2 * _FBANK_STD)
        return out.unsqueeze(1)  # [B, 1, T, 128]

    @torch.no_grad()
    def compute(self, wave: np.ndarray) -> np.ndarray:
        """Numpy convenience: [N] -> [1, F, T] or [B, N] -> [B, 1, F, T], float32."""
        x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
        out = self(x.unsqueeze(0) if x.ndim == 1 else x).numpy()
        return out[0] if x.ndim == 1 else out


class StreamingFrontEnd:
    """Incremental front-end for live capture.

    Fed successive blocks of any size, it yields one window every ``hop_samples`` once ``num_samples`` are
    buffered; each window ends at the newest sample of its hop (causal) and is identical to ``FrontEnd`` run
    on the same samples. Samples live in a preallocated buffer compacted only when full.
    """

    def __init__(self, config: FrontEndConfig, hop_samples: int) -> None:
        if hop_samples <= 0:
            raise UserError(f"streaming front-end hop_samples={hop_samples}: must be > 0")
        self.config = config
        self.hop_samples = int(hop_samples)
        self.frontend = FrontEnd(config).eval()
        self._window = config.num_samples
        self._buffer = np.zeros(2 * self._window + self.hop_samples, dtype=np.float32)
        self._filled = 0  # valid samples at the start of _buffer
        self.total_samples = 0  # samples pushed since creation/reset
        self._next_end = self._window  # sample index (exclusive) at which the next window ends

    def reset(self) -> None:
        self._filled = 0
        self.total_samples = 0
        self._next_end = self._window

    def push(self, block: np.ndarray, keep: Callable[[int], bool] | None = None) -> list[tuple[int, np.ndarray]]:
        """Append a block ([N], or [N, C] averaged to mono); return ``[(end_sample_index, spec[1,F,T])]``.

        ``end_sample_index`` counts samples pushed so far: the window covers ``[end - num_samples, end)``.
        ``keep(end)`` False: that window is not computed nor returned (a throttled capture skips the
        spectrograms no one will embed; the windows that are kept are unchanged).
        """
        block = np.asarray(block, dtype=np.float32)
        if block.ndim == 2:
            block = to_mono(block)
        elif block.ndim != 1:
            raise ValueError(f"audio block must be [N] or [N, C], got shape {block.shape}")
        ends: list[int] = []
        windows: list[np.ndarray] = []
        pos = 0
        while pos < len(block):
            if self._filled == len(self._buffer):  # keep only the samples a future window can still need
                self._buffer[: self._window] = self._buffer[self._filled - self._window : self._filled]
                self._filled = self._window
            # Stop each piece at the next window end so every window is cut exactly there.
            room = len(self._buffer) - self._filled
            take = min(len(block) - pos, room, self._next_end - self.total_samples)
            self._buffer[self._filled : self._filled + take] = block[pos : pos + take]
            self._filled += take
            self.total_samples += take
            pos += take
            if self.total_samples == self._next_end:
                if keep is None or keep(self.total_samples):
                    windows.append(self._buffer[self._filled - self._window : self._filled].copy())
                    ends.append(self.total_samples)
                self._next_end += self.hop_samples
        if not windows:
            return []
        with torch.no_grad():
            specs = self.frontend(torch.from_numpy(np.stack(windows))).numpy()
        return [(end, spec) for end, spec in zip(ends, specs)]

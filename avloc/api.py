"""The Python API: where in this image is this sound coming from?

>>> loc = avloc.Localizer("engines/cpu")               # an engine folder (avloc export), or a checkpoint
>>> r = loc("frame.jpg", "sound.wav")                   # or (HxWx3 uint8 RGB array, samples, sample_rate)
>>> r.peak_px, r.confidence, r.visible, r.heatmap.shape  # heatmap at the frame's resolution, in [0, 1]

Every step is the live pipeline's own (no second implementation): the audio is made mono and resampled as
capture does (:func:`avloc.stream.capture.microphone.as_captured`; files are read with
:func:`avloc.core.audio.load_audio`), the window paired with a frame is :func:`avloc.core.audio.frame_window`
of the engine's front-end config, the spectrogram is :class:`avloc.core.audio.FrontEnd`, frames go through
:func:`avloc.engines.base.preprocess_frame`, the heatmap is encoded as the inference worker publishes it
(:func:`avloc.stream.serve.inference_worker.encode_heatmap`, float16 in [0, 1]), the peak is its
:func:`~avloc.stream.serve.inference_worker.peak_of` and ``visible`` is the engine's silence gate
(:func:`avloc.engines.gate.gate_threshold`).

One difference from a live run, on purpose: live audio after a frame does not exist yet, so the live worker
always takes the window ending at the frame and, at the start of a stream, pads with silence; here the
whole sound is known, so the window follows the front-end's ``anchor`` (``end``: ending at the frame, the
default; ``center``: centred on it, as such models were trained) and is clamped inside the clip.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avloc.core.errors import DataError, UserError

_MAX_CHANNELS = 16  # the channel axis of an [N, C] / [C, N] signal is the short one
_DEFAULT_BATCH = 16


@dataclass(frozen=True)
class Localization:
    """Where the sound is in one frame."""

    # [H, W] float32 in [0, 1] at the frame's resolution (the engine's range mapped, bilinear); an engine whose
    # image.fit is crop covers the centred part the model saw, 0 outside it
    heatmap: np.ndarray
    peak: tuple[float, float] | None  # (x, y) of the hottest point, 0..1 of the frame; None: in letterbox padding
    peak_px: tuple[int, int] | None  # the same peak in pixels of the frame
    confidence: float  # the engine's confidence (what the silence gate thresholds)
    visible: bool  # confidence >= the engine's gate (always True for an engine without a gate)
    notice: str | None  # "not_visible" when the gate says the source is silent or off-screen, else None
    feature_map: np.ndarray  # [h, w] the engine's map at feature resolution, as published (float16 in [0, 1])
    # the frame rectangle (x0, y0, x1, y1, 0..1) feature_map covers: None = the whole frame (image.fit stretch)
    map_box: tuple[float, float, float, float] | None = None


class Localizer:
    """An engine (folder from ``avloc export``) or a checkpoint (``RUN/best.pt``, run in PyTorch through the
    graphs the export would write), ready to localize sounds in frames; see the module docstring.

    ``backend``/``device``/``threads``/``options`` go to :func:`avloc.engines.base.load_engine`; ``gate=False``
    ignores the engine's silence gate (``visible`` is then always True).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        backend: str = "onnxruntime",
        device: str = "cpu",
        threads: int | None = None,
        gate: bool = True,
        **options: Any,
    ) -> None:
        from avloc.core.audio import FrontEnd, FrontEndConfig
        from avloc.engines.gate import gate_threshold
        from avloc.stream.serve.inference_worker import _normalizer

        path = Path(model)
        if path.is_dir():
            from avloc.engines.base import load_engine

            self.engine: Any = load_engine(path, backend=backend, device=device, threads=threads, **options)
            self.manifest: dict[str, Any] = self.engine.manifest
        elif path.is_file():
            self.engine, self.manifest = _checkpoint_engine(path)
        else:
            raise UserError(f"{path}: not found; expected an engine folder (avloc export) or a checkpoint (.pt)")
        self.source = path
        self.frontend_config = FrontEndConfig.from_dict(self.manifest["frontend"])
        self._frontend = FrontEnd(self.frontend_config).eval()
        self.range = _normalizer(self.manifest)
        self.gate = gate_threshold(self.manifest) if gate else None
        self.max_batch = int(getattr(self.engine, "max_batch", None) or _DEFAULT_BATCH)

    # --- audio ----------------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        """The rate the engine's front-end works at (any input rate is resampled to it)."""
        return self.frontend_config.sample_rate

    def load_audio(self, audio: str | Path | np.ndarray, sample_rate: int | None = None) -> np.ndarray:
        """A sound as the front-end takes it: mono float32 at :attr:`sample_rate`.

        ``audio``: a file (wav/ogg/flac, or a video's audio track) or samples: ``[N]``, ``[N, C]`` or ``[C, N]``
        (the channel axis is the short one), float in [-1, 1] or integers (scaled by their range), at
        ``sample_rate`` Hz; converted exactly as live capture converts what a microphone delivers.
        """
        if isinstance(audio, str | Path):
            from avloc.core.audio import load_audio

            try:
                return load_audio(audio, self.sample_rate)
            except DataError as err:
                raise UserError(str(err)) from None
        from avloc.stream.capture.microphone import as_captured

        if sample_rate is None:
            raise UserError("audio samples given without sample_rate: pass loc(frame, samples, sample_rate)")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
            raise UserError(f"sample_rate {sample_rate!r}: expected a positive number of samples per second")
        wave = np.asarray(audio)
        if wave.dtype.kind not in "fiu" or wave.size == 0:
            raise UserError(f"audio: expected a non-empty array of samples, got {wave.dtype} {wave.shape}")
        if wave.ndim == 2 and wave.shape[0] <= _MAX_CHANNELS < wave.shape[1]:
            wave = wave.T  # [C, N] (torchaudio layout) -> [N, C] (capture/soundfile layout)
        if wave.ndim not in (1, 2) or (wave.ndim == 2 and wave.shape[1] > _MAX_CHANNELS):
            raise UserError(f"audio shape {wave.shape}: expected [N], [N, C] or [C, N] with C <= {_MAX_CHANNELS}")
        if wave.dtype.kind == "f" and not np.isfinite(wave).all():
            raise UserError("audio: samples contain NaN or infinity")
        mono = as_captured(wave.reshape(len(wave), -1), int(sample_rate), self.sample_rate)
        if mono.size == 0:  # e.g. one sample at 48 kHz: nothing left at the front-end's rate
            raise UserError(
                f"audio: {len(wave)} sample(s) at {sample_rate} Hz is less than one sample at {self.sample_rate} Hz"
            )
        return mono

    def window(self, wave: np.ndarray, at: float | None = None) -> np.ndarray:
        """The front-end window paired with a frame at ``at`` seconds of ``wave`` (mono, :attr:`sample_rate`);
        ``None``: the clip's centre (where a dataset's still frame is taken)."""
        from avloc.core.audio import frame_window

        sample = None if at is None else int(round(float(at) * self.sample_rate))
        return frame_window(wave, self.frontend_config, sample)

    def embed(self, windows: np.ndarray) -> np.ndarray:
        """Audio embeddings ``[B, D]`` of front-end windows ``[B, N]`` (spectrogram, then the audio graph)."""
        import torch

        with torch.no_grad():
            specs = self._frontend(torch.from_numpy(np.ascontiguousarray(windows, np.float32))).numpy()
        out = [
            np.asarray(self.engine.embed_audio(specs[i : i + self.max_batch]), np.float32)
            for i in range(0, len(specs), self.max_batch)
        ]
        return np.concatenate(out)

    # --- frames ---------------------------------------------------------------------------------------
    def __call__(
        self,
        frame: str | Path | np.ndarray | Sequence[np.ndarray],
        audio: str | Path | np.ndarray,
        sample_rate: int | None = None,
        *,
        at: float | Sequence[float] | None = None,
        bgr: bool = False,
    ) -> Localization | list[Localization]:
        """Localize ``audio`` in ``frame``.

        ``frame``: an image file, an ``HxWx3`` uint8 array (RGB; ``bgr=True`` for OpenCV's order), or a batch
        (a list of such arrays or a ``BxHxWx3`` array) heard with the same sound: a list of results then.
        ``at``: the frame's time in the sound, seconds (one per frame for a batch); default the sound's centre.
        """
        batch = isinstance(frame, list | tuple) or (isinstance(frame, np.ndarray) and frame.ndim == 4)
        frames = [_read_frame(f, bgr) for f in frame] if batch else [_read_frame(frame, bgr)]
        if not frames:
            raise UserError("frames: empty batch")
        times = list(at) if isinstance(at, Sequence | np.ndarray) and not isinstance(at, str) else [at] * len(frames)
        if len(times) != len(frames):
            raise UserError(f"at: {len(times)} times for {len(frames)} frames")
        wave = self.load_audio(audio, sample_rate)
        _check_times(times, len(wave) / self.sample_rate)
        windows = np.stack([self.window(wave, t) for t in times])
        unique, index = np.unique(windows, axis=0, return_inverse=True)  # one embedding per distinct window
        embeddings = self.embed(unique)[np.asarray(index).reshape(-1)]
        results = self.localize(frames, embeddings)
        return results if batch else results[0]

    def localize(self, frames: Sequence[np.ndarray], embeddings: np.ndarray) -> list[Localization]:
        """BGR uint8 frames (any sizes) with their audio embeddings ``[B, D]`` -> one result per frame, run in
        batches of the engine's size."""
        from avloc.engines.base import preprocess_frame

        out: list[Localization] = []
        for start in range(0, len(frames), self.max_batch):
            chunk = frames[start : start + self.max_batch]
            images = np.stack([preprocess_frame(f, self.manifest) for f in chunk]).astype(np.float32, copy=False)
            emb = np.ascontiguousarray(embeddings[start : start + len(chunk)], np.float32)
            heatmaps, confidence = self.engine.localize(images, emb)
            heatmaps, confidence = np.asarray(heatmaps), np.asarray(confidence).reshape(-1)
            out += [self._result(f, h, float(c)) for f, h, c in zip(chunk, heatmaps, confidence)]
        return out

    def _result(self, frame: np.ndarray, heatmap: np.ndarray, confidence: float) -> Localization:
        from avloc.core.media import engine_frame_fit, map_on_frame
        from avloc.stream.serve.inference_worker import encode_heatmap, peak_of
        from avloc.stream.wire.protocol import NOTICE_NOT_VISIBLE

        confidence = confidence if np.isfinite(confidence) else 0.0  # as the worker publishes it
        visible = self.gate is None or confidence >= self.gate
        unit = encode_heatmap(heatmap, *self.range, "float16")
        h, w = frame.shape[:2]
        peak: tuple[float, float] | None = peak_of(heatmap)
        # a crop / letterbox engine (manifest image.fit) saw part of the frame, or the frame inside padding: its
        # map and peak go back onto the frame as the inference worker publishes them
        fit = engine_frame_fit(self.manifest.get("image"), frame.shape)
        if fit is not None:
            peak = fit.input_to_frame(*peak)  # None: in the letterbox padding
        on_frame, _ = map_on_frame(unit, (h, w), None if fit is None else fit.map_box)
        return Localization(
            heatmap=on_frame,
            peak=peak,
            peak_px=None if peak is None else (min(int(peak[0] * w), w - 1), min(int(peak[1] * h), h - 1)),
            confidence=confidence,
            visible=visible,
            notice=None if visible else NOTICE_NOT_VISIBLE,
            feature_map=unit,
            map_box=None if fit is None else fit.map_box,
        )

    # --- videos ---------------------------------------------------------------------------------------
    def video(
        self, path: str | Path, audio: str | Path | None = None, batch: int | None = None
    ) -> Iterator[tuple[float, np.ndarray, Localization]]:
        """``(pts seconds, BGR frame, result)`` for every frame of a video, each heard with the window
        :meth:`window` pairs with its time in the file's own audio track (or ``audio``, a separate file)."""
        import av

        from avloc.stream.capture.replay import TruncatedError, iter_bgr_frames

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: video file not found")
        wave = self.load_audio(audio if audio is not None else path)
        size = max(1, int(batch or self.max_batch))
        pending: list[tuple[float, np.ndarray]] = []
        cache: dict[int, np.ndarray] = {}  # embedding per window start: frames of one window share it

        def flush() -> Iterator[tuple[float, np.ndarray, Localization]]:
            windows = [self.window(wave, t) for t, _ in pending]
            keys = [hash(w.tobytes()) for w in windows]
            todo = {k: w for k, w in zip(keys, windows) if k not in cache}
            if todo:
                cache.update(zip(todo, self.embed(np.stack(list(todo.values())))))
            results = self.localize([f for _, f in pending], np.stack([cache[k] for k in keys]))
            for (t, f), r in zip(pending, results):
                yield t, f, r
            while len(cache) > 4 * size:
                cache.pop(next(iter(cache)))
            pending.clear()

        try:
            for t, bgr in iter_bgr_frames(path):
                pending.append((t, bgr))
                if len(pending) >= size:
                    yield from flush()
        except DataError as err:
            raise UserError(str(err)) from None
        except (av.error.FFmpegError, TruncatedError) as err:
            raise UserError(f"{path}: video decoding failed ({err})") from None
        if pending:
            yield from flush()

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Localizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_times(times: Sequence[Any], duration: float) -> None:
    """Each ``at`` is None or a time inside the sound, in seconds: a time outside it (milliseconds passed for
    seconds, a frame index) would silently be clamped to the sound's end by :func:`frame_window`."""
    for t in times:
        if t is None:
            continue
        if isinstance(t, bool) or not isinstance(t, int | float | np.integer | np.floating) or not np.isfinite(t):
            raise UserError(f"at {t!r}: expected the frame's time in the sound, in seconds")
        if not 0.0 <= float(t) <= duration + 1e-6:
            raise UserError(f"at {t!r}: outside the sound (0 to {duration:.3f} s); times are in seconds")


def _checkpoint_engine(path: Path) -> tuple[Any, dict[str, Any]]:
    """A checkpoint run in PyTorch through the graphs ``avloc export`` would write (``GraphRunner``), with the
    manifest keys the API reads (no gate: a checkpoint has none until exported with --gate-data)."""
    from avloc.core.checkpoint import load_model
    from avloc.engines.gate import GraphRunner

    loaded = load_model(path, device="cpu")  # a file that is no checkpoint: one-line UserError
    runner = GraphRunner(loaded)
    manifest = {**runner.manifest, "method": loaded.method, "outputs": {"heatmap": dict(runner.graphs.heatmap)}}
    return runner, manifest


def _read_frame(frame: str | Path | np.ndarray, bgr: bool) -> np.ndarray:
    """A frame as the pipeline carries it: HxWx3 uint8 BGR."""
    if isinstance(frame, str | Path):
        from avloc.core.media import read_image

        try:
            return cv2.cvtColor(read_image(frame), cv2.COLOR_RGB2BGR)
        except DataError as err:
            raise UserError(str(err)) from None
    image = np.asarray(frame)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 2:
        raise UserError(f"frame {image.dtype} {image.shape}: expected an HxWx3 uint8 image (RGB, or bgr=True)")
    return np.ascontiguousarray(image if bgr else image[:, :, ::-1])

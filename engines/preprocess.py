"""Frame preprocessing on the device: uint8 BGR frames -> pinned host buffer -> device -> resize + normalise.

The CPU path (:func:`avloc.engines.base.preprocess_frame`) converts and normalises on the host and uploads
float32: 4x the bytes of the uint8 frame, from pageable memory (a staging copy and a synchronous transfer).
Here the uint8 frames are copied once into a pinned buffer, uploaded asynchronously, and resized/normalised
by torch on the device, into a ``[B,3,H,W]`` float32 tensor the torch and TensorRT backends take as is.

Same math as the CPU path: the frame's rectangle the manifest's ``image.fit`` mode takes (``core.media.frame_fit``:
the whole frame for ``stretch``, the default) onto its place in the input, area averaging on an axis that
shrinks (cv2 ``INTER_AREA``), linear with half-pixel centres on one that grows (cv2 ``INTER_LINEAR``), letterbox
padding set to the normalisation mean (0), BGR -> RGB,
then ``x * scale - bias`` with the manifest's mean/std folded as in :func:`base._image_params`. The resize is
separable, so each axis is one small weight matrix applied with a matmul (exact fractional area weights,
which ``F.interpolate(mode="area")`` does not give for non-integer ratios). The CPU path rounds the resized
image to uint8 (and cv2's linear kernel uses 11-bit fixed-point weights), this path stays in float32: the two
agree within :data:`TOLERANCE_LEVELS` uint8 levels, i.e. ``TOLERANCE_LEVELS / (255 * std)`` after
normalisation (tests/test_preprocess.py checks it). Frames that shrink on one axis and grow on the other
(cv2 then uses a variant of INTER_AREA) are not covered by that bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avloc.core.errors import UserError
from avloc.core.media import FrameFit, frame_fit, resize_mode
from avloc.engines.base import _image_params

TOLERANCE_LEVELS = 1.0  # max |GPU - CPU| in uint8 levels (before dividing by 255 * std)


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float64 matrix resizing one axis as cv2 does: area when shrinking, linear (half-pixel
    centres, edge-clamped) when growing, identity when equal."""
    if n_in == n_out:
        return np.eye(n_out)
    weights = np.zeros((n_out, n_in))
    scale = n_in / n_out
    if n_in > n_out:
        # Output pixel i covers input [i*scale, (i+1)*scale): weight = overlap of each input pixel / scale.
        for i in range(n_out):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
                weights[i, j] = (min(hi, j + 1) - max(lo, j)) / scale
        return weights
    for i in range(n_out):
        src = min(max((i + 0.5) * scale - 0.5, 0.0), n_in - 1.0)
        j = int(np.floor(src))
        frac = src - j
        weights[i, j] += 1.0 - frac
        if frac > 0:
            weights[i, j + 1] += frac
    return weights


def fit_weights(fit: FrameFit) -> tuple[np.ndarray, np.ndarray]:
    """(rows ``[H, h]``, columns ``[W, w]``) float64 matrices that resize the frame's ``fit.source`` rectangle
    onto the input's ``fit.target`` rectangle; zero rows / columns elsewhere (crop: frame pixels not used;
    letterbox: input pixels that are padding)."""
    (h, w), (height, width) = fit.frame_size, fit.input_size
    sx0, sy0, sx1, sy1 = fit.source
    tx0, ty0, tx1, ty1 = fit.target
    rows, cols = np.zeros((height, h)), np.zeros((width, w))
    rows[ty0:ty1, sy0:sy1] = resize_weights(sy1 - sy0, ty1 - ty0)
    cols[tx0:tx1, sx0:sx1] = resize_weights(sx1 - sx0, tx1 - tx0)
    return rows, cols


def normalize_params(manifest: dict[str, Any]) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(height, width, per-channel scale, per-channel bias) of the manifest, shared with the CPU path."""
    return _image_params(manifest)


def resize_normalize(
    frames: Tensor,
    manifest: dict[str, Any],
    weights: tuple[Tensor, Tensor] | None = None,
    affine: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``[B,h,w,3]`` uint8 BGR (any device) -> ``[B,3,H,W]`` float32 RGB normalised as the manifest says.

    ``weights`` (row, column resize matrices as float32 on ``frames``' device) and ``affine`` (per-channel
    scale and bias, ``[1,3,1,1]`` float32 there) can be passed to skip rebuilding them for every batch: made
    from host NumPy, each is a pageable host-to-device copy, which waits for the device.
    """
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise UserError(
            f"resize_normalize: expected [B,h,w,3] uint8 BGR frames, got {tuple(frames.shape)} {frames.dtype}"
        )
    height, width, scale, bias = normalize_params(manifest)
    h, w = int(frames.shape[1]), int(frames.shape[2])
    fit = frame_fit((h, w), (height, width), resize_mode(manifest["image"]))
    if weights is None:
        weights = _weights(fit, frames.device)
    if affine is None:
        affine = _affine(scale, bias, frames.device)
    rows, cols = weights
    # BGR -> RGB by flip: indexing with a list ([2, 1, 0]) would upload an index tensor from pageable memory
    x = frames.flip(-1).permute(0, 3, 1, 2).float()  # [B,3,h,w]
    if (h, w) != (height, width):
        x = torch.matmul(torch.matmul(rows, x), cols.T)  # [H,h] @ [B,3,h,w] @ [w,W]
    scale_t, bias_t = affine
    x = x * scale_t - bias_t
    tx0, ty0, tx1, ty1 = fit.target
    if (tx0, ty0, tx1, ty1) != (0, 0, width, height):  # letterbox padding: the normalisation mean (0)
        x[..., :ty0, :] = 0.0
        x[..., ty1:, :] = 0.0
        x[..., :, :tx0] = 0.0
        x[..., :, tx1:] = 0.0
    return x.contiguous()


def upload(array: np.ndarray, device: torch.device) -> Tensor:
    """Float32 copy of a host array on ``device``. To CUDA through pinned memory, asynchronously: a copy from
    pageable memory (``torch.as_tensor(array, device="cuda")``) blocks the host until the device has reached
    it, so the host could not queue work ahead. The caching host allocator keeps the pinned block until the
    copy has run."""
    host = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _affine(scale: np.ndarray, bias: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    as_t = [torch.as_tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) for v in (scale, bias)]
    return as_t[0], as_t[1]


def _weights(fit: FrameFit, device: torch.device) -> tuple[Tensor, Tensor]:
    rows, cols = (torch.as_tensor(m, dtype=torch.float32, device=device) for m in fit_weights(fit))
    return rows, cols


class _Staging:
    """Two pinned uint8 buffers used in turn, each guarded by an event so a buffer is refilled only after
    its previous upload finished (the host never waits on the copy it just queued)."""

    def __init__(self, shape: tuple[int, ...], pin: bool) -> None:
        self.buffers = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.events: list[Any] = [None, None]
        self.turn = 0

    def next(self) -> tuple[Tensor, int]:
        i = self.turn
        self.turn ^= 1
        if self.events[i] is not None:
            self.events[i].synchronize()
        return self.buffers[i], i


class DevicePreprocessor:
    """Batches of uint8 BGR frames -> ``[B,3,H,W]`` float32 on ``device`` (see the module docstring).

    Pinned staging buffers and resize matrices are made once per frame size (a stream keeps its size);
    frames of different sizes in one batch are handled per size group. Nothing here synchronizes the device:
    the result is queued on the current stream, ready for the engine call that follows on the same stream.
    """

    def __init__(self, manifest: dict[str, Any], device: str | torch.device = "cuda", max_batch: int = 16) -> None:
        self.manifest = manifest
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {str(device)!r}: CUDA is not available; use the CPU preprocessing")
        self.max_batch = int(max_batch)
        self.height, self.width, scale, bias = normalize_params(manifest)
        self._pin = self.device.type == "cuda"
        self._affine = _affine(scale, bias, self.device)  # uploaded once, not per batch
        self._staging: dict[tuple[int, int], _Staging] = {}
        self._weights: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def __call__(self, frames: Sequence[np.ndarray]) -> Tensor:
        if not frames:
            raise UserError("preprocess: empty batch")
        if len(frames) > self.max_batch:
            raise UserError(f"preprocess: batch of {len(frames)} frames > max_batch {self.max_batch}")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, frame in enumerate(frames):
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise UserError(f"preprocess: expected HxWx3 uint8 BGR frames, got {frame.shape} {frame.dtype}")
            groups.setdefault((int(frame.shape[0]), int(frame.shape[1])), []).append(i)
        if len(groups) == 1:
            ((size, _),) = groups.items()
            return self._run(size, frames)
        out = torch.empty((len(frames), 3, self.height, self.width), dtype=torch.float32, device=self.device)
        for size, indices in groups.items():
            images = self._run(size, [frames[i] for i in indices])
            # slice by slice: `out[indices] = ...` would upload the index list from pageable memory (a sync)
            for j, i in enumerate(indices):
                out[i] = images[j]
        return out

    def _run(self, size: tuple[int, int], frames: Sequence[np.ndarray]) -> Tensor:
        staging = self._staging.get(size)
        if staging is None:
            staging = self._staging[size] = _Staging((self.max_batch, *size, 3), self._pin)
            fit = frame_fit(size, (self.height, self.width), resize_mode(self.manifest["image"]))
            self._weights[size] = _weights(fit, self.device)
        buffer, slot = staging.next()
        host = buffer.numpy()
        for i, frame in enumerate(frames):
            np.copyto(host[i], frame)
        batch = buffer[: len(frames)].to(self.device, non_blocking=self._pin)
        if self._pin:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            staging.events[slot] = event
        return resize_normalize(batch, self.manifest, self._weights[size], self._affine)


def cpu_agreement(frames: Sequence[np.ndarray], manifest: dict[str, Any]) -> tuple[float, float]:
    """(max, mean) |device path - CPU path| in uint8 levels of the channel with the smallest std, computed
    on CPU tensors: the number :data:`TOLERANCE_LEVELS` bounds."""
    from avloc.engines.base import preprocess_frames

    _, _, scale, _ = normalize_params(manifest)
    level = float(scale.max())  # one uint8 level after normalisation = 1 / (255 * std), largest for min std
    out = DevicePreprocessor(manifest, device="cpu", max_batch=len(frames))(frames).numpy()
    diff = np.abs(out - preprocess_frames(frames, manifest)) / level
    return float(diff.max()), float(diff.mean())


def _agreement_table(size: int = 64) -> None:
    """Print the agreement table of docs/engines.md (python -m avloc.engines.preprocess)."""
    from avloc.core.checkpoint import ImageConfig

    image = ImageConfig(size=size)
    manifest = {"image": {"size": size, "mean": list(image.mean), "std": list(image.std)}}
    rng = np.random.default_rng(0)
    print(f"frame -> {size} px: max / mean |device - cpu| in uint8 levels (noise frames)")
    for h, w in [(480, 640), (128, 128), (100, 90), (720, 1280), (32, 40)]:
        frames = [rng.integers(0, 256, (h, w, 3), np.uint8) for _ in range(3)]
        worst, mean = cpu_agreement(frames, manifest)
        print(f"{w}x{h}: {worst:.2f} / {mean:.2f}")


if __name__ == "__main__":
    _agreement_table()

"""One engine interface over inference backends, the engine manifest and frame preprocessing.

An engine directory (written by ``avloc export``) holds two graphs with the same shape for every method:

- *audio*: spectrogram ``[B,1,F,T]`` -> audio embedding ``[B,D]`` (computed once per audio window),
- *visual*: normalized image ``[B,3,H,W]`` + audio embedding ``[B,D]`` -> heatmap ``[B,h,w]`` at feature
  resolution (the consumer upsamples) and a confidence ``[B]``,

plus ``manifest.json`` (preprocessing, shapes, meaning, versions, checksums) and ``model.pt`` for the torch
backend. Backends (ONNX Runtime, PyTorch, TensorRT) live in their own modules and are imported only when
chosen; :func:`register_backend` adds more.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avloc.core.errors import UserError
from avloc.core.media import fit_region, frame_fit, resize_mode

ENGINE_FORMAT = "avloc-engine"
ENGINE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_REQUIRED_KEYS = ("method", "frontend", "image", "graphs", "outputs", "embed_dim")

# name -> "module:attribute" (imported lazily so an absent optional dependency only breaks its own backend)
# or a factory registered at run time. A factory is called as factory(engine_dir, manifest, device=...,
# threads=..., **options) and returns an Engine.
_BACKENDS: dict[str, str | Callable[..., Engine]] = {
    "onnxruntime": "avloc.engines.onnxruntime_backend:OnnxRuntimeEngine",
    "torch": "avloc.engines.torch_backend:TorchEngine",
    "tensorrt": "avloc.engines.tensorrt_backend:TensorRTEngine",
}


def register_backend(name: str, factory: str | Callable[..., Engine]) -> None:
    """Add (or replace) a backend: a callable or a lazy ``"module:attribute"`` reference."""
    _BACKENDS[name] = factory


def known_backends() -> list[str]:
    return sorted(_BACKENDS)


# ---------------------------------------------------------------------------------------------- manifest


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(engine_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``ENGINE_DIR/manifest.json``; any problem is a one-line UserError."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise UserError(f"{engine_dir}: engine directory not found (create one with `avloc export`)")
    path = engine_dir / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{path}: manifest not found; is {engine_dir} an engine directory from `avloc export`?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: corrupt manifest, not valid JSON ({err.__class__.__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ENGINE_FORMAT:
        raise UserError(f"{path}: not an avloc engine manifest (expected format={ENGINE_FORMAT!r})")
    if manifest.get("format_version") != ENGINE_FORMAT_VERSION:
        raise UserError(
            f"{path}: engine format_version {manifest.get('format_version')!r}, this avloc reads "
            f"{ENGINE_FORMAT_VERSION}; re-export the engine"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{path}: corrupt manifest, missing key(s) {', '.join(missing)}")
    if isinstance(manifest.get("image"), dict):
        # at load, naming the file: not at the first frame a worker or Localizer preprocesses
        try:
            resize_mode(manifest["image"])
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
    return manifest


def graph_file(engine_dir: str | Path, manifest: dict[str, Any], graph: str, variant: str = "fp32") -> Path:
    """Path of a graph file ("audio"/"visual", variant "fp32" or e.g. "int8"), its checksum verified."""
    entry = manifest["graphs"].get(graph)
    if not isinstance(entry, dict):
        raise UserError(f"{Path(engine_dir) / MANIFEST_NAME}: no graph {graph!r} in the manifest")
    if variant != "fp32":
        variants = entry.get("variants", {})
        if variant not in variants:
            raise UserError(
                f"{Path(engine_dir) / MANIFEST_NAME}: graph {graph!r} has no {variant!r} variant "
                f"(available: fp32{''.join(', ' + v for v in variants)}); export with --{variant}"
            )
        entry = variants[variant]
    return verified_file(engine_dir, entry["file"], entry.get("sha256"))


def verified_file(engine_dir: str | Path, name: str, sha256: str | None) -> Path:
    path = Path(engine_dir) / name
    if not path.is_file():
        raise UserError(f"{path}: engine file listed in the manifest is missing")
    if sha256 is not None and sha256_file(path) != sha256:
        raise UserError(f"{path}: corrupt engine file (sha256 differs from the manifest); re-export the engine")
    return path


# ---------------------------------------------------------------------------------------------- engine


class Engine(ABC):
    """A loaded engine: ``embed_audio`` once per audio window, ``localize`` per frame (batched)."""

    backend: str = "?"
    # The largest batch ``localize``/``embed_audio`` accept (a TensorRT profile, the torch backend's captured
    # graphs); None: any batch (dynamic batch axis). Callers batch at most this many frames.
    max_batch: int | None = None

    def __init__(self, engine_dir: str | Path, manifest: dict[str, Any], device: str = "cpu") -> None:
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.device = device
        self.spec_shape: tuple[int, ...] = tuple(manifest["graphs"]["audio"]["inputs"][0]["shape"][1:])
        self.image_shape: tuple[int, ...] = tuple(manifest["graphs"]["visual"]["inputs"][0]["shape"][1:])
        self.embed_dim = int(manifest["embed_dim"])

    @abstractmethod
    def embed_audio(self, spec: np.ndarray) -> np.ndarray:
        """``[B,1,F,T]`` float32 spectrogram -> ``[B,D]`` float32 audio embedding."""

    @abstractmethod
    def localize(self, image: np.ndarray, audio_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[B,3,H,W]`` image + ``[B,D]`` embedding -> (heatmap ``[B,h,w]``, confidence ``[B]``)."""

    @property
    def has_objectness(self) -> bool:
        """Whether the engine carries OGL's objectness graph (``avloc export --ogl`` -> ``manifest["ogl"]``)."""
        return isinstance(self.manifest.get("ogl"), dict)

    def objectness(self, image: Any) -> Any:
        """``[B,3,H,W]`` image (the visual graph's input) -> audio-blind objectness ``[B,h,w]`` (OGL, see
        :mod:`avloc.core.ogl`). Backends that run the graph override this; here it only explains why not."""
        if not self.has_objectness:
            raise UserError(f"{self.engine_dir}: engine has no OGL objectness graph (re-export with --ogl)")
        raise UserError(f"backend {self.backend!r} cannot run the OGL objectness graph; use onnxruntime or torch")

    def warmup(
        self, batch_sizes: Sequence[int] = (1,), audio_batch_sizes: Sequence[int] | None = None, calls: int = 1
    ) -> None:
        """Run the visual graph for every size in ``batch_sizes`` and the audio graph for every size in
        ``audio_batch_sizes`` (default: the same), ``calls`` times each, so lazy set-up (allocations, autotuning,
        graph capture, compilation) happens before a worker reports ready rather than as a latency spike
        mid-stream. The inference worker embeds one audio window at a time: it passes ``audio_batch_sizes=(1,)``.
        """
        rng = np.random.default_rng(0)
        visual = set(batch_sizes)
        audio = visual if audio_batch_sizes is None else set(audio_batch_sizes)
        for _ in range(calls):
            for batch in sorted(visual | audio):
                emb = rng.standard_normal((batch, self.embed_dim), dtype=np.float32)
                if batch in audio:
                    spec = rng.standard_normal((batch, *self.spec_shape), dtype=np.float32)
                    emb = to_host(self.embed_audio(spec)).astype(np.float32, copy=False)
                if batch in visual:
                    self.localize(rng.standard_normal((batch, *self.image_shape), dtype=np.float32), emb)
        self.synchronize()

    def device_preprocessor(self, max_batch: int) -> Callable[[Sequence[np.ndarray]], Any] | None:
        """What turns a batch of uint8 BGR frames into the images :meth:`localize` takes, on this engine's device,
        or None: the caller preprocesses on the host (:func:`preprocess_frames`). Device backends get a
        :class:`avloc.engines.preprocess.DevicePreprocessor`; their outputs are then device tensors, which
        :func:`to_host` brings back. Here: torch-backed engines on CUDA (``torch_device``), None otherwise."""
        device = getattr(self, "torch_device", None)
        if device is None or device.type != "cuda":
            return None
        from avloc.engines.preprocess import DevicePreprocessor

        return DevicePreprocessor(self.manifest, device, max_batch)

    def synchronize(self) -> None:  # noqa: B027 - host backends finish inside the call
        """Wait for work queued on a device (timing only; calls never synchronize by themselves)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends free everything on garbage collection
        """Release sessions / device memory. Safe to call twice."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.engine_dir)!r}, device={self.device!r})"

    # Cheap checks so a wrong shape is one clear line instead of a backend stack trace.
    def _check_spec(self, spec: Any) -> None:
        if tuple(spec.shape[1:]) != self.spec_shape or len(spec.shape) != 4:
            expected = ", ".join(map(str, self.spec_shape))
            raise UserError(f"embed_audio: spectrogram shape {tuple(spec.shape)}, expected [B, {expected}]")

    def _check_image(self, image: Any, call: str = "localize") -> None:
        if len(image.shape) != 4 or tuple(image.shape[1:]) != self.image_shape:
            expected = ", ".join(map(str, self.image_shape))
            raise UserError(f"{call}: image shape {tuple(image.shape)}, expected [B, {expected}]")

    def _check_visual(self, image: Any, audio_emb: Any) -> None:
        self._check_image(image)
        if tuple(audio_emb.shape) != (image.shape[0], self.embed_dim):
            raise UserError(
                f"localize: audio embedding shape {tuple(audio_emb.shape)}, "
                f"expected ({image.shape[0]}, {self.embed_dim})"
            )


def check_device(device: str) -> str:
    """``device`` when it is "cpu", "cuda" or "cuda:N", else a one-line UserError (``torch.device("gpu")`` would
    be a RuntimeError traceback)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise UserError(f"device {device!r}: expected cpu, cuda or cuda:N")
    return str(device)


def to_host(array: Any) -> np.ndarray:
    """NumPy of an engine output: host arrays as they are, torch tensors (CUDA ones included) copied to the host.

    A device tensor cannot be converted implicitly (``np.asarray`` raises on CUDA tensors); ``.cpu()`` waits for
    the device work that produced it, so a timestamp taken after this call is after the device finished."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "detach"):  # torch.Tensor without importing torch here (host backends do not need it)
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _resolve_backend(name: str) -> Callable[..., Engine]:
    target = _BACKENDS.get(name)
    if target is None:
        raise UserError(f"unknown engine backend {name!r}; known backends: {', '.join(known_backends())}")
    if callable(target):
        return target
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)


def load_engine(
    engine_dir: str | Path,
    backend: str = "onnxruntime",
    device: str = "cpu",
    threads: int | None = None,
    **options: Any,
) -> Engine:
    """Open an engine directory with a backend.

    ``threads``: intra-op threads for CPU backends (default: all cores). ``options`` go to the backend
    (e.g. ``precision="int8"`` for ONNX Runtime, ``mode="cuda_graphs"`` / ``fp16=True`` for torch,
    ``fp16``/``max_batch`` for TensorRT).
    """
    factory = _resolve_backend(backend)
    manifest = read_manifest(engine_dir)
    if threads is not None and threads < 1:
        raise UserError(f"threads={threads}: expected a positive number of threads")
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some callables have no introspectable signature
        accepted = {}
    if accepted and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            known = sorted(set(accepted) - {"engine_dir", "manifest", "device", "threads", "self"})
            raise UserError(
                f"backend {backend!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(known)}"
            )
    return factory(engine_dir, manifest, device=device, threads=threads, **options)


# ---------------------------------------------------------------------------------------------- frames


def _image_params(manifest: dict[str, Any]) -> tuple[int, int, np.ndarray, np.ndarray]:
    image = manifest["image"]
    size = image["size"]
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    std = np.asarray(image["std"], np.float32)
    # x/255 then (x - mean)/std folded into one multiply-add per channel.
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    bias = (np.asarray(image["mean"], np.float32) / std).astype(np.float32)
    return height, width, scale, bias


def preprocess_frame(bgr_uint8: np.ndarray, manifest: dict[str, Any], out: np.ndarray | None = None) -> np.ndarray:
    """OpenCV BGR ``HxWx3`` uint8 frame -> ``[3,H,W]`` float32 RGB normalized as the manifest says.

    Made into the manifest size as its ``image.fit`` mode says (``avloc.core.media.frame_fit``; no field:
    ``stretch``, the whole frame without keeping the aspect ratio): INTER_AREA when shrinking (no aliasing),
    INTER_LINEAR when enlarging (``core.media.resize_image``); letterbox padding is the normalisation mean (0).
    """
    if bgr_uint8.ndim != 3 or bgr_uint8.shape[2] != 3 or bgr_uint8.dtype != np.uint8:
        raise UserError(f"preprocess_frame: expected an HxWx3 uint8 BGR frame, got {bgr_uint8.shape} {bgr_uint8.dtype}")
    height, width, scale, bias = _image_params(manifest)
    fit = frame_fit(bgr_uint8.shape[:2], (height, width), resize_mode(manifest["image"]))
    rgb = cv2.cvtColor(fit_region(bgr_uint8, fit), cv2.COLOR_BGR2RGB)
    if out is None:
        out = np.empty((3, height, width), np.float32)
    x0, y0, x1, y1 = fit.target
    if (x0, y0, x1, y1) != (0, 0, width, height):
        out[...] = 0.0  # letterbox padding: the normalisation mean
    # HWC -> CHW while scaling: one pass per channel, no intermediate float HWC copy.
    for c in range(3):
        view = out[c, y0:y1, x0:x1]
        np.multiply(rgb[:, :, c], scale[c], out=view, casting="unsafe")
        view -= bias[c]
    return out


def preprocess_frames(frames: Sequence[np.ndarray], manifest: dict[str, Any]) -> np.ndarray:
    """A batch of BGR uint8 frames (any sizes) -> ``[B,3,H,W]`` float32."""
    height, width, _, _ = _image_params(manifest)
    batch = np.empty((len(frames), 3, height, width), np.float32)
    for i, frame in enumerate(frames):
        preprocess_frame(frame, manifest, out=batch[i])
    return batch


def as_float32(array: Any) -> np.ndarray:
    """C-contiguous float32 view/copy (backends want contiguous inputs)."""
    return np.ascontiguousarray(array, dtype=np.float32)

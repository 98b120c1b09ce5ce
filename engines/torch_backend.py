"""PyTorch backend: runs ``model.pt`` of an engine directory through the same graph modules as the export.

- CPU: eager under ``torch.inference_mode`` (optionally channels_last), ``mode="compile"`` also works.
- CUDA: ``mode="eager"``, ``"cuda_graphs"`` (one graph per batch size 1..``max_batch``, static input/output
  buffers, warm-up on a side stream, graphs share one memory pool) or ``"compile"`` (torch.compile,
  ``reduce-overhead``); ``fp16=True`` / ``bf16=True`` run under autocast (outputs are returned as float32).

:meth:`TorchEngine.warmup` (called by the inference worker before it reports ready) captures the CUDA graphs /
compiles for every batch size 1..``max_batch``, so no capture or recompilation happens mid-stream. Outputs of
``cuda_graphs`` and ``compile`` (whose reduce-overhead mode also replays CUDA graphs) live in static buffers the
next call overwrites: device outputs are cloned before they are returned.

Calls never synchronize the device themselves. NumPy in -> NumPy out (the device-to-host copy of the
result is the only wait); torch tensors already on the device in -> device tensors out, no wait at all.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from avloc.core.checkpoint import load_model
from avloc.core.errors import UserError
from avloc.engines.base import Engine, check_device, verified_file
from avloc.engines.preprocess import upload

log = logging.getLogger(__name__)
MODES = ("eager", "cuda_graphs", "compile")
# Calls per batch size in compile mode's warm-up: torch.compile(mode="reduce-overhead") uses CUDA graph trees,
# which run a function eagerly on its first call for a shape (warm-up), record a CUDA graph on the second and
# replay from the third (docs: torch.compiler_cudagraph_trees). The third call checks the replay path too.
COMPILE_CALLS = 3


def set_tf32(allowed: bool) -> None:
    """TF32 for float32 convolutions and matmuls on/off, process-wide (an engine worker owns its process).

    cuDNN allows TF32 by default (``torch.backends.cudnn.allow_tf32 = True``), so on Ampere and later an
    "fp32" torch engine would run its convolutions with 10-bit mantissa inputs; "fp32" here means IEEE fp32,
    and TF32 is its own, named precision (``tf32=True``)."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


class CudaGraphRunner:
    """Replays ``module`` through CUDA graphs, one per input batch size (:meth:`capture` them all up front).

    Outputs are the graph's static buffers: they are overwritten by the next call with the same batch
    size, so callers copy (``.clone()`` / ``.cpu()``) what they keep.
    """

    def __init__(self, module: nn.Module, device: torch.device, autocast: Callable[[], Any], warmup: int = 3) -> None:
        self.module = module
        self.device = device
        self.autocast = autocast
        self.warmup = warmup
        # One pool for all batch sizes. Safe because every replay runs on the caller's stream and its outputs
        # are copied/cloned before the next replay: a later replay may reuse another graph's freed memory,
        # never memory whose contents are still to be read.
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[Tensor], tuple[Tensor, ...]]] = {}

    def _capture(self, inputs: Sequence[Tensor]) -> tuple[torch.cuda.CUDAGraph, list[Tensor], tuple[Tensor, ...]]:
        static_inputs = [x.detach().clone() for x in inputs]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        # Warm-up on a side stream (cuDNN autotuning, lazy allocations) before capture, as the CUDA docs do.
        with torch.cuda.stream(side), torch.inference_mode(), self.autocast():
            for _ in range(self.warmup):
                self.module(*static_inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), self.autocast(), torch.cuda.graph(graph, pool=self.pool):
            outputs = self.module(*static_inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        log.debug("captured a CUDA graph for batch %d", inputs[0].shape[0])
        return graph, static_inputs, outputs

    def capture(self, inputs: Sequence[Tensor]) -> None:
        """Capture the graph for ``inputs``' batch size now (startup), if not captured yet."""
        batch = int(inputs[0].shape[0])
        if batch not in self.graphs:
            self.graphs[batch] = self._capture(inputs)

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        batch = int(inputs[0].shape[0])
        entry = self.graphs.get(batch)
        if entry is None:
            # Still correct, but a capture costs tens of ms: warmup() should have covered this size.
            log.warning("capturing a CUDA graph for batch %d mid-stream (not covered by warmup)", batch)
            entry = self.graphs[batch] = self._capture(inputs)
        graph, static_inputs, outputs = entry
        for buffer, x in zip(static_inputs, inputs):
            buffer.copy_(x, non_blocking=True)
        graph.replay()
        return outputs


class TorchEngine(Engine):
    backend = "torch"

    def __init__(
        self,
        engine_dir: str | Path,
        manifest: dict[str, Any],
        device: str = "cpu",
        threads: int | None = None,
        mode: str = "eager",
        fp16: bool = False,
        bf16: bool = False,
        channels_last: bool = False,
        max_batch: int = 8,
        tf32: bool = False,
    ) -> None:
        from avloc.engines.export import build_graphs

        super().__init__(engine_dir, manifest, device)
        if mode not in MODES:
            raise UserError(f"torch backend mode {mode!r}: expected one of {', '.join(MODES)}")
        self.torch_device = torch.device(check_device(device))
        is_cuda = self.torch_device.type == "cuda"
        if is_cuda and not torch.cuda.is_available():
            raise UserError(f"device {device!r}: CUDA is not available in this torch build/machine; use --device cpu")
        if mode == "cuda_graphs" and not is_cuda:
            raise UserError("torch backend mode 'cuda_graphs' needs --device cuda")
        if (fp16 or bf16) and not is_cuda:
            raise UserError("torch backend fp16/bf16 needs --device cuda (CPU runs float32)")
        if fp16 and bf16:
            raise UserError("torch backend: choose one of fp16 and bf16")
        if tf32 and not is_cuda:
            raise UserError("torch backend tf32 needs --device cuda (TF32 is a GPU tensor-core math mode)")
        if max_batch < 1:
            raise UserError(f"torch backend max_batch={max_batch}: expected >= 1")
        if is_cuda:
            torch.backends.cudnn.benchmark = True  # input shapes are fixed per batch size: tune once
            set_tf32(tf32)
        # what the float32 parts compute in: autocast's fp16/bf16, else IEEE fp32 unless TF32 was asked for
        self.precision = "fp16" if fp16 else "bf16" if bf16 else "tf32" if tf32 else "fp32"
        if threads is not None:
            torch.set_num_threads(int(threads))  # process-wide: an engine worker owns its process
        self.threads = torch.get_num_threads()
        self.mode, self.fp16, self.bf16, self.channels_last = mode, fp16, bf16, channels_last
        self.max_batch = int(max_batch)
        self.warmed_batches: list[int] = []
        self.warmed_audio_batches: list[int] = []

        entry = manifest.get("torch_checkpoint") or {"file": "model.pt"}
        path = verified_file(engine_dir, entry["file"], entry.get("sha256"))
        loaded = load_model(path, device="cpu")
        if loaded.method != manifest["method"]:
            raise UserError(f"{path}: method {loaded.method!r} but the manifest says {manifest['method']!r}")
        graphs = build_graphs(loaded, int(self.image_shape[-1]))
        self._image_config = loaded.image
        self._objectness: nn.Module | None = None  # OGL's third graph, built on first use (see objectness())
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._audio = graphs.audio.to(self.torch_device, memory_format=memory_format).eval()
        self._visual = graphs.visual.to(self.torch_device, memory_format=memory_format).eval()
        self._run_audio: Callable[..., Any] = self._audio
        self._run_visual: Callable[..., Any] = self._visual
        if mode == "compile":
            compile_mode = "reduce-overhead" if is_cuda else "default"
            # dynamic=False compiles once per batch size; the default limit (8) would silently fall back to
            # eager beyond 8 sizes, so allow every size warmup() compiles for both graphs.
            limit = max(torch._dynamo.config.recompile_limit, self.max_batch + 1)
            torch._dynamo.config.recompile_limit = limit
            self._run_audio = torch.compile(self._audio, mode=compile_mode, dynamic=False)
            self._run_visual = torch.compile(self._visual, mode=compile_mode, dynamic=False)
        elif mode == "cuda_graphs":
            self._run_audio = CudaGraphRunner(self._audio, self.torch_device, self._autocast)
            self._run_visual = CudaGraphRunner(self._visual, self.torch_device, self._autocast)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not (self.fp16 or self.bf16):
            return contextlib.nullcontext()
        # No weight-cast cache: cached casts would be freed/reused behind a captured CUDA graph's back.
        dtype = torch.float16 if self.fp16 else torch.bfloat16
        # the engine's device type ("cuda"; "cpu" only in tests/test_gpu_standins.py, the CPU's float16 autocast)
        return torch.autocast(self.torch_device.type, dtype=dtype, cache_enabled=False)

    def warmup(
        self,
        batch_sizes: Sequence[int] | None = None,
        audio_batch_sizes: Sequence[int] | None = None,
        calls: int | None = None,
    ) -> None:
        """Capture CUDA graphs / compile / autotune for every visual batch size 1..max_batch (or ``batch_sizes``)
        and every audio batch size in ``audio_batch_sizes`` (default: the same) before streaming, so the first
        frame of each batch size costs no capture or recompilation.

        ``compile`` calls each size :data:`COMPILE_CALLS` times: reduce-overhead's CUDA graph trees run a function
        eagerly on its first call for a shape and record it on the second, so one call per size would leave the
        recording (tens of ms) to the first real frames."""
        sizes = sorted(set(batch_sizes or range(1, self.max_batch + 1)))
        audio_sizes = sizes if audio_batch_sizes is None else sorted(set(audio_batch_sizes))
        if self.mode == "cuda_graphs":
            rng = np.random.default_rng(0)
            for batch in audio_sizes:
                spec = self._to_device(rng.standard_normal((batch, *self.spec_shape), dtype=np.float32))
                self._run_audio.capture([spec])
            for batch in sizes:
                image = self._to_device(rng.standard_normal((batch, *self.image_shape), dtype=np.float32))
                emb = torch.zeros(batch, self.embed_dim, device=self.torch_device)
                self._run_visual.capture([image, emb])
            self.synchronize()
        else:
            default_calls = COMPILE_CALLS if self.mode == "compile" else 1
            super().warmup(sizes, audio_sizes, calls or default_calls)
        self.warmed_batches = sizes
        self.warmed_audio_batches = audio_sizes
        log.info("torch %s engine warmed up for batch sizes %s (audio %s)", self.mode, sizes, audio_sizes)

    def _to_device(self, x: Any) -> Tensor:
        if isinstance(x, np.ndarray):
            t = upload(x, self.torch_device)
        else:
            t = x.to(self.torch_device, dtype=torch.float32, non_blocking=True)
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _call(self, fn: Callable[..., Any], inputs: Sequence[Any]) -> tuple[Tensor, ...]:
        tensors = [self._to_device(x) for x in inputs]
        if self.mode == "cuda_graphs":
            return fn(*tensors)  # the runner enters inference_mode/autocast itself
        with torch.inference_mode(), self._autocast():
            out = fn(*tensors)
        return out if isinstance(out, tuple) else (out,)

    def _finish(self, outputs: tuple[Tensor, ...], as_numpy: bool) -> list[Any]:
        if as_numpy:
            return [o.float().cpu().numpy() for o in outputs]
        # Device tensors: clone out of CUDA-graph static buffers (cuda_graphs, and compile's reduce-overhead)
        # so the next call cannot overwrite them. float() alone would alias them when already float32.
        if self.mode == "eager":
            return [o.float() for o in outputs]
        return [o.float().clone() for o in outputs]

    def embed_audio(self, spec: np.ndarray | Tensor) -> Any:
        self._check_spec(spec)
        return self._finish(self._call(self._run_audio, [spec]), isinstance(spec, np.ndarray))[0]

    def localize(self, image: np.ndarray | Tensor, audio_emb: np.ndarray | Tensor) -> tuple[Any, Any]:
        self._check_visual(image, audio_emb)
        heatmap, confidence = self._finish(
            self._call(self._run_visual, [image, audio_emb]), isinstance(image, np.ndarray)
        )
        return heatmap, confidence

    def objectness(self, image: np.ndarray | Tensor) -> Any:
        """OGL's objectness map, eager under inference mode (and autocast when asked) in every mode.

        model.pt holds no objectness weights: the net is rebuilt from the manifest's ``ogl`` entry (the packaged
        EfficientNet-Lite0, or the ResNet18 weights file it was exported from) on first use and checked once
        against the exported objectness.onnx, so a changed or missing weights file is a clear error, never a
        silently different map. An engine whose source file is elsewhere still serves ``localize``."""
        if not self.has_objectness:
            return super().objectness(image)  # raises: no OGL graph in this engine
        self._check_image(image, "objectness")
        if self._objectness is None:
            self._objectness = self._load_objectness()
        with torch.inference_mode(), self._autocast():
            out = self._objectness(self._to_device(image))
        return self._finish((out,), isinstance(image, np.ndarray))[0]

    def _load_objectness(self) -> nn.Module:
        import onnxruntime as ort

        from avloc.core.ogl import EFFNET, load_objectness
        from avloc.engines.export import PARITY_FAIL, ObjectnessGraph

        entry = self.manifest["ogl"]
        spec = EFFNET if entry.get("objectness") == EFFNET else str(entry.get("source"))
        if spec != EFFNET and not Path(spec).is_file():
            raise UserError(
                f"{self.engine_dir}: the torch backend rebuilds the OGL objectness net from {spec} (manifest "
                "ogl.source), which is not on this machine; put the ResNet18 weights there or use onnxruntime"
            )
        graph = ObjectnessGraph(load_objectness(spec), self._image_config).eval()
        path = verified_file(self.engine_dir, entry["file"], entry.get("sha256"))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        image = np.random.default_rng(0).standard_normal((1, *self.image_shape), dtype=np.float32)
        with torch.inference_mode():
            ref = graph(torch.from_numpy(image)).numpy()
        got = session.run(None, {session.get_inputs()[0].name: image})[0]
        worst = float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max()))
        if worst > PARITY_FAIL:
            raise UserError(
                f"{self.engine_dir}: the OGL objectness net rebuilt from {spec} differs from {path.name} "
                f"(relative {worst:.1e}); were the weights changed after export? Re-export with --ogl"
            )
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return graph.to(self.torch_device, memory_format=memory_format)

    def synchronize(self) -> None:
        """Wait for queued device work (for timing); a no-op on CPU."""
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)

    def close(self) -> None:
        self._run_audio = self._run_visual = None  # type: ignore[assignment]
        self._audio = self._visual = self._objectness = None  # type: ignore[assignment]
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()

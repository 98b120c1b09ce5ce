"""TensorRT backend (TensorRT 10+ Python API, CUDA only).

Plans are built from the engine's ONNX graphs with an optimization profile over the dynamic batch axis
and cached next to them, keyed by GPU name, TensorRT version, precision and batch profile (a plan only runs
on the GPU model and TensorRT version that built it). Inference binds torch-allocated device buffers by
tensor name (``set_input_shape`` / ``set_tensor_address``) and runs ``execute_async_v3`` on this engine's
own torch CUDA stream: no pycuda, no per-call device synchronize (NumPy outputs wait only for their copy).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from avloc.core.errors import UserError
from avloc.engines.base import Engine, graph_file

log = logging.getLogger(__name__)
INSTALL_HINT = "TensorRT is not installed: pip install --extra-index-url https://pypi.nvidia.com tensorrt"


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise UserError(f"TensorRT {trt.__version__} is too old: avloc needs TensorRT >= 10 ({INSTALL_HINT})")
    return trt


_LOGGER: Any = None


def _logger(trt: Any) -> Any:
    """One process-wide logger: TensorRT keeps a raw pointer to it, so it must outlive builders/runtimes."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def plan_path(
    onnx_path: Path, trt_version: str, gpu_name: str, fp16: bool, batches: tuple[int, int, int]
) -> Path:
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    precision = "fp16" if fp16 else "fp32"
    return onnx_path.with_name(
        f"{onnx_path.stem}.{gpu}.trt{trt_version}.{precision}.b{'-'.join(map(str, batches))}.plan"
    )


def build_plan(
    trt: Any, onnx_path: Path, fp16: bool, batches: tuple[int, int, int], workspace_mb: int
) -> bytes:
    """Parse the ONNX graph and build a serialized engine with one min/opt/max batch profile."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT cannot parse this graph ({errors[:300]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        if not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast fp16; building %s in fp16 anyway", onnx_path.name)
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)[1:]
        if any(d < 0 for d in dims):
            raise UserError(
                f"{onnx_path}: input {tensor.name} has dynamic non-batch dims {tuple(tensor.shape)}"
            )
        profile.set_shape(tensor.name, *[(b, *dims) for b in batches])
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(
            f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)"
        )
    return bytes(plan)


class _TrtGraph:
    """One deserialized engine + execution context; I/O bound by tensor name."""

    def __init__(self, trt: Any, plan: bytes, device: Any, source: Path) -> None:
        import torch

        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserError(f"{source}: TensorRT could not deserialize the cached plan; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        self.device = device
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        dtypes = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.bool: torch.bool,
            trt.int8: torch.int8,
        }
        unsupported = [n for n in names if self.engine.get_tensor_dtype(n) not in dtypes]
        if unsupported:
            raise UserError(f"{source}: I/O tensor(s) {unsupported} have a dtype avloc does not bind")
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}

    def __call__(self, inputs: list[Any], stream: Any) -> list[Any]:
        import torch

        for name, x in zip(self.inputs, inputs):
            x = x.to(self.dtypes[name]).contiguous()
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outputs = []
        for name in self.outputs:
            out = torch.empty(
                tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device
            )
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return outputs


class TensorRTEngine(Engine):
    backend = "tensorrt"

    def __init__(
        self,
        engine_dir: str | Path,
        manifest: dict[str, Any],
        device: str = "cuda",
        threads: int | None = None,
        fp16: bool = True,
        max_batch: int = 8,
        opt_batch: int | None = None,
        workspace_mb: int = 1024,
        rebuild: bool = False,
    ) -> None:
        trt = import_tensorrt()
        import torch

        if device == "cpu":
            device = "cuda"  # TensorRT only runs on a GPU; "cpu" is the interface's default
        super().__init__(engine_dir, manifest, device)
        if not torch.cuda.is_available():
            raise UserError("the tensorrt backend needs a CUDA GPU; none is visible to torch")
        self.torch_device = torch.device(device)
        self.fp16 = fp16
        batches = (1, int(opt_batch or min(4, max_batch)), int(max_batch))
        if not 1 <= batches[1] <= batches[2]:
            raise UserError(f"tensorrt: need 1 <= opt_batch ({batches[1]}) <= max_batch ({batches[2]})")
        self.max_batch = batches[2]
        gpu = torch.cuda.get_device_name(self.torch_device)
        self._stream = torch.cuda.Stream(self.torch_device)
        self._graphs: dict[str, _TrtGraph] = {}
        with torch.cuda.device(self.torch_device):
            for graph in ("audio", "visual"):
                onnx_path = graph_file(engine_dir, manifest, graph)
                cached = plan_path(onnx_path, trt.__version__, gpu, fp16, batches)
                if cached.is_file() and not rebuild:
                    plan = cached.read_bytes()
                else:
                    log.info("building TensorRT %s plan for %s (once per GPU/TensorRT version)", graph, gpu)
                    plan = build_plan(trt, onnx_path, fp16, batches, workspace_mb)
                    tmp = cached.with_name(cached.name + ".tmp")
                    tmp.write_bytes(plan)
                    os.replace(tmp, cached)
                self._graphs[graph] = _TrtGraph(trt, plan, self.torch_device, cached)

    def _run(self, graph: str, arrays: list[Any]) -> list[Any]:
        import torch

        batch = int(arrays[0].shape[0])
        if batch > self.max_batch:
            raise UserError(
                f"tensorrt: batch {batch} > max_batch {self.max_batch} of the built plan; "
                "load the engine with a larger max_batch"
            )
        as_numpy = isinstance(arrays[0], np.ndarray)
        caller = torch.cuda.current_stream(self.torch_device)
        self._stream.wait_stream(caller)  # device inputs produced on the caller's stream must be ready
        with torch.cuda.stream(self._stream):  # allocations, copies and the engine all on one stream
            tensors = [
                torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(
                    self.torch_device, non_blocking=True
                )
                if isinstance(a, np.ndarray)
                else a.to(self.torch_device)
                for a in arrays
            ]
            outputs = self._graphs[graph](tensors, self._stream)
            if as_numpy:
                return [o.float().cpu().numpy() for o in outputs]
            outputs = [o.float() for o in outputs]
        # Device outputs: the caller's stream waits for ours (no host wait); the allocator learns of the use.
        caller.wait_stream(self._stream)
        for o in outputs:
            o.record_stream(caller)
        return outputs

    def embed_audio(self, spec: Any) -> Any:
        self._check_spec(spec)
        return self._run("audio", [spec])[0]

    def localize(self, image: Any, audio_emb: Any) -> tuple[Any, Any]:
        self._check_visual(image, audio_emb)
        heatmap, confidence = self._run("visual", [image, audio_emb])
        return heatmap, confidence

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        self._graphs.clear()

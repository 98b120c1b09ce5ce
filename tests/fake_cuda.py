"""CPU stand-ins that behave like a CUDA device where avloc's GPU path can go wrong (no GPU needed).

- :class:`FakeCudaTensor`: a ``torch.Tensor`` that reports device ``cuda:0`` and, like a real CUDA tensor,
  refuses implicit NumPy conversion (``np.asarray`` / ``.numpy()`` raise torch's own TypeError); ``.cpu()``
  works and first waits for the simulated device queue, as a device-to-host copy does.
- :class:`FakeCudaEngine`: the ONNX Runtime engine on the CPU dressed as a CUDA backend: frames are preprocessed
  "on the device" (:meth:`device_preprocessor` gives FakeCudaTensor images), and ``localize`` on device images
  returns FakeCudaTensor outputs whose work is still queued (``latency_s``) when it returns, as an
  asynchronous CUDA launch is.

``python tests/fake_cuda.py ARGS`` is the real inference worker (``avloc.stream.serve.inference.main``) with this
backend registered as ``fake_cuda``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avloc.engines.base import register_backend
from avloc.engines.onnxruntime_backend import OnnxRuntimeEngine
from avloc.engines.preprocess import DevicePreprocessor

# torch's message for np.asarray(cuda_tensor) / cuda_tensor.numpy()
CUDA_NUMPY_ERROR = (
    "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first."
)
_queue = {"done_at": 0.0}  # when the simulated device finishes the work queued so far (time.monotonic)


def queue_work(seconds: float) -> None:
    """Queue ``seconds`` of device work behind what is already queued (returns at once, like a launch)."""
    _queue["done_at"] = max(_queue["done_at"], time.monotonic()) + seconds


def wait_device() -> None:
    """Block until the queued work is done (``cudaStreamSynchronize``)."""
    remaining = _queue["done_at"] - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that looks like a CUDA one to code that asks, and refuses what CUDA tensors refuse."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def numpy(self, *args: Any, **kwargs: Any) -> np.ndarray:  # type: ignore[override]
        raise TypeError(CUDA_NUMPY_ERROR)

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(CUDA_NUMPY_ERROR)

    def cpu(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        wait_device()  # a device-to-host copy waits for the work that produced the tensor
        return self.as_subclass(torch.Tensor).clone()


def on_device(array: np.ndarray) -> FakeCudaTensor:
    return torch.from_numpy(np.ascontiguousarray(array)).as_subclass(FakeCudaTensor)


class FakeCudaEngine(OnnxRuntimeEngine):
    """ONNX Runtime on the CPU, behaving like the torch/TensorRT backends on CUDA (see the module docstring)."""

    backend = "fake_cuda"

    def __init__(
        self,
        engine_dir: str | Path,
        manifest: dict[str, Any],
        device: str = "cuda",
        threads: int | None = None,
        latency_s: float = 0.05,
    ) -> None:
        super().__init__(engine_dir, manifest, device="cpu", threads=threads)
        self.device = "cuda:0"
        self.latency_s = float(latency_s)
        self.device_inputs = 0  # localize calls that got device images (what the worker must send)

    def device_preprocessor(self, max_batch: int) -> Callable[[Sequence[np.ndarray]], Any]:
        pre = DevicePreprocessor(self.manifest, "cpu", max_batch)
        return lambda frames: pre(frames).as_subclass(FakeCudaTensor)

    def localize(self, image: Any, audio_emb: Any) -> tuple[Any, Any]:
        if not isinstance(image, torch.Tensor):  # NumPy in -> NumPy out, as the real device backends
            return super().localize(image, audio_emb)
        self.device_inputs += 1
        emb = audio_emb.as_subclass(torch.Tensor).numpy() if isinstance(audio_emb, torch.Tensor) else audio_emb
        heatmap, confidence = super().localize(image.as_subclass(torch.Tensor).numpy(), emb)
        queue_work(self.latency_s)
        return on_device(heatmap), on_device(confidence)

    def synchronize(self) -> None:
        wait_device()


def register() -> None:
    register_backend("fake_cuda", FakeCudaEngine)


if __name__ == "__main__":
    register()
    from avloc.stream.serve.inference import main

    sys.exit(main(sys.argv[1:]))

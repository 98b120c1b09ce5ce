"""Deployable engines: ONNX export and inference backends (ONNX Runtime, PyTorch, TensorRT, Triton client)."""

from avloc.engines.base import register_backend

# A remote backend: NVIDIA Triton Inference Server over gRPC (needs the `triton` extra; imported when chosen).
register_backend("triton", "avloc.engines.triton_backend:TritonEngine")

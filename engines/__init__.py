"""Deployable engines: ONNX export and inference backends (ONNX Runtime, PyTorch, TensorRT)."""

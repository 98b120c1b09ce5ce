"""Fake ``tensorrt`` modules shaped like the 10.x and 11.x Python APIs, for tests/test_tensorrt_fake.py.

Each fake records every call with its arguments (``calls``) and has only the API of its version (the 11.x fake has
no ``BuilderFlag.FP16`` nor ``Builder.platform_has_fast_fp16``, so code using them fails with AttributeError as it
would on a real 11.x); ``behaviour`` keywords make chosen calls fail the way TensorRT reports failures.
"""

from __future__ import annotations

import ctypes
import os
import time
import types

import numpy as np
import onnx

VERSIONS = {10: "10.16.1.11", 11: "11.4.0.106"}


GPU = "NVIDIA H200"


def make_fake_trt(major: int, **behaviour: object) -> types.ModuleType:
    """A ``tensorrt`` module of the given major version. ``behaviour`` switches failure returns on:
    parse_ok, plan (bytes or None), cache_match, profile_index, engine_ok, shape_ok, execute_ok; and
    build_s (seconds a build takes), build_log (a file each build appends a line to), io (the engine's I/O in
    the engine's order: (name, mode, dtype, per-sample shape) tuples) with compute (name -> array inputs ->
    name -> array outputs, run by execute_async_v3 on the bound addresses, as a real engine reads and writes
    device memory); readable (plan bytes -> whether deserialize_cuda_engine can read them: a real TensorRT
    returns None for a truncated or damaged plan) and cache_readable (the same for create_timing_cache).

    Like the real API, ``set_tensor_address`` refuses an address that is not 256-byte aligned
    (IExecutionContext::setTensorAddress: "The pointer must have at least 256-byte alignment")."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSIONS[major]
    trt.calls = []
    b = {
        "parse_ok": True,
        "plan": b"PLAN",
        "cache_match": True,
        "profile_index": 0,
        "engine_ok": True,
        "shape_ok": True,
        "execute_ok": True,
        "build_s": 0.0,
        "build_log": None,
        "io": (("x", "INPUT", "float32", (None,)), ("y", "OUTPUT", "float32", (2,))),
        "compute": None,
        "readable": lambda plan: True,
        "cache_readable": lambda data: True,
    } | behaviour

    def record(name: str, *args: object) -> None:
        trt.calls.append((name, args))

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity: str) -> None:
            record("Logger", severity)

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1 if major == 10 else 0  # 10.x: after EXPLICIT_BATCH (0); 11.x: the only member

    if major == 10:
        NetworkDefinitionCreationFlag.EXPLICIT_BATCH = 0

    class BuilderFlag:
        TF32 = "TF32"

    if major == 10:  # weak-typing flags, removed in 11.x
        BuilderFlag.FP16 = "FP16"
        BuilderFlag.INT8 = "INT8"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class TensorIOMode:
        INPUT = "INPUT"
        OUTPUT = "OUTPUT"

    class Tensor:
        def __init__(self, name: str, shape: tuple[int, ...]) -> None:
            self.name, self.shape = name, shape

    class Network:
        def __init__(self) -> None:
            self.inputs: list[Tensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

    class ParserError:
        def node(self) -> int:
            return 3

        def desc(self) -> str:
            return "Unsupported operator FancyOp"

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.num_errors = 0

        def parse(self, model: bytes, path: str | None = None) -> bool:
            record("parse", model, path)
            if not b["parse_ok"]:
                self.num_errors = 1
                return False
            graph = onnx.load_from_string(model).graph
            initializers = {i.name for i in graph.initializer}
            for value in graph.input:
                if value.name not in initializers:
                    dims = tuple(
                        d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim
                    )
                    self.network.inputs.append(Tensor(value.name, dims))
            return True

        def get_error(self, i: int) -> ParserError:
            return ParserError()

    class HostMemory(bytes):
        pass

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> HostMemory:
            return HostMemory(self.data + b"+tuned")

    class Profile:
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            record("set_shape", name, lo, opt, hi)

    class BuilderConfig:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            record("set_memory_pool_limit", pool, size)

        def set_flag(self, flag: str) -> None:
            record("set_flag", flag)

        def clear_flag(self, flag: str) -> None:
            record("clear_flag", flag)

        def create_timing_cache(self, data: bytes) -> TimingCache:
            record("create_timing_cache", bytes(data))
            return TimingCache(bytes(data)) if b["cache_readable"](bytes(data)) else None

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            record("set_timing_cache", cache.data, ignore_mismatch)
            ok = b["cache_match"] or cache.data == b""
            if ok:
                self.cache = cache
            return ok

        def get_timing_cache(self) -> TimingCache:
            return self.cache

        def add_optimization_profile(self, profile: Profile) -> int:
            record("add_optimization_profile")
            return b["profile_index"]

    class Builder:
        def __init__(self, logger: Logger) -> None:
            record("Builder")

        def create_network(self, flags: int) -> Network:
            record("create_network", flags)
            return Network()

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> HostMemory | None:
            record("build_serialized_network")
            if b["build_log"] is not None:
                with open(b["build_log"], "a") as f:
                    f.write(f"build {os.getpid()}\n")
            time.sleep(b["build_s"])
            if callable(b["plan"]):  # a plan per graph: e.g. named after its inputs
                return HostMemory(b["plan"](network))
            return None if b["plan"] is None else HostMemory(b["plan"])

    if major == 10:
        Builder.platform_has_fast_fp16 = property(lambda self: True)  # removed in 11.x

    # runtime
    float32, float16, int32 = "float32", "float16", "int32"

    def io_of(plan: bytes) -> tuple[dict[str, tuple], object]:
        """(name -> (mode, dtype, shape), compute) of a plan: one set for all, or per plan (dicts)."""
        io, compute = b["io"], b["compute"]
        io = io[bytes(plan)] if isinstance(io, dict) else io
        compute = compute[bytes(plan)] if isinstance(compute, dict) else compute
        return {name: (mode, dtype, shape) for name, mode, dtype, shape in io}, compute

    class Context:
        def __init__(self, io: dict[str, tuple], compute: object) -> None:
            self.io, self.compute = io, compute
            self.shapes: dict[str, tuple] = {}
            self.addresses: dict[str, int] = {}

        def __del__(self) -> None:
            record("destroy_context")

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            record("set_input_shape", name, shape)
            self.shapes[name] = shape
            return bool(b["shape_ok"])

        def set_tensor_address(self, name: str, address: int) -> bool:
            record("set_tensor_address", name, address)
            if address % 256:
                return False
            self.addresses[name] = address
            return True

        def get_tensor_shape(self, name: str) -> tuple:
            batch = next(iter(self.shapes.values()))[0]
            return (batch, *self.io[name][2])

        def _array(self, name: str, shape: tuple) -> np.ndarray:
            dtype = np.dtype(self.io[name][1])
            buffer = (ctypes.c_char * (int(np.prod(shape)) * dtype.itemsize)).from_address(self.addresses[name])
            return np.frombuffer(buffer, dtype=dtype).reshape(shape)

        def execute_async_v3(self, stream: int) -> bool:
            record("execute_async_v3", stream)
            if self.compute is not None:
                inputs = {n: self._array(n, self.shapes[n]) for n, (mode, *_) in self.io.items() if mode == "INPUT"}
                for name, value in self.compute(inputs).items():
                    self._array(name, self.get_tensor_shape(name))[...] = value
            return bool(b["execute_ok"])

    class CudaEngine:
        def __init__(self, plan: bytes) -> None:
            self.io, self.compute = io_of(plan)
            self.names = tuple(self.io)
            self.num_io_tensors = len(self.io)

        def __del__(self) -> None:
            record("destroy_engine")

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> str:
            return TensorIOMode.INPUT if self.io[name][0] == "INPUT" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> str:
            return self.io[name][1]

        def create_execution_context(self) -> Context:
            return Context(self.io, self.compute)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> CudaEngine | None:
            record("deserialize_cuda_engine", plan)
            return CudaEngine(plan) if b["engine_ok"] and b["readable"](bytes(plan)) else None

    for obj in (
        Logger,
        NetworkDefinitionCreationFlag,
        BuilderFlag,
        MemoryPoolType,
        TensorIOMode,
        OnnxParser,
        Builder,
        Runtime,
    ):
        setattr(trt, obj.__name__, obj)
    trt.float32, trt.float16, trt.int32 = float32, float16, int32
    return trt


def calls(trt: types.ModuleType, name: str) -> list[tuple]:
    return [args for n, args in trt.calls if n == name]

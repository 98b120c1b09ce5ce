"""TensorRT backend (TensorRT 10.x and 11.x Python API, CUDA only).

Build: the engine's ONNX graph is parsed into a *strongly typed* network (``STRONGLY_TYPED`` creation flag:
required on 10.x for strong typing, accepted and ignored on 11.x where every network is strongly typed).
Precision therefore lives in the graph, not in builder flags (``BuilderFlag.FP16`` and
``Builder.platform_has_fast_fp16`` are gone in 11.x): for fp16 the ONNX graph is cast to float16 with
float32 inputs/outputs kept (:func:`onnx_fp16_bytes`) before parsing. One optimisation profile covers batch
1..``max_batch``; a timing cache file next to the graphs makes rebuilds (other profiles, other precision)
fast; plans are cached under a key of ONNX sha256 + TensorRT version + GPU name + precision + profile, so a
re-exported graph, an upgraded TensorRT or another GPU model never loads a stale plan.

Run: I/O bound by tensor name (``set_input_shape`` / ``set_tensor_address``) to torch-allocated device
buffers, ``execute_async_v3`` on this engine's own torch CUDA stream; no pycuda, no per-call device
synchronize (NumPy outputs wait only for their own copy). Every TensorRT call whose result says "failed"
(``False`` / ``None`` / ``-1``) raises with what failed and on which graph.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from avloc.core.errors import UserError
from avloc.engines.base import Engine, check_device, graph_file, sha256_file, verified_file

log = logging.getLogger(__name__)
INSTALL_HINT = "TensorRT is not installed: pip install 'avloc[gpu]' (or pip install tensorrt-cu13)"
# "fp32" is IEEE float32: TensorRT's TF32 builder flag (on by default) is cleared; "tf32" keeps it (float32
# tensors, convolutions/matmuls with 10-bit mantissa inputs); "fp16" is the float16-cast graph.
PRECISIONS = ("fp32", "tf32", "fp16")


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    if trt_major(trt) < 10:
        raise UserError(f"TensorRT {trt.__version__} is too old: avloc needs TensorRT 10 or 11 ({INSTALL_HINT})")
    return trt


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


_LOGGER: Any = None


def _logger(trt: Any) -> Any:
    """One process-wide logger: TensorRT keeps a raw pointer to it, so it must outlive builders/runtimes."""
    global _LOGGER
    if _LOGGER is None or not isinstance(_LOGGER, trt.Logger):
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


# ---------------------------------------------------------------------------------------------- cache keys


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def plan_key(onnx_sha256: str, trt_version: str, gpu_name: str, precision: str, batches: tuple[int, int, int]) -> str:
    """Short hash of everything a serialized plan depends on (TensorRT refuses plans from another GPU model or
    version; a changed graph or profile needs a rebuild)."""
    fields = {
        "onnx_sha256": onnx_sha256,
        "tensorrt": trt_version,
        "gpu": gpu_name,
        "precision": precision,
        "batches": list(batches),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def plan_path(
    onnx_path: Path,
    onnx_sha256: str,
    trt_version: str,
    gpu_name: str,
    precision: str,
    batches: tuple[int, int, int],
) -> Path:
    """``visual.<gpu>.trt<version>.<precision>.b1-4-8.<key>.plan`` next to the ONNX graph: readable fields for
    people, the key (which also covers the ONNX hash) for correctness."""
    key = plan_key(onnx_sha256, trt_version, gpu_name, precision, batches)
    name = f"{onnx_path.stem}.{_slug(gpu_name)}.trt{trt_version}.{precision}.b{'-'.join(map(str, batches))}.{key}.plan"
    return onnx_path.with_name(name)


def timing_cache_path(engine_dir: Path, trt_version: str, gpu_name: str) -> Path:
    """One timing cache per GPU model and TensorRT version, shared by both graphs and every profile."""
    return Path(engine_dir) / f"tensorrt.{_slug(gpu_name)}.trt{trt_version}.timing.cache"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file unique to this call, then rename over ``path``: readers see the old file or the
    whole new one, and two writers never share (or remove) each other's temp file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _build_lock(engine_dir: Path, trt_version: str, gpu_name: str) -> Iterator[None]:
    """Exclusive lock for building plans of one engine directory, GPU model and TensorRT version: inference
    workers starting together build each plan once (the others wait, then read it) and never interleave
    their timing-cache updates. An advisory ``flock``: released by the kernel if the holder dies."""
    path = Path(engine_dir) / f".tensorrt.{_slug(gpu_name)}.trt{trt_version}.lock"
    try:
        f = open(path, "a+b")  # noqa: SIM115 - closed below, after the unlock
    except OSError as err:
        raise UserError(f"{engine_dir}: {_UNWRITABLE} ({err.strerror or err})") from None
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


_UNWRITABLE = "cannot write TensorRT plans in this engine directory; make it writable (plans are built once per GPU)"


def _remove_dead_temp_files(engine_dir: Path, trt_version: str, gpu_name: str) -> None:
    """Temp files of plan/timing-cache writes for this GPU and TensorRT version whose writer was killed mid-write
    (the rename never happened). Called under :func:`_build_lock`: only its holder writes these files, so every
    one found is dead (a plan's is as large as the plan)."""
    for tmp in Path(engine_dir).glob(f".*.{_slug(gpu_name)}.trt{trt_version}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


# ---------------------------------------------------------------------------------------------- build


# Inputs that must stay float32 whatever the compute type (ONNX spec): Resize's roi and scales.
_FP32_INPUTS = {("Resize", 1), ("Resize", 2)}


# The L2 norms of F.normalize (ReduceL2 -> Clip(min=eps) -> Expand -> Div) stay float32, see _fp32_islands.
_NORM_OPS = {"ReduceL2", "ReduceSumSquare", "LpNormalization"}
_ISLAND_PASS = {"Clip", "Max", "Expand", "Unsqueeze", "Reshape", "Sqrt", "Add"}  # carry a norm on
_ISLAND_END = {"Div", "Mul"}  # x / norm: computed in float32, the (unit-scale) result cast back to float16


def _fp32_islands(graph: Any) -> tuple[set[int], set[int]]:
    """Indices of the nodes that must compute in float32 when the graph is cast to float16, and of those among
    them whose outputs are cast back to float16.

    An L2 norm in float16 breaks a cosine map twice: ``F.normalize``'s eps (1e-12) is float16 0, so a zero
    vector gives 0/0 = NaN; and onnx-tensorrt imports ReduceL2 as sqrt(ReduceSumSquare(x)), whose sum passes
    float16's 65504 once the norm passes 256 (inf, then x/inf = 0: a flat map). So each norm node, the nodes
    that carry its result (Clip with the eps, Expand, ...) and the Div/Mul that applies it run in float32; only
    the normalized (|x| <= 1) result goes back to float16."""
    island: set[int] = set()
    ends: set[int] = set()
    values: set[str] = set()
    for i, node in enumerate(graph.node):
        if node.op_type in _NORM_OPS:
            island.add(i)
            if node.op_type == "LpNormalization":
                ends.add(i)  # normalizes in one op: its output is unit scale
            else:
                values.update(node.output)
        elif any(name in values for name in node.input):
            if node.op_type in _ISLAND_PASS:
                island.add(i)
                values.update(node.output)
            elif node.op_type in _ISLAND_END:
                island.add(i)
                ends.add(i)
            else:
                raise UserError(
                    f"fp16 cast: a norm feeds {node.op_type} node {node.name!r}, which the float32 island "
                    f"does not handle; build this graph in fp32"
                )
    return island, ends


# A scalar bound of Clip / Max / Min is an eps floor (``clamp_min(1e-6)`` before a division): cast to float16 it must
# stay a normal number, see _eps_to_fp16_normal.
_FLOOR_OPS = {"Clip", "Max", "Min"}
FP16_TINY = float(np.finfo(np.float16).tiny)  # 6.1e-5, the smallest normal float16


def _eps_to_fp16_normal(value: np.ndarray) -> np.ndarray:
    """An eps of magnitude below :data:`FP16_TINY` (1e-6, 1e-12) is a float16 subnormal or 0; GPU float16 kernels that
    flush subnormals to zero then divide an all-zero map by 0 (NaN). Such an eps becomes +-FP16_TINY, the smallest
    float16 that survives; 0 and normal values are kept."""
    small = (value != 0) & (np.abs(value) < FP16_TINY)
    return np.where(small, np.sign(value) * FP16_TINY, value).astype(value.dtype)


def onnx_fp16_bytes(onnx_path: Path) -> bytes:
    """The graph computing in float16 with float32 inputs/outputs kept, for a strongly typed TensorRT build.

    Float32 initializers, Constant values and ``Cast(to=float)`` become float16; a Cast to float16 follows each
    float32 graph input and a Cast back to float32 precedes each float32 output, so callers still feed and get
    float32. Stale ``value_info`` types are dropped (TensorRT and ONNX Runtime infer them). onnxconverter-
    common's ``convert_float_to_float16`` was tried first and left mixed float/float16 edges in both avloc
    graphs (ONNX Runtime: "Type parameter (T) of Optype (Conv) bound to different types").
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    del graph.value_info[:]
    island, ends = _fp32_islands(graph)
    # float32 values of the constants the islands read (before they are cast below): e.g. the 1e-12 eps
    originals = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                    originals[node.output[0]] = numpy_helper.to_array(attr.t)
    keep32 = {
        node.input[k] for node in graph.node for (op, k) in _FP32_INPUTS if node.op_type == op and len(node.input) > k
    }

    # Clip's min/max, and every operand of Max/Min: the values that can be an eps floor
    floors = {
        name for node in graph.node if node.op_type in _FLOOR_OPS for name in node.input[node.op_type == "Clip" :]
    }

    def to16(tensor: Any, floor: bool = False) -> Any:
        value = numpy_helper.to_array(tensor)
        if floor and value.size == 1:
            value = _eps_to_fp16_normal(value)
        return numpy_helper.from_array(value.astype(np.float16), tensor.name)

    for idx, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT and init.name not in keep32:
            graph.initializer[idx].CopyFrom(to16(init, init.name in floors))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                if not (node.op_type == "Constant" and node.output[0] in keep32):
                    attr.t.CopyFrom(to16(attr.t, node.op_type == "Constant" and node.output[0] in floors))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    # A float16 value computed in the graph feeding an fp32-only input: cast it back just before its consumer.
    produced = {out for node in graph.node if node.op_type != "Constant" for out in node.output}
    island_values = {out for i in island for out in graph.node[i].output}
    graph_inputs = {v.name for v in graph.input if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    body = []
    for index, node in enumerate(graph.node):
        if index in island:
            body += _to_fp32_island(node, index in ends, island_values, originals, produced | graph_inputs)
            continue
        for op, k in _FP32_INPUTS:
            if node.op_type == op and len(node.input) > k and node.input[k] in produced:
                name = node.input[k]
                body.append(helper.make_node("Cast", [name], [f"{name}__fp32"], to=TensorProto.FLOAT))
                node.input[k] = f"{name}__fp32"
        body.append(node)
    head, tail = [], []
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            half = f"{value.name}__fp16"
            for node in body:  # body, not graph.node: the islands' Casts read graph inputs/outputs too
                for k, name in enumerate(node.input):
                    if name == value.name:
                        node.input[k] = half
            head.append(helper.make_node("Cast", [value.name], [half], to=TensorProto.FLOAT16))
    for value in graph.output:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            half = f"{value.name}__fp16"
            for node in body:  # e.g. an L2-normalized embedding output: the island's Cast back produces it
                for k, name in enumerate(node.output):
                    if name == value.name:
                        node.output[k] = half
                for k, name in enumerate(node.input):
                    if name == value.name:
                        node.input[k] = half
            tail.append(helper.make_node("Cast", [half], [value.name], to=TensorProto.FLOAT))
    nodes = head + body + tail
    used = {name for node in nodes for name in node.input} | {v.name for v in graph.output}
    # Constants an island replaced by their float32 copies are left unused: drop them (ORT warns otherwise).
    nodes = [n for n in nodes if n.op_type != "Constant" or any(out in used for out in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
    initializers = [i for i in graph.initializer if i.name in used]  # likewise initializers (e.g. the eps)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _to_fp32_island(
    node: Any, end: bool, island_values: set[str], originals: dict[str, np.ndarray], float_values: set[str]
) -> list[Any]:
    """``node`` of an fp32 island (:func:`_fp32_islands`) with the Casts around it: float16 inputs cast up,
    constants re-added as their original float32 values, and for an end node the output cast back to float16.
    Non-float inputs (Expand's shape, Reshape's shape, Clip's absent max) pass as they are."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    for k, name in enumerate(node.input):
        if not name or name in island_values:
            continue
        if name in originals:  # a float constant: its float32 value, not the float16 copy (eps would be 0)
            const = f"{name}__fp32"
            value = numpy_helper.from_array(originals[name].astype(np.float32), const)
            nodes.append(helper.make_node("Constant", [], [const], value=value))
            node.input[k] = const
        elif name in float_values and (node.op_type not in ("Expand", "Reshape") or k == 0):
            up = f"{name}__fp32_{node.name or node.output[0]}"
            nodes.append(helper.make_node("Cast", [name], [up], to=TensorProto.FLOAT))
            node.input[k] = up
    if end:
        out = node.output[0]
        node.output[0] = f"{out}__fp32"
        return [*nodes, node, helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT16)]
    return [*nodes, node]


def _parser_errors(parser: Any) -> str:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        errors.append(f"node {err.node()}: {err.desc()}")
    return "; ".join(errors) or "no parser error recorded"


def build_plan(
    trt: Any,
    onnx_path: Path,
    precision: str,
    batches: tuple[int, int, int],
    workspace_mb: int,
    timing_cache: Path | None = None,
) -> bytes:
    """Parse the ONNX graph into a strongly typed network and build a serialized engine with one min/opt/max
    batch profile. The timing cache (if given) is read first and written back after a successful build."""
    if precision not in PRECISIONS:
        raise UserError(f"tensorrt precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    model = onnx_fp16_bytes(onnx_path) if precision == "fp16" else onnx_path.read_bytes()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise RuntimeError("TensorRT could not create a builder (is a CUDA GPU visible? see the TensorRT log)")
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    if network is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not create a strongly typed network")
    parser = trt.OnnxParser(network, logger)
    # path= lets the parser find external weight files next to the graph.
    if not parser.parse(model, str(onnx_path)):
        raise UserError(f"{onnx_path}: TensorRT cannot parse this graph ({_parser_errors(parser)[:400]})")
    config = builder.create_builder_config()
    if config is None:
        raise RuntimeError("TensorRT could not create a builder config")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and precision != "tf32":
        # TF32 is on by default: without this an "fp32" plan would run its convolutions in TF32 on Ampere+.
        config.clear_flag(tf32)

    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None and cache_bytes:
        # Unreadable (damaged) cache file: it only saves build time, so start a new one rather than fail.
        log.warning("timing cache %s is unreadable; starting a new one", timing_cache)
        cache = config.create_timing_cache(b"")
    if cache is None:
        raise RuntimeError("TensorRT could not create an empty timing cache (see the TensorRT log)")
    if not config.set_timing_cache(cache, False):
        # A cache from another device/version is refused rather than silently mixed in: start a fresh one.
        log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", timing_cache)
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            raise RuntimeError("TensorRT refused a fresh, empty timing cache")

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)[1:]
        if any(d < 0 for d in dims):
            raise UserError(f"{onnx_path}: input {tensor.name} has dynamic non-batch dims {tuple(tensor.shape)}")
        profile.set_shape(tensor.name, *[(b, *dims) for b in batches])
    if config.add_optimization_profile(profile) < 0:
        raise RuntimeError(f"{onnx_path}: TensorRT rejected the optimisation profile batch {batches}")

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    if timing_cache is not None:
        try:
            _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
        except OSError as err:  # the plan is good; only the next build's speed-up is lost
            log.warning("could not write timing cache %s: %s", timing_cache, err)
    return bytes(plan)


def load_or_build_plan(
    trt: Any,
    engine_dir: Path,
    onnx_path: Path,
    onnx_sha256: str,
    gpu_name: str,
    precision: str,
    batches: tuple[int, int, int],
    workspace_mb: int = 1024,
    rebuild: bool = False,
) -> tuple[bytes, Path]:
    """The cached plan for this (graph, TensorRT, GPU, precision, profile), built and cached when missing."""
    cached = plan_path(onnx_path, onnx_sha256, trt.__version__, gpu_name, precision, batches)
    if cached.is_file() and not rebuild:
        return cached.read_bytes(), cached
    asked = time.time()
    with _build_lock(engine_dir, trt.__version__, gpu_name):
        # Another worker may have built it while this one waited for the lock (with rebuild: after we asked).
        if cached.is_file() and (not rebuild or cached.stat().st_mtime >= asked):
            return cached.read_bytes(), cached
        log.info(
            "building TensorRT %s %s plan for %s (once per graph/GPU/TensorRT version)",
            onnx_path.name,
            precision,
            gpu_name,
        )
        _remove_dead_temp_files(engine_dir, trt.__version__, gpu_name)
        cache = timing_cache_path(engine_dir, trt.__version__, gpu_name)
        plan = build_plan(trt, onnx_path, precision, batches, workspace_mb, timing_cache=cache)
        try:
            _atomic_write(cached, plan)
        except OSError as err:  # disk full, read-only: one line, not a traceback after minutes of building
            raise UserError(f"{cached}: {_UNWRITABLE} ({err.strerror or err})") from None
    return plan, cached


class PlanUnreadable(UserError):
    """TensorRT could not deserialize a plan (damaged file, or built by an incompatible TensorRT)."""


def load_graph(
    trt: Any,
    engine_dir: Path,
    onnx_path: Path,
    onnx_sha256: str,
    gpu_name: str,
    precision: str,
    batches: tuple[int, int, int],
    device: Any,
    io_names: tuple[list[str], list[str]] | None = None,
    workspace_mb: int = 1024,
    rebuild: bool = False,
) -> _TrtGraph:
    """The plan from the cache (built when missing) deserialized into a :class:`_TrtGraph`. A cached plan that
    TensorRT cannot read (truncated by a full disk or a copy, damaged) is rebuilt once, under the build lock,
    instead of failing every start until someone deletes it; a plan built just now that fails is an error."""
    asked = time.time()
    plan, cached = load_or_build_plan(
        trt, engine_dir, onnx_path, onnx_sha256, gpu_name, precision, batches, workspace_mb, rebuild
    )
    try:
        return _TrtGraph(trt, plan, device, cached, io_names)
    except PlanUnreadable:
        if rebuild or cached.stat().st_mtime >= asked:  # built during this call: rebuilding would not help
            raise
        log.warning("%s: TensorRT cannot deserialize this cached plan; rebuilding it", cached)
    plan, cached = load_or_build_plan(
        trt, engine_dir, onnx_path, onnx_sha256, gpu_name, precision, batches, workspace_mb, rebuild=True
    )
    return _TrtGraph(trt, plan, device, cached, io_names)


# ---------------------------------------------------------------------------------------------- run


def _torch_dtypes(trt: Any) -> dict[Any, Any]:
    import torch

    # getattr: the set of DataType members differs between versions; bind what this TensorRT has.
    names = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int32": torch.int32,
        "int64": torch.int64,
        "bool": torch.bool,
        "int8": torch.int8,
        "uint8": torch.uint8,
    }
    return {getattr(trt, n): t for n, t in names.items() if hasattr(trt, n)}


# IExecutionContext::setTensorAddress: "The pointer must have at least 256-byte alignment." Fresh CUDA caching-
# allocator blocks are, a slice of a batch (``emb[1:]``) need not be.
ALIGN_BYTES = 256


def _aligned_empty(shape: tuple[int, ...], dtype: Any, device: Any) -> Any:
    """An uninitialized tensor whose data pointer is a multiple of :data:`ALIGN_BYTES` on any device."""
    import torch

    item = torch.empty((), dtype=dtype).element_size()
    count = math.prod(shape)
    buffer = torch.empty(count + ALIGN_BYTES // item, dtype=dtype, device=device)
    offset = (-buffer.data_ptr() % ALIGN_BYTES) // item
    return buffer[offset : offset + count].view(shape)


def _aligned(x: Any) -> Any:
    """``x`` itself when its data is aligned for TensorRT, else an aligned copy (queued on the current stream)."""
    if x.data_ptr() % ALIGN_BYTES == 0:
        return x
    out = _aligned_empty(tuple(x.shape), x.dtype, x.device)
    out.copy_(x)
    return out


def onnx_io_names(onnx_path: Path) -> tuple[list[str], list[str]]:
    """(input names, output names) of an ONNX graph in its order: what the engine's callers pass and expect."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return [v.name for v in graph.input if v.name not in initializers], [v.name for v in graph.output]


class _TrtGraph:
    """One deserialized engine + execution context; I/O bound by tensor name, never by position: TensorRT does
    not promise that its I/O index order is the ONNX graph's."""

    def __init__(
        self, trt: Any, plan: bytes, device: Any, source: Path, io_names: tuple[list[str], list[str]] | None = None
    ) -> None:
        self.source = source
        self.runtime = trt.Runtime(_logger(trt))
        if self.runtime is None:
            raise RuntimeError("TensorRT could not create a runtime (see the TensorRT log)")
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise PlanUnreadable(f"{source}: TensorRT could not deserialize the cached plan; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"{source}: TensorRT could not create an execution context (out of GPU memory?)")
        self.device = device
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if io_names is not None and (set(io_names[0]) != set(self.inputs) or set(io_names[1]) != set(self.outputs)):
            raise UserError(
                f"{source}: the plan's I/O tensors (inputs {self.inputs}, outputs {self.outputs}) are not the ONNX "
                f"graph's (inputs {io_names[0]}, outputs {io_names[1]}); delete the plan to rebuild it"
            )
        dtypes = _torch_dtypes(trt)
        unsupported = [n for n in names if self.engine.get_tensor_dtype(n) not in dtypes]
        if unsupported:
            raise UserError(f"{source}: I/O tensor(s) {unsupported} have a dtype avloc does not bind")
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}

    def __call__(self, inputs: dict[str, Any], stream: Any) -> dict[str, Any]:
        """Bind ``inputs`` (name -> tensor on this graph's device) and queue the engine on ``stream``; returns
        name -> output tensor (queued, not finished)."""
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise RuntimeError(f"{self.source.name}: no tensor given for input(s) {missing}")
        bound = []  # keep converted inputs alive until the engine has been queued
        for name in self.inputs:
            x = _aligned(inputs[name].to(self.dtypes[name]).contiguous())
            bound.append(x)
            if not self.context.set_input_shape(name, tuple(x.shape)):
                raise UserError(
                    f"{self.source.name}: TensorRT refused input {name!r} shape {tuple(x.shape)} "
                    "(outside the plan's optimisation profile?)"
                )
            if not self.context.set_tensor_address(name, x.data_ptr()):
                raise RuntimeError(f"{self.source.name}: TensorRT refused the address of input {name!r}")
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.source.name}: TensorRT could not infer output {name!r} shape {shape}")
            out = _aligned_empty(shape, self.dtypes[name], self.device)
            if not self.context.set_tensor_address(name, out.data_ptr()):
                raise RuntimeError(f"{self.source.name}: TensorRT refused the address of output {name!r}")
            outputs[name] = out
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.source.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        return outputs

    def destroy(self) -> None:
        """Free the context, then the engine, then the runtime (TensorRT's order). The caller has synchronized
        the stream the context's work was queued on."""
        self.context = None
        self.engine = None
        self.runtime = None


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
        tf32: bool = False,
    ) -> None:
        trt = import_tensorrt()
        import torch

        if device == "cpu":
            device = "cuda"  # TensorRT only runs on a GPU; "cpu" is the interface's default
        super().__init__(engine_dir, manifest, device)
        if not torch.cuda.is_available():
            raise UserError("the tensorrt backend needs a CUDA GPU; none is visible to torch")
        self.torch_device = torch.device(check_device(device))
        if fp16 and tf32:
            raise UserError("tensorrt: choose one of fp16 and tf32 (tf32 is float32 with TF32 convolutions)")
        self.fp16 = fp16
        self.precision = "fp16" if fp16 else "tf32" if tf32 else "fp32"
        batches = (1, int(opt_batch or min(4, max_batch)), int(max_batch))
        if not 1 <= batches[1] <= batches[2]:
            raise UserError(f"tensorrt: need 1 <= opt_batch ({batches[1]}) <= max_batch ({batches[2]})")
        self.max_batch = batches[2]
        gpu = torch.cuda.get_device_name(self.torch_device)
        self._stream = torch.cuda.Stream(self.torch_device)
        self._graphs: dict[str, _TrtGraph] = {}
        self._io: dict[str, tuple[list[str], list[str]]] = {}  # graph -> ONNX (input, output) names, in order
        self._build = (trt, gpu, batches, workspace_mb, rebuild)  # also for OGL's objectness graph, on first use
        for graph in ("audio", "visual"):
            onnx_path = graph_file(engine_dir, manifest, graph)
            self._graphs[graph] = self._load_graph(graph, onnx_path, manifest["graphs"][graph].get("sha256"))

    def _load_graph(self, graph: str, onnx_path: Path, onnx_sha: str | None) -> _TrtGraph:
        import torch

        trt, gpu, batches, workspace_mb, rebuild = self._build
        self._io[graph] = onnx_io_names(onnx_path)
        with torch.cuda.device(self.torch_device):
            return load_graph(
                trt,
                self.engine_dir,
                onnx_path,
                onnx_sha or sha256_file(onnx_path),
                gpu,
                self.precision,
                batches,
                self.torch_device,
                self._io[graph],
                workspace_mb,
                rebuild,
            )

    def _run(self, graph: str, arrays: list[Any]) -> list[Any]:
        import torch

        from avloc.engines.preprocess import upload

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
                upload(a, self.torch_device) if isinstance(a, np.ndarray) else a.to(self.torch_device) for a in arrays
            ]
            for t in tensors:
                if t.is_cuda:  # made on the caller's stream: not to be reused before our stream has read it
                    t.record_stream(self._stream)
            names_in, names_out = self._io[graph]
            by_name = self._graphs[graph](dict(zip(names_in, tensors, strict=True)), self._stream)
            outputs = [by_name[name] for name in names_out]
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

    def objectness(self, image: Any) -> Any:
        """OGL's objectness graph; its plan is built (or read from the plan cache) on the first call."""
        if not self.has_objectness:
            return super().objectness(image)  # raises: no OGL graph in this engine
        self._check_image(image, "objectness")
        if "objectness" not in self._graphs:
            entry = self.manifest["ogl"]
            path = verified_file(self.engine_dir, entry["file"], entry.get("sha256"))
            self._graphs["objectness"] = self._load_graph("objectness", path, entry.get("sha256"))
        return self._run("objectness", [image])[0]

    def warmup(
        self, batch_sizes: Sequence[int] | None = None, audio_batch_sizes: Sequence[int] | None = None, calls: int = 1
    ) -> None:
        """Default: batch 1 and max_batch (one profile covers every size in between)."""
        super().warmup(batch_sizes or (1, self.max_batch), audio_batch_sizes, calls)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        """Wait for queued work, then free contexts/engines: a context destroyed while its work is still queued
        frees memory the GPU is using."""
        if self._graphs:
            self._stream.synchronize()
        for graph in self._graphs.values():
            graph.destroy()
        self._graphs.clear()

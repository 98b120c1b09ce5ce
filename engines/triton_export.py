"""``avloc export --triton REPO``: an engine directory -> an NVIDIA Triton Inference Server model repository.

Layout (``PREFIX`` is ``avloc`` unless told otherwise)::

    REPO/avloc_engine.json            the engine manifest (preprocessing, shapes, meaning) + a "triton" section
    REPO/PREFIX_audio/config.pbtxt    spectrogram [B,1,F,T] -> audio_embedding [B,D]
    REPO/PREFIX_audio/1/model.onnx
    REPO/PREFIX_visual/...            image [B,3,H,W] + audio_embedding [B,D] -> heatmap [B,h,w], confidence [B]
    REPO/PREFIX_objectness/...        only for engines exported with --ogl
    REPO/PREFIX_audio_trt/1/model.plan  TensorRT plan models, only where the engine directory holds a built plan

Each model gets ``max_batch_size``, dynamic batching and an instance group. Triton lists only directories as
models, so the manifest file at the top level is left alone by the server. ``backend="python"`` writes the same
models for Triton's python backend (``model.py`` runs ``model.onnx`` with ONNX Runtime, one run per dynamic
batch): the form PyTriton's bundled ``tritonserver`` (python backend only) can serve, used by the tests and
``bench/triton``. Every written repository is validated (:func:`validate_repository`): each ``config.pbtxt``
parses as a Triton ``ModelConfig`` and its inputs/outputs match the ONNX graph's names, dtypes and shapes.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avloc.core.errors import UserError
from avloc.engines.base import graph_file, read_manifest, sha256_file

REPO_MANIFEST = "avloc_engine.json"
CONFIG_NAME = "config.pbtxt"
VERSION = "1"
_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
_KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
_BACKENDS = ("onnxruntime", "python")
# visual.<gpu>.trt<version>.<precision>.b<min>-<opt>-<max>.<key>.plan (engines/tensorrt_backend.plan_path)
_PLAN_RE = re.compile(
    r"^(?P<stem>[a-z]+)\.(?P<gpu>.+)\.trt(?P<trt>[0-9.]+)\.(?P<precision>\w+)\.b(?P<b>\d+-\d+-\d+)\.\w+\.plan$"
)


@dataclass(frozen=True)
class TritonOptions:
    """What goes into every ``config.pbtxt``."""

    max_batch: int = 16  # max_batch_size: the largest batch dynamic batching forms (and a client may send)
    instances: int = 1  # model instances per device (instance_group count)
    kind: str = "auto"  # KIND_AUTO (GPU where the server has one), KIND_CPU or KIND_GPU
    queue_delay_us: int = 1000  # how long the first request waits for others to join its batch
    prefix: str = "avloc"
    backend: str = "onnxruntime"  # or "python": ONNX Runtime inside Triton's python backend
    threads: int = 0  # ONNX Runtime intra-op threads per instance (0: ONNX Runtime's default)

    def check(self) -> None:
        if self.max_batch < 1:
            raise UserError(f"--triton-max-batch {self.max_batch}: expected at least 1")
        if self.instances < 1:
            raise UserError(f"--triton-instances {self.instances}: expected at least 1")
        if self.kind not in _KINDS:
            raise UserError(f"--triton-kind {self.kind!r}: expected one of {', '.join(_KINDS)}")
        if self.backend not in _BACKENDS:
            raise UserError(f"--triton-backend {self.backend!r}: expected one of {', '.join(_BACKENDS)}")
        if self.queue_delay_us < 0 or self.threads < 0:
            raise UserError("Triton queue delay and threads must not be negative")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.prefix):
            raise UserError(f"--triton-prefix {self.prefix!r}: expected letters, digits, '_' or '-'")


def model_name(prefix: str, graph: str, plan: bool = False) -> str:
    return f"{prefix}_{graph}{'_trt' if plan else ''}"


def _graphs(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """graph name -> manifest entry (file, sha256, inputs, outputs) for every graph the engine carries."""
    graphs = {name: manifest["graphs"][name] for name in ("audio", "visual")}
    if isinstance(manifest.get("ogl"), dict):
        graphs["objectness"] = manifest["ogl"]
    return graphs


def find_plans(engine_dir: Path, onnx_file: str) -> list[dict[str, Any]]:
    """The TensorRT plans the tensorrt backend built for one graph, newest first."""
    stem = Path(onnx_file).stem
    plans = []
    for path in Path(engine_dir).glob(f"{stem}.*.plan"):
        match = _PLAN_RE.match(path.name)
        if match and match["stem"] == stem:
            batches = [int(b) for b in match["b"].split("-")]
            plans.append(
                {"path": path, "gpu": match["gpu"], "tensorrt": match["trt"], "precision": match["precision"]}
                | {"max_batch": batches[2], "mtime": path.stat().st_mtime}
            )
    return sorted(plans, key=lambda p: -p["mtime"])


# ---------------------------------------------------------------------------------------------- config text


def _tensor_text(tensor: dict[str, Any]) -> str:
    dtype = _TRITON_DTYPES.get(tensor["dtype"])
    if dtype is None:
        raise UserError(f"tensor {tensor['name']!r}: dtype {tensor['dtype']!r} has no Triton type in this exporter")
    dims = [int(d) for d in tensor["shape"][1:]]  # the batch axis is implied by max_batch_size
    if not dims:
        # A tensor that is only the batch axis ([B], e.g. confidence): Triton needs non-empty dims, so the
        # client sees [B, 1] while the model computes [B] (Triton's documented reshape idiom).
        return f'{{ name: "{tensor["name"]}" data_type: {dtype} dims: [ 1 ] reshape: {{ shape: [ ] }} }}'
    return f'{{ name: "{tensor["name"]}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}'


def config_text(
    name: str, entry: dict[str, Any], options: TritonOptions, *, platform: str, sha256: str, max_batch: int
) -> str:
    """One model's ``config.pbtxt``. ``platform``: onnxruntime, python or tensorrt_plan."""
    lines = [f'name: "{name}"']
    lines.append('platform: "tensorrt_plan"' if platform == "tensorrt_plan" else f'backend: "{platform}"')
    lines.append(f"max_batch_size: {max_batch}")
    lines.append("input [\n  " + ",\n  ".join(_tensor_text(t) for t in entry["inputs"]) + "\n]")
    lines.append("output [\n  " + ",\n  ".join(_tensor_text(t) for t in entry["outputs"]) + "\n]")
    preferred = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch} | {max_batch})
    lines.append(
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        f"  max_queue_delay_microseconds: {options.queue_delay_us}\n}}"
    )
    kind = "KIND_GPU" if platform == "tensorrt_plan" else _KINDS[options.kind]
    lines.append(f"instance_group [ {{ count: {options.instances} kind: {kind} }} ]")
    params = {"avloc_sha256": sha256}  # the client checks it serves exactly the engine it was given
    if platform != "tensorrt_plan" and options.threads:
        params["intra_op_thread_count"] = str(options.threads)
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


_MODEL_PY = '''"""Triton python-backend model written by `avloc export --triton-backend python`: runs model.onnx with
ONNX Runtime, one session run per dynamic batch (the requests Triton hands over are concatenated)."""

import json
import os
import site
import sys

# The python-backend stub starts its embedded interpreter without reading PYTHONPATH; honour it here (first, as
# the interpreter would) so numpy and onnxruntime come from the environment that started the server.
_entries = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
sys.path[:0] = _entries
for _entry in _entries:
    site.addsitedir(_entry)  # .pth files

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        threads = config.get("parameters", {}).get("intra_op_thread_count", {}).get("string_value")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or 0)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests):
        try:
            arrays = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs] for r in requests]
            sizes = [a[0].shape[0] for a in arrays]
            feeds = {n: np.concatenate([a[k] for a in arrays]) for k, n in enumerate(self.inputs)}
            results = self.session.run(self.outputs, feeds)
        except Exception as err:  # one error response per request, the server keeps running
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err))) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            parts = [np.ascontiguousarray(r[start : start + size]) for r in results]
            tensors = [pb_utils.Tensor(n, part) for n, part in zip(self.outputs, parts)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
'''


# ---------------------------------------------------------------------------------------------- export


def export_triton(
    engine_dir: str | Path, repo: str | Path, options: TritonOptions | None = None, *, force: bool = False
) -> Path:
    """Write the Triton model repository ``repo`` for the engine directory ``engine_dir``; returns ``repo``.

    Written as ``REPO.tmp``, validated, then renamed, so a failure never leaves a half-written repository.
    """
    options = options or TritonOptions()
    options.check()
    engine_dir, repo = Path(engine_dir), Path(repo)
    manifest = read_manifest(engine_dir)
    if repo.exists() and not force:
        raise UserError(f"{repo}: already exists; pass --force to replace it")
    tmp = repo.with_name(repo.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        models: dict[str, Any] = {}
        for graph, entry in _graphs(manifest).items():
            onnx_path = graph_file(engine_dir, manifest, graph) if graph != "objectness" else engine_dir / entry["file"]
            sha = sha256_file(onnx_path)
            name = model_name(options.prefix, graph)
            _write_model(tmp / name, onnx_path, "model.onnx", config_text(name, entry, options, **_args(options, sha)))
            if options.backend == "python":
                (tmp / name / VERSION / "model.py").write_text(_MODEL_PY)
            models[graph] = {"model": name, "backend": options.backend, "max_batch": options.max_batch}
            plans = find_plans(engine_dir, entry["file"])
            if plans:
                plan = plans[0]
                plan_name = model_name(options.prefix, graph, plan=True)
                batch = min(options.max_batch, plan["max_batch"])  # the plan's profile caps its batch
                text = config_text(plan_name, entry, options, platform="tensorrt_plan", sha256=sha, max_batch=batch)
                _write_model(tmp / plan_name, plan["path"], "model.plan", text)
                models[graph + "_trt"] = {
                    "model": plan_name,
                    "max_batch": batch,
                    "tensorrt": plan["tensorrt"],
                    "gpu": plan["gpu"],
                    "precision": plan["precision"],
                    "note": "Triton's TensorRT must be this exact version and the GPU this model",
                }
        repo_manifest = dict(manifest)
        repo_manifest["triton"] = {
            "source_engine": str(engine_dir.resolve()),
            "prefix": options.prefix,
            "models": models,
            "options": {k: getattr(options, k) for k in options.__dataclass_fields__},
            "client": f"avloc ... --backend triton --engine-option url=HOST:8001 --engine-option "
            f"model_prefix={options.prefix} (with the engine directory {engine_dir.name})",
        }
        (tmp / REPO_MANIFEST).write_text(json.dumps(repo_manifest, indent=2))
        validate_repository(tmp)
        if repo.exists():
            shutil.rmtree(repo)
        os.replace(tmp, repo)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return repo


def _args(options: TritonOptions, sha: str) -> dict[str, Any]:
    return {"platform": options.backend, "sha256": sha, "max_batch": options.max_batch}


def _write_model(model_dir: Path, source: Path, file_name: str, config: str) -> None:
    (model_dir / VERSION).mkdir(parents=True)
    shutil.copyfile(source, model_dir / VERSION / file_name)
    (model_dir / CONFIG_NAME).write_text(config)


# ---------------------------------------------------------------------------------------------- validation


def parse_config(path: str | Path) -> dict[str, Any]:
    """Parse a ``config.pbtxt`` into a dict (protobuf's JSON form of Triton's ``ModelConfig``).

    With tritonclient installed (the ``triton`` extra) Triton's own ``ModelConfig`` message parses it, which
    rejects unknown fields and wrong types exactly as the server does; without it, :func:`parse_pbtxt` does a
    strict parse of the same text format against the fields this exporter writes.
    """
    path = Path(path)
    text = path.read_text()
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError):  # tritonclient raises RuntimeError when its grpc deps are missing
        try:
            return parse_pbtxt(text)
        except ValueError as err:
            raise UserError(f"{path}: not a valid Triton model config ({err})") from None
    try:
        message = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise UserError(f"{path}: not a valid Triton model config ({err})") from None
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# Fields of Triton's ModelConfig this exporter writes: name -> (kind, repeated); kind is a nested schema, "str",
# "int", "enum" or "map" (protobuf's map<string, ModelParameter>). Anything else is rejected.
_TENSOR = {"name": ("str", False), "data_type": ("enum", False), "dims": ("int", True), "reshape": ("RESHAPE", False)}
_SCHEMA: dict[str, dict[str, tuple[str, bool]]] = {
    "CONFIG": {
        "name": ("str", False),
        "platform": ("str", False),
        "backend": ("str", False),
        "max_batch_size": ("int", False),
        "input": ("TENSOR", True),
        "output": ("TENSOR", True),
        "dynamic_batching": ("BATCHING", False),
        "instance_group": ("GROUP", True),
        "parameters": ("map", True),
    },
    "TENSOR": _TENSOR,
    "RESHAPE": {"shape": ("int", True)},
    "BATCHING": {"preferred_batch_size": ("int", True), "max_queue_delay_microseconds": ("int", False)},
    "GROUP": {"count": ("int", False), "kind": ("enum", False)},
    "map": {"key": ("str", False), "value": ("PARAM", False)},
    "PARAM": {"string_value": ("str", False)},
}
_TOKEN = re.compile(r'\s+|#[^\n]*|(?P<tok>"(?:[^"\\]|\\.)*"|-?\d+|[A-Za-z_][A-Za-z0-9_]*|[{}\[\]:,])')


def parse_pbtxt(text: str) -> dict[str, Any]:
    """Strict parse of a ``config.pbtxt`` (protobuf text format) limited to the fields in ``_SCHEMA``; the
    result has the shape of protobuf's ``MessageToDict(..., preserving_proto_field_name=True)``. Raises
    ValueError naming the offending token."""
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"unexpected character {text[pos]!r} at offset {pos}")
        if match["tok"] is not None:
            tokens.append(match["tok"])
        pos = match.end()
    tokens.append("<end>")
    result, at = _parse_fields(tokens, 0, "CONFIG", "<end>")
    return result


def _parse_fields(tokens: list[str], at: int, schema: str, closing: str) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while tokens[at] != closing:
        name = tokens[at]
        if name not in _SCHEMA[schema]:
            raise ValueError(f"unknown field {name!r}" + (f" in {schema.lower()}" if schema != "CONFIG" else ""))
        kind, repeated = _SCHEMA[schema][name]
        at += 1
        if tokens[at] == ":":
            at += 1
        values = []
        if tokens[at] == "[" and repeated:
            at += 1
            while tokens[at] != "]":
                value, at = _parse_value(tokens, at, kind)
                values.append(value)
                if tokens[at] == ",":
                    at += 1
            at += 1
        else:
            value, at = _parse_value(tokens, at, kind)
            values.append(value)
        if kind == "map":
            params = out.setdefault(name, {})
            params.update({v.get("key", ""): v.get("value", {}) for v in values})
        elif repeated:
            out.setdefault(name, []).extend(values)
        elif name in out or len(values) != 1:
            raise ValueError(f"field {name!r} given more than once")
        else:
            out[name] = values[0]
        if tokens[at] in (",", ";"):
            at += 1
    return out, at + (closing != "<end>")


def _parse_value(tokens: list[str], at: int, kind: str) -> tuple[Any, int]:
    token = tokens[at]
    if kind in _SCHEMA:
        if token != "{":
            raise ValueError(f"expected '{{' for a message, got {token!r}")
        return _parse_fields(tokens, at + 1, kind, "}")
    if kind == "str":
        if not token.startswith('"'):
            raise ValueError(f"expected a quoted string, got {token!r}")
        return json.loads(token), at + 1
    if kind == "int":
        if not re.fullmatch(r"-?\d+", token):
            raise ValueError(f"expected an integer, got {token!r}")
        return int(token), at + 1
    if not re.fullmatch(r"(TYPE|KIND)_[A-Z0-9_]+", token):
        raise ValueError(f"expected an enum value (TYPE_... / KIND_...), got {token!r}")
    return token, at + 1


def _onnx_tensors(path: Path) -> dict[str, tuple[str, list[Any]]]:
    """name -> (Triton dtype, shape) of every graph input and output; ``"batch"`` marks the dynamic batch axis.

    The exporter declares inputs fully but leaves output dims symbolic, so output shapes are what ONNX Runtime
    actually returns for a batch of 2 (a dynamic batch axis is the one that follows the input batch).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    tensors: dict[str, tuple[str, list[Any]]] = {}
    feeds = {}
    for value in graph.input:
        ttype = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        shape: list[Any] = [d.dim_value if d.HasField("dim_value") else "batch" for d in ttype.shape.dim]
        tensors[value.name] = (_TRITON_DTYPES.get(dtype.name, dtype.name), shape)
        if any(d == "batch" for d in shape[1:]):
            raise UserError(f"{path}: input {value.name} has a dynamic axis besides the batch: {shape}")
        feeds[value.name] = np.zeros([2 if d == "batch" else d for d in shape], dtype)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run([o.name for o in graph.output], feeds)
    for value, array in zip(graph.output, outputs):
        dtype = array.dtype.name
        dims = list(array.shape)
        shape = ["batch", *dims[1:]] if dims and dims[0] == 2 else dims
        tensors[value.name] = (_TRITON_DTYPES.get(dtype, dtype), shape)
    return tensors


def validate_repository(repo: str | Path) -> list[str]:
    """Check every model of a repository; returns the model names, raises UserError on the first problem.

    Per model: the config parses (see :func:`parse_config`), its name is the directory's, it batches
    dynamically, version 1 holds the model file, and for ONNX models each config input/output exists in the
    graph with the same dtype and, after the batch axis (and a ``reshape``), the same shape.
    """
    repo = Path(repo)
    names = []
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
        config_path = model_dir / CONFIG_NAME
        if not config_path.is_file():
            raise UserError(f"{model_dir}: model directory without {CONFIG_NAME}")
        config = parse_config(config_path)
        where = f"{config_path}"
        if config.get("name") != model_dir.name:
            raise UserError(f"{where}: name {config.get('name')!r}, expected the directory name {model_dir.name!r}")
        max_batch = int(config.get("max_batch_size", 0))
        if max_batch < 1 or "dynamic_batching" not in config:
            raise UserError(f"{where}: expected max_batch_size >= 1 and dynamic_batching, got {max_batch}")
        files = {"tensorrt_plan": "model.plan", "onnxruntime": "model.onnx", "python": "model.py"}
        kind = config.get("platform") or config.get("backend")
        model_file = model_dir / VERSION / files.get(kind, "?")
        if not model_file.is_file():
            raise UserError(f"{where}: backend {kind!r} but no {model_file}")
        onnx_file = model_dir / VERSION / "model.onnx"
        if onnx_file.is_file():
            _check_against_onnx(where, config, _onnx_tensors(onnx_file))
        names.append(model_dir.name)
    if not names:
        raise UserError(f"{repo}: no model directories in this Triton repository")
    return names


def _check_against_onnx(where: str, config: dict[str, Any], graph: dict[str, tuple[str, list[Any]]]) -> None:
    declared = {t["name"] for t in [*config.get("input", []), *config.get("output", [])]}
    if declared != set(graph):
        raise UserError(f"{where}: tensors {sorted(declared)}, the ONNX graph has {sorted(graph)}")
    for tensor in [*config.get("input", []), *config.get("output", [])]:
        dtype, shape = graph[tensor["name"]]
        if tensor.get("data_type") != dtype:
            raise UserError(f"{where}: {tensor['name']} is {tensor.get('data_type')}, the ONNX graph says {dtype}")
        dims = [int(d) for d in (tensor["reshape"].get("shape", []) if "reshape" in tensor else tensor["dims"])]
        if not shape or shape[0] != "batch" or shape[1:] != dims:
            raise UserError(f"{where}: {tensor['name']} dims {dims} (+ batch), the ONNX graph has shape {shape}")


# ---------------------------------------------------------------------------------------------- local server


# numpy<2 for the python-backend stub, kept apart from the environment's numpy 2 (bench/triton/setup.sh).
STUB_SITE = Path(sys.prefix) / "triton-stub"


def bundled_tritonserver() -> Path | None:
    """The ``tritonserver`` binary bundled by the ``nvidia-pytriton`` wheel (python backend only), if installed."""
    spec = importlib.util.find_spec("pytriton")  # finds the package without importing it (nor its deps)
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" / "bin" / "tritonserver"
    return binary if binary.is_file() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_tritonserver(
    repo: str | Path,
    *,
    python_path: Sequence[str | Path] | None = None,
    binary: Path | None = None,
    startup_timeout: float = 90.0,
    log_path: Path | None = None,
) -> Iterator[str]:
    """Run PyTriton's bundled ``tritonserver`` on ``repo`` (a ``--triton-backend python`` repository) on free
    loopback ports; yields the gRPC ``HOST:PORT`` once every model is ready, stops the server on exit.

    Two things make its python-backend stub work with this interpreter: the stub links ``libpython3.X.so``
    from the library path, so the interpreter's own ``LIBDIR`` goes first (otherwise Debian's
    ``/lib/x86_64-linux-gnu/libpython3.11.so`` (3.11.2) runs with this interpreter's 3.11.7 stdlib and
    ``multiprocessing`` fails: ``'_thread.RLock' object has no attribute '_recursion_count'``); and
    ``PYTHONPATH`` names ``python_path`` then this environment's site-packages (read by the generated
    ``model.py``). ``python_path`` must provide numpy < 2 where this environment has numpy 2: the stub
    (pybind11 built against numpy 1) otherwise moves zero bytes in and out (inputs read as zeros, outputs
    empty). Default: :data:`STUB_SITE` (``bench/triton/setup.sh`` fills it).
    """
    import site

    binary = binary or bundled_tritonserver()
    if binary is None:
        raise UserError("no tritonserver: pip install --no-deps nvidia-pytriton (its wheel bundles one)")
    root = binary.parents[1]  # .../pytriton/tritonserver
    libs = root.parents[1] / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"{stub}: this tritonserver has no python-backend stub for Python {version}")
    if python_path is None:
        python_path = [STUB_SITE] if (STUB_SITE / "numpy").is_dir() else []
        if not python_path and int(importlib.metadata.version("numpy").split(".")[0]) >= 2:
            raise UserError(f"{STUB_SITE}: no numpy<2 for the python-backend stub; run bench/triton/setup.sh")
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="avloc-triton-") as tmp:
        backends = Path(tmp) / "backends"
        shutil.copytree(root / "backends", backends)
        shutil.copy2(stub, backends / "python" / stub.name)
        env = dict(os.environ)
        lib_path = [sysconfig.get_config_var("LIBDIR") or "", str(libs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in lib_path if p)
        paths = [*map(str, python_path), *site.getsitepackages(), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        log_file = open(log_path or Path(tmp) / "tritonserver.log", "w")  # noqa: SIM115 - closed below
        cmd = [
            str(binary),
            f"--model-repository={Path(repo).resolve()}",
            f"--backend-directory={backends}",
            f"--grpc-port={grpc_port}",
            f"--http-port={http_port}",
            f"--metrics-port={metrics_port}",
            "--disable-auto-complete-config",  # serve exactly the exported config
            "--exit-timeout-secs=5",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"127.0.0.1:{grpc_port}"
        try:
            _wait_ready(url, proc, startup_timeout, Path(log_file.name))
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log_file.close()


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = "\n".join(log.read_text().splitlines()[-15:])
                raise RuntimeError(f"tritonserver exited with {proc.returncode}:\n{tail}")
            with contextlib.suppress(Exception):  # not listening yet
                if client.is_server_ready():
                    return
            time.sleep(0.2)
    finally:
        client.close()
    raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s (log: {log})")

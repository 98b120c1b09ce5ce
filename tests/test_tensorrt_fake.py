"""TensorRT backend against fake ``tensorrt`` modules shaped like the 10.x and 11.x Python APIs.

No GPU or TensorRT is needed: each fake (tests/tensorrt_fakes.py) records every call with its arguments and has
only the API of its version (the 11.x fake has no ``BuilderFlag.FP16`` nor ``Builder.platform_has_fast_fp16``, so
code using them fails here with AttributeError as it would on a real 11.x). The tests prove which calls the
backend makes, that every failure return value becomes a clear error, and how the plan / timing caches are keyed
and reused.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tensorrt_fakes import GPU, calls, make_fake_trt

from avloc.core.errors import UserError
from avloc.engines import tensorrt_backend as tb


@pytest.fixture(params=[10, 11], ids=["trt10", "trt11"])
def major(request) -> int:
    return request.param


@pytest.fixture()
def onnx_graph(tmp_path) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten on a dynamic batch: small, real, castable."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["out"]),
        ],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "visual.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture()
def typed_graph(tmp_path) -> Path:
    """The cases a naive cast gets wrong: Cast(to=float), a Constant node, Resize with computed float scales,
    and two float outputs."""
    rng = np.random.default_rng(2)
    k = numpy_helper.from_array(rng.standard_normal((1, 3, 1, 1)).astype(np.float32), "k")
    two = helper.make_tensor("two", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["c"], to=TensorProto.FLOAT),
            helper.make_node("Constant", [], ["half"], value=helper.make_tensor("h", TensorProto.FLOAT, [], [0.5])),
            helper.make_node("Mul", ["c", "half"], ["m"]),
            helper.make_node("Add", ["m", "k"], ["a"]),
            helper.make_node("Constant", [], ["s"], value=two),
            helper.make_node("Mul", ["s", "half"], ["s1"]),  # computed scales (float16 after the cast)
            helper.make_node("Add", ["s1", "s1"], ["scales"]),
            helper.make_node("Resize", ["a", "", "scales"], ["up"], mode="linear"),
            helper.make_node("ReduceMean", ["up"], ["mean"], axes=[1, 2, 3], keepdims=0),
        ],
        "typed",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [
            helper.make_tensor_value_info("up", TensorProto.FLOAT, ["batch", 3, 8, 8]),
            helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=[k],
        value_info=[helper.make_tensor_value_info("m", TensorProto.FLOAT, ["batch", 3, 4, 4])],  # stale after cast
    )
    path = tmp_path / "typed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


# ---------------------------------------------------------------------------------------------- build


def test_fakes_have_only_their_versions_api():
    """The 11.x fake really lacks the removed weak-typing API (else the tests below would prove nothing)."""
    old, new = make_fake_trt(10), make_fake_trt(11)
    assert old.BuilderFlag.FP16 and old.Builder(None).platform_has_fast_fp16
    with pytest.raises(AttributeError):
        new.BuilderFlag.FP16  # noqa: B018
    with pytest.raises(AttributeError):
        new.Builder(None).platform_has_fast_fp16  # noqa: B018
    with pytest.raises(AttributeError):
        new.NetworkDefinitionCreationFlag.EXPLICIT_BATCH  # noqa: B018


def test_fp32_build_is_strongly_typed_with_profile_and_timing_cache(major, onnx_graph, tmp_path):
    trt = make_fake_trt(major)
    cache = tmp_path / "timing.cache"
    plan = tb.build_plan(trt, onnx_graph, "fp32", (1, 4, 16), workspace_mb=256, timing_cache=cache)
    assert plan == b"PLAN"
    strongly_typed = 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert calls(trt, "create_network") == [(strongly_typed,)]
    assert strongly_typed == (2 if major == 10 else 1)
    assert calls(trt, "set_flag") == []  # precision comes from the graph, never from builder flags
    assert calls(trt, "clear_flag") == [("TF32",)]  # "fp32" is IEEE float32: TF32 (on by default) is cleared
    ((model, path),) = calls(trt, "parse")
    assert model == onnx_graph.read_bytes() and path == str(onnx_graph)
    assert calls(trt, "set_shape") == [("image", (1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))]
    assert calls(trt, "set_memory_pool_limit") == [("WORKSPACE", 256 << 20)]
    assert calls(trt, "create_timing_cache") == [(b"",)] and calls(trt, "set_timing_cache") == [(b"", False)]
    assert cache.read_bytes() == b"+tuned"  # written back after the build
    # The next build starts from what the last one tuned.
    trt.calls.clear()
    tb.build_plan(trt, onnx_graph, "fp32", (1, 4, 16), workspace_mb=256, timing_cache=cache)
    assert calls(trt, "create_timing_cache") == [(b"+tuned",)]
    assert cache.read_bytes() == b"+tuned+tuned"


def test_fp16_casts_the_graph_not_the_builder(major, onnx_graph):
    trt = make_fake_trt(major)
    tb.build_plan(trt, onnx_graph, "fp16", (1, 2, 4), workspace_mb=64)
    assert calls(trt, "set_flag") == []
    ((model_bytes, _),) = calls(trt, "parse")
    model = onnx.load_from_string(model_bytes)
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT16}
    # float32 in and out (Casts at the boundary), so callers feed float32 as before
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


@pytest.mark.parametrize("fixture", ["onnx_graph", "typed_graph"])
def test_fp16_graph_is_consistent_and_close(fixture, request):
    """ONNX Runtime type-checks every edge (as a strongly typed TensorRT network does) and computes the same
    function to fp16 precision."""
    import onnxruntime as ort

    path = request.getfixturevalue(fixture)
    half = tb.onnx_fp16_bytes(path)
    model = onnx.load_from_string(half)
    assert not model.graph.value_info  # stale float32 types dropped
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert casts[0].input[0] == "image" and casts[-1].output[0] == model.graph.output[-1].name
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8) if fixture == "onnx_graph" else (2, 3, 4, 4))
    feeds = {"image": x.astype(np.float32)}
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(half, providers=["CPUExecutionProvider"]).run(None, feeds)
    for r, g in zip(ref, got, strict=True):
        assert g.dtype == np.float32 and g.shape == r.shape
        assert np.abs(g - r).max() <= 1e-2 * max(1.0, np.abs(r).max())


def test_build_failures_are_clear(major, onnx_graph):
    with pytest.raises(UserError, match=r"cannot parse this graph \(node 3: Unsupported operator FancyOp\)"):
        tb.build_plan(make_fake_trt(major, parse_ok=False), onnx_graph, "fp32", (1, 1, 1), 64)
    with pytest.raises(RuntimeError, match="failed to build an engine from .*visual.onnx"):
        tb.build_plan(make_fake_trt(major, plan=None), onnx_graph, "fp32", (1, 1, 1), 64)
    with pytest.raises(RuntimeError, match=r"rejected the optimisation profile batch \(1, 2, 3\)"):
        tb.build_plan(make_fake_trt(major, profile_index=-1), onnx_graph, "fp32", (1, 2, 3), 64)
    with pytest.raises(UserError, match="precision 'int4'"):
        tb.build_plan(make_fake_trt(major), onnx_graph, "int4", (1, 1, 1), 64)


def test_mismatched_timing_cache_is_replaced(major, onnx_graph, tmp_path):
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"from-another-gpu")
    trt = make_fake_trt(major, cache_match=False)
    tb.build_plan(trt, onnx_graph, "fp32", (1, 1, 1), 64, timing_cache=cache)
    assert calls(trt, "set_timing_cache") == [(b"from-another-gpu", False), (b"", False)]
    assert cache.read_bytes() == b"+tuned"


# ---------------------------------------------------------------------------------------------- plan cache


def test_plan_cache_key_and_reuse(major, onnx_graph, tmp_path):
    trt = make_fake_trt(major)
    sha = tb.sha256_file(onnx_graph)
    plan, path = tb.load_or_build_plan(trt, tmp_path, onnx_graph, sha, GPU, "fp32", (1, 4, 8))
    assert plan == b"PLAN" and path.read_bytes() == b"PLAN"
    assert path.name.startswith(f"visual.nvidia-h200.trt{trt.__version__}.fp32.b1-4-8.") and path.suffix == ".plan"
    assert (tmp_path / f"tensorrt.nvidia-h200.trt{trt.__version__}.timing.cache").is_file()
    assert len(calls(trt, "build_serialized_network")) == 1
    # same key: read from the cache, no build
    assert tb.load_or_build_plan(trt, tmp_path, onnx_graph, sha, GPU, "fp32", (1, 4, 8)) == (plan, path)
    assert len(calls(trt, "build_serialized_network")) == 1
    # rebuild=True builds again
    tb.load_or_build_plan(trt, tmp_path, onnx_graph, sha, GPU, "fp32", (1, 4, 8), rebuild=True)
    assert len(calls(trt, "build_serialized_network")) == 2
    # every part of the key changes the file: graph hash, TensorRT version, GPU, precision, profile
    base = tb.plan_path(onnx_graph, sha, trt.__version__, GPU, "fp32", (1, 4, 8))
    others = {
        tb.plan_path(onnx_graph, "0" * 64, trt.__version__, GPU, "fp32", (1, 4, 8)),
        tb.plan_path(onnx_graph, sha, "10.99.0", GPU, "fp32", (1, 4, 8)),
        tb.plan_path(onnx_graph, sha, trt.__version__, "NVIDIA H100 80GB HBM3", "fp32", (1, 4, 8)),
        tb.plan_path(onnx_graph, sha, trt.__version__, GPU, "fp16", (1, 4, 8)),
        tb.plan_path(onnx_graph, sha, trt.__version__, GPU, "fp32", (1, 4, 16)),
    }
    assert base == path and base not in others and len(others) == 5
    # a re-exported graph (new hash, same file name) is not served the stale plan
    model = onnx.load(onnx_graph)
    model.doc_string = "re-exported"
    onnx.save(model, onnx_graph)
    _, new_path = tb.load_or_build_plan(trt, tmp_path, onnx_graph, tb.sha256_file(onnx_graph), GPU, "fp32", (1, 4, 8))
    assert new_path != path and len(calls(trt, "build_serialized_network")) == 3


def test_import_guard(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(11))
    assert tb.import_tensorrt().__version__.startswith("11.")
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(10))
    assert tb.import_tensorrt().__version__.startswith("10.")
    old = make_fake_trt(10)
    old.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(UserError, match="TensorRT 8.6.1 is too old"):
        tb.import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match="tensorrt-cu13"):
        tb.import_tensorrt()


# ---------------------------------------------------------------------------------------------- run


class _Stream:
    cuda_stream = 1234


def test_run_binds_by_name_and_checks_returns(major):
    trt = make_fake_trt(major)
    graph = tb._TrtGraph(trt, b"PLAN", torch.device("cpu"), Path("visual.plan"))
    x = torch.ones(3, 5, dtype=torch.float64)  # converted to the engine's float32
    y = graph({"x": x}, _Stream())["y"]
    assert y.shape == (3, 2) and y.dtype == torch.float32
    assert calls(trt, "set_input_shape") == [("x", (3, 5))]
    bound = dict(calls(trt, "set_tensor_address"))
    assert bound["y"] == y.data_ptr() and set(bound) == {"x", "y"}
    assert calls(trt, "execute_async_v3") == [(1234,)]


def test_run_failures_are_clear(major):
    with pytest.raises(UserError, match="could not deserialize the cached plan; delete it"):
        tb._TrtGraph(make_fake_trt(major, engine_ok=False), b"PLAN", torch.device("cpu"), Path("v.plan"))
    graph = tb._TrtGraph(make_fake_trt(major, shape_ok=False), b"PLAN", torch.device("cpu"), Path("v.plan"))
    with pytest.raises(UserError, match=r"refused input 'x' shape \(9, 5\).*optimisation profile"):
        graph({"x": torch.ones(9, 5)}, _Stream())
    graph = tb._TrtGraph(make_fake_trt(major, execute_ok=False), b"PLAN", torch.device("cpu"), Path("v.plan"))
    with pytest.raises(RuntimeError, match="v.plan: TensorRT execute_async_v3 failed"):
        graph({"x": torch.ones(1, 5)}, _Stream())


# ---------------------------------------------------------------------------------------------- I/O order, alignment


def _visual_compute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stand-in visual graph: heatmap = image channel mean, confidence = embedding sum (distinguishable)."""
    return {"heatmap": inputs["image"].mean(axis=1), "confidence": inputs["audio_embedding"].sum(axis=1)}


# The engine lists its I/O in another order than the ONNX graph (image, audio_embedding -> heatmap, confidence).
ENGINE_ORDER = (
    ("confidence", "OUTPUT", "float32", ()),
    ("audio_embedding", "INPUT", "float32", (4,)),
    ("heatmap", "OUTPUT", "float32", (2, 2)),
    ("image", "INPUT", "float32", (3, 2, 2)),
)


def test_io_is_bound_by_name_not_position(major):
    trt = make_fake_trt(major, io=ENGINE_ORDER, compute=_visual_compute)
    io_names = (["image", "audio_embedding"], ["heatmap", "confidence"])
    graph = tb._TrtGraph(trt, b"PLAN", torch.device("cpu"), Path("visual.plan"), io_names)
    assert graph.inputs == ["audio_embedding", "image"]  # the engine's order, not the ONNX graph's
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.standard_normal((3, 3, 2, 2)).astype(np.float32))
    emb = torch.from_numpy(rng.standard_normal((3, 4)).astype(np.float32))
    out = graph({"image": image, "audio_embedding": emb}, _Stream())
    ref = _visual_compute({"image": image.numpy(), "audio_embedding": emb.numpy()})
    assert set(out) == {"heatmap", "confidence"}
    np.testing.assert_allclose(out["heatmap"].numpy(), ref["heatmap"], rtol=1e-6)
    np.testing.assert_allclose(out["confidence"].numpy(), ref["confidence"], rtol=1e-6)
    # a plan whose I/O names are not the graph's is refused at load, not bound by guesswork
    with pytest.raises(UserError, match="I/O tensors .* are not the ONNX graph's"):
        tb._TrtGraph(trt, b"PLAN", torch.device("cpu"), Path("v.plan"), (["image", "emb"], ["heatmap", "confidence"]))


def test_unaligned_inputs_are_copied_to_aligned_memory(major):
    """A slice of a batch (``emb[1:]``) starts mid-allocation; TensorRT needs 256-byte aligned addresses."""
    trt = make_fake_trt(major, io=ENGINE_ORDER, compute=_visual_compute)
    graph = tb._TrtGraph(trt, b"PLAN", torch.device("cpu"), Path("visual.plan"))
    image = tb._aligned_empty((5, 3, 2, 2), torch.float32, "cpu").normal_()
    emb = tb._aligned_empty((5, 4), torch.float32, "cpu").normal_()
    image, emb = image[1:4], emb[1:4]  # 48- and 16-byte offsets: unaligned
    assert image.data_ptr() % 256 and emb.data_ptr() % 256
    out = graph({"image": image, "audio_embedding": emb}, _Stream())
    addresses = dict(calls(trt, "set_tensor_address"))
    assert all(address % 256 == 0 for address in addresses.values())
    np.testing.assert_allclose(out["confidence"].numpy(), emb.sum(dim=1).numpy(), rtol=1e-6)
    for dtype in (torch.float16, torch.float32, torch.int64, torch.uint8):
        assert tb._aligned_empty((7, 3), dtype, "cpu").data_ptr() % 256 == 0


# ---------------------------------------------------------------------------------------------- the engine


class _FakeStream:
    """torch.cuda.Stream on the CPU: records synchronize() into the fake TensorRT's call log."""

    cuda_stream = 4321

    def __init__(self, trt: types.ModuleType, name: str = "engine") -> None:
        self.trt, self.name = trt, name

    def synchronize(self) -> None:
        self.trt.calls.append(("stream_synchronize", ()))

    def wait_stream(self, other: _FakeStream) -> None:
        self.trt.calls.append(("wait_stream", (self.name, other.name)))


@pytest.fixture()
def cpu_as_cuda(monkeypatch):
    """Let TensorRTEngine run its real code on the CPU: torch.cuda calls answered, tensors stay on the CPU."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream(types.SimpleNamespace(calls=[])))


def _onto_cpu(engine) -> None:
    """After construction (where "cuda" is only a name): allocate on the CPU, where the fake computes."""
    engine.torch_device = torch.device("cpu")
    for graph in engine._graphs.values():
        graph.device = engine.torch_device


def _fake_engine(major: int, tiny_engine: Path, tmp_path: Path, monkeypatch) -> tuple[Any, types.ModuleType]:
    """A real TensorRTEngine (max_batch 2, fp32) over the fake, its I/O listed in another order than the ONNX
    graphs'. Visual: heatmap = image[:, 0, 0, 0] everywhere, confidence = embedding[:, 0]; audio: the
    embedding = spectrogram[:, 0, 0, 0] everywhere."""
    import shutil

    from avloc.engines.base import load_engine

    engine_dir = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine_dir)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    dim = manifest["embed_dim"]
    size = manifest["image"]["size"]
    feature = manifest["outputs"]["heatmap"]["feature_size"]
    visual_io = (
        ("confidence", "OUTPUT", "float32", ()),
        ("audio_embedding", "INPUT", "float32", (dim,)),
        ("heatmap", "OUTPUT", "float32", tuple(feature)),
        ("image", "INPUT", "float32", (3, size, size)),
    )

    audio_io = (("audio_embedding", "OUTPUT", "float32", (dim,)), ("spectrogram", "INPUT", "float32", (1, 257, 98)))

    def visual(inputs):
        batch = inputs["image"].shape[0]
        heat = np.broadcast_to(inputs["image"][:, 0, :1, :1], (batch, *feature))
        return {"heatmap": heat, "confidence": inputs["audio_embedding"][:, 0]}

    def audio(inputs):
        return {"audio_embedding": np.repeat(inputs["spectrogram"][:, 0, :1, 0], dim, axis=1)}

    trt = make_fake_trt(
        major,
        plan=lambda network: ",".join(t.name for t in network.inputs).encode(),
        io={b"image,audio_embedding": visual_io, b"spectrogram": audio_io},
        compute={b"image,audio_embedding": visual, b"spectrogram": audio},
    )
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream(trt))
    engine = load_engine(engine_dir, "tensorrt", device="cuda", fp16=False, max_batch=2)
    _onto_cpu(engine)
    return engine, trt


def test_engine_binds_the_onnx_order_and_close_syncs_first(major, tiny_engine, tmp_path, monkeypatch, cpu_as_cuda):
    """TensorRTEngine end to end on the fake: results come back in the ONNX order whatever the engine's order,
    and close() waits for the stream before destroying contexts (a context freed under queued work frees
    memory the GPU still uses)."""
    engine, trt = _fake_engine(major, tiny_engine, tmp_path, monkeypatch)
    dim, size, feature = engine.embed_dim, engine.image_shape[-1], engine.manifest["outputs"]["heatmap"]["feature_size"]
    image = np.zeros((2, 3, size, size), np.float32)
    image[:, 0] = [[[1.5]], [[-2.0]]]
    emb = np.zeros((2, dim), np.float32)
    emb[:, 0] = [0.25, 0.75]
    heatmap, confidence = engine.localize(image, emb)
    assert heatmap.shape == (2, *feature) and np.all(heatmap[0] == 1.5) and np.all(heatmap[1] == -2.0)
    assert confidence.tolist() == [0.25, 0.75]
    spec = np.full((1, 1, 257, 98), 0.5, np.float32)
    assert engine.embed_audio(spec).tolist() == [[0.5] * dim]
    trt.calls.clear()
    engine.close()
    names = [name for name, _ in trt.calls]
    assert names[0] == "stream_synchronize" and "destroy_context" in names
    assert names.index("destroy_context") < names.index("destroy_engine")
    engine.close()  # twice is fine


# ---------------------------------------------------------------------------------------------- concurrent builds


def _build_in_child(major: int, engine_dir: str, onnx_path: str, log: str, out: str) -> None:
    trt = make_fake_trt(major, plan=PLAN_BYTES, build_s=1.0, build_log=log)
    path = Path(onnx_path)
    plan, cached = tb.load_or_build_plan(trt, Path(engine_dir), path, tb.sha256_file(path), GPU, "fp32", (1, 2, 4))
    Path(out).write_bytes(plan if plan == cached.read_bytes() else b"torn")


PLAN_BYTES = bytes(range(256)) * 16384  # 4 MiB: a torn or half-written plan would show


def test_two_processes_building_one_plan_build_once(major, onnx_graph, tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "builds.log"
    procs = [
        ctx.Process(
            target=_build_in_child, args=(major, str(tmp_path), str(onnx_graph), str(log), str(tmp_path / f"r{i}"))
        )
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().splitlines()) == 1  # one build; the other process waited and read it
    assert (tmp_path / "r0").read_bytes() == (tmp_path / "r1").read_bytes() == PLAN_BYTES
    plans = list(tmp_path.glob("*.plan"))
    assert len(plans) == 1 and plans[0].read_bytes() == PLAN_BYTES
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


# ---------------------------------------------------------------------------------------------- damaged caches


def test_a_damaged_cached_plan_is_rebuilt_once(major, onnx_graph, tmp_path):
    """A cached plan TensorRT cannot read (cut short by a full disk or an interrupted copy) is rebuilt under the
    lock instead of failing every start until someone deletes it; a plan built just now that TensorRT cannot
    read is an error, not a rebuild loop."""
    trt = make_fake_trt(major, plan=PLAN_BYTES, readable=lambda plan: plan == PLAN_BYTES)
    sha = tb.sha256_file(onnx_graph)
    _, path = tb.load_or_build_plan(trt, tmp_path, onnx_graph, sha, GPU, "fp32", (1, 2, 4))
    path.write_bytes(PLAN_BYTES[: len(PLAN_BYTES) // 2])
    os.utime(path, (time.time() - 60, time.time() - 60))  # written by an earlier run
    trt.calls.clear()
    graph = tb.load_graph(trt, tmp_path, onnx_graph, sha, GPU, "fp32", (1, 2, 4), torch.device("cpu"))
    assert graph.engine is not None and len(calls(trt, "build_serialized_network")) == 1
    assert path.read_bytes() == PLAN_BYTES
    never = make_fake_trt(major, readable=lambda plan: False)
    with pytest.raises(UserError, match="could not deserialize the cached plan"):
        tb.load_graph(never, tmp_path, onnx_graph, sha, GPU, "fp16", (1, 2, 4), torch.device("cpu"))
    assert len(calls(never, "build_serialized_network")) == 1


def test_an_unreadable_timing_cache_starts_a_new_one(major, onnx_graph, tmp_path):
    """The timing cache only saves build time: a damaged one (create_timing_cache returns None) is replaced, the
    build goes on."""
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"torn")
    trt = make_fake_trt(major, cache_readable=lambda data: data == b"")
    assert tb.build_plan(trt, onnx_graph, "fp32", (1, 1, 1), 64, timing_cache=cache) == b"PLAN"
    assert calls(trt, "create_timing_cache") == [(b"torn",), (b"",)]
    assert cache.read_bytes() == b"+tuned"


def test_unwritable_plan_cache_is_a_one_line_error(major, onnx_graph, tmp_path, monkeypatch):
    sha = tb.sha256_file(onnx_graph)
    not_a_dir = tmp_path / "engine-file"
    not_a_dir.write_text("")
    with pytest.raises(UserError, match="engine-file: cannot write TensorRT plans in this engine directory"):
        tb.load_or_build_plan(make_fake_trt(major), not_a_dir, onnx_graph, sha, GPU, "fp32", (1, 1, 1))

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tb, "_atomic_write", disk_full)
    with pytest.raises(UserError, match=r"\.plan: cannot write TensorRT plans .*No space left on device"):
        tb.load_or_build_plan(make_fake_trt(major), tmp_path, onnx_graph, sha, GPU, "fp32", (1, 1, 1))


def _die_holding_the_lock(engine_dir: str, version: str) -> None:
    import signal

    with tb._build_lock(Path(engine_dir), version, GPU):
        os.kill(os.getpid(), signal.SIGKILL)  # no unlock, no cleanup: as a worker killed mid-build


def test_a_builder_killed_mid_build_leaves_nothing_that_blocks(major, onnx_graph, tmp_path):
    """The lock file of a killed builder stays on disk but holds no lock (flock dies with its process), and the
    temp file a kill mid-write leaves (as large as a plan) is removed by the next builder."""
    import multiprocessing
    import signal
    import threading

    trt = make_fake_trt(major)
    child = multiprocessing.get_context("fork").Process(
        target=_die_holding_the_lock, args=(str(tmp_path), trt.__version__)
    )
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    assert list(tmp_path.glob(".tensorrt.*.lock"))  # stale lock file left behind
    slug = tb._slug(GPU)
    dead = tmp_path / f".visual.{slug}.trt{trt.__version__}.fp32.b1-1-1.0123456789abcdef.plan.x1y2z3.tmp"
    dead.write_bytes(b"half a plan")
    other = tmp_path / f".visual.{slug}.trt9.9.9.fp32.b1-1-1.0123456789abcdef.plan.x1y2z3.tmp"  # another version's
    other.write_bytes(b"in progress")
    done: list[tuple[bytes, Path]] = []
    sha = tb.sha256_file(onnx_graph)
    worker = threading.Thread(
        target=lambda: done.append(tb.load_or_build_plan(trt, tmp_path, onnx_graph, sha, GPU, "fp32", (1, 1, 1))),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the stale lock blocked the next build"
    assert done[0][0] == b"PLAN" and done[0][1].read_bytes() == b"PLAN"
    assert not dead.exists() and other.exists()


# ---------------------------------------------------------------------------------------------- device inputs


def test_device_inputs_give_device_outputs_ordered_after_the_engine(
    major, tiny_engine, tmp_path, monkeypatch, cpu_as_cuda
):
    """The worker's GPU path: images already on the device (DevicePreprocessor), embeddings from the host. The
    outputs stay tensors (no host copy, no sync), the caller's stream waits for the engine's stream before it
    may read them, and each output is recorded as used on the caller's stream (else the caching allocator could
    hand its memory out while the caller still reads it)."""
    engine, trt = _fake_engine(major, tiny_engine, tmp_path, monkeypatch)
    caller = _FakeStream(trt, "caller")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    recorded: list[tuple[int, str]] = []
    monkeypatch.setattr(
        torch.Tensor, "record_stream", lambda self, stream: recorded.append((self.data_ptr(), stream.name))
    )
    size, dim = engine.image_shape[-1], engine.embed_dim
    image = torch.zeros(2, 3, size, size)
    image[:, 0] = torch.tensor([1.5, -2.0]).view(2, 1, 1)
    emb = np.zeros((2, dim), np.float32)
    emb[:, 0] = [0.25, 0.75]
    trt.calls.clear()
    heatmap, confidence = engine.localize(image, emb)
    assert isinstance(heatmap, torch.Tensor) and isinstance(confidence, torch.Tensor)
    assert torch.all(heatmap[0] == 1.5) and torch.all(heatmap[1] == -2.0)
    assert confidence.tolist() == [0.25, 0.75]
    names = [name for name, _ in trt.calls]
    assert calls(trt, "wait_stream") == [("engine", "caller"), ("caller", "engine")]
    assert names.index("execute_async_v3") < len(names) - 1 - names[::-1].index("wait_stream")
    assert {(heatmap.data_ptr(), "caller"), (confidence.data_ptr(), "caller")} <= set(recorded)
    engine.close()


def test_engine_refuses_a_bad_device_in_one_line(major, tiny_engine, monkeypatch, cpu_as_cuda):
    from avloc.engines.base import load_engine

    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(major))
    with pytest.raises(UserError, match="device 'gpu': expected cpu, cuda or cuda:N"):
        load_engine(tiny_engine, "tensorrt", device="gpu")

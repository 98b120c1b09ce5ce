"""The fp16 graph TensorRT builds (``tensorrt_backend.onnx_fp16_bytes``) keeps the cosine map right.

Two ways an L2 norm breaks in float16, each checked on the real exported visual graph:
- ``F.normalize``'s eps 1e-12 is float16 0, so a zero embedding gave 0/0 = NaN (checked in ONNX Runtime);
- onnx-tensorrt imports ReduceL2 as sqrt(ReduceSumSquare(x)); in a strongly typed float16 network that sum is
  inf once the norm passes 256, and x/inf = 0 flattens the map. ONNX Runtime's CPU provider computes float16
  reductions in float32, so :func:`tensorrt_like` rewrites every ReduceL2 the way onnx-tensorrt does and
  saturates a float16-typed sum above 65504 to inf, as TensorRT's float16 arithmetic does.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from avloc.engines import tensorrt_backend as tb

FP16_MAX = 65504.0


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type == "Constant":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def tensorrt_like(model_bytes: bytes) -> bytes:
    """ReduceL2(x) -> Sqrt(ReduceSum(x * x)) as onnx-tensorrt imports it, with a float16 sum over 65504 = inf."""
    model = onnx.load_from_string(model_bytes)
    types = _types(model)
    nodes = []
    for n in model.graph.node:
        if n.op_type != "ReduceL2":
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        x, out = n.input[0], n.output[0]
        nodes += [
            helper.make_node("Mul", [x, x], [f"{out}_sq"]),
            helper.make_node("Constant", [], [f"{out}_ax"], value=numpy_helper.from_array(np.array(attrs["axes"]))),
            helper.make_node("ReduceSum", [f"{out}_sq", f"{out}_ax"], [f"{out}_ss"], keepdims=attrs["keepdims"]),
        ]
        total = f"{out}_ss"
        if types[x] == TensorProto.FLOAT16:
            inf = numpy_helper.from_array(np.array(np.inf, np.float16))
            limit = numpy_helper.from_array(np.array(FP16_MAX, np.float32))
            nodes += [
                helper.make_node("Cast", [total], [f"{out}_ss32"], to=TensorProto.FLOAT),
                helper.make_node("Constant", [], [f"{out}_lim"], value=limit),
                helper.make_node("Greater", [f"{out}_ss32", f"{out}_lim"], [f"{out}_big"]),
                helper.make_node("Constant", [], [f"{out}_inf"], value=inf),
                helper.make_node("Where", [f"{out}_big", f"{out}_inf", total], [f"{out}_sat"]),
            ]
            total = f"{out}_sat"
        nodes.append(helper.make_node("Sqrt", [total], [out]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model.SerializeToString()


def _run(model: str | bytes, image: np.ndarray, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    heatmap, confidence = session.run(None, {"image": image, "audio_embedding": emb})
    return heatmap, confidence


@pytest.fixture(scope="module")
def visual(tiny_engine):
    return tiny_engine / "visual.onnx"


def test_norms_are_computed_in_float32_with_a_nonzero_eps(visual):
    model = onnx.load_from_string(tb.onnx_fp16_bytes(visual))
    types = _types(model)
    norms = [n for n in model.graph.node if n.op_type == "ReduceL2"]
    assert len(norms) == 2  # the visual map's and the audio embedding's
    for norm in norms:
        assert types[norm.input[0]] == TensorProto.FLOAT and types[norm.output[0]] == TensorProto.FLOAT
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    for clip in clips:  # F.normalize's clamp_min(eps): a float32 eps that is not zero
        assert types[clip.input[1]] == TensorProto.FLOAT and consts[clip.input[1]] > 0
    # the division by the norm is float32; only its unit-scale result goes back to float16 (for the Einsum)
    for div in (n for n in model.graph.node if n.op_type == "Div"):
        assert types[div.output[0]] == TensorProto.FLOAT
    (einsum,) = [n for n in model.graph.node if n.op_type == "Einsum"]
    assert {types[i] for i in einsum.input} == {TensorProto.FLOAT16}  # the rest of the graph is still float16
    assert all(i.data_type != TensorProto.FLOAT or i.name.endswith("__fp32") for i in model.graph.initializer)


@pytest.mark.parametrize("emulate_tensorrt", [False, True], ids=["onnxruntime", "tensorrt_reduce_l2"])
def test_zero_and_large_norms_give_finite_correct_maps(visual, emulate_tensorrt):
    rng = np.random.default_rng(0)
    dim = onnx.load(visual).graph.input[1].type.tensor_type.shape.dim[1].dim_value
    image = rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
    image[2] *= 1000.0  # visual feature norms far past 256 as well
    emb = np.zeros((3, dim), np.float32)  # row 0: a zero embedding (silence through a trained encoder)
    emb[1] = rng.standard_normal(dim) * 1000.0 / np.sqrt(dim)  # norm ~1000
    emb[2] = rng.standard_normal(dim) * 5000.0 / np.sqrt(dim)
    assert np.linalg.norm(emb[1:], axis=1).min() >= 900
    half = tb.onnx_fp16_bytes(visual)
    fp32 = visual.read_bytes()
    if emulate_tensorrt:
        half, fp32 = tensorrt_like(half), tensorrt_like(fp32)
    ref_heat, ref_conf = _run(fp32, image, emb)
    heat, conf = _run(half, image, emb)
    assert np.isfinite(heat).all() and np.isfinite(conf).all()
    assert np.abs(heat[0]).max() == 0.0  # zero embedding: a zero map, as in fp32 (not NaN)
    assert np.abs(heat - ref_heat).max() < 5e-3 and np.abs(conf - ref_conf).max() < 5e-3
    assert heat[1:].std(axis=(1, 2)).min() > 1e-3  # not flat


def test_island_refuses_what_it_cannot_keep_in_float32(tmp_path):
    """A norm feeding an op the island does not know is a clear error, not a silently wrong fp16 graph."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceL2", ["x"], ["n"], axes=[1], keepdims=1),
            helper.make_node("Softmax", ["n"], ["y"], axis=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 1])],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(tb.UserError, match="norm feeds Softmax"):
        tb.onnx_fp16_bytes(path)


@pytest.mark.parametrize("emulate_tensorrt", [False, True], ids=["onnxruntime", "tensorrt_reduce_l2"])
def test_a_normalized_graph_output_survives_the_cast(tmp_path, emulate_tensorrt):
    """F.normalize as the graph's last op (an L2-normalized embedding output): the island's Cast back to float16
    produces the graph output, which the float32 output Cast must then read. The cast graph used to fail
    onnx's checker ("input 'y__fp16' ... is not output of any previous nodes") and TensorRT builds with it."""
    eps = numpy_helper.from_array(np.array(1e-12, np.float32), "eps")
    graph = helper.make_graph(
        [  # what torch.onnx exports for F.normalize(x, dim=1)
            helper.make_node("ReduceL2", ["x"], ["n"], axes=[1], keepdims=1),
            helper.make_node("Clip", ["n", "eps"], ["c"]),
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Expand", ["c", "s"], ["e"]),
            helper.make_node("Div", ["x", "e"], ["y"]),
        ],
        "normalized",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        initializer=[eps],
    )
    path = tmp_path / "normalized.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    half, fp32 = tb.onnx_fp16_bytes(path), path.read_bytes()
    if emulate_tensorrt:
        half, fp32 = tensorrt_like(half), tensorrt_like(fp32)
    x = np.array([[0, 0, 0, 0], [1000, 2000, -500, 0], [3e4, 4e4, 0, 0]], np.float32)  # norms 0, ~2300, 5e4
    options = ort.SessionOptions()
    options.log_severity_level = 3
    (ref,) = ort.InferenceSession(fp32, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    session = ort.InferenceSession(half, options, providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].type == "tensor(float)"
    (got,) = session.run(None, {"x": x})
    assert np.isfinite(got).all() and np.all(got[0] == 0.0)
    assert np.abs(got - ref).max() < 2e-3 and np.abs(np.linalg.norm(got[1:], axis=1) - 1).max() < 2e-3

"""fp16 numerics of the GPU paths, on the CPU: the torch backend's autocast and TensorRT's float16-cast graph.

A GPU computes these in float16 where the CPU tests compute in float32, so a constant or an intermediate below
float16's smallest normal (6.1e-5) behaves differently there: it is a subnormal, which flush-to-zero kernels turn
into 0. Stand-ins: torch's float16 autocast on the CPU (the same op lists decide what runs in float16), and the
float16 ONNX graph run by ONNX Runtime after its subnormal constants are flushed to zero as such a kernel does.
The inputs are the ones that break: a label-space map that is all zero or far below float16's normal range.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from avloc.core.labelspace import LabelSpaceMap
from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
from avloc.engines import tensorrt_backend as tb

D, CLASSES, SOUNDS, H, W = 8, 12, 5, 3, 4
FP16_TINY = float(torch.finfo(torch.float16).tiny)  # smallest normal float16, 6.1e-5


class _CosineHead(nn.Module):
    """SSLAlign.cosine_map of a ``labelspace`` model (what the exported visual graph computes after the encoder),
    with a small bridge: the real method, none of the pretrained encoders."""

    fixed_terms = True  # SSLAlign.fixed_terms of a labelspace model

    def __init__(self) -> None:
        super().__init__()
        self.config = SSLAlignConfig(width=D // 8)
        bridge = np.zeros((SOUNDS, CLASSES), np.float32)
        bridge[np.arange(SOUNDS), np.arange(SOUNDS)] = 1.0
        self.labelspace = LabelSpaceMap(bridge=bridge)
        self.register_buffer("labelspace_weight", torch.tensor(1.0))

    def forward(self, vmap: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return SSLAlign.cosine_map(self, vmap, audio)


def _inputs(evidence_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual map with D learned channels + CLASSES per-cell probabilities, and the audio embedding with D learned
    channels + CLASSES class weights of ``evidence_scale`` (YAMNet scores of a sound the bridge barely maps)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, CLASSES, H, W, generator=g), dim=1)
    vmap = torch.cat([torch.randn(2, D, H, W, generator=g), probs], dim=1)
    weights = evidence_scale * torch.rand(2, CLASSES, generator=g)
    audio = torch.cat([torch.randn(2, D, generator=g), weights], dim=1)
    return vmap, audio


def test_label_space_term_keeps_its_scale_under_fp16_autocast():
    """torch fp16 engines run the visual graph under autocast: the label-space einsum used to come out in float16,
    where evidence of ~1e-7 is a handful of subnormal steps (or 0 on a flush-to-zero GPU), so the scale-free map
    (max 1) came out quantized to a few levels, or as 0 / subnormal eps = NaN."""
    head = _CosineHead().eval()
    vmap, audio = _inputs(evidence_scale=1e-6)
    with torch.inference_mode():
        ref = head(vmap, audio)
        with torch.autocast("cpu", dtype=torch.float16):
            half = head(vmap, audio)
    assert torch.isfinite(half).all()
    # the cosine half is float16 (3 decimal digits); the label-space half must be as exact as in float32
    assert (half.float() - ref).abs().max() < 5e-3, (half.float() - ref).abs().max()


def _flush_subnormals(model: onnx.ModelProto) -> onnx.ModelProto:
    """What a flush-to-zero float16 kernel does with a subnormal operand: every float16 constant of magnitude
    below the smallest normal float16 becomes 0."""

    def flush(tensor: onnx.TensorProto) -> None:
        if tensor.data_type == TensorProto.FLOAT16:
            value = numpy_helper.to_array(tensor).copy()
            value[np.abs(value) < FP16_TINY] = 0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))

    for init in model.graph.initializer:
        flush(init)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                flush(attr.t)
    return model


@pytest.mark.parametrize("evidence_scale", [0.0, 1.0])
def test_tensorrt_fp16_graph_of_an_all_zero_label_space_map_is_finite(tmp_path, evidence_scale):
    """TensorRT fp16 runs :func:`tb.onnx_fp16_bytes`'s graph: the label-space normalization's eps (1e-6) was cast
    to a float16 subnormal, which a flush-to-zero kernel reads as 0, so an all-zero map (silence, a sound the
    bridge does not map) gave 0 / 0 = NaN in every cell, and NaN confidence. Non-zero evidence must still give
    the float32 map."""
    import onnxruntime as ort

    head = _CosineHead().eval()
    vmap, audio = _inputs(evidence_scale)
    buf = io.BytesIO()
    torch.onnx.export(
        head,
        (vmap, audio),
        buf,
        input_names=["vmap", "audio"],
        output_names=["heatmap"],
        opset_version=17,
        dynamo=False,
    )
    path = tmp_path / "head.onnx"
    path.write_bytes(buf.getvalue())
    half = _flush_subnormals(onnx.load_from_string(tb.onnx_fp16_bytes(path)))
    feeds = {"vmap": vmap.numpy(), "audio": audio.numpy()}
    got = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with torch.inference_mode():
        ref = head(vmap, audio).numpy()
    assert np.isfinite(got).all(), got
    assert np.abs(got - ref).max() < 5e-3


def test_objectness_channel_of_a_constant_map_is_finite_under_fp16_autocast():
    """The objectness term's per-image min-max divides by max - min floored at 1e-6, a float16 subnormal: on a
    map with no contrast (a blank frame) a flush-to-zero GPU would make it 0 / 0. The channel is computed in
    float32 whatever the autocast dtype of the trunk's features."""
    model = SSLAlign(SSLAlignConfig(backbone="pretrained", width=4, visual_layer4_stride=2, objectness=True)).eval()
    feats = torch.ones(1, 1280, 8, 8, dtype=torch.float16)  # the same features everywhere: max - min = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        vmap = model.image_from_features(feats)  # as the trunk hands them over under CUDA autocast
    objectness = vmap[:, -1]
    assert objectness.dtype == torch.float32 and torch.isfinite(objectness).all()
    assert torch.equal(objectness, torch.zeros_like(objectness))  # no contrast: no object anywhere

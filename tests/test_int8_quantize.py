"""The int8 recipe on a network shaped like a trained MobileNet tail (issue 24): per-channel activation ranges a
thousand-fold apart across Conv-ReLU-Conv, and convolutions whose pre-activation range is far wider than what
their ReLU passes. Quantized as ``avloc export --int8`` does (``engines/quantize.py``), it must agree with fp32;
the earlier recipe (convolutions alone, no equalization) did not, on this network and on the open-set checkpoint
(docs/engines.md, "int8")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from avloc.engines import quantize


class _Tail(nn.Module):
    """conv 1->16 (ReLU) -> depthwise 3x3 (ReLU) -> conv 1x1 16->4, with channel i of the first activation
    spanning ~10^(-2.5 i / 15) of channel 0 and the depthwise weights the inverse (as BN folding makes them), and
    biases that push every pre-activation far below zero."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c = nn.Conv2d(16, 4, 1)
        spread = torch.logspace(0, -2.5, 16)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(16, 1, 3, 3, generator=g) * spread.view(-1, 1, 1, 1))
            self.a.bias.copy_(-3.0 * spread)  # pre-activations mostly negative: the ReLU passes a sliver
            self.b.weight.copy_(torch.randn(16, 1, 3, 3, generator=g).abs() / spread.view(-1, 1, 1, 1))
            self.b.bias.copy_(-torch.full((16,), 2.0))
            self.c.weight.copy_(torch.randn(4, 16, 1, 1, generator=g))
            self.c.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture()
def tail(tmp_path):
    model = _Tail().eval()
    path = tmp_path / "tail.onnx"
    torch.onnx.export(
        model, (torch.zeros(1, 1, 16, 16),), str(path), input_names=["x"], output_names=["y"], dynamo=False
    )
    rng = np.random.default_rng(0)
    feeds = [{"x": (3.0 * rng.standard_normal((1, 1, 16, 16))).astype(np.float32)} for _ in range(24)]
    return path, feeds


def _run(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def _sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    return float(10 * np.log10((reference**2).sum() / max(((reference - other) ** 2).sum(), 1e-30)))


def test_equalization_keeps_the_float_function_and_evens_the_channels(tail):
    import onnx

    path, feeds = tail
    model = onnx.load(str(path))
    assert [(p.name, c.name) for p, c, _ in quantize.equalization_pairs(model)] == [
        ("/a/Conv", "/b/Conv"),
        ("/b/Conv", "/c/Conv"),
    ]
    assert quantize.equalize_activations(model, feeds[:12]) == 2
    equalized = path.with_name("equalized.onnx")
    onnx.save(model, str(equalized))
    reference, after = _run(path, feeds), _run(equalized, feeds)
    np.testing.assert_allclose(after, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())

    def channel_ranges(p):
        probe = onnx.load(str(p))
        probe.graph.output.append(onnx.helper.make_tensor_value_info("/Relu_output_0", onnx.TensorProto.FLOAT, None))
        import onnxruntime as ort

        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.max([np.abs(session.run(["/Relu_output_0"], f)[0]).max(axis=(0, 2, 3)) for f in feeds[:12]], 0)

    before, now = channel_ranges(path), channel_ranges(equalized)
    assert before.max() / before.min() > 100  # hundreds of times apart, as in YAMNet's last layers
    assert now.max() / now.min() < 1.01  # ahead of a depthwise convolution: all at the widest channel's range


def test_recipe_quantizes_the_tail_where_convolutions_alone_did_not(tail, tmp_path, monkeypatch):
    path, feeds = tail
    calib, held_out = feeds[:12], feeds[12:]
    reference = _run(path, held_out)
    done = quantize._quantize(path, tmp_path / "int8.onnx", calib)
    assert done == {"equalized_pairs": 2}
    recipe = _sqnr_db(reference, _run(tmp_path / "int8.onnx", held_out))
    # the earlier recipe: convolutions only (each output quantized over its pre-activation range), no equalization
    monkeypatch.setattr(quantize, "QUANTIZED_OPS", ["Conv"])
    monkeypatch.setattr(quantize, "equalize_activations", lambda model, feeds: 0)
    quantize._quantize(path, tmp_path / "old.onnx", calib)
    old = _sqnr_db(reference, _run(tmp_path / "old.onnx", held_out))
    print(f"SQNR recipe {recipe:.1f} dB, convolutions alone {old:.1f} dB")
    assert recipe > 25.0 and recipe > old + 10.0, (recipe, old)


def test_near_ties_are_counted():
    """A map whose best cell two cells from the peak is within 2 % of the range counts as a near tie."""
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, 0, 0], maps[0, 0, 3] = 1.0, 0.99  # tie three cells away
    maps[1, 0, 0], maps[1, 0, 1], maps[1, 3, 3] = 1.0, 0.999, 0.5  # the close runner-up is a neighbour
    assert quantize._agreement(maps, maps)["fp32_near_ties"] == 0.5

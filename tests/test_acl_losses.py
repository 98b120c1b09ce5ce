"""ACL losses and maskers against small hand-computed cases, and the area regularizer at work."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from avloc.core.acl import build_acl_model
from avloc.core.acl.losses import (
    ImageMasker,
    acl_f,
    acl_i,
    area_reg,
    feature_mask,
    gumbel_sigmoid_hard,
    infonce,
    minmax_normalize,
)
from avloc.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TAU = 0.07
R = 1 / math.sqrt(2)


def _ce(row: list[float], label: int) -> float:
    """-log softmax(row / tau)[label]."""
    scaled = [v / TAU for v in row]
    top = max(scaled)
    return -(scaled[label] - top - math.log(sum(math.exp(v - top) for v in scaled)))


def test_infonce_and_acl_i_hand_computed() -> None:
    pred = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # unnormalized on purpose
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # cos matrix pred x target: [[1, 1/sqrt2], [0, 1/sqrt2]]
    expected = 0.5 * (_ce([1.0, R], 0) + _ce([0.0, R], 1))
    assert math.isclose(infonce(pred, target, TAU).item(), expected, rel_tol=1e-5)
    # transposed direction: rows of target x pred = [[1, 0], [1/sqrt2, 1/sqrt2]]
    reverse = 0.5 * (_ce([1.0, 0.0], 0) + _ce([R, R], 1))
    assert math.isclose(acl_i(target, pred, TAU).item(), 0.5 * (expected + reverse), rel_tol=1e-5)


def test_acl_f_hand_computed() -> None:
    # v_f[b, n]: image b pooled by audio n's mask; logits[b, n] = cos(v_f[b, n], pred[b])
    v_f = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 2.0]]])
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = [[1.0, 0.0], [R, 1.0]]
    rows = 0.5 * (_ce(logits[0], 0) + _ce(logits[1], 1))
    cols = 0.5 * (_ce([logits[0][0], logits[1][0]], 0) + _ce([logits[0][1], logits[1][1]], 1))
    assert math.isclose(acl_f(v_f, pred, TAU).item(), 0.5 * (rows + cols), rel_tol=1e-5)


def test_area_reg_hand_computed() -> None:
    value = area_reg(torch.tensor(0.5), torch.tensor(0.1))
    assert math.isclose(value.item(), 0.1 + 0.1, rel_tol=1e-6)
    assert area_reg(torch.tensor(0.4), torch.tensor(0.0)).item() == 0.0


def test_feature_mask_is_sigmoid_of_minmax() -> None:
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    normalized = minmax_normalize(x)
    torch.testing.assert_close(normalized.flatten(), torch.tensor([0.0, 0.25, 0.5, 1.0]), atol=1e-6, rtol=0)
    expected = torch.sigmoid((torch.tensor([0.0, 0.25, 0.5, 1.0]) - 0.5) / 0.07)
    torch.testing.assert_close(feature_mask(x).flatten(), expected, atol=1e-5, rtol=0)


def test_gumbel_sigmoid_is_hard_forward_and_soft_backward() -> None:
    logits = torch.tensor([-40.0, -0.3, 0.2, 40.0], requires_grad=True)
    hard = gumbel_sigmoid_hard(logits, tau=0.5, generator=torch.Generator().manual_seed(3))
    assert set(hard.tolist()) <= {0.0, 1.0}
    assert hard[0] == 0.0 and hard[3] == 1.0  # noise cannot flip +-40
    hard.sum().backward()
    # same noise again: the gradient is that of sigmoid((x + noise) / tau)
    u = torch.rand(4, generator=torch.Generator().manual_seed(3))
    soft = torch.sigmoid((logits.detach() + torch.log(u / (1 - u))) / 0.5)
    torch.testing.assert_close(logits.grad, soft * (1 - soft) / 0.5)


def test_image_masker_heatmap_and_init() -> None:
    masker = ImageMasker()
    assert masker.w.item() == 10.0 and masker.b.item() == 14.0
    x = torch.tensor([[-3.0, 0.0, 1.0]])
    torch.testing.assert_close(masker.heatmap(x), torch.sigmoid(x + 1.4))
    # training mask of 10x + 14: x = -3 -> -16 (off), x = 1 -> 24 (on), whatever the noise
    mask = masker.hard_mask(x, torch.Generator().manual_seed(0))
    assert mask[0, 0] == 0.0 and mask[0, 2] == 1.0


def test_area_regularization_drives_areas_towards_targets() -> None:
    # w = 1, b = 0 keeps the tiny random decoder's logits out of saturation so a few steps show the trend
    config = load_config(ROOT / "configs" / "acl_tiny.yaml", ["model.mask_init_w=1.0", "model.mask_init_b=0.0"])
    torch.manual_seed(0)
    model = build_acl_model(config["model"]).train()
    spec, image = torch.randn(4, 1, 98, 128), torch.randn(4, 3, 48, 48)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=2e-2)
    history = []
    for _ in range(40):
        out = model.training_outputs(image, model.encode_audio(spec))
        loss = area_reg(out["p_area"], out["n_area"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((out["p_area"].item(), out["n_area"].item(), loss.item()))
    (p0, n0, l0), (p1, n1, l1) = history[0], history[-1]
    assert p0 > 0.5 and n0 > 0.3  # starts with large masks
    assert l1 < 0.6 * l0
    assert abs(p1 - 0.4) < abs(p0 - 0.4) and n1 < n0

"""SSL-Align loss: s_L / s_A / InfoNCE against NumPy written from the paper's formulas, and the pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avloc.core.config import from_dict, load_config
from avloc.core.errors import UserError
from avloc.core.losses import LossConfig, SSLAlignLoss, info_nce, view_pairs
from avloc.core.ssl_align import SSLAlign, SSLAlignConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _np_normalize(x: np.ndarray, axis: int) -> np.ndarray:
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def _np_sl(vmap: np.ndarray, audio: np.ndarray, eps: float = 0.65, t: float = 0.03) -> np.ndarray:
    """s_L[n,k] = sum_hw W*S / sum_hw W with S = cos(v_n(h,w), a_k), W = sigmoid((S - eps) / t)."""
    v = _np_normalize(vmap, 1)
    a = _np_normalize(audio, 1)
    out = np.zeros((len(v), len(a)))
    for n in range(len(v)):
        for k in range(len(a)):
            s = np.tensordot(a[k], v[n], axes=(0, 0))  # [h, w]
            w = 1.0 / (1.0 + np.exp(-(s - eps) / t))
            out[n, k] = (w * s).sum() / w.sum()
    return out


def _np_ce_rows(logits: np.ndarray) -> float:
    """mean_i -log softmax(logits[i])[i]."""
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-np.mean(np.diag(logp)))


def test_info_nce_hand_computed_case():
    # rows: [2, 0] -> -log(e^2 / (e^2 + 1)); [1, 3] -> -log(e^3 / (e + e^3))
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    row0 = -np.log(np.exp(2) / (np.exp(2) + 1))
    row1 = -np.log(np.exp(3) / (np.exp(1) + np.exp(3)))
    assert float(info_nce(logits)) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # columns: [2, 1] -> -log(e^2/(e^2+e)); [0, 3] -> -log(e^3/(1+e^3))
    col0 = -np.log(np.exp(2) / (np.exp(2) + np.exp(1)))
    col1 = -np.log(np.exp(3) / (1 + np.exp(3)))
    both = float(info_nce(logits, symmetric=True))
    assert both == pytest.approx((row0 + row1) / 2 + (col0 + col1) / 2, rel=1e-6)


def test_info_nce_offset_targets_gathered_columns():
    logits = torch.tensor([[0.0, 0.0, 5.0, 0.0]])  # one local row; its positive is global column 2
    assert float(info_nce(logits, offset=2)) == pytest.approx(-np.log(np.exp(5) / (np.exp(5) + 3)), rel=1e-6)


def test_localization_similarity_matches_numpy():
    rng = np.random.default_rng(0)
    model = SSLAlign(SSLAlignConfig(width=1))  # D = 8
    vmap = rng.normal(size=(3, 8, 2, 3)).astype(np.float32)
    audio = rng.normal(size=(4, 8)).astype(np.float32)
    # Make some locations close to the audio so the soft mask is not all ~0 or ~1.
    vmap[0, :, 0, 0] = audio[0] + 0.1 * rng.normal(size=8)
    vmap[1, :, 1, 2] = audio[1]
    got = model.localization_similarity(torch.from_numpy(vmap), torch.from_numpy(audio)).numpy()
    np.testing.assert_allclose(got, _np_sl(vmap, audio), rtol=1e-4, atol=1e-5)
    assert got[1, 1] > 0.99  # a location identical to the audio dominates the masked mean


def test_alignment_similarity_matches_numpy():
    rng = np.random.default_rng(1)
    model = SSLAlign(SSLAlignConfig(width=1))
    wv, bv = rng.normal(size=(8, 8)), rng.normal(size=8)
    wa, ba = rng.normal(size=(8, 8)), rng.normal(size=8)
    with torch.no_grad():
        model.visual_proj.weight.copy_(torch.tensor(wv))
        model.visual_proj.bias.copy_(torch.tensor(bv))
        model.audio_proj.weight.copy_(torch.tensor(wa))
        model.audio_proj.bias.copy_(torch.tensor(ba))
    vmap = rng.normal(size=(2, 8, 3, 3))
    audio = rng.normal(size=(3, 8))
    got = model.alignment_similarity(torch.tensor(vmap).float(), torch.tensor(audio).float())
    pv = _np_normalize(vmap.max(axis=(2, 3)) @ wv.T + bv, 1)  # max-pooled visual map -> Linear
    pa = _np_normalize(audio @ wa.T + ba, 1)
    np.testing.assert_allclose(got.detach().numpy(), pv @ pa.T, rtol=1e-4, atol=1e-5)


def test_full_loss_matches_numpy_sum_over_pairs():
    rng = np.random.default_rng(2)
    torch.manual_seed(0)
    model = SSLAlign(SSLAlignConfig(width=1))
    views = ("orig", "aug", "nn")
    vmaps = {v: rng.normal(size=(4, 8, 2, 2)).astype(np.float32) for v in views}
    audios = {v: rng.normal(size=(4, 8)).astype(np.float32) for v in views}
    tau = 0.07
    loss_fn = SSLAlignLoss(LossConfig(tau=tau))
    total, parts = loss_fn(
        model, {k: torch.from_numpy(v) for k, v in vmaps.items()}, {k: torch.from_numpy(v) for k, v in audios.items()}
    )
    w = {n: p.detach().double().numpy() for n, p in model.named_parameters() if "proj" in n}
    expected = 0.0
    for v in views:
        for a in views:
            expected += _np_ce_rows(_np_sl(vmaps[v], audios[a]) / tau)
            pooled = vmaps[v].max(axis=(2, 3))
            pv = _np_normalize(pooled @ w["visual_proj.weight"].T + w["visual_proj.bias"], 1)
            pa = _np_normalize(audios[a] @ w["audio_proj.weight"].T + w["audio_proj.bias"], 1)
            expected += _np_ce_rows(pv @ pa.T / tau)
    assert len(parts) == 18
    assert float(total.detach()) == pytest.approx(expected, rel=1e-4)
    assert float(total.detach()) == pytest.approx(sum(float(p) for p in parts.values()), rel=1e-6)


def test_symmetric_adds_audio_anchored_term():
    rng = np.random.default_rng(3)
    model = SSLAlign(SSLAlignConfig(width=1))
    vmap = rng.normal(size=(3, 8, 2, 2)).astype(np.float32)
    audio = rng.normal(size=(3, 8)).astype(np.float32)
    cfg = LossConfig(use_sa=False, positives=("orig",), symmetric=True)
    total, _ = SSLAlignLoss(cfg)(model, {"orig": torch.from_numpy(vmap)}, {"orig": torch.from_numpy(audio)})
    s = _np_sl(vmap, audio) / cfg.tau
    assert float(total.detach()) == pytest.approx(_np_ce_rows(s) + _np_ce_rows(s.T), rel=1e-4)


def test_nine_pairs_and_ablation_flags():
    assert view_pairs(LossConfig()) == [(v, a) for v in ("orig", "aug", "nn") for a in ("orig", "aug", "nn")]
    assert view_pairs(LossConfig(positives=("orig",))) == [("orig", "orig")]
    # order of the config list does not matter; pairs follow the canonical view order
    assert view_pairs(LossConfig(positives=("nn", "orig"))) == [
        ("orig", "orig"),
        ("orig", "nn"),
        ("nn", "orig"),
        ("nn", "nn"),
    ]
    model = SSLAlign(SSLAlignConfig(width=1))
    vm = {v: torch.randn(2, 8, 2, 2) for v in ("orig", "aug", "nn")}
    au = {v: torch.randn(2, 8) for v in ("orig", "aug", "nn")}
    _, parts = SSLAlignLoss(LossConfig(use_sa=False, positives=("orig", "aug")))(model, vm, au)
    assert sorted(parts) == ["sl/aug-aug", "sl/aug-orig", "sl/orig-aug", "sl/orig-orig"]
    _, parts = SSLAlignLoss(LossConfig(use_sl=False, positives=("orig",)))(model, vm, au)
    assert sorted(parts) == ["sa/orig-orig"]


@pytest.mark.parametrize(
    ("name", "positives", "use_sa"),
    [
        ("ssl_align.yaml", ("orig", "aug", "nn"), True),
        ("ablations/single_positive.yaml", ("orig",), False),
        ("ablations/align_only.yaml", ("orig",), True),
        ("ablations/multiview.yaml", ("orig", "aug"), False),
        ("ablations/semantic.yaml", ("orig", "nn"), False),
        ("ablations/semantic_multiview.yaml", ("orig", "aug", "nn"), False),
        ("ablations/multiview_align.yaml", ("orig", "aug"), True),
        ("ablations/semantic_align.yaml", ("orig", "nn"), True),
    ],
)
def test_config_files_select_the_right_pairs(name, positives, use_sa):
    config = load_config(CONFIGS / name)
    loss = from_dict(LossConfig, config["loss"], "loss")
    assert tuple(loss.positives) == positives and loss.use_sa == use_sa and loss.use_sl
    assert len(view_pairs(loss)) == len(positives) ** 2
    # configs without NN positives must not require an NN index
    assert ("nn" in positives) == (config["train"]["nn_index"] is not None)


def test_bad_loss_config_is_user_error():
    with pytest.raises(UserError, match="positives"):
        LossConfig(positives=("orig", "flip"))
    with pytest.raises(UserError, match="use_sl and use_sa"):
        LossConfig(use_sl=False, use_sa=False)
    with pytest.raises(UserError, match="'orig'"):
        LossConfig(positives=("aug",))


def test_info_nce_masked_negatives_leave_the_denominator():
    logits = torch.tensor([[2.0, 0.0, 1.0], [1.0, 3.0, 0.5], [0.0, 0.0, 1.0]])
    mask = torch.tensor([[False, False, True], [False, False, False], [True, False, False]])
    row0 = -np.log(np.exp(2) / (np.exp(2) + 1))  # column 2 dropped
    row1 = -np.log(np.exp(3) / (np.exp(1) + np.exp(3) + np.exp(0.5)))
    row2 = -np.log(np.exp(1) / (1 + np.exp(1)))  # column 0 dropped
    assert float(info_nce(logits, negatives_mask=mask)) == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)
    # the column-anchored term drops the same pairs (transposed): column 0 loses row 2, column 2 loses row 0
    col0 = -np.log(np.exp(2) / (np.exp(2) + np.exp(1)))
    col1 = -np.log(np.exp(3) / (1 + np.exp(3) + 1))
    col2 = -np.log(np.exp(1) / (np.exp(0.5) + np.exp(1)))
    both = float(info_nce(logits, symmetric=True, negatives_mask=mask))
    assert both == pytest.approx((row0 + row1 + row2) / 3 + (col0 + col1 + col2) / 3, rel=1e-6)

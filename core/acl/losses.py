"""ACL losses and maskers (Park et al., WACV 2024; swimmiing/ACL-SSL ``loss_utils.py`` / ``mask_utils.py``).

- ``acl_i``: symmetric InfoNCE between audio-driven embeddings and CLIP embeddings of ``image x hard_mask``.
- ``acl_f``: symmetric cross-entropy between each audio embedding and its image's dense CLIP features pooled
  by *every* audio's soft mask (``v_f[b, n]`` = image ``b`` pooled by audio ``n``'s mask).
- ``area_reg``: ``|positive area - 0.4| + |negative area - 0|`` with the reference's definitions: positive =
  mean of the diagonal of the ``[B, B]`` hard-mask area matrix, negative = ``mean(all) - positive / B``
  (the off-diagonal *sum* over ``B^2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ACLLossConfig:
    tau: float = 0.07
    w_acl_i: float = 1.0
    w_acl_f: float = 1.0
    w_area: float = 1.0
    positive_area: float = 0.4
    negative_area: float = 0.0


def infonce(pred: Tensor, target: Tensor, tau: float = 0.07) -> Tensor:
    """Cross-entropy of ``cos(pred_i, target_j) / tau`` with the diagonal as labels."""
    logits = F.normalize(pred, dim=1) @ F.normalize(target, dim=1).t() / tau
    return F.cross_entropy(logits, torch.arange(pred.shape[0], device=pred.device))


def acl_i(v_i: Tensor, pred_emb: Tensor, tau: float = 0.07) -> Tensor:
    """Image-level ACL: ``v_i`` ``[B, C]`` masked-image embeddings, ``pred_emb`` ``[B, C]``."""
    return 0.5 * (infonce(pred_emb, v_i, tau) + infonce(v_i, pred_emb, tau))


def acl_f(v_f: Tensor, pred_emb: Tensor, tau: float = 0.07) -> Tensor:
    """Feature-level ACL: ``v_f`` ``[B_img, B_audio, C]``, ``pred_emb`` ``[B, C]``.

    ``logits[b, n] = cos(v_f[b, n], pred_emb[b])``; cross-entropy over rows and over columns.
    """
    logits = (F.normalize(v_f, dim=2) * F.normalize(pred_emb, dim=1).unsqueeze(1)).sum(dim=2) / tau
    labels = torch.arange(v_f.shape[0], device=v_f.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def area_reg(p_area: Tensor, n_area: Tensor, p_thr: float = 0.4, n_thr: float = 0.0) -> Tensor:
    return (p_area - p_thr).abs() + (n_area - n_thr).abs()


def gumbel_sigmoid_hard(logits: Tensor, tau: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Straight-through Gumbel-sigmoid: hard 0/1 forward, gradient of the soft sample backward."""
    u = torch.rand(logits.shape, device=logits.device, dtype=logits.dtype, generator=generator)
    logistic = torch.log(u / (1.0 - u))  # X - Y of two Gumbel(0, 1) samples ~ Logistic(0, 1)
    soft = torch.sigmoid((logits + logistic) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


class ImageMasker(nn.Module):
    """``Sim2Mask`` with learnable scalars ``w``, ``b`` (init 10, 14).

    Training: hard Gumbel-sigmoid mask of ``w * x + b``. Inference heatmap: ``sigmoid(x + b / w)``.
    """

    def __init__(self, init_w: float = 10.0, init_b: float = 14.0, gumbel_tau: float = 1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(init_w)))
        self.b = nn.Parameter(torch.tensor(float(init_b)))
        self.gumbel_tau = gumbel_tau

    def hard_mask(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return gumbel_sigmoid_hard(logits * self.w + self.b, self.gumbel_tau, generator)

    def heatmap(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits + self.b / self.w)


def minmax_normalize(x: Tensor) -> Tensor:
    """Per-map min-max over the last two dims, with the reference's 1e-7 margins."""
    lo = x.amin(dim=(-2, -1), keepdim=True) - 1e-7
    hi = x.amax(dim=(-2, -1), keepdim=True) + 1e-7
    return (x - lo) / (hi - lo)


def feature_mask(logits: Tensor, threshold: float = 0.5, tau: float = 0.07) -> Tensor:
    """Soft feature-level mask ``sigmoid((minmax(x) - 0.5) / 0.07)``."""
    return torch.sigmoid((minmax_normalize(logits) - threshold) / tau)


def acl_loss(outputs: dict[str, Tensor], pred_emb: Tensor, config: ACLLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the three terms from :meth:`ACL.training_outputs`; returns (total, detached parts)."""
    parts = {
        "acl_i": acl_i(outputs["v_i"], pred_emb, config.tau) * config.w_acl_i,
        "acl_f": acl_f(outputs["v_f"], pred_emb, config.tau) * config.w_acl_f,
        "area_reg": area_reg(outputs["p_area"], outputs["n_area"], config.positive_area, config.negative_area)
        * config.w_area,
    }
    parts["positive_area"] = outputs["p_area"].detach()
    parts["negative_area"] = outputs["n_area"].detach()
    total = parts["acl_i"] + parts["acl_f"] + parts["area_reg"]
    return total, {k: v.detach() for k, v in parts.items()}  # parts are for logging: no graph kept

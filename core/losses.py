"""The SSL-Align contrastive loss: multiple positive pairs, each scored with s_L and s_A (InfoNCE).

Senocak et al., ICCV 2023: every training sample has up to three visual views (original, augmented,
a conceptually similar "NN" sample) and three audio views (the same three). Each (visual view, audio
view) pair is a positive pair; for each pair and for each of the two similarities (localization s_L,
alignment s_A) an InfoNCE term with in-batch negatives is added:

    L = sum_{v in V} sum_{a in A} [ CE(s_L(v, a) / tau, arange) + CE(s_A(v, a) / tau, arange) ]

Image-anchored as in the reference (softmax over the audio of the batch for each image, rows of the
[N, K] similarity); ``symmetric`` also adds the audio-anchored term (softmax over images, columns).

Each distinct view is encoded once by the caller; this module only forms the pairs.  With several
processes the key side can be gathered from all ranks (``gather``): rows stay local, columns cover the
global batch and the positive of local row ``i`` is column ``offset + i``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from avloc.core.errors import UserError

VIEWS = ("orig", "aug", "nn")

# gather(tensor) -> (tensor concatenated over ranks along dim 0, offset of this rank's rows)
Gather = Callable[[Tensor], tuple[Tensor, int]]


@dataclass(frozen=True)
class LossConfig:
    tau: float = 0.07
    use_sl: bool = True  # localization similarity term
    use_sa: bool = True  # alignment (projected, global) similarity term
    positives: tuple[str, ...] = VIEWS  # views used for both modalities: 3 views -> 3x3 pairs
    symmetric: bool = False  # add the audio-anchored InfoNCE term

    def __post_init__(self) -> None:
        unknown = [v for v in self.positives if v not in VIEWS]
        if unknown or not self.positives:
            raise UserError(
                f"config loss.positives={list(self.positives)}: expected a non-empty subset of {list(VIEWS)}"
            )
        if "orig" not in self.positives:
            raise UserError(f"config loss.positives={list(self.positives)}: must contain 'orig'")
        if len(set(self.positives)) != len(self.positives):
            raise UserError(f"config loss.positives={list(self.positives)}: views repeated")
        if not (self.use_sl or self.use_sa):
            raise UserError("config loss: use_sl and use_sa are both false; at least one is needed")
        if self.tau <= 0:
            raise UserError(f"config loss.tau={self.tau}: expected > 0")


def view_pairs(config: LossConfig) -> list[tuple[str, str]]:
    """The (visual view, audio view) positive pairs: the Cartesian product of ``positives`` with itself."""
    ordered = [v for v in VIEWS if v in config.positives]
    return list(itertools.product(ordered, ordered))


def info_nce(
    logits: Tensor,
    offset: int = 0,
    symmetric: bool = False,
    column_logits: Tensor | None = None,
    negatives_mask: Tensor | None = None,
) -> Tensor:
    """Cross-entropy over rows of ``logits`` [N, K] with the positive of row i at column offset + i.

    ``symmetric`` adds the column-anchored term; ``column_logits`` [M, N_all] gives it when the rows
    of ``logits`` are not the whole batch (gathered negatives), otherwise it is ``logits.t()``.
    ``negatives_mask`` [N, K] (True = not a negative: a known false negative) removes those columns from
    row i's denominator (and, transposed, from the column-anchored term); never the positive itself.
    """
    n = logits.shape[0]
    targets = torch.arange(n, device=logits.device) + offset
    logits = logits.float()
    if negatives_mask is not None:
        logits = logits.masked_fill(negatives_mask, float("-inf"))
    loss = F.cross_entropy(logits, targets)
    if symmetric:
        cols = logits.t() if column_logits is None else column_logits.float()
        if negatives_mask is not None and column_logits is not None:
            cols = cols.masked_fill(negatives_mask.t(), float("-inf"))
        col_targets = torch.arange(cols.shape[0], device=logits.device) + offset
        loss = loss + F.cross_entropy(cols, col_targets)
    return loss


def _no_gather(x: Tensor) -> tuple[Tensor, int]:
    return x, 0


class SSLAlignLoss(torch.nn.Module):
    """Sum of InfoNCE terms over the configured view pairs and similarities.

    ``model`` supplies ``localization_similarity`` and ``project_image``/``project_audio`` (s_A heads),
    i.e. :class:`avloc.core.ssl_align.SSLAlign`.
    """

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.config = config
        self.pairs = view_pairs(config)

    def forward(
        self,
        model: torch.nn.Module,
        vmaps: dict[str, Tensor],
        audios: dict[str, Tensor],
        gather: Gather | None = None,
        negatives_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``vmaps[view]`` [N, D, h, w] and ``audios[view]`` [N, D] for each view in the config.

        ``negatives_mask`` [N, N]: known same-sound pairs (sample i, sample j) left out of i's negatives in
        every pair's InfoNCE (local batch only: not with gathered negatives).
        Returns the summed loss and its parts (``sl/<v>-<a>``, ``sa/<v>-<a>``, detached) for logging.
        """
        cfg = self.config
        if negatives_mask is not None and gather is not None:
            raise UserError("train.false_negative_k needs local negatives; it cannot be used with gather_negatives")
        gather = gather or _no_gather
        missing = [v for v in cfg.positives if v not in vmaps or v not in audios]
        if missing:
            raise ValueError(f"views {missing} were not encoded; loss needs {list(cfg.positives)}")
        inv_tau = 1.0 / cfg.tau
        # Gather the key side once per view (not per pair).
        audio_all = {v: gather(audios[v]) for v in cfg.positives}
        vmap_all = {v: gather(vmaps[v]) for v in cfg.positives} if (cfg.symmetric and cfg.use_sl) else {}
        if cfg.use_sa:
            pv = {v: model.project_image(vmaps[v]) for v in cfg.positives}
            pa = {v: model.project_audio(audios[v]) for v in cfg.positives}
            pa_all = {v: gather(pa[v]) for v in cfg.positives}
            pv_all = {v: gather(pv[v]) for v in cfg.positives} if cfg.symmetric else {}
        parts: dict[str, Tensor] = {}
        total = vmaps[cfg.positives[0]].new_zeros((), dtype=torch.float32)
        for v, a in self.pairs:
            name = f"{v}-{a}"
            if cfg.use_sl:
                keys, offset = audio_all[a]
                logits = model.localization_similarity(vmaps[v], keys) * inv_tau
                cols = None
                if cfg.symmetric:
                    all_v, _ = vmap_all[v]
                    cols = model.localization_similarity(all_v, audios[a]).t() * inv_tau
                term = info_nce(logits, offset, cfg.symmetric, cols, negatives_mask)
                parts[f"sl/{name}"] = term.detach()
                total = total + term
            if cfg.use_sa:
                keys, offset = pa_all[a]
                logits = pv[v] @ keys.t() * inv_tau
                cols = None
                if cfg.symmetric:
                    all_pv, _ = pv_all[v]
                    cols = pa[a] @ all_pv.t() * inv_tau
                term = info_nce(logits, offset, cfg.symmetric, cols, negatives_mask)
                parts[f"sa/{name}"] = term.detach()
                total = total + term
        return total, parts

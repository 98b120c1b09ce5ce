"""What the shared trainer (``avloc.train.trainer``) needs to train ACL; no dependency on ``avloc.train``.

- :func:`split_run_config`: an ACL run config -> the sections the shared ``RunConfig`` parses (frontend,
  image, optim, train, data; one ``orig`` view, no NN index) + the ACL model section + the ACL loss.
- :func:`build_training_model`: the model with BEATs / CLIPSeg weights from ``--beats`` / ``--clipseg``
  (and optionally the released tokenizer), plus the model config to store in checkpoints.
- :class:`ACLTrainStep`: fbank, audio-driven embedding, masked vision and the three losses in one
  ``forward(batch) -> (loss, parts)`` (DDP sees every trainable parameter's use).
- :func:`compute_heatmaps`: the validation heatmaps and retrieval features, as the trainer's own.

Differences from the reference trainer, on purpose: batches are shuffled on one GPU too (the trainer's
epoch sampler), no unconditional ``dist.barrier()``, model selection on the validation split (never test),
frozen backbones in eval mode (``model.frozen_eval``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from avloc.core.acl.losses import ACLLossConfig, acl_loss
from avloc.core.acl.model import ACL, ACLConfig
from avloc.core.audio import FrontEnd, FrontEndConfig
from avloc.core.config import from_dict
from avloc.core.errors import UserError

METHOD = "acl"
VIEWS = ("orig",)


def split_run_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], ACLLossConfig]:
    """ACL run config -> (shared-trainer config, ACL model section, ACL loss config)."""
    if config.get("method") != METHOD:
        raise UserError(f"config method={config.get('method')!r}: expected {METHOD!r}")
    shared = {k: v for k, v in config.items() if k not in ("method", "model", "loss")}
    shared["loss"] = {"positives": list(VIEWS)}  # one view per modality; the pairs are formed by ACL
    train = dict(shared.get("train") or {})
    train["nn_index"] = None
    shared["train"] = train
    loss = from_dict(ACLLossConfig, config.get("loss"), "loss")
    frontend = FrontEndConfig.from_dict(shared.get("frontend"))
    if frontend.kind != "fbank":
        raise UserError(f"config frontend.kind={frontend.kind!r}: ACL's BEATs takes the 'fbank' front-end")
    return shared, dict(config.get("model") or {}), loss


def build_training_model(
    model_section: dict[str, Any],
    beats: str | Path | None,
    clipseg: str | Path | None,
    acl_checkpoint: str | Path | None = None,
) -> tuple[ACL, dict[str, Any]]:
    """Model with pretrained frozen parts (and optionally the released tokenizer) + its checkpoint config."""
    from avloc.core.acl.weights import load_pretrained, load_released_acl, pretrained_model_config

    if beats is None or clipseg is None:
        missing = "--beats" if beats is None else "--clipseg"
        raise UserError(
            f"{missing} is required to train ACL (a local BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt, "
            "a Hugging Face folder of CIDAS/clipseg-rd64-refined; see docs/acl.md)"
        )
    model_config = pretrained_model_config(model_section, beats, clipseg)
    model = load_pretrained(ACL(from_dict(ACLConfig, model_config, "model")), beats, clipseg)
    if acl_checkpoint is not None:
        load_released_acl(model, acl_checkpoint)
    return model, model_config


class ACLTrainStep(nn.Module):
    """One training forward: ``batch["wave_orig"]`` [B, N] + ``batch["image_orig"]`` [B, 3, S, S]."""

    def __init__(self, model: ACL, frontend: FrontEndConfig, loss: ACLLossConfig, amp: bool) -> None:
        super().__init__()
        self.model = model
        self.frontend = FrontEnd(frontend)
        self.loss = loss
        self.amp = amp

    def forward(self, batch: dict[str, Tensor], gather: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
        if gather is not None:
            raise UserError("config train.gather_negatives: not supported for ACL (its negatives are B x B masks)")
        image = batch["image_orig"]
        with torch.no_grad():
            spec = self.frontend(batch["wave_orig"])
        with torch.autocast(image.device.type, dtype=torch.float16, enabled=self.amp):
            embedding = self.model.encode_audio(spec)
            outputs = self.model.training_outputs(image, embedding)
        # losses in float32 (1 / 0.07 logits)
        outputs = {k: v.float() for k, v in outputs.items()}
        return acl_loss(outputs, embedding.float(), self.loss)


@torch.no_grad()
def compute_heatmaps(
    model: ACL, frontend: FrontEnd, loader: Any, device: torch.device
) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """Heatmaps per index (``model.heatmap_size``, 224 as the reference evaluates; ``sigmoid(logits + b / w)``
    in (0, 1)), and retrieval
    features: the CLIP image embedding and the audio-driven embedding, L2-normalized, in index order."""
    model.eval()
    maps: dict[int, np.ndarray] = {}
    vis, aud, order = [], [], []
    for batch in loader:
        heat, image_feature, audio_feature = model.evaluation_outputs(
            batch["image"].to(device), frontend(batch["wave"].to(device))
        )
        for i, m in zip(batch["index"].tolist(), heat.float().cpu().numpy(), strict=True):
            maps[i] = m
        vis.append(image_feature.float().cpu())
        aud.append(audio_feature.float().cpu())
        order.append(batch["index"])
    index = torch.cat(order).argsort()
    return maps, torch.cat(vis)[index].numpy(), torch.cat(aud)[index].numpy()

"""ACL engines: the same two-graph interface as SSL-Align (see :mod:`avloc.engines.export`).

- *audio graph*: host fbank ``[B, 1, T_frames, 128]`` -> audio-driven embedding ``[B, 512]`` (BEATs, audio
  tokenizer, token splicing, CLIP text encoder). It is the expensive half on audio and is computed once per
  audio window; the streaming side caches it between windows.
- *visual graph*: image ``[B, 3, S, S]`` (CLIP-normalized) + embedding -> heatmap ``[B, h, w]`` in (0, 1)
  (CLIPSeg decoder logits, bicubic to ``heatmap_size``, ``sigmoid(x + b / w)``) and a confidence ``[B]``.

Both graphs run on a frozen copy of the model (:meth:`ACL.freeze_for_export`): the BEATs weight norm is
folded, the relative-position bias for the manifest's window length, the prompt embeddings, causal mask
and CLIP vision positions are constants, and only the CLIP layers the decoder reads are run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from avloc.core.checkpoint import LoadedModel
from avloc.core.errors import UserError
from avloc.engines.export import EngineGraphs, export_engine, register_graph_builder, top_fraction_k

METHOD = "acl"


class ACLAudioGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, spectrogram: Tensor) -> Tensor:
        return self.model.encode_audio(spectrogram)


class ACLVisualGraph(nn.Module):
    """Heatmap of each image conditioned on its audio-driven embedding and the mean of its top-k cells."""

    def __init__(self, model: nn.Module, heatmap_size: int, top_k: int) -> None:
        super().__init__()
        self.model = model
        self.heatmap_size = heatmap_size
        self.top_k = top_k

    def forward(self, image: Tensor, audio_embedding: Tensor) -> tuple[Tensor, Tensor]:
        heatmap = self.model.heatmap_from_embedding(image, audio_embedding, self.heatmap_size)
        top = torch.topk(heatmap.reshape(heatmap.shape[0], -1), self.top_k, dim=1).values
        return heatmap, top.mean(dim=1)


def _logit_scale(model: nn.Module) -> Callable[[Tensor, Tensor], float]:
    """The parity check's heatmap scale (see ``export._parity``): sigmoid passes at most a quarter of the
    decoder logits' rounding error on to the heatmap."""

    def scale(image: Tensor, embedding: Tensor) -> float:
        return float(model.logits(image, embedding).abs().max()) / 4

    return scale


def acl_graphs(loaded: LoadedModel, image_size: int) -> EngineGraphs:
    """The engine graph builder for checkpoints with method "acl"."""
    if loaded.frontend.kind != "fbank":
        raise UserError(f"ACL checkpoint front-end kind {loaded.frontend.kind!r}: expected 'fbank'")
    model = loaded.model.eval()
    patch = int(model.av_grounder.config.vision_config.patch_size)
    if image_size % patch:
        raise UserError(f"--image-size {image_size}: expected a multiple of the CLIP patch size {patch}")
    _, frames, mel_bins = loaded.frontend.output_shape()
    # in place: the loaded model is the engine's own (a copy would hold a second 250 M-parameter model)
    frozen = model.freeze_for_export(frames, mel_bins, image_size, inplace=True)
    size = int(model.config.heatmap_size)
    feature_size = (size, size)
    k = top_fraction_k(feature_size)
    return EngineGraphs(
        audio=ACLAudioGraph(frozen).eval(),
        visual=ACLVisualGraph(frozen, size, k).eval(),
        embed_dim=int(model.embed_dim),
        feature_size=feature_size,
        heatmap={
            "range": [0.0, 1.0],
            "meaning": "ACL mask sigmoid(logits + b / w) of the CLIPSeg decoder conditioned on the "
            "audio-driven embedding (logits resized bicubic to this size first); the paper binarizes it "
            "with absolute thresholds (abs:t)",
        },
        confidence={
            "range": [0.0, 1.0],
            "top_k": k,
            "meaning": f"mean of the top {k} of {size * size} heatmap cells (25 %)",
        },
        heatmap_scale=_logit_scale(frozen),
    )


def export_acl(checkpoint: str | Path, out_dir: str | Path, **options: Any) -> Path:
    """Export an ACL checkpoint (see :func:`avloc.engines.export.export_engine` for ``options``)."""
    register_graph_builder(METHOD, acl_graphs)
    return export_engine(checkpoint, out_dir, **options)


# Importing this module makes ACL exportable and loadable by the torch backend.
register_graph_builder(METHOD, acl_graphs)

"""ACL's audio tokenizer: BEATs features ``[B, T, 2304]`` -> one audio token ``[B, 512]``.

Linear 2304->2304, GELU, Linear 2304->512, then attention pooling over T (the factor-graph attention of
AudioToken / FGA with a single utility): a *unary* score per step (Conv1d 512->512, ReLU, dropout 0.5,
Conv1d 512->1) and a *self* score (mean over keys of the cosine matrix between two 1x1-conv embeddings of
the steps), merged by a bias-free Conv1d(2->1), softmax over T, weighted sum of the steps.

Names match ``FGAEmbedder`` (``fc1``, ``fc2``, ``fga.un_models.0.*``, ``fga.pp_models.0.*``,
``fga.reduce_potentials.0.weight``) so the released ``audio_proj`` weights load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Unary(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.embed = nn.Conv1d(dim, dim, 1)
        self.feature_reduce = nn.Conv1d(dim, 1, 1)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, T]`` -> ``[B, T]``."""
        hidden = F.dropout(F.relu(self.embed(x)), p=self.dropout, training=self.training)
        score = self.feature_reduce(hidden)
        return score.reshape(score.shape[0], score.shape[2])


class Pairwise(nn.Module):
    """Self-interaction: cosine similarity of ``embed_X(x)_i`` and ``embed_Y(x)_j``, averaged over ``j``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed_X = nn.Conv1d(dim, dim, 1)  # noqa: N815 - official parameter name
        self.embed_Y = nn.Conv1d(dim, dim, 1)  # noqa: N815

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, T]`` -> ``[B, T]``."""
        a = F.normalize(self.embed_X(x), dim=1)
        b = F.normalize(self.embed_Y(x), dim=1)
        return (a.transpose(1, 2) @ b).mean(dim=2)


class AttentionPooling(nn.Module):
    """FGA ``Atten(util_e=[dim], pairwise_flag=False)``: unary + self potentials -> softmax weights over T."""

    def __init__(self, dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.un_models = nn.ModuleList([Unary(dim, dropout)])
        self.pp_models = nn.ModuleDict({"0": Pairwise(dim)})
        self.reduce_potentials = nn.ModuleList([nn.Conv1d(2, 1, 1, bias=False)])

    def weights(self, x: Tensor) -> Tensor:
        """``[B, T, C]`` -> attention weights ``[B, T]`` (sum to 1 over T)."""
        xt = x.transpose(1, 2)
        potentials = torch.stack([self.un_models[0](xt), self.pp_models["0"](xt)], dim=1)  # [B, 2, T]
        merged = self.reduce_potentials[0](potentials)  # [B, 1, T]
        return torch.softmax(merged.reshape(merged.shape[0], merged.shape[2]), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, C]`` -> ``[B, C]``."""
        return (self.weights(x).unsqueeze(2) * x).sum(dim=1)


class AudioTokenizer(nn.Module):
    """``FGAEmbedder(input_size, output_size)``: the only trainable network of ACL besides (w, b)."""

    def __init__(self, input_size: int = 2304, output_size: int = 512, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_size, input_size)
        self.fc2 = nn.Linear(input_size, output_size)
        self.gelu = nn.GELU()
        self.fga = AttentionPooling(output_size, dropout)

    def forward(self, features: Tensor) -> Tensor:
        """BEATs features ``[B, T, input_size]`` -> audio token ``[B, output_size]``."""
        return self.fga(self.fc2(self.gelu(self.fc1(features))))

"""BEATs audio encoder (Chen et al., ICML 2023) as ACL uses it: frozen, layers 4/8/12 concatenated.

Module and parameter names follow microsoft/unilm ``beats/BEATs.py`` + ``backbone.py`` so the released
checkpoint (``BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt``: ``{"cfg": ..., "model": state_dict}``) loads
strictly, including the weight-normed positional convolution (``encoder.pos_conv.0.weight_g/weight_v``) and
the relative-position embedding that every layer shares (it is saved under each layer's name).

Input is the host-side fbank (``avloc.core.audio.FrontEnd`` kind ``fbank``: ``[B, 1, T_frames, 128]``); the
output is ``[B, T, 3 * encoder_embed_dim]`` with ``T = (T_frames // 16) * (128 // 16)`` (496 for 10 s).

Export: :meth:`BEATs.prepare_for_export` folds the weight norm into a plain weight and turns the relative
position bias for a fixed ``T`` into a constant, so the graph holds no bucket arithmetic and no weight norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avloc.core.errors import UserError


@dataclass(frozen=True)
class BEATsConfig:
    """The fields of the official ``BEATsConfig`` that change the forward pass or the parameter shapes."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = True
    predictor_class: int = 527

    @classmethod
    def from_official(cls, cfg: dict[str, Any]) -> BEATsConfig:
        """Known keys of an official ``cfg`` dict (dropouts and layer-drop do not apply when frozen)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _gelu(x: Tensor) -> Tensor:
    # fairseq's gelu: exact erf GELU computed in float32
    return F.gelu(x.float()).type_as(x)


class _WeightNormConv(nn.Module):
    """``nn.utils.weight_norm(Conv1d, dim=2)`` with the old parameter names (``weight_g``, ``weight_v``)."""

    def __init__(self, channels: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.padding = kernel // 2
        self.groups = groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.randn(channels, channels // groups, kernel) * 0.02)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("folded", None, persistent=False)  # set by fold(): plain weight for export

    def weight(self) -> Tensor:
        if self.folded is not None:
            return self.folded
        # norm over every dim except dim 2 (torch's norm_except_dim)
        norm = self.weight_v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
        return self.weight_v * (self.weight_g / norm)

    def fold(self) -> None:
        with torch.no_grad():
            self.folded = self.weight().detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class _SamePad(nn.Module):
    """Drop the extra last step an even kernel with padding k // 2 produces."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, : x.shape[2] - self.remove] if self.remove else x


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> Tensor:
    """T5-style bidirectional buckets of ``key - query`` (official ``_relative_positions_bucket``)."""
    position = torch.arange(length)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    relative = relative.abs()
    max_exact = half // 2
    large = (
        max_exact
        + (
            torch.log(relative.float().clamp(min=1) / max_exact)
            / math.log(max_distance / max_exact)
            * (half - max_exact)
        ).long()
    )
    large = large.clamp(max=half - 1)
    return buckets + torch.where(relative < max_exact, relative, large)


class MultiheadAttention(nn.Module):
    """BEATs self-attention: alpha-scaled stable softmax, shared relative bias with a GRU-style gate."""

    ALPHA = 32.0

    def __init__(self, cfg: BEATsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scaling = self.head_dim**-0.5
        self.num_buckets = cfg.num_buckets
        self.max_distance = cfg.max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, heads)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def compute_bias(self, length: int) -> Tensor:
        """``[heads, T, T]`` relative position bias."""
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
        buckets = buckets.to(self.relative_attention_bias.weight.device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(self, x: Tensor, position_bias: Tensor | None) -> Tensor:
        """``x``: ``[B, T, C]``; ``position_bias``: ``[heads, T, T]`` or None."""
        b, t, c = x.shape
        h, d = self.num_heads, self.head_dim
        q_raw = self.q_proj(x)
        q = (q_raw * (self.scaling / self.ALPHA)).reshape(b, t, h, d).transpose(1, 2)
        k = self.k_proj(x).reshape(b, t, h, d).transpose(1, 2)
        v = self.v_proj(x).reshape(b, t, h, d).transpose(1, 2)
        scores = q @ k.transpose(-1, -2)
        # official: subtract the row max before scaling back by alpha (keeps fp16 in range)
        scores = (scores - scores.amax(dim=-1, keepdim=True)) * self.ALPHA
        if position_bias is not None:
            bias = position_bias.unsqueeze(0)  # [1, H, T, T]
            if self.gru_rel_pos:
                gates = self.grep_linear(q_raw.reshape(b, t, h, d).transpose(1, 2))  # [B, H, T, 8]
                gates = torch.sigmoid(gates.reshape(b, h, t, 2, 4).sum(-1))
                gate_a, gate_b = gates[..., 0:1], gates[..., 1:2]
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
            scores = scores + bias
        attn = torch.softmax(scores, dim=-1).type_as(scores)
        out = (attn @ v).transpose(1, 2).reshape(b, t, c)
        return self.out_proj(out)


class TransformerSentenceEncoderLayer(nn.Module):
    def __init__(self, cfg: BEATsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        if cfg.activation_fn != "gelu":
            raise UserError(f"BEATs cfg activation_fn={cfg.activation_fn!r}: only 'gelu' checkpoints are supported")
        self.self_attn = MultiheadAttention(cfg, has_relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg.layer_norm_first
        self.alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def forward(self, x: Tensor, position_bias: Tensor | None) -> Tensor:
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), position_bias)
            return x + self.fc2(_gelu(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, position_bias))
        return self.final_layer_norm(x * self.alpha + self.fc2(_gelu(self.fc1(x))))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(
            _WeightNormConv(dim, cfg.conv_pos, cfg.conv_pos_groups), _SamePad(cfg.conv_pos), nn.GELU()
        )
        self.layers = nn.ModuleList(
            TransformerSentenceEncoderLayer(cfg, cfg.relative_position_embedding) for _ in range(cfg.encoder_layers)
        )
        if cfg.relative_position_embedding:
            # one table shared by every layer (and saved under every layer's name, as in the checkpoint)
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg.layer_norm_first
        self.relative_position_embedding = cfg.relative_position_embedding
        self.register_buffer("fixed_bias", None, persistent=False)  # set by BEATs.prepare_for_export

    def forward(self, x: Tensor, output_layers: tuple[int, ...]) -> list[Tensor]:
        """Outputs of the (1-based) ``output_layers``; stops after the last one needed."""
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        bias = None
        if self.relative_position_embedding:
            bias = self.fixed_bias if self.fixed_bias is not None else self.layers[0].self_attn.compute_bias(x.shape[1])
        outputs = []
        for index, layer in enumerate(self.layers[: max(output_layers)], start=1):
            x = layer(x, bias)
            if index in output_layers:
                outputs.append(x)
        return outputs


class BEATs(nn.Module):
    """fbank ``[B, 1, T_frames, 128]`` -> concatenated layer features ``[B, T, len(output_layers) * C]``."""

    def __init__(self, cfg: BEATsConfig, output_layers: tuple[int, ...] = (4, 8, 12)) -> None:
        super().__init__()
        if max(output_layers) > cfg.encoder_layers or min(output_layers) < 1:
            raise UserError(
                f"acl output_layers {list(output_layers)}: expected 1-based layers of a "
                f"{cfg.encoder_layers}-layer BEATs"
            )
        self.cfg = cfg
        self.output_layers = tuple(output_layers)
        self.patch_embedding = nn.Conv2d(
            1,
            cfg.embed_dim,
            kernel_size=cfg.input_patch_size,
            stride=cfg.input_patch_size,
            bias=cfg.conv_bias,
        )
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) if cfg.embed_dim != cfg.encoder_embed_dim else None
        )
        self.encoder = TransformerEncoder(cfg)
        # The AudioSet classifier of the fine-tuned checkpoint: kept so the state dict loads strictly, unused.
        self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class) if cfg.finetuned_model else None

    @property
    def out_dim(self) -> int:
        return len(self.output_layers) * self.cfg.encoder_embed_dim

    def num_tokens(self, frames: int, mel_bins: int = 128) -> int:
        p = self.cfg.input_patch_size
        return (frames // p) * (mel_bins // p)

    def forward(self, fbank: Tensor) -> Tensor:
        x = self.patch_embedding(fbank)  # [B, E, T/16, F/16]
        b, e = x.shape[0], x.shape[1]
        x = x.reshape(b, e, x.shape[2] * x.shape[3]).transpose(1, 2)
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return torch.cat(self.encoder(x, self.output_layers), dim=2)

    def prepare_for_export(self, frames: int, mel_bins: int = 128) -> None:
        """Fold the weight norm and freeze the relative bias for ``frames`` fbank frames (call on a copy)."""
        self.encoder.pos_conv[0].fold()
        if self.encoder.relative_position_embedding:
            with torch.no_grad():
                bias = self.encoder.layers[0].self_attn.compute_bias(self.num_tokens(frames, mel_bins))
            self.encoder.fixed_bias = bias.detach().clone()


def official_key_shapes(cfg: BEATsConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes the official BEATs code produces for ``cfg`` (written out by hand
    from microsoft/unilm ``beats/BEATs.py`` + ``backbone.py``; used to check the layout independently)."""
    c, f, h = cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads
    p, e = cfg.input_patch_size, cfg.embed_dim
    keys: dict[str, tuple[int, ...]] = {"patch_embedding.weight": (e, 1, p, p)}
    if cfg.conv_bias:
        keys["patch_embedding.bias"] = (e,)
    keys.update({"layer_norm.weight": (e,), "layer_norm.bias": (e,)})
    if e != c:
        keys.update({"post_extract_proj.weight": (c, e), "post_extract_proj.bias": (c,)})
    keys.update(
        {
            "encoder.pos_conv.0.bias": (c,),
            "encoder.pos_conv.0.weight_g": (1, 1, cfg.conv_pos),
            "encoder.pos_conv.0.weight_v": (c, c // cfg.conv_pos_groups, cfg.conv_pos),
        }
    )
    for i in range(cfg.encoder_layers):
        pre = f"encoder.layers.{i}."
        if cfg.relative_position_embedding:
            keys[pre + "self_attn.relative_attention_bias.weight"] = (cfg.num_buckets, h)
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            keys[f"{pre}self_attn.{proj}.weight"] = (c, c)
            keys[f"{pre}self_attn.{proj}.bias"] = (c,)
        if cfg.gru_rel_pos:
            keys[pre + "self_attn.grep_a"] = (1, h, 1, 1)
            keys[pre + "self_attn.grep_linear.weight"] = (8, c // h)
            keys[pre + "self_attn.grep_linear.bias"] = (8,)
        keys.update(
            {
                pre + "self_attn_layer_norm.weight": (c,),
                pre + "self_attn_layer_norm.bias": (c,),
                pre + "fc1.weight": (f, c),
                pre + "fc1.bias": (f,),
                pre + "fc2.weight": (c, f),
                pre + "fc2.bias": (c,),
                pre + "final_layer_norm.weight": (c,),
                pre + "final_layer_norm.bias": (c,),
            }
        )
    keys.update({"encoder.layer_norm.weight": (c,), "encoder.layer_norm.bias": (c,)})
    if cfg.finetuned_model:
        keys.update({"predictor.weight": (cfg.predictor_class, c), "predictor.bias": (cfg.predictor_class,)})
    return keys

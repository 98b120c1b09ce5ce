"""The ACL model (Park, Senocak, Chung, "Can CLIP Help Sound Source Localization?", WACV 2024).

fbank -> frozen BEATs (layers 4/8/12) -> trainable audio tokenizer -> one token spliced into
"A photo of {}" ([SOS, a, photo, of, AUDIO, EOS]) -> frozen CLIP text encoder (causal), last position,
text projection = *audio-driven embedding* -> conditions the frozen CLIPSeg decoder on the image ->
logits -> heatmap ``sigmoid(logits + b / w)``.

Submodule names follow swimmiing/ACL-SSL ``modules/models.py`` (``audio_backbone``, ``audio_proj``,
``av_grounder``, ``masker_i``). The CLIPSeg forward passes are written here over the Hugging Face
submodules (vision layers, decoder layers) so they trace to ONNX with explicit shapes and so training can
reuse one vision pass for all B x B (image, audio) pairs.

Frozen backbones stay in eval mode while training (``frozen_eval: true``, the default): the reference leaves
them in train mode, so BEATs' layer-drop (0.05) and CLIP dropouts would make the frozen features random.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avloc.core.acl.beats import BEATs, BEATsConfig
from avloc.core.acl.losses import ImageMasker, feature_mask
from avloc.core.acl.tokenizer import AudioTokenizer
from avloc.core.config import from_dict
from avloc.core.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# "A photo of " through CLIP's BPE tokenizer: <|startoftext|> a photo of <|endoftext|>
DEFAULT_PROMPT_IDS = (49406, 320, 1125, 539, 49407)
PROMPT_TEXT = "A photo of {}"
MASK_VALUE = -1.0e4  # causal mask: finite, representable in fp16, exp() underflows to exactly 0


def default_clipseg_config() -> dict[str, Any]:
    """The architecture of ``CIDAS/clipseg-rd64-refined`` (ViT-B/16 CLIP, reduce_dim 64, refined decoder)."""
    from transformers import CLIPSegConfig

    config = CLIPSegConfig(
        vision_config={"patch_size": 16},  # ViT-B/16 (the class default is B/32)
        reduce_dim=64,
        extract_layers=[3, 6, 9],
        decoder_num_attention_heads=4,
        decoder_intermediate_size=2048,
        use_complex_transposed_convolution=True,
    )
    return config.to_dict()


@dataclass(frozen=True)
class ACLConfig:
    beats: dict[str, Any] = field(default_factory=lambda: BEATsConfig().to_dict())
    clipseg: dict[str, Any] | None = None  # CLIPSegConfig.to_dict(); None = clipseg-rd64-refined architecture
    output_layers: tuple[int, ...] = (4, 8, 12)
    prompt_ids: tuple[int, ...] = DEFAULT_PROMPT_IDS
    audio_position: int = 4  # the audio token goes before prompt_ids[audio_position] (EOS)
    image_size: int = 352  # CLIPSeg input
    heatmap_size: int = 224  # evaluation / engine heatmap (bicubic from image_size, then sigmoid)
    mask_init_w: float = 10.0
    mask_init_b: float = 14.0
    gumbel_tau: float = 1.0
    feature_threshold: float = 0.5
    feature_tau: float = 0.07
    tokenizer_dropout: float = 0.5
    frozen_eval: bool = True


def _clipseg_config(d: dict[str, Any] | None) -> Any:
    from transformers import CLIPSegConfig

    config = CLIPSegConfig.from_dict(dict(d or default_clipseg_config()))
    # Eager attention: deterministic, traceable to ONNX, and the same math on every device.
    config._attn_implementation = "eager"
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    return config


class ACL(nn.Module):
    def __init__(self, config: ACLConfig) -> None:
        super().__init__()
        from transformers import CLIPSegForImageSegmentation

        self.config = config
        self.audio_backbone = BEATs(BEATsConfig.from_official(config.beats), config.output_layers)
        grounder_config = _clipseg_config(config.clipseg)
        self.av_grounder = CLIPSegForImageSegmentation(grounder_config)
        text_width = grounder_config.text_config.hidden_size
        self.audio_proj = AudioTokenizer(self.audio_backbone.out_dim, text_width, config.tokenizer_dropout)
        self.masker_i = ImageMasker(config.mask_init_w, config.mask_init_b, config.gumbel_tau)
        self.audio_backbone.requires_grad_(False)
        self.av_grounder.requires_grad_(False)

        ids = torch.tensor(config.prompt_ids, dtype=torch.long)
        if not 0 < config.audio_position < len(ids):
            raise UserError(
                f"config model.audio_position={config.audio_position}: expected 1..{len(ids) - 1} "
                f"(inside the {len(ids)}-token prompt {list(config.prompt_ids)})"
            )
        length = len(ids) + 1
        self.register_buffer("prompt_ids", ids, persistent=False)
        causal = torch.full((length, length), MASK_VALUE).triu(1)
        self.register_buffer("causal_mask", causal.reshape(1, 1, length, length), persistent=False)
        # Set by freeze_for_export(): constants that replace per-call computations in the graphs (buffers,
        # so .to(device) / .half() carry them; not persistent, so state dicts are unchanged).
        for name in ("prompt_prefix", "prompt_suffix", "prompt_positions", "vision_positions", "heatmap_resize"):
            self.register_buffer(name, None, persistent=False)
        self._static_image_size: int | None = None

    # ------------------------------------------------------------------------------------------ modes

    @property
    def embed_dim(self) -> int:
        return int(self.av_grounder.config.projection_dim)

    def train(self, mode: bool = True) -> ACL:
        super().train(mode)
        if self.config.frozen_eval:
            self.audio_backbone.eval()
            self.av_grounder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------ audio

    def audio_token(self, spec: Tensor) -> Tensor:
        """fbank ``[B, 1, T_frames, 128]`` -> audio token ``[B, text_width]``."""
        with torch.no_grad():  # frozen, and nothing before it trains
            features = self.audio_backbone(spec)
        return self.audio_proj(features)

    def _prompt_parts(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.prompt_prefix is not None:
            return self.prompt_prefix, self.prompt_suffix, self.prompt_positions
        embeddings = self.av_grounder.clip.text_model.embeddings
        words = embeddings.token_embedding(self.prompt_ids).unsqueeze(0)
        pos = self.config.audio_position
        positions = embeddings.position_embedding.weight[: words.shape[1] + 1].unsqueeze(0)
        return words[:, :pos], words[:, pos:], positions

    def splice(self, token: Tensor) -> Tensor:
        """Audio token ``[B, W]`` -> prompt embeddings + positions ``[B, L, W]`` (L = 6 by default)."""
        prefix, suffix, positions = self._prompt_parts()
        b = token.shape[0]
        tokens = torch.cat(
            [prefix.expand(b, -1, -1), token.unsqueeze(1).to(prefix.dtype), suffix.expand(b, -1, -1)], dim=1
        )
        return tokens + positions

    def audio_driven_embedding(self, token: Tensor) -> Tensor:
        """CLIP text encoder over the spliced prompt; hidden state at the last position, projected."""
        text = self.av_grounder.clip.text_model
        x = self.splice(token)
        mask = self.causal_mask.to(x.dtype)
        for layer in text.encoder.layers:
            x = layer(x, mask)
        x = text.final_layer_norm(x)
        return self.av_grounder.clip.text_projection(x[:, -1])

    def encode_audio(self, spec: Tensor) -> Tensor:
        """fbank ``[B, 1, T_frames, 128]`` -> audio-driven embedding ``[B, projection_dim]``."""
        return self.audio_driven_embedding(self.audio_token(spec))

    # ------------------------------------------------------------------------------------------ vision

    def _vision_positions(self, grid: int) -> Tensor:
        if self.vision_positions is not None:  # frozen copy: always used at its export image size
            return self.vision_positions
        weight = self.av_grounder.clip.vision_model.embeddings.position_embedding.weight
        trained = int(math.isqrt(weight.shape[0] - 1))
        if trained == grid:
            return weight.unsqueeze(0)
        # CLIPSeg runs at 352 px with positions trained at 224: bicubic resize of the patch positions (as HF)
        d = weight.shape[1]
        patch = weight[1:].reshape(1, trained, trained, d).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, d)
        return torch.cat([weight[:1].unsqueeze(0), patch], dim=1)

    def vision_states(self, image: Tensor, num_layers: int | None = None) -> tuple[list[Tensor], int]:
        """Outputs of the first ``num_layers`` CLIP vision layers (all by default) and the patch grid size."""
        vision = self.av_grounder.clip.vision_model
        embeddings = vision.embeddings
        patches = embeddings.patch_embedding(image.to(embeddings.patch_embedding.weight.dtype))
        b, d, grid = patches.shape[0], patches.shape[1], patches.shape[2]
        patches = patches.reshape(b, d, grid * grid).transpose(1, 2)
        cls = embeddings.class_embedding.reshape(1, 1, d).expand(b, 1, d)
        x = torch.cat([cls, patches], dim=1) + self._vision_positions(grid)
        x = vision.pre_layrnorm(x)
        states = []
        for layer in vision.encoder.layers[:num_layers]:
            x = layer(x, None)
            states.append(x)
        return states, grid

    def image_embedding(self, image: Tensor) -> Tensor:
        """CLIP image embedding (CLS -> post-LN -> visual projection) ``[B, projection_dim]``."""
        states, _ = self.vision_states(image)
        vision = self.av_grounder.clip.vision_model
        return self.av_grounder.clip.visual_projection(vision.post_layernorm(states[-1][:, 0]))

    def dense_features(self, image: Tensor, states: list[Tensor] | None = None) -> Tensor:
        """MaskCLIP-style dense features ``[B, projection_dim, g, g]``: the last layer's value path only."""
        if states is None:
            states, grid = self.vision_states(image)
        else:
            grid = int(math.isqrt(states[0].shape[1] - 1))
        vision = self.av_grounder.clip.vision_model
        last = vision.encoder.layers[-1]
        x = states[-2] if len(states) > 1 else None
        if x is None:
            raise ValueError("dense features need a CLIP vision encoder with at least 2 layers")
        x = x + last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(x)))
        x = x + last.mlp(last.layer_norm2(x))
        x = self.av_grounder.clip.visual_projection(vision.post_layernorm(x))[:, 1:]  # drop CLS
        b, c = x.shape[0], x.shape[2]
        return x.transpose(1, 2).reshape(b, c, grid, grid)

    def decode(self, activations: list[Tensor], grid: int, embedding: Tensor) -> Tensor:
        """CLIPSeg decoder conditioned on ``embedding`` ``[B, P]`` -> logits ``[B, 1, H, W]`` (H: image)."""
        decoder = self.av_grounder.decoder
        out = None
        for i, (activation, layer, reduce) in enumerate(
            zip(activations[::-1], decoder.layers, decoder.reduces, strict=True)
        ):
            out = reduce(activation) if out is None else reduce(activation) + out
            if i == decoder.conditional_layer:  # FiLM with the audio-driven embedding
                out = decoder.film_mul(embedding).unsqueeze(1) * out + decoder.film_add(embedding).unsqueeze(1)
            out = layer(out, None)
        b, r = out.shape[0], out.shape[2]
        out = out[:, 1:].transpose(1, 2).reshape(b, r, grid, grid)
        return decoder.transposed_convolution(out)

    def activations(self, image: Tensor) -> tuple[list[Tensor], int]:
        """The CLIP layers the decoder reads (``extract_layers``); stops after the deepest one."""
        layers = list(self.av_grounder.extract_layers)
        states, grid = self.vision_states(image, max(layers) + 1)
        return [states[i] for i in layers], grid

    def logits(self, image: Tensor, embedding: Tensor) -> Tensor:
        """Own pairs: image ``b`` with embedding ``b`` -> ``[B, 1, H, W]``."""
        activations, grid = self.activations(image)
        return self.decode(activations, grid, embedding)

    def heatmap_from_embedding(self, image: Tensor, embedding: Tensor, size: int | None = None) -> Tensor:
        """Heatmap ``[B, size, size]`` in (0, 1): logits resized bicubic, then ``sigmoid(x + b / w)``."""
        logits = self.logits(image, embedding)
        size = int(size or self.config.heatmap_size)
        current = self._static_image_size or int(logits.shape[-1])  # static when exported: no traced branch
        if current != size:
            resize = self.heatmap_resize
            if resize is not None and tuple(resize.shape) == (size, current):  # frozen copy: see bicubic_matrix
                logits = resize @ logits @ resize.transpose(0, 1)
            else:
                logits = F.interpolate(logits, size=(size, size), mode="bicubic", align_corners=False)
        heat = self.masker_i.heatmap(logits)
        return heat.reshape(heat.shape[0], size, size)

    def heatmap(self, image: Tensor, spec: Tensor) -> Tensor:
        """As ``SSLAlign.heatmap``: own (image, audio) pairs -> ``[B, heatmap_size, heatmap_size]``."""
        return self.heatmap_from_embedding(image, self.encode_audio(spec))

    def evaluation_outputs(self, image: Tensor, spec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Own pairs -> heatmaps ``[B, heatmap_size, heatmap_size]`` and L2-normalized retrieval features:
        the CLIP image embedding and the audio-driven embedding (both ``[B, projection_dim]``)."""
        embedding = self.encode_audio(spec)
        heat = self.heatmap_from_embedding(image, embedding)
        return heat, F.normalize(self.image_embedding(image), dim=1), F.normalize(embedding, dim=1)

    @torch.no_grad()
    def extended_confidence(self, image: Tensor, embedding: Tensor) -> Tensor:
        """The official Extended confidence (``Eval.py``: ``cos(v_f[b, b], a_b)``): image ``b``'s dense CLIP
        features pooled by its own soft feature mask, against its audio-driven embedding ``[B, P]`` -> ``[B]``.

        The diagonal of :meth:`training_outputs`' ``v_f`` (the all-pairs normaliser there is one scalar, which
        the cosine ignores), computed for own pairs only.
        """
        from avloc.core.acl.losses import feature_mask

        states, grid = self.vision_states(image)
        dense = self.dense_features(image, states)
        logits = self.decode([states[i] for i in self.av_grounder.extract_layers], grid, embedding)  # [B, 1, H, W]
        soft = feature_mask(logits.float(), self.config.feature_threshold, self.config.feature_tau)
        soft = F.interpolate(soft, size=dense.shape[-2:], mode="nearest")
        v_f = torch.einsum("bchw,bnhw->bnc", dense.float(), soft)[:, 0]
        return F.cosine_similarity(v_f, embedding.float(), dim=1)

    # ------------------------------------------------------------------------------------------ training

    def pair_logits(self, activations: list[Tensor], grid: int, embedding: Tensor) -> Tensor:
        """Every image with every embedding: ``[B_img, B_emb, H, W]`` from one vision pass."""
        bi, be = activations[0].shape[0], embedding.shape[0]
        tiled = [a.unsqueeze(1).expand(bi, be, *a.shape[1:]).reshape(bi * be, *a.shape[1:]) for a in activations]
        cond = embedding.unsqueeze(0).expand(bi, be, embedding.shape[1]).reshape(bi * be, embedding.shape[1])
        logits = self.decode(tiled, grid, cond)
        return logits.reshape(bi, be, logits.shape[-2], logits.shape[-1])

    def training_outputs(self, image: Tensor, embedding: Tensor) -> dict[str, Tensor]:
        """What the ACL losses read (reference ``encode_masked_vision``): v_f, v_i, p_area, n_area."""
        b = image.shape[0]
        with torch.no_grad():  # the frozen image path needs no graph; gradients reach the embedding via the decoder
            states, grid = self.vision_states(image)
            dense = self.dense_features(image, states)
        layers = list(self.av_grounder.extract_layers)
        mask_logits = self.pair_logits([states[i] for i in layers], grid, embedding)  # M^G [B, B, H, W]

        area = self.masker_i.hard_mask(mask_logits).mean(dim=(2, 3))
        p_area = area.diagonal().mean()
        n_area = area.mean() - p_area / b

        # float32: under fp16 autocast the B*B*g*g mask sum overflows 65504 from B = 12 at 352 px
        soft = feature_mask(mask_logits.float(), self.config.feature_threshold, self.config.feature_tau)
        soft = F.interpolate(soft, size=dense.shape[-2:], mode="nearest")
        with torch.autocast(image.device.type, enabled=False):  # tiny pooled values: keep them in float32
            v_f = torch.einsum("bchw,bnhw->bnc", dense.float(), soft) / (soft.sum() + 1e-6)

        index = torch.arange(b, device=image.device)
        image_mask = self.masker_i.hard_mask(mask_logits[index, index].unsqueeze(1))
        v_i = self.image_embedding(image * image_mask.to(image.dtype))
        return {"v_f": v_f, "v_i": v_i, "p_area": p_area, "n_area": n_area}

    # ------------------------------------------------------------------------------------------ export

    def freeze_for_export(
        self, frames: int, mel_bins: int = 128, image_size: int | None = None, inplace: bool = False
    ) -> ACL:
        """A copy (or this model, ``inplace``) whose graphs hold constants: folded weight norm, the relative
        bias for ``frames``, the prompt embeddings, and the vision positions for ``image_size``. Only valid
        for those input sizes."""
        frozen = (self if inplace else copy.deepcopy(self)).eval()
        frozen.audio_backbone.prepare_for_export(frames, mel_bins)
        with torch.no_grad():
            prefix, suffix, positions = (t.detach().clone() for t in frozen._prompt_parts())
            frozen.prompt_prefix, frozen.prompt_suffix, frozen.prompt_positions = prefix, suffix, positions
            size = int(image_size or self.config.image_size)
            patch = frozen.av_grounder.config.vision_config.patch_size
            frozen.vision_positions = frozen._vision_positions(size // patch).detach().clone()
            frozen._static_image_size = size // patch * patch
            heat = int(self.config.heatmap_size)
            if heat != frozen._static_image_size:
                frozen.heatmap_resize = bicubic_matrix(frozen._static_image_size, heat)
        return frozen


def bicubic_matrix(src: int, dst: int) -> Tensor:
    """``[dst, src]`` matrix ``R`` with ``R @ x @ R.T == F.interpolate(x, (dst, dst), "bicubic")`` for square
    ``x`` of side ``src`` (align_corners=False): torch's own weights, read off by resizing the identity along
    one axis (the other axis keeps scale 1, where the cubic kernel is exactly 0 / 1).

    Why not the exported ``Resize(cubic)``: ONNX Runtime and torch both derive the source coordinate
    ``(i + 0.5) * src / dst - 0.5`` in float32, but by different arithmetic; for ratios such as 352 -> 224 the
    kernel weights then differ by ~4e-5, the output by ~2e-4 of the logits' standard deviation (the
    full-size random ACL: 0.02 in the heatmap). Two matmuls with constant weights compute the same thing in
    every runtime, to float rounding."""
    eye = torch.eye(src).reshape(1, 1, src, src)
    return F.interpolate(eye, size=(dst, src), mode="bicubic", align_corners=False)[0, 0].contiguous()


def build_model(model_config: dict[str, Any]) -> ACL:
    return ACL(from_dict(ACLConfig, model_config, "model"))

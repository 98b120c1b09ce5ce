"""SSL-Align (Senocak et al., "Sound Source Localization is All about Cross-Modal Alignment", ICCV 2023).

Model only: encoders, the localization similarity s_L, the alignment similarity s_A and the heatmap.
The contrastive loss lives in :mod:`avloc.core.losses`, training in :mod:`avloc.train`.

``backbone: resnet18`` (the paper): both encoders are ResNet18s trained from scratch (torchvision's BasicBlock
and module names, so torchvision weights would load); ``width`` scales the channels (64 = the paper, 512-d
embeddings).

``backbone: pretrained`` (the open-set recipe, configs/cpu_pretrained.yaml): frozen ImageNet EfficientNet-Lite0
for vision (1280-channel head features, output stride 16 with ``visual_layer4_stride: 1``) and frozen AudioSet
YAMNet for audio (1024-d per 0.96 s patch, max over the window's patches; the ``yamnet`` front-end), each
with a learned head into the shared 8 * width space (:mod:`avloc.core.pretrained`). The frozen weights are
part of the state dict, so checkpoints and exported engines hold the whole model. ``refine`` (the recipe) turns
the stride-32 map into a 16x16 one by joint-bilateral upsampling guided by Lite0's stride-16 features
(:func:`guided_upsample`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from avloc.core.errors import UserError


@dataclass(frozen=True)
class SSLAlignConfig:
    width: int = 64  # ResNet18 base width; embeddings have 8 * width channels
    sl_threshold: float = 0.65  # epsilon of the soft positive mask W = sigmoid((S - eps) / t)
    sl_temperature: float = 0.03
    visual_layer4_stride: int = 1  # 1 = the paper: 14x14 map at 224 px
    # The official release (models_lvs/base_models.py) also keeps stride 1 in the audio layer4; avloc's own
    # training uses 2 (a quarter of the layer4 compute). The global max pool makes both valid, not equal.
    audio_layer4_stride: int = 2
    # Separate Linear s_A heads (avloc training). The official release defines none: an import without
    # fitting head weights sets False and s_A is the cosine of the max-pooled embeddings themselves.
    projection: bool = True
    backbone: str = "resnet18"  # or "pretrained" (see the module doc)
    head_hidden: int = 0  # pretrained: hidden width of the 2-layer heads (0 = one linear layer)
    # pretrained only: add the zero-shot label-space map (avloc.core.labelspace: YAMNet's AudioSet scores x
    # the WordNet bridge x Lite0's per-location ImageNet classifier) to the learned cosine map, as
    # cos + labelspace_weight * map / max(map): the label-space map scale-free per image, the cosine as is.
    labelspace: bool = False
    labelspace_weight: float = 1.0
    # pretrained only: add audio-blind objectness (OGL's, avloc.core.ogl.reduce_features of the same Lite0 head
    # features, min-max normalised per image) as + objectness_weight * obj: sounding objects are objects.
    objectness: bool = False
    objectness_weight: float = 1.0
    # pretrained, output stride 32 only: refine the final 8x8 map (every term) to 16x16 by joint-bilateral
    # upsampling guided by Lite0's stride-16 features (guided_upsample below; no learned part, no trunk cost).
    # refine_temperature: the guide's range kernel exp((cos - 1) / T) (inf: no guide, a plain Gaussian
    # interpolation); refine_sigma: the spatial kernel's width in 8x8 cells.
    refine: bool = False
    refine_temperature: float = 0.5  # chosen on mean(val, val_unseen) over 3 seeds (docs/results.md "Sharper maps")
    refine_sigma: float = 1.0

    def __post_init__(self) -> None:
        if self.backbone not in ("resnet18", "pretrained"):
            raise UserError(f"model backbone={self.backbone!r}: expected resnet18 or pretrained")
        if self.labelspace and self.backbone != "pretrained":
            raise UserError("model labelspace=true: needs backbone pretrained (the ImageNet / AudioSet classifiers)")
        # not (w >= 0) also refuses NaN, and inf is refused too: either would train a whole epoch of heads before
        # the first validation heatmap fails (every map NaN)
        if not 0 <= self.labelspace_weight < math.inf:
            raise UserError(f"model labelspace_weight={self.labelspace_weight}: expected a finite weight >= 0")
        if self.objectness and self.backbone != "pretrained":
            raise UserError("model objectness=true: needs backbone pretrained (the frozen ImageNet features)")
        if not 0 <= self.objectness_weight < math.inf:
            raise UserError(f"model objectness_weight={self.objectness_weight}: expected a finite weight >= 0")
        if self.refine and (self.backbone != "pretrained" or self.visual_layer4_stride != 2):
            raise UserError(
                "model refine=true: needs backbone pretrained at visual_layer4_stride 2 (its stride-16 guide)"
            )
        if not self.refine_temperature > 0:  # inf is allowed: no range kernel
            raise UserError(f"model refine_temperature={self.refine_temperature}: expected a value > 0")
        if not 0 < self.refine_sigma < math.inf:
            raise UserError(f"model refine_sigma={self.refine_sigma}: expected a finite value > 0")
        for name in ("visual_layer4_stride", "audio_layer4_stride"):
            if getattr(self, name) not in (1, 2):
                raise UserError(f"model {name}={getattr(self, name)}: expected 1 or 2")

    @property
    def embed_dim(self) -> int:
        return 8 * self.width


class ResNet18Trunk(nn.Module):
    """ResNet18 without the classifier: returns the layer4 feature map."""

    def __init__(self, in_channels: int, width: int, layer4_stride: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._planes = width
        self.layer1 = self._make_layer(width, stride=1)
        self.layer2 = self._make_layer(2 * width, stride=2)
        self.layer3 = self._make_layer(4 * width, stride=2)
        self.layer4 = self._make_layer(8 * width, stride=layer4_stride)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._planes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self._planes, planes, stride, downsample), BasicBlock(planes, planes)]
        self._planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


REFINE_FACTOR = 2  # guided_upsample: 8x8 -> 16x16 (the guide's stride 16 over the map's 32)
REFINE_CHANNELS = 9 * REFINE_FACTOR**2  # its weights, packed: 3x3 neighbours x 2x2 sub-positions per coarse cell
_SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def _neighbours(x: Tensor) -> Tensor:
    """[B,C,h,w] -> [B,9,C,h,w]: each cell's 3x3 neighbourhood (zeros outside the map)."""
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1))
    return torch.stack([p[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in _SHIFTS], dim=1)


def refine_weights(guide: Tensor, temperature: float, sigma: float) -> Tensor:
    """Joint-bilateral upsampling weights (Kopf et al. 2007) of a coarse map, from a guide at twice its resolution:
    [B,C,2h,2w] -> [B,36,h,w]. Each fine cell p takes a weighted mean of the 3x3 coarse cells q around its
    parent, w(p, q) ~ exp(-|p - q|^2 / (2 sigma^2)) * exp((cos(g_p, mean of g over q) - 1) / temperature):
    a fine cell follows the coarse cells whose content looks like its own, so a map's edge can move onto the
    object's edge instead of the middle of a 32-pixel cell (a sharp guide, small T, also cuts at texture edges
    inside objects: the recipe's T = 0.5, sigma = 1 were chosen on val, docs/results.md "Sharper maps").
    Audio-blind, so the visual encoder computes it once per image; packed per coarse cell (neighbour k,
    sub-position 2 * sy + sx) so it travels as channels of the visual map. Normalised over the in-map neighbours."""
    f = REFINE_FACTOR
    # an image size that is not a multiple of 32 gives an odd stride-16 guide (208 px: 13x13) over a
    # ceil(13/2) = 7x7 map: the last fine row / column repeats the guide's edge (the reshape failed before)
    if guide.shape[2] % f or guide.shape[3] % f:
        guide = F.pad(guide, (0, -guide.shape[3] % f, 0, -guide.shape[2] % f), mode="replicate")
    b, c, hh, ww = guide.shape
    h, w = hh // f, ww // f
    fine = F.normalize(guide, dim=1).reshape(b, c, h, f, w, f).permute(0, 1, 3, 5, 2, 4).reshape(b, c, f * f, h, w)
    coarse = _neighbours(F.normalize(F.avg_pool2d(guide, f), dim=1))  # [B,9,C,h,w]
    logits = torch.einsum("bkchw,bcshw->bkshw", coarse, fine)  # cos(g_p, g_q): [B,9,4,h,w]
    logits = (logits - 1) / temperature if math.isfinite(temperature) else torch.zeros_like(logits)
    # a fine cell's centre, in coarse cells from its parent's: (s + 0.5) / f - 0.5
    offsets = [(s + 0.5) / f - 0.5 for s in range(f)]
    spatial = torch.tensor(
        [
            [-((dy - oy) ** 2 + (dx - ox) ** 2) / (2 * sigma**2) for oy in offsets for ox in offsets]
            for dy, dx in _SHIFTS
        ],
        device=guide.device,
    )  # [9, 4]
    outside = _neighbours(torch.ones(1, 1, h, w, device=guide.device)).reshape(1, 9, 1, h, w) == 0
    logits = (logits + spatial[None, :, :, None, None]).masked_fill(outside, -1e4)
    return torch.softmax(logits, dim=1).reshape(b, REFINE_CHANNELS, h, w)


def guided_upsample(coarse: Tensor, weights: Tensor) -> Tensor:
    """[B,h,w] map and its :func:`refine_weights` [B,36,h,w] -> [B,2h,2w]."""
    b, h, w = coarse.shape
    f = REFINE_FACTOR
    nb = _neighbours(coarse.unsqueeze(1))  # [B,9,1,h,w]
    fine = (weights.reshape(b, 9, f * f, h, w) * nb).sum(dim=1)  # [B,4,h,w]
    return fine.reshape(b, f, f, h, w).permute(0, 3, 1, 4, 2).reshape(b, f * h, f * w)


def _head(cin: int, dim: int, hidden: int, conv: bool) -> nn.Module:
    layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
    if not hidden:
        return layer(cin, dim)
    return nn.Sequential(layer(cin, hidden), nn.ReLU(inplace=True), layer(hidden, dim))


class PretrainedVisual(nn.Module):
    """Frozen EfficientNet-Lite0 -> learned 1x1 head: [B,3,H,W] -> [B,D,H/16,W/16] (or /32)."""

    def __init__(self, dim: int, layer4_stride: int, hidden: int) -> None:
        super().__init__()
        from avloc.core.pretrained import LITE0_DIM, FrozenLite0, freeze

        self.trunk = freeze(FrozenLite0(16 if layer4_stride == 1 else 32).load_packaged())
        self.head = _head(LITE0_DIM, dim, hidden, conv=True)

    def train(self, mode: bool = True) -> PretrainedVisual:
        super().train(mode)
        self.trunk.eval()  # frozen: batch norm keeps its ImageNet statistics
        return self

    def features(self, image: Tensor) -> Tensor:
        """[B,3,H,W] -> [B,1280,h,w] frozen head features (what the training cache holds)."""
        with torch.no_grad():
            return self.trunk(image)

    def features_and_guide(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`features` and, from the same pass, the trunk's stride-16 guide [B,112,H/16,W/16]."""
        with torch.no_grad():
            return self.trunk.with_guide(image)

    def forward(self, image: Tensor) -> Tensor:
        return self.head(self.features(image))


class PretrainedAudio(nn.Module):
    """Frozen YAMNet over the window's 0.96 s patches -> max over patches -> learned head: [B,1,64,T] -> [B,D]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        from avloc.core.pretrained import YAMNET_DIM, YAMNetTrunk, freeze

        self.trunk = freeze(YAMNetTrunk().load_packaged())
        self.head = _head(YAMNET_DIM, dim, hidden, conv=False)

    def train(self, mode: bool = True) -> PretrainedAudio:
        super().train(mode)
        self.trunk.eval()
        return self

    def features(self, spec: Tensor) -> Tensor:
        """[B,1,64,T] -> [B,1024 + 521]: YAMNet's embedding (max over the patches) and its AudioSet class
        scores (mean over them), from one trunk pass (what the training cache holds)."""
        from avloc.core.pretrained import pool_patches, yamnet_patches

        with torch.no_grad():
            patches, _ = yamnet_patches(spec)
            emb, scores = pool_patches(self.trunk.embed_and_score(patches), spec.shape[0])
        return torch.cat([emb, scores], dim=1)

    def forward(self, spec: Tensor) -> Tensor:
        from avloc.core.pretrained import YAMNET_DIM

        return self.head(self.features(spec)[:, :YAMNET_DIM])


class SSLAlign(nn.Module):
    def __init__(self, config: SSLAlignConfig | None = None) -> None:
        super().__init__()
        self.config = config or SSLAlignConfig()
        dim = self.config.embed_dim
        if self.config.backbone == "pretrained":
            self.visual = PretrainedVisual(dim, self.config.visual_layer4_stride, self.config.head_hidden)
            self.audio = PretrainedAudio(dim, self.config.head_hidden)
        else:
            self.visual = ResNet18Trunk(3, self.config.width, self.config.visual_layer4_stride)
            self.audio = ResNet18Trunk(1, self.config.width, layer4_stride=self.config.audio_layer4_stride)
        self.labelspace: nn.Module | None = None
        if self.config.labelspace:
            from avloc.core.labelspace import LabelSpaceMap

            self.labelspace = LabelSpaceMap()  # the bridge is a buffer: in checkpoints and exported engines
            self.register_buffer("labelspace_weight", torch.tensor(float(self.config.labelspace_weight)))
        if self.config.objectness:
            self.register_buffer("objectness_weight", torch.tensor(float(self.config.objectness_weight)))
        # Separate projection heads for s_A so alignment does not smooth out the localization space.
        self.visual_proj: nn.Module = nn.Linear(dim, dim) if self.config.projection else nn.Identity()
        self.audio_proj: nn.Module = nn.Linear(dim, dim) if self.config.projection else nn.Identity()

    # --- encoders -------------------------------------------------------------------------------
    # With ``labelspace``, the visual map carries Lite0's per-location ImageNet evidence after its D learned
    # channels ([B,D+1000,h,w]) and the audio embedding the AudioSet scores folded into ImageNet class weights
    # ([B,D+1000]): each side of the label-space term travels with its own encoder (so an exported engine's
    # audio and visual graphs split as before) and :meth:`cosine_map` joins them. With ``objectness`` one more
    # channel follows on each side: the visual map's min-max normalised objectness, and a constant 1 in the audio
    # embedding (so both graphs keep one embedding width, the engine's embed_dim). Everything that learns
    # (losses, s_A, retrieval) uses the first D channels only.
    @property
    def fixed_terms(self) -> bool:
        """Whether encode_image / encode_audio carry fixed (not learned) channels after the first D."""
        return self.labelspace is not None or self.config.objectness or self.config.refine

    @property
    def refine_channels(self) -> int:
        """Channels :meth:`encode_image` carries beyond :meth:`encode_audio`'s width (the refinement's weights)."""
        return REFINE_CHANNELS if self.config.refine else 0

    def encode_image(self, image: Tensor) -> Tensor:
        """[B,3,H,W] normalized image -> [B,D,h,w] visual feature map (not normalized; [B,D+1000,h,w] with
        ``labelspace``, one more channel with ``objectness``)."""
        if not self.fixed_terms:
            return self.visual(image)
        if self.config.refine:
            return self.image_from_features(*self.visual.features_and_guide(image))
        return self.image_from_features(self.visual.features(image))

    def encode_audio(self, spec: Tensor) -> Tensor:
        """[B,1,F,T] spectrogram -> [B,D] audio embedding (adaptive max pool, not normalized; [B,D+1000] with
        ``labelspace``)."""
        if isinstance(self.audio, PretrainedAudio):
            if not self.fixed_terms:
                return self.audio(spec)
            return self.audio_from_features(self.audio.features(spec))
        return torch.amax(self.audio(spec), dim=(2, 3))

    def image_from_features(self, feats: Tensor, guide: Tensor | None = None) -> Tensor:
        """``backbone: pretrained``: cached Lite0 head features [B,1280,h,w] -> :meth:`encode_image`'s output.
        With ``refine`` and the trunk's stride-16 ``guide`` [B,112,2h,2w], the refinement's weights follow as
        the last channels; without a guide (cached features) the map stays at the features' h x w."""
        vmap = self.visual.head(feats)
        parts = [vmap]
        with torch.no_grad():
            if self.labelspace is not None:
                from avloc.core.labelspace import imagenet_logits_of_features

                parts.append(self.labelspace.image_part(imagenet_logits_of_features(self.visual.trunk.net._fc, feats)))
            if self.config.objectness:
                from avloc.core.ogl import reduce_features

                # [B,h,w], OGL's mean |x| over channels; float32 (fp16 autocast): 1e-6 below is a float16 subnormal
                obj = reduce_features(feats).float()
                lo = obj.flatten(1).amin(dim=1)[:, None, None]
                hi = obj.flatten(1).amax(dim=1)[:, None, None]
                parts.append(((obj - lo) / (hi - lo).clamp_min(1e-6)).unsqueeze(1))  # OGL's min-max, per image
            if self.config.refine and guide is not None:
                c = self.config
                parts.append(refine_weights(guide.float(), c.refine_temperature, c.refine_sigma).to(vmap.dtype))
        return torch.cat(parts, dim=1) if len(parts) > 1 else vmap

    def audio_from_features(self, rows: Tensor) -> Tensor:
        """``backbone: pretrained``: cached YAMNet rows [B,1024+521] (embedding, class scores) ->
        :meth:`encode_audio`'s output."""
        from avloc.core.pretrained import YAMNET_DIM

        a = self.audio.head(rows[:, :YAMNET_DIM])
        parts = [a]
        if self.labelspace is not None:
            parts.append(self.labelspace.audio_part(rows[:, YAMNET_DIM:]))
        if self.config.objectness:
            parts.append(torch.ones_like(a[:, :1]))  # the objectness channel's audio side: a constant 1
        return torch.cat(parts, dim=1) if len(parts) > 1 else a

    # --- similarities ---------------------------------------------------------------------------
    def cosine_maps(self, vmap: Tensor, audio: Tensor) -> Tensor:
        """All pairs: S[n,k,h,w] = cos(v_n(h,w), a_k) (learned channels only)."""
        d = self.config.embed_dim
        return torch.einsum("nchw,kc->nkhw", F.normalize(vmap[:, :d], dim=1), F.normalize(audio[:, :d], dim=1))

    def cosine_map(self, vmap: Tensor, audio: Tensor) -> Tensor:
        """Own pairs: S[n,h,w] = cos(v_n(h,w), a_n), plus the weighted label-space map and objectness when the
        inputs carry them (:meth:`encode_image` / :meth:`encode_audio` of a ``labelspace`` / ``objectness``
        model; the heads' own outputs while training carry the D learned channels only)."""
        d = self.config.embed_dim
        s = torch.einsum("nchw,nc->nhw", F.normalize(vmap[:, :d], dim=1), F.normalize(audio[:, :d], dim=1))
        if not self.fixed_terms or vmap.shape[1] == d:
            return s
        # the fixed terms are detached, so no graph keeps their inputs (an engine export traces this with
        # embeddings made under inference_mode, which autograd may not save)
        i = d
        # float32 under fp16 autocast too: the label-space products (~1e-7) are float16 subnormals, and 1e-6 is
        # one (a GPU that flushes subnormals to 0 makes 0 / 0 = NaN of an all-zero map)
        with torch.autocast(vmap.device.type, enabled=False):
            if self.labelspace is not None:
                k = self.labelspace.bridge.shape[1]
                ls = self.labelspace.combine(vmap[:, i : i + k].detach().float(), audio[:, i : i + k].detach().float())
                ls = (
                    ls / ls.flatten(1).amax(dim=1).clamp_min(1e-6)[:, None, None]
                )  # the likeliest place of the heard = 1
                s = s + self.labelspace_weight * ls
                i += k
            if self.config.objectness:
                s = s + self.objectness_weight * audio[:, i, None, None].detach().float() * vmap[:, i].detach().float()
                i += 1
            if self.config.refine and vmap.shape[1] == i + REFINE_CHANNELS:  # the refinement's weights: 8x8 -> 16x16
                s = guided_upsample(s, vmap[:, i:].detach().float())
        return s

    def localization_similarity(self, vmap: Tensor, audio: Tensor) -> Tensor:
        """s_L[n,k] = sum(W*S) / sum(W), W = sigmoid((S - eps) / t): a soft-thresholded masked mean."""
        s = self.cosine_maps(vmap, audio).flatten(2)
        # sum(W*S)/sum(W) == sum(softmax(log W) * S): exact, and stable when every W underflows
        # (a clamp on sum(W) would instead pull s_L of dissimilar pairs to 0).
        log_w = F.logsigmoid((s - self.config.sl_threshold) / self.config.sl_temperature)
        return (torch.softmax(log_w, dim=-1) * s).sum(-1)

    def map_embedding(self, vmap: Tensor) -> Tensor:
        """Image embedding in the localization space (retrieval against the normalized audio embedding, and
        self-mode neighbours): spatial mean of the L2-normalized map, L2-normalized. [B,C,H,W] -> [B,C]."""
        return F.normalize(F.normalize(vmap[:, : self.config.embed_dim], dim=1).mean(dim=(2, 3)), dim=1)

    def project_image(self, vmap: Tensor) -> Tensor:
        return F.normalize(self.visual_proj(torch.amax(vmap[:, : self.config.embed_dim], dim=(2, 3))), dim=1)

    def project_audio(self, audio: Tensor) -> Tensor:
        return F.normalize(self.audio_proj(audio[:, : self.config.embed_dim]), dim=1)

    def alignment_similarity(self, vmap: Tensor, audio: Tensor) -> Tensor:
        """s_A[n,k] = cos(proj(maxpool(v_n)), proj(a_k))."""
        return self.project_image(vmap) @ self.project_audio(audio).t()

    # --- inference ------------------------------------------------------------------------------
    @property
    def heatmap_range(self) -> tuple[float, float]:
        """Bounds of :meth:`cosine_map` (an engine's manifest; the live worker scales its heatmaps by them)."""
        hi = 1.0
        if self.labelspace is not None:
            hi += float(self.labelspace_weight)  # the label-space term is scaled into [0, 1]
        if self.config.objectness:
            hi += float(self.objectness_weight)  # so is objectness (its audio side is 1)
        return (-1.0, hi)

    @property
    def heatmap_meaning(self) -> str:
        text = "cosine similarity of each visual feature cell with the audio embedding (s_L map)"
        if self.labelspace is not None:
            text += (
                f" + {float(self.labelspace_weight):g} x the label-space map / its max over the map (YAMNet "
                "AudioSet scores x WordNet bridge x per-cell ImageNet probabilities, avloc.core.labelspace)"
            )
        if self.config.objectness:
            text += (
                f" + {float(self.objectness_weight):g} x audio-blind objectness (mean |x| over Lite0's head "
                "channels, min-max normalised per image, avloc.core.ogl)"
            )
        if self.config.refine:
            c = self.config
            text += (
                f"; computed at stride 32, then upsampled x{REFINE_FACTOR} by joint-bilateral weights from "
                f"Lite0's stride-16 features (temperature {c.refine_temperature:g}, sigma {c.refine_sigma:g} "
                "cells, avloc.core.ssl_align.guided_upsample)"
            )
        return text

    def heatmap(self, image: Tensor, spec: Tensor) -> Tensor:
        """Cosine map of each image with its own audio, upsampled (bilinear) to the image size: [B,H,W]."""
        s = self.cosine_map(self.encode_image(image), self.encode_audio(spec))
        return F.interpolate(s.unsqueeze(1), size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def forward(self, image: Tensor, spec: Tensor) -> Tensor:
        return self.heatmap(image, spec)


def with_refine(
    model: SSLAlign, refine: bool, temperature: float | None = None, sigma: float | None = None
) -> SSLAlign:
    """The same model with the 16x16 refinement switched on or off (kernel widths as given, else as configured):
    how a checkpoint trained without the switch exports a sharp engine. The refinement has no state, so every
    weight loads strictly."""
    import dataclasses

    c = model.config
    changes: dict[str, object] = {"refine": refine}
    if temperature is not None:
        changes["refine_temperature"] = temperature
    if sigma is not None:
        changes["refine_sigma"] = sigma
    new = SSLAlign(dataclasses.replace(c, **changes))
    new.load_state_dict(model.state_dict())
    return new.train(model.training)

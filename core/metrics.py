"""The one evaluation protocol of avloc (formulas and sources in docs/evaluation.md).

Everything here takes plain numpy arrays; file reading lives in :mod:`avloc.core.eval_maps` and
:mod:`avloc.core.datasets`. Training-time validation, ``avloc eval`` and ``avloc eval-maps`` all call
:func:`evaluate_maps` (or the array functions below), so every number avloc reports comes from here.

Conventions (matching the reference code cited in docs/evaluation.md):
- maps are scored on a 224x224 grid; heatmaps of another size are resized bilinearly with
  ``cv2.resize(..., INTER_LINEAR)`` as the LVS / SSL-Align test scripts do;
- binarization ``median`` / ``adaptive`` / ``abs:T`` (see :func:`binarize`);
- a sample's cIoU = sum(B*G) / (sum(G) + sum(B*[G==0]));
- ``ciou_ap50`` = fraction of samples with cIoU >= 0.5, ``auc`` = trapezoidal area under the success
  rate over t = 0.05*i, i = 0..20.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from avloc.core.errors import UserError

MAP_SIZE = 224
SUCCESS_CIOU = 0.5
# 0.05 * i exactly as the reference scripts build it (not linspace), so cIoU values that sit on a
# threshold fall on the same side as in the papers' numbers.
AUC_THRESHOLDS = np.array([0.05 * i for i in range(21)])
# ACL (Park et al., WACV 2024) evaluates at each of these absolute thresholds and reports the best.
ABS_SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
FMEASURE_BETA2 = 0.3
FMEASURE_STEPS = 255
_CHUNK = 128  # maps scored at once in evaluate_maps (bounds memory for thousands of maps)


# --------------------------------------------------------------------------------------------
# Ground-truth maps
# --------------------------------------------------------------------------------------------
def gt_map_vggss(boxes_normalized: np.ndarray | Sequence[Sequence[float]], size: int = MAP_SIZE) -> np.ndarray:
    """Union of VGG-SS boxes ``[N, 4]`` (x1, y1, x2, y2 in 0..1), each rasterized as
    ``int(clip(v, 0, 1) * size)`` and filled ``[y1:y2, x1:x2]``."""
    gt = np.zeros((size, size), dtype=np.float32)
    boxes = np.asarray(boxes_normalized, dtype=np.float64).reshape(-1, 4)
    pixels = (np.clip(boxes, 0.0, 1.0) * size).astype(np.int64)
    for x1, y1, x2, y2 in pixels:
        gt[y1:y2, x1:x2] = 1.0
    return gt


def gt_map_flickr(
    annotator_boxes: Sequence[np.ndarray] | np.ndarray, size: int = MAP_SIZE, ref_size: int = 256
) -> np.ndarray:
    """Flickr-SoundNet consensus map: every annotator's boxes (``ref_size``-px coordinates, any number per
    annotator) rasterized as ``int(size * int(v) / ref_size)``, summed, divided by 2 and clipped to 1.

    With 3 annotators a pixel marked by two or more gets 1, by one gets 0.5 (LVS ``testset_gt``).
    """
    if isinstance(annotator_boxes, np.ndarray):
        parts = [annotator_boxes.reshape(-1, 4)]
    else:
        parts = [np.asarray(b, dtype=np.float64).reshape(-1, 4) for b in annotator_boxes]
    boxes = np.concatenate(parts, axis=0) if parts else np.zeros((0, 4))
    # int(224 * int(v) / 256): truncate the XML value, scale, truncate again.
    pixels = (size * np.trunc(boxes).astype(np.int64) / ref_size).astype(np.int64)
    pixels = np.clip(pixels, 0, size)
    gt = np.zeros((size, size), dtype=np.float32)
    for x1, y1, x2, y2 in pixels:
        gt[y1:y2, x1:x2] += 1.0
    return np.minimum(gt / 2.0, 1.0)


# --------------------------------------------------------------------------------------------
# Heatmaps and binarization
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BinarizeMode:
    """Parsed ``--binarize`` value: ``median``, ``adaptive`` or ``abs:T``."""

    kind: Literal["median", "adaptive", "abs"]
    threshold: float | None = None

    def __str__(self) -> str:
        return f"abs:{self.threshold:g}" if self.kind == "abs" else self.kind


def parse_binarize(mode: str | BinarizeMode) -> BinarizeMode:
    """``"median" | "adaptive" | "abs:T"`` -> :class:`BinarizeMode`; UserError naming the value otherwise."""
    if isinstance(mode, BinarizeMode):
        return mode
    text = str(mode).strip().lower()
    if text in ("median", "adaptive"):
        return BinarizeMode(text)  # type: ignore[arg-type]
    if text.startswith("abs:"):
        try:
            t = float(text[4:])
        except ValueError:
            t = float("nan")
        if np.isfinite(t):
            return BinarizeMode("abs", t)
    raise UserError(f"binarize mode {mode!r}: expected 'median', 'adaptive' or 'abs:T' with a number T (e.g. abs:0.5)")


def check_heatmap(heatmap: np.ndarray) -> None:
    """ValueError (one line) unless ``heatmap`` is a finite 2-D array with at least one pixel."""
    if not isinstance(heatmap, np.ndarray) or heatmap.ndim != 2:
        shape = getattr(heatmap, "shape", None)
        raise ValueError(f"expected a 2-D H x W heatmap, got shape {shape}")
    if heatmap.size == 0:
        raise ValueError(f"heatmap is empty (shape {heatmap.shape})")
    if not np.issubdtype(heatmap.dtype, np.number) or np.issubdtype(heatmap.dtype, np.complexfloating):
        raise ValueError(f"heatmap dtype {heatmap.dtype} is not real-valued")
    if not np.isfinite(heatmap).all():
        raise ValueError("heatmap contains NaN or infinite values")


def resize_map(heatmap: np.ndarray, size: int = MAP_SIZE) -> np.ndarray:
    """float32 ``size x size`` copy of a 2-D map; bilinear ``cv2.resize`` (INTER_LINEAR, half-pixel
    centres = torch ``interpolate(bilinear, align_corners=False)`` without antialias), as LVS/SSL-Align."""
    check_heatmap(heatmap)
    out = np.asarray(heatmap, dtype=np.float32)
    if out.shape != (size, size):
        out = cv2.resize(out, dsize=(size, size), interpolation=cv2.INTER_LINEAR)
    return np.array(out, dtype=np.float32, copy=True)


def _adaptive_area(gt: np.ndarray, n: int) -> int:
    # SSL-Align test.py: predicted area = number of GT pixels; an empty GT falls back to half the map.
    area = int(np.count_nonzero(gt))
    return area if area > 0 else n // 2


def binarize(heatmap: np.ndarray, mode: str | BinarizeMode = "median", gt: np.ndarray | None = None) -> np.ndarray:
    """Boolean map B of one heatmap at its own resolution (resize first with :func:`resize_map`).

    - ``median``: B = h > sort(h)[int(n / 2)] (strict; LVS / SSL-Align);
    - ``adaptive``: B = h >= sort(h)[n - |G|], |G| = nonzero GT pixels (n // 2 if G is empty);
    - ``abs:T``: B = h >= T (ACL; h are probabilities).
    """
    return binarize_batch(heatmap[None], mode, None if gt is None else np.asarray(gt)[None])[0]


def binarize_batch(maps: np.ndarray, mode: str | BinarizeMode = "median", gts: np.ndarray | None = None) -> np.ndarray:
    """:func:`binarize` over a stack ``[N, H, W]`` (vectorized with ``np.partition``)."""
    parsed = parse_binarize(mode)
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"expected maps [N, H, W], got shape {maps.shape}")
    if parsed.kind == "abs":
        return maps >= parsed.threshold
    count, n = maps.shape[0], maps.shape[1] * maps.shape[2]
    flat = maps.reshape(count, n)
    if parsed.kind == "median":
        k = int(n / 2)
        kth = np.partition(flat, k, axis=1)[:, k]
        return maps > kth[:, None, None]
    if gts is None or np.shape(gts) != maps.shape:
        raise ValueError(f"adaptive binarization needs GT maps of shape {maps.shape}, got {np.shape(gts)}")
    out = np.empty(maps.shape, dtype=bool)
    for i in range(count):
        k = n - _adaptive_area(gts[i], n)
        out[i] = maps[i] >= np.partition(flat[i], k)[k]
    return out


# --------------------------------------------------------------------------------------------
# cIoU and its summaries
# --------------------------------------------------------------------------------------------
def ciou_from_binary(pred: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """cIoU of boolean maps ``[N, H, W]`` against GT maps (values in [0, 1]); 0 where both are empty."""
    pred = np.asarray(pred, dtype=bool)
    count = pred.shape[0] if pred.ndim == 3 else 1
    flat_pred = pred.reshape(count, -1)
    flat_gt = np.asarray(gts, dtype=np.float32).reshape(count, -1)
    # float32 sums of 0/0.5/1 values below 2**24 are exact; einsum avoids [N, H*W] temporaries.
    pred_f = flat_pred.astype(np.float32)
    inter = np.einsum("ij,ij->i", pred_f, flat_gt).astype(np.float64)
    pred_on_gt = np.einsum("ij,ij->i", pred_f, (flat_gt != 0).astype(np.float32))
    denom = flat_gt.sum(axis=1, dtype=np.float64) + np.count_nonzero(flat_pred, axis=1) - pred_on_gt
    out = np.divide(inter, denom, out=np.zeros_like(inter), where=denom > 0)
    return out if pred.ndim == 3 else out.reshape(())


def ciou_batch(maps: np.ndarray, gts: np.ndarray, mode: str | BinarizeMode = "median") -> np.ndarray:
    """Per-sample cIoU of heatmaps ``[N, H, W]`` (already on the GT grid) against GT maps ``[N, H, W]``."""
    return ciou_from_binary(binarize_batch(maps, mode, gts), gts)


def ciou(heatmap: np.ndarray, gt: np.ndarray, mode: str | BinarizeMode = "median") -> float:
    """cIoU of one heatmap (any size; resized to the GT's square grid) against one GT map."""
    gt = np.asarray(gt, dtype=np.float32)
    return float(ciou_batch(resize_map(heatmap, gt.shape[0])[None], gt[None], mode)[0])


def success_curve(cious: Iterable[float]) -> np.ndarray:
    """Fraction of samples with cIoU >= t for t in :data:`AUC_THRESHOLDS`."""
    values = np.asarray(list(cious), dtype=np.float64)
    return (values[None, :] >= AUC_THRESHOLDS[:, None]).mean(axis=1)


def summarize_ciou(cious: Iterable[float]) -> dict[str, float]:
    """``ciou_ap50`` (fraction >= 0.5, the papers' "cIoU"), ``ciou_mean`` and ``auc`` (trapezoidal area
    under :func:`success_curve`, = sklearn.metrics.auc in the reference scripts)."""
    values = np.asarray(list(cious), dtype=np.float64)
    if values.size == 0:
        raise ValueError("no cIoU values to summarize")
    curve = success_curve(values)
    return {
        "ciou_ap50": float(np.mean(values >= SUCCESS_CIOU)),
        "ciou_mean": float(values.mean()),
        "auc": float(np.trapezoid(curve, AUC_THRESHOLDS)),
    }


def bootstrap_interval(
    values: Sequence[Any] | np.ndarray,
    statistic: Callable[[np.ndarray], float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over items (test scenes): resample the items with
    replacement ``n_boot`` times, recompute, take the central ``level`` mass. ``values`` is indexed by item
    along its first axis (per-sample cIoUs, per-scene swap hits, ...)."""
    items = np.asarray(values)
    if len(items) == 0:
        raise ValueError("no items to bootstrap")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(items), size=(n_boot, len(items)))
    stats = np.array([statistic(items[d]) for d in draws])
    tail = (1.0 - level) / 2.0
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1.0 - tail))


def ciou_ap50_of(values: np.ndarray) -> float:
    return summarize_ciou(values)["ciou_ap50"]


def auc_of(values: np.ndarray) -> float:
    return summarize_ciou(values)["auc"]


# --------------------------------------------------------------------------------------------
# Audio-swap (pointing game per heard object)
# --------------------------------------------------------------------------------------------
def peak_point(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) of the heatmap's maximum, the pixel centre normalized to 0..1."""
    h, w = heatmap.shape
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return (x + 0.5) / w, (y + 0.5) / h


def point_in_box(point: tuple[float, float], box: Sequence[float] | np.ndarray) -> bool:
    return bool(box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3])


def peak_inside(heatmap: np.ndarray, box: Sequence[float] | np.ndarray) -> bool:
    """Whether the heatmap's maximum lies in ``box`` (x1, y1, x2, y2 in 0..1)."""
    return point_in_box(peak_point(heatmap), box)


def swap_hits(maps: Sequence[np.ndarray] | np.ndarray, boxes: Sequence[Sequence[float] | np.ndarray]) -> list[bool]:
    """The audio-swap rule: ``maps[k]`` (the scene heard with object k's recording) scores when its peak lies
    in object k's box and in NO other object's box. Scene boxes may overlap (IoU up to 0.3); a peak in an
    overlap says nothing about which sound was heard, so it never scores. Consequence: one map shared by
    every sound (audio-blind) scores on at most one object per scene."""
    points = [peak_point(np.asarray(m)) for m in maps]
    return [
        point_in_box(p, boxes[k]) and not any(point_in_box(p, b) for j, b in enumerate(boxes) if j != k)
        for k, p in enumerate(points)
    ]


def audio_blind_swap_hits(
    maps: Sequence[np.ndarray] | np.ndarray, boxes: Sequence[Sequence[float] | np.ndarray]
) -> list[bool]:
    """The same rule for the scene's audio-blind map: the mean of its K maps used for every heard object
    (what the model shows whatever it hears). Its score is the floor the audio must lift the model above."""
    blind = np.mean(np.stack([np.asarray(m, dtype=np.float64) for m in maps]), axis=0)
    return swap_hits([blind] * len(boxes), boxes)


# --------------------------------------------------------------------------------------------
# Cross-modal retrieval
# --------------------------------------------------------------------------------------------
def retrieval_recall(
    audio_emb: np.ndarray, image_emb: np.ndarray, labels: Sequence[Any], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k both ways over the whole set by cosine similarity (the query's own pair is a candidate);
    a query hits when any of its top-k items has the query's class. Keys ``a2i_r{k}``, ``i2a_r{k}``."""
    audio = np.asarray(audio_emb, dtype=np.float64)
    image = np.asarray(image_emb, dtype=np.float64)
    if audio.ndim != 2 or audio.shape != image.shape:
        raise ValueError(f"expected audio and image embeddings [N, D] of one shape, got {audio.shape}, {image.shape}")
    label_ids = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)[1]
    if label_ids.shape[0] != audio.shape[0]:
        raise ValueError(f"{len(label_ids)} labels for {audio.shape[0]} embeddings")
    audio = audio / np.maximum(np.linalg.norm(audio, axis=1, keepdims=True), 1e-12)
    image = image / np.maximum(np.linalg.norm(image, axis=1, keepdims=True), 1e-12)
    sim = audio @ image.T
    out: dict[str, float] = {}
    for name, scores in (("a2i", sim), ("i2a", sim.T)):
        # stable sort on -score: ties keep index order, so results do not depend on the platform
        order = np.argsort(-scores, axis=1, kind="stable")
        hits = label_ids[order] == label_ids[:, None]
        first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)
        for k in ks:
            out[f"{name}_r{k}"] = float(np.mean(first_hit < k))
    return out


# --------------------------------------------------------------------------------------------
# Extended protocol (silent samples): SLAVC, Mo & Morgado NeurIPS 2022, stoneMo/SLAVC utils.py
# --------------------------------------------------------------------------------------------
def confidence_top25(maps: np.ndarray) -> np.ndarray:
    """SLAVC confidence: mean of the top 25 % of each map's values (``np.sort(x)[-n//4:].mean()``,
    i.e. the top ceil(n/4) values). ``maps`` is ``[H, W]`` or ``[N, H, W]``."""
    maps = np.asarray(maps)
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    single = maps.ndim == 2
    flat = maps.reshape(1 if single else maps.shape[0], -1)
    n = flat.shape[1]
    top = -((-n) // 4)
    conf = np.partition(flat, n - top, axis=1)[:, n - top :].mean(axis=1, dtype=np.float64)
    return conf[0] if single else conf


def _precision_recall(
    thresholds: np.ndarray, cious: np.ndarray, confidences: np.ndarray, sounding: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    # SLAVC EvaluatorFull.calc_precision_recall, vectorized over thresholds.
    detected = confidences[None, :] >= thresholds[:, None]
    correct = sounding & (cious >= SUCCESS_CIOU)
    tp = (detected & correct[None]).sum(axis=1)
    fp = (detected & ~correct[None]).sum(axis=1)  # silent detected, or sounding detected in the wrong place
    fn = (~detected & sounding[None]).sum(axis=1)
    precision = np.where(tp + fp == 0, 1.0, tp / np.maximum(tp + fp, 1))
    recall = np.where(tp + fn == 0, 1.0, tp / np.maximum(tp + fn, 1))
    return precision, recall


def f1_scores(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """Harmonic mean of precision and recall per threshold; 0 where both are 0."""
    p, r = np.asarray(precision, dtype=np.float64), np.asarray(recall, dtype=np.float64)
    return np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1.0), 0.0)


def detection_precision_recall(
    thresholds: Sequence[float] | np.ndarray,
    confidences: Sequence[float] | np.ndarray,
    visible: Sequence[bool] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall per threshold of detecting ``visible`` samples by ``confidence >= t``: the
    Extended protocol's curve with every visible sample counted as well localized (a gate decides whether
    the source is in view, not where)."""
    conf = np.asarray(confidences, dtype=np.float64)
    vis = np.asarray(visible, dtype=bool)
    if conf.ndim != 1 or conf.shape != vis.shape:
        raise ValueError(f"confidences and visible must be 1-D of one length: {conf.shape}, {vis.shape}")
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    return _precision_recall(thresholds, vis.astype(np.float64), conf, vis)


def max_f1_threshold(
    confidences: Sequence[float] | np.ndarray, visible: Sequence[bool] | np.ndarray
) -> dict[str, float]:
    """The max-F1 point of :func:`detection_precision_recall` over every distinct confidence as threshold:
    ``threshold``, ``precision``, ``recall``, ``f1``. Of equally good thresholds the lowest is returned
    (the fewest samples rejected)."""
    conf = np.asarray(confidences, dtype=np.float64)
    vis = np.asarray(visible, dtype=bool)
    if conf.size == 0 or not vis.any():
        raise ValueError("max_f1_threshold needs at least one visible sample")
    if not np.isfinite(conf).all():
        raise ValueError("confidences contain NaN or infinite values")
    thresholds = np.unique(conf)  # ascending: argmax picks the lowest of tied thresholds
    precision, recall = detection_precision_recall(thresholds, conf, vis)
    f1 = f1_scores(precision, recall)
    best = int(np.argmax(f1))
    return {
        "threshold": float(thresholds[best]),
        "precision": float(precision[best]),
        "recall": float(recall[best]),
        "f1": float(f1[best]),
    }


def extended_metrics(
    cious: Sequence[float] | np.ndarray,
    confidences: Sequence[float] | np.ndarray,
    sounding: Sequence[bool] | np.ndarray,
) -> dict[str, float]:
    """SLAVC's Extended metrics over sounding + silent samples (``sounding[i]`` False = silent):

    - ``ext_ap``: SLAVC ``calc_ap`` (thresholds = sorted confidences without the largest, every
      ``max(1, N // 200)``-th from the top; AP = sum_i max(P[i:]) * (R[i+1] - R[i]));
    - ``ext_max_f1``: max F1 over thresholds ``sorted(conf)[::max(1, N // 10)]`` (``finalize_stats``);
    - ``ext_loc_acc``: fraction of sounding samples with cIoU >= 0.5 (``Precision-visible@50``).
    """
    ciou_arr = np.asarray(cious, dtype=np.float64)
    conf = np.asarray(confidences, dtype=np.float64)
    sound = np.asarray(sounding, dtype=bool)
    if not (ciou_arr.shape == conf.shape == sound.shape) or ciou_arr.ndim != 1:
        raise ValueError(
            f"cious, confidences, sounding must be 1-D of one length: {ciou_arr.shape}, {conf.shape}, {sound.shape}"
        )
    n = conf.size
    if n == 0:
        raise ValueError("no samples for the extended metrics")
    ordered = np.sort(conf)
    ap_thresholds = ordered[:-1][:: -max(1, n // 200)]
    precision, recall = _precision_recall(ap_thresholds, ciou_arr, conf, sound)
    precision_max = np.maximum.accumulate(precision[::-1])[::-1]
    ap = float(np.sum(precision_max[:-1] * np.diff(recall))) if precision.size > 1 else 0.0
    f1_thresholds = ordered[:: max(1, n // 10)]
    f1 = f1_scores(*_precision_recall(f1_thresholds, ciou_arr, conf, sound))
    loc_acc = float(np.mean(ciou_arr[sound] >= SUCCESS_CIOU)) if sound.any() else float("nan")
    return {"ext_ap": ap, "ext_max_f1": float(f1.max()), "ext_loc_acc": loc_acc}


# --------------------------------------------------------------------------------------------
# AVSBench-S4 style mask metrics (as ACL-SSL AVSBench/eval_utils.py computes them)
# --------------------------------------------------------------------------------------------
def mask_iou(pred: np.ndarray, masks: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Per-sample IoU of boolean predictions ``[N, H, W]`` and binary GT masks; an empty GT scores the
    true-negative fraction (AVSBench ``mask_iou``: inter = |~B & ~G|, union = H*W)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(masks) > 0
    axes = (-2, -1)
    inter = (pred & gt).sum(axis=axes).astype(np.float64)
    union = (pred | gt).sum(axis=axes).astype(np.float64)
    empty = ~gt.any(axis=axes)
    inter = np.where(empty, (~pred & ~gt).sum(axis=axes), inter)
    union = np.where(empty, gt.shape[-1] * gt.shape[-2], union)
    return inter / (union + eps)


def fmeasure_thresholds(steps: int = FMEASURE_STEPS) -> np.ndarray:
    """AVSBench's ``torch.linspace(0, 1 - 1e-10, 255)`` in float32 (whose last value rounds to 1.0)."""
    import torch

    return torch.linspace(0, 1 - 1e-10, steps).numpy()


def fmeasure_curves(scores: np.ndarray, masks: np.ndarray, steps: int = FMEASURE_STEPS) -> np.ndarray:
    """F-beta (beta^2 = 0.3) per sample per threshold ``[N', steps]`` for the N' samples whose GT mask is
    not empty (AVSBench ``_eval_pr``: B = score >= th, P = TP/(|B|+1e-20), R = TP/(|G|+1e-20), NaN -> 0).
    Counts come from sorted scores + searchsorted, so 255 thresholds cost one sort per map."""
    thresholds = fmeasure_thresholds(steps)
    scores = np.asarray(scores, dtype=np.float32)
    gt = np.asarray(masks) > 0
    curves = []
    for s, g in zip(scores.reshape(len(scores), -1), gt.reshape(len(gt), -1)):
        if not g.any():
            continue  # "examples with totally black GTs are out of consideration"
        n_pred = s.size - np.searchsorted(np.sort(s), thresholds, side="left")
        tp = g.sum() - np.searchsorted(np.sort(s[g]), thresholds, side="left")
        precision = tp / (n_pred + 1e-20)
        recall = tp / (g.sum() + 1e-20)
        denom = FMEASURE_BETA2 * precision + recall
        f = np.divide((1 + FMEASURE_BETA2) * precision * recall, denom, out=np.zeros(steps), where=denom > 0)
        curves.append(f)
    return np.asarray(curves, dtype=np.float64).reshape(-1, steps)


def fscore_from_curves(curves: np.ndarray) -> float:
    """Max over thresholds of the mean curve over all samples (ACL's fix of AVSBench's per-batch max)."""
    return float(np.max(np.mean(curves, axis=0))) if len(curves) else float("nan")


def avsbench_metrics(maps: np.ndarray, masks: np.ndarray, mode: str | BinarizeMode = "abs:0.5") -> dict[str, float]:
    """``miou`` (mean of :func:`mask_iou` after :func:`binarize_batch`) and ``fscore`` (max-mean F-beta).

    The F-score curve runs over the heatmap values when ``mode`` is ``abs:T`` (probabilities, as AVSBench
    and ACL) and over the binarized map for ``median``/``adaptive`` (SSL-Align ``Evaluator_miou``)."""
    parsed = parse_binarize(mode)
    masks = (np.asarray(masks) > 0).astype(np.float32)
    pred = binarize_batch(maps, parsed, masks)
    scores = maps if parsed.kind == "abs" else pred.astype(np.float32)
    return {
        "miou": float(np.mean(mask_iou(pred, masks))),
        "fscore": fscore_from_curves(fmeasure_curves(scores, masks)),
    }


def abs_sweep_scores(
    maps: np.ndarray, gts: np.ndarray, thresholds: Sequence[float] = ABS_SWEEP_THRESHOLDS, masks: bool = False
) -> np.ndarray:
    """Per-threshold per-sample scores ``[T, N]`` of ``B_t = maps >= t``: cIoU against ``gts``, or with
    ``masks=True`` the AVSBench :func:`mask_iou` (``gts`` binary).

    Equal to calling :func:`ciou_from_binary` / :func:`mask_iou` once per t, but one pass: each pixel's
    level = number of thresholds <= its value (``searchsorted``), per-sample histograms of the levels
    (``bincount``) and suffix sums give every threshold's counts at once."""
    maps = np.asarray(maps)
    count = maps.shape[0]
    flat = maps.reshape(count, -1)
    # thresholds in the maps' dtype: the same comparison as `maps >= t` (NumPy 2 casts the python float)
    thr = np.asarray(thresholds, dtype=flat.dtype if np.issubdtype(flat.dtype, np.floating) else np.float64)
    steps = thr.size
    level = np.searchsorted(thr, flat, side="right")  # pixel is in B_k  <=>  level > k
    keys = (level + (np.arange(count) * (steps + 1))[:, None]).ravel()
    g = np.asarray(gts, dtype=np.float64).reshape(count, -1)
    if masks:
        g = (g > 0).astype(np.float64)

    def suffix(weights: np.ndarray | None) -> np.ndarray:
        hist = np.bincount(keys, weights=weights, minlength=count * (steps + 1)).reshape(count, steps + 1)
        return np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # [N, T]: pixels with level > k

    inter = suffix(g.ravel())
    pred_count = suffix(None)
    g_sum = g.sum(axis=1, keepdims=True)
    if masks:
        n = flat.shape[1]
        union = pred_count + g_sum - inter
        empty = g_sum == 0  # AVSBench: an empty mask scores the true negatives over all pixels
        inter = np.where(empty, n - pred_count, inter)
        union = np.where(empty, n, union)
        return (inter / (union + 1e-7)).T
    pred_off_gt = suffix((g == 0).ravel().astype(np.float64))
    denom = g_sum + pred_off_gt
    return np.divide(inter, denom, out=np.zeros_like(inter), where=denom > 0).T


def sweep_abs_thresholds(
    maps: np.ndarray,
    gts: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    thresholds: Sequence[float] = ABS_SWEEP_THRESHOLDS,
    select: str | None = None,
) -> dict[str, Any]:
    """Score probability maps ``[N, H, W]`` at each ``abs:t`` (ACL's 0.05..0.95) and pick the best.

    Rows hold ``ciou_ap50/ciou_mean/auc`` (with ``gts``) and ``miou`` (with ``masks``); the best row
    maximizes ``select`` (default ``auc`` as ACL's ``best_AUC``, or ``miou`` with masks only)."""
    if gts is None and masks is None:
        raise ValueError("sweep_abs_thresholds needs gts and/or masks")
    ciou_rows = None if gts is None else abs_sweep_scores(maps, gts, thresholds)
    miou_rows = None if masks is None else abs_sweep_scores(maps, masks, thresholds, masks=True)
    return _sweep_table(thresholds, ciou_rows, miou_rows, select)


def _sweep_table(
    thresholds: Sequence[float], cious: np.ndarray | None, mask_ious: np.ndarray | None, select: str | None
) -> dict[str, Any]:
    rows = []
    for j, t in enumerate(thresholds):
        row: dict[str, float] = {"t": float(t)}
        if cious is not None:
            row.update(summarize_ciou(cious[j]))
        if mask_ious is not None:
            row["miou"] = float(np.mean(mask_ious[j]))
        rows.append(row)
    return _sweep_result(rows, select or ("auc" if cious is not None else "miou"))


def _sweep_result(rows: list[dict[str, float]], select: str) -> dict[str, Any]:
    if select not in rows[0]:
        raise ValueError(f"cannot select the best threshold by {select!r}; rows have {sorted(rows[0])}")
    best = max(rows, key=lambda row: row[select])  # first of equal maxima: the smallest t
    return {"rows": rows, "select": select, "best": dict(best)}


# --------------------------------------------------------------------------------------------
# Whole-set evaluation
# --------------------------------------------------------------------------------------------
def gt_map_of(annotation: Any, size: int = MAP_SIZE) -> np.ndarray:
    """GT map from an ``Annotation`` (``.boxes`` normalized, VGG-SS) or a ready map (Flickr consensus,
    segmentation mask) of shape ``size x size``."""
    boxes = getattr(annotation, "boxes", None)
    if boxes is not None:
        return gt_map_vggss(boxes, size)
    gt = np.asarray(annotation, dtype=np.float32)
    if gt.shape != (size, size):
        raise ValueError(f"GT map must be {size}x{size}, got shape {gt.shape}")
    return gt


def evaluate_maps(
    heatmaps: Mapping[str, np.ndarray],
    annotations: Mapping[str, Any],
    silent: Iterable[str] | None = None,
    binarize: str | BinarizeMode = "median",
    masks: Mapping[str, np.ndarray] | None = None,
    sweep: bool = False,
    per_sample: bool = False,
    confidences: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Score heatmaps (any size, resized to 224x224) with the protocol.

    ``confidences``: id -> the Extended protocol's confidence from the model (ACL's official ``cos(v_f, a)``)
    for every id; by default the heatmap statistic :func:`confidence_top25` (SLAVC).

    ``annotations``: id -> ``Annotation`` (VGG-SS boxes) or a 224x224 GT map (e.g. :func:`gt_map_flickr`).
    ``silent``: ids of silent samples (their heatmaps are in ``heatmaps``; GT is empty) -> Extended metrics.
    ``masks``: id -> binary mask (AVSBench); ids with a mask but no annotation use the mask as G.
    Returns ``n``, ``binarize``, ``ciou_ap50``, ``ciou_mean``, ``auc``, ``gt_area_mean``,
    ``median_capped`` (fraction of samples whose GT is too small to reach cIoU 0.5 under ``median``),
    plus ``ext_*`` with silent samples, ``miou``/``fscore`` with masks, ``sweep`` and ``per_sample``
    when asked. Heatmaps must cover exactly these ids (UserError listing the difference).
    """
    mode = parse_binarize(binarize)
    mask_ids = sorted(masks) if masks is not None else []
    sounding_ids = sorted(set(annotations) | set(mask_ids))
    silent_ids = sorted(set(silent or ()))
    overlap = set(silent_ids) & set(sounding_ids)
    if overlap:
        raise UserError(f"ids both sounding and silent: {_id_list(sorted(overlap))}")
    check_ids(heatmaps.keys(), sounding_ids + silent_ids)
    if confidences is not None:
        missing = [i for i in sounding_ids + silent_ids if i not in confidences]
        if missing:
            raise UserError(f"no confidence for {_id_list(missing)}")
    if not sounding_ids:
        raise UserError("no annotated (sounding) samples to evaluate")

    ids = sounding_ids + silent_ids
    n_total = len(ids)
    cious = np.zeros(n_total)
    confidences_arr = np.zeros(n_total)
    gt_area = np.zeros(n_total)
    mask_ious: list[float] = []
    mask_curves: list[np.ndarray] = []
    sweep_cious = np.zeros((len(ABS_SWEEP_THRESHOLDS), n_total))
    sweep_mask_ious: list[np.ndarray] = []
    for start in range(0, n_total, _CHUNK):
        chunk = ids[start : start + _CHUNK]
        maps = np.stack([_load_map(heatmaps, i) for i in chunk])
        gts = np.stack([_gt_for(i, annotations, masks) for i in chunk])
        sl = slice(start, start + len(chunk))
        pred = binarize_batch(maps, mode, gts)
        cious[sl] = ciou_from_binary(pred, gts)
        confidences_arr[sl] = (
            confidence_top25(maps) if confidences is None else np.array([float(confidences[i]) for i in chunk])
        )
        gt_area[sl] = np.count_nonzero(gts, axis=(1, 2)) / float(MAP_SIZE * MAP_SIZE)
        if sweep:
            sweep_cious[:, sl] = abs_sweep_scores(maps, gts)
        chunk_masks = [k for k, i in enumerate(chunk) if masks is not None and i in masks]
        if chunk_masks:
            m = np.stack([_mask_for(chunk[k], masks) for k in chunk_masks])
            mp = maps[chunk_masks]
            mpred = binarize_batch(mp, mode, m)
            mask_ious.extend(mask_iou(mpred, m))
            mask_curves.append(fmeasure_curves(mp if mode.kind == "abs" else mpred.astype(np.float32), m))
            if sweep:
                sweep_mask_ious.append(abs_sweep_scores(mp, m, masks=True))

    n_sound = len(sounding_ids)
    area = gt_area[:n_sound]
    result: dict[str, Any] = {"n": n_sound, "n_silent": len(silent_ids), "binarize": str(mode)}
    result.update(summarize_ciou(cious[:n_sound]))
    result["gt_area_mean"] = float(area.mean())
    # Under `median` about half the map is predicted, so cIoU <= |G| / (n/2 - 1): below 0.5 when |G| < n/4.
    result["median_capped"] = float(np.mean(area * MAP_SIZE * MAP_SIZE < (MAP_SIZE * MAP_SIZE / 2 - 1) / 2))
    if silent_ids:
        sounding = np.arange(n_total) < n_sound
        result.update(extended_metrics(cious, confidences_arr, sounding))
    if mask_ious:
        result["n_masks"] = len(mask_ious)
        result["miou"] = float(np.mean(mask_ious))
        result["fscore"] = fscore_from_curves(np.concatenate(mask_curves, axis=0))
    if sweep:
        mask_sweep = np.concatenate(sweep_mask_ious, axis=1) if sweep_mask_ious else None
        result["sweep"] = _sweep_table(ABS_SWEEP_THRESHOLDS, sweep_cious[:, :n_sound], mask_sweep, "auc")
    if per_sample:
        result["per_sample"] = {
            i: {"ciou": float(cious[k]), "confidence": float(confidences_arr[k]), "sounding": k < n_sound}
            for k, i in enumerate(ids)
        }
    return result


def silent_sample_id(video: str, audio: str, annotated_ids: Iterable[str] | set[str]) -> str:
    """Heatmap id of an Extended silent row (image ``video`` heard with audio ``audio``): ``video`` when
    that image has no annotation (avloc datasets), else ``"<video>__<audio>"`` (VGG-SS / Flickr Extended,
    whose silent rows reuse annotated test images with another clip's audio)."""
    annotated = annotated_ids if isinstance(annotated_ids, set) else set(annotated_ids)
    return f"{video}__{audio}" if video in annotated else video


def _load_map(heatmaps: Mapping[str, np.ndarray], sample_id: str) -> np.ndarray:
    heatmap = heatmaps[sample_id]
    try:
        return resize_map(np.asarray(heatmap))
    except ValueError as err:
        raise UserError(f"heatmap {sample_id!r}: {err}") from None


def _gt_for(sample_id: str, annotations: Mapping[str, Any], masks: Mapping[str, np.ndarray] | None) -> np.ndarray:
    if sample_id in annotations:
        try:
            return gt_map_of(annotations[sample_id])
        except ValueError as err:
            raise UserError(f"annotation {sample_id!r}: {err}") from None
    if masks is not None and sample_id in masks:
        return _mask_for(sample_id, masks).astype(np.float32)
    return np.zeros((MAP_SIZE, MAP_SIZE), dtype=np.float32)  # silent: nothing sounding in view


def _mask_for(sample_id: str, masks: Mapping[str, np.ndarray]) -> np.ndarray:
    mask = np.asarray(masks[sample_id])
    if mask.ndim != 2:
        raise UserError(f"mask {sample_id!r}: expected a 2-D mask, got shape {mask.shape}")
    if mask.shape != (MAP_SIZE, MAP_SIZE):
        # nearest keeps it binary; AVSBench masks are already 224x224
        mask = cv2.resize((mask > 0).astype(np.uint8), (MAP_SIZE, MAP_SIZE), interpolation=cv2.INTER_NEAREST)
    return mask > 0


def _id_list(ids: Sequence[str], show: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:show])
    more = f", ... ({len(ids)} in all)" if len(ids) > show else f" ({len(ids)})"
    return shown + more


def check_ids(have: Iterable[str], expected: Iterable[str]) -> None:
    """UserError naming the missing and extra ids (first few + count) unless the two sets are equal."""
    have_set, expected_set = set(have), set(expected)
    missing = sorted(expected_set - have_set)
    extra = sorted(have_set - expected_set)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing heatmaps for {_id_list(missing)}")
        if extra:
            parts.append(f"heatmaps without an annotation {_id_list(extra)}")
        raise UserError("heatmap ids do not match the annotations: " + "; ".join(parts))

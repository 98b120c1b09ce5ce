"""The live peak rule against the earlier one, on the same heatmaps: a pointing game (peak inside a sounding
object's box) on a dataset split's scenes, or on a clip's frames (its ``video/clip_0000.json`` boxes).

Rules: ``peak_of`` (the live worker's: the hottest cell moved to the weighted centroid of its 3x3 neighbourhood)
and ``bilinear`` (the rule before 2026-12-07: the argmax of an 8x bilinear upsampling, which lies on a cell centre
or, at the border, on the outermost pixel). Each map is the engine's, as ``avloc.Localizer`` computes it (the
live pipeline's steps).

    .venv/bin/python scripts/peak_effect.py --engine ENGINE --data DATA --splits val,val_unseen [--clip]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

import avloc
from avloc.core.errors import UserError
from avloc.stream.serve.inference_worker import peak_of


def bilinear_peak(heatmap: np.ndarray, upsample: int = 8) -> tuple[float, float]:
    """The earlier live rule, kept here as the baseline."""
    h, w = heatmap.shape
    big = cv2.resize(heatmap.astype(np.float32), (w * upsample, h * upsample), interpolation=cv2.INTER_LINEAR)
    y, x = divmod(int(np.argmax(big)), big.shape[1])
    return (x + 0.5) / big.shape[1], (y + 0.5) / big.shape[0]


RULES = {"peak_of": peak_of, "bilinear": bilinear_peak}


def inside(point: tuple[float, float], box: list[float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def score(hits: dict[str, list[bool]]) -> dict[str, object]:
    """Hit rates with a paired bootstrap 95 % interval of peak_of minus bilinear."""
    a, b = (np.asarray(hits[k], float) for k in ("peak_of", "bilinear"))
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(a), (2000, len(a)))
    diff = (a[idx] - b[idx]).mean(axis=1)
    return {
        "n": len(a),
        "peak_of": round(float(a.mean()), 4),
        "bilinear": round(float(b.mean()), 4),
        "diff_ci95": [round(float(np.percentile(diff, 2.5)), 4), round(float(np.percentile(diff, 97.5)), 4)],
    }


def scenes(loc: avloc.Localizer, data: Path, split: str) -> dict[str, object]:
    path = data / f"{split}.json"
    if not path.is_file():
        raise UserError(f"{path}: split not found (expected a dataset made by `avloc data stamps`)")
    hits: dict[str, list[bool]] = {k: [] for k in RULES}
    for scene in json.loads(path.read_text()):
        result = loc(data / "frames" / f"{scene['file']}.jpg", data / "audio" / f"{scene['file']}.wav")
        heatmap = result.feature_map.astype(np.float32)
        for name, rule in RULES.items():
            hits[name].append(any(inside(rule(heatmap), box) for box in scene["bbox"]))
    return score(hits)


def clip(loc: avloc.Localizer, data: Path, after_s: float = 1.0) -> dict[str, object]:
    boxes = json.loads((data / "video" / "clip_0000.json").read_text())["boxes"]
    hits: dict[str, list[bool]] = {k: [] for k in RULES}
    for i, (t, _, result) in enumerate(loc.video(data / "video" / "clip_0000.mp4")):
        if t < after_s:  # the window is still mostly before the clip's start
            continue
        heatmap = result.feature_map.astype(np.float32)
        for name, rule in RULES.items():
            hits[name].append(inside(rule(heatmap), boxes[min(i, len(boxes) - 1)]))
    return score(hits)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", required=True, help="engine folder (avloc export) or checkpoint")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (avloc data stamps)")
    parser.add_argument("--splits", default="", help="comma-separated scene splits, e.g. val,val_unseen")
    parser.add_argument("--clip", action="store_true", help="also score DATA/video/clip_0000.mp4 frame by frame")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    try:
        loc = avloc.Localizer(args.engine)
        results: dict[str, object] = {"engine": str(args.engine), "data": str(args.data)}
        for split in [s for s in args.splits.split(",") if s]:
            results[split] = scenes(loc, args.data, split)
            print(split, results[split], flush=True)
        if args.clip:
            results["clip"] = clip(loc, args.data)
            print("clip", results["clip"], flush=True)
    except UserError as err:
        print(f"peak_effect: {err}", file=sys.stderr)
        return 2
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Score a ``backbone: pretrained`` checkpoint on splits of one or more datasets, with the floors beside it.

    .venv/bin/python scripts/open_set_eval.py --checkpoint runs/pretrained/best.pt --data data/os \\
        --splits test,test_unseen --out open_set.json [--data2 /work/data/gcompris_farm --splits2 test]

Choosing the fixed terms' weights (selection splits only):
``--splits val,val_unseen --labelspace-weights 0.125,0.25,0.5 [--objectness-weights 0,0.125,0.25]`` scores the
model row at each weight (pair); a checkpoint trained without the objectness term gets it switched on.

Several comma-separated checkpoints (seeds of one recipe): each is scored, then the model row's mean and
spread (half the range) over them.

For each split: adaptive cIoU@50 and AUC with bootstrap 95 % intervals over scenes, the audio-swap rule
(peak in the heard object's box and no other, :func:`avloc.core.metrics.swap_hits`) with its interval, and
the same numbers for three maps that cannot use the audio: a centre prior (Gaussian bump), audio-blind
objectness (the L2 norm over channels of the same frozen EfficientNet-Lite0 head features the model sees) and
the model's own audio-blind map (mean of its swap maps); and, for a model with fixed terms (label-space,
objectness), those terms alone with the learned heads switched off (the zero-shot floor). Breakdowns by
``<split>_<group>.txt`` (heard / unheard, new_instance / unseen_category) when the dataset has them.

The heads run on trunk features computed with onnxruntime from the checkpoint's own frozen trunks
(avloc.train.frozen, cached under DATA/.cache); ``avloc eval`` on the same checkpoint computes the same maps
with torch end to end (slower on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def centre_prior(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-(((xx + 0.5) / size - 0.5) ** 2 + ((yy + 0.5) / size - 0.5) ** 2) / (2 * 0.2**2))


def fixed_terms_only(model: Any) -> Any | None:
    """A copy of the model whose learned heads output 0, so its heatmap is the fixed terms alone (label-space /
    objectness at the checkpoint's weights: cos(0, a) = 0, F.normalize maps 0 to 0): the zero-shot floor the
    learned part must beat. None for a model without fixed terms."""
    import copy

    if not model.fixed_terms:
        return None
    zero = copy.deepcopy(model).eval()
    with torch.no_grad():
        for head in (zero.visual.head, zero.audio.head):
            for p in head.parameters():
                p.zero_()
    return zero


def paired_gain(maps: dict[str, np.ndarray], base: dict[str, np.ndarray], annotations: Any) -> dict[str, Any]:
    """Adaptive cIoU@50 of ``maps`` minus that of ``base`` on the same scenes, with a paired bootstrap 95 %
    interval (scenes resampled together): far tighter than comparing two unpaired intervals."""
    from avloc.core.metrics import bootstrap_interval, evaluate_maps

    ids = sorted(maps)
    hits = []
    for m in (maps, base):
        per = evaluate_maps(
            {k: m[k] for k in ids}, {k: annotations[k] for k in ids}, binarize="adaptive", per_sample=True
        )
        hits.append(np.array([per["per_sample"][k]["ciou"] >= 0.5 for k in ids], dtype=np.float64))
    diff = hits[0] - hits[1]
    lo, hi = bootstrap_interval(diff, np.mean)
    return {"ciou_ap50": float(diff.mean()), "ciou_ap50_ci": [float(lo), float(hi)], "n": len(ids)}


def evaluate(
    checkpoint: Path,
    data: Path,
    splits: list[str],
    threads: int,
    extract_only: bool = False,
    weights: tuple[float, ...] = (),
    objectness_weights: tuple[float, ...] = (),
) -> dict[str, Any]:
    from avloc.core.checkpoint import load_model
    from avloc.core.datasets import load_vggss_json
    from avloc.train.evaluate import scene_scores as score
    from avloc.train.evaluate import scene_scores_line
    from avloc.train.frozen import TrunkRunner, cached_split, extract_split, split_maps

    loaded = load_model(checkpoint)
    model = loaded.model.eval()
    if loaded.model_config.get("backbone") != "pretrained":
        raise SystemExit(f"{checkpoint}: not a backbone: pretrained checkpoint")
    if objectness_weights:  # the grid over the objectness term's weight: switch the term on if it is not
        from avloc.train.frozen import with_objectness

        model = with_objectness(model)
    size = loaded.image.size
    key = json.dumps(
        [
            loaded.frontend.to_dict(),
            size,
            list(loaded.image.mean),
            list(loaded.image.std),  # a different std is different trunk input: never the same cache
            loaded.model_config.get("visual_layer4_stride"),
            "embedding+scores",  # audio rows [1024 + 521] (train/frozen.py)
        ],
        sort_keys=True,
    )
    cache = data / ".cache" / f"frozen-eval-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    runner = None
    out: dict[str, Any] = {}
    for split in splits:
        t0 = time.perf_counter()
        path = cache / f"{split}.npz"
        if runner is None and not path.is_file():
            runner = TrunkRunner(model, size, threads)
        feats = cached_split(
            path,
            lambda split=split, runner=runner: extract_split(
                runner, data, split, loaded.frontend, loaded.image, 1, 0, None, True
            ),
        )
        if extract_only:  # fill the feature cache without scoring anything (so nothing is seen early)
            continue
        if weights:  # the label-space weight's choice: the model row at each weight (selection splits only)
            from avloc.train.frozen import labelspace_grid

            grid = labelspace_grid(model, {split: feats}, data, size, weights, objectness_weights)
            out[split] = {"labelspace_grid": grid}
            for g in grid:
                obj = f" objectness weight {g['objectness_weight']:g}" if "objectness_weight" in g else ""
                print(
                    f"{data.name}/{split} label-space weight {g['weight']:g}{obj}: cIoU@50 {g['ciou_ap50']:.3f} "
                    f"swap {g['audio_swap_acc']:.3f}",
                    flush=True,
                )
            continue
        annotations = load_vggss_json(data / f"{split}.json")
        maps, swap = split_maps(model, feats, size)
        maps = {k: m for k, m in maps.items() if k in annotations}
        groups = {}
        for group in ("heard", "unheard", "new_instance", "unseen_category"):
            path_g = data / f"{split}_{group}.txt"
            if path_g.is_file():
                groups[group] = set(path_g.read_text().split())
        index = {sid: k for k, sid in enumerate(feats.ids)}
        objectness = {k: np.linalg.norm(feats.visual[index[k]].astype(np.float32), axis=0) for k in maps}
        centre = centre_prior(56)
        rows = {  # the model row's audio_swap_blind_acc is its own audio-blind map (the scene's mean map)
            "model": score(maps, swap, annotations, groups),
            "centre prior": score(
                {k: centre for k in maps}, {s: [centre] * len(m) for s, m in swap.items()}, annotations, groups
            ),
            "objectness (audio-blind)": score(
                objectness, {s: [objectness[s]] * len(m) for s, m in swap.items()}, annotations, groups
            ),
        }
        fixed = fixed_terms_only(model)
        if fixed is not None:  # the same scenes scored with the learned term switched off (its swap uses the audio)
            fmaps, fswap = split_maps(fixed, feats, size)
            fmaps = {k: m for k, m in fmaps.items() if k in annotations}
            rows["fixed terms only (zero-shot)"] = score(fmaps, fswap, annotations, groups)
        out[split] = {"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
        if fixed is not None:  # what the learned part adds, scene by scene (paired: both maps of the same scenes)
            out[split]["model_minus_zero_shot"] = paired_gain(maps, fmaps, annotations)
            g = out[split]["model_minus_zero_shot"]
            print(
                f"{data.name}/{split} model - zero-shot, paired over scenes: cIoU@50 {g['ciou_ap50']:+.3f} "
                f"[{g['ciou_ap50_ci'][0]:+.3f}, {g['ciou_ap50_ci'][1]:+.3f}]",
                flush=True,
            )
        for name, row in rows.items():
            print(scene_scores_line(f"{data.name}/{split} {name:26s}", row, groups), flush=True)
    return out


def over_seeds(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """The model row's numbers over several runs (seeds): mean and spread (half the max - min range)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for split in runs[0]:
        keys = [k for k, v in runs[0][split]["rows"]["model"].items() if isinstance(v, float)]
        out[split] = {}
        for k in keys:
            vals = [r[split]["rows"]["model"].get(k) for r in runs]
            if any(v is None for v in vals):
                continue
            out[split][k] = {"mean": float(np.mean(vals)), "spread": float(np.ptp(vals) / 2), "values": vals}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, or several (comma-separated: seeds)")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--splits", default="test,test_unseen")
    parser.add_argument("--data2", type=Path, default=None, help="an external dataset (evaluated, never tuned on)")
    parser.add_argument("--splits2", default="test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--extract-only", action="store_true", help="only cache the trunk features")
    parser.add_argument(
        "--labelspace-weights",
        default="",
        help="comma-separated label-space weights: score the model row at each (choose on val splits only)",
    )
    parser.add_argument(
        "--objectness-weights",
        default="",
        help="comma-separated objectness weights: with --labelspace-weights, score the model row at each pair "
        "(the objectness term is switched on for a checkpoint trained without it; val splits only)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = args.extract_only
    checkpoints = [Path(c) for c in str(args.checkpoint).split(",")]
    result: dict[str, Any] = {"checkpoints": [str(c) for c in checkpoints]}
    sets = [(args.data, args.splits)] + ([(args.data2, args.splits2)] if args.data2 is not None else [])
    for data, splits in sets:
        weights = tuple(float(w) for w in args.labelspace_weights.split(",") if w)
        obj_weights = tuple(float(w) for w in args.objectness_weights.split(",") if w)
        if obj_weights and not weights:
            raise SystemExit("--objectness-weights: give --labelspace-weights too (the grid is over pairs)")
        runs = [evaluate(c, data, splits.split(","), args.threads, x, weights, obj_weights) for c in checkpoints]
        result[str(data)] = runs[0] if len(runs) == 1 else {"runs": runs, "seeds": over_seeds(runs)}
        if len(runs) > 1:
            for split, row in result[str(data)]["seeds"].items():
                print(
                    f"{data.name}/{split} over {len(runs)} checkpoints: "
                    + ", ".join(f"{k} {v['mean']:.3f} ± {v['spread']:.3f}" for k, v in row.items()),
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    import sys

    from avloc.core.errors import UserError

    try:
        main()
    except UserError as err:  # a bad checkpoint / data / weight grid: one line, no traceback
        print(f"open_set_eval: error: {err}", file=sys.stderr)
        sys.exit(2)

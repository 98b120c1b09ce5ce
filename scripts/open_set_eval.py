"""Score a ``backbone: pretrained`` checkpoint on splits of one or more datasets, with the floors beside it.

    .venv/bin/python scripts/open_set_eval.py --checkpoint runs/pretrained/best.pt --data data/os \\
        --splits test,test_unseen --out open_set.json [--data2 /work/data/gcompris_farm --splits2 test]

For each split: adaptive cIoU@50 and AUC with bootstrap 95 % intervals over scenes, the audio-swap rule
(peak in the heard object's box and no other, :func:`avloc.core.metrics.swap_hits`) with its interval, and
the same numbers for three maps that cannot use the audio: a centre prior (Gaussian bump), audio-blind
objectness (the L2 norm over channels of the same frozen EfficientNet-Lite0 head features the model sees) and
the model's own audio-blind map (mean of its swap maps). Breakdowns by ``<split>_<group>.txt`` (heard /
unheard, new_instance / unseen_category) when the dataset has them.

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


def score(
    maps: dict[str, np.ndarray],
    swap: dict[str, list[np.ndarray]],
    annotations: dict[str, Any],
    groups: dict[str, set[str]],
) -> dict[str, Any]:
    from avloc.core.metrics import auc_of, bootstrap_interval, ciou_ap50_of, evaluate_maps, swap_hits
    from avloc.train.evaluate import swap_intervals

    res = evaluate_maps(maps, annotations, binarize="adaptive", per_sample=True)
    per = res.pop("per_sample")
    cious = np.array([per[k]["ciou"] for k in maps])
    row: dict[str, Any] = {
        "n": len(maps),
        "ciou_ap50": res["ciou_ap50"],
        "ciou_ap50_ci": list(bootstrap_interval(cious, ciou_ap50_of)),
        "auc": res["auc"],
        "auc_ci": list(bootstrap_interval(cious, auc_of)),
    }
    per_scene = {sid: swap_hits(m, [o.bbox for o in annotations[sid].objects if o.audio]) for sid, m in swap.items()}
    if per_scene:
        row["audio_swap_acc"] = float(np.mean([h for v in per_scene.values() for h in v]))
        row.update(swap_intervals(per_scene))
    ids = list(maps)
    for group, members in groups.items():
        sel = [i for i, k in enumerate(ids) if k in members]
        if sel:
            row[f"{group}/n"] = len(sel)
            row[f"{group}/ciou_ap50"] = ciou_ap50_of(cious[sel])
            rows = [v for sid, v in per_scene.items() if sid in members]
            if rows:
                row[f"{group}/audio_swap_acc"] = float(np.mean([h for v in rows for h in v]))
    return row


def evaluate(checkpoint: Path, data: Path, splits: list[str], threads: int) -> dict[str, Any]:
    from avloc.core.checkpoint import load_model
    from avloc.core.datasets import load_vggss_json
    from avloc.train.frozen import TrunkRunner, cached_split, extract_split, split_maps

    loaded = load_model(checkpoint)
    model = loaded.model.eval()
    if loaded.model_config.get("backbone") != "pretrained":
        raise SystemExit(f"{checkpoint}: not a backbone: pretrained checkpoint")
    size = loaded.image.size
    key = json.dumps(
        [loaded.frontend.to_dict(), size, list(loaded.image.mean), loaded.model_config.get("visual_layer4_stride")],
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
        model_blind = {sid: np.mean(m, axis=0) for sid, m in swap.items()}
        rows = {
            "model": score(maps, swap, annotations, groups),
            "centre prior": score(
                {k: centre for k in maps}, {s: [centre] * len(m) for s, m in swap.items()}, annotations, groups
            ),
            "objectness (audio-blind)": score(
                objectness, {s: [objectness[s]] * len(m) for s, m in swap.items()}, annotations, groups
            ),
            "model, audio-blind map": {
                "audio_swap_acc": score(
                    {k: maps[k] for k in swap}, {s: [model_blind[s]] * len(m) for s, m in swap.items()}, annotations, {}
                ).get("audio_swap_acc")
            },
        }
        out[split] = {"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
        m, c, o = rows["model"], rows["centre prior"], rows["objectness (audio-blind)"]
        print(
            f"{data.name}/{split}: model cIoU@50 {m['ciou_ap50']:.3f} {[round(v, 3) for v in m['ciou_ap50_ci']]}, "
            f"swap {m.get('audio_swap_acc', float('nan')):.3f}; centre {c['ciou_ap50']:.3f}, "
            f"objectness {o['ciou_ap50']:.3f}",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--splits", default="test,test_unseen")
    parser.add_argument("--data2", type=Path, default=None, help="an external dataset (evaluated, never tuned on)")
    parser.add_argument("--splits2", default="test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "checkpoint": str(args.checkpoint),
        str(args.data): evaluate(args.checkpoint, args.data, args.splits.split(","), args.threads),
    }
    if args.data2 is not None:
        result[str(args.data2)] = evaluate(args.checkpoint, args.data2, args.splits2.split(","), args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

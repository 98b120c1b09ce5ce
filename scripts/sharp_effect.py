"""The 16x16 refinement of the heatmap (model ``refine``, :func:`avloc.core.ssl_align.guided_upsample`) against
the 8x8 map it refines: a pointing game (the live peak, ``peak_of``, inside a sounding object's box) and adaptive
cIoU@50, on the same scenes, with paired bootstrap 95 % intervals of after - before.

Scenes: the checkpoints' own torch model on each split's frames and audio (the trunks run once per split and are
cached under DATA/.cache/sharp-*; head features, the stride-16 guide and the YAMNet rows). ``--grid`` scores
every (temperature, sigma) pair (choose on val / val_unseen only: the criterion is the mean over those splits).
Clips: two engines (before / after, ``avloc export --no-refine / --refine``) through ``avloc.Localizer.video``,
the live pipeline's steps, frame by frame against the clip's boxes (frames after ``--after-s``).

    .venv/bin/python scripts/sharp_effect.py --checkpoint RUN/best.pt[,RUN2/best.pt] --data DATA \\
        --splits val,val_unseen --grid 0.05,0.1,0.2,inf --sigmas 0.5,1 --out grid.json
    .venv/bin/python scripts/sharp_effect.py --checkpoint ... --data DATA --splits test,test_unseen \\
        --temperature T --sigma S --out test.json
    .venv/bin/python scripts/sharp_effect.py --clips DIR[,DIR2] --before ENGINE --after ENGINE --out clips.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from avloc.core.errors import UserError
from avloc.core.metrics import point_in_box
from avloc.stream.serve.inference_worker import peak_of

BOOTSTRAP = 2000


def paired(after: np.ndarray, before: np.ndarray) -> dict[str, Any]:
    """Rates and a paired bootstrap 95 % interval of after - before (items resampled together)."""
    a, b = np.asarray(after, float), np.asarray(before, float)
    idx = np.random.default_rng(0).integers(0, len(a), (BOOTSTRAP, len(a)))
    diff = (a[idx] - b[idx]).mean(axis=1)
    return {
        "n": len(a),
        "after": round(float(a.mean()), 4),
        "before": round(float(b.mean()), 4),
        "diff": round(float(a.mean() - b.mean()), 4),
        "diff_ci95": [round(float(np.percentile(diff, 2.5)), 4), round(float(np.percentile(diff, 97.5)), 4)],
    }


def trunk_outputs(loaded: Any, data: Path, split: str, threads: int) -> dict[str, np.ndarray]:
    """ids, Lite0 head features [N,1280,8,8], stride-16 guide [N,112,16,16] (float16) and YAMNet rows
    [N,1024+521] of a split's scenes, as the model's own encoders compute them (cached: the trunks are frozen,
    so every seed of the recipe shares them)."""
    from avloc.core.audio import FrontEnd, frame_window
    from avloc.core.datasets import AVDataset
    from avloc.train.augment import ImageViews, chw_tensor

    key = json.dumps([loaded.frontend.to_dict(), loaded.image.size, list(loaded.image.mean), "lite0-guide16"])
    path = data / ".cache" / f"sharp-{hashlib.sha1(key.encode()).hexdigest()[:12]}" / f"{split}.npz"
    if path.is_file():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    model = loaded.model
    dataset = AVDataset(data, split, loaded.frontend)
    views = ImageViews(loaded.image)
    frontend = FrontEnd(loaded.frontend).eval()
    out: dict[str, list[np.ndarray]] = {"feats": [], "guide": [], "audio": []}
    ids = list(dataset.ids)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(ids), 16):
            chunk = ids[start : start + 16]
            images = torch.stack([views.evaluation(chw_tensor(dataset.image(i))) for i in chunk])
            feats, guide = model.visual.features_and_guide(images)
            spec = frontend(
                torch.from_numpy(np.stack([frame_window(dataset.audio(i), loaded.frontend) for i in chunk]))
            )
            out["feats"].append(feats.numpy().astype(np.float16))
            out["guide"].append(guide.numpy().astype(np.float16))
            out["audio"].append(model.audio.features(spec).numpy())
    print(f"{split}: trunks on {len(ids)} scenes in {time.perf_counter() - t0:.0f} s", flush=True)
    result = {k: np.concatenate(v) for k, v in out.items()}
    result["ids"] = np.array(ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **result)
    tmp.replace(path)
    return result


def split_maps(
    model: Any, trunk: dict[str, np.ndarray], refine: tuple[float, float] | None, obj16: bool = False
) -> np.ndarray:
    """The model's heatmaps [N,h,w] of a split's scenes: 8x8 (refine None) or refined to 16x16 with (temperature,
    sigma), through the model's own image_from_features / audio_from_features / cosine_map. ``obj16`` (an
    experiment, not in the model): the objectness term taken at 16x16 from the guide (mean |x| of the stride-16
    features, min-max per image) instead of refined from 8x8."""
    from avloc.core.ogl import reduce_features
    from avloc.core.ssl_align import with_refine

    m = with_refine(model, refine is not None, *(refine or (None, None))).eval()
    w = float(m.objectness_weight) if obj16 else 0.0
    maps = []
    with torch.inference_mode():
        if obj16:
            m.objectness_weight.fill_(0.0)
        for s in range(0, len(trunk["ids"]), 64):
            feats = torch.from_numpy(trunk["feats"][s : s + 64].astype(np.float32))
            guide = torch.from_numpy(trunk["guide"][s : s + 64].astype(np.float32)) if refine else None
            audio = torch.from_numpy(trunk["audio"][s : s + 64])
            heat = m.cosine_map(m.image_from_features(feats, guide), m.audio_from_features(audio))
            if obj16:
                obj = reduce_features(guide)
                lo, hi = obj.amin(dim=(1, 2), keepdim=True), obj.amax(dim=(1, 2), keepdim=True)
                heat = heat + w * (obj - lo) / (hi - lo).clamp_min(1e-6)
            maps.append(heat.numpy())
    return np.concatenate(maps)


def scene_hits(maps: np.ndarray, ids: list[str], data: Path, split: str, size: int) -> dict[str, np.ndarray]:
    """Per scene: the live peak inside a sounding object's box; adaptive cIoU >= 0.5 of the bilinear
    upsampling to the image size (as the recipe's evaluation)."""
    from avloc.core.datasets import load_vggss_json
    from avloc.core.metrics import evaluate_maps

    scenes = {s["file"]: s for s in json.loads((data / f"{split}.json").read_text())}
    annotations = load_vggss_json(data / f"{split}.json")
    keep = [k for k, i in enumerate(ids) if i in scenes]
    pointing = np.array([any(point_in_box(peak_of(maps[k]), b) for b in scenes[ids[k]]["bbox"]) for k in keep])
    big = F.interpolate(torch.from_numpy(maps[keep]).unsqueeze(1), size=(size, size), mode="bilinear")[:, 0].numpy()
    sel = [ids[k] for k in keep]
    per = evaluate_maps(dict(zip(sel, big)), {i: annotations[i] for i in sel}, binarize="adaptive", per_sample=True)[
        "per_sample"
    ]
    return {"pointing": pointing, "ciou50": np.array([per[i]["ciou"] >= 0.5 for i in sel])}


def score_scenes(args: argparse.Namespace) -> dict[str, Any]:
    from avloc.core.checkpoint import load_model

    checkpoints = [Path(c) for c in args.checkpoint.split(",")]
    splits = [s for s in args.splits.split(",") if s]
    if args.grid:
        settings = [(float(t), float(s)) for t in args.grid.split(",") for s in args.sigmas.split(",")]
    else:
        settings = [(args.temperature, args.sigma)]
    result: dict[str, Any] = {"checkpoints": [str(c) for c in checkpoints], "splits": {}}
    for ckpt in checkpoints:
        loaded = load_model(ckpt)
        if loaded.model_config.get("backbone") != "pretrained":
            raise UserError(f"{ckpt}: not a backbone: pretrained checkpoint")
        for split in splits:
            trunk = trunk_outputs(loaded, args.data, split, args.threads)
            ids = [str(i) for i in trunk["ids"]]
            before = scene_hits(split_maps(loaded.model, trunk, None), ids, args.data, split, loaded.image.size)
            rows = {}
            for t, s in settings:
                maps = split_maps(loaded.model, trunk, (t, s), args.obj16)
                after = scene_hits(maps, ids, args.data, split, loaded.image.size)
                name = f"T={t:g},sigma={s:g}" + (",obj16" if args.obj16 else "")
                rows[name] = {k: paired(after[k], before[k]) for k in after}
                r = rows[name]
                print(
                    f"{ckpt.parent.name} {split} {name}: pointing {r['pointing']['before']:.3f} -> "
                    f"{r['pointing']['after']:.3f} {r['pointing']['diff_ci95']}, cIoU@50 {r['ciou50']['before']:.3f}"
                    f" -> {r['ciou50']['after']:.3f} {r['ciou50']['diff_ci95']}",
                    flush=True,
                )
            result["splits"].setdefault(split, {})[str(ckpt)] = rows
    # the selection criterion (grid): mean over splits and checkpoints of each metric's after - before
    result["mean_diff"] = {
        name: {
            k: float(np.mean([result["splits"][sp][str(c)][name][k]["diff"] for sp in splits for c in checkpoints]))
            for k in ("pointing", "ciou50")
        }
        for name in result["splits"][splits[0]][str(checkpoints[0])]
    }
    for name, d in result["mean_diff"].items():
        print(f"mean over splits and checkpoints {name}: pointing {d['pointing']:+.4f}, cIoU@50 {d['ciou50']:+.4f}")
    return result


def clip_files(dirs: str) -> list[tuple[Path, list[list[float]]]]:
    """Every ``*.mp4`` with a ``<name>.json`` of per-frame boxes (``boxes``) under the given folders."""
    out = []
    for d in dirs.split(","):
        for video in sorted(Path(d).glob("**/*.mp4")):
            meta = video.with_suffix(".json")
            if meta.is_file() and "boxes" in (doc := json.loads(meta.read_text())):
                out.append((video, doc["boxes"]))
    if not out:
        raise UserError(f"--clips {dirs}: no *.mp4 with a boxes JSON beside it")
    return out


def score_clips(args: argparse.Namespace) -> dict[str, Any]:
    """Per frame of every clip: the live peak of each engine's map inside the frame's box; scored over the frames
    from each of ``--after-s``'s times on (the live window is still partly before the clip's start earlier)."""
    import avloc

    starts = [float(t) for t in args.after_s.split(",")]
    result: dict[str, Any] = {"before": str(args.before), "after": str(args.after)}
    times: list[float] = []
    hits: dict[str, list[bool]] = {"before": [], "after": []}
    per_clip: dict[str, Any] = {}
    engines = {name: avloc.Localizer(getattr(args, name)) for name in hits}
    for video, boxes in clip_files(args.clips):
        clip_times: list[float] = []
        for name, loc in engines.items():
            clip_times = []
            for i, (t, _, r) in enumerate(loc.video(video)):
                hits[name].append(
                    point_in_box(peak_of(r.feature_map.astype(np.float32)), boxes[min(i, len(boxes) - 1)])
                )
                clip_times.append(float(t))
        n = len(clip_times)
        times += clip_times
        keep = np.array(clip_times) >= starts[-1]
        per_clip[str(video)] = paired(np.array(hits["after"][-n:])[keep], np.array(hits["before"][-n:])[keep])
        print(video.name, f"from {starts[-1]:g} s", per_clip[str(video)], flush=True)
    for start in starts:
        keep = np.array(times) >= start
        result[f"frames_from_{start:g}s"] = paired(np.array(hits["after"])[keep], np.array(hits["before"])[keep])
        print(f"all clips, frames from {start:g} s:", result[f"frames_from_{start:g}s"], flush=True)
    result["clips"] = per_clip
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="", help="checkpoint(s), comma-separated (seeds)")
    parser.add_argument("--data", type=Path, help="dataset root (avloc data stamps)")
    parser.add_argument("--splits", default="val,val_unseen")
    parser.add_argument("--grid", default="", help="comma-separated temperatures (inf: no guide); val splits only")
    parser.add_argument("--sigmas", default="0.5", help="with --grid: comma-separated spatial widths (cells)")
    parser.add_argument("--obj16", action="store_true", help="experiment: objectness at 16x16 from the guide")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--clips", default="", help="folders of clips (*.mp4 + *.json boxes), comma-separated")
    parser.add_argument("--before", type=Path, help="with --clips: the engine without the refinement")
    parser.add_argument("--after", type=Path, help="with --clips: the engine with it")
    parser.add_argument(
        "--after-s", default="1,3", help="with --clips: score the frames from each of these times on (comma-separated)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        if args.clips:
            if args.before is None or args.after is None:
                raise UserError("--clips needs --before ENGINE and --after ENGINE")
            result = score_clips(args)
        else:
            if not args.checkpoint or args.data is None:
                raise UserError("scenes need --checkpoint CKPT and --data DATA (or --clips with engines)")
            if not all(t > 0 for t in [args.temperature]) or not 0 < args.sigma < math.inf:
                raise UserError(f"--temperature {args.temperature} / --sigma {args.sigma}: expected values > 0")
            result = score_scenes(args)
    except UserError as err:
        print(f"sharp_effect: error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the live path's aspect-ratio handling costs in localization (issue 25 item 4), on replayed 4:3 clips
and on 4:3 versions of still scenes.

The live preprocess (``engines.base.preprocess_frame``, ``engines.preprocess``) makes a frame into the model's
square input as the engine manifest's ``image.fit`` says (``avloc.core.media.frame_fit``, the one definition):

- ``stretch``: the whole frame resized to the square (every engine so far; training images are square already);
- ``crop``: the centred square of the frame, resized (the sides are not seen: a peak there is impossible);
- ``letterbox``: the frame scaled to fit, padded to a square with the normalisation mean.

Every input is made by ``preprocess_frame`` itself (cv2 INTER_AREA when shrinking), the map's peak is the
worker's (``stream.serve.inference_worker.peak_of``), mapped back onto the frame with ``FrameFit.input_to_frame``
and counted as a hit when inside a sounding object's box. ``chance`` is the hit rate of a uniformly random peak
over the input (the box's share of the input). ``stretch_bicubic`` is ``stretch`` made by training's
evaluation view instead (torchvision bicubic, antialiased): its peak-cell agreement with ``stretch`` and the
mean |map difference| answer whether the live path's cv2 resize matters.

Two data sets:

- ``--video`` clips with per-frame boxes (``avloc data stamps --videos N``: 640x480, objects drawn undistorted),
  each frame heard with its own end-anchored window of real audio, frames from one full window on; the paired
  difference to ``stretch`` has a 95 % bootstrap over CLIPS (frames of a clip are alike);
- ``--scenes DATA --split S``: each square scene of a split widened to 4:3 (``--wide``) at a random horizontal
  offset, the strips filled by mirroring the scene's own edges, so the sounding box is known; bootstrap over
  scenes. ``square`` is the scene as trained (no widening), for reference.

  .venv/bin/python scripts/aspect_effect.py --checkpoint runs/os3_s0/best.pt \\
      --video data/clips8/video/clip_0000.mp4 ... --scenes data/os --split val,val_unseen --out aspect.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from avloc.core.audio import FrontEnd, frame_window, load_audio
from avloc.core.checkpoint import load_model
from avloc.core.datasets import load_vggss_json
from avloc.core.media import RESIZE_MODES, FrameFit, frame_fit, iter_video, read_video_audio
from avloc.engines.base import preprocess_frames
from avloc.stream.serve.inference_worker import peak_of
from avloc.train.augment import ImageViews, chw_tensor

MODES = RESIZE_MODES
BICUBIC = "stretch_bicubic"


def hit(fit: FrameFit, peak: tuple[float, float], boxes: np.ndarray) -> bool:
    """Whether the input-space ``peak`` lands, on the frame, inside one of the normalized ``boxes``."""
    p = fit.input_to_frame(*peak)
    return p is not None and bool(
        ((boxes[:, 0] <= p[0]) & (p[0] <= boxes[:, 2]) & (boxes[:, 1] <= p[1]) & (p[1] <= boxes[:, 3])).any()
    )


def chance(fit: FrameFit, boxes: np.ndarray, grid: int = 64) -> float:
    """Share of the input whose points map inside a box (the hit rate of a uniformly random peak), on a
    ``grid`` x ``grid`` raster of the input (``FrameFit.input_to_frame``'s linear map, vectorized)."""
    (h, w), (H, W) = fit.frame_size, fit.input_size
    sx0, sy0, sx1, sy1 = fit.source
    tx0, ty0, tx1, ty1 = fit.target
    c = (np.arange(grid) + 0.5) / grid
    px, py = c * W, c * H
    fx = (sx0 + (px - tx0) * (sx1 - sx0) / (tx1 - tx0)) / w
    fy = (sy0 + (py - ty0) * (sy1 - sy0) / (ty1 - ty0)) / h
    okx, oky = (px >= tx0) & (px <= tx1), (py >= ty0) & (py <= ty1)
    inside = np.zeros((grid, grid), bool)
    for b in boxes:
        inside |= ((fy >= b[1]) & (fy <= b[3]) & oky)[:, None] & ((fx >= b[0]) & (fx <= b[2]) & okx)[None, :]
    return float(inside.mean())


class Scorer:
    """The checkpoints (one frozen pretrained trunk shared by all: its features are computed once per input),
    their front end and the manifest-like ``image`` section of each mode."""

    def __init__(self, checkpoints: list[str]) -> None:
        loaded = [load_model(c, device="cpu") for c in checkpoints]
        self.loaded = loaded[0]
        self.models = [x.model.eval() for x in loaded]
        first = self.models[0]
        for other, path in zip(self.models[1:], checkpoints[1:]):
            for part in ("visual", "audio"):
                a, b = getattr(first, part).trunk.state_dict(), getattr(other, part).trunk.state_dict()
                if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                    raise SystemExit(f"{path}: its {part} trunk differs from {checkpoints[0]}'s; one at a time")
            if x_cfg(other) != x_cfg(first):
                raise SystemExit(f"{path}: another image / front-end configuration than {checkpoints[0]}")
        self.frontend = FrontEnd(self.loaded.frontend).eval()
        image = self.loaded.image
        self.size = (image.size, image.size)
        base = {"size": image.size, "mean": list(image.mean), "std": list(image.std)}
        self.manifests = {m: {"image": {**base, "fit": m}} for m in MODES}
        self.views = ImageViews(image)
        self._fits: dict[tuple[str, tuple[int, int]], FrameFit] = {}

    def fit(self, mode: str, shape: tuple[int, int]) -> FrameFit:
        key = (mode, shape)
        if key not in self._fits:
            self._fits[key] = frame_fit(shape, self.size, "stretch" if mode in (BICUBIC, "square") else mode)
        return self._fits[key]

    @torch.no_grad()
    def audio(self, windows: np.ndarray) -> list[torch.Tensor]:
        rows = self.models[0].audio.features(self.frontend(torch.from_numpy(windows)))
        return [m.audio_from_features(rows) for m in self.models]

    @torch.no_grad()
    def maps(self, rgbs: list[np.ndarray], mode: str, audio: list[torch.Tensor]) -> list[np.ndarray]:
        """Per checkpoint, the low-resolution maps [B,h,w] (the engine's output) of the frames made into
        inputs by ``mode``."""
        if mode == BICUBIC:
            images = torch.stack([self.views.evaluation(chw_tensor(rgb)) for rgb in rgbs])
        else:
            bgr = [cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) for rgb in rgbs]
            images = torch.from_numpy(preprocess_frames(bgr, self.manifests[mode]))
        feats = self.models[0].visual.features(images)
        return [m.cosine_map(m.image_from_features(feats), a).numpy() for m, a in zip(self.models, audio)]


def x_cfg(model: torch.nn.Module) -> Any:
    return model.config


def new_acc(modes: list[str]) -> dict[str, Any]:
    return {"hits": {m: [] for m in modes}, "chance": {m: [] for m in modes}, "same_cell": [], "map_diff": []}


def score_batch(
    scorer: Scorer,
    rgbs: list[np.ndarray],
    boxes: list[np.ndarray],
    audio: list[torch.Tensor],
    modes: list[str],
    accs: list[dict[str, Any]],
) -> None:
    """Add the batch's hits, chance levels and (stretch vs bicubic) map agreement to each checkpoint's acc."""
    maps = {m: scorer.maps(rgbs, m, audio) for m in modes}
    chances = {m: [chance(scorer.fit(m, rgb.shape[:2]), bx) for rgb, bx in zip(rgbs, boxes)] for m in modes}
    for k, acc in enumerate(accs):
        for m in modes:
            acc["chance"][m] += chances[m]
            for rgb, bx, heat in zip(rgbs, boxes, maps[m][k]):
                acc["hits"][m].append(int(hit(scorer.fit(m, rgb.shape[:2]), peak_of(heat), bx)))
        if "stretch" in modes and BICUBIC in modes:
            a, b = (maps[x][k].reshape(len(rgbs), -1) for x in ("stretch", BICUBIC))
            span = (a.max(1) - a.min(1)).clip(1e-6)
            acc["same_cell"] += [int(i == j) for i, j in zip(a.argmax(1), b.argmax(1))]
            acc["map_diff"] += [float(v) for v in np.abs(a - b).mean(1) / span]


def clip_effect(scorer: Scorer, video: Path, stride: int, batch: int = 16) -> list[dict[str, Any]]:
    """Per checkpoint, the clip's scores (every ``stride``-th frame from one full window on)."""
    sidecar = json.loads(video.with_suffix(".json").read_text())
    boxes, fps = sidecar["boxes"], float(sidecar.get("fps", 30))
    cfg = scorer.loaded.frontend
    rate, n = cfg.sample_rate, cfg.num_samples
    wave = np.concatenate([np.zeros(n, np.float32), read_video_audio(video, rate)])  # the replay's pre-fill
    frames = [(pts, rgb) for pts, rgb in iter_video(video) if pts >= cfg.window_seconds][::stride]
    modes = [*MODES, BICUBIC]
    accs = [new_acc(modes) for _ in scorer.models]
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        windows = np.stack([frame_window(wave, cfg, n + int(round(pts * rate))) for pts, _ in chunk])
        bxs = [np.asarray([boxes[min(int(round(pts * fps)), len(boxes) - 1)]]) for pts, _ in chunk]
        score_batch(scorer, [rgb for _, rgb in chunk], bxs, scorer.audio(windows), modes, accs)
    return [{"video": str(video), "class": sidecar.get("class"), "frames_scored": len(frames), **a} for a in accs]


def widen(rgb: np.ndarray, boxes: np.ndarray, wide: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A square scene widened to aspect ``wide`` (width / height) at a random horizontal offset, the strips
    mirrored from the scene's own edges; its normalized boxes moved with it."""
    h, w = rgb.shape[:2]
    extra = int(round(h * wide)) - w
    left = int(rng.integers(0, extra + 1))
    out = cv2.copyMakeBorder(rgb, 0, 0, left, extra - left, cv2.BORDER_REFLECT_101)
    moved = boxes.copy()
    moved[:, [0, 2]] = (boxes[:, [0, 2]] * w + left) / (w + extra)
    return out, moved


def scene_effect(scorer: Scorer, root: Path, split: str, wide: float, batch: int = 16) -> list[dict[str, Any]]:
    """Per checkpoint, the split's scores: each scene widened (``widen``) and, as ``square``, as it is."""
    anns = load_vggss_json(root / f"{split}.json")
    cfg = scorer.loaded.frontend
    rng = np.random.default_rng(0)
    modes = ["square", *MODES]
    accs = [new_acc(modes) for _ in scorer.models]
    squares = [new_acc(["stretch"]) for _ in scorer.models]
    ids = sorted(anns)
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        rgbs, wides, sq_boxes, wide_boxes, windows = [], [], [], [], []
        for i in chunk:
            rgb = cv2.cvtColor(cv2.imread(str(root / "frames" / f"{i}.jpg")), cv2.COLOR_BGR2RGB)
            bx = np.asarray(anns[i].boxes, np.float64).reshape(-1, 4)
            wrgb, wbx = widen(rgb, bx, wide, rng)
            rgbs.append(rgb)
            sq_boxes.append(bx)
            wides.append(wrgb)
            wide_boxes.append(wbx)
            windows.append(frame_window(load_audio(root / "audio" / f"{i}.wav", cfg.sample_rate), cfg))
        audio = scorer.audio(np.stack(windows))
        score_batch(scorer, wides, wide_boxes, audio, list(MODES), accs)
        score_batch(scorer, rgbs, sq_boxes, audio, ["stretch"], squares)
    for acc, sq in zip(accs, squares):
        acc["hits"]["square"], acc["chance"]["square"] = sq["hits"]["stretch"], sq["chance"]["stretch"]
    return [{"split": split, "scenes": len(ids), "wide": wide, **a} for a in accs]


def paired_ci(groups: list[dict[str, list[int]]], mode: str, n_boot: int = 4000) -> list[float]:
    """95 % bootstrap over groups (clips, or one group per scene) of the pooled hit-rate difference
    ``mode - stretch``."""
    diff = np.array([sum(g[mode]) - sum(g["stretch"]) for g in groups], np.float64)
    count = np.array([len(g["stretch"]) for g in groups], np.float64)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(groups), (n_boot, len(groups)))
    return [round(float(v), 4) for v in np.percentile(diff[idx].sum(1) / count[idx].sum(1), [2.5, 97.5])]


def summarize(units: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    hits = {m: [h for u in units for h in u["hits"][m]] for m in modes}
    ch = {m: [c for u in units for c in u["chance"][m]] for m in modes}
    same = [s for u in units for s in u["same_cell"]]
    diff = [d for u in units for d in u["map_diff"]]
    out = {
        "n": len(hits["stretch"]),
        "peak_in_box": {m: round(float(np.mean(v)), 4) for m, v in hits.items()},
        "chance": {m: round(float(np.mean(v)), 4) for m, v in ch.items()},
    }
    if same:
        out["bicubic_vs_cv2"] = {
            "same_peak_cell": round(float(np.mean(same)), 4),
            "mean_abs_map_diff_over_range": round(float(np.mean(diff)), 4),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="repeat for seeds of one recipe")
    p.add_argument("--video", action="append", default=[], help="clip with CLIP.json boxes next to it")
    p.add_argument("--scenes", help="a stamps dataset whose square scenes are widened (with --split)")
    p.add_argument("--split", default="val,val_unseen", help="comma-separated splits of --scenes")
    p.add_argument("--wide", type=float, default=4 / 3, help="aspect (width / height) the scenes are widened to")
    p.add_argument("--stride", type=int, default=1, help="score every N-th clip frame (default 1)")
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    if not args.video and not args.scenes:
        p.error("give --video and/or --scenes")
    torch.set_num_threads(2)
    scorer = Scorer(args.checkpoint)
    results: list[dict[str, Any]] = [{"checkpoint": c, "image_size": scorer.size[0]} for c in args.checkpoint]
    if args.video:
        modes = [*MODES, BICUBIC]
        per_video = [clip_effect(scorer, Path(v), args.stride) for v in args.video]  # [video][checkpoint]
        for k, result in enumerate(results):
            clips = [v[k] for v in per_video]
            result["clips"] = {
                "frame_stride": args.stride,
                **summarize(clips, modes),
                "minus_stretch_95ci_over_clips": {m: paired_ci([c["hits"] for c in clips], m) for m in modes[1:]},
                "per_clip": [
                    {
                        "video": c["video"],
                        "class": c["class"],
                        "frames": c["frames_scored"],
                        "peak_in_box": {m: round(float(np.mean(c["hits"][m])), 4) for m in modes},
                        "chance": {m: round(float(np.mean(c["chance"][m])), 4) for m in modes},
                    }
                    for c in clips
                ],
            }
    for split in args.split.split(",") if args.scenes else []:
        modes = ["square", *MODES]
        for result, s in zip(results, scene_effect(scorer, Path(args.scenes), split, args.wide)):
            per_scene = [{m: [s["hits"][m][i]] for m in modes} for i in range(s["scenes"])]
            result[f"scenes_{split}"] = {
                "data": args.scenes,
                "wide": round(args.wide, 4),
                **summarize([s], modes),
                "minus_stretch_95ci_over_scenes": {m: paired_ci(per_scene, m) for m in modes if m != "stretch"},
            }
    result = {"checkpoints": results}
    result["command"] = "python scripts/aspect_effect.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

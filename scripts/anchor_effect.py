"""Measure ``frontend.anchor`` on a replayed clip: peak-in-box over frames with the window ending at each
frame (what the live worker pairs) and with the window centred on it (what a centred loader trains on).

Frames go through the evaluation's preprocessing; the clip's audio is padded with one window of silence on
both sides (the replay worker pre-fills silence before the file, so an end-anchored window at t < window is
what the live pipeline sees; a centred one may look past the end of the clip only offline).

  .venv/bin/python scripts/anchor_effect.py --checkpoint runs/cpu/best.pt \
      --video data/stamps10k/video/clip_0000.mp4 [--video ...] --out docs/results/anchor_effect.json
Each clip needs its boxes next to it (``clip_0000.json`` with ``boxes``: one normalized box per frame).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from avloc.core.audio import FrontEnd, frame_window
from avloc.core.checkpoint import load_model
from avloc.core.media import iter_video, read_video_audio
from avloc.train.augment import ImageViews, chw_tensor
from avloc.train.evaluate import peak_inside


@torch.no_grad()
def clip_effect(loaded, video: Path, batch: int = 32) -> dict[str, object]:  # noqa: ANN001 - LoadedModel
    boxes = json.loads(video.with_suffix(".json").read_text())["boxes"]
    cfg = loaded.frontend
    rate, n = cfg.sample_rate, cfg.num_samples
    wave = np.concatenate([np.zeros(n, np.float32), read_video_audio(video, rate), np.zeros(n, np.float32)])
    views = ImageViews(loaded.image)
    frontend = FrontEnd(cfg).eval()
    model = loaded.model.eval()
    anchors = {a: dataclasses.replace(cfg, anchor=a) for a in ("end", "center")}
    hits = {a: [] for a in anchors}
    frames = list(iter_video(video))
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        images = torch.stack([views.evaluation(chw_tensor(rgb)) for _, rgb in chunk])
        vmaps = model.encode_image(images)
        for name, acfg in anchors.items():
            windows = np.stack([frame_window(wave, acfg, n + int(round(pts * rate))) for pts, _ in chunk])
            audio = model.encode_audio(frontend(torch.from_numpy(windows)))
            maps = torch.nn.functional.interpolate(
                model.cosine_map(vmaps, audio).unsqueeze(1),
                size=images.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )[:, 0].numpy()
            for k, m in enumerate(maps):
                index = min(start + k, len(boxes) - 1)
                hits[name].append(peak_inside(m, np.asarray(boxes[index])))
    # after the first window an end-anchored window holds no pre-filled silence: the anchors differ there
    # only by where the window sits in time (1.5 s apart at 3 s), not by how much of it is sound
    full = np.array([pts >= cfg.window_seconds for pts, _ in frames])
    return {
        "video": str(video),
        "frames": len(frames),
        **{f"peak_in_box_{a}": float(np.mean(h)) for a, h in hits.items()},
        "frames_after_first_window": int(full.sum()),
        **{
            f"peak_in_box_{a}_after_first_window": float(np.mean(np.asarray(h)[full])) if full.any() else None
            for a, h in hits.items()
        },
        "same_verdict": float(np.mean(np.equal(hits["end"], hits["center"]))),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--video", action="append", required=True, help="clip with CLIP.json boxes next to it")
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    loaded = load_model(args.checkpoint, device="cpu")
    clips = [clip_effect(loaded, Path(v)) for v in args.video]
    result = {
        "checkpoint": args.checkpoint,
        "window_seconds": loaded.frontend.window_seconds,
        "trained_anchor": loaded.frontend.anchor,
        "clips": clips,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What audio-embedding reuse (``audio_reuse_s``) costs in localization on replayed clips.

A worker that is behind pairs a frame with an already embedded window ending up to ``audio_reuse_s`` before
the newest one (avloc.stream.serve.batching). This replays that offline: every frame of each clip heard with the
end-anchored window ending at its time (what a worker that keeps up pairs) and with the window ending
``lag`` seconds earlier, for each ``--lag``; peak-in-box over frames (the clip's per-frame boxes) and the share
of frames whose peak stays in the same pixel. Frames before one full window of real audio are left out (the
pre-filled silence is the warming_up notice's business, not reuse's).

  .venv/bin/python scripts/reuse_effect.py --checkpoint runs/cpu/best.pt \
      --video data/stamps10k/video/clip_0000.mp4 --video data/stamps10k/video/clip_0001.mp4 \
      --lag 0.1 --lag 0.3 --lag 1.0 --out docs/results/reuse_effect.json
"""

from __future__ import annotations

import argparse
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
def clip_effect(loaded, video: Path, lags: list[float], batch: int = 32) -> dict[str, object]:  # noqa: ANN001
    sidecar = json.loads(video.with_suffix(".json").read_text())
    boxes, fps = sidecar["boxes"], float(sidecar.get("fps", 30))
    cfg = loaded.frontend
    rate, n = cfg.sample_rate, cfg.num_samples
    wave = np.concatenate([np.zeros(n, np.float32), read_video_audio(video, rate)])  # the replay's pre-fill
    views = ImageViews(loaded.image)
    frontend = FrontEnd(cfg).eval()
    model = loaded.model.eval()
    frames = [(pts, rgb) for pts, rgb in iter_video(video) if pts >= cfg.window_seconds]
    hits: dict[float, list[bool]] = {lag: [] for lag in [0.0, *lags]}
    peaks: dict[float, list[int]] = {lag: [] for lag in hits}
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        images = torch.stack([views.evaluation(chw_tensor(rgb)) for _, rgb in chunk])
        vmaps = model.encode_image(images)
        for lag in hits:
            ends = [n + int(round((pts - lag) * rate)) for pts, _ in chunk]
            windows = np.stack([frame_window(wave, cfg, end) for end in ends])
            audio = model.encode_audio(frontend(torch.from_numpy(windows)))
            maps = torch.nn.functional.interpolate(
                model.cosine_map(vmaps, audio).unsqueeze(1), size=images.shape[-2:], mode="bilinear"
            )[:, 0].numpy()
            for (pts, _), m in zip(chunk, maps):
                index = min(int(round(pts * fps)), len(boxes) - 1)
                hits[lag].append(peak_inside(m, np.asarray(boxes[index])))
                peaks[lag].append(int(np.argmax(m)))
    base = np.asarray(peaks[0.0])
    return {
        "video": str(video),
        "frames_scored": len(frames),
        "peak_in_box": {str(lag): round(float(np.mean(h)), 4) for lag, h in hits.items()},
        "same_peak_as_lag0": {str(lag): round(float(np.mean(np.asarray(p) == base)), 4) for lag, p in peaks.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--video", action="append", required=True, help="clip with CLIP.json boxes next to it")
    p.add_argument("--lag", action="append", type=float, default=None, help="seconds (repeat); default 0.1 0.3 1.0")
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    loaded = load_model(args.checkpoint, device="cpu")
    lags = args.lag or [0.1, 0.3, 1.0]
    result = {
        "checkpoint": args.checkpoint,
        "window_seconds": loaded.frontend.window_seconds,
        "clips": [clip_effect(loaded, Path(v), lags) for v in args.video],
        "command": "python scripts/reuse_effect.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the live path's aspect-ratio handling costs in localization on replayed clips (issue 25 item 4).

The live preprocess (``engines.base.preprocess_frame``, ``engines.preprocess``) stretches a 4:3 frame to the
square training size, while training and evaluation images are square. This scores, on clips with per-frame
boxes (``avloc data stamps --videos N``: 640x480, the objects drawn without distortion), three ways of making
the square image, every frame heard with its own end-anchored window of real audio (frames before one full
window are left out: that is the warming_up notice's business):

- ``stretch``: the whole frame resized to the square (what the live path does today; the evaluation view);
- ``crop``: the centre square of the frame, resized (the sides are not seen: a peak there is impossible);
- ``letterbox``: the frame scaled to fit, padded to a square with the normalisation mean (zeros after it).

The map's peak is mapped back to frame coordinates and counted as a hit when inside the sounding object's box
(``train.evaluate.peak_inside``'s rule). ``chance`` is the same score for a uniformly random peak (the mean
share of the square's area the box covers), so a mode's number can be read against its own chance level.

  .venv/bin/python scripts/aspect_effect.py --checkpoint runs/cpu/best.pt \
      --video data/stamps/video/clip_0000.mp4 --video data/stamps/video/clip_0001.mp4 \
      --out docs/results/aspect_effect.json
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

MODES = ("stretch", "crop", "letterbox")


def square_geometry(mode: str, h: int, w: int) -> tuple[float, float, float]:
    """(x0, y0, side) of the square in frame pixels: square pixel u in 0..1 sits at frame x0 + u * side."""
    if mode == "crop":
        side = min(h, w)
        return (w - side) / 2, (h - side) / 2, float(side)
    if mode == "letterbox":
        side = max(h, w)
        return (w - side) / 2, (h - side) / 2, float(side)
    raise ValueError(mode)


def to_square(rgb: np.ndarray, mode: str, fill: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 frame -> the uint8 image the mode resizes to the square (stretch: the frame itself)."""
    if mode == "stretch":
        return rgb
    h, w = rgb.shape[:2]
    x0, y0, side = square_geometry(mode, h, w)
    x0, y0, side = int(round(x0)), int(round(y0)), int(side)
    if mode == "crop":
        return rgb[y0 : y0 + side, x0 : x0 + side]
    out = np.empty((side, side, 3), np.uint8)
    out[:] = fill
    out[-y0 : -y0 + h, -x0 : -x0 + w] = rgb
    return out


def peak_in_frame(heatmap: np.ndarray, mode: str, h: int, w: int) -> tuple[float, float] | None:
    """The map's peak (pixel centre) in normalized frame coordinates; None when it is in the padding."""
    mh, mw = heatmap.shape
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    u, v = (x + 0.5) / mw, (y + 0.5) / mh
    if mode == "stretch":
        return u, v
    x0, y0, side = square_geometry(mode, h, w)
    px, py = (x0 + u * side) / w, (y0 + v * side) / h
    return (px, py) if 0.0 <= px <= 1.0 and 0.0 <= py <= 1.0 else None


def chance(box: np.ndarray, mode: str, h: int, w: int) -> float:
    """Share of the square's area inside the box: the hit rate of a uniformly random peak."""
    if mode == "stretch":
        return float((box[2] - box[0]) * (box[3] - box[1]))
    x0, y0, side = square_geometry(mode, h, w)
    bx1, bx2 = max(box[0] * w, x0), min(box[2] * w, x0 + side)
    by1, by2 = max(box[1] * h, y0), min(box[3] * h, y0 + side)
    return float(max(0.0, bx2 - bx1) * max(0.0, by2 - by1) / side**2)


@torch.no_grad()
def clip_effect(loaded, video: Path, batch: int = 32) -> dict[str, object]:  # noqa: ANN001
    sidecar = json.loads(video.with_suffix(".json").read_text())
    boxes, fps = sidecar["boxes"], float(sidecar.get("fps", 30))
    cfg = loaded.frontend
    rate, n = cfg.sample_rate, cfg.num_samples
    wave = np.concatenate([np.zeros(n, np.float32), read_video_audio(video, rate)])  # the replay's pre-fill
    views = ImageViews(loaded.image)
    fill = np.round(np.asarray(loaded.image.mean) * 255).astype(np.uint8)  # zeros after normalisation
    frontend = FrontEnd(cfg).eval()
    model = loaded.model.eval()
    frames = [(pts, rgb) for pts, rgb in iter_video(video) if pts >= cfg.window_seconds]
    hits: dict[str, list[bool]] = {m: [] for m in MODES}
    chances: dict[str, list[float]] = {m: [] for m in MODES}
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        ends = [n + int(round(pts * rate)) for pts, _ in chunk]
        windows = np.stack([frame_window(wave, cfg, end) for end in ends])
        audio = model.encode_audio(frontend(torch.from_numpy(windows)))
        for mode in MODES:
            images = torch.stack([views.evaluation(chw_tensor(to_square(rgb, mode, fill))) for _, rgb in chunk])
            maps = torch.nn.functional.interpolate(
                model.cosine_map(model.encode_image(images), audio).unsqueeze(1),
                size=images.shape[-2:],
                mode="bilinear",
            )[:, 0].numpy()
            for (pts, rgb), m in zip(chunk, maps):
                h, w = rgb.shape[:2]
                box = np.asarray(boxes[min(int(round(pts * fps)), len(boxes) - 1)])
                peak = peak_in_frame(m, mode, h, w)
                hits[mode].append(
                    peak is not None and bool(box[0] <= peak[0] <= box[2] and box[1] <= peak[1] <= box[3])
                )
                chances[mode].append(chance(box, mode, h, w))
    return {
        "video": str(video),
        "frames_scored": len(frames),
        "peak_in_box": {m: round(float(np.mean(v)), 4) for m, v in hits.items()},
        "chance": {m: round(float(np.mean(v)), 4) for m, v in chances.items()},
        "hits": {m: [int(x) for x in v] for m, v in hits.items()},
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
    hits = {m: np.concatenate([c["hits"][m] for c in clips]) for m in MODES}
    # paired (same frames) difference to stretch, 95 % bootstrap over frames (frames of a clip are correlated:
    # the interval is optimistic; the per-clip numbers show the spread)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(hits["stretch"]), (2000, len(hits["stretch"])))
    paired = {
        m: [round(float(v), 4) for v in np.percentile((hits[m][idx] - hits["stretch"][idx]).mean(1), [2.5, 97.5])]
        for m in MODES
        if m != "stretch"
    }
    for c in clips:
        del c["hits"]
    result = {
        "checkpoint": args.checkpoint,
        "image_size": loaded.image.size,
        "frames_scored": int(len(hits["stretch"])),
        "peak_in_box": {m: round(float(v.mean()), 4) for m, v in hits.items()},
        "minus_stretch_95ci": paired,
        "clips": clips,
        "command": "python scripts/aspect_effect.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

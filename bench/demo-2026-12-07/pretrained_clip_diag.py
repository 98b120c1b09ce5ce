"""Peaks of a demo checkpoint on its own clip, offline (torch, no pipeline), at label-space weight 0.25 (the
recipe's), 0 (the learned map alone) and 1000 (the label-space map alone, in effect): how many of every 10th
frame from frame 40 on put the peak inside the sounding object's box. The frame is stretched to the model's
square size and the audio window is the 3 s ending at the frame, as the live path does.

    .venv/bin/python bench/demo-2026-12-07/pretrained_clip_diag.py DEMO_OUT
"""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import torch

from avloc.core.audio import FrontEnd
from avloc.core.checkpoint import load_model


def main(out: str) -> None:
    loaded = load_model(f"{out}/train/best.pt")
    model = loaded.model.eval()
    frontend = FrontEnd(loaded.frontend).eval()
    clip = json.load(open(f"{out}/data/video/clip_0000.json"))
    cap = cv2.VideoCapture(f"{out}/data/video/clip_0000.mp4")
    frames = []
    while (got := cap.read())[0]:
        frames.append(got[1][..., ::-1])
    pcm = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            f"{out}/data/video/clip_0000.mp4",
            "-f",
            "f32le",
            "-ac",
            "1",
            "-ar",
            "16000",
            "-",
        ],
        capture_output=True,
        check=True,
    ).stdout
    wave = np.frombuffer(pcm, np.float32)
    mean, std, size = np.array(loaded.image.mean, np.float32), np.array(loaded.image.std, np.float32), loaded.image.size
    hits = {"0.25": 0, "0": 0, "label-space": 0}
    n = 0
    keep = float(model.labelspace_weight)
    for k in range(40, len(frames), 10):
        x = cv2.resize(frames[k], (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        image = torch.from_numpy(((x - mean) / std).transpose(2, 0, 1).copy())[None]
        end = int(k / 30 * 16000)
        window = np.pad(wave[max(0, end - 48000) : end], (max(0, 48000 - end), 0))
        box = clip["boxes"][k]
        with torch.no_grad():
            v, a = model.encode_image(image), model.encode_audio(frontend(torch.from_numpy(window[None])))
            for name, w in (("0.25", keep), ("0", 0.0), ("label-space", 1000.0)):
                model.labelspace_weight.fill_(w)
                heat = model.cosine_map(v, a)[0].numpy()
                i, j = np.unravel_index(heat.argmax(), heat.shape)
                px, py = (j + 0.5) / heat.shape[1], (i + 0.5) / heat.shape[0]
                hits[name] += int(box[0] <= px <= box[2] and box[1] <= py <= box[3])
        model.labelspace_weight.fill_(keep)
        n += 1
    print({k: f"{v}/{n}" for k, v in hits.items()})


if __name__ == "__main__":
    main(sys.argv[1])

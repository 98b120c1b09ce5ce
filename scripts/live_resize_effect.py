"""How much the live resize (engines' cv2 INTER_AREA) changes a trained model's heatmaps.

Training and ``avloc eval`` resize frames with torchvision's bicubic (antialias); the engine preprocessing
used by the live pipeline resizes with OpenCV's INTER_AREA so that the inference worker needs no torch.
This runs the same checkpoint on the same test scenes both ways and prints the localization metrics:

  .venv/bin/python scripts/live_resize_effect.py --checkpoint runs/results16/full/best.pt --data data/stamps
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch

from avloc.core.checkpoint import load_model
from avloc.core.datasets import load_vggss_json
from avloc.core.metrics import evaluate_maps
from avloc.engines.base import preprocess_frame
from avloc.engines.export import image_manifest
from avloc.train.evaluate import Evaluator, peak_inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=300, help="annotated scenes to use")
    args = parser.parse_args()

    loaded = load_model(args.checkpoint)
    evaluator = Evaluator(loaded, args.data, args.split)
    annotations = load_vggss_json(evaluator.dataset.root / f"{args.split}.json")
    ids = [i for i in evaluator.dataset.ids if i in annotations][: args.limit]
    annotations = {i: annotations[i] for i in ids}
    items = [(i, i, i) for i in ids]  # each image with its own audio

    bicubic = evaluator.run(items, set(), 50).heatmaps
    manifest = {"image": image_manifest(loaded.image, loaded.image.size)}
    evaluator.image_tensor = lambda rgb: torch.from_numpy(  # the live path: BGR frame -> preprocess_frame
        preprocess_frame(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), manifest)
    )
    area = evaluator.run(items, set(), 50).heatmaps

    for name, maps in (("bicubic (train / eval)", bicubic), ("INTER_AREA (live)", area)):
        metrics = evaluate_maps(maps, annotations, binarize="adaptive")
        inside = np.mean([any(peak_inside(maps[i], box) for box in annotations[i].boxes) for i in ids])
        print(f"{name:24s} adaptive cIoU@50 {metrics['ciou_ap50']:.3f}  peak in a GT box {inside:.3f}")
    same = np.mean([np.argmax(bicubic[i]) == np.argmax(area[i]) for i in ids])
    diff = np.median([np.abs(bicubic[i] - area[i]).max() for i in ids])
    print(f"{len(ids)} scenes: same peak pixel {same:.3f}; median of max |cosine difference| {diff:.4f}")


if __name__ == "__main__":
    main()

"""The figures of ``avloc eval``: heatmaps over their images with the boxes (``--grid``) and one panel per heard
object of an audio-swap scene (the paper's Figure 5). Written atomically: a PNG is whole or absent."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

GRID_MAX = 16


def _atomic_savefig(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=80, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _overlay(ax: Any, image: np.ndarray, heatmap: np.ndarray, boxes: list[np.ndarray], colours: list[str]) -> None:
    import cv2

    h, w = image.shape[:2]
    hm = cv2.resize(heatmap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    hm = (hm - hm.min()) / max(float(hm.max() - hm.min()), 1e-8)
    ax.imshow(image)
    ax.imshow(hm, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    for box, colour in zip(boxes, colours):
        x1, y1, x2, y2 = np.clip(box, 0, 1) * [w, h, w, h]
        ax.add_patch(_rectangle((x1, y1), x2 - x1, y2 - y1, colour))
    y, x = np.unravel_index(int(np.argmax(hm)), hm.shape)
    ax.plot([x], [y], marker="+", color="white", markersize=10, mew=2)
    ax.axis("off")


def _rectangle(xy: tuple[float, float], width: float, height: float, colour: str) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle(xy, width, height, fill=False, edgecolor=colour, linewidth=2)


def write_grid(
    path: Path,
    dataset: Any,
    heatmaps: dict[str, np.ndarray],
    annotations: dict[str, Any],
    ids: list[str],
    cious: dict[str, float] | None = None,
) -> None:
    """PNG grid: heatmaps over the images with the GT boxes (green), first ``GRID_MAX`` ids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [i for i in ids if i in heatmaps][:GRID_MAX]
    if not shown:
        return
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, sid in zip(axes.ravel(), shown):
        ann = annotations.get(sid)
        boxes = list(ann.boxes) if ann is not None else []
        _overlay(ax, dataset.image(sid), heatmaps[sid], boxes, ["lime"] * len(boxes))
        title = f"{sid} ({ann.cls})" if ann is not None else sid
        if cious and sid in cious:
            title += f"\ncIoU {cious[sid]:.2f}"
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    _atomic_savefig(fig, path)
    plt.close(fig)


def write_swap_example(path: Path, image: np.ndarray, maps: np.ndarray, objects: list[Any], inside: list[bool]) -> None:
    """PNG: the image, then its heatmap for each object's recording with that object's box (green), the others'
    (white) and whether the peak fell inside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(objects) + 1, figsize=(3 * (len(objects) + 1), 3.2), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=8)
    axes[0, 0].axis("off")
    for ax, hm, obj, ok in zip(axes[0, 1:], maps, objects, inside):
        others = [o.bbox for o in objects if o is not obj]
        _overlay(ax, image, hm, [obj.bbox, *others], ["lime"] + ["white"] * len(others))
        ax.set_title(f"hearing {obj.cls}: {'peak inside' if ok else 'MISSED'}", fontsize=8)
    fig.tight_layout()
    _atomic_savefig(fig, path)
    plt.close(fig)

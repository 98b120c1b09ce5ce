"""``avloc eval-maps``: score saved heatmaps (``DIR/<id>.npy``) with the evaluation protocol.

Any method's maps can be compared this way: write one float32 H x W ``.npy`` per test id (any size; they
are resized bilinearly to 224 x 224), point this command at the annotations, read the JSON.

    avloc eval-maps --heatmaps maps/ --annotations ROOT/test.json --silent ROOT/test_plus_silent.csv \
        --binarize median --out metrics.json

Annotations are a VGG-SS json file, or a folder of Flickr-SoundNet XML files (``<id>.xml``); ``--masks``
adds AVSBench-style binary PNG masks (``<id>.png``) for mIoU / F-score. Silent samples of the Extended
protocol are named by :func:`avloc.core.metrics.silent_sample_id`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avloc.core import metrics
from avloc.core.errors import DataError, UserError

log = logging.getLogger(__name__)


class NpyHeatmaps(Mapping[str, np.ndarray]):
    """``DIR/<id>.npy`` files as a lazy id -> map mapping: each file is read when scored, so thousands of
    maps never sit in memory at once. A bad file raises DataError naming it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"--heatmaps {self.folder}: not a folder")
        self._paths = {p.stem: p for p in sorted(self.folder.glob("*.npy"))}
        if not self._paths:
            raise UserError(f"--heatmaps {self.folder}: no <id>.npy files")

    def __getitem__(self, sample_id: str) -> np.ndarray:
        path = self._paths[sample_id]
        try:
            heatmap = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DataError(path, f"not a readable .npy array ({_first_line(err)})") from None
        if not isinstance(heatmap, np.ndarray) or heatmap.ndim != 2 or heatmap.size == 0:
            raise DataError(path, f"expected a 2-D H x W heatmap, got shape {getattr(heatmap, 'shape', None)}")
        if not np.issubdtype(heatmap.dtype, np.floating) and not np.issubdtype(heatmap.dtype, np.integer):
            raise DataError(path, f"expected a float heatmap, got dtype {heatmap.dtype}")
        if not np.isfinite(heatmap).all():
            raise DataError(path, "heatmap contains NaN or infinite values")
        return heatmap

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


class PngMasks(Mapping[str, np.ndarray]):
    """``DIR/<id>.png`` binary masks (nonzero = sounding object), read lazily as boolean arrays."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"--masks {self.folder}: not a folder")
        self._paths = {p.stem: p for p in sorted(self.folder.glob("*.png"))}
        if not self._paths:
            raise UserError(f"--masks {self.folder}: no <id>.png files")

    def __getitem__(self, sample_id: str) -> np.ndarray:
        path = self._paths[sample_id]
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if mask is None:
            raise DataError(path, "not a readable PNG mask")
        if mask.ndim == 3:
            mask = mask[..., :3].max(axis=2)  # any nonzero colour channel marks the object
        return mask > 0

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


def load_annotations(path: str | Path) -> dict[str, Any]:
    """VGG-SS json -> id -> Annotation; a folder of Flickr XML -> id -> 224x224 consensus GT map."""
    from avloc.core.datasets import load_flickr_xml, load_vggss_json

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.xml"))
        if not files:
            raise UserError(f"--annotations {path}: folder has no Flickr <id>.xml files")
        return {f.stem: metrics.gt_map_flickr(load_flickr_xml(f)) for f in files}
    if not path.is_file():
        raise UserError(f"--annotations {path}: no such file or folder")
    return dict(load_vggss_json(path))


def load_silent_ids(path: str | Path, annotated: set[str]) -> list[str]:
    """Heatmap ids of the non-sounding rows of an Extended csv (``video,audio,non-sounding``)."""
    from avloc.core.datasets import load_silent_csv

    rows = load_silent_csv(path)
    ids = [metrics.silent_sample_id(r.video, r.audio, annotated) for r in rows if r.non_sounding]
    if not ids:
        raise UserError(f"--silent {path}: no non-sounding rows")
    duplicates = sorted(i for i, c in Counter(ids).items() if c > 1)
    if duplicates:
        raise UserError(f"--silent {path}: repeated silent samples {duplicates[:5]}")
    return ids


def load_confidences(path: str | Path) -> dict[str, float]:
    """``{id: confidence}`` from a JSON file, or the ``confidences`` of an ``avloc eval --save-maps`` index."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--confidences {path}: not a readable JSON file ({_first_line(err)})") from None
    if isinstance(data, dict) and "confidences" in data and "format" in data:
        data = data["confidences"]
    if not isinstance(data, dict) or not data:
        raise UserError(f"--confidences {path}: expected a JSON object {{id: number}} (or an eval index with them)")
    bad = [k for k, v in data.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise UserError(f"--confidences {path}: value of {bad[0]!r} is not a number")
    return {str(k): float(v) for k, v in data.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heatmaps", required=True, metavar="DIR", help="folder of <id>.npy float H x W maps")
    parser.add_argument(
        "--annotations",
        metavar="PATH",
        help="VGG-SS json ([{file, class, bbox: [[x1,y1,x2,y2], ...]}], 0..1) or a folder of Flickr <id>.xml",
    )
    parser.add_argument("--silent", metavar="CSV", help="Extended protocol csv (video,audio,non-sounding)")
    parser.add_argument(
        "--binarize",
        default="median",
        metavar="MODE",
        help="median (SSL-Align/LVS, default) | adaptive (predicted area = GT area) | abs:T (ACL, 0..1 maps)",
    )
    parser.add_argument("--masks", metavar="DIR", help="AVSBench-style binary masks <id>.png: adds miou, fscore")
    parser.add_argument("--sweep", action="store_true", help="also score abs:t for t = 0.05..0.95 (ACL) and the best")
    parser.add_argument(
        "--confidences",
        metavar="JSON",
        help="Extended confidence per id from the model (e.g. ACL's cos(v_f, a)): {id: value}, or the "
        "index.json of avloc eval --save-maps; default: the top-25%% heatmap mean",
    )
    parser.add_argument("--per-sample", action="store_true", help="write each sample's cIoU and confidence too")
    parser.add_argument("--out", required=True, metavar="FILE.json", help="metrics JSON to write")


def main(args: argparse.Namespace) -> int:
    if args.annotations is None and args.masks is None:
        raise UserError("give --annotations FILE.json|XML_DIR and/or --masks DIR")
    mode = metrics.parse_binarize(args.binarize)
    heatmaps = NpyHeatmaps(args.heatmaps)
    annotations = load_annotations(args.annotations) if args.annotations else {}
    masks = PngMasks(args.masks) if args.masks else None
    annotated = set(annotations) | set(masks or ())
    silent = load_silent_ids(args.silent, annotated) if args.silent else None
    confidences = load_confidences(args.confidences) if args.confidences else None
    result = metrics.evaluate_maps(
        heatmaps,
        annotations,
        silent=silent,
        binarize=mode,
        masks=masks,
        sweep=args.sweep,
        per_sample=args.per_sample,
        confidences=confidences,
    )
    result["sources"] = {
        "heatmaps": str(args.heatmaps),
        "annotations": args.annotations,
        "silent": args.silent,
        "masks": args.masks,
        "confidences": args.confidences,
    }
    print(format_table(result))
    if mode.kind == "median" and result["median_capped"] > 0.25:
        log.warning(
            "%.0f%% of the GT regions cover under a quarter of the image: under `median` their cIoU cannot "
            "reach 0.5; report --binarize adaptive too",
            100 * result["median_capped"],
        )
    write_json_atomic(args.out, result)
    return 0


def format_table(result: dict[str, Any]) -> str:
    """Human-readable summary of :func:`avloc.core.metrics.evaluate_maps` output."""
    lines = [f"samples {result['n']} sounding, {result['n_silent']} silent; binarize {result['binarize']}"]
    keys = [
        "ciou_ap50",
        "ciou_mean",
        "auc",
        "ext_ap",
        "ext_max_f1",
        "ext_loc_acc",
        "miou",
        "fscore",
        "gt_area_mean",
        "median_capped",
    ]
    lines += [f"  {k:<14} {result[k]:8.4f}" for k in keys if k in result]
    if "sweep" in result:
        has_miou = "miou" in result["sweep"]["rows"][0]
        lines.append("  abs:t sweep      t   ciou_ap50  ciou_mean    auc" + ("     miou" if has_miou else ""))
        for row in result["sweep"]["rows"]:
            extra = f"  {row['miou']:7.4f}" if has_miou else ""
            lines.append(
                f"  {'':<12} {row['t']:5.2f}   {row['ciou_ap50']:7.4f}   {row['ciou_mean']:7.4f}"
                f"  {row['auc']:7.4f}{extra}"
            )
        best = result["sweep"]["best"]
        lines.append(f"  best by {result['sweep']['select']}: t = {best['t']:.2f}")
    return "\n".join(lines)


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON to a temp file beside ``path`` and rename it over, so no half-written file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_finite_or_null(data), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite_or_null(value: Any) -> Any:
    # strict JSON: a metric that is undefined (NaN, e.g. F-score with only empty masks) becomes null
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else err.__class__.__name__

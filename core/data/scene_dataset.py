"""Dataset writing shared by ``avloc data stamps|synth``: plan the samples of every split, render them in
worker processes and write the layout of docs/architecture.md ("Dataset layout").

Every sample is drawn from its own generator seeded with ``(seed, split, index)``, so the bytes written do
not depend on the number of worker processes.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from avloc.core.data.scene_video import render_video
from avloc.core.data.scenes import (
    MAX_BOX_IOU,
    MAX_OCCLUSION,
    SAMPLE_RATE,
    SPLIT_CODES,
    UNSEEN_SPLITS,
    Scene,
    SceneLibrary,
    SceneParams,
    compose_scene,
    render_clip,
    write_wav,
)
from avloc.core.errors import UserError
from avloc.core.media import video_codec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleSpec:
    """A sample to render; ``sounding`` is None for a silent scene, whose audio is ``heard`` (off-screen)."""

    id: str
    split: str
    index: int
    sounding: str | None
    heard: str
    banned: tuple[str, ...] = ()  # categories that may not appear in the image at all
    paired_with: str | None = None  # silent scenes: the test id whose audio is heard in test_plus_silent.csv


def _balanced(pool: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` categories cycling through a shuffled ``pool`` (equal counts within one), then shuffled."""
    if n <= 0:
        return []
    reps = -(-n // len(pool))
    drawn = [pool[int(i)] for i in np.concatenate([rng.permutation(len(pool)) for _ in range(reps)])[:n]]
    return [drawn[int(i)] for i in rng.permutation(n)]


def plan_samples(
    categories: list[str],
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    silent_frac: float,
    unheard_frac: float,
    videos: int,
) -> tuple[list[SampleSpec], list[str]]:
    """Every sample to render, with its sounding category; returns (specs, unheard categories)."""
    cats = sorted(categories)
    plan_rng = np.random.default_rng([seed, 0])
    n_unheard = round(unheard_frac * len(cats))
    if unheard_frac and not 0 < n_unheard < len(cats):
        raise UserError(
            f"--unheard-frac {unheard_frac}: gives {n_unheard} of {len(cats)} categories; "
            "expected at least one heard and one unheard category"
        )
    unheard = sorted(str(c) for c in plan_rng.choice(cats, size=n_unheard, replace=False)) if n_unheard else []
    heard = [c for c in cats if c not in unheard]
    specs: list[SampleSpec] = []
    # Unheard categories never appear in train/val, neither sounding nor as distractors (strict open set).
    for split, n, pool, banned in (
        ("train", n_train, heard, tuple(unheard)),
        ("val", n_val, heard, tuple(unheard)),
        ("test", n_test, cats, ()),
    ):
        for i, c in enumerate(_balanced(pool, n, np.random.default_rng([seed, SPLIT_CODES[split], 1 << 30]))):
            specs.append(SampleSpec(f"{split}_{i:05d}", split, i, c, c, banned))
    tests = [s for s in specs if s.split == "test"]
    n_silent = round(silent_frac * n_test)
    silent_rng = np.random.default_rng([seed, SPLIT_CODES["silent"], 1 << 30])
    for j in range(n_silent):
        other = tests[int(silent_rng.integers(len(tests)))]
        specs.append(SampleSpec(f"silent_{j:05d}", "silent", j, None, other.heard, (other.heard,), other.id))
    for j, c in enumerate(_balanced(cats, videos, np.random.default_rng([seed, SPLIT_CODES["video"], 1 << 30]))):
        specs.append(SampleSpec(f"clip_{j:04d}", "video", j, c, c))
    return specs, unheard


def plan_unseen(held: dict[str, dict[str, list[str]]], seed: int, n_unseen: int) -> list[SampleSpec]:
    """``n_unseen`` scenes per open-set split, sounding categories cycling through its held-out ones."""
    specs = []
    for split in UNSEEN_SPLITS:
        rng = np.random.default_rng([seed, SPLIT_CODES[split], 1 << 30])
        for i, c in enumerate(_balanced(sorted(held[split]), n_unseen, rng)):
            specs.append(SampleSpec(f"{split}_{i:05d}", split, i, c, c))
    return specs


class AssetViews:
    """Which assets a sample draws from. Without a holdout: the whole library. With one (``held``: split ->
    category -> held-out stamps): every scene's objects come from the seen stamps only, except the sounding
    object of a val_unseen / test_unseen scene, whose picture and recording are that split's held-out stamps."""

    def __init__(self, library: SceneLibrary, held: dict[str, dict[str, list[str]]] | None) -> None:
        self.held = held
        self.full = library
        if held is None:
            self.seen = library
            return
        out = {s for split in held.values() for stamps in split.values() for s in stamps}
        members: dict[str, list[str]] = library.members  # type: ignore[attr-defined]
        self.seen_members = {c: [m for m in ms if m not in out] for c, ms in members.items()}
        self.seen = library.restricted(self.seen_members)  # type: ignore[attr-defined]
        self._views: dict[tuple[str, str], SceneLibrary] = {}

    def for_spec(self, spec: SampleSpec) -> SceneLibrary:
        if self.held is None or spec.split not in UNSEEN_SPLITS or spec.sounding is None:
            return self.seen
        key = (spec.split, spec.sounding)
        if key not in self._views:
            members = {**self.seen_members, spec.sounding: self.held[spec.split][spec.sounding]}
            self._views[key] = self.full.restricted(members)  # type: ignore[attr-defined]
        return self._views[key]


_WORKER: dict[str, Any] = {}


def _init_worker(
    library_factory: Callable[[], SceneLibrary],
    params: SceneParams,
    root: str,
    seed: int,
    held: dict[str, dict[str, list[str]]] | None,
) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER.update(views=AssetViews(library_factory(), held), params=params, root=Path(root), seed=seed)


def _sound_clip(library: SceneLibrary, category: str, rng: np.random.Generator, params: SceneParams) -> np.ndarray:
    return render_clip(library.sound(category, rng, params.num_samples), rng, params)


def render_sample(
    spec: SampleSpec, library: SceneLibrary, params: SceneParams, seed: int, root: Path
) -> tuple[dict[str, Any], Scene | None]:
    """Render and write one sample's files under ``root``; returns its record (and the scene, for tests)."""
    rng = np.random.default_rng([seed, SPLIT_CODES[spec.split], spec.index])
    if spec.split == "video":
        boxes = render_video(library, rng, spec.heard, params, root / "video" / f"{spec.id}.mp4")
        tmp = root / "video" / f"{spec.id}.json.part"
        tmp.write_text(json.dumps({"fps": params.video_fps, "class": spec.heard, "boxes": boxes}))
        os.replace(tmp, root / "video" / f"{spec.id}.json")
        return {"id": spec.id, "split": spec.split, "class": spec.heard, "frames": len(boxes)}, None
    scene = compose_scene(library, rng, spec.sounding, params.distractors, set(spec.banned), params)
    if not cv2.imwrite(
        str(root / "frames" / f"{spec.id}.jpg"),
        cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR),
        [cv2.IMWRITE_JPEG_QUALITY, params.jpeg_quality],
    ):
        raise OSError(f"{root / 'frames' / spec.id}.jpg: could not write the image")
    # A silent scene's own wav is also the off-screen sound, so either pairing of it stays "silent".
    write_wav(root / "audio" / f"{spec.id}.wav", _sound_clip(library, spec.heard, rng, params))
    objects = []
    for k, obj in enumerate(scene.objects):
        if obj.sounding:
            audio = f"audio/{spec.id}.wav"
        else:
            audio = f"swap/{spec.id}_{k}.wav"
            if spec.split in ("val", "test", *UNSEEN_SPLITS):
                write_wav(root / audio, _sound_clip(library, obj.category, rng, params))
        objects.append({"class": obj.category, "bbox": list(obj.box), "sounding": obj.sounding, "audio": audio})
    record: dict[str, Any] = {"id": spec.id, "split": spec.split, "class": spec.heard, "objects": objects}
    if spec.paired_with is not None:
        record["paired_with"] = spec.paired_with
    if spec.sounding is not None:
        x1, y1, x2, y2 = scene.objects[0].box
        record["bbox"] = [list(scene.objects[0].box)]
        record["area"] = (x2 - x1) * (y2 - y1)
    return record, scene


def _render_task(spec: SampleSpec) -> dict[str, Any]:
    library = _WORKER["views"].for_spec(spec)
    record, _ = render_sample(spec, library, _WORKER["params"], _WORKER["seed"], _WORKER["root"])
    return record


def _area_stats(areas: list[float]) -> dict[str, float]:
    if not areas:
        return {}
    a = np.asarray(areas)
    return {
        "mean": round(float(a.mean()), 4),
        "median": round(float(np.median(a)), 4),
        "frac_ge_0.25": round(float((a >= 0.25).mean()), 4),
        "min": round(float(a.min()), 4),
        "max": round(float(a.max()), 4),
    }


def _write_text(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def write_preview(root: Path, records: list[dict[str, Any]], path: Path, rows: int = 4, cols: int = 6) -> None:
    """Contact sheet of the first rows x cols records with the ground-truth box (green) and class."""
    tile = 256
    sheet = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    for n, rec in enumerate(records[: rows * cols]):
        img = cv2.imread(str(root / "frames" / f"{rec['id']}.jpg"))
        img = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_LINEAR)
        for x1, y1, x2, y2 in rec.get("bbox", []):
            cv2.rectangle(
                img,
                (round(x1 * tile), round(y1 * tile)),
                (round(x2 * tile) - 1, round(y2 * tile) - 1),
                (0, 255, 0),
                2,
            )
        label = f"{rec['id']}: {rec['class']}"
        cv2.putText(img, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(img, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        r, c = divmod(n, cols)
        sheet[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = img
    cv2.imwrite(str(path), sheet)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: folder is not empty (pass --overwrite to replace it)")


def _install(tmp: Path, out: Path) -> None:
    """Move the finished temp folder to ``out`` (replacing an old one only after the new one is complete)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def generate_dataset(
    out: str | Path,
    library_factory: Callable[[], SceneLibrary],
    *,
    generator: str,
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    silent_frac: float = 0.0,
    unheard_frac: float = 0.0,
    videos: int = 0,
    preview: bool = False,
    workers: int = 2,
    overwrite: bool = False,
    params: SceneParams = SceneParams(),
    progress: bool = True,
    holdout_assets: float = 0.0,
    n_unseen: int = 200,
) -> Path:
    """Render and write a whole dataset into ``out`` (via a temp folder next to it, renamed at the end).

    ``holdout_assets`` > 0 (stamps only): the open-set benchmark by asset, see ``StampLibrary.holdout``;
    ``n_unseen`` scenes each in val_unseen and test_unseen."""
    out = Path(out)
    for name, value in (
        ("--n-train", n_train),
        ("--n-val", n_val),
        ("--n-test", n_test),
        ("--videos", videos),
        ("--distractors", params.distractors),
    ):
        if value < 0:
            raise UserError(f"{name} {value}: expected a count >= 0")
    for name, value in (("--silent-frac", silent_frac), ("--unheard-frac", unheard_frac)):
        if not 0 <= value < 1:
            raise UserError(f"{name} {value}: expected a fraction in [0, 1)")
    if params.image_size < 32 or params.clip_seconds <= 0:
        raise UserError(
            f"--image-size {params.image_size} / --clip-seconds {params.clip_seconds}: "
            "expected a size >= 32 and a positive length"
        )
    _check_out(out, overwrite)
    library = library_factory()  # also validates the source material before any work starts
    held = None
    if holdout_assets:
        if not hasattr(library, "holdout"):
            raise UserError(f"--holdout-assets {holdout_assets}: only `avloc data stamps` has assets to hold out")
        if unheard_frac:
            raise UserError("--holdout-assets and --unheard-frac: pick one open-set protocol")
        if n_unseen < 1:
            raise UserError(f"--n-unseen {n_unseen}: expected >= 1 with --holdout-assets")
        held = library.holdout(seed, holdout_assets)
    views = AssetViews(library, held)
    library = views.seen
    specs, unheard = plan_samples(library.categories, seed, n_train, n_val, n_test, silent_frac, unheard_frac, videos)
    if held is not None:
        specs += plan_unseen(held, seed, n_unseen)
    heard_count = len(library.categories) - len(unheard)
    if n_train + n_val and heard_count - 1 < params.distractors:
        raise UserError(
            f"--distractors {params.distractors}: train/val scenes have only {heard_count - 1} other "
            "categories to draw from"
        )
    if any(s.split == "silent" for s in specs) and len(library.categories) - 1 < params.distractors + 1:
        raise UserError(
            f"--silent-frac {silent_frac}: a silent scene holds {params.distractors + 1} objects (--distractors "
            f"+ 1), none of its paired clip's category; there are only {len(library.categories) - 1} others"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for sub in ("frames", "audio", "swap") + (("video",) if videos else ()):
            (tmp / sub).mkdir(parents=True)
        records = _render_all(specs, views, library_factory, held, params, seed, tmp, workers, progress)
        _write_layout(
            tmp,
            records,
            library,
            unheard,
            generator=generator,
            seed=seed,
            params=params,
            silent_frac=silent_frac,
            unheard_frac=unheard_frac,
            held=held,
        )
        if preview:
            shown = [r for r in records if r["split"] == "test"] or [r for r in records if "bbox" in r]
            write_preview(tmp, shown, tmp / "preview.png")
        _check_out(out, overwrite)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _render_all(
    specs: list[SampleSpec],
    views: AssetViews,
    library_factory: Callable[[], SceneLibrary],
    held: dict[str, dict[str, list[str]]] | None,
    params: SceneParams,
    seed: int,
    root: Path,
    workers: int,
    progress: bool,
) -> list[dict[str, Any]]:
    bar = tqdm(total=len(specs), desc="rendering", unit="sample", disable=not progress)
    records: list[dict[str, Any]] = []
    try:
        if workers <= 1:
            for spec in specs:
                records.append(render_sample(spec, views.for_spec(spec), params, seed, root)[0])
                bar.update()
            return records
        # spawn: workers start clean (no forked torch thread pools); each decodes the source material once.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, _init_worker, (library_factory, params, str(root), seed, held)) as pool:
            for record in pool.imap(_render_task, specs, chunksize=4):
                records.append(record)
                bar.update()
        return records
    finally:
        bar.close()


def _write_layout(
    root: Path,
    records: list[dict[str, Any]],
    library: SceneLibrary,
    unheard: list[str],
    *,
    generator: str,
    seed: int,
    params: SceneParams,
    silent_frac: float,
    unheard_frac: float,
    held: dict[str, dict[str, list[str]]] | None = None,
) -> None:
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLIT_CODES}
    for rec in records:
        by_split[rec["split"]].append(rec)
    unseen = UNSEEN_SPLITS if held is not None else ()
    for split in ("train", "val", "test", *unseen):
        _write_text(root / f"{split}.txt", [r["id"] for r in by_split[split]])
    for split in unseen:  # the breakdown: new photo + recording of a trained category, or a category never trained
        ids = {
            kind: [r["id"] for r in by_split[split] if (r["class"] in library.categories) == (kind == "new_instance")]
            for kind in ("new_instance", "unseen_category")
        }
        for kind, kind_ids in ids.items():
            _write_text(root / f"{split}_{kind}.txt", kind_ids)
    for split in ("val", "test", *unseen):
        entries = [
            {"file": r["id"], "class": r["class"], "bbox": r["bbox"], "objects": r["objects"]} for r in by_split[split]
        ]
        (root / f"{split}.json").write_text(json.dumps(entries, indent=1))
    with open(root / "test_plus_silent.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["video", "audio", "non-sounding"])
        for r in by_split["test"]:
            writer.writerow([r["id"], r["id"], 0])
        paired = {s: p for s, p in _silent_pairs(records)}
        for r in by_split["silent"]:
            writer.writerow([r["id"], paired[r["id"]], 1])
    if unheard:
        _write_text(root / "test_heard.txt", [r["id"] for r in by_split["test"] if r["class"] not in unheard])
        _write_text(root / "test_unheard.txt", [r["id"] for r in by_split["test"] if r["class"] in unheard])
    # Every category of the dataset, held-out ones included (labels.csv names them); meta.json lists the seen ones.
    held_categories = {c for split in (held or {}).values() for c in split}
    _write_text(root / "classes.txt", sorted(set(library.categories) | held_categories))
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "class"])
        for split in ("train", "val", "test", "silent", *unseen):
            for r in by_split[split]:
                writer.writerow([r["id"], r["class"]])
    meta = {
        "generator": generator,
        "seed": seed,
        "sample_rate": SAMPLE_RATE,
        "clip_seconds": params.clip_seconds,
        "image_size": [params.image_size, params.image_size],
        "counts": {s: len(v) for s, v in by_split.items()},
        "params": {**asdict(params), "silent_frac": silent_frac, "unheard_frac": unheard_frac},
        "categories": sorted(set(library.categories) | held_categories),
        "seen_categories": sorted(library.categories) if held else None,
        "unheard_categories": unheard,
        "holdout_assets": held,
        "sounding_box_area_fraction": {
            s: _area_stats([r["area"] for r in by_split[s]]) for s in ("train", "val", "test")
        },
        "video": {
            "codec": video_codec("clip.mp4"),
            "fps": params.video_fps,
            "size": list(params.video_size),
            "seconds": params.video_seconds,
        }
        if by_split["video"]
        else None,
        "design": {
            "objects": "one sounding object + `distractors` silent objects of other categories; pairwise "
            f"box IoU <= {MAX_BOX_IOU}; the sounding object is at most {MAX_OCCLUSION:.0%} occluded",
            "bbox": "tight box of the placed object's alpha > 0.5, clipped to the image, normalized",
            "scale": "s = sqrt(object box area / image area), uniform in object_scale for every object, "
            "placed in random order (an object is shrunk only when no position fits)",
            "silent": "silent_* scenes hold distractors+1 objects, none of the category of the test clip "
            "they are paired with in test_plus_silent.csv; their own audio/<id>.wav is a recording of that "
            "absent category too; labels.csv gives that (absent) category",
            "unheard": "unheard categories never appear in train/val images (sounding or distractor)",
            "holdout_assets": "open set by asset: the held-out stamps (picture and recording) appear only as the "
            "sounding object of val_unseen / test_unseen scenes (disjoint stamp sets); every other object of every "
            "scene is a seen stamp; <split>_new_instance.txt lists scenes whose category keeps other stamps in "
            "training, <split>_unseen_category.txt those whose category has none",
            "swap": "objects[k].audio of a distractor is swap/<id>_<k>.wav, a recording of its category",
        },
        "source": library.describe(),
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=1))


def _silent_pairs(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["id"], r["paired_with"]) for r in records if r["split"] == "silent"]


# ---------------------------------------------------------------------------------------------- CLI


def add_common_arguments(parser: Any, *, image_size: int, n_train: int, n_val: int, n_test: int) -> None:
    """Flags shared by ``avloc data stamps`` and ``avloc data synth``."""
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> same bytes (any --workers)")
    parser.add_argument("--n-train", type=int, default=n_train, help="training scenes (default %(default)s)")
    parser.add_argument("--n-val", type=int, default=n_val, help="validation scenes (default %(default)s)")
    parser.add_argument("--n-test", type=int, default=n_test, help="test scenes (default %(default)s)")
    parser.add_argument("--distractors", type=int, default=2, help="silent objects per scene (default %(default)s)")
    parser.add_argument(
        "--silent-frac",
        type=float,
        default=0.2,
        help="silent scenes for the Extended protocol, as a fraction of --n-test (default %(default)s)",
    )
    parser.add_argument(
        "--unheard-frac",
        type=float,
        default=0.0,
        help="fraction of categories held out of train/val for open-set tests (default 0: none)",
    )
    parser.add_argument(
        "--holdout-assets",
        type=float,
        default=0.0,
        help="stamps only: open-set split by asset; one stamp of each multi-stamp category and this fraction of "
        "the single-stamp categories are held out of train/val/test and make val_unseen / test_unseen "
        "(default 0: none; the open-set benchmark uses 0.2)",
    )
    parser.add_argument(
        "--n-unseen", type=int, default=200, help="scenes in each of val_unseen / test_unseen (default %(default)s)"
    )
    parser.add_argument("--videos", type=int, default=0, help="also write this many mp4 clips with a moving object")
    parser.add_argument("--video-size", default="640x480", help="WIDTHxHEIGHT of the clips (default %(default)s)")
    parser.add_argument("--video-seconds", type=float, default=6.0, help="clip length (default %(default)s)")
    parser.add_argument("--video-fps", type=int, default=30, help="clip frame rate (default %(default)s)")
    parser.add_argument("--preview", action="store_true", help="write OUT/preview.png (test scenes with boxes)")
    parser.add_argument("--image-size", type=int, default=image_size, help="square image side (default %(default)s)")
    parser.add_argument("--clip-seconds", type=float, default=3.0, help="audio length (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def parse_video_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--video-size {text!r}: expected WIDTHxHEIGHT, e.g. 640x480") from None
    if width < 32 or height < 32 or width % 2 or height % 2:
        raise UserError(f"--video-size {text!r}: expected even sides >= 32")
    return width, height


def params_from_args(args: Any) -> SceneParams:
    return SceneParams(
        image_size=args.image_size,
        clip_seconds=args.clip_seconds,
        distractors=args.distractors,
        video_size=parse_video_size(args.video_size),
        video_fps=args.video_fps,
        video_seconds=args.video_seconds,
    )

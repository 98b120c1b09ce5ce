"""``avloc data gcompris``: an external test set of new photos and new recordings of farm animals.

A model trained on ``avloc data stamps`` sees one cut-out and one recording per category (issue 20), so its
test split measures recall of known pairs. This set holds **other individuals and other recordings** of the
same kinds of animals, from another Debian package, composed into scenes with the very same rules and
layout as a stamps test split, so ``avloc eval --data DIR`` scores it unchanged. It is a test set only:
it has no train/val scenes and must never select a checkpoint or a design choice.

Source: Debian ``gcompris-qt-data``, whose files are packed in Qt resource bundles
(``/usr/share/gcompris-qt/rcc/*.rcc``, read by :mod:`avloc.core.data.qt_resources`):

- ``explore_farm_animals.rcc``: one Wikimedia Commons photo (public domain / CC0) and one recording (GCompris,
  GPLv3) of each of cat, chicken, cow, dog, duck, horse, owl, pig and sheep. The activity plays these
  recordings as the animal's call; its spoken names and descriptions are separate voice packages, not in
  this bundle.
- ``erase.rcc``: more photos (1920x1080) of a calf, a horse and a kitten.
- ``memory-sound.rcc``: two more dog recordings (``LRBark_1``, ``LRBark_3``; Free Art License). Its frog
  recording has no frog photo, and its other sounds are not animals: unused.

``explore_world_animals.rcc`` has photos but no sounds; ``lang.rcc``'s animals are drawings; KTuberling
(``ktuberling-data``) ships spoken words and drawings only: none of those is used. None of the recordings
is or contains a tuxpaint stamp's recording (sliding normalized cross-correlation <= 0.43 against every
stamp, where a copy scores >= 0.99; docs/external_test.md).

Placement: the photos are full rectangular photos, not cut-outs. Each photo is cropped to a box drawn by
hand around the animal(s) (``PHOTOS``; a herd or a flock stays one object, as its recording is the group's),
and the crop is pasted as an opaque rectangle, so the ground-truth box is the pasted rectangle and it
covers the animal with a small margin of its own photo's background. Every other rule is the stamps
test split's (:func:`avloc.core.data.scenes.compose_scene`): procedural background, blurred clutter of
other categories, one sounding object and two distractors of other categories, scale, flip, colour
jitter, at most 0.3 box IoU, at most 20 % of the sounding object hidden, 3-s clips looped or cropped at a
random gain with sometimes low noise, silent scenes and audio-swap recordings.

Category names are the stamps' where the kind exists (chicken -> ``hen``, as the stamps call a chicken);
``--train-classes`` (a training dataset's classes.txt) decides which are seen in training, and the set's
``test_heard.txt`` / ``test_unheard.txt`` split the scenes by it so ``avloc eval`` reports both.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avloc.core.data import scene_dataset, scenes, stamps
from avloc.core.data.qt_resources import QtResourceBundle
from avloc.core.errors import DataError, UserError

DEFAULT_RCC_DIR = Path("/usr/share/gcompris-qt/rcc")
RCC_DIR_ENV = "AVLOC_GCOMPRIS_DIR"
APT_HINT = "install it with `sudo apt-get install gcompris-qt-data`"
PACKAGE = "gcompris-qt-data"
FARM = "gcompris/src/activities/explore_farm_animals/resource/animals"
ERASE = "gcompris/src/activities/erase/resource"
MEMORY_SOUND = "gcompris/src/activities/memory-sound/resource"
# GCompris name -> the stamps' category name for the same kind of sound source.
STAMPS_NAMES = {"chicken": "hen"}


@dataclass(frozen=True)
class Photo:
    bundle: str  # file name under the rcc folder
    path: str  # resource path inside the bundle
    category: str
    box: tuple[float, float, float, float]  # hand-drawn box of the animal(s), x1 y1 x2 y2 as photo fractions


@dataclass(frozen=True)
class Recording:
    bundle: str
    path: str
    category: str


# Boxes drawn by looking at each photo over a 10 % grid (gcompris-qt-data 3.1-2), with a margin of a few %.
PHOTOS = (
    Photo("explore_farm_animals.rcc", f"{FARM}/cat.webp", "cat", (0.18, 0.13, 1.0, 0.74)),
    Photo("explore_farm_animals.rcc", f"{FARM}/chicken.webp", "hen", (0.04, 0.10, 0.98, 0.89)),
    Photo("explore_farm_animals.rcc", f"{FARM}/cow.webp", "cow", (0.22, 0.37, 0.91, 0.91)),
    Photo("explore_farm_animals.rcc", f"{FARM}/dog.webp", "dog", (0.04, 0.03, 0.89, 0.95)),
    Photo("explore_farm_animals.rcc", f"{FARM}/duck.webp", "duck", (0.11, 0.20, 0.81, 0.90)),
    Photo("explore_farm_animals.rcc", f"{FARM}/horse.webp", "horse", (0.12, 0.29, 0.89, 0.86)),
    Photo("explore_farm_animals.rcc", f"{FARM}/owl.webp", "owl", (0.52, 0.19, 0.81, 0.95)),
    Photo("explore_farm_animals.rcc", f"{FARM}/pig.webp", "pig", (0.15, 0.22, 0.63, 0.84)),
    Photo("explore_farm_animals.rcc", f"{FARM}/sheep.webp", "sheep", (0.22, 0.10, 0.72, 0.91)),
    Photo("erase.rcc", f"{ERASE}/calf.webp", "cow", (0.09, 0.09, 1.0, 1.0)),
    Photo("erase.rcc", f"{ERASE}/horse.webp", "horse", (0.09, 0.09, 0.62, 0.97)),
    Photo("erase.rcc", f"{ERASE}/kitten.webp", "cat", (0.33, 0.19, 0.67, 0.90)),
)
RECORDINGS = (
    Recording("explore_farm_animals.rcc", f"{FARM}/cat.ogg", "cat"),
    Recording("explore_farm_animals.rcc", f"{FARM}/chickens.ogg", "hen"),
    Recording("explore_farm_animals.rcc", f"{FARM}/cow.ogg", "cow"),
    Recording("explore_farm_animals.rcc", f"{FARM}/dog.ogg", "dog"),
    Recording("explore_farm_animals.rcc", f"{FARM}/duck.ogg", "duck"),
    Recording("explore_farm_animals.rcc", f"{FARM}/horse.ogg", "horse"),
    Recording("explore_farm_animals.rcc", f"{FARM}/owl.ogg", "owl"),
    Recording("explore_farm_animals.rcc", f"{FARM}/pig.ogg", "pig"),
    Recording("explore_farm_animals.rcc", f"{FARM}/sheep.ogg", "sheep"),
    Recording("memory-sound.rcc", f"{MEMORY_SOUND}/LRBark_1_LA_cut.ogg", "dog"),
    Recording("memory-sound.rcc", f"{MEMORY_SOUND}/LRBark_3_LA_cut.ogg", "dog"),
)


def rcc_dir(path: str | Path | None = None) -> Path:
    """The bundles' folder: ``path``, else ``$AVLOC_GCOMPRIS_DIR``, else the Debian location."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(RCC_DIR_ENV) or DEFAULT_RCC_DIR)


def read_train_classes(path: str | Path | None) -> tuple[tuple[str, ...], str] | None:
    """(classes, where they came from): a classes.txt, else the installed stamps' names; None if neither."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--train-classes {path}: not a file (expected a training dataset's classes.txt)")
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        if not names:
            raise UserError(f"--train-classes {path}: no class names (expected one per line)")
        return names, str(path)
    root = stamps.stamps_dir()
    if not root.is_dir():
        return None
    found, _ = stamps.find_stamps(root)
    # By stamp name only (no decoding): categories merged by identical recordings keep their own names here.
    names = tuple(sorted({stamps.NAME_GROUPS.get(name, name) for name, _, _ in found}))
    return names, f"names of the tuxpaint stamps in {root}"


def _crop_photo(data: bytes, box: tuple[float, float, float, float], max_side: int, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(where, f"unreadable image ({err})") from None
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
    crop = rgb[y1:y2, x1:x2]
    if crop.shape[0] < 8 or crop.shape[1] < 8:
        raise DataError(where, f"crop box {box} leaves {crop.shape[1]}x{crop.shape[0]} px of a {w}x{h} photo")
    scale = min(1.0, max_side / max(crop.shape[:2]))
    if scale < 1:  # keep memory small: a sprite is never drawn larger than max_side
        crop = cv2.resize(crop, (round(crop.shape[1] * scale), round(crop.shape[0] * scale)), cv2.INTER_AREA)
    rgba = np.ones((*crop.shape[:2], 4), np.float32)
    rgba[..., :3] = crop.astype(np.float32) / 255
    return rgba  # an opaque rectangle: its box is the whole tile


class GcomprisLibrary:
    """:class:`avloc.core.data.scenes.SceneLibrary` over the photos and recordings of ``PHOTOS``/``RECORDINGS``.

    A category is used when at least one of its photos and one of its recordings are in the bundles; the
    rest is listed in :attr:`skipped` (and meta.json) with the reason.
    """

    kind = "gcompris"

    def __init__(
        self,
        root: str | Path | None = None,
        max_side: int = 256,
        train_classes: tuple[tuple[str, ...], str] | None = None,
    ) -> None:
        from avloc.core.audio import load_audio

        self.root = rcc_dir(root)
        if not self.root.is_dir():
            raise UserError(
                f"GCompris data not found: {self.root} is not a folder; {APT_HINT} "
                f"(or set {RCC_DIR_ENV} to a folder of GCompris .rcc bundles)"
            )
        self.skipped: dict[str, str] = {}
        bundles: dict[str, QtResourceBundle | None] = {}

        def entry(bundle: str, path: str) -> bytes | None:
            if bundle not in bundles:
                file = self.root / bundle
                bundles[bundle] = QtResourceBundle.open(file) if file.is_file() else None
            rcc = bundles[bundle]
            key = f"{bundle}:{path}"
            if rcc is None:
                self.skipped[key] = "bundle not found"
                return None
            if path not in rcc:
                self.skipped[key] = "not in the bundle"
                return None
            return rcc.read(path)

        photos: dict[str, list[np.ndarray]] = {}
        self._photo_names: dict[str, list[str]] = {}
        for p in PHOTOS:
            data = entry(p.bundle, p.path)
            if data is not None:
                photos.setdefault(p.category, []).append(_crop_photo(data, p.box, max_side, f"{p.bundle}:{p.path}"))
                self._photo_names.setdefault(p.category, []).append(f"{p.bundle}:{p.path}")
        sounds: dict[str, list[np.ndarray]] = {}
        self._sound_names: dict[str, list[str]] = {}
        self._seconds: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="avloc-gcompris-") as tmp:
            for r in RECORDINGS:
                data = entry(r.bundle, r.path)
                if data is None:
                    continue
                key = f"{r.bundle}:{r.path}"
                file = Path(tmp) / Path(r.path).name
                file.write_bytes(data)
                try:  # the decoder the stamps use (same resampling and clipping)
                    wave = load_audio(file, scenes.SAMPLE_RATE)
                except DataError as err:
                    raise DataError(key, err.problem) from None
                peak = float(np.abs(wave).max())
                if peak < stamps.SILENT_PEAK:
                    self.skipped[key] = "silent recording"
                    continue
                sounds.setdefault(r.category, []).append((wave / peak).astype(np.float32))
                self._sound_names.setdefault(r.category, []).append(key)
                self._seconds[key] = round(len(wave) / scenes.SAMPLE_RATE, 2)
        for category in sorted(set(photos) ^ set(sounds)):
            self.skipped[category] = (
                "category without a photo" if category in sounds else "category without a recording"
            )
        self.categories = sorted(set(photos) & set(sounds))
        if len(self.categories) < stamps.MIN_CATEGORIES:
            raise UserError(
                f"GCompris data in {self.root}: {len(self.categories)} usable animal categories, expected at "
                f"least {stamps.MIN_CATEGORIES} (is {PACKAGE} complete? {APT_HINT})"
            )
        self._photos = {c: photos[c] for c in self.categories}
        self._sounds = {c: sounds[c] for c in self.categories}
        self.train_classes = train_classes

    def sprite(self, category: str, rng: np.random.Generator) -> np.ndarray:
        tiles = self._photos[category]
        return tiles[int(rng.integers(len(tiles)))]

    def sound(self, category: str, rng: np.random.Generator, num_samples: int) -> np.ndarray:
        waves = self._sounds[category]
        return scenes.crop_or_loop(waves[int(rng.integers(len(waves)))], num_samples, rng)

    def clutter(self, rng: np.random.Generator, exclude: set[str]) -> list[np.ndarray]:
        pool = [c for c in self.categories if c not in exclude]
        picked = rng.choice(pool, size=min(int(rng.integers(1, 4)), len(pool)), replace=False) if pool else []
        return [self.sprite(str(c), rng) for c in picked]

    def overlap(self) -> dict[str, Any]:
        """Which categories a training set's classes hold (seen kinds) and which not (new kinds)."""
        if self.train_classes is None:
            return {"classes_from": None, "seen": [], "unseen": [], "note": "no training classes known"}
        names, source = self.train_classes
        return {
            "classes_from": source,
            "seen": [c for c in self.categories if c in names],
            "unseen": [c for c in self.categories if c not in names],
        }

    def describe(self) -> dict[str, Any]:
        boxes = {f"{p.bundle}:{p.path}": list(p.box) for p in PHOTOS}
        return {
            "kind": self.kind,
            "root": str(self.root),
            "package": PACKAGE,
            "use": "external test set only: never for selection or design choices",
            "placement": "each photo cropped to a hand-drawn box around the animal(s) and pasted as an opaque "
            "rectangle; bbox = the pasted rectangle",
            "photos": {c: [{"file": n, "crop_box": boxes[n]} for n in self._photo_names[c]] for c in self.categories},
            "recordings": {c: self._sound_names[c] for c in self.categories},
            "recording_seconds": dict(sorted(self._seconds.items())),
            "renamed": {k: v for k, v in STAMPS_NAMES.items() if v in self.categories},
            "stamps_overlap": self.overlap(),
            "skipped": dict(sorted(self.skipped.items())),
        }


def _write_groups(out: Path, library: GcomprisLibrary) -> None:
    """test_heard.txt / test_unheard.txt: test scenes whose sounding kind is / is not in the training classes."""
    overlap = library.overlap()
    if not overlap["seen"] or not overlap["unseen"]:
        return
    entries = json.loads((out / "test.json").read_text())
    for name, group in (("test_heard.txt", overlap["seen"]), ("test_unheard.txt", overlap["unseen"])):
        ids = [e["file"] for e in entries if e["class"] in group]
        (out / name).write_text("".join(f"{i}\n" for i in ids))


def make_gcompris(
    out: str | Path,
    seed: int = 1,
    n: int = 200,
    distractors: int = 2,
    silent_frac: float = 0.2,
    image_size: int = 256,
    clip_seconds: float = 3.0,
    preview: bool = False,
    workers: int = 2,
    overwrite: bool = False,
    rcc_root: str | Path | None = None,
    train_classes: str | Path | None = None,
    progress: bool = False,
) -> tuple[Path, GcomprisLibrary]:
    """Write the external test set to ``out``: ``n`` test scenes (+ silent ones); returns (out, library)."""
    params = scenes.SceneParams(image_size=image_size, clip_seconds=clip_seconds, distractors=distractors)
    factory = functools.partial(
        GcomprisLibrary,
        str(rcc_dir(rcc_root)),
        int(max(64, round(params.image_size * params.max_longer_side))),
        read_train_classes(train_classes),
    )
    library = factory()  # fails early when the package is missing; the writer decodes its own copy (~1 s)
    path = scene_dataset.generate_dataset(
        out,
        factory,
        generator="gcompris",
        seed=seed,
        n_train=0,
        n_val=0,
        n_test=n,
        silent_frac=silent_frac,
        workers=workers,
        overwrite=overwrite,
        preview=preview,
        params=params,
        progress=progress,
    )
    _write_groups(path, library)
    return path, library


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    parser.add_argument("--seed", type=int, default=1, help="same seed -> same bytes (any --workers)")
    parser.add_argument("--n", type=int, default=200, help="test scenes with a sounding animal (default %(default)s)")
    parser.add_argument(
        "--silent-frac",
        type=float,
        default=0.2,
        help="silent scenes for the Extended protocol, as a fraction of --n (default %(default)s)",
    )
    parser.add_argument("--distractors", type=int, default=2, help="silent objects per scene (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=256, help="square image side (default %(default)s)")
    parser.add_argument("--clip-seconds", type=float, default=3.0, help="audio length (default %(default)s)")
    parser.add_argument(
        "--train-classes",
        type=Path,
        default=None,
        help="classes.txt of the training dataset: which animals are seen kinds (default: the installed "
        "tuxpaint stamps' names)",
    )
    parser.add_argument(
        "--gcompris-dir",
        type=Path,
        default=None,
        help=f"folder of GCompris .rcc bundles (default ${RCC_DIR_ENV} or {DEFAULT_RCC_DIR})",
    )
    parser.add_argument("--preview", action="store_true", help="write OUT/preview.png (scenes with boxes)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def main(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: expected >= 1")
    if args.n < 1:
        raise UserError(f"--n {args.n}: expected at least 1 test scene")
    out, library = make_gcompris(
        args.out,
        seed=args.seed,
        n=args.n,
        distractors=args.distractors,
        silent_frac=args.silent_frac,
        image_size=args.image_size,
        clip_seconds=args.clip_seconds,
        preview=args.preview,
        workers=args.workers,
        overwrite=args.overwrite,
        rcc_root=args.gcompris_dir,
        train_classes=args.train_classes,
        progress=True,
    )
    described = library.describe()
    for category in library.categories:
        photos, recordings = described["photos"][category], described["recordings"][category]
        print(f"{category}: {len(photos)} photo(s), {len(recordings)} recording(s)")
    overlap = described["stamps_overlap"]
    if overlap["classes_from"] is None:
        print("overlap with training classes: unknown (no --train-classes and no tuxpaint stamps installed)")
    else:
        print(f"in the training classes ({overlap['classes_from']}): {', '.join(overlap['seen']) or 'none'}")
        print(f"not in the training classes: {', '.join(overlap['unseen']) or 'none'}")
    for key, reason in described["skipped"].items():
        print(f"skipped {key}: {reason}")
    print(f"wrote {out}")
    return 0

"""``avloc data stamps``: a benchmark of real photo cut-outs with their real recordings.

Source: Debian ``tuxpaint-stamps-default`` (``/usr/share/tuxpaint/stamps/**/NAME.png`` with ``NAME.ogg``).
What is used, and why:

- A stamp is used when it has an RGBA ``NAME.png`` and a non-description ``NAME.ogg`` (``*_desc*.ogg`` are
  spoken descriptions). SVG-only stamps are skipped (not rasterized: that would need cairo/rsvg), as are
  stamps with no image at all. ``symbols/`` and ``town/`` (letters, faces, road signs) are left out.
- Also skipped: silent recordings (a few ship an all-zero .ogg), images under 96 px on their longer side
  (they would be upscaled 2-8x into blurry blobs), and nearly transparent cut-outs (under 10 % of their
  alpha box opaque, e.g. the glass), whose tight box says little about where the object is.
- A category is a kind of sound source. Stamps that are the same thing (cow / cow_white, pig / pig_golden,
  deer / doe, the four dreidels, ...; see ``NAME_GROUPS``) form one category, and so do stamps shipping the
  very same recording (found by comparing decoded audio: mountaingoat = ram, badger = beaver), since no
  listener could tell them apart. A scene draws a category's image and its recording independently from
  the category's members.
- ``--categories NAME,...`` restricts the benchmark to a subset of those categories (at least 3: a scene holds
  one sounding object and two distractors of other categories); the rest appear nowhere, not even as
  background clutter. The categories are formed over the whole package first, so a name means the same
  thing with or without a subset.

Scenes, silent samples, open-set splits, clips and the layout are made by :mod:`avloc.core.data.scenes`.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from avloc.core.data import scene_dataset, scenes
from avloc.core.errors import UserError

DEFAULT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
STAMPS_DIR_ENV = "AVLOC_STAMPS_DIR"
APT_HINT = "install them with `sudo apt-get install tuxpaint-stamps-default`"
EXCLUDED_DIRS = ("symbols", "town")
MIN_LONGER_SIDE = 96
MIN_OPAQUE_FILL = 0.10
SILENT_PEAK = 1e-3
FAINT_ALPHA = 0.05
MIN_CATEGORIES = 3  # one sounding object + two distractors of other categories

# Stamps showing the same kind of sound source -> one category.
NAME_GROUPS = {
    "cow_white": "cow",
    "pig_golden": "pig",
    "pig_golden2": "pig",
    "sheep_lamb": "sheep",
    "doe": "deer",
    "dromedary": "camel",
    "drake": "duck",
    "scissors_small_closed": "scissors",
    "scissors_small_open": "scissors",
    "dreydl-gimmel": "dreidel",
    "dreydl-hay": "dreidel",
    "dreydl-nun": "dreidel",
    "dreydl-shin": "dreidel",
}


def stamps_dir(path: str | Path | None = None) -> Path:
    """The stamps folder: ``path``, else ``$AVLOC_STAMPS_DIR``, else the Debian location."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(STAMPS_DIR_ENV) or DEFAULT_STAMPS_DIR)


def find_stamps(root: Path) -> tuple[list[tuple[str, Path, Path]], dict[str, str]]:
    """(name, png, ogg) of each candidate stamp under ``root``; {relative stamp: reason} of skipped ones."""
    found: list[tuple[str, Path, Path]] = []
    skipped: dict[str, str] = {}
    for ogg in sorted(root.rglob("*.ogg")):
        rel = ogg.relative_to(root)
        if "_desc" in ogg.stem or (rel.parts and rel.parts[0] in EXCLUDED_DIRS):
            continue
        png = ogg.with_suffix(".png")
        key = str(rel.with_suffix(""))
        if png.is_file():
            found.append((ogg.stem, png, ogg))
        elif ogg.with_suffix(".svg").is_file():
            skipped[key] = "SVG-only stamp (not rasterized)"
        else:
            skipped[key] = "no image"
    return found, skipped


def parse_categories(text: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``--categories`` (comma-separated, or a sequence) -> distinct names in the given order; None = all."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(dict.fromkeys(str(n).strip() for n in items if str(n).strip()))
    if len(names) < MIN_CATEGORIES:
        raise UserError(
            f"--categories {','.join(names) or repr(text)}: {len(names)} given; expected at least "
            f"{MIN_CATEGORIES} (a scene holds 1 sounding object + 2 distractors of other categories)"
        )
    return names


def select_categories(members: dict[str, list[str]], names: Sequence[str]) -> dict[str, list[str]]:
    """``members`` restricted to ``names``; an unknown name is a one-line UserError listing known ones."""
    for name in names:
        if name not in members:
            known = difflib.get_close_matches(name, list(members), n=5, cutoff=0.5) or sorted(members)[:8]
            raise UserError(
                f"--categories: unknown category {name!r}; known ones include {', '.join(known)} "
                f"({len(members)} in all, as in a full dataset's classes.txt)"
            )
    return {c: members[c] for c in sorted(names)}


def _load_rgba(png: Path) -> np.ndarray:
    from PIL import Image  # pillow comes with torchvision; it reads palette/LA transparency correctly

    with Image.open(png) as im:
        return np.asarray(im.convert("RGBA"), dtype=np.float32) / 255


class StampLibrary:
    """:class:`avloc.core.data.scenes.SceneLibrary` over the tuxpaint stamps, decoded once per process.

    ``categories``: only these categories (names as in :attr:`categories` of the full library); None = all.
    """

    kind = "stamps"

    def __init__(
        self, root: str | Path | None = None, max_side: int = 256, categories: Sequence[str] | None = None
    ) -> None:
        from avloc.core.audio import load_audio

        names = parse_categories(categories)  # a too-short list fails before the decoding
        self.root = stamps_dir(root)
        if not self.root.is_dir():
            raise UserError(
                f"tuxpaint stamps not found: {self.root} is not a folder; {APT_HINT} "
                f"(or set {STAMPS_DIR_ENV} to a stamps folder)"
            )
        candidates, self.skipped = find_stamps(self.root)
        images: dict[str, np.ndarray] = {}
        sounds: dict[str, np.ndarray] = {}
        digests: dict[str, str] = {}
        for name, png, ogg in candidates:
            key = str(ogg.relative_to(self.root).with_suffix(""))
            rgba = _load_rgba(png)
            box = scenes.mask_box(rgba[..., 3])
            if box is None or max(box[2] - box[0], box[3] - box[1]) < MIN_LONGER_SIDE:
                self.skipped[key] = f"image under {MIN_LONGER_SIDE} px"
                continue
            fill = float((rgba[box[1] : box[3], box[0] : box[2], 3] > 0.5).mean())
            if fill < MIN_OPAQUE_FILL:
                self.skipped[key] = f"nearly transparent cut-out ({fill:.0%} of its box opaque)"
                continue
            # Keep faint glows/shadows around the object (cropping them at the opaque box leaves a visible
            # edge), dropping only the nearly invisible rest.
            rgba[..., 3] = np.where(rgba[..., 3] < FAINT_ALPHA, 0, rgba[..., 3])
            faint = scenes.mask_box(rgba[..., 3], 0.0)
            assert faint is not None
            rgba = rgba[faint[1] : faint[3], faint[0] : faint[2]]
            wave = load_audio(ogg, scenes.SAMPLE_RATE)
            peak = float(np.abs(wave).max())
            if peak < SILENT_PEAK:
                self.skipped[key] = "silent recording"
                continue
            h, w = rgba.shape[:2]
            if max(h, w) > max_side:  # keep memory small: never needed larger than max_side
                scale = max_side / max(h, w)
                pre = scenes.resize_premultiplied(np.ascontiguousarray(rgba), round(w * scale), round(h * scale))
                alpha = pre[..., 3:4]
                pre[..., :3] = np.where(alpha > 1e-4, pre[..., :3] / np.maximum(alpha, 1e-4), 0)
                rgba = np.clip(pre, 0, 1)
            images[name] = np.ascontiguousarray(rgba, dtype=np.float32)
            sounds[name] = (wave / peak).astype(np.float32)
            digests[name] = hashlib.sha1(np.round(wave * 32767).astype(np.int16).tobytes()).hexdigest()
        if not images:
            raise UserError(
                f"no usable tuxpaint stamps (NAME.png + NAME.ogg) under {self.root}; {APT_HINT} "
                f"(or set {STAMPS_DIR_ENV} to a stamps folder)"
            )
        self.members = _group(images, digests)
        self.digests = digests
        self.excluded: list[str] = []
        if names is not None:
            selected = select_categories(self.members, names)
            self.excluded = sorted(set(self.members) - set(selected))
            self.members = selected
        self.categories = sorted(self.members)
        used = {m for ms in self.members.values() for m in ms}
        self._images = {n: v for n, v in images.items() if n in used}
        self._sounds = {n: v for n, v in sounds.items() if n in used}

    def restricted(self, members: dict[str, list[str]]) -> StampLibrary:
        """A view holding only ``members`` (category -> its stamps, a subset of this library's): the seen
        assets of an open-set benchmark, or the held-out stamps a scene's sounding object is drawn from."""
        view = object.__new__(StampLibrary)
        view.__dict__.update(self.__dict__)
        view.members = {c: list(m) for c, m in sorted(members.items()) if m}
        view.categories = sorted(view.members)
        return view

    def holdout(self, seed: int, frac: float) -> dict[str, dict[str, list[str]]]:
        """The open-set split by asset: ``{"val_unseen": {category: [stamp]}, "test_unseen": {...}}``.

        Held out (picture and recording both), deterministic from ``seed``:
        - one stamp of every category whose stamps have distinct recordings (cow / cow_white, pig / ...):
          the category stays in training through its other stamps, so its held-out stamp is a *new
          instance* of a known category (a category whose stamps share one recording is never split:
          its recording would still be heard in training);
        - ``frac`` of the single-stamp categories, whole: an *unseen category*.
        The held-out stamps alternate between val_unseen and test_unseen (disjoint stamp sets).
        """
        if not 0 < frac < 1:
            raise UserError(f"--holdout-assets {frac}: expected a fraction in (0, 1)")
        rng = np.random.default_rng([seed, 7, 1 << 30])
        splittable = [
            c for c, m in sorted(self.members.items()) if len(m) > 1 and len({self.digests[n] for n in m}) == len(m)
        ]
        singles = [c for c, m in sorted(self.members.items()) if len(m) == 1]
        instances = [(c, sorted(self.members[c])[int(rng.integers(len(self.members[c])))]) for c in splittable]
        n_single = round(frac * len(singles))
        whole = [str(c) for c in rng.choice(singles, size=n_single, replace=False)] if n_single else []
        out: dict[str, dict[str, list[str]]] = {"val_unseen": {}, "test_unseen": {}}
        for k, i in enumerate(rng.permutation(len(instances))):
            c, stamp = instances[int(i)]
            out[("val_unseen", "test_unseen")[k % 2]][c] = [stamp]
        for k, c in enumerate(whole):
            out[("test_unseen", "val_unseen")[k % 2]][c] = list(self.members[c])
        if not out["val_unseen"] or not out["test_unseen"]:
            raise UserError(
                f"--holdout-assets {frac}: holds out {len(instances) + n_single} stamp group(s); "
                "need at least one for val_unseen and one for test_unseen (raise the fraction)"
            )
        return out

    def sprite(self, category: str, rng: np.random.Generator) -> np.ndarray:
        members = self.members[category]
        return self._images[members[int(rng.integers(len(members)))]]

    def sound(self, category: str, rng: np.random.Generator, num_samples: int) -> np.ndarray:
        members = self.members[category]
        wave = self._sounds[members[int(rng.integers(len(members)))]]
        return scenes.crop_or_loop(wave, num_samples, rng)

    def clutter(self, rng: np.random.Generator, exclude: set[str]) -> list[np.ndarray]:
        pool = [c for c in self.categories if c not in exclude]
        picked = rng.choice(pool, size=min(int(rng.integers(1, 4)), len(pool)), replace=False) if pool else []
        return [self.sprite(str(c), rng) for c in picked]

    def describe(self) -> dict[str, Any]:
        described = {
            "kind": self.kind,
            "root": str(self.root),
            "package": "tuxpaint-stamps-default",
            "categories": {c: m for c, m in self.members.items()},
            "skipped": dict(sorted(self.skipped.items())),
            "recording_seconds": {n: round(len(w) / scenes.SAMPLE_RATE, 2) for n, w in sorted(self._sounds.items())},
        }
        if self.excluded:  # only with --categories: a full benchmark's meta.json stays as it was
            described["excluded_categories"] = self.excluded
        return described


def _group(images: dict[str, np.ndarray], digests: dict[str, str]) -> dict[str, list[str]]:
    """Category -> member stamps: NAME_GROUPS, then merge categories that share an identical recording."""
    category = {name: NAME_GROUPS.get(name, name) for name in images}
    by_digest: dict[str, list[str]] = {}
    for name in sorted(images):
        by_digest.setdefault(digests[name], []).append(name)
    for names in by_digest.values():
        cats = sorted({category[n] for n in names})
        if len(cats) > 1:
            merged = "_".join(cats)
            for name, cat in list(category.items()):
                if cat in cats:
                    category[name] = merged
    members: dict[str, list[str]] = {}
    for name in sorted(category):
        members.setdefault(category[name], []).append(name)
    return members


def _max_side(params: scenes.SceneParams, videos: int) -> int:
    largest = params.image_size * params.max_longer_side
    if videos:
        largest = max(largest, min(params.video_size) * 0.5)
    return int(max(64, round(largest)))


def make_stamps(
    out: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 300,
    distractors: int = 2,
    silent_frac: float = 0.2,
    videos: int = 0,
    image_size: int = 256,
    clip_seconds: float = 3.0,
    unheard_frac: float = 0.0,
    preview: bool = False,
    workers: int = 2,
    overwrite: bool = False,
    video_size: tuple[int, int] = (640, 480),
    video_seconds: float = 6.0,
    video_fps: int = 30,
    stamps_root: str | Path | None = None,
    progress: bool = False,
    categories: Sequence[str] | None = None,
    holdout_assets: float = 0.0,
    n_unseen: int = 200,
) -> Path:
    """Write the stamps benchmark to ``out``; returns ``out``. ``categories``: a subset (None = all)."""
    params = scenes.SceneParams(
        image_size=image_size,
        clip_seconds=clip_seconds,
        distractors=distractors,
        video_size=video_size,
        video_seconds=video_seconds,
        video_fps=video_fps,
    )
    factory = functools.partial(
        StampLibrary, str(stamps_dir(stamps_root)), _max_side(params, videos), parse_categories(categories)
    )
    return scene_dataset.generate_dataset(
        out,
        factory,
        generator="stamps",
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        silent_frac=silent_frac,
        unheard_frac=unheard_frac,
        videos=videos,
        preview=preview,
        workers=workers,
        overwrite=overwrite,
        params=params,
        progress=progress,
        holdout_assets=holdout_assets,
        n_unseen=n_unseen,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scene_dataset.add_common_arguments(parser, image_size=256, n_train=2000, n_val=200, n_test=300)
    parser.add_argument(
        "--stamps-dir",
        type=Path,
        default=None,
        help=f"tuxpaint stamps folder (default ${STAMPS_DIR_ENV} or {DEFAULT_STAMPS_DIR})",
    )
    parser.add_argument(
        "--categories",
        default=None,
        metavar="NAME,NAME,...",
        help=f"only these categories (names as in a full dataset's classes.txt; at least {MIN_CATEGORIES}; "
        "default all)",
    )


def main(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: expected >= 1")
    params = scene_dataset.params_from_args(args)
    factory = functools.partial(
        StampLibrary,
        str(stamps_dir(args.stamps_dir)),
        _max_side(params, args.videos),
        parse_categories(args.categories),
    )
    out = scene_dataset.generate_dataset(
        args.out,
        factory,
        generator="stamps",
        seed=args.seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        silent_frac=args.silent_frac,
        unheard_frac=args.unheard_frac,
        videos=args.videos,
        preview=args.preview,
        workers=args.workers,
        overwrite=args.overwrite,
        params=params,
        holdout_assets=args.holdout_assets,
        n_unseen=args.n_unseen,
    )
    print(f"wrote {out}")
    return 0

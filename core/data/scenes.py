"""Scene compositing and clip rendering shared by ``avloc data stamps|synth``.

A generator supplies a :class:`SceneLibrary` (categories, an RGBA sprite per draw, a sound per draw); this
module places one sounding object and K silent distractors of other categories over a procedural
background and renders the sounding object's sound as the clip. Moving-object videos are
:mod:`avloc.core.data.scene_video`; planning the samples and writing the layout of docs/architecture.md
("Dataset layout") is :mod:`avloc.core.data.scene_dataset`.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import soundfile

from avloc.core.errors import UserError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# Open-set splits by asset (avloc data stamps --holdout-assets): their own codes, so every other split keeps
# its bytes.
SPLIT_CODES = {"train": 1, "val": 2, "test": 3, "silent": 4, "video": 5, "val_unseen": 6, "test_unseen": 7}
UNSEEN_SPLITS = ("val_unseen", "test_unseen")
MAX_BOX_IOU = 0.3  # between any two objects of a scene
MAX_OCCLUSION = 0.2  # fraction of the sounding object's opaque pixels hidden by objects drawn above it


class SceneLibrary(Protocol):
    """What a generator provides: categories with a sprite and a sound per draw."""

    kind: str
    categories: list[str]

    def sprite(self, category: str, rng: np.random.Generator) -> np.ndarray:
        """Straight-alpha RGBA float32 in [0, 1], trimmed to the object."""

    def sound(self, category: str, rng: np.random.Generator, num_samples: int) -> np.ndarray:
        """Exactly ``num_samples`` float32 samples at 16 kHz, peak about 1."""

    def clutter(self, rng: np.random.Generator, exclude: set[str]) -> list[np.ndarray]:
        """RGBA sprites blurred into the background (never of a category in ``exclude``)."""

    def describe(self) -> dict[str, Any]:
        """What goes into meta.json about the source material."""


@dataclass(frozen=True)
class SceneParams:
    image_size: int = 256
    clip_seconds: float = 3.0
    distractors: int = 2
    # Object scale s = sqrt(box area / image area), so a box covers s^2 of the image (9-49 %): cIoU under
    # `median` binarization is capped at 2x that fraction, so most boxes must be large. Sounding objects and
    # distractors share this one distribution (and a random placement order), so size is no giveaway.
    object_scale: tuple[float, float] = (0.3, 0.7)
    max_longer_side: float = 0.95  # elongated objects: longer side / image side at most this
    gain: tuple[float, float] = (0.3, 0.9)  # peak amplitude of the written clip
    noise_prob: float = 0.5
    noise_snr_db: tuple[float, float] = (20.0, 40.0)
    video_size: tuple[int, int] = (640, 480)  # width, height
    video_fps: int = 30
    video_seconds: float = 6.0
    jpeg_quality: int = 92

    @property
    def num_samples(self) -> int:
        return round(self.clip_seconds * SAMPLE_RATE)


@dataclass
class PlacedObject:
    category: str
    sounding: bool
    alpha: np.ndarray  # H x W float32, the object's own opacity after placement (before occlusion)
    box: tuple[float, float, float, float]  # normalized tight box of alpha > 0.5, clipped to the image
    depth: int = 0  # drawing order: objects of larger depth are drawn over it


@dataclass
class Scene:
    image: np.ndarray  # H x W x 3 uint8 RGB
    objects: list[PlacedObject] = field(default_factory=list)  # sounding first, then distractors


# ---------------------------------------------------------------------------------------------- images


def _value_noise(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """Fractal value noise in about [0, 1]: random grids of doubling resolution, bicubic-upsampled."""
    out = np.zeros((height, width, channels), np.float32)
    total = 0.0
    for k, cells in enumerate((2, 4, 8, 16, 32)):
        grid = rng.random((cells, cells, channels), dtype=np.float32)
        layer = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        weight = 0.6**k
        out += weight * layer.reshape(height, width, channels)
        total += weight
    return out / total


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 360), rng.uniform(0.15, 0.7), rng.uniform(0.25, 0.95)]]], np.float32)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]


def procedural_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """H x W x 3 float32 RGB: a two-colour gradient with fractal texture, blotches or soft stripes."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(theta) + yy * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    base = _random_colour(rng) * (1 - t[..., None]) + _random_colour(rng) * t[..., None]
    kind = int(rng.integers(3))
    if kind == 0:  # fine colour texture
        base += rng.uniform(0.1, 0.35) * (_value_noise(rng, height, width, 3) - 0.5)
    elif kind == 1:  # two-tone blotches ("terrain")
        blot = _value_noise(rng, height, width, 1)[..., 0]
        mix = 1 / (1 + np.exp(-(blot - 0.5) * rng.uniform(8, 25)))
        base = base * (1 - 0.6 * mix[..., None]) + 0.6 * mix[..., None] * _random_colour(rng)
        base += 0.08 * (_value_noise(rng, height, width, 3) - 0.5)
    else:  # soft stripes
        period = rng.uniform(0.08, 0.3) * max(height, width)
        phi = rng.uniform(0, 2 * math.pi)
        stripes = np.sin((xx * math.cos(phi) + yy * math.sin(phi)) * 2 * math.pi / period)
        base += rng.uniform(0.05, 0.15) * stripes[..., None]
        base += 0.1 * (_value_noise(rng, height, width, 3) - 0.5)
    return np.clip(base, 0, 1).astype(np.float32)


def colour_jitter(rgba: np.ndarray, rng: np.random.Generator, hue_deg: float = 8.0) -> np.ndarray:
    """Mild hue shift and saturation/brightness scaling of a straight-alpha RGBA sprite."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgba[..., :3]), cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue_deg, hue_deg)) % 360
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.8, 1.2), 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(0.85, 1.15), 0, 1)
    out = rgba.copy()
    out[..., :3] = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1)
    return out


def resize_premultiplied(rgba: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize straight-alpha RGBA to a premultiplied one (no dark fringes from transparent colours)."""
    pre = rgba.copy()
    pre[..., :3] *= pre[..., 3:4]
    shrink = width < rgba.shape[1] or height < rgba.shape[0]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.clip(cv2.resize(pre, (max(width, 1), max(height, 1)), interpolation=interp), 0, 1)


def prepare_sprite(rgba: np.ndarray, longer_side: float, rng: np.random.Generator, jitter: bool = True) -> np.ndarray:
    """Random flip and colour jitter, scaled so its longer side is ``longer_side`` pixels; premultiplied."""
    if rng.random() < 0.5:
        rgba = rgba[:, ::-1]
    h, w = rgba.shape[:2]
    scale = longer_side / max(h, w)
    pre = resize_premultiplied(np.ascontiguousarray(rgba), round(w * scale), round(h * scale))
    if jitter:  # on the small sprite: un-premultiply, jitter, premultiply again
        alpha = pre[..., 3:4]
        straight = pre.copy()
        straight[..., :3] = np.where(alpha > 1e-4, pre[..., :3] / np.maximum(alpha, 1e-4), 0)
        pre = colour_jitter(straight, rng)
        pre[..., :3] *= alpha
    return pre


def paste(canvas: np.ndarray, premult: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Alpha-composite a premultiplied sprite onto ``canvas`` in place; returns its H x W alpha there."""
    height, width = canvas.shape[:2]
    alpha_full = np.zeros((height, width), np.float32)
    h, w = premult.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)
    if cx0 >= cx1 or cy0 >= cy1:
        return alpha_full
    piece = premult[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    alpha = piece[..., 3:4]
    region = canvas[cy0:cy1, cx0:cx1]
    region *= 1 - alpha
    region += piece[..., :3]
    alpha_full[cy0:cy1, cx0:cx1] = alpha[..., 0]
    return alpha_full


def sprite_alpha_on_canvas(premult: np.ndarray, x0: int, y0: int, height: int, width: int) -> np.ndarray:
    alpha_full = np.zeros((height, width), np.float32)
    h, w = premult.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)
    if cx0 < cx1 and cy0 < cy1:
        alpha_full[cy0:cy1, cx0:cx1] = premult[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0, 3]
    return alpha_full


def mask_box(alpha: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """Pixel box [x1, y1, x2, y2) of ``alpha > threshold`` (exclusive right/bottom), or None when empty."""
    rows = np.flatnonzero((alpha > threshold).any(axis=1))
    cols = np.flatnonzero((alpha > threshold).any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def normalize_box(box: tuple[int, int, int, int], height: int, width: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (round(x1 / width, 6), round(y1 / height, 6), round(x2 / width, 6), round(y2 / height, 6))


def placed_box(alpha: np.ndarray, x0: int, y0: int, height: int, width: int) -> tuple[int, int, int, int] | None:
    """``mask_box`` of a sprite's alpha pasted at (x0, y0) on a height x width canvas, without the canvas."""
    cx0, cy0 = max(x0, 0), max(y0, 0)
    visible = alpha[cy0 - y0 : min(height, y0 + alpha.shape[0]) - y0, cx0 - x0 : min(width, x0 + alpha.shape[1]) - x0]
    box = mask_box(visible) if visible.size else None
    return None if box is None else (box[0] + cx0, box[1] + cy0, box[2] + cx0, box[3] + cy0)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def add_clutter(canvas: np.ndarray, sprites: list[np.ndarray], rng: np.random.Generator) -> None:
    """Blur large, semi-transparent copies of other objects into the background (unrecognizable clutter)."""
    height, width = canvas.shape[:2]
    sigma = max(height, width) / 30
    for rgba in sprites:
        # Blurred at a quarter of the size and upsampled: the same look at a sixteenth of the cost.
        small = prepare_sprite(rgba, rng.uniform(0.5, 1.0) * max(height, width) / 4, rng)
        pad = int(3 * sigma / 4) + 1  # room for the blur to fade out (no hard rectangle at the sprite's edges)
        small = cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0, 0))
        small = cv2.GaussianBlur(small, (0, 0), sigma / 4) * rng.uniform(0.35, 0.7)
        premult = cv2.resize(small, (small.shape[1] * 4, small.shape[0] * 4), interpolation=cv2.INTER_LINEAR)
        h, w = premult.shape[:2]
        paste(
            canvas,
            premult,
            int(rng.integers(-w // 2, width - w // 2)),
            int(rng.integers(-h // 2, height - h // 2)),
        )


def layout_objects(
    sprites: list[np.ndarray],
    scales: list[tuple[float, float]],
    height: int,
    width: int,
    rng: np.random.Generator,
    max_longer_side: float = 0.95,
) -> list[tuple[np.ndarray, int, int, tuple[int, int, int, int]]]:
    """Scale and place sprites in the given order with pairwise box IoU <= MAX_BOX_IOU.

    A scale s from ``scales`` makes the sprite's box cover s^2 of the image (longer side capped at
    ``max_longer_side`` of the image side).

    Each object may stick out of the image by at most 10 % of its size per side. When no position fits,
    the object is shrunk and tried again, so the requested number of objects is always placed.
    """
    placed: list[tuple[np.ndarray, int, int, tuple[int, int, int, int]]] = []
    side = min(height, width)
    for rgba, (lo, hi) in zip(sprites, scales, strict=True):
        # Scale the opaque part (a sprite may carry a faint glow or shadow around it).
        opaque = mask_box(rgba[..., 3]) or (0, 0, rgba.shape[1], rgba.shape[0])
        opaque_long = max(opaque[2] - opaque[0], opaque[3] - opaque[1])
        aspect = min(opaque[2] - opaque[0], opaque[3] - opaque[1]) / opaque_long
        target = min(rng.uniform(lo, hi) * math.sqrt(height * width / aspect), max_longer_side * side)
        longer = min(target * max(rgba.shape[:2]) / opaque_long, 1.2 * side)
        premult = prepare_sprite(rgba, longer, rng)
        for attempt in range(200):
            if attempt and attempt % 25 == 0:
                longer *= 0.85
                premult = prepare_sprite(rgba, longer, rng)
            h, w = premult.shape[:2]
            x0 = int(rng.integers(-w // 10, max(width - w + w // 10, -w // 10 + 1)))
            y0 = int(rng.integers(-h // 10, max(height - h + h // 10, -h // 10 + 1)))
            box = placed_box(premult[..., 3], x0, y0, height, width)
            if box is None:
                continue
            if all(box_iou(box, other[3]) <= MAX_BOX_IOU for other in placed):
                placed.append((premult, x0, y0, box))
                break
        else:  # not reached in practice: after 7 shrinks the object is a third of its drawn size
            raise RuntimeError("could not place the scene's objects without overlap")
    return placed


def compose_scene(
    library: SceneLibrary,
    rng: np.random.Generator,
    sounding: str | None,
    distractors: int,
    banned: set[str],
    params: SceneParams,
    height: int | None = None,
    width: int | None = None,
) -> Scene:
    """Background + (sounding object) + distractors of other categories, in a random drawing order.

    A silent scene (``sounding`` None) has ``distractors + 1`` objects, none of a ``banned`` category.
    """
    height = height or params.image_size
    width = width or params.image_size
    canvas = procedural_background(rng, height, width)
    pool = [c for c in library.categories if c not in banned and c != sounding]
    n_other = distractors + (1 if sounding is None else 0)
    if len(pool) < n_other:
        raise UserError(f"--distractors {distractors}: only {len(pool)} other categories are available")
    others = [str(c) for c in rng.choice(pool, size=n_other, replace=False)] if n_other else []
    categories = ([sounding] if sounding is not None else []) + others
    add_clutter(canvas, library.clutter(rng, set(categories) | banned | ({sounding} if sounding else set())), rng)
    sprites = [library.sprite(c, rng) for c in categories]
    # Objects placed earlier are never shrunk to make room: place in a random order, so that the sounding
    # object is not systematically the larger one.
    place_order = [int(i) for i in rng.permutation(len(sprites))]
    placed_in_order = layout_objects(
        [sprites[i] for i in place_order],
        [params.object_scale] * len(sprites),
        height,
        width,
        rng,
        params.max_longer_side,
    )
    placed = [placed_in_order[place_order.index(i)] for i in range(len(sprites))]
    order = [int(i) for i in rng.permutation(len(placed))]
    if sounding is not None:
        # Random depth order, but the sounding object may not be hidden by more than MAX_OCCLUSION.
        alphas = [sprite_alpha_on_canvas(p[0], p[1], p[2], height, width) > 0.5 for p in placed]
        above = order[order.index(0) + 1 :]
        covered = np.zeros((height, width), bool)
        for i in above:
            covered |= alphas[i]
        if (covered & alphas[0]).sum() > MAX_OCCLUSION * alphas[0].sum():
            order.remove(0)
            order.append(0)
    objects: list[PlacedObject | None] = [None] * len(placed)
    for depth, i in enumerate(order):
        premult, x0, y0, box = placed[i]
        alpha = paste(canvas, premult, x0, y0)
        objects[i] = PlacedObject(
            categories[i], sounding is not None and i == 0, alpha, normalize_box(box, height, width), depth
        )
    image = np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)
    return Scene(image, [o for o in objects if o is not None])


# ---------------------------------------------------------------------------------------------- audio


def render_clip(wave: np.ndarray, rng: np.random.Generator, params: SceneParams) -> np.ndarray:
    """Random gain (peak) and, sometimes, low white noise on a clip whose peak is about 1."""
    wave = np.asarray(wave, np.float32)
    peak = float(np.abs(wave).max()) or 1.0
    out = wave * (rng.uniform(*params.gain) / peak)
    if rng.random() < params.noise_prob:
        rms = float(np.sqrt(np.mean(out**2))) or 1e-3
        snr = rng.uniform(*params.noise_snr_db)
        out = out + rng.standard_normal(out.shape).astype(np.float32) * (rms / 10 ** (snr / 20))
    return np.clip(out, -1, 1).astype(np.float32)


def crop_or_loop(wave: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``num_samples`` window; a shorter recording is looped (tiled) from a random phase."""
    n = len(wave)
    if n >= num_samples:
        start = int(rng.integers(0, n - num_samples + 1))
        return wave[start : start + num_samples].copy()
    start = int(rng.integers(0, n))
    reps = -(-(start + num_samples) // n)
    return np.tile(wave, reps)[start : start + num_samples].copy()


def write_wav(path: Path, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM wav, encoded in memory: libsndfile's close() fsyncs, slow over thousands of files."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(wave, -1, 1), sample_rate, subtype="PCM_16", format="WAV")
    path.write_bytes(buffer.getvalue())

"""Scene compositing, clip rendering and dataset-layout writing shared by ``avloc data stamps|synth``.

A generator supplies a :class:`SceneLibrary` (categories, an RGBA sprite per draw, a sound per draw); this
module places one sounding object and K silent distractors of other categories over a procedural
background, renders the sounding object's sound as the clip, and writes the layout of docs/architecture.md
("Dataset layout"). Every sample is drawn from its own generator seeded with ``(seed, split, index)``, so
the bytes written do not depend on the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import soundfile
from tqdm import tqdm

from avloc.core.errors import UserError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
SPLIT_CODES = {"train": 1, "val": 2, "test": 3, "silent": 4, "video": 5}
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


def prepare_sprite(
    rgba: np.ndarray, longer_side: float, rng: np.random.Generator, jitter: bool = True
) -> np.ndarray:
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


def normalize_box(
    box: tuple[int, int, int, int], height: int, width: int
) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (round(x1 / width, 6), round(y1 / height, 6), round(x2 / width, 6), round(y2 / height, 6))


def _placed_box(
    alpha: np.ndarray, x0: int, y0: int, height: int, width: int
) -> tuple[int, int, int, int] | None:
    """``mask_box`` of a sprite's alpha pasted at (x0, y0) on a height x width canvas, without the canvas."""
    cx0, cy0 = max(x0, 0), max(y0, 0)
    visible = alpha[
        cy0 - y0 : min(height, y0 + alpha.shape[0]) - y0, cx0 - x0 : min(width, x0 + alpha.shape[1]) - x0
    ]
    box = mask_box(visible) if visible.size else None
    return None if box is None else (box[0] + cx0, box[1] + cy0, box[2] + cx0, box[3] + cy0)


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
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
        pad = (
            int(3 * sigma / 4) + 1
        )  # room for the blur to fade out (no hard rectangle at the sprite's edges)
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
            box = _placed_box(premult[..., 3], x0, y0, height, width)
            if box is None:
                continue
            if all(_box_iou(box, other[3]) <= MAX_BOX_IOU for other in placed):
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
    add_clutter(
        canvas, library.clutter(rng, set(categories) | banned | ({sounding} if sounding else set())), rng
    )
    sprites = [library.sprite(c, rng) for c in categories]
    # Objects placed earlier are never shrunk to make room: place in a random order, so that the sounding
    # object is not systematically the larger one.
    place_order = [int(i) for i in rng.permutation(len(sprites))]
    placed_in_order = layout_objects([sprites[i] for i in place_order], [params.object_scale] * len(sprites),
                                     height, width, rng, params.max_longer_side)
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


# ---------------------------------------------------------------------------------------------- video


def video_codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(
    path: Path, frames: Iterator[np.ndarray], audio: np.ndarray, fps: int, sample_rate: int = SAMPLE_RATE
) -> None:
    """Encode RGB frames (h264 via libx264, else mpeg4) with a mono AAC track, via a temp name."""
    import av

    tmp = path.with_name(path.name + ".part")
    codec = video_codec()
    with av.open(str(tmp), "w", format="mp4") as container:
        vstream = None
        astream = container.add_stream("aac", rate=sample_rate, layout="mono")
        for frame in frames:
            if vstream is None:
                vstream = container.add_stream(codec, rate=fps)
                vstream.height, vstream.width = frame.shape[:2]
                vstream.pix_fmt = "yuv420p"
                vstream.thread_count = 1  # deterministic bytes, and the machine has 2 cores
                if codec == "libx264":
                    vstream.options = {"preset": "veryfast", "crf": "20"}
            for packet in vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        if vstream is not None:
            for packet in vstream.encode():
                container.mux(packet)
        chunk = 1024  # AAC frame size
        pcm = np.clip(audio, -1, 1).astype(np.float32)
        for start in range(0, len(pcm), chunk):
            aframe = av.AudioFrame.from_ndarray(
                pcm[None, start : start + chunk], format="fltp", layout="mono"
            )
            aframe.sample_rate = sample_rate
            aframe.pts = start
            for packet in astream.encode(aframe):
                container.mux(packet)
        for packet in astream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _place_static(
    canvas: np.ndarray, rgba: np.ndarray, placed: list[tuple[int, int, int, int]], rng: np.random.Generator
) -> None:
    """Paste a video's static distractor (longer side 0.25-0.45 of the height) where its box has IoU <=
    MAX_BOX_IOU with each box in ``placed`` (shrunk every 25 tries, as in ``layout_objects``); appends its box."""
    height, width = canvas.shape[:2]
    longer = rng.uniform(0.25, 0.45) * height
    premult = prepare_sprite(rgba, longer, rng)
    for attempt in range(200):
        if attempt and attempt % 25 == 0:
            longer *= 0.85
            premult = prepare_sprite(rgba, longer, rng)
        h, w = premult.shape[:2]
        x0, y0 = int(rng.integers(0, max(width - w, 1))), int(rng.integers(0, max(height - h, 1)))
        box = _placed_box(premult[..., 3], x0, y0, height, width)
        if box is not None and all(_box_iou(box, other) <= MAX_BOX_IOU for other in placed):
            paste(canvas, premult, x0, y0)
            placed.append(box)
            return
    log.warning("a static distractor of the clip found no place apart from the others; left out")


def render_video(
    library: SceneLibrary, rng: np.random.Generator, category: str, params: SceneParams, path: Path
) -> list[list[float]]:
    """A clip in which the ``category`` object bounces across a background with static silent distractors.

    ``params.distractors`` distractors (as many as there are other categories), each of another category,
    are drawn under the moving object, each placed with box IoU <= MAX_BOX_IOU to the ones before. Writes
    ``path`` (mp4 with the object's sound) and returns per-frame normalized boxes of the moving object.

    The distractors after the first come from a generator spawned off ``rng`` (spawning does not advance
    it), so the background, the first distractor, the moving object, its path and its sound are drawn as
    in a one-distractor clip. The blurred background clutter excludes only the first distractor's category.
    """
    width, height = params.video_size
    canvas = procedural_background(rng, height, width)
    pool = [c for c in library.categories if c != category]
    others = [str(rng.choice(pool))] if pool and params.distractors > 0 else []
    extra_rng = rng.spawn(1)[0]
    rest = [c for c in pool if c not in others]
    n_extra = min(params.distractors - len(others), len(rest)) if others else 0
    extra = [str(c) for c in extra_rng.choice(rest, size=n_extra, replace=False)] if n_extra > 0 else []
    add_clutter(canvas, library.clutter(rng, {category, *others}), rng)
    placed: list[tuple[int, int, int, int]] = []
    for c in others:  # static distractor, drawn under the moving object
        premult = prepare_sprite(library.sprite(c, rng), rng.uniform(0.25, 0.45) * height, rng)
        h, w = premult.shape[:2]
        x0, y0 = int(rng.integers(0, max(width - w, 1))), int(rng.integers(0, max(height - h, 1)))
        paste(canvas, premult, x0, y0)
        placed.append(_placed_box(premult[..., 3], x0, y0, height, width) or (x0, y0, x0 + 1, y0 + 1))
    for c in extra:
        _place_static(canvas, library.sprite(c, extra_rng), placed, extra_rng)
    sprite = prepare_sprite(library.sprite(category, rng), rng.uniform(0.3, 0.5) * height, rng)
    h, w = sprite.shape[:2]
    local = mask_box(sprite[..., 3])
    assert local is not None
    n_frames = round(params.video_seconds * params.video_fps)
    speed = rng.uniform(0.15, 0.35) * width  # px / s
    angle = rng.uniform(0, 2 * math.pi)
    start = np.array([rng.uniform(0, width - w), rng.uniform(0, height - h)])
    velocity = speed * np.array([math.cos(angle), math.sin(angle)])
    span = np.array([max(width - w, 1), max(height - h, 1)], float)

    def position(t: float) -> tuple[int, int]:
        raw = (start + velocity * t) % (2 * span)  # bounce: triangle wave inside [0, span]
        pos = np.where(raw > span, 2 * span - raw, raw)
        return int(round(pos[0])), int(round(pos[1]))

    boxes: list[list[float]] = []

    def frames() -> Iterator[np.ndarray]:
        for k in range(n_frames):
            x0, y0 = position(k / params.video_fps)
            frame = canvas.copy()
            paste(frame, sprite, x0, y0)
            box = (local[0] + x0, local[1] + y0, local[2] + x0, local[3] + y0)
            clipped = (max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height))
            boxes.append(list(normalize_box(clipped, height, width)))
            yield np.round(frame * 255).astype(np.uint8)

    num_samples = round(params.video_seconds * SAMPLE_RATE)
    audio = render_clip(library.sound(category, rng, num_samples), rng, params)
    write_video(path, frames(), audio, params.video_fps)
    return boxes


# ---------------------------------------------------------------------------------------------- dataset


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
    unheard = (
        sorted(str(c) for c in plan_rng.choice(cats, size=n_unheard, replace=False)) if n_unheard else []
    )
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
    for j, c in enumerate(
        _balanced(cats, videos, np.random.default_rng([seed, SPLIT_CODES["video"], 1 << 30]))
    ):
        specs.append(SampleSpec(f"clip_{j:04d}", "video", j, c, c))
    return specs, unheard


_WORKER: dict[str, Any] = {}


def _init_worker(
    library_factory: Callable[[], SceneLibrary], params: SceneParams, root: str, seed: int
) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER.update(library=library_factory(), params=params, root=Path(root), seed=seed)


def _sound_clip(
    library: SceneLibrary, category: str, rng: np.random.Generator, params: SceneParams
) -> np.ndarray:
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
            if spec.split in ("val", "test"):
                write_wav(root / audio, _sound_clip(library, obj.category, rng, params))
        objects.append(
            {"class": obj.category, "bbox": list(obj.box), "sounding": obj.sounding, "audio": audio}
        )
    record: dict[str, Any] = {"id": spec.id, "split": spec.split, "class": spec.heard, "objects": objects}
    if spec.paired_with is not None:
        record["paired_with"] = spec.paired_with
    if spec.sounding is not None:
        x1, y1, x2, y2 = scene.objects[0].box
        record["bbox"] = [list(scene.objects[0].box)]
        record["area"] = (x2 - x1) * (y2 - y1)
    return record, scene


def _render_task(spec: SampleSpec) -> dict[str, Any]:
    record, _ = render_sample(spec, _WORKER["library"], _WORKER["params"], _WORKER["seed"], _WORKER["root"])
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


def write_preview(
    root: Path, records: list[dict[str, Any]], path: Path, rows: int = 4, cols: int = 6
) -> None:
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
) -> Path:
    """Render and write a whole dataset into ``out`` (via a temp folder next to it, renamed at the end)."""
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
    specs, unheard = plan_samples(
        library.categories, seed, n_train, n_val, n_test, silent_frac, unheard_frac, videos
    )
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
        records = _render_all(specs, library, library_factory, params, seed, tmp, workers, progress)
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
    library: SceneLibrary,
    library_factory: Callable[[], SceneLibrary],
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
                records.append(render_sample(spec, library, params, seed, root)[0])
                bar.update()
            return records
        # spawn: workers start clean (no forked torch thread pools); each decodes the source material once.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, _init_worker, (library_factory, params, str(root), seed)) as pool:
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
) -> None:
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLIT_CODES}
    for rec in records:
        by_split[rec["split"]].append(rec)
    for split in ("train", "val", "test"):
        _write_text(root / f"{split}.txt", [r["id"] for r in by_split[split]])
    for split in ("val", "test"):
        entries = [
            {"file": r["id"], "class": r["class"], "bbox": r["bbox"], "objects": r["objects"]}
            for r in by_split[split]
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
    _write_text(root / "classes.txt", sorted(library.categories))
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "class"])
        for split in ("train", "val", "test", "silent"):
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
        "categories": sorted(library.categories),
        "unheard_categories": unheard,
        "sounding_box_area_fraction": {
            s: _area_stats([r["area"] for r in by_split[s]]) for s in ("train", "val", "test")
        },
        "video": {
            "codec": video_codec(),
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
    parser.add_argument(
        "--distractors", type=int, default=2, help="silent objects per scene (default %(default)s)"
    )
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
        "--videos", type=int, default=0, help="also write this many mp4 clips with a moving object"
    )
    parser.add_argument(
        "--video-size", default="640x480", help="WIDTHxHEIGHT of the clips (default %(default)s)"
    )
    parser.add_argument("--video-seconds", type=float, default=6.0, help="clip length (default %(default)s)")
    parser.add_argument("--video-fps", type=int, default=30, help="clip frame rate (default %(default)s)")
    parser.add_argument(
        "--preview", action="store_true", help="write OUT/preview.png (test scenes with boxes)"
    )
    parser.add_argument(
        "--image-size", type=int, default=image_size, help="square image side (default %(default)s)"
    )
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

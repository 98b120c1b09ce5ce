"""``avloc data synth``: the dataset layout made fully procedurally (no apt package, seconds to build).

Eight categories, each a shape with its own colour and surface texture, and a class-specific sound: a
harmonic tone at the class pitch, amplitude-modulated at a class rate, plus a band of noise at a class
centre frequency. Scenes, silent samples, splits and clips are made by :mod:`avloc.core.data.scenes`, exactly as
for the stamps benchmark. Used by the unit tests and the embedded demo.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.signal

from avloc.core.data import scene_dataset, scene_video, scenes
from avloc.core.errors import UserError


@dataclass(frozen=True)
class SynthClass:
    name: str
    shape: str
    rgb: tuple[float, float, float]
    texture: str  # solid | stripes | checker | dots
    pitch_hz: float  # fundamental of the harmonic tone
    harmonics: int
    am_hz: float  # amplitude-modulation rate
    noise_hz: float  # centre of the noise band


CLASSES: tuple[SynthClass, ...] = (
    SynthClass("red_circle", "circle", (0.85, 0.15, 0.15), "solid", 220.0, 3, 2.0, 3000.0),
    SynthClass("blue_square", "square", (0.15, 0.3, 0.9), "stripes", 277.2, 5, 7.0, 1200.0),
    SynthClass("green_triangle", "triangle", (0.15, 0.7, 0.2), "checker", 349.2, 2, 4.0, 5000.0),
    SynthClass("yellow_star", "star", (0.95, 0.85, 0.1), "dots", 440.0, 6, 9.0, 2000.0),
    SynthClass("magenta_ring", "ring", (0.85, 0.2, 0.8), "solid", 554.4, 4, 3.0, 6500.0),
    SynthClass("cyan_cross", "cross", (0.1, 0.8, 0.85), "stripes", 698.5, 1, 6.0, 800.0),
    SynthClass("orange_diamond", "diamond", (0.95, 0.5, 0.1), "dots", 880.0, 3, 5.0, 4000.0),
    SynthClass("purple_hexagon", "hexagon", (0.45, 0.2, 0.75), "checker", 1108.7, 2, 8.0, 1600.0),
)


def _polygon(shape: str, size: int) -> list[np.ndarray]:
    """Outline points (pixels) of a shape filling a size x size square."""
    c, r = size / 2, size * 0.48

    def regular(n: int, radius: float, phase: float) -> np.ndarray:
        a = phase + np.arange(n) * 2 * math.pi / n
        return np.stack([c + radius * np.cos(a), c + radius * np.sin(a)], 1)

    if shape == "square":
        return [regular(4, r * math.sqrt(2), math.pi / 4)]
    if shape == "triangle":
        return [regular(3, r * 1.05, -math.pi / 2) + [0, size * 0.1]]
    if shape == "diamond":
        return [regular(4, r, -math.pi / 2)]
    if shape == "hexagon":
        return [regular(6, r, 0.0)]
    if shape == "star":
        outer, inner = regular(5, r, -math.pi / 2), regular(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        return [np.stack([outer, inner], 1).reshape(-1, 2)]
    if shape == "cross":
        w = size * 0.17
        return [
            np.array(
                [
                    [c - w, c - r],
                    [c + w, c - r],
                    [c + w, c - w],
                    [c + r, c - w],
                    [c + r, c + w],
                    [c + w, c + w],
                    [c + w, c + r],
                    [c - w, c + r],
                    [c - w, c + w],
                    [c - r, c + w],
                    [c - r, c - w],
                    [c - w, c - w],
                ]
            )
        ]
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Anti-aliased size x size mask in [0, 1] (drawn at 4x and area-averaged)."""
    big = size * 4
    mask = np.zeros((big, big), np.uint8)
    if shape in ("circle", "ring"):
        cv2.circle(mask, (big // 2, big // 2), int(big * 0.48), 255, -1, cv2.LINE_AA)
        if shape == "ring":
            cv2.circle(mask, (big // 2, big // 2), int(big * 0.26), 0, -1, cv2.LINE_AA)
    else:
        pts = [np.round(p * 4).astype(np.int32) for p in _polygon(shape, size)]
        cv2.fillPoly(mask, pts, 255, cv2.LINE_AA)
    return cv2.resize(mask.astype(np.float32) / 255, (size, size), interpolation=cv2.INTER_AREA)


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Brightness factor field (size x size) for a surface texture, with a random phase and period."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size * rng.uniform(0.12, 0.2)
    if kind == "stripes":
        return 0.75 + 0.25 * np.sign(np.sin((xx + yy) * 2 * math.pi / period + rng.uniform(0, 6.3)))
    if kind == "checker":
        return 0.7 + 0.3 * ((np.floor(xx / period) + np.floor(yy / period)) % 2)
    if kind == "dots":
        dist = np.hypot((xx % period) - period / 2, (yy % period) - period / 2)
        return np.where(dist < period * 0.28, 0.55, 1.0).astype(np.float32)
    return np.ones((size, size), np.float32)


class SynthLibrary:
    """Procedural :class:`avloc.core.data.scenes.SceneLibrary`: shapes and class-specific synthetic sounds."""

    kind = "synth"

    def __init__(self, sprite_size: int = 128) -> None:
        self.sprite_size = sprite_size
        self.classes = {c.name: c for c in CLASSES}
        self.categories = [c.name for c in CLASSES]
        # A few textured templates per class, drawn once; each draw then only rotates and stretches one.
        template_rng = np.random.default_rng(0)
        self._templates: dict[str, list[np.ndarray]] = {}
        for cls in CLASSES:
            mask = shape_mask(cls.shape, sprite_size)
            variants = []
            for _ in range(4):
                rgba = np.empty((sprite_size, sprite_size, 4), np.float32)
                shade = _texture(cls.texture, sprite_size, template_rng)
                rgba[..., :3] = np.clip(np.asarray(cls.rgb, np.float32) * shade[..., None], 0, 1)
                rgba[..., 3] = mask
                variants.append(rgba)
            self._templates[cls.name] = variants
        self._noise_sos = {
            cls.name: scipy.signal.butter(
                4,
                [cls.noise_hz / 1.25, min(cls.noise_hz * 1.25, 7600.0)],
                btype="bandpass",
                fs=scenes.SAMPLE_RATE,
                output="sos",
            )
            for cls in CLASSES
        }

    def sprite(self, category: str, rng: np.random.Generator) -> np.ndarray:
        cls = self.classes[category]
        size = self.sprite_size
        variants = self._templates[category]
        rgba = variants[int(rng.integers(len(variants)))]
        # Aspect and rotation jitter, so the same class is not one fixed template.
        angle = rng.uniform(-25, 25) if cls.shape not in ("circle", "ring") else 0.0
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
        rgba = cv2.warpAffine(rgba, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0, 0))
        stretch = rng.uniform(0.8, 1.2)
        rgba = cv2.resize(rgba, (max(round(size * stretch), 8), size), interpolation=cv2.INTER_LINEAR)
        box = scenes.mask_box(rgba[..., 3], 0.01)
        assert box is not None
        return np.ascontiguousarray(rgba[box[1] : box[3], box[0] : box[2]])

    def sound(self, category: str, rng: np.random.Generator, num_samples: int) -> np.ndarray:
        return class_sound(self.classes[category], rng, num_samples, sos=self._noise_sos[category])

    def clutter(self, rng: np.random.Generator, exclude: set[str]) -> list[np.ndarray]:
        return []

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "sprite_size": self.sprite_size, "classes": [c.__dict__ for c in CLASSES]}


def class_sound(
    cls: SynthClass,
    rng: np.random.Generator,
    num_samples: int,
    sample_rate: int = scenes.SAMPLE_RATE,
    sos: np.ndarray | None = None,
) -> np.ndarray:
    """Harmonic tone (class pitch, 1/k amplitudes) x AM at the class rate, plus a class noise band; peak 1."""
    t = np.arange(num_samples, dtype=np.float32) / np.float32(sample_rate)
    f0 = cls.pitch_hz * rng.uniform(0.97, 1.03)
    tone = np.zeros(num_samples)
    for k in range(1, cls.harmonics + 1):
        if k * f0 < sample_rate / 2:
            tone += np.sin(2 * math.pi * k * f0 * t + rng.uniform(0, 2 * math.pi)) / k
    am = 0.55 + 0.45 * np.sin(2 * math.pi * cls.am_hz * rng.uniform(0.9, 1.1) * t + rng.uniform(0, 2 * math.pi))
    if sos is None:
        low, high = cls.noise_hz / 1.25, min(cls.noise_hz * 1.25, sample_rate / 2 * 0.95)
        sos = scipy.signal.butter(4, [low, high], btype="bandpass", fs=sample_rate, output="sos")
    noise = scipy.signal.sosfilt(sos, rng.standard_normal(num_samples))
    tone /= np.abs(tone).max() or 1.0
    noise /= np.abs(noise).max() or 1.0
    wave = am * tone * 0.75 + noise * 0.25 * am[::-1]
    return (wave / (np.abs(wave).max() or 1.0)).astype(np.float32)


def make_synth(
    out: str | Path,
    seed: int = 0,
    n_train: int = 800,
    n_val: int = 100,
    n_test: int = 100,
    distractors: int = 2,
    silent_frac: float = 0.2,
    videos: int = 0,
    image_size: int = 128,
    clip_seconds: float = 3.0,
    unheard_frac: float = 0.0,
    preview: bool = False,
    workers: int = 1,
    overwrite: bool = False,
    video_size: tuple[int, int] = (640, 480),
    video_seconds: float = 6.0,
    video_fps: int = 30,
    progress: bool = False,
) -> Path:
    """Write a procedural dataset to ``out``; returns ``out``."""
    params = scenes.SceneParams(
        image_size=image_size,
        clip_seconds=clip_seconds,
        distractors=distractors,
        video_size=video_size,
        video_seconds=video_seconds,
        video_fps=video_fps,
    )
    return scene_dataset.generate_dataset(
        out,
        functools.partial(SynthLibrary, _sprite_size(params, videos)),
        generator="synth",
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
    )


def _sprite_size(params: scenes.SceneParams, videos: int) -> int:
    """Draw shapes at about the largest size they are shown at (scenes, clips if any): little upsampling."""
    largest = max(params.image_size * params.max_longer_side, min(params.video_size) * 0.5 if videos else 0)
    return int(min(max(64, round(largest)), 512))


def write_synth_video(
    path: str | Path, seconds: float = 6.0, fps: int = 30, size: tuple[int, int] = (640, 480), seed: int = 0
) -> list[list[float]]:
    """One clip (moving shape with its class sound) at ``path``; returns its per-frame normalized boxes."""
    params = replace(scenes.SceneParams(), video_size=tuple(size), video_fps=fps, video_seconds=seconds)
    library = SynthLibrary(int(min(max(64, min(size) // 2), 512)))
    rng = np.random.default_rng([seed, scenes.SPLIT_CODES["video"], 0])
    category = library.categories[int(rng.integers(len(library.categories)))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return scene_video.render_video(library, rng, category, params, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scene_dataset.add_common_arguments(parser, image_size=128, n_train=800, n_val=100, n_test=100)


def main(args: argparse.Namespace) -> int:
    params = scene_dataset.params_from_args(args)
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: expected >= 1")
    out = scene_dataset.generate_dataset(
        args.out,
        functools.partial(SynthLibrary, _sprite_size(params, args.videos)),
        generator="synth",
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
        holdout_assets=args.holdout_assets,  # a clear error: synth has no assets to hold out
    )
    print(f"wrote {out}")
    return 0

"""Moving-object clips for ``avloc data stamps|synth --videos N``: a sounding object bounces across a static
scene of silent distractors; the mp4 carries its sound and the per-frame boxes come back for scoring."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from avloc.core.data.scenes import (
    MAX_BOX_IOU,
    SAMPLE_RATE,
    SceneLibrary,
    SceneParams,
    add_clutter,
    box_iou,
    mask_box,
    normalize_box,
    paste,
    placed_box,
    prepare_sprite,
    procedural_background,
    render_clip,
)
from avloc.core.media import write_video

log = logging.getLogger(__name__)
# One encoder thread: the same seed gives the same bytes on any machine (and the machine has 2 cores).
X264_OPTIONS = {"preset": "veryfast", "crf": "20"}


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
        box = placed_box(premult[..., 3], x0, y0, height, width)
        if box is not None and all(box_iou(box, other) <= MAX_BOX_IOU for other in placed):
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
        placed.append(placed_box(premult[..., 3], x0, y0, height, width) or (x0, y0, x0 + 1, y0 + 1))
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
    write_video(path, frames(), params.video_fps, audio, SAMPLE_RATE, threads=1, x264_options=X264_OPTIONS)
    return boxes

"""scripts/aspect_effect.py's geometry: the square each mode makes and a peak mapped back onto the frame."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location(
    "aspect_effect", Path(__file__).resolve().parents[1] / "scripts" / "aspect_effect.py"
)
aspect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aspect)


def _peak_at(u: float, v: float, n: int = 9) -> np.ndarray:
    m = np.zeros((n, n), np.float32)
    m[int(v * n), int(u * n)] = 1.0
    return m


def test_crop_and_letterbox_squares_and_peaks_map_back_to_the_frame() -> None:
    h, w = 480, 640
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :80] = 255  # the left eighth: outside the centre crop
    fill = np.array([124, 116, 104], np.uint8)
    crop = aspect.to_square(rgb, "crop", fill)
    box = aspect.to_square(rgb, "letterbox", fill)
    assert crop.shape == (480, 480, 3) and crop.max() == 0
    assert box.shape == (640, 640, 3) and (box[:80] == fill).all() and (box[-80:] == fill).all()
    assert (box[80:-80, :80] == 255).all()
    # the map's centre cell is the frame's centre in every mode
    for mode in aspect.MODES:
        assert np.allclose(aspect.peak_in_frame(_peak_at(0.5, 0.5), mode, h, w), (0.5, 0.5))
    # crop: the square's left edge is x = 80 px of 640; letterbox: its top rows are padding (no peak)
    assert np.isclose(aspect.peak_in_frame(_peak_at(0.0, 0.5), "crop", h, w)[0], (80 + 480 / 18) / 640)
    assert aspect.peak_in_frame(_peak_at(0.5, 0.0), "letterbox", h, w) is None
    # chance: a box over the whole frame covers all of the crop, 3/4 of the letterbox square
    full = np.array([0.0, 0.0, 1.0, 1.0])
    assert [aspect.chance(full, m, h, w) for m in aspect.MODES] == [1.0, 1.0, 0.75]

"""The one frame -> model-input definition (core.media.frame_fit / fit_frame, issue 25 item 4): where a 4:3
frame's pixels land in the square input under each mode and back, the engine manifest's ``image.fit`` as the
CPU and device preprocessing read it (no field: stretch), and scripts/aspect_effect.py's scoring helpers."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest

from avloc.core.errors import UserError
from avloc.core.media import RESIZE_MODES, fit_frame, frame_fit, resize_mode
from avloc.engines.base import preprocess_frame, preprocess_frames

_spec = importlib.util.spec_from_file_location(
    "aspect_effect", Path(__file__).resolve().parents[1] / "scripts" / "aspect_effect.py"
)
aspect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aspect)

H, W, SIZE = 480, 640, 64
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _manifest(**image: object) -> dict:
    return {"image": {"size": SIZE, "mean": MEAN, "std": STD, **image}}


def _frame_with_box(box: tuple[int, int, int, int]) -> np.ndarray:
    frame = np.zeros((H, W, 3), np.uint8)
    x0, y0, x1, y1 = box
    frame[y0:y1, x0:x1] = 255
    return frame


def _bright(image: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(image[..., 0] > 127)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# a box in the frame's right half: (320..480, 120..360) of 640x480
BOX = (320, 120, 480, 360)
# where it must land in the 64x64 input, per mode (64/640 = 0.1 both axes for letterbox, 64/480 for crop)
EXPECTED = {
    "stretch": (32, 16, 48, 48),  # x * 0.1, y * 64/480
    "crop": (32, 16, 53, 48),  # the centred 480x480 starts at x = 80: (x - 80) * 64/480
    "letterbox": (32, 20, 48, 44),  # 640 -> 64 wide, 48 high, centred: 8 rows of padding above
}


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_a_box_in_a_4_3_frame_lands_where_the_mode_says_and_maps_back(mode: str) -> None:
    fit = frame_fit((H, W), (SIZE, SIZE), mode)
    image = fit_frame(_frame_with_box(BOX), (SIZE, SIZE), mode, fill=0)
    assert image.shape == (SIZE, SIZE, 3)
    got = _bright(image)
    assert np.abs(np.subtract(got, EXPECTED[mode])).max() <= 1, (mode, got)
    # the box's corners through frame_to_input and input_to_frame
    x0, y0 = fit.frame_to_input(BOX[0] / W, BOX[1] / H)
    x1, y1 = fit.frame_to_input(BOX[2] / W, BOX[3] / H)
    assert np.allclose([x0 * SIZE, y0 * SIZE, x1 * SIZE, y1 * SIZE], EXPECTED[mode], atol=0.7)
    back = fit.input_to_frame(x0, y0)
    assert back is not None and np.allclose(back, (BOX[0] / W, BOX[1] / H))
    # the input's centre is the frame's centre in every mode
    assert np.allclose(fit.input_to_frame(0.5, 0.5), (0.5, 0.5))


def test_crop_loses_the_sides_and_letterbox_pads_with_the_mean() -> None:
    crop = frame_fit((H, W), (SIZE, SIZE), "crop")
    box = frame_fit((H, W), (SIZE, SIZE), "letterbox")
    assert crop.source == (80, 0, 560, 480) and crop.target == (0, 0, SIZE, SIZE)
    assert box.source == (0, 0, W, H) and box.target == (0, 8, SIZE, 56)
    assert crop.frame_to_input(0.05, 0.5)[0] < 0  # the frame's left eighth is outside the input
    # where the whole map is drawn on the frame
    assert np.allclose(crop.map_box, (0.125, 0.0, 0.875, 1.0))
    assert np.allclose(box.map_box, (0.0, -1 / 6, 1.0, 7 / 6))
    assert frame_fit((H, W), (SIZE, SIZE), "stretch").map_box == (0.0, 0.0, 1.0, 1.0)
    assert box.input_to_frame(0.5, 0.05) is None  # the top rows are padding: no frame point
    # the CPU preprocessing: padding is exactly the normalisation mean (0), the frame area is normalised
    frame = np.full((H, W, 3), 255, np.uint8)
    out = preprocess_frame(frame, _manifest(fit="letterbox"))
    assert (out[:, :8] == 0).all() and (out[:, 56:] == 0).all()
    assert np.allclose(out[:, 8:56], (1.0 - 0.5) / 0.25)


def test_the_manifest_names_the_mode_and_an_old_manifest_is_stretch() -> None:
    frame = np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8)
    old = preprocess_frame(frame, _manifest())  # no "fit": every engine exported before it
    described = _manifest(resize="to size x size, aspect not kept (cv2 INTER_AREA shrinking, INTER_LINEAR enlarging)")
    assert resize_mode(_manifest()["image"]) == "stretch" == resize_mode(described["image"])
    assert np.array_equal(preprocess_frame(frame, described), old)
    assert np.array_equal(preprocess_frame(frame, _manifest(fit="stretch")), old)
    for mode in RESIZE_MODES:
        got = preprocess_frame(frame, _manifest(fit=mode))
        # one definition: the CPU preprocessing is fit_frame's image, normalised
        want = (fit_frame(frame[..., ::-1], (SIZE, SIZE), mode).astype(np.float32) / 255 - 0.5) / 0.25
        fit = frame_fit((H, W), (SIZE, SIZE), mode)
        x0, y0, x1, y1 = fit.target
        assert np.allclose(got[:, y0:y1, x0:x1], want.transpose(2, 0, 1)[:, y0:y1, x0:x1], atol=1e-5), mode
        assert (mode == "stretch") == np.array_equal(got, old)
    with pytest.raises(UserError, match="image.fit 'squash'"):
        preprocess_frame(frame, _manifest(fit="squash"))


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_device_path_follows_the_mode(mode: str) -> None:
    from avloc.engines.preprocess import TOLERANCE_LEVELS, DevicePreprocessor

    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (H, W, 3), np.uint8) for _ in range(2)]
    manifest = _manifest(fit=mode)
    dev = DevicePreprocessor(manifest, device="cpu", max_batch=2)(frames).numpy()
    cpu = preprocess_frames(frames, manifest)
    assert np.abs(dev - cpu).max() <= TOLERANCE_LEVELS / (255 * 0.25) + 1e-6
    if mode == "letterbox":
        assert (dev[:, :, :8] == 0).all() and (dev[:, :, 56:] == 0).all()


def test_scoring_helpers_map_the_peak_and_the_chance_through_the_fit() -> None:
    box = np.array([[0.0, 0.0, 1.0, 1.0]])  # the whole frame
    chances = [aspect.chance(frame_fit((H, W), (SIZE, SIZE), m), box) for m in RESIZE_MODES]
    assert np.allclose(chances, [1.0, 1.0, 0.75])  # letterbox: the frame covers 48 of 64 rows
    right = np.array([[0.5, 0.0, 1.0, 1.0]])
    crop = frame_fit((H, W), (SIZE, SIZE), "crop")
    assert aspect.hit(crop, (0.9, 0.5), right) and not aspect.hit(crop, (0.1, 0.5), right)
    assert not aspect.hit(frame_fit((H, W), (SIZE, SIZE), "letterbox"), (0.9, 0.05), right)  # padding
    # a scene widened to 4:3 keeps its box on the same pixels (box in the middle: the mirrored strips,
    # at most 21 px each side, do not copy it)
    rgb = _frame_with_box((25, 20, 40, 40))[:64, :64]
    wide, moved = aspect.widen(rgb, np.array([[25 / 64, 20 / 64, 40 / 64, 40 / 64]]), 4 / 3, np.random.default_rng(0))
    assert wide.shape == (64, 85, 3)
    assert np.allclose(moved[0] * [85, 64, 85, 64], _bright(wide), atol=1e-6)


def test_consumers_put_a_crop_or_letterbox_map_where_the_input_was_on_the_frame() -> None:
    from types import SimpleNamespace

    import cv2

    from avloc.stream.clients.display import overlay
    from avloc.stream.serve.inference_worker import InferenceWorker

    # the worker: no mapping for stretch (old manifests), the manifest's fit otherwise
    frame = np.zeros((H, W, 3), np.uint8)
    assert InferenceWorker._frame_fit(SimpleNamespace(manifest=_manifest()), frame) is None
    crop = InferenceWorker._frame_fit(SimpleNamespace(manifest=_manifest(fit="crop")), frame)
    assert crop is not None and crop.source == (80, 0, 560, 480)
    assert np.allclose(crop.input_to_frame(0.0, 0.5), (0.125, 0.5))  # a peak at the input's left edge
    # the display: the map over its box only; the crop's side eighths keep the frame's own pixels
    bgr = np.full((H, W, 3), 100, np.uint8)
    heat = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    out = overlay(bgr, heat, 0.5, cv2.COLORMAP_JET, None, crop.map_box)
    assert (out[:, :80] == 100).all() and (out[:, 560:] == 100).all()
    assert (out[:, 80:560] != 100).any(axis=2).all()
    whole = overlay(bgr, heat, 0.5, cv2.COLORMAP_JET)
    assert (whole != 100).any(axis=2).all()
    # letterbox: the map's padding rows fall outside the frame; the frame is covered by the map's middle rows
    box = frame_fit((H, W), (SIZE, SIZE), "letterbox")
    rows = np.repeat(np.linspace(0, 1, 8, dtype=np.float32)[:, None], 8, axis=1)
    out = overlay(bgr, rows, 1.0, cv2.COLORMAP_JET, None, box.map_box)
    mid = cv2.applyColorMap(np.full((1, 1), 128, np.uint8), cv2.COLORMAP_JET)[0, 0]
    assert np.abs(out[H // 2, W // 2].astype(int) - mid).max() <= 40  # the map's middle at the frame's middle


def test_map_on_frame_puts_a_crop_engines_map_on_its_part_of_the_frame() -> None:
    """core.media.map_on_frame (avloc.Localizer's frame-sized heatmap, the display's overlay): a crop engine's map
    covers the centred square of a 4:3 frame and nothing outside it; letterbox's box reaches past the frame."""
    from avloc.core.media import engine_frame_fit, map_on_frame

    unit = np.ones((16, 16), np.float32)
    assert engine_frame_fit({"size": 256}, (480, 640, 3)) is None  # an engine without image.fit: stretch
    crop = engine_frame_fit({"size": 256, "fit": "crop"}, (480, 640, 3))
    on_frame, box = map_on_frame(unit, (480, 640), crop.map_box)
    assert box == (80, 0, 560, 480) and on_frame.shape == (480, 640)
    assert on_frame[:, 80:560].min() == 1.0 and on_frame[:, :80].max() == 0.0 and on_frame[:, 560:].max() == 0.0
    whole, box = map_on_frame(unit, (480, 640))
    assert box == (0, 0, 640, 480) and whole.min() == 1.0
    letter = engine_frame_fit({"size": 256, "fit": "letterbox"}, (480, 640, 3))
    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32)[:, None], (1, 16))  # rows 0 .. 1, top to bottom
    on_frame, box = map_on_frame(ramp, (480, 640), letter.map_box)
    assert box == (0, 0, 640, 480)  # the box covers more than the frame: the padding rows are cut off
    assert on_frame[0].mean() > 0.05 and on_frame[-1].mean() < 0.95  # the frame is the middle of the ramp


def test_a_capture_pre_fit_frame_maps_back_onto_the_full_frame() -> None:
    """--infer-size --infer-fit crop: the capture sends the engine's input already cropped (the worker's own
    preprocess is then a no-op: the same tensor as from the full frame), with meta fit + full_size, and the worker
    maps the map and peak onto the full frame as if it had cropped it itself; hostile values fall back."""
    from types import SimpleNamespace

    from avloc.stream.capture.camera import resize_for_inference
    from avloc.stream.runtime.worker import RateLimitedLog
    from avloc.stream.serve.inference_worker import InferenceWorker

    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (H, W, 3), np.uint8)
    small = resize_for_inference(big, (SIZE, SIZE), "crop")
    np.testing.assert_array_equal(
        preprocess_frame(small, _manifest(fit="crop")), preprocess_frame(big, _manifest(fit="crop"))
    )
    worker = SimpleNamespace(manifest=_manifest(fit="crop"), _ratelog=RateLimitedLog(logging.getLogger("t")))
    own = InferenceWorker._frame_fit(worker, big)
    pre = InferenceWorker._frame_fit(worker, small, {"fit": "crop", "full_size": [W, H]})
    assert pre is not None and pre.map_box == own.map_box and pre.input_to_frame(0.0, 0.5) == own.input_to_frame(0, 0.5)
    assert InferenceWorker._frame_fit(worker, small, {"fit": "stretch", "full_size": [W, H]}) is None
    for hostile in ({"fit": "crop", "full_size": [0, H]}, {"fit": "zoom", "full_size": [W, H]}, {"full_size": "x"}):
        fallback = InferenceWorker._frame_fit(worker, small, hostile)  # the square frame itself: nothing to map
        assert fallback is not None and fallback.map_box == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(UserError, match="--infer-fit"):
        resize_for_inference(big, (SIZE, SIZE), "letterbox")


def test_a_pre_fit_frame_of_another_mode_than_the_engine_is_said(caplog) -> None:
    """--infer-fit defaults to crop, but an engine exported before image.fit stretches: such a capture's frames
    give that engine other pixels than the full frames would, silently before; the worker now says so."""
    from types import SimpleNamespace

    from avloc.stream.runtime.worker import RateLimitedLog
    from avloc.stream.serve.inference_worker import InferenceWorker

    small = np.zeros((SIZE, SIZE, 3), np.uint8)
    old = SimpleNamespace(manifest=_manifest(), _ratelog=RateLimitedLog(logging.getLogger("avloc.t"), 60.0))
    with caplog.at_level(logging.WARNING):
        InferenceWorker._frame_fit(old, small, {"fit": "stretch", "full_size": [W, H]}, "cam0")
        assert not caplog.records  # the capture matched the engine
        InferenceWorker._frame_fit(old, small, {"fit": "crop", "full_size": [W, H]}, "cam0")
    assert [r.getMessage() for r in caplog.records] == [
        "stream cam0: frames pre-resized with --infer-fit crop for an engine whose image.fit is stretch: the engine"
        " sees other pixels than from the full frame (capture with --infer-fit stretch, or send full frames)"
    ]

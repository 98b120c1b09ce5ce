"""Display state handling: well-formed messages with unusable content are counted, never fatal."""

from __future__ import annotations

import argparse
import json

import numpy as np

from avloc.stream.clients.display import Display, add_arguments, notice_text
from avloc.stream.wire import protocol


def _msg(kind: str, arrays: dict | None = None, **meta) -> protocol.Message:
    frames = protocol.encode(kind, stream="cam0", seq=1, ts={"capture": 1.0}, arrays=arrays, meta=meta)
    return protocol.decode([bytes(np.asarray(f).data) if isinstance(f, np.ndarray) else f for f in frames])


def test_bad_content_is_rejected_and_the_display_keeps_going(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    display = Display(parser.parse_args(["--headless", "--latency-log", str(tmp_path / "lat.jsonl")]))
    heatmap = {"heatmap": np.zeros((4, 4), np.float16)}
    bad = [
        (display.on_heatmap, _msg("heatmap", heatmap, peak=["left", "top"], confidence=0.5)),
        (display.on_heatmap, _msg("heatmap", heatmap, peak=[0.5, 0.5], drops="many")),
        (display.on_heatmap, _msg("heatmap", heatmap, confidence={"x": 1})),
        # drawn in compose(), outside handle(): a peak this far off the frame made cv2.circle raise there
        (display.on_heatmap, _msg("heatmap", heatmap, peak=[1e12, 0.5])),
        (display.on_heatmap, _msg("heatmap", heatmap, peak=[0.5, -5e9])),
        (display.on_frame, _msg("frame", {"frame": np.zeros((0, 4, 3), np.uint8)})),
        (display.on_frame, _msg("frame", {"frame": np.zeros((4, 4), np.float32)})),
    ]
    for handler, msg in bad:
        assert display.handle(handler, msg) is None
    assert display.rejects.as_dict() == {"bad_content": len(bad)}
    assert display.heatmaps == {} and display.frames.get("cam0", []) == []

    view = display.handle(display.on_heatmap, _msg("heatmap", heatmap, peak=[0.25, 0.75], notice=None, drops=3))
    assert view is not None and view.peak == (0.25, 0.75) and display.drops == 3
    display.handle(display.on_frame, _msg("frame", {"frame": np.zeros((8, 8, 3), np.uint8)}))
    assert len(display.frames["cam0"]) == 1
    display.log_latency(_msg("heatmap", heatmap, peak=[0.25, 0.75]), 1.01)
    # line-buffered: the record is on disk before the display closes the log
    assert (tmp_path / "lat.jsonl").read_text().count("\n") == 1


def _display(tmp_path) -> Display:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return Display(parser.parse_args(["--headless", "--latency-log", str(tmp_path / "lat.jsonl")]))


def _notice_pixels(image: np.ndarray) -> int:
    """Pixels of the notice's red text (BGR (60, 60, 255)) in the bottom band where draw_hud puts it."""
    band = image[-40:].astype(int)
    return int(((band[..., 2] > 200) & (band[..., 0] < 120) & (band[..., 1] < 120)).sum())


def test_warming_up_and_non_finite_are_shown_and_counted(tmp_path) -> None:
    """A warming_up map is drawn *and* says "WARMING UP 40%"; non_finite says it has no map; both counted."""
    assert notice_text(protocol.NOTICE_WARMING_UP, 0.4) == "WARMING UP 40%"
    assert notice_text(protocol.NOTICE_WARMING_UP, float("nan")) == "WARMING UP"
    assert notice_text(protocol.NOTICE_NON_FINITE) == "NO MAP (NON-FINITE)"
    assert notice_text(protocol.NOTICE_NOT_VISIBLE) == "NOT VISIBLE" and notice_text(None) is None

    display = _display(tmp_path)
    frame = _msg("frame", {"frame": np.full((120, 160, 3), 128, np.uint8)})
    display.handle(display.on_frame, frame)
    heat = np.zeros((4, 4), np.float16)
    heat[1, 2] = 1.0
    arrays = {"heatmap": heat}
    warming = display.handle(
        display.on_heatmap, _msg("heatmap", arrays, peak=[0.6, 0.4], notice="warming_up", audio_real=0.4)
    )
    settled = display.handle(display.on_heatmap, _msg("heatmap", arrays, peak=[0.6, 0.4], notice=None))
    broken = display.handle(display.on_heatmap, _msg("heatmap", None, peak=None, notice="non_finite"))
    assert warming.audio_real == 0.4 and warming.unit is not None

    plain = display.compose("cam0", frame, None)
    with_warming = display.compose("cam0", frame, warming)
    with_settled = display.compose("cam0", frame, settled)
    with_broken = display.compose("cam0", frame, broken)
    # the map is drawn while warming up (the overlay changes the frame as much as a settled one) ...
    body = slice(30, 60)  # above the notice band
    assert np.array_equal(with_warming[body], with_settled[body]) and not np.array_equal(
        with_warming[body], plain[body]
    )
    # ... and the notice is written on it; a settled map has none; a non-finite one: notice, no map
    assert _notice_pixels(with_warming) > 50 and _notice_pixels(with_settled) == 0
    assert _notice_pixels(with_broken) > 50 and np.array_equal(with_broken[body], plain[body])

    stats = display.stats()
    assert stats["notices"] == {"warming_up": 1, "non_finite": 1}
    display.log_latency(_msg("heatmap", arrays, notice="warming_up", audio_real=0.4), 1.0)
    record = json.loads((tmp_path / "lat.jsonl").read_text().splitlines()[-1])
    assert record["notice"] == "warming_up" and record["audio_real"] == 0.4


def test_a_peers_map_box_is_bounded_before_it_is_drawn(tmp_path) -> None:
    """meta map_box is drawn at frame size times its extent, in compose() (outside handle()'s guard): a
    gigapixel box ([0, 0, 1e9, 1e9] raised cv2.error there and killed the display; [0, 0, 100, 100] asked for
    a 64000x48000 map per frame), a string's characters, bools or an empty box are bad content; a real crop /
    letterbox box still draws."""
    from avloc.core.media import frame_fit

    display = _display(tmp_path)
    heatmap = {"heatmap": np.eye(4, dtype=np.float16)}
    hostile = [[0, 0, 1e9, 1e9], [0, 0, 100, 100], [0, -1e9, 1e-9, 1e9], "1234", [True, False, True, True]]
    hostile += [[0.5, 0.5, 0.5, 0.9], [2.0, 0.0, 3.0, 1.0], [0, 0, 10**400, 1], {"a": 1, "b": 2, "c": 3, "d": 4}]
    for box in hostile:
        assert display.handle(display.on_heatmap, _msg("heatmap", heatmap, peak=[0.5, 0.5], map_box=box)) is None, box
    assert display.rejects.as_dict() == {"bad_content": len(hostile)}
    frame = _msg("frame", {"frame": np.full((48, 64, 3), 100, np.uint8)})
    for fit in (frame_fit((48, 64), (16, 16), "crop"), frame_fit((48, 64), (16, 16), "letterbox")):
        view = display.handle(display.on_heatmap, _msg("heatmap", heatmap, peak=[0.5, 0.5], map_box=list(fit.map_box)))
        assert view is not None and view.map_box == fit.map_box
        assert display.compose("cam0", frame, view).shape == (48, 64, 3)

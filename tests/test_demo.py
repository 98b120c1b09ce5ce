"""``avloc demo``: scoring helpers, budget handling, and the whole chain with a trained tiny model (slow)."""

from __future__ import annotations

import json

import pytest
from proc_helpers import orphans

from avloc.core.errors import UserError
from avloc.stream.demo import box_area_fraction, peak_hits, run_demo


def _rec(pts: float, peak: list[float] | None, notice: str | None = None) -> dict:
    return {"pts": pts, "peak": peak, "notice": notice}


def test_peak_hits_by_frame_timestamp():
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]  # frame 0 top-left, frame 1 bottom-right (10 fps)
    records = [
        _rec(0.0, [0.25, 0.25]),  # frame 0, inside
        _rec(0.1, [0.25, 0.25]),  # frame 1, outside
        _rec(0.1, [0.75, 0.9]),  # frame 1, inside
        _rec(0.0, None, notice="no_audio"),  # suppressed: not scored
        _rec(9.0, [0.6, 0.6]),  # past the end: clamped to the last frame, inside
    ]
    score = peak_hits(records, boxes, fps=10)
    assert score == {"frames_scored": 4, "peak_in_box": 3, "fraction": 0.75}
    assert box_area_fraction(boxes) == pytest.approx(0.25)
    assert peak_hits([], boxes, fps=10)["fraction"] == 0.0


def test_too_small_budget_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="minutes-budget"):
        run_demo(tmp_path / "demo", minutes_budget=0.5)


@pytest.mark.slow
def test_demo_trained_model_localizes_the_moving_object(tmp_path):
    """The whole demo: synth data, training (configs/demo.yaml), export, replay through the real processes."""
    report = run_demo(tmp_path / "demo", minutes_budget=10.0, seconds=4.0)
    loc = report["localization"]
    assert loc["frames_scored"] >= 60  # 4 s at 30 fps, minus drops and the first audio hop
    # most frames: the peak sits on the sounding object, far above a random point's hit rate
    assert loc["fraction"] >= 0.5, loc
    assert loc["fraction"] >= 3 * loc["chance"], loc
    assert report["latency"]["heatmap_fps"] > 0  # speed targets live in `avloc bench pipeline`, not here
    saved = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert saved["localization"] == loc
    assert (tmp_path / "demo" / "out.mp4").is_file()
    assert (tmp_path / "demo" / "latency_histograms.png").is_file()
    assert orphans() == []

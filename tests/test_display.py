"""Display state handling: well-formed messages with unusable content are counted, never fatal."""

from __future__ import annotations

import argparse

import numpy as np

from avloc.stream import protocol
from avloc.stream.display import Display, add_arguments


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

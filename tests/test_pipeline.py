"""End to end with real processes and loopback sockets: replay -> inference -> display (headless record)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from proc_helpers import orphans

from avloc.core.media import iter_video, probe_video
from avloc.stream.run.replay_cli import run_replay
from avloc.stream.run.report import read_latency_log

ORDER = ("capture", "send", "received", "infer_start", "visual_start", "infer_end", "publish", "display")


@pytest.fixture(scope="module")
def assets(engine_and_video: tuple[Path, Path]) -> dict[str, Path]:
    engine, video = engine_and_video  # conftest's: built once per session, read-only here
    return {"engine": engine, "video": video}


def _remux(src: Path, dst: Path, audio: bool) -> Path:
    """Copy ``src``'s streams (video only when ``audio`` is False) into another container."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        streams = [inp.streams.video[0]] + ([inp.streams.audio[0]] if audio else [])
        mapping = {s.index: out.add_stream_from_template(s) for s in streams}
        for packet in inp.demux(streams):
            if packet.dts is None:
                continue
            packet.stream = mapping[packet.stream.index]
            out.mux(packet)
    return dst


def _no_orphans() -> None:
    alive = orphans()
    assert not alive, f"orphan processes: {alive}"


def test_replay_two_streams_end_to_end(assets, tmp_path):
    record = tmp_path / "out.mp4"
    summary = run_replay(
        assets["video"],
        assets["engine"],
        run_dir=tmp_path / "run",
        record=record,
        headless=True,
        streams=2,
        threads=1,
        snapshot_every=10,
    )
    assert summary["reason"] == "ended"
    records = read_latency_log(Path(summary["latency_log"]))
    frames_in_file = sum(1 for _ in iter_video(assets["video"]))
    for stream in ("cam0", "cam1"):
        mine = [r for r in records if r["stream"] == stream]
        computed = [r for r in mine if not r["notice"]]
        # real time with two streams on a shared CPU: most frames get a heatmap, the rest are counted drops
        assert len(computed) >= 0.5 * frames_in_file, (stream, len(computed), frames_in_file)
        for r in computed:
            stamps = [r["ts"][k] for k in ORDER]
            assert stamps == sorted(stamps), r["ts"]  # every stage in order on the one monotonic clock
            x, y = r["peak"]
            assert 0 <= x <= 1 and 0 <= y <= 1
    assert summary["latency"]["e2e_ms"]["p50"] < 1000
    # the recording: overlaid frames of the first stream at the file's timing, with the file's audio
    info = probe_video(record)
    assert info.has_audio and (info.width, info.height) == (160, 120)
    assert abs(info.duration - 2.0) < 0.5
    recorded = sum(1 for _ in iter_video(record))
    assert recorded >= 0.8 * frames_in_file
    assert len(list((tmp_path / "out").glob("*.png"))) >= 1  # snapshots next to the recording
    for name in ("replay0", "replay1", "inference", "display"):
        assert (tmp_path / "run" / f"{name}.log").is_file()
        assert summary["processes"][name]["restarts"] == 0
    # secure by default (issue 22): the run made its own CURVE keys, private to this user, and ran end to end with
    # every socket a CURVE server or client (that a plain subscriber then gets nothing: tests/test_attacks.py)
    keys = tmp_path / "run" / "keys"
    assert (keys / "server.key_secret").is_file() and (keys.stat().st_mode & 0o077) == 0
    assert (tmp_path / "run").stat().st_mode & 0o077 == 0
    assert summary["unauthenticated"] == {}
    _no_orphans()


def test_audioless_file_plays_with_no_audio_notice(assets, tmp_path):
    silent = _remux(assets["video"], tmp_path / "silent.mkv", audio=False)
    assert not probe_video(silent).has_audio
    record = tmp_path / "silent_out.mp4"
    summary = run_replay(silent, assets["engine"], run_dir=tmp_path / "run", record=record, headless=True, threads=1)
    assert summary["reason"] == "ended"
    records = read_latency_log(Path(summary["latency_log"]))
    assert len(records) >= 10
    assert all(r["notice"] == "no_audio" and r["peak"] is None for r in records)
    assert summary["processes"]["inference"]["stats"]["suppressed"] == len(records)
    # the "NO AUDIO" banner is burnt into the recorded frames (red text, bottom centre)
    _, frame = next(iter_video(record))
    banner = frame[-40:, 40:-40].astype(int)
    assert ((banner[..., 0] > 200) & (banner[..., 1] < 120)).sum() > 20
    assert not probe_video(record).has_audio
    _no_orphans()


def test_truncated_files(assets, tmp_path):
    # An mp4 cut short loses its index: a one-line user error before anything starts.
    data = assets["video"].read_bytes()
    cut_mp4 = tmp_path / "cut.mp4"
    cut_mp4.write_bytes(data[: len(data) // 2])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "avloc.cli",
            "replay",
            str(cut_mp4),
            "--engine",
            str(assets["engine"]),
            "--headless",
            "--auto-ports",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("avloc: error:") and str(cut_mp4) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    # A Matroska file cut short still plays up to the cut; the pipeline ends cleanly.
    mkv = _remux(assets["video"], tmp_path / "full.mkv", audio=True)
    raw = mkv.read_bytes()
    cut_mkv = tmp_path / "cut.mkv"
    cut_mkv.write_bytes(raw[: int(len(raw) * 0.6)])
    summary = run_replay(cut_mkv, assets["engine"], run_dir=tmp_path / "run", headless=True, threads=1)
    assert summary["reason"] == "ended"
    records = read_latency_log(Path(summary["latency_log"]))
    frames_in_file = sum(1 for _ in iter_video(assets["video"]))
    assert 0 < len(records) < frames_in_file
    assert all(p["restarts"] == 0 for p in summary["processes"].values())
    _no_orphans()


def test_latency_log_survives_a_cut_line(tmp_path):
    path = tmp_path / "lat.jsonl"
    good = {"stream": "cam0", "seq": 1, "ts": {k: float(i) for i, k in enumerate(ORDER)}, "notice": None}
    path.write_text(json.dumps(good) + "\n" + '{"stream": "cam0", "se')
    from avloc.stream.run.report import summarize_latency_log

    summary = summarize_latency_log(path)
    assert summary["heatmaps"] == 1
    assert summary["e2e_ms"]["p50"] == pytest.approx(7000.0)
    assert summary["stages_ms"]["transport"]["p50"] == pytest.approx(1000.0)
    assert np.isnan(summarize_latency_log(tmp_path / "missing.jsonl")["e2e_ms"]["p50"])


# Frames whose sequence number is written in them: 5 bits as black/white 24x24 blocks in the bottom row of a
# mid-grey 320x240 frame (clear of the HUD box top left), readable through a 50 % heatmap overlay (a white
# block stays above 128 + 0.5 * 42, a black one below 0.5 * 170, whatever the colormap adds).
CODE_BITS, CODE_X, CODE_Y, CODE_SIZE = 5, 96, 208, 24
# Heatmaps whose sequence number is where they are hot: one of the 4x6 cells.
HEAT_SHAPE = (4, 6)


def _coded_frame(seq: int) -> np.ndarray:
    frame = np.full((240, 320, 3), 128, np.uint8)
    for bit in range(CODE_BITS):
        x = CODE_X + bit * CODE_SIZE
        frame[CODE_Y : CODE_Y + CODE_SIZE, x : x + CODE_SIZE] = 255 if (seq >> bit) & 1 else 0
    return frame


def _frame_code(image: np.ndarray) -> int:
    """The sequence number written by ``_coded_frame`` (centre of each block, all channels)."""
    seq = 0
    for bit in range(CODE_BITS):
        x = CODE_X + bit * CODE_SIZE
        block = image[CODE_Y + 6 : CODE_Y + CODE_SIZE - 6, x + 6 : x + CODE_SIZE - 6].astype(float)
        seq |= int(block.mean() > 117) << bit
    return seq


def _coded_heatmap(seq: int) -> np.ndarray:
    heat = np.zeros(HEAT_SHAPE, np.float16)
    heat[np.unravel_index(seq % heat.size, HEAT_SHAPE)] = 1.0
    return heat


def _heatmap_code(image: np.ndarray) -> int:
    """Index of the cell where the overlay is reddest (JET: hot = red, cold = blue) = the heatmap's seq."""
    rows, cols = HEAT_SHAPE
    h, w = image.shape[0] // rows, image.shape[1] // cols
    redness = [
        float(
            (
                image[r * h + h // 2 - 3 : r * h + h // 2 + 3, c * w + w // 2 - 3 : c * w + w // 2 + 3, 2].astype(int)
                - image[r * h + h // 2 - 3 : r * h + h // 2 + 3, c * w + w // 2 - 3 : c * w + w // 2 + 3, 0]
            ).mean()
        )
        for r in range(rows)
        for c in range(cols)
    ]
    return int(np.argmax(redness))


def _display(tmp_path):
    import argparse

    from avloc.stream.clients import display as D

    args = argparse.Namespace(
        alpha=0.5,
        colormap="jet",
        record=None,
        audio_source=None,
        fps=30.0,
        record_stream=None,
        latency_log=str(tmp_path / "lat.jsonl"),
        snapshot_every=0,
        snapshot_dir=None,
    )
    return D.Display(args)


def _frame_msg(seq: int, capture: float = 99.0):
    from avloc.stream.wire import protocol

    return protocol.Message("frame", "cam0", seq, {"capture": capture}, {"frame": _coded_frame(seq)}, {"pts": seq / 30})


def _heatmap_msg(seq: int, peak=None):
    from avloc.stream.wire import protocol

    return protocol.Message(
        "heatmap",
        "cam0",
        seq,
        {"capture": 99.0, "publish": 99.9},
        {"heatmap": _coded_heatmap(seq)},
        {"peak": peak, "confidence": 0.3, "notice": None},
    )


def test_coded_frames_and_heatmaps_read_back() -> None:
    from avloc.stream.clients.display import COLORMAPS, heatmap_to_unit, overlay

    for seq in (0, 1, 5, 22, 31):
        assert _frame_code(_coded_frame(seq)) == seq
        composed = overlay(_coded_frame(seq), heatmap_to_unit(_coded_heatmap(seq)), 0.5, COLORMAPS["jet"])
        assert (_frame_code(composed), _heatmap_code(composed)) == (seq, seq % 24)


def test_display_window_shows_matched_heatmap_then_plain_frames_when_stale(monkeypatch, tmp_path):
    import cv2

    from avloc.stream.wire import protocol

    shown: list[np.ndarray] = []
    monkeypatch.setattr(cv2, "imshow", lambda title, image: shown.append(image))
    disp = _display(tmp_path)
    clock = [100.0]
    monkeypatch.setattr(protocol, "now", lambda: clock[0])
    for seq in (10, 11, 12):
        disp.on_frame(_frame_msg(seq))
    msg = _heatmap_msg(11, peak=[0.1, 0.9])
    disp.on_heatmap(msg)
    disp._show("avloc", {"cam0": msg})
    assert len(shown) == 1
    # heatmap 11 on frame 11 (not the newest frame 12 nor the older frame 10)
    assert (_frame_code(shown[0]), _heatmap_code(shown[0])) == (11, 11)
    image = shown[0].astype(int)
    # JET red (BGR) at the hot cell (row 1, col 5), blue at the cold bottom-left corner
    hot, cold = image[90, 292], image[230, 10]
    assert hot[2] > hot[0] + 30 and cold[0] > cold[2] + 30
    disp._show("avloc", {})  # nothing new, heatmap fresh: nothing redrawn
    assert len(shown) == 1
    clock[0] += 1.0  # no heatmap for a second: the newest plain frame is shown
    disp._show("avloc", {})
    assert len(shown) == 2 and _frame_code(shown[1]) == 12 and shown[1][230, 10].tolist() == [128, 128, 128]
    disp._show("avloc", {})
    assert len(shown) == 2  # the same frame is not shown twice
    disp.log_latency(msg, 100.0)
    disp._log_file.close()
    logged = json.loads((tmp_path / "lat.jsonl").read_text())
    assert logged["ts"]["display"] == 100.0 and logged["peak"] == [0.1, 0.9] and logged["seq"] == 11


def test_recording_puts_each_heatmap_on_its_own_frame(monkeypatch, tmp_path):
    """Frames wait in the buffer for their heatmap: each recorded frame carries the heatmap computed on it; a
    frame whose heatmap was dropped (2) gets the next one; times are the frames' pts."""
    from avloc.stream.wire import protocol

    class Recorder:
        frames = 0

        def __init__(self) -> None:
            self.written: list[tuple[int, int, float]] = []

        def write(self, bgr: np.ndarray, t: float) -> None:
            self.written.append((_frame_code(bgr), _heatmap_code(bgr), t))
            self.frames += 1

    clock = [100.0]
    monkeypatch.setattr(protocol, "now", lambda: clock[0])
    disp = _display(tmp_path)
    disp.recorder, disp.record_stream = Recorder(), "cam0"
    for seq in range(6):
        disp.on_frame(_frame_msg(seq))
    disp._flush_record("cam0")
    assert disp.recorder.written == []  # no heatmap yet, none waited RECORD_WAIT_S: nothing recorded
    for seq in (0, 1, 3, 4, 5):  # the inference worker skipped frame 2
        clock[0] += 0.05
        disp.on_heatmap(_heatmap_msg(seq))
        disp._flush_record("cam0")
    recorded = disp.recorder.written
    assert [(f, h) for f, h, _ in recorded] == [(0, 0), (1, 1), (2, 3), (3, 3), (4, 4), (5, 5)]
    assert [t for _, _, t in recorded] == pytest.approx([seq / 30 for seq in range(6)])
    # a frame with no heatmap for longer than RECORD_WAIT_S is recorded with the newest heatmap there is
    disp.on_frame(_frame_msg(6))
    clock[0] += 0.1
    disp._flush_record("cam0")
    assert len(disp.recorder.written) == 6
    clock[0] += 1.0
    disp._flush_record("cam0")
    assert [(f, h) for f, h, _ in disp.recorder.written[6:]] == [(6, 5)]


def test_recording_keeps_each_heatmap_when_several_arrive_in_one_drain(monkeypatch, tmp_path):
    """What Display.run does with the heatmaps of one drain: every one through on_heatmap, then one flush."""
    from avloc.stream.wire import protocol

    written: list[tuple[int, int]] = []

    class Recorder:
        frames = 0

        def write(self, bgr: np.ndarray, t: float) -> None:
            written.append((_frame_code(bgr), _heatmap_code(bgr)))

    monkeypatch.setattr(protocol, "now", lambda: 100.0)
    disp = _display(tmp_path)
    disp.recorder, disp.record_stream = Recorder(), "cam0"
    for seq in range(3):
        disp.on_frame(_frame_msg(seq))
    for seq in range(3):
        disp.on_heatmap(_heatmap_msg(seq))
    disp._flush_record("cam0")
    assert written == [(0, 0), (1, 1), (2, 2)]

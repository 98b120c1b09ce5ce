"""Honest first seconds (issue 25): heatmaps whose audio window is mostly start-up silence carry ``warming_up``.

Through the real processes: a replay worker (which pre-fills its first window with silence, as the microphone
does) feeding a real inference worker; the notice follows each window's share of captured audio.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import zmq
from proc_helpers import orphans

from avloc.stream.run.launcher import free_tcp_endpoint
from avloc.stream.serve.batching import WARMING_UP_SHARE, real_share
from avloc.stream.wire import protocol


def test_real_share_from_end_sample():
    assert real_share({"end_sample": 1600}, 16000) == pytest.approx(0.1)
    assert real_share({"end_sample": 48000}, 16000) == 1.0
    assert real_share({}, 16000) == 1.0  # a sender that does not say: taken as real audio
    assert real_share({"end_sample": "x"}, 16000) == 1.0
    assert real_share({"end_sample": 800}, None) == 1.0


def _spawn(module: str, *args: str, log_file: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args, "--log-file", log_file],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_first_seconds_are_marked_warming_up_by_the_real_worker(engine_and_video, tmp_path):
    engine, video = engine_and_video  # 1 s window, 0.1 s hop: the first 0.5 s of windows are mostly silence
    frames_ep, audio_ep, heat_ep = (free_tcp_endpoint() for _ in range(3))
    ctx = zmq.Context()
    heat = protocol.make_socket(ctx, zmq.SUB, heat_ep, bind=False, hwm=1000)
    worker = _spawn(
        "avloc.stream.serve.inference",
        "--engine",
        str(engine),
        "--frames",
        frames_ep,
        "--audio",
        audio_ep,
        "--heatmaps",
        heat_ep,
        "--threads",
        "1",
        "--max-frame-age",
        "5",  # a loaded test machine must not drop the early frames as late: every frame counts here
        log_file=str(tmp_path / "inference.log"),
    )
    replay = None
    got: list[protocol.Message] = []
    try:
        replay = _spawn(
            "avloc.stream.capture.replay",
            str(video),
            "--frames",
            frames_ep,
            "--audio",
            audio_ep,
            "--frontend",
            str(engine),
            "--wait-timeout",
            "120",
            log_file=str(tmp_path / "replay.log"),
        )
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            msg = protocol.recv(heat, timeout_ms=100)
            if msg is not None and msg.kind == "heatmap":
                got.append(msg)
            if replay.poll() is not None and msg is None and got:
                break
        assert replay.wait(timeout=30) == 0, (tmp_path / "replay.log").read_text()
    finally:
        for proc in (replay, worker):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
        heat.close(0)
        ctx.term()
    assert orphans(timeout=0) == []
    computed = [m for m in got if "heatmap" in m.arrays]
    assert len(computed) >= 10, [m.meta.get("notice") for m in got]
    early = [m for m in computed if m.meta["audio_real"] < WARMING_UP_SHARE]
    settled = [m for m in computed if m.meta["audio_real"] >= WARMING_UP_SHARE]
    assert early and settled, [(m.meta["pts"], m.meta["audio_real"]) for m in computed]
    # the notice follows the window's share of captured audio: 0.1 s of audio per 0.1 s hop of a 1 s window
    assert all(m.meta["notice"] == protocol.NOTICE_WARMING_UP for m in early)
    assert all(m.meta["notice"] is None for m in settled)  # the tiny engine has no gate
    # the share grows by one hop (0.1 s of the 1 s window) per window until the window is full: checked by window
    # (audio_seq), since a frame is paired with the newest window the worker has, which may lag it by a hop or more
    # when the replay's first spectrograms are slow
    partial = {m.meta["audio_seq"]: m.meta["audio_real"] for m in computed if m.meta["audio_real"] < 1.0}
    seqs = sorted(partial)
    assert len(seqs) >= 2, partial
    for a, b in zip(seqs, seqs[1:]):
        assert partial[b] - partial[a] == pytest.approx(0.1 * (b - a), abs=1e-3), partial
    for m in computed:  # and never audio from after the frame (the window's end rounds to the hop)
        assert m.meta["audio_real"] <= min(1.0, m.meta["pts"]) + 0.11, (m.meta["pts"], m.meta["audio_real"])
    assert max(m.meta["pts"] for m in early) < min(m.meta["pts"] for m in settled)

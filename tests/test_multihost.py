"""Workers on two "hosts" (network namespaces): ``avloc worker`` processes configured by endpoint only, CURVE keys,
a 5 s clock skew on the capture host corrected by the clock service, pre-resized frames for inference.

Host B (inference host) runs the inference worker (serving the reference clock), the display, and a replay of
its own (stream ``local``: the one-host figure, measured at the same time under the same load). Host A (capture
host) replays the same file (stream ``remote``) with its clock 5 s off, publishing full frames for the display
and frames already at the engine's input size for the inference worker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from netns_helpers import hosts, skip_reason

from avloc.core.errors import UserError
from avloc.core.media import probe_video
from avloc.stream.capture.camera import parse_infer_size, resize_for_inference
from avloc.stream.run.report import read_latency_log
from avloc.stream.wire.security import make_keys

REPO = Path(__file__).resolve().parents[1]
SKEW_S = 5.0
WAIT_S = 300  # generous: on a loaded 2-core machine the workers' imports alone can take a minute
ORDER_SAME_HOST = ("infer_start", "visual_start", "infer_end", "publish", "display")
OFFSET_LINE = re.compile(r"clock offset ([+-][0-9.]+) s ± ([0-9.]+) ms")


def test_frames_resized_at_capture_give_the_inference_worker_the_same_input(tmp_path):
    """The capture worker's resize is the engine's own (engines.base.preprocess_frame), which then does nothing."""
    from avloc.engines.base import preprocess_frame

    manifest = {"image": {"size": 64, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}
    rng = np.random.default_rng(0)
    for shape in ((120, 160, 3), (48, 40, 3)):  # shrinking (INTER_AREA) and enlarging (INTER_LINEAR)
        frame = rng.integers(0, 256, shape, dtype=np.uint8)
        small = resize_for_inference(frame, (64, 64))
        assert small.shape == (64, 64, 3)
        np.testing.assert_array_equal(preprocess_frame(small, manifest), preprocess_frame(frame, manifest))
    assert parse_infer_size("224x160") == (224, 160) and parse_infer_size("96") == (96, 96)
    for bad in ("224x", "ax3", "1x1", "0"):
        with pytest.raises(UserError, match="--infer-size"):
            parse_infer_size(bad)


def _worker(host, role: str, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    argv = [sys.executable, "-m", "avloc", "worker", role, *args]
    with open(log, "w") as out:  # noqa: PTH123 - handed to the child, closed here
        return subprocess.Popen(host.command(argv), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _e2e_ms(records: list[dict], stream: str) -> np.ndarray:
    mine = [r for r in records if r["stream"] == stream and r["notice"] is None]
    return np.array([(r["ts"]["display"] - r["ts"]["capture"]) * 1000 for r in mine])


@pytest.mark.slow
@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_two_host_pipeline_with_skewed_clock_reports_one_host_latency(engine_and_video, tmp_path):
    engine, clip = engine_and_video  # conftest's: built once per session, read-only here
    keys = tmp_path / "keys"
    make_keys(keys)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AVLOC_RUN_TOKEN": "multihost-test-token"}
    env.pop("AVLOC_CLOCK_SKEW_S", None)
    latency_log, record = tmp_path / "latency.jsonl", tmp_path / "remote.mp4"
    with hosts(2) as (a, b):
        clock_ep = f"tcp://{b.address}:5554"
        common = ["--keys", str(keys)]
        replay_common = ["--frontend", str(engine), "--wait-timeout", str(WAIT_S), *common]
        procs = {
            "inference": _worker(
                b,
                "inference",
                [
                    "--engine", str(engine), "--threads", "1", "--max-frame-age", "1.0",
                    "--frames", "tcp://127.0.0.1:5550", "--audio", "tcp://127.0.0.1:5551",
                    "--frames", f"tcp://{a.address}:5560", "--audio", f"tcp://{a.address}:5551",
                    "--heatmaps", "tcp://127.0.0.1:5552", "--clock-serve", clock_ep, *common,
                ],
                tmp_path / "inference.log",
                env,
            ),
            "display": _worker(
                b,
                "display",
                [
                    "--frames", "tcp://127.0.0.1:5550", "--frames", f"tcp://{a.address}:5550",
                    "--heatmaps", "tcp://127.0.0.1:5552", "--headless", "--latency-log", str(latency_log),
                    "--record", str(record), "--record-stream", "remote", *common,
                ],
                tmp_path / "display.log",
                env,
            ),
            "local": _worker(
                b,
                "replay",
                [str(clip), "--stream-id", "local", "--frames", "tcp://127.0.0.1:5550",
                 "--audio", "tcp://127.0.0.1:5551", "--wait-subscribers", "2", *replay_common],
                tmp_path / "local.log",
                env,
            ),
            "remote": _worker(
                a,
                "replay",
                [
                    str(clip), "--stream-id", "remote",
                    "--frames", f"tcp://{a.address}:5550", "--audio", f"tcp://{a.address}:5551",
                    "--infer-frames", f"tcp://{a.address}:5560", "--infer-size", "64x64",
                    "--wait-subscribers", "1", "--clock", clock_ep, "--clock-timeout", str(WAIT_S), *replay_common,
                ],
                tmp_path / "remote.log",
                {**env, "AVLOC_CLOCK_SKEW_S": str(SKEW_S)},
            ),
        }  # fmt: skip
        try:
            for name in ("local", "remote"):
                assert procs[name].wait(timeout=WAIT_S + 60) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        finally:
            for name in ("display", "inference", "local", "remote"):  # display first: it finishes the recording
                if procs[name].poll() is None:
                    procs[name].terminate()
                    try:
                        procs[name].wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        procs[name].kill()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in procs}
    assert procs["display"].returncode == 0, logs["display"][-3000:]

    # the capture host measured its skew (reference - local = -5 s) to well under a millisecond
    found = OFFSET_LINE.search(logs["remote"])
    assert found, logs["remote"][-3000:]
    offset, uncertainty_ms = float(found.group(1)), float(found.group(2))
    assert abs(offset + SKEW_S) < 0.005 and uncertainty_ms < 5, (offset, uncertainty_ms)

    records = read_latency_log(latency_log)
    local, remote = _e2e_ms(records, "local"), _e2e_ms(records, "remote")
    assert len(local) >= 10 and len(remote) >= 10, (len(local), len(remote), logs["inference"][-2000:])
    # uncorrected, every remote latency would be about -5000 ms; corrected it is the one-host figure
    assert abs(np.median(remote) - np.median(local)) < 20, (np.median(remote), np.median(local))
    assert (remote > 0).all() and (remote < 2000).all(), remote
    for r in records:
        if r["stream"] == "remote" and r["notice"] is None:
            ts = r["ts"]
            slack = 0.002 + uncertainty_ms / 1000  # stamps of two hosts: ordered up to the offset's uncertainty
            assert ts["capture"] <= ts["send"] <= ts["received"] + slack, ts
            stamps = [ts[k] for k in ORDER_SAME_HOST]
            assert stamps == sorted(stamps), ts
    # the display got the capture host's full frames while inference was sent 64x64 ones
    info = probe_video(record)
    assert (info.width, info.height) == (160, 120)


def test_tap_reports_rate_bytes_and_shapes_of_what_arrives():
    import threading
    import time

    import zmq

    from avloc.stream.clients.tap import tap
    from avloc.stream.run.launcher import free_tcp_endpoint
    from avloc.stream.wire import protocol

    endpoint = free_tcp_endpoint()
    pub = protocol.make_socket(zmq.Context.instance(), zmq.PUB, endpoint, bind=True, hwm=100)
    stop = threading.Event()

    def publish() -> None:
        time.sleep(0.3)  # the tap's subscription first
        seq = 0
        while not stop.is_set():
            frame = np.zeros((12, 16, 3), np.uint8)
            protocol.send(pub, "frame", stream="s", seq=seq, ts={"capture": protocol.now()}, arrays={"frame": frame})
            seq += 1
            time.sleep(0.02)

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        report = tap([endpoint], seconds=0.5)[endpoint]
    finally:
        stop.set()
        thread.join()
        pub.close(0)
    assert report["messages"] >= 5 and report["kinds"] == {"frame": report["messages"]}
    assert report["arrays"] == {"frame 12x16x3": report["messages"]}
    assert report["bytes_per_message"] > 12 * 16 * 3 and report["bytes_per_s"] > 10 * 12 * 16 * 3
    assert 0 <= report["age_ms"]["p50"] < 1000

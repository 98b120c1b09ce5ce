"""``avloc run`` end to end, headless: a camera (a video file, which the camera worker reads at its frame rate
and reopens at its end) and the default microphone (PortAudio on ALSA's file plugin, fed in real time through
a pipe: tests/alsa_helpers.py) through the real live pipeline, until enough heatmaps came out; then Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from alsa_helpers import PipeMicrophone

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("capture", "send", "received", "infer_start", "visual_start", "infer_end", "publish", "display")


def test_run_camera_file_and_microphone_end_to_end(engine_and_video, tmp_path):
    engine, video = engine_and_video  # conftest's: built once per session, read-only here
    home, run_dir = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    rate = 16000
    tone = np.round(8000 * np.sin(2 * np.pi * 440.0 * np.arange(2 * rate) / rate)).astype(np.int16)
    # a loaded shared machine can stall the workers' start (and their interpreter's exit) for long: more slack
    # before one counts as hung or is killed at the end
    config = tmp_path / "stream.yaml"
    config.write_text(
        f"_base: {ROOT / 'configs' / 'stream.yaml'}\nstartup_grace_s: 180.0\n"
        "heartbeat_timeout_s: 30.0\nstop_timeout_s: 60.0\n"
    )
    command = [
        sys.executable,
        "-m",
        "avloc.cli",
        "run",
        "--camera",
        str(video),
        "--mic",
        "default",
        "--engine",
        str(engine),
        "--headless",
        "--auto-ports",
        "--threads",
        "1",
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
    ]
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1"}
    latency_log = run_dir / "latency.jsonl"

    def logs() -> dict[str, str]:
        return {p.name: p.read_text()[-1500:] for p in run_dir.glob("*.log")}

    with PipeMicrophone(home, tone, rate) as mic:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while True:  # until 10 heatmaps computed with the microphone's audio reached the display
                lines = latency_log.read_text().splitlines() if latency_log.is_file() else []
                if sum('"notice":null' in line for line in lines) >= 10:
                    break
                assert time.monotonic() < deadline, logs()
                assert proc.poll() is None, (proc.communicate()[1][-2000:], logs())
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, (err[-2000:], logs())
    assert "live pipeline running" in out
    assert mic.written >= rate  # the device delivered at least a second of audio

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reason"] == "stopped", logs()
    procs = summary["processes"]
    assert set(procs) == {"camera0", "microphone", "inference", "display"}
    outcome = {name: (p["restarts"], p["exit_code"]) for name, p in procs.items()}
    assert outcome == dict.fromkeys(procs, (0, 0)), (outcome, logs())
    assert procs["microphone"]["stats"]["windows"] >= 5 and procs["microphone"]["stats"]["reopens"] == 0
    assert "microphone 'default' open: 16000 Hz, 1 channel(s)" in (run_dir / "microphone.log").read_text()

    records = [json.loads(line) for line in (run_dir / "latency.jsonl").read_text().splitlines() if line]
    computed = [r for r in records if not r["notice"]]  # with the microphone's audio (else "no_audio")
    assert len(computed) >= 10, [r["notice"] for r in records]
    for r in computed:
        assert r["stream"] == "cam0" and r["audio_ms"] is not None
        stamps = [r["ts"][k] for k in ORDER]
        assert stamps == sorted(stamps), r["ts"]  # one monotonic clock through every process
        x, y = r["peak"]
        assert 0 <= x <= 1 and 0 <= y <= 1
    assert np.median([r["ts"]["display"] - r["ts"]["capture"] for r in computed]) < 1.0
    seqs = [r["seq"] for r in computed]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # camera frames in order, each once
    # the display saw the camera at the file's pace: no more heatmaps than 15 fps allow
    span = computed[-1]["ts"]["capture"] - computed[0]["ts"]["capture"]
    assert len(computed) <= 15 * span + 2
    # nothing of the run is left
    leftovers = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(run_dir) in " ".join(proc.info["cmdline"] or []):
                leftovers.append(proc.info["cmdline"])
        except psutil.Error:
            continue
    assert leftovers == []

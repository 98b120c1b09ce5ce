"""A live run that cannot see or hear says so: ``avloc run --camera 7 --mic default`` on a machine without
/dev/video7 and with no capture device (``HOME`` without an ALSA config: PortAudio finds no input) prints, on
the console, within 2 s of each worker's failure, which device, what was tried, the retry schedule and
`avloc devices`; neither worker is reported ready; the closing line says why there were no heatmaps."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _when(line: str) -> dt.datetime:
    match = STAMP.match(line)
    assert match, line
    return dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")


def _first(path: Path, text: str) -> str:
    return next(line for line in path.read_text().splitlines() if text in line)


@pytest.mark.skipif(Path("/dev/video7").exists(), reason="this machine has a /dev/video7")
@pytest.mark.timeout(240)
def test_missing_camera_and_microphone_are_explained(tiny_engine: Path, tmp_path: Path) -> None:
    home, run_dir = tmp_path / "home", tmp_path / "run"
    home.mkdir()  # no .asoundrc
    config = tmp_path / "stream.yaml"
    config.write_text("_base: stream.yaml\nstartup_grace_s: 180.0\n")  # a loaded machine starts workers slowly
    command = [sys.executable, "-m", "avloc.cli", "run", "--camera", "7", "--mic", "default"]
    command += ["--engine", str(tiny_engine), "--headless", "--auto-ports", "--threads", "1"]
    command += ["--config", str(config), "--run-dir", str(run_dir)]
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    wanted = ("camera0: cannot open camera 7", "microphone: cannot open the default microphone")
    try:
        deadline = time.monotonic() + 150
        while not all(any(w in line for line in lines) for w in wanted):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        time.sleep(1.5)  # a few more heartbeats: the problems must not be repeated
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        reader.join(10)
    console = "".join(lines)
    assert proc.returncode == 0, console[-3000:]

    camera = [line for line in lines if "camera0: cannot open" in line]
    assert len(camera) == 1, camera  # once, not per retry
    assert (
        "camera0: cannot open camera 7: /dev/video7 does not exist; tried OpenCV VideoCapture(7) (/dev/video7); "
        "retrying after 0.5 s, doubling up to every 10 s; `avloc devices` lists the cameras of this machine"
    ) in camera[0]
    mic = [line for line in lines if "microphone: cannot open" in line]
    assert len(mic) == 1, mic
    assert "tried PortAudio default input" in mic[0] and "retrying after 0.5 s, doubling up to every 10 s" in mic[0]
    assert "`avloc devices` lists the microphones of this machine" in mic[0]
    # within 2 s of the worker's own first failure (its log file, same wall clock)
    for said, log, text in ((camera[0], "camera0.log", "cannot open source 7"), (mic[0], "microphone.log", "cannot")):
        failed = _when(_first(run_dir / log, text))
        assert (_when(said) - failed).total_seconds() < 2.0, (said, failed)
    assert "camera0 ready" not in console and "microphone ready" not in console  # ready only once delivering

    assert "0 heatmaps" in out
    closing = next(line for line in out.splitlines() if "no heatmaps because" in line)
    assert "camera0 never delivered a frame (cannot open camera 7: /dev/video7 does not exist" in closing
    assert "microphone never delivered audio (cannot open the default microphone" in closing


def test_closing_line_reasons() -> None:
    from avloc.stream.capture.devices import why_no_heatmaps

    def summary(heatmaps: int, suppressed: int, **processes: dict) -> dict:
        procs = {n: {"stats": s, "exit_code": s.pop("exit_code", None)} for n, s in processes.items()}
        return {"latency": {"heatmaps": heatmaps, "suppressed": suppressed}, "processes": procs}

    assert why_no_heatmaps(summary(5, 0, camera0={"grabbed": 0, "problem": "x"})) is None  # there were some
    no_audio = why_no_heatmaps(summary(0, 40, replay={"frames": 40}, inference={"frames": 40}))
    assert no_audio == (
        "no heatmaps because all 40 frame(s) had no audio to pair with (--mic none, a file without an audio "
        "track, or audio windows older than max_audio_age_s)"
    )
    # before: a pcm_f32le track of NaNs was blamed on a missing track / --mic none
    nan_audio = {"frames": 30, "rejects": {"frames": {}, "audio": {"non_finite": 19}}}
    assert why_no_heatmaps(summary(0, 30, replay={"frames": 30}, inference0=nan_audio)) == (
        "no heatmaps because all 30 frame(s) had no audio to pair with: the inference worker refused 19 audio "
        "window(s) holding NaN or infinite samples (a damaged or float audio track)"
    )
    bad_mic = why_no_heatmaps(summary(0, 0, camera0={"grabbed": 9}, microphone={"windows": 0, "exit_code": 2}))
    assert bad_mic == "no heatmaps because microphone could not start (see its error above)"
    assert why_no_heatmaps(summary(0, 0, replay={}, inference={"frames": 0})) == (
        "no heatmaps because the inference worker received no frames"
    )

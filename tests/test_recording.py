"""Crash-safe recordings: kill -9 of a recording process loses at most about a second; a restarted recorder of the
same run continues into a new segment and the clean close joins them all (with the source's audio)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from avloc.core.media import iter_video, probe_video
from avloc.stream.clients.recording import Recorder, segment_paths

FPS = 30

# Records a frame every 1/30 s (real time) and prints the media time of each frame written.
RECORDING_PROCESS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from avloc.stream.clients.recording import Recorder

    rec = Recorder(Path(sys.argv[1]), fps=30, run="crash")
    start, i = time.monotonic(), 0
    while True:
        image = np.full((48, 64, 3), (i * 3) % 256, np.uint8)
        rec.write(image, i / 30)
        print(i / 30, flush=True)
        i += 1
        time.sleep(max(0.0, start + i / 30 - time.monotonic()))
""")


def _frames(path: Path) -> list[float]:
    return [t for t, _ in iter_video(path)]


def test_kill9_mid_recording_loses_at_most_a_second(tmp_path):
    out = tmp_path / "out.mp4"
    proc = subprocess.Popen([sys.executable, "-c", RECORDING_PROCESS, str(out)], stdout=subprocess.PIPE, text=True)
    written = 0.0
    try:
        deadline = time.monotonic() + 120
        while written < 4.0:  # 4 s of media handed to the recorder
            assert time.monotonic() < deadline and proc.poll() is None, "recorder did not get going"
            written = float(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [segment] = segment_paths(out, "crash")
    times = _frames(segment)  # the killed process's segment plays as it is
    assert times[0] == pytest.approx(0.0, abs=0.01)
    assert times[-1] >= written - 1.0 - 1.0 / FPS, (times[-1], written)
    assert np.all(np.diff(times) > 0)


def test_restarted_recorder_continues_and_close_joins_with_audio(tmp_path):
    from avloc.core.data.synth import write_synth_video

    source = tmp_path / "src.mp4"
    write_synth_video(source, seconds=2.0, fps=15, size=(64, 48), seed=1)
    out = tmp_path / "out.mp4"
    first = Recorder(out, fps=FPS, run="r1")
    for i in range(30):  # 0 .. 1 s, then the display "dies": its segment is left unjoined
        first.write(np.full((48, 64, 3), 50, np.uint8), i / FPS)
    assert first.close(join=False) == first.segment
    second = Recorder(out, audio_source=source, fps=FPS, run="r1")
    assert second.segment.name == ".out.r1.001.mp4"
    for i in range(30, 60):  # 1 .. 2 s from the restarted display
        second.write(np.full((48, 64, 3), 200, np.uint8), i / FPS)
    assert second.close() == out
    assert segment_paths(out, "r1") == []  # joined and removed
    frames = list(iter_video(out))
    assert len(frames) == 60
    means = [float(image.mean()) for _, image in frames]
    assert max(means[:30]) < 100 < min(means[30:])  # the first display's second, then the second one's
    info = probe_video(out)
    assert info.has_audio and abs(info.duration - 2.0) < 0.2


def test_join_shifts_a_segment_whose_clock_started_over(tmp_path):
    out = tmp_path / "out.mp4"
    paths = []
    for _ in range(2):
        rec = Recorder(out, fps=FPS, run="loop")
        for i in range(15):  # both segments at media 0 .. 0.5 s (a replay --loop and a restarted display)
            rec.write(np.zeros((48, 64, 3), np.uint8), i / FPS)
        paths.append(rec.close(join=False))
    done = subprocess.run(
        [sys.executable, "-m", "avloc.stream.clients.recording", str(out), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    times = _frames(out)
    assert len(times) == 30 and np.all(np.diff(times) > 0) and times[-1] == pytest.approx(29 / FPS, abs=0.05)

"""Replay capture worker on small files made here with PyAV: paced frames and causal audio windows from the
file's own track (checked against the offline front-end), a file without audio at full speed with
back-pressure, truncated files, and looping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import zmq
from proc_helpers import orphans

from avloc.core.audio import FrontEnd, FrontEndConfig, load_audio
from avloc.stream.capture.replay import ReplaySource
from avloc.stream.run.launcher import free_tcp_endpoint
from avloc.stream.wire import protocol

FPS = 30
STEP = 4  # frame i is flat grey STEP * i: a received frame tells its index
SR = 16000


def _make_video(
    path: Path, seconds: float, *, audio_rate: int | None = 44100, channels: int = 2, size: tuple[int, int] = (64, 48)
) -> Path:
    """Grey-ramp video; audio (if any) is a 600 Hz tone for the first half and 2400 Hz for the second."""
    container = av.open(str(path), "w")
    video_codec = "libvpx" if path.suffix == ".webm" else "libx264"
    video = container.add_stream(video_codec, rate=FPS)
    video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
    audio = None
    if audio_rate:
        audio_codec = "libopus" if path.suffix == ".webm" else "aac"
        layout = "stereo" if channels == 2 else "mono"
        audio = container.add_stream(audio_codec, rate=audio_rate, layout=layout)
    n = round(seconds * FPS)
    for i in range(n):
        image = np.full((size[1], size[0], 3), (STEP * i) % 256, np.uint8)
        for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    if audio is not None:
        t = np.arange(round(seconds * audio_rate)) / audio_rate
        freq = np.where(t < seconds / 2, 600.0, 2400.0)
        tone = (0.4 * np.sin(2 * np.pi * np.cumsum(freq) / audio_rate)).astype(np.float32)
        planes = np.repeat(tone[None], channels, axis=0)
        for start in range(0, planes.shape[1], 960):
            chunk = np.ascontiguousarray(planes[:, start : start + 960])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate, frame.pts = audio_rate, start
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode(None):
            container.mux(packet)
    for packet in video.encode(None):
        container.mux(packet)
    container.close()
    return path


class _Collector:
    """Subscribes to a replay worker's frames and audio until its 'end' control message."""

    def __init__(self, ctx: zmq.Context, frames_ep: str, audio_ep: str, frame_delay_s: float = 0.0) -> None:
        self.frames_sock = protocol.make_socket(ctx, zmq.SUB, frames_ep, bind=False, hwm=4)
        self.audio_sock = protocol.make_socket(ctx, zmq.SUB, audio_ep, bind=False, hwm=1000)
        self.frame_delay_s = frame_delay_s
        self.frames: list[tuple[protocol.Message, float]] = []
        self.audio: list[protocol.Message] = []
        self.controls: list[protocol.Message] = []

    def run(self, timeout_s: float, proc: subprocess.Popen | None = None) -> protocol.Message | None:
        poller = zmq.Poller()
        poller.register(self.frames_sock, zmq.POLLIN)
        poller.register(self.audio_sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = dict(poller.poll(200))
            if self.audio_sock in ready:
                while (msg := protocol.recv(self.audio_sock, timeout_ms=0)) is not None:
                    self.audio.append(msg)
            if self.frames_sock in ready:
                msg = protocol.recv(self.frames_sock, timeout_ms=0)
                arrival = protocol.now()
                if msg.kind == "frame":
                    self.frames.append((msg, arrival))
                    if self.frame_delay_s:
                        time.sleep(self.frame_delay_s)  # a slow subscriber
                elif msg.kind == "control":
                    self.controls.append(msg)
                    if msg.meta.get("command") == protocol.CONTROL_END:
                        return msg
            if proc is not None and proc.poll() is not None and not ready:
                return None
        return None


def _start(video: Path, frames_ep: str, audio_ep: str, log_file: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "avloc.stream.capture.replay",
        str(video),
        "--frames",
        frames_ep,
        "--audio",
        audio_ep,
        "--log-file",
        str(log_file),
        "--wait-timeout",
        "30",
        *extra,
    ]
    return subprocess.Popen(command, env=env)


def _finish(proc: subprocess.Popen, timeout_s: float = 30) -> int:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert orphans(timeout=0) == []  # no orphans
    return proc.returncode


@pytest.fixture()
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_replay_paces_frames_and_publishes_causal_windows(tmp_path, ctx):
    video = _make_video(tmp_path / "tone.mp4", seconds=2.0)
    frames_ep, audio_ep = free_tcp_endpoint(), free_tcp_endpoint()
    collector = _Collector(ctx, frames_ep, audio_ep)
    proc = _start(video, frames_ep, audio_ep, tmp_path / "replay.log", "--stream-id", "cam3")
    end = collector.run(timeout_s=90, proc=proc)
    code = _finish(proc)
    log_text = (tmp_path / "replay.log").read_text()
    assert code == 0 and end is not None, log_text
    assert end.meta["error"] is None

    frames = [m for m, _ in collector.frames]
    assert len(frames) == 2 * FPS and all(m.stream == "cam3" for m in frames)
    assert [m.seq for m in frames] == list(range(len(frames)))
    pts = np.array([m.meta["pts"] for m in frames])
    capture = np.array([m.ts["capture"] for m in frames])
    for i, m in enumerate(frames):
        assert abs(float(m.arrays["frame"].mean()) / STEP - i) < 1.0  # frames in order, BGR uint8
        assert m.arrays["frame"].shape == (48, 64, 3) and m.meta["has_audio"] is True
    # the capture stamp is the frame's media time mapped onto the clock (speed 1.0) ...
    np.testing.assert_allclose(np.diff(capture), np.diff(pts), atol=1e-6)
    # ... and the frames really are sent then: their wall-clock arrival here follows pts (not a burst, not
    # another speed): arrival against media time has slope 1, and frames arrive close to their own time
    arrival = np.array([a for _, a in collector.frames])
    elapsed, media = arrival - arrival[0], pts - pts[0]
    assert media[-1] > 1.9
    slope = np.polyfit(media, elapsed, 1)[0]
    assert 0.9 < slope < 1.1, slope
    deviation = elapsed - media
    assert np.percentile(np.abs(deviation - np.median(deviation)), 90) < 0.1, deviation
    assert np.all(arrival >= capture - 0.005)
    assert np.median(arrival - capture) < 0.1

    config = FrontEndConfig()
    windows = collector.audio
    ends = np.array([m.meta["end_sample"] for m in windows])
    assert len(windows) >= 15
    assert np.all(np.diff(ends) == 1600) and ends[0] == 1600  # a window every 0.1 s from the first hop
    # window_end and capture share one clock mapping (media time -> monotonic)
    offset = capture[0] - pts[0]
    for m in windows:
        assert m.ts["window_end"] == pytest.approx(offset + m.meta["end_sample"] / SR, abs=1e-3)
        assert m.meta["frontend"]["kind"] == "linear" and m.arrays["spec"].shape == config.output_shape()
    assert ends[-1] / SR <= pts[-1] + 1e-6  # nothing from after the last frame

    # causal: each window is the offline front-end of the file's audio up to its end (silence before start)
    wave = load_audio(video, SR)
    padded = np.concatenate([np.zeros(config.num_samples, np.float32), wave])
    module = FrontEnd(config).eval()
    for m in windows[::4]:
        stop = config.num_samples + m.meta["end_sample"]
        ref = module.compute(padded[stop - config.num_samples : stop])
        assert np.corrcoef(m.arrays["spec"].ravel(), ref.ravel())[0, 1] > 0.99
    # the tone switches from 600 to 2400 Hz at 1.0 s: windows ending before it hold no 2400 Hz energy
    bin_600, bin_2400 = round(600 / 31.25), round(2400 / 31.25)
    for m in windows:
        energy = np.exp(12.0 * m.arrays["spec"][0].astype(np.float64)).mean(axis=1)
        end_s = m.meta["end_sample"] / SR
        if end_s < 0.95:
            assert energy[bin_600] > 100 * energy[bin_2400], end_s
        elif end_s > 1.3:
            assert energy[bin_2400] > energy[bin_2400 - 10] * 100, end_s


def test_file_without_audio_at_max_speed_with_backpressure(tmp_path, ctx):
    video = _make_video(tmp_path / "silent.webm", seconds=1.5, audio_rate=None)
    frames_ep, audio_ep = free_tcp_endpoint(), free_tcp_endpoint()
    # A subscriber taking 20 ms per frame, far slower than decoding: at --speed max nothing may be lost.
    collector = _Collector(ctx, frames_ep, audio_ep, frame_delay_s=0.02)
    proc = _start(video, frames_ep, audio_ep, tmp_path / "replay.log", "--speed", "max")
    end = collector.run(timeout_s=90, proc=proc)
    code = _finish(proc)
    assert code == 0 and end is not None, (tmp_path / "replay.log").read_text()
    frames = [m for m, _ in collector.frames]
    assert [m.seq for m in frames] == list(range(round(1.5 * FPS)))  # every frame, none dropped
    assert all(m.meta["notice"] == protocol.NOTICE_NO_AUDIO and m.meta["has_audio"] is False for m in frames)
    assert collector.audio == []
    assert any(c.meta.get("notice") == protocol.NOTICE_NO_AUDIO for c in collector.controls)
    # back-pressure, not a queue: the replay waited for the subscriber (>= 20 ms per frame overall)
    arrival = np.array([a for _, a in collector.frames])
    assert arrival[-1] - arrival[0] >= 0.02 * (len(frames) - 1) * 0.9


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_truncated_file_logs_an_error_and_ends(tmp_path, ctx, suffix):
    whole = _make_video(tmp_path / f"whole{suffix}", seconds=3.0)
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    frames_ep, audio_ep = free_tcp_endpoint(), free_tcp_endpoint()
    collector = _Collector(ctx, frames_ep, audio_ep)
    proc = _start(cut, frames_ep, audio_ep, tmp_path / "replay.log", "--speed", "max", "--wait-timeout", "20")
    end = collector.run(timeout_s=90, proc=proc)
    code = _finish(proc)
    log_text = (tmp_path / "replay.log").read_text()
    assert code == 0, log_text
    assert end is not None and end.meta["error"], log_text
    assert " ERROR " in log_text
    assert len(collector.frames) < 3 * FPS


def test_loop_continues_clock_and_audio(tmp_path):
    video = _make_video(tmp_path / "short.mkv", seconds=1.0, audio_rate=22050, channels=1)
    ctx = zmq.Context()
    frames_ep, audio_ep = free_tcp_endpoint(), free_tcp_endpoint()
    collector = _Collector(ctx, frames_ep, audio_ep)
    source = ReplaySource(video, frames_ep, audio_ep, speed=4.0, loop=True, wait_timeout_s=20)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(source.run(max_frames=75)))
    worker.start()
    try:
        end = collector.run(timeout_s=60)
    finally:
        worker.join(30)
        ctx.destroy(linger=0)
    assert not worker.is_alive()
    assert end is not None and result["loops"] == 2 and result["error"] is None
    frames = [m for m, _ in collector.frames]
    assert len(frames) == 75
    capture = np.array([m.ts["capture"] for m in frames])
    # one continuous clock over the loops: every step is 1/30 s of media at 4x speed (Matroska: ms timestamps)
    np.testing.assert_allclose(np.diff(capture), 1 / FPS / 4, atol=0.001 / 4 + 1e-6)
    assert [round(m.arrays["frame"].mean() / STEP) for m in frames[28:33]] == [28, 29, 0, 1, 2]
    ends = np.array([m.meta["end_sample"] for m in collector.audio])
    assert len(ends) >= 20 and np.all(np.diff(ends) == 1600)  # audio windows run on across the loop


def test_variable_frame_rate_is_paced_by_timestamps(tmp_path):
    from fractions import Fraction

    pts_ms = [0, 33, 50, 120, 130, 200, 400, 410, 500, 700]
    path = tmp_path / "vfr.mkv"
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=30)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    stream.codec_context.time_base = Fraction(1, 1000)
    for i, pts in enumerate(pts_ms):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), STEP * i, np.uint8), format="rgb24")
        frame.pts, frame.time_base = pts, Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()

    ctx = zmq.Context()
    frames_ep, audio_ep = free_tcp_endpoint(), free_tcp_endpoint()
    collector = _Collector(ctx, frames_ep, audio_ep)
    source = ReplaySource(path, frames_ep, audio_ep, speed=2.0, wait_timeout_s=20)
    worker = threading.Thread(target=source.run)
    worker.start()
    try:
        end = collector.run(timeout_s=60)
    finally:
        worker.join(30)
        ctx.destroy(linger=0)
    assert end is not None and end.meta["error"] is None
    frames = [m for m, _ in collector.frames]
    assert [m.meta["pts"] for m in frames] == pytest.approx([p / 1000 for p in pts_ms])
    capture = np.array([m.ts["capture"] for m in frames])
    np.testing.assert_allclose(np.diff(capture), np.diff(pts_ms) / 1000 / 2.0, atol=1e-6)
    arrival = np.array([a for _, a in collector.frames])
    assert np.all(np.abs(arrival - capture) < 0.1)  # published at those times, not just stamped with them

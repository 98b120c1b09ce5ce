"""Microphone worker: the ring buffer and windowing fed with blocks of a real recording, and the whole worker
process through a real sounddevice/PortAudio stream reading that recording (ALSA file plugin, no sound card),
compared with the offline front-end on the same samples."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from alsa_helpers import PipeMicrophone, file_microphone
from proc_helpers import orphans

from avloc.core.audio import FrontEnd, FrontEndConfig, load_audio
from avloc.stream.capture.microphone import AudioWindower, SampleRing
from avloc.stream.run.launcher import free_tcp_endpoint
from avloc.stream.wire import protocol

RECORDING = Path("/usr/share/tuxpaint/stamps/animals/birds/blackbird.ogg")  # 44.1 kHz mono, 7.9 s birdsong
SR = 16000

pytestmark = pytest.mark.skipif(not RECORDING.exists(), reason="needs Debian's tuxpaint-stamps-default")


@pytest.fixture(scope="module")
def frontend():
    config = FrontEndConfig()  # linear, 3 s, as SSL-Align
    return config, FrontEnd(config).eval()


def _int16(wave: np.ndarray) -> np.ndarray:
    return np.clip(np.round(wave * 32768), -32768, 32767).astype(np.int16)


def _window(samples: np.ndarray, end: int, n: int) -> np.ndarray:
    """``samples[end - n : end]`` with silence before the first sample (the worker pre-fills its window)."""
    padded = np.concatenate([np.zeros(n, np.float32), samples.astype(np.float32)])
    return padded[end : end + n]


def _offline(frontend, samples: np.ndarray, end: int) -> np.ndarray:
    config, module = frontend
    return module.compute(_window(samples, end, config.num_samples))


def _peak_bin(spec: np.ndarray) -> int:
    """Frequency bin with the most energy over the window (undoing the linear front-end's log(S)/12)."""
    return int(np.argmax(_band_energy(spec)))


def _band_energy(spec: np.ndarray) -> np.ndarray:
    return np.exp(12.0 * spec[0].astype(np.float64)).mean(axis=1)


def _feed_in_blocks(
    ring: SampleRing, windower: AudioWindower, data: np.ndarray, rate: int, rng, clock0: float = 100.0
) -> list:
    """Write blocks of random size (as a PortAudio callback would) and poll the consumer now and then."""
    out = []
    pos = 0
    while pos < len(data):
        n = int(rng.integers(64, 2048))
        block = data[pos : pos + n, None]
        assert ring.write(block, clock0 + (pos + len(block)) / rate)
        pos += len(block)
        if rng.random() < 0.3:
            out += windower.poll()
    return out + windower.poll()


def test_ring_and_windows_match_offline_frontend(frontend):
    config, _ = frontend
    recording = _int16(load_audio(RECORDING, SR))
    samples = recording.astype(np.float32) / 32768
    ring = SampleRing(capacity=SR * 4, channels=1)
    hop = 1600
    windower = AudioWindower(ring, config, device_rate=SR, hop_samples=hop, max_lag_s=None)
    windows = _feed_in_blocks(ring, windower, recording, SR, np.random.default_rng(0))

    expected_ends = list(range(config.num_samples, len(recording) + 1, hop))
    assert [end for end, _, _ in windows] == expected_ends
    for end, t_end, spec in windows:
        assert spec.shape == config.output_shape()
        np.testing.assert_allclose(spec, _offline(frontend, samples, end), atol=1e-4)
        # the window's end is stamped with the capture clock of its last sample
        assert t_end == pytest.approx(100.0 + end / SR, abs=1e-6)
    assert ring.dropped_frames == 0 and ring.read_pos == ring.write_pos == len(recording)


def test_windows_start_one_hop_in_on_silence_as_replay_does(frontend):
    """The worker's windower pre-fills its window with silence (replay's ``num_samples - hop`` zeros): the first
    window ends one hop into the capture, each window equals the offline front-end on silence + the audio
    before it, ``end_sample`` counts captured samples; a skip-ahead after a stall adds no silence."""
    config, _ = frontend
    recording = _int16(load_audio(RECORDING, SR))
    samples = recording.astype(np.float32) / 32768
    hop = 4000
    ring = SampleRing(capacity=SR * 10, channels=1)
    windower = AudioWindower(ring, config, device_rate=SR, hop_samples=hop, max_lag_s=None, prefill=True)
    windows = _feed_in_blocks(ring, windower, recording, SR, np.random.default_rng(2))
    assert [end for end, _, _ in windows] == list(range(hop, len(recording) + 1, hop))
    for end, t_end, spec in windows:
        np.testing.assert_allclose(spec, _offline(frontend, samples, end), atol=1e-4)
        assert t_end == pytest.approx(100.0 + end / SR, abs=1e-6)
    first = windows[0][2]
    assert first[0, :, -5:].std() > 0 and np.ptp(first[0, :, :-30]) == 0  # audio at the end, silence before

    skipping = AudioWindower(SampleRing(SR * 10, 1), config, device_rate=SR, hop_samples=hop, prefill=True)
    skipping.ring.write(recording[:, None], 50.0)  # a stall: 7.9 s at once, more than a window + max_lag
    end, _, spec = skipping.poll()[-1]
    assert skipping.skipped_frames > 0 and end == len(recording)
    np.testing.assert_allclose(spec, _offline(frontend, samples, end), atol=1e-4)


def test_ring_wraps_and_counts_overflow_without_corrupting():
    ring = SampleRing(capacity=1000, channels=2)
    data = np.arange(4000, dtype=np.int16).reshape(2000, 2)
    assert ring.write(data[:700], 1.0)
    np.testing.assert_array_equal(ring.read(500), data[:500])
    assert ring.write(data[700:1500], 2.0)  # wraps around the end of the buffer
    assert not ring.write(data[1500:1600], 3.0)  # 1000 stored: no room, dropped whole
    assert (ring.dropped_frames, ring.dropped_blocks) == (100, 1)
    np.testing.assert_array_equal(ring.read(), data[500:1500])
    assert ring.available == 0
    assert ring.write(data[1600:1700], 4.0)
    np.testing.assert_array_equal(ring.read(), data[1600:1700])
    # the dropped block never got an anchor: time of position 1600 (stored frames) is the last block's end
    assert ring.time_at(1600, 100.0) == pytest.approx(4.0)
    assert ring.time_at(1550, 100.0) == pytest.approx(3.5)


def test_consumer_skips_ahead_when_far_behind(frontend):
    config, _ = frontend
    recording = _int16(load_audio(RECORDING, SR))
    samples = recording.astype(np.float32) / 32768
    ring = SampleRing(capacity=SR * 10, channels=1)
    windower = AudioWindower(ring, config, device_rate=SR, hop_samples=1600, max_lag_s=1.0)
    ring.write(recording[:, None], 50.0)  # 7.9 s arrive at once: 4.9 s more than a window
    windows = windower.poll()
    assert windower.skipped_frames > 0
    end, _, spec = windows[-1]
    assert end == len(recording)  # the newest window ends at the newest sample
    np.testing.assert_allclose(spec, _offline(frontend, samples, end), atol=1e-4)


def test_resampled_device_matches_offline_frontend(frontend):
    """A device stuck at 44.1 kHz: libswresample in the consumer vs torchaudio's resampling offline."""
    import soundfile as sf

    config, _ = frontend
    native, rate = sf.read(RECORDING, dtype="float32")
    assert rate == 44100
    ring = SampleRing(capacity=rate * 4, channels=1)
    windower = AudioWindower(ring, config, device_rate=rate, hop_samples=4000, max_lag_s=None)
    windows = _feed_in_blocks(ring, windower, _int16(native), rate, np.random.default_rng(1))
    offline_wave = load_audio(RECORDING, SR)
    assert len(windows) >= 5
    for end, t_end, spec in windows:
        if end > len(offline_wave):
            continue
        ref = _offline(frontend, offline_wave, end)
        corr = np.corrcoef(spec.ravel(), ref.ravel())[0, 1]
        assert corr > 0.98, corr
        # same distribution of energy over frequency
        assert np.corrcoef(_band_energy(spec), _band_energy(ref))[0, 1] > 0.99
        assert t_end == pytest.approx(100.0 + end / SR, abs=2 / SR)


def test_worker_through_a_real_portaudio_stream(frontend, tmp_path):
    """ALSA's file plugin serves a raw 16-bit recording as the default capture device (shared/README)."""
    config, _ = frontend
    recording = _int16(load_audio(RECORDING, SR))
    samples = recording.astype(np.float32) / 32768
    raw = tmp_path / "clip.s16le"
    recording.astype("<i2").tofile(raw)
    (tmp_path / ".asoundrc").write_text(
        'pcm.!default { type plug slave.pcm "filein" }\n'
        f'pcm.filein {{ type file slave.pcm "nullpcm" file "/dev/null" infile "{raw}" format "raw" }}\n'
        "pcm.nullpcm { type null }\n"
    )
    endpoint = free_tcp_endpoint()
    env = {**os.environ, "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    # The file plugin delivers samples far faster than real time: keep every sample (big ring, no skipping).
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avloc.stream.capture.microphone",
            "--device",
            "default",
            "--endpoint",
            endpoint,
            "--hop",
            "0.25",
            "--ring-seconds",
            "30",
            "--max-lag",
            "-1",
            "--wait-subscribers",
            "1",
            "--stream-id",
            "mic9",
            "--log-file",
            str(tmp_path / "mic.log"),
        ],
        env=env,
    )
    ctx = zmq.Context()
    sub = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=1000)
    received = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            msg = protocol.recv(sub, timeout_ms=500)
            if msg is not None:
                received.append(msg)
                if msg.meta["end_sample"] >= len(recording):
                    break
            assert proc.poll() is None, (tmp_path / "mic.log").read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        ctx.destroy(linger=0)
    assert proc.returncode == 0, (tmp_path / "mic.log").read_text()
    assert orphans(timeout=0) == []
    inside = [m for m in received if m.meta["end_sample"] <= len(recording)]
    assert len(inside) >= 5, [m.meta["end_sample"] for m in received]
    for msg in inside:
        assert msg.kind == "audio" and msg.stream == "mic9"
        assert msg.meta["sample_rate"] == SR and msg.meta["frontend"]["kind"] == "linear"
        assert (msg.meta["end_sample"] - config.num_samples) % 4000 == 0  # one window per 0.25 s hop
        spec = msg.arrays["spec"]
        ref = _offline(frontend, samples, msg.meta["end_sample"])
        assert np.corrcoef(spec.ravel(), ref.ravel())[0, 1] > 0.999
        assert _peak_bin(spec) == _peak_bin(ref)
        np.testing.assert_allclose(spec, ref, atol=1e-3)
        assert np.isfinite(msg.ts["window_end"]) and msg.ts["window_end"] <= msg.ts["send"]


def test_devices_are_listed_and_selected_by_name(tmp_path):
    (tmp_path / ".asoundrc").write_text("pcm.!default { type null }\npcm.quietmic { type null }\n")
    code = (
        "import json\n"
        "from avloc.core.errors import UserError\n"
        "from avloc.stream.capture.microphone import list_devices, resolve_input_device\n"
        "devices = list_devices()\n"
        "try:\n"
        "    resolve_input_device('no such mic')\n"
        "    missing = None\n"
        "except UserError as err:\n"
        "    missing = str(err)\n"
        "print(json.dumps({**devices, 'quiet': resolve_input_device('QUIETMIC'), 'missing': missing}))\n"
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    names = {m["name"]: m for m in result["microphones"]}
    assert "quietmic" in names and names["default"]["default"] is True
    assert result["quiet"] == names["quietmic"]["index"]
    assert "no such mic" in result["missing"] and "avloc devices" in result["missing"]
    assert isinstance(result["cameras"], list)


def _run_worker(home: Path, endpoint: str, *args: str, code: str | None = None) -> subprocess.Popen:
    """The microphone worker process with ``HOME=home`` (its ALSA config); ``code``: a driver to run instead
    of ``python -m avloc.stream.capture.microphone`` (it gets the same arguments)."""
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1"}
    head = ["-c", code] if code else ["-m", "avloc.stream.capture.microphone"]
    return subprocess.Popen(
        [
            sys.executable,
            *head,
            "--device",
            "default",
            "--endpoint",
            endpoint,
            "--wait-subscribers",
            "1",
            "--stream-id",
            "mic9",
            "--log-file",
            str(home / "mic.log"),
            *args,
        ],
        env=env,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_worker_resamples_and_mixes_down_a_stereo_44k_device(frontend, tmp_path):
    """A device that captures only at 44.1 kHz in stereo: the worker mixes the two channels down (mean) and
    resamples to the front-end's 16 kHz; windows match the offline front-end on the same mix (torchaudio's
    resampling). Left: the birdsong; right: a 3 kHz tone that only the mix down can bring in."""
    import soundfile as sf

    from avloc.core.audio import resample

    config, module = frontend
    native, rate = sf.read(RECORDING, dtype="float32")
    n = len(native)
    left = _int16(0.8 * native)
    right = _int16(0.25 * np.sin(2 * np.pi * 7000.0 * np.arange(n) / rate))
    file_microphone(tmp_path, np.stack([left, right], axis=1))  # interleaved L R
    mix = (left.astype(np.float32) + right.astype(np.float32)) / 2 / 32768
    reference = resample(mix, rate, SR)
    left_only = resample(left.astype(np.float32) / 2 / 32768, rate, SR)
    driver = (
        "import sys\nfrom avloc.stream.capture import microphone\n"
        "microphone._pick_rate_and_channels = lambda device, wanted: (44100, 2)  # all the device offers\n"
        "sys.exit(microphone.main(sys.argv[1:]))\n"
    )
    endpoint = free_tcp_endpoint()
    proc = _run_worker(tmp_path, endpoint, "--hop", "0.25", "--ring-seconds", "30", "--max-lag", "-1", code=driver)
    ctx = zmq.Context()
    sub = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=1000)
    received = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (received and received[-1].meta["end_sample"] >= len(reference)):
            msg = protocol.recv(sub, timeout_ms=500)
            if msg is not None:
                received.append(msg)
            assert proc.poll() is None, (tmp_path / "mic.log").read_text()
    finally:
        _stop(proc)
        ctx.destroy(linger=0)
    log_text = (tmp_path / "mic.log").read_text()
    assert proc.returncode == 0, log_text
    assert "44100 Hz, 2 channel(s)" in log_text and "resampled to 16000 Hz" in log_text
    inside = [m for m in received if m.meta["end_sample"] <= len(reference)]
    assert len(inside) >= 5, [m.meta["end_sample"] for m in received]
    tone_bin = round(7000 / 31.25)
    for msg in inside:
        end = msg.meta["end_sample"]
        assert msg.meta["sample_rate"] == SR and (end - config.num_samples) % 4000 == 0
        spec = msg.arrays["spec"]
        ref = module.compute(_window(reference, end, config.num_samples))
        assert np.corrcoef(spec.ravel(), ref.ravel())[0, 1] > 0.98
        assert np.corrcoef(_band_energy(spec), _band_energy(ref))[0, 1] > 0.99
        assert abs(float((spec - ref).mean())) < 0.03  # the mean of the channels, not their sum (+0.12)
        # the right channel's tone is in the mix at its level: 1/2 of 0.25 amplitude, not missing
        tone = _band_energy(spec)[tone_bin]
        assert 0.5 < tone / _band_energy(ref)[tone_bin] < 2.0
        assert tone > 100 * _band_energy(module.compute(_window(left_only, end, config.num_samples)))[tone_bin]


def test_worker_reopens_an_unplugged_microphone(tmp_path):
    """A real-time device that stops delivering (unplugged: PortAudio's read blocks) is closed and reopened
    after 2 s; windows resume, numbered on, stamped on the same clock, after the silence."""
    recording = _int16(load_audio(RECORDING, SR))
    endpoint = free_tcp_endpoint()
    frontend = json.dumps({"kind": "linear", "window_seconds": 1.0})
    ctx = zmq.Context()
    sub = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=1000)
    received: list[tuple[float, protocol.Message]] = []

    def collect(count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        goal = len(received) + count
        while len(received) < goal:
            assert time.monotonic() < deadline, f"{len(received)} windows; log:\n{log.read_text()}"
            msg = protocol.recv(sub, timeout_ms=200)
            if msg is not None:
                received.append((protocol.now(), msg))
            assert proc.poll() is None, log.read_text()

    log = tmp_path / "mic.log"
    heartbeats = free_tcp_endpoint()
    beats = protocol.make_socket(ctx, zmq.SUB, heartbeats, bind=True, hwm=10000)
    said: list[tuple[str | None, str | None]] = []  # the heartbeats' (state, problem), each change once
    done = threading.Event()

    def listen() -> None:  # read while the worker runs: a disconnected peer's queued messages are dropped
        while not done.is_set():
            if (beat := protocol.recv(beats, 100)) is not None:
                stats = beat.meta["stats"]
                if not said or said[-1] != (stats.get("state"), stats.get("problem")):
                    said.append((stats.get("state"), stats.get("problem")))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    with PipeMicrophone(tmp_path, recording, SR) as mic:
        proc = _run_worker(tmp_path, endpoint, "--hop", "0.1", "--frontend", frontend, "--heartbeat", heartbeats)
        try:
            collect(8, 60)
            mic.unplug()
            unplugged_at = protocol.now()
            deadline = time.monotonic() + 30
            while "reopening" not in (log.read_text() if log.is_file() else ""):
                assert time.monotonic() < deadline, log.read_text()
                if (msg := protocol.recv(sub, timeout_ms=100)) is not None:
                    received.append((protocol.now(), msg))
            before = len(received)
            mic.replug()
            collect(8, 30)
        finally:
            time.sleep(1.0)  # a heartbeat or two after the recovery
            _stop(proc)
            done.set()
            listener.join(5)
            ctx.destroy(linger=0)
    stopped = (
        "stopped delivering: the default microphone sent no samples for 2 s; reopening, retrying after 0.5 s, "
        "doubling up to every 10 s; `avloc devices` lists the microphones of this machine"
    )
    assert ("ok", None) in said and ("ok", stopped) in said and said[-1] == ("ok", None), said
    log_text = log.read_text()
    assert proc.returncode == 0, log_text
    assert orphans(timeout=0) == []
    assert log_text.count("stopped delivering; reopening") == 1 and "'reopens': 1" in log_text
    messages = [m for _, m in received]
    assert [m.seq for m in messages] == list(range(len(messages)))  # numbered on across the reopen
    ends = [m.ts["window_end"] for m in messages]
    assert ends == sorted(ends)  # one clock across the reopen
    last_before, first_after = messages[before - 1], messages[before]
    # nothing was captured while unplugged: the first new window ends after the silence (>= 2 s detection)
    assert first_after.ts["window_end"] > unplugged_at + 2.0 > last_before.ts["window_end"]
    assert all(arrival >= unplugged_at + 2.0 for arrival, _ in received[before:])

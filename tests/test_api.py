"""``avloc.Localizer``: the same numbers as the live pipeline (the inference worker's own code path, fed by the
live streaming front-end), batches, files, any rate and channel count, checkpoints, and one-line errors."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile
import zmq

import avloc
from avloc.core.audio import StreamingFrontEnd
from avloc.core.errors import UserError
from avloc.engines.base import load_engine
from avloc.stream.capture.microphone import as_captured
from avloc.stream.serve.inference_worker import InferenceWorker
from avloc.stream.wire import protocol

RATE = 16000


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 72x96 RGB frame and 2 s of 48 kHz stereo int16 (what a device might deliver)."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)
    t = np.arange(2 * 48000) / 48000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    stereo = np.stack([tone, 0.5 * tone], axis=1)
    return frame, np.round(stereo * 20000).astype(np.int16)


def _pipeline(engine_dir: Path, frame_rgb: np.ndarray, mono16k: np.ndarray, at: float) -> protocol.Message:
    """The heatmap message the inference worker publishes for this frame captured at ``at`` s, with the audio
    of a live capture (the streaming front-end, a window every 100 ms) up to then."""
    engine = load_engine(engine_dir, threads=1)
    live = StreamingFrontEnd(avloc.Localizer(engine_dir).frontend_config, hop_samples=RATE // 10)
    windows = live.push(mono16k[: round(at * RATE)])
    ctx = zmq.Context()
    endpoint = f"inproc://api-{time.monotonic_ns()}"
    pub = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=True, hwm=100)
    sub = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=100)
    try:
        time.sleep(0.05)
        worker = InferenceWorker(
            engine, frame_endpoints=[], audio_endpoints=[], heatmap_endpoint=endpoint, heartbeat_endpoint=None
        )
        audio = [
            protocol.Message("audio", "cam0", i, {"window_end": end / RATE, "send": 0.0}, {"spec": spec}, {})
            for i, (end, spec) in enumerate(windows)
        ]
        worker.take_audio(audio, received=at)
        bgr = np.ascontiguousarray(frame_rgb[:, :, ::-1])
        worker.take_frames(
            [protocol.Message("frame", "cam0", 0, {"capture": at, "send": at}, {"frame": bgr}, {})], received=at
        )
        worker.process_pending(pub)
        msg = protocol.recv(sub, 2000)
        assert msg is not None and msg.kind == "heatmap"
        return msg
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()


def test_same_numbers_as_the_inference_worker(tiny_engine: Path, tmp_path: Path) -> None:
    frame, stereo = _scene()
    mono = as_captured(stereo, 48000, RATE)
    at = 1.5  # on a hop boundary: the worker pairs the frame with the window ending exactly there
    loc = avloc.Localizer(tiny_engine, threads=1)
    r = loc(frame, stereo, 48000, at=at)
    msg = _pipeline(tiny_engine, frame, mono, at)
    np.testing.assert_allclose(r.feature_map.astype(np.float32), msg.arrays["heatmap"].astype(np.float32), atol=2e-3)
    assert r.peak == pytest.approx(tuple(msg.meta["peak"]), abs=1e-6)
    assert r.confidence == pytest.approx(msg.meta["confidence"], abs=1e-5)
    assert r.visible and r.notice is None and msg.meta["notice"] is None  # the tiny engine has no gate
    assert r.heatmap.shape == frame.shape[:2] and r.heatmap.dtype == np.float32
    assert 0.0 <= r.heatmap.min() and r.heatmap.max() <= 1.0
    assert r.peak_px == (int(r.peak[0] * 96), int(r.peak[1] * 72))

    # a gated engine: the same decision as the worker's, from the manifest's threshold
    gated = tmp_path / "gated"
    shutil.copytree(tiny_engine, gated)
    manifest = json.loads((gated / "manifest.json").read_text())
    manifest["gate"] = {"threshold": r.confidence + 0.01}
    (gated / "manifest.json").write_text(json.dumps(manifest))
    g = avloc.Localizer(gated, threads=1)(frame, stereo, 48000, at=at)
    assert not g.visible and g.notice == "not_visible"
    assert _pipeline(gated, frame, mono, at).meta["notice"] == "not_visible"
    assert avloc.Localizer(gated, threads=1, gate=False)(frame, stereo, 48000, at=at).visible


def test_batches_files_layouts_and_checkpoints(tiny_engine: Path, tmp_path: Path) -> None:
    frame, stereo = _scene(1)
    loc = avloc.Localizer(tiny_engine, threads=1)
    one = loc(frame, stereo, 48000)
    # a batch heard with one sound: each result as if alone (windows at different times too)
    frames = [frame, frame[::-1].copy(), np.zeros((40, 50, 3), np.uint8)]
    batch = loc(frames, stereo, 48000, at=[1.0, 1.0, 0.5])
    assert len(batch) == 3 and batch[2].heatmap.shape == (40, 50)
    alone = loc(frames[1], stereo, 48000, at=1.0)
    np.testing.assert_array_equal(batch[1].feature_map, alone.feature_map)
    assert batch[1].confidence == pytest.approx(alone.confidence, abs=1e-6)
    stacked = loc(np.stack([frame, frame]), stereo, 48000)
    np.testing.assert_array_equal(stacked[0].feature_map, one.feature_map)
    # channel layouts and dtypes: [C, N] is [N, C]; a float signal at another rate is resampled as capture does
    np.testing.assert_array_equal(loc(frame, stereo.T, 48000).feature_map, one.feature_map)
    as_float = (stereo / 32768.0).astype(np.float32)
    assert loc(frame, as_float, 48000).confidence == pytest.approx(one.confidence, abs=1e-4)
    # BGR input, and files: an image and a wav (read at their own rate, resampled like every dataset)
    assert loc(frame[:, :, ::-1], stereo, 48000, bgr=True).confidence == one.confidence
    cv2.imwrite(str(tmp_path / "f.png"), frame[:, :, ::-1])
    soundfile.write(tmp_path / "s.wav", stereo, 48000)
    from_files = loc(tmp_path / "f.png", str(tmp_path / "s.wav"))
    assert from_files.heatmap.shape == frame.shape[:2]
    assert from_files.confidence == pytest.approx(one.confidence, abs=2e-2)  # torchaudio vs libswresample
    # a checkpoint runs the export's graphs in PyTorch: the engine's numbers (export parity)
    ckpt = avloc.Localizer(tiny_engine.parent / "ckpt.pt")(frame, stereo, 48000)
    np.testing.assert_allclose(ckpt.feature_map.astype(np.float32), one.feature_map.astype(np.float32), atol=2e-3)
    assert ckpt.confidence == pytest.approx(one.confidence, abs=1e-3)


def test_errors_are_one_line(tiny_engine: Path, tmp_path: Path) -> None:
    frame, stereo = _scene()
    loc = avloc.Localizer(tiny_engine, threads=1)
    bad_file = tmp_path / "x.pt"
    bad_file.write_bytes(b"nope")
    cases = [
        (lambda: avloc.Localizer(tmp_path / "missing"), "missing: not found; expected an engine folder"),
        (lambda: avloc.Localizer(bad_file), "x.pt: not a readable checkpoint"),
        (lambda: loc(frame, stereo), "without sample_rate"),
        (lambda: loc(frame, stereo, 0), "sample_rate 0: expected a positive"),
        (lambda: loc(frame, stereo, 44100.5), "sample_rate 44100.5"),
        (lambda: loc(frame[:, :, 0], stereo, 48000), r"frame uint8 \(72, 96\): expected an HxWx3 uint8"),
        (lambda: loc(frame.astype(np.float32), stereo, 48000), "frame float32"),
        (lambda: loc(frame, np.zeros((3, 4, 5)), 48000), r"audio shape \(3, 4, 5\)"),
        (lambda: loc(frame, np.zeros(0), 48000), "expected a non-empty array"),
        (lambda: loc(frame, np.full(100, np.nan), 48000), "NaN"),
        (lambda: loc(tmp_path / "none.png", stereo, 48000), "none.png: image file not found"),
        (lambda: loc(frame, tmp_path / "none.wav"), "none.wav: audio file not found"),
        (lambda: loc([frame, frame], stereo, 48000, at=[1.0]), "1 times for 2 frames"),
        (lambda: list(loc.video(tmp_path / "none.mp4")), "none.mp4: video file not found"),
        (lambda: loc(frame, stereo[:1], 48000), r"1 sample\(s\) at 48000 Hz is less than one sample at 16000"),
        (lambda: loc(frame, stereo, 48000, at=float("nan")), "at nan: expected the frame's time"),
        (lambda: loc(frame, stereo, 48000, at="1.0"), "at '1.0': expected the frame's time"),
        (lambda: loc(frame, stereo, 48000, at=1500), r"at 1500: outside the sound \(0 to 2.000 s\)"),
        (lambda: loc([frame, frame], stereo, 48000, at=[0.5, -1.0]), "at -1.0: outside the sound"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_unsigned_8_bit_audio_is_offset_binary(tiny_engine: Path) -> None:
    """8-bit PCM is unsigned with silence at 128: the same sound as its signed 16-bit version (it divided by
    zero and localized NaNs as confidence 0 before)."""
    frame, stereo = _scene()
    loc = avloc.Localizer(tiny_engine, threads=1)
    as_u8 = (stereo.astype(np.int32) // 256 + 128).astype(np.uint8)
    as_i16 = (as_u8.astype(np.int16) - 128) * 256
    np.testing.assert_allclose(loc.load_audio(as_u8, 48000), loc.load_audio(as_i16, 48000), atol=1e-6)
    assert abs(loc.load_audio(np.full(4800, 128, np.uint8), 48000)).max() == 0.0
    assert loc(frame, as_u8, 48000).confidence == pytest.approx(loc(frame, as_i16, 48000).confidence, abs=1e-5)

"""The GPU inference path on a CPU machine: the real inference worker process with an engine whose outputs
behave like CUDA tensors (tests/fake_cuda.py). Before the fix the worker died on its first batch with
``TypeError: can't convert cuda device type tensor to numpy`` (``np.asarray(heatmaps)``), and ``infer_end``
was stamped when the work was queued rather than when the device finished it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from fake_cuda import CUDA_NUMPY_ERROR, FakeCudaEngine, on_device, queue_work

from avloc.engines.base import preprocess_frames, read_manifest, to_host
from avloc.engines.onnxruntime_backend import OnnxRuntimeEngine
from avloc.stream.run.launcher import free_tcp_endpoint
from avloc.stream.wire import protocol

FAKE_CUDA = Path(__file__).with_name("fake_cuda.py")
LATENCY_S = 0.08


def test_fake_cuda_tensor_refuses_numpy_and_to_host_waits_for_the_device():
    t = on_device(np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(TypeError, match="can't convert cuda"):
        np.asarray(t)  # what stream/serve/inference.py did with the engine's outputs
    with pytest.raises(TypeError, match="can't convert cuda"):
        t.float().numpy()
    assert t.device.type == "cuda" and CUDA_NUMPY_ERROR.startswith("can't")
    queue_work(0.05)
    start = time.monotonic()
    host = to_host(t)
    assert time.monotonic() - start >= 0.04  # the copy waited for the queued work
    assert isinstance(host, np.ndarray) and host.tolist() == [[0, 1, 2], [3, 4, 5]]
    arr = np.ones(3, np.float32)
    assert to_host(arr) is arr


def test_fake_engine_matches_the_cpu_engine(tiny_engine):
    """The stand-in computes the real maps (so the worker test below checks real values)."""
    manifest = read_manifest(tiny_engine)
    fake = FakeCudaEngine(tiny_engine, manifest, threads=1, latency_s=0.0)
    cpu = OnnxRuntimeEngine(tiny_engine, manifest, threads=1)
    frames = [np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)]
    images = fake.device_preprocessor(4)(frames)
    assert isinstance(images, torch.Tensor) and images.device.type == "cuda"
    emb = np.random.default_rng(1).standard_normal((1, cpu.embed_dim)).astype(np.float32)
    heat, conf = fake.localize(images, emb)
    ref_heat, ref_conf = cpu.localize(preprocess_frames(frames, manifest), emb)
    assert np.abs(to_host(heat) - ref_heat).max() < 0.02 and np.abs(to_host(conf) - ref_conf).max() < 0.02


@pytest.mark.timeout(180)
def test_worker_process_publishes_heatmaps_from_device_outputs(tiny_engine, tmp_path):
    frames_ep, audio_ep, heat_ep = (free_tcp_endpoint() for _ in range(3))
    ctx = zmq.Context()
    frames = protocol.make_socket(ctx, zmq.PUB, frames_ep, bind=True, hwm=100)
    audio = protocol.make_socket(ctx, zmq.PUB, audio_ep, bind=True, hwm=100)
    heat = protocol.make_socket(ctx, zmq.SUB, heat_ep, bind=False, hwm=100)
    log_file = tmp_path / "inference.log"
    cmd = [sys.executable, str(FAKE_CUDA), "--engine", str(tiny_engine), "--backend", "fake_cuda"]
    cmd += ["--engine-option", f"latency_s={LATENCY_S}", "--max-batch", "2", "--threads", "1"]
    cmd += ["--frames", frames_ep, "--audio", audio_ep, "--heatmaps", heat_ep, "--log-file", str(log_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(FAKE_CUDA.parent), *sys.path])}
    proc = subprocess.Popen(cmd, env=env)
    spec = np.zeros((1, 257, 98), np.float32)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    got: list[protocol.Message] = []
    try:
        deadline = time.monotonic() + 120
        seq = 0
        while time.monotonic() < deadline and len(got) < 3 and proc.poll() is None:
            t = protocol.now()
            protocol.send(audio, "audio", stream="cam0", seq=seq, ts={"window_end": t - 0.01}, arrays={"spec": spec})
            protocol.send(
                frames, "frame", stream="cam0", seq=seq, ts={"capture": t, "send": t}, arrays={"frame": image}
            )
            seq += 1
            msg = protocol.recv(heat, timeout_ms=100)
            if msg is not None and msg.kind == "heatmap" and "heatmap" in msg.arrays:
                got.append(msg)
        log_text = log_file.read_text() if log_file.is_file() else ""
        assert proc.poll() is None, f"worker died (exit {proc.returncode}): {log_text[-2000:]}"
        assert len(got) >= 3, log_text[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for s in (frames, audio, heat):
            s.close(0)
        ctx.term()
    assert proc.returncode == 0
    feature = json.loads((tiny_engine / "manifest.json").read_text())["outputs"]["heatmap"]["feature_size"]
    for msg in got:
        heatmap = msg.arrays["heatmap"]
        assert list(heatmap.shape) == feature and np.isfinite(heatmap.astype(np.float32)).all()
        # infer_end is stamped after the (simulated) device finished, not when the work was queued
        assert msg.ts["infer_end"] - msg.ts["visual_start"] >= LATENCY_S * 0.9, msg.ts
        assert msg.ts["infer_end"] <= msg.ts["publish"]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "cuda_graphs"])
def test_worker_with_a_real_cuda_engine_publishes(tiny_engine, mode):
    """On a real GPU: device preprocessing -> CUDA outputs -> to_host -> a published heatmap."""
    from avloc.engines.base import load_engine
    from avloc.stream.serve.inference_worker import InferenceWorker

    engine = load_engine(tiny_engine, "torch", device="cuda", mode=mode, max_batch=2)
    ctx = zmq.Context()
    endpoint = f"inproc://gpu-{mode}"
    pub = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=True, hwm=10)
    sub = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=10)
    try:
        worker = InferenceWorker(
            engine, frame_endpoints=[], audio_endpoints=[], heatmap_endpoint=endpoint, heartbeat_endpoint=None
        )
        assert worker._device_preprocess is not None
        worker.warm_up()
        time.sleep(0.05)
        t = protocol.now()
        spec = np.zeros((1, 257, 98), np.float32)
        worker.take_audio([protocol.Message("audio", "cam0", 0, {"window_end": t - 0.01}, {"spec": spec}, {})], t)
        frame = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        worker.take_frames([protocol.Message("frame", "cam0", 0, {"capture": t, "send": t}, {"frame": frame}, {})], t)
        assert worker.process_pending(pub) == 1
        time.sleep(0.05)
        (msg,) = protocol.drain_latest(sub)
        assert np.isfinite(msg.arrays["heatmap"].astype(np.float32)).all()
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()
        engine.close()

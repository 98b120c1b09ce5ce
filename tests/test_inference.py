"""Inference worker: pairing, embedding reuse, batching, drops, and a real worker process under fuzzing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import zmq
from proc_helpers import orphans

from avloc.stream.run.launcher import free_tcp_endpoint
from avloc.stream.serve.batching import BEHIND_HOLD_S, AudioTrack, AudioWindow
from avloc.stream.serve.inference_worker import InferenceWorker, encode_heatmap, peak_of
from avloc.stream.wire import protocol

SPEC_SHAPE = (1, 257, 98)  # linear front-end, 1 s window


def _manifest(size: int = 32) -> dict:
    return {
        "image": {"size": size, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "frontend": {"kind": "linear", "window_seconds": 1.0},
        "outputs": {"heatmap": {"range": [-1.0, 1.0]}},
    }


class FakeEngine:
    """Counts calls; the heatmap is hottest where the frame is brightest (so pairing can be checked)."""

    def __init__(self) -> None:
        self.manifest = _manifest()
        self.embed_calls = 0
        self.localize_batches: list[int] = []

    def embed_audio(self, spec: np.ndarray) -> np.ndarray:
        self.embed_calls += spec.shape[0]
        return np.repeat(spec.reshape(spec.shape[0], -1)[:, :1], 4, axis=1)  # embedding = first spec value

    def localize(self, image: np.ndarray, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.localize_batches.append(image.shape[0])
        heat = image.mean(axis=1)[:, ::4, ::4]  # [B, 8, 8]
        return np.tanh(heat), emb[:, 0].copy()


def _frame_msg(stream: str, seq: int, capture: float, bright: tuple[int, int] = (0, 0)) -> protocol.Message:
    frame = np.zeros((32, 32, 3), np.uint8)
    y, x = bright
    frame[y * 4 : y * 4 + 4, x * 4 : x * 4 + 4] = 255
    return protocol.Message("frame", stream, seq, {"capture": capture, "send": capture}, {"frame": frame}, {})


def _audio_msg(stream: str, seq: int, end: float, value: float) -> protocol.Message:
    spec = np.full(SPEC_SHAPE, value, np.float32)
    return protocol.Message("audio", stream, seq, {"window_end": end, "send": end}, {"spec": spec}, {})


@pytest.fixture()
def pub_sub():
    ctx = zmq.Context()
    endpoint = f"inproc://heatmaps-{time.monotonic_ns()}"
    pub = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=True, hwm=100)
    sub = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=100)
    time.sleep(0.05)
    yield pub, sub
    pub.close(0)
    sub.close(0)
    ctx.term()


def _worker(engine: FakeEngine) -> InferenceWorker:
    return InferenceWorker(
        engine, frame_endpoints=[], audio_endpoints=[], heatmap_endpoint="inproc://x", heartbeat_endpoint=None
    )


def _received(sub: zmq.Socket) -> list[protocol.Message]:
    time.sleep(0.02)
    return protocol.drain_latest(sub)


def test_window_for_is_causal():
    track = AudioTrack()
    for seq, end in enumerate([1.0, 1.1, 1.2]):
        track.add(AudioWindow(seq, end, np.zeros(SPEC_SHAPE, np.float32)), received=end)
    assert track.window_for(0.99) is None  # nothing ends before: never audio from the future
    assert track.window_for(1.1).seq == 1  # ends exactly at the capture time: allowed
    assert track.window_for(1.19).seq == 1
    assert track.window_for(5.0).seq == 2


def test_embedding_computed_once_per_window_and_paired_causally(pub_sub):
    pub, sub = pub_sub
    engine = FakeEngine()
    worker = _worker(engine)
    worker.take_audio([_audio_msg("cam0", 0, 10.0, 0.25), _audio_msg("cam0", 1, 10.1, 0.75)], received=10.1)
    for seq, capture in enumerate([10.02, 10.05, 10.08, 10.12, 10.15]):
        worker.take_frames([_frame_msg("cam0", seq, capture, bright=(2, 5))], received=capture)
        worker.process_pending(pub)
    heatmaps = _received(sub)
    assert [m.seq for m in heatmaps] == [0, 1, 2, 3, 4]
    assert engine.embed_calls == 2  # two windows, five frames
    # frames before 10.1 used window 0 (value 0.25), later ones window 1: confidence = embedding[0] here.
    assert [m.meta["confidence"] for m in heatmaps] == [0.25, 0.25, 0.25, 0.75, 0.75]
    assert [m.meta["audio_end"] for m in heatmaps] == [10.0, 10.0, 10.0, 10.1, 10.1]
    msg = heatmaps[0]
    assert msg.arrays["heatmap"].dtype == np.float16 and msg.arrays["heatmap"].shape == (8, 8)
    x, y = msg.meta["peak"]
    assert 5 / 8 <= x <= 6 / 8 and 2 / 8 <= y <= 3 / 8  # inside the cell of the brightest 4x4 block
    ts = msg.ts
    assert ts["capture"] <= ts["received"] and ts["infer_start"] <= ts["visual_start"] <= ts["infer_end"]
    assert ts["infer_end"] <= ts["publish"]


def test_audio_reuse_skips_windows_only_when_behind(pub_sub, monkeypatch):
    pub, _ = pub_sub
    # the worker's own clock (protocol.now), which the behind hold counts on; behind the real one, so that no frame
    # (stamped "arrived" by the real clock) looks old enough to be dropped late
    clock = [protocol.now() - 100.0]
    monkeypatch.setattr(protocol, "now", lambda: clock[0])
    engine = FakeEngine()
    worker = _worker(engine)
    worker.audio_reuse_s = 0.25
    worker.take_audio([_audio_msg("cam0", 0, 10.0, 0.1)], received=10.0)
    worker.embed_ahead()  # idle: window 0 embedded ahead of need
    assert engine.embed_calls == 1
    # behind (a frame replaced unseen): windows 1..3 arrived while busy; a frame at 10.32 pairs with window 3
    # (10.3) by rule, but window 0 is 0.3 s older (> 0.25): too old to reuse -> window 3 is embedded
    worker.take_audio([_audio_msg("cam0", s, 10.0 + s / 10, 0.1 + s / 10) for s in (1, 2, 3)], received=10.3)
    worker.take_frames([_frame_msg("cam0", 0, 10.31), _frame_msg("cam0", 1, 10.32)], received=10.32)
    worker.process_pending(pub)
    assert worker.behind and engine.embed_calls == 2 and worker.stats.audio_reused == 0
    # window 4 arrives with two frames, the first replaced unseen: the worker is behind, so the next frame
    # reuses window 3 (0.1 s older, embedded) instead of embedding 4
    clock[0] += 0.1
    worker.take_audio([_audio_msg("cam0", 4, 10.4, 0.5)], received=10.4)
    worker.take_frames([_frame_msg("cam0", 2, 10.41), _frame_msg("cam0", 3, 10.42)], received=10.42)
    worker.process_pending(pub)
    assert worker.behind and engine.embed_calls == 2 and worker.stats.audio_reused == 1
    # nothing lost in this batch, but the last loss was less than BEHIND_HOLD_S ago: still behind, so window 5
    # is skipped too (window 3, 0.2 s older, is reused)
    clock[0] += BEHIND_HOLD_S / 2
    worker.take_audio([_audio_msg("cam0", 5, 10.5, 0.6)], received=10.5)
    worker.take_frames([_frame_msg("cam0", 4, 10.52)], received=10.52)
    worker.process_pending(pub)
    assert worker.behind and engine.embed_calls == 2 and worker.stats.audio_reused == 2
    # keeping up for BEHIND_HOLD_S since the last loss: window 6 is embedded for the next frame, never reused
    clock[0] += BEHIND_HOLD_S
    worker.take_audio([_audio_msg("cam0", 6, 10.6, 0.7)], received=10.6)
    worker.take_frames([_frame_msg("cam0", 5, 10.62)], received=10.62)
    worker.process_pending(pub)
    assert not worker.behind and engine.embed_calls == 3 and worker.stats.audio_reused == 2


def test_behind_hold_counts_from_the_last_backlog_replaced_or_late_frame(pub_sub, monkeypatch):
    """``behind`` holds for BEHIND_HOLD_S from the newest loss of any kind: streams left waiting beyond a batch, a
    frame replaced unseen, a frame dropped late (also when that leaves nothing to serve)."""
    pub, _ = pub_sub
    start = protocol.now()
    clock = [start - 100.0]  # behind the real clock that stamps "arrived": no frame is late unless made so below
    monkeypatch.setattr(protocol, "now", lambda: clock[0])
    worker = _worker(FakeEngine())
    worker.take_audio([_audio_msg(s, 0, 10.0, 0.1) for s in ("cam0", "cam1")], received=10.0)
    worker.max_batch = 1
    # backlog: two streams, one frame a batch -> behind; the other one served 0.9 s later: still within the hold
    worker.take_frames([_frame_msg("cam0", 0, 10.01), _frame_msg("cam1", 0, 10.01)], received=10.01)
    worker.process_pending(pub)
    assert worker.behind
    clock[0] += 0.9
    worker.process_pending(pub)
    assert worker.behind and not worker.pending
    # a frame replaced unseen at +0.9 restarts the hold: still behind at +1.5, no longer at +2.0
    worker.take_frames([_frame_msg("cam0", 1, 10.1), _frame_msg("cam0", 2, 10.12)], received=10.12)
    worker.process_pending(pub)
    clock[0] += 0.6
    worker.take_frames([_frame_msg("cam0", 3, 10.2)], received=10.2)
    worker.process_pending(pub)
    assert worker.behind
    clock[0] += 0.5
    worker.take_frames([_frame_msg("cam0", 4, 10.3)], received=10.3)
    worker.process_pending(pub)
    assert not worker.behind
    # a frame dropped late, nothing else pending: the hold starts at that drop, so a frame served more than
    # BEHIND_HOLD_S later finds the worker caught up
    clock[0] = start + 10.0  # ahead of the real clock: the next frame is ~10 s old when its turn comes
    worker.max_frame_age_s = 1.0
    worker.take_frames([_frame_msg("cam0", 5, 10.4)], received=10.4)
    assert worker.process_pending(pub) == 0 and worker.stats.late == 1 and worker.behind
    worker.max_frame_age_s = 1000.0
    clock[0] += BEHIND_HOLD_S + 0.1
    worker.take_frames([_frame_msg("cam0", 6, 10.5)], received=10.5)
    worker.process_pending(pub)
    assert not worker.behind and worker.stats.late == 1


def test_streams_are_batched_and_old_frames_dropped(pub_sub):
    pub, sub = pub_sub
    engine = FakeEngine()
    worker = _worker(engine)
    worker.take_audio([_audio_msg("mic0", 0, 1.0, 0.5)], received=1.0)  # one mic serves both cameras
    # cam0 delivers three frames before the worker gets to them: only the newest is processed.
    worker.take_frames(
        [_frame_msg("cam0", s, 1.1 + s * 0.01) for s in range(3)] + [_frame_msg("cam1", 7, 1.12)],
        received=1.13,
    )
    assert worker.stats.drops == 2
    worker.process_pending(pub)
    assert engine.localize_batches == [2]
    assert sorted((m.stream, m.seq) for m in _received(sub)) == [("cam0", 2), ("cam1", 7)]
    assert engine.embed_calls == 1
    # a sequence gap seen on the wire is counted separately from the worker's own drops
    worker.take_frames([_frame_msg("cam1", 10, 1.2)], received=1.2)
    assert worker.stats.gaps == 2


def test_no_audio_suppresses_heatmap_with_notice(pub_sub):
    pub, sub = pub_sub
    engine = FakeEngine()
    worker = _worker(engine)
    msg = _frame_msg("cam0", 0, 5.0)
    msg.meta["notice"] = protocol.NOTICE_NO_AUDIO
    worker.take_frames([msg], received=5.0)
    worker.process_pending(pub)
    # audio that is far older than the frame (a dead microphone) also suppresses
    worker.take_audio([_audio_msg("cam1", 0, 1.0, 0.5)], received=1.0)
    worker.take_frames([_frame_msg("cam1", 0, 9.0)], received=9.0)
    worker.process_pending(pub)
    out = _received(sub)
    assert [m.meta["notice"] for m in out] == ["no_audio", "no_audio"]
    assert all(m.arrays == {} and m.meta["peak"] is None for m in out)
    assert engine.localize_batches == [] and worker.stats.suppressed == 2


def test_wrong_payloads_are_rejected_and_counted():
    worker = _worker(FakeEngine())
    bad_frame = _frame_msg("cam0", 0, 1.0)
    bad_frame.arrays["frame"] = np.zeros((4, 4), np.uint8)
    bad_spec = _audio_msg("cam0", 0, 1.0, 0.0)
    bad_spec.arrays["spec"] = np.zeros((1, 10, 10), np.float32)
    worker.take_frames([bad_frame, _audio_msg("cam0", 1, 1.0, 0.0)], received=1.0)
    worker.take_audio([bad_spec], received=1.0)
    assert worker.frame_rejects.total == 2 and worker.audio_rejects.total == 1
    assert worker.pending == {} and worker.tracks == {}


def test_heatmap_encoding_and_peak():
    heat = np.array([[-1.0, 0.0], [0.5, 1.0]], np.float32)
    assert np.allclose(encode_heatmap(heat, -1, 1, "float16").astype(np.float32), [[0, 0.5], [0.75, 1.0]])
    assert encode_heatmap(heat, -1, 1, "uint8").tolist() == [[0, 128], [191, 255]]
    # the hottest cell (1, 1) with a warm left neighbour (0.5 against the median 0.25): a quarter cell to the left
    assert peak_of(heat) == pytest.approx((0.625, 0.75))
    # one hot cell, the others at the median: that cell's centre
    single = np.zeros((8, 8), np.float32)
    single[3, 5] = 1.0
    assert peak_of(single) == pytest.approx((5.5 / 8, 3.5 / 8))
    # a source spanning two cells lights both: the peak lies between them, nearer the hotter
    twin = np.zeros((8, 8), np.float32)
    twin[4, 2], twin[4, 3] = 1.0, 0.5
    x, y = peak_of(twin)
    assert 2.5 / 8 < x < 3.0 / 8 and y == pytest.approx(4.5 / 8)
    # at the border the peak stays at the cell's centre, not on the frame's outermost pixel (the bilinear
    # upsampling's flat edge put it at x = 1/128 of an 8-wide map)
    edge = np.zeros((8, 8), np.float32)
    edge[6, 0] = 1.0
    assert peak_of(edge) == pytest.approx((0.5 / 8, 6.5 / 8))
    # flat, one-cell and non-finite maps give a point inside the frame
    assert peak_of(np.ones((8, 8), np.float32)) == (0.5 / 8, 0.5 / 8)
    assert peak_of(np.ones((1, 1), np.float32)) == (0.5, 0.5)
    broken = single.copy()
    broken[0, 0] = np.nan
    assert peak_of(broken) == pytest.approx((5.5 / 8, 3.5 / 8))
    assert all(0.0 <= v <= 1.0 for v in peak_of(np.full((8, 8), np.nan, np.float32)))


# ---------------------------------------------------------------------------------------------- real process


def _fuzz_messages(rng: np.random.Generator) -> list[list[bytes]]:
    """Ten malformed messages (broken headers, sizes, layouts): the soak test's generator."""
    from avloc.stream.tools.fuzz import fuzz_messages

    return fuzz_messages(rng, 10)


def _no_orphans(proc: psutil.Process) -> None:
    alive = orphans(proc, timeout=10)
    assert not alive, f"orphan processes left: {alive}"


def test_worker_process_serves_through_fuzzing(tiny_engine, tmp_path):
    frames_ep, audio_ep, heat_ep, hb_ep = (free_tcp_endpoint() for _ in range(4))
    ctx = zmq.Context()
    frames = protocol.make_socket(ctx, zmq.PUB, frames_ep, bind=True, hwm=100)
    audio = protocol.make_socket(ctx, zmq.PUB, audio_ep, bind=True, hwm=100)
    heat = protocol.make_socket(ctx, zmq.SUB, heat_ep, bind=False, hwm=100)
    beats = protocol.make_socket(ctx, zmq.SUB, hb_ep, bind=True, hwm=100)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avloc.stream.serve.inference",
            "--engine",
            str(tiny_engine),
            "--frames",
            frames_ep,
            "--audio",
            audio_ep,
            "--heatmaps",
            heat_ep,
            "--heartbeat",
            hb_ep,
            "--threads",
            "1",
            "--log-file",
            str(tmp_path / "inference.log"),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    rng = np.random.default_rng(0)
    spec = np.zeros((1, *SPEC_SHAPE), np.float32)[0]
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    seq = 0
    got: list[protocol.Message] = []
    stats: dict = {}
    try:
        deadline = time.monotonic() + 60
        phase_fuzzed = False
        while time.monotonic() < deadline:
            t = protocol.now()
            protocol.send(audio, "audio", stream="cam0", seq=seq, ts={"window_end": t - 0.01}, arrays={"spec": spec})
            protocol.send(
                frames, "frame", stream="cam0", seq=seq, ts={"capture": t, "send": t}, arrays={"frame": image}
            )
            seq += 1
            if len(got) >= 3 and not phase_fuzzed:
                for parts in _fuzz_messages(rng):  # the same garbage on both sockets
                    frames.send_multipart(parts)
                    audio.send_multipart(parts)
                phase_fuzzed = True
                got_before = len(got)
            msg = protocol.recv(heat, timeout_ms=50)
            if msg is not None and msg.kind == "heatmap":
                got.append(msg)
            for beat in protocol.drain_latest(beats):
                if beat.kind == "heartbeat" and "rejects_total" in beat.meta.get("stats", {}):
                    stats = beat.meta["stats"]
            if phase_fuzzed and len(got) >= got_before + 5 and stats.get("rejects_total", 0) >= 20:
                break
        assert phase_fuzzed, "no heatmap before fuzzing"
        assert proc.poll() is None, "worker died"
        assert len(got) >= got_before + 5, "heatmaps stopped after malformed messages"
        assert stats["rejects_total"] >= 20, stats  # 10 bad messages on each of two sockets
        assert stats["rejects"]["frames"] and stats["rejects"]["audio"]
        computed = [m for m in got if "heatmap" in m.arrays]
        import json

        feature = json.loads((tiny_engine / "manifest.json").read_text())["outputs"]["heatmap"]["feature_size"]
        assert computed and list(computed[-1].arrays["heatmap"].shape) == feature
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for s in (frames, audio, heat, beats):
            s.close(0)
        ctx.term()
    assert proc.returncode == 0
    _no_orphans(psutil.Process())

"""Silence gate: max-F1 threshold, calibration pairs and statistic, the manifest entry, the worker's
not_visible notice, the display, the launcher switch, the pipeline bench and
scripts/gate_effect.py."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from avloc.cli import main as cli_main
from avloc.core.audio import FrontEndConfig
from avloc.core.checkpoint import ImageConfig, load_model, save_checkpoint
from avloc.core.errors import UserError
from avloc.core.metrics import confidence_top25
from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
from avloc.engines.base import load_engine, read_manifest
from avloc.engines.gate import (
    GraphRunner,
    calibrate_checkpoint,
    calibrate_engine,
    choose_threshold,
    gate_dataset,
    gate_pairs,
    gate_threshold,
    pair_confidences,
)
from avloc.stream.clients.display import Display, HeatmapView
from avloc.stream.clients.display import add_arguments as display_arguments
from avloc.stream.run.launcher import StreamConfig
from avloc.stream.run.pipeline import Endpoints, inference_spec
from avloc.stream.serve.inference import add_arguments as inference_arguments
from avloc.stream.serve.inference_worker import InferenceWorker
from avloc.stream.wire import protocol

ROOT = Path(__file__).resolve().parents[1]
FRONTEND = FrontEndConfig(window_seconds=0.1)


# ---------------------------------------------------------------------------------------------- threshold


def test_max_f1_threshold_matches_a_hand_computed_case():
    # thresholds t = each confidence, visible when conf >= t:
    #   t=0.4: TP 4, FP 2 (0.7, 0.5) -> P 2/3, R 1, F1 0.8   <- the maximum
    #   t=0.6: TP 3, FP 1 -> P 3/4, R 3/4, F1 0.75; t=0.8: TP 2, FP 0 -> P 1, R 1/2, F1 2/3
    #   t=0.3: TP 4, FP 3 -> F1 8/11 = 0.727; t=0.1: P 1/2, R 1 -> F1 2/3
    gate = choose_threshold([0.9, 0.8, 0.6, 0.4], [0.7, 0.5, 0.3, 0.1])
    assert gate.threshold == pytest.approx(0.4)
    assert (gate.precision, gate.recall, gate.f1) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (gate.n_pos, gate.n_neg) == (4, 4)
    # separable sets: the lowest positive is the threshold, everything right
    gate = choose_threshold([0.9, 0.7], [0.2, 0.5, 0.6])
    assert gate.threshold == pytest.approx(0.7) and gate.f1 == pytest.approx(1.0)
    assert (gate.n_pos, gate.n_neg) == (2, 3)
    with pytest.raises(UserError, match="positive and negative"):
        choose_threshold([0.5], [])
    with pytest.raises(UserError, match="NaN"):
        choose_threshold([0.5, float("nan")], [0.1])


# ---------------------------------------------------------------------------------------------- calibration


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from avloc.core.data.synth import make_synth

    root = tmp_path_factory.mktemp("gate_synth") / "data"
    return make_synth(root, seed=1, n_train=8, n_val=10, n_test=8, silent_frac=0.5, image_size=48, clip_seconds=0.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gate_ckpt") / "best.pt"
    save_checkpoint(
        path,
        SSLAlign(SSLAlignConfig(width=4)),
        method="ssl_align",
        model_config={"width": 4},
        frontend=FRONTEND,
        image=ImageConfig(size=32),
    )
    return path


@pytest.fixture(scope="module")
def gated_engine(checkpoint, synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gate_eng") / "engine"
    assert cli_main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--gate-data", str(synth)]) == 0
    return out


def test_pairs_are_own_audio_and_off_screen_audio_drawn_with_a_seed(synth):
    dataset = gate_dataset(synth, "val", {"frontend": FRONTEND.to_dict()})
    pairs = gate_pairs(dataset, seed=0)
    assert pairs.positives == [(i, i) for i in dataset.ids]
    assert len(pairs.negatives) >= len(dataset.ids) // 2
    for image_id, audio_id in pairs.negatives:
        ann = dataset.annotation(image_id)
        in_view = {o.cls for o in ann.objects} | {ann.cls}
        assert audio_id != image_id and dataset.annotation(audio_id).cls not in in_view
    assert gate_pairs(dataset, seed=0) == pairs  # deterministic
    assert any(gate_pairs(dataset, seed=s).negatives != pairs.negatives for s in (1, 2, 3))


def test_statistic_is_the_engines_confidence(checkpoint, synth, gated_engine):
    """Calibration in torch = the SLAVC top-25 % mean of the model's cosine map = what ONNX Runtime reports."""
    loaded = load_model(checkpoint)
    runner = GraphRunner(loaded)
    dataset = gate_dataset(synth, "val", runner.manifest)
    pairs = gate_pairs(dataset).negatives[:4]
    conf = pair_confidences(runner, dataset, pairs, batch_size=3)
    images = torch.stack([torch.from_numpy(_live_image(dataset, i, runner.manifest)) for i, _ in pairs])
    specs = torch.stack([torch.from_numpy(dataset.spectrogram(a)) for _, a in pairs])
    with torch.inference_mode():
        maps = loaded.model.cosine_map(loaded.model.encode_image(images), loaded.model.encode_audio(specs))
    np.testing.assert_allclose(conf, confidence_top25(maps.numpy()), atol=1e-6)
    with load_engine(gated_engine) as engine:
        np.testing.assert_allclose(pair_confidences(engine, dataset, pairs), conf, atol=1e-4)


def _live_image(dataset, image_id: str, manifest: dict) -> np.ndarray:
    import cv2

    from avloc.engines.base import preprocess_frame

    return preprocess_frame(cv2.cvtColor(dataset.image(image_id), cv2.COLOR_RGB2BGR), manifest)


def test_calibration_threshold_is_the_max_f1_point_of_the_pairs(checkpoint, synth):
    runner = GraphRunner(load_model(checkpoint))
    dataset = gate_dataset(synth, "val", runner.manifest)
    pairs = gate_pairs(dataset)
    pos = pair_confidences(runner, dataset, pairs.positives)
    neg = pair_confidences(runner, dataset, pairs.negatives)
    gate = calibrate_checkpoint(checkpoint, synth)
    assert gate == choose_threshold(pos, neg)
    assert gate.threshold in set(np.concatenate([pos, neg]).astype(np.float64).tolist())
    assert (gate.n_pos, gate.n_neg) == (len(pos), len(neg))


def test_calibration_needs_classes_and_a_split(synth, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(synth, bare)
    (bare / "val.json").unlink()
    (bare / "labels.csv").unlink()
    with pytest.raises(UserError, match="no class for val id"):
        gate_pairs(gate_dataset(bare, "val", {"frontend": FRONTEND.to_dict()}))


# ---------------------------------------------------------------------------------------------- manifest


def test_export_stores_the_gate_in_the_manifest(gated_engine, checkpoint, synth):
    manifest = read_manifest(gated_engine)
    gate = manifest["gate"]
    assert gate["statistic"] == "confidence" and gate["data"] == str(synth) and gate["split"] == "val"
    assert set(gate["val"]) == {"precision", "recall", "f1", "n_pos", "n_neg"}
    assert gate_threshold(manifest) == gate["threshold"]
    # the stored numbers are the exported engine's own max-F1 point on the val pairs
    with load_engine(gated_engine) as engine:
        expected = calibrate_engine(engine, synth)
    assert gate["threshold"] == pytest.approx(expected.threshold, abs=1e-7)
    assert gate["val"] == pytest.approx(expected.val_dict())
    # and (up to ORT vs torch rounding) what the checkpoint calibrates to in PyTorch
    assert gate["threshold"] == pytest.approx(calibrate_checkpoint(checkpoint, synth).threshold, abs=1e-4)


def test_export_without_gate_data_has_no_gate_and_bad_gate_data_fails_first(checkpoint, tmp_path, capsys):
    from avloc.engines.export import export_engine

    plain = export_engine(checkpoint, tmp_path / "plain")
    manifest = read_manifest(plain)
    assert "gate" not in manifest and gate_threshold(manifest) is None
    out = tmp_path / "bad"
    assert (
        cli_main(
            ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--gate-data", str(tmp_path / "nowhere")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "--gate-data" in err and "val.txt" in err and len(err.splitlines()) == 1
    assert not out.exists() and not out.with_name("bad.tmp").exists()
    for bad in ({"threshold": "high"}, {"threshold": float("nan")}, {"threshold": 0.1, "statistic": "max"}, 3):
        with pytest.raises(UserError, match="gate"):
            gate_threshold({"gate": bad})


# ---------------------------------------------------------------------------------------------- worker


class GateEngine:
    """Confidence = the audio window's value (so each frame's confidence is chosen by the test)."""

    def __init__(self, gate: object = None) -> None:
        self.manifest = {
            "image": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            "frontend": FRONTEND.to_dict(),
            "outputs": {"heatmap": {"range": [-1.0, 1.0]}},
        }
        if gate is not None:
            self.manifest["gate"] = gate

    def embed_audio(self, spec: np.ndarray) -> np.ndarray:
        return spec.reshape(spec.shape[0], -1)[:, :4].copy()

    def localize(self, image: np.ndarray, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.tanh(image.mean(axis=1)[:, ::4, ::4]), emb[:, 0].copy()


def _run_frames(
    engine: GateEngine, values: list[float], gate: bool = True, real: list[float] | None = None
) -> tuple[list, InferenceWorker]:
    """One frame per audio value (each paired with a window holding that value); the published heatmaps.
    ``real``: each window's share of captured audio (``meta.end_sample``; the rest is start-up silence)."""
    ctx = zmq.Context()
    endpoint = f"inproc://gate-{time.monotonic_ns()}"
    pub = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=True, hwm=100)
    sub = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=100)
    time.sleep(0.05)
    try:
        worker = InferenceWorker(
            engine,
            frame_endpoints=[],
            audio_endpoints=[],
            heatmap_endpoint=endpoint,
            heartbeat_endpoint=None,
            gate=gate,
        )
        spec_shape = FRONTEND.output_shape()
        for seq, value in enumerate(values):
            t = 10.0 + seq
            spec = np.full(spec_shape, value, np.float32)
            meta = {} if real is None else {"end_sample": round(real[seq] * worker.window_samples)}
            worker.take_audio([protocol.Message("audio", "cam0", seq, {"window_end": t}, {"spec": spec}, meta)], t)
            frame = np.zeros((32, 32, 3), np.uint8)
            frame[8:12, 20:24] = 255
            worker.take_frames(
                [protocol.Message("frame", "cam0", seq, {"capture": t + 0.01}, {"frame": frame}, {})], t + 0.01
            )
            worker.process_pending(pub)
        time.sleep(0.02)
        return protocol.drain_latest(sub), worker
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()


def test_worker_marks_heatmaps_below_the_gate_not_visible():
    out, worker = _run_frames(GateEngine({"threshold": 0.5, "statistic": "confidence"}), [0.25, 0.75, 0.5, 0.4375])
    assert [m.meta["confidence"] for m in out] == [0.25, 0.75, 0.5, 0.4375]  # exact in float32
    assert [m.meta["notice"] for m in out] == ["not_visible", None, None, "not_visible"]  # 0.5 is visible
    assert all(m.meta["gate"] == 0.5 for m in out)
    # still published in full: the array and the peak, unlike no_audio suppression
    for m in out:
        assert m.arrays["heatmap"].shape == (8, 8) and m.meta["peak"] is not None
    assert worker.stats.not_visible == 2 and worker.stats.suppressed == 0 and worker.stats.published == 4


def test_mostly_start_up_silence_always_carries_warming_up_never_the_gates_verdict():
    """The gate is calibrated at export on full windows of real audio (val pairs, engines/gate.py); a window
    that is mostly the start-up silence is outside that calibration, so the worker never lets the gate judge
    it: below *or* above the threshold it carries ``warming_up`` (with ``gate`` and ``confidence``, so a
    subscriber still sees both). From half real audio on, the gate decides as on any window."""
    gate = {"threshold": 0.5, "statistic": "confidence"}
    values, real = [0.25, 0.75, 0.25, 0.25, 0.75], [0.0, 0.3, 0.49, 0.5, 1.0]
    out, worker = _run_frames(GateEngine(gate), values, real=real)
    assert worker.window_samples  # the share is known, so warming_up can be decided
    assert [m.meta["notice"] for m in out] == ["warming_up", "warming_up", "warming_up", "not_visible", None]
    assert [m.meta["audio_real"] for m in out] == pytest.approx(real, abs=1e-3)
    assert all(m.meta["gate"] == 0.5 and m.meta["peak"] is not None for m in out)
    assert worker.stats.warming_up == 3 and worker.stats.not_visible == 1


def test_worker_without_gate_or_with_no_gate_never_marks():
    for engine, gate in ((GateEngine(None), True), (GateEngine({"threshold": 0.5}), False)):
        out, worker = _run_frames(engine, [0.25, 0.75], gate=gate)
        assert [m.meta["notice"] for m in out] == [None, None] and "gate" not in out[0].meta
        assert worker.stats.not_visible == 0
    with pytest.raises(UserError, match="gate.threshold"):
        InferenceWorker(
            GateEngine({"threshold": None}),
            frame_endpoints=[],
            audio_endpoints=[],
            heatmap_endpoint="inproc://x",
            heartbeat_endpoint=None,
        )


def test_no_gate_switch_reaches_the_worker():
    parser = argparse.ArgumentParser()
    inference_arguments(parser)
    assert parser.parse_args(["--engine", "e", "--no-gate"]).no_gate is True
    assert parser.parse_args(["--engine", "e"]).no_gate is False
    endpoints = Endpoints(["tcp://127.0.0.1:1"], ["tcp://127.0.0.1:2"], "tcp://127.0.0.1:3", "tcp://127.0.0.1:4")
    assert "--no-gate" in inference_spec(Path("e"), "onnxruntime", endpoints, StreamConfig(gate=False)).args
    assert "--no-gate" not in inference_spec(Path("e"), "onnxruntime", endpoints, StreamConfig()).args
    from avloc.stream.run.launcher import load_stream_config

    assert load_stream_config(ROOT / "configs" / "stream.yaml").gate is True


# ---------------------------------------------------------------------------------------------- display


def test_display_draws_no_overlay_for_not_visible_heatmaps():
    parser = argparse.ArgumentParser()
    display_arguments(parser)
    display = Display(parser.parse_args(["--headless"]))
    frame = np.full((240, 320, 3), 100, np.uint8)
    msg = protocol.Message("frame", "cam0", 1, {"capture": 1.0}, {"frame": frame}, {})
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    visible = HeatmapView(1, unit, (0.9, 0.9), None, 0.8)
    hidden = HeatmapView(1, unit, (0.9, 0.9), protocol.NOTICE_NOT_VISIBLE, 0.1)
    no_map = HeatmapView(1, None, None, protocol.NOTICE_NOT_VISIBLE, 0.1)
    plain = display.compose("cam0", msg, None)
    shown = display.compose("cam0", msg, hidden)
    assert np.array_equal(shown, display.compose("cam0", msg, no_map))  # the map is not drawn at all
    middle = slice(130, 180)  # below the HUD, above the notice at the bottom
    assert np.array_equal(shown[middle], plain[middle])
    assert not np.array_equal(shown[180:], plain[180:])  # ... but the NOT VISIBLE notice is
    assert not np.array_equal(display.compose("cam0", msg, visible)[middle], plain[middle])  # visible: overlaid


# ---------------------------------------------------------------------------------------------- script


def test_gate_effect_script_reports_val_and_test_rows(gated_engine, synth):
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gate_effect.py"), "--engine", str(gated_engine), "--data", str(synth)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    manifest = read_manifest(gated_engine)
    assert result["threshold"] == manifest["gate"]["threshold"]
    assert result["val"]["precision"] == pytest.approx(manifest["gate"]["val"]["precision"])
    assert result["val"]["recall"] == pytest.approx(manifest["gate"]["val"]["recall"])
    rows = (synth / "test_plus_silent.csv").read_text().splitlines()[1:]
    n_silent = sum(r.endswith(",1") for r in rows)
    assert result["test"]["silent"]["n"] == n_silent > 0
    assert result["test"]["sounding"]["n"] == len(rows) - n_silent
    for group in ("silent", "sounding"):
        assert 0.0 <= result["test"][group]["gated"] <= 1.0
    bad = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gate_effect.py"), "--engine", str(synth), "--data", str(synth)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_pipeline_bench_counts_not_visible_heatmaps_as_computed():
    from avloc.stream.run.report import summarize_records

    def record(seq: int, notice: str | None) -> dict:
        ts = {"capture": seq, "publish": seq + 0.01, "display": seq + 0.02}
        return {"stream": "cam0", "seq": seq, "ts": ts, "notice": notice}

    summary = summarize_records([record(0, None), record(1, "not_visible"), record(2, "no_audio")])
    assert summary["heatmaps"] == 2 and summary["suppressed"] == 1
    assert summary["e2e_ms"]["n"] == 2  # the gated heatmap's latency is measured like any other

"""ACL engines on the tiny random architecture: ONNX Runtime parity for both graphs, the manifest, the torch
backend, and a short replay through the real streaming pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avloc.core.acl import build_acl_model
from avloc.core.audio import FrontEnd, FrontEndConfig
from avloc.core.checkpoint import ImageConfig, load_model, save_checkpoint
from avloc.core.config import from_dict, load_config
from avloc.engines.acl_export import export_acl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def acl_engine(tmp_path_factory) -> tuple[Path, Path]:
    config = load_config(ROOT / "configs" / "acl_tiny.yaml")
    torch.manual_seed(0)
    model = build_acl_model(config["model"])
    root = tmp_path_factory.mktemp("acl")
    checkpoint = save_checkpoint(
        root / "acl.pt",
        model,
        method="acl",
        model_config=config["model"],
        frontend=FrontEndConfig.from_dict(config["frontend"]),
        image=from_dict(ImageConfig, config["image"], "image"),
    )
    return checkpoint, export_acl(checkpoint, root / "engine")


# Decoder logits 0.5 everywhere and b / w = 20 / 100: every heatmap pixel is sigmoid(0.7), and so is the
# confidence (mean of the top quarter).
CONSTANT_HEAT = 0.6681877721681662


@pytest.fixture(scope="module")
def constant_acl_engine(tmp_path_factory) -> Path:
    from acl_helpers import constant_decoder_logits

    config = load_config(ROOT / "configs" / "acl_tiny.yaml")
    torch.manual_seed(0)
    model = build_acl_model(config["model"])
    constant_decoder_logits(model, 0.5, w=100.0, b=20.0)
    root = tmp_path_factory.mktemp("acl_constant")
    checkpoint = save_checkpoint(
        root / "acl.pt",
        model,
        method="acl",
        model_config=config["model"],
        frontend=FrontEndConfig.from_dict(config["frontend"]),
        image=from_dict(ImageConfig, config["image"], "image"),
    )
    return export_acl(checkpoint, root / "engine")


def test_engine_heatmap_and_confidence_hand_computed(constant_acl_engine) -> None:
    import math

    from avloc.engines.base import load_engine

    assert CONSTANT_HEAT == pytest.approx(1 / (1 + math.exp(-0.7)), abs=1e-15)
    rng = np.random.default_rng(3)
    spec = rng.standard_normal((2, 1, 98, 128), dtype=np.float32)
    image = rng.standard_normal((2, 3, 48, 48), dtype=np.float32)
    with load_engine(constant_acl_engine, threads=1) as engine:
        heat, conf = engine.localize(image, engine.embed_audio(spec))
    assert heat.shape == (2, 32, 32)
    np.testing.assert_allclose(heat, CONSTANT_HEAT, rtol=0, atol=1e-6)
    np.testing.assert_allclose(conf, CONSTANT_HEAT, rtol=0, atol=1e-6)


def test_manifest_describes_the_acl_engine(acl_engine) -> None:
    _, engine = acl_engine
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["method"] == "acl"
    assert manifest["frontend"]["kind"] == "fbank" and manifest["frontend"]["window_seconds"] == 1.0
    assert manifest["graphs"]["audio"]["inputs"][0]["shape"] == ["batch", 1, 98, 128]
    assert manifest["graphs"]["visual"]["inputs"][0]["shape"] == ["batch", 3, 48, 48]
    assert manifest["image"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert manifest["embed_dim"] == 16
    assert manifest["outputs"]["heatmap"]["feature_size"] == [32, 32]
    assert manifest["heatmap_range"] == [0.0, 1.0]
    assert max(manifest["parity_max_abs_diff"].values()) <= 1e-4


def test_onnx_runtime_matches_pytorch_for_both_graphs(acl_engine) -> None:
    import onnxruntime as ort

    checkpoint, engine = acl_engine
    model = load_model(checkpoint).model
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    audio = ort.InferenceSession(str(engine / "audio.onnx"), options, providers=["CPUExecutionProvider"])
    visual = ort.InferenceSession(str(engine / "visual.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    frontend = FrontEnd(FrontEndConfig(kind="fbank", window_seconds=1.0))
    for batch in (1, 2):
        wave = torch.from_numpy(rng.uniform(-0.5, 0.5, (batch, 16000)).astype(np.float32))
        spec = frontend(wave)  # fbank on the host, as the engine expects
        image = rng.standard_normal((batch, 3, 48, 48), dtype=np.float32)
        with torch.no_grad():
            emb_t = model.encode_audio(spec)  # the unfrozen model: folding / constants change nothing
            heat_t = model.heatmap_from_embedding(torch.from_numpy(image), emb_t)
        (emb,) = audio.run(None, {"spectrogram": spec.numpy()})
        heat, conf = visual.run(None, {"image": image, "audio_embedding": emb})
        assert emb.shape == (batch, 16) and heat.shape == (batch, 32, 32) and conf.shape == (batch,)
        np.testing.assert_allclose(emb, emb_t.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(heat, heat_t.numpy(), atol=1e-4, rtol=0)
        top = np.sort(heat.reshape(batch, -1), axis=1)[:, -256:].mean(axis=1)  # top 25 % of 32x32
        np.testing.assert_allclose(conf, top, atol=1e-5, rtol=0)


def test_torch_backend_serves_the_same_engine(acl_engine) -> None:
    from avloc.engines.base import load_engine

    _, engine = acl_engine
    rng = np.random.default_rng(2)
    spec = rng.standard_normal((2, 1, 98, 128), dtype=np.float32)
    image = rng.standard_normal((2, 3, 48, 48), dtype=np.float32)
    results = []
    for backend in ("onnxruntime", "torch"):
        with load_engine(engine, backend=backend, threads=1) as eng:
            emb = eng.embed_audio(spec)
            results.append((emb, *eng.localize(image, emb)))
    for a, b in zip(results[0], results[1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_replay_a_short_clip_through_the_pipeline(constant_acl_engine, tmp_path) -> None:
    from avloc.core.data.synth import write_synth_video
    from avloc.stream.run.replay_cli import run_replay

    engine = constant_acl_engine
    video = tmp_path / "clip.mp4"
    write_synth_video(video, seconds=2.0, fps=10, size=(96, 72), seed=5)
    # a loaded shared machine can stall a worker's start for seconds: give supervision more slack
    stream_config = tmp_path / "stream.yaml"
    stream_config.write_text(f"_base: {ROOT / 'configs' / 'stream.yaml'}\nheartbeat_timeout_s: 30.0\n")
    summary = run_replay(
        video,
        engine,
        run_dir=tmp_path / "run",
        speed="max",
        threads=1,
        timeout_s=120,
        config_path=stream_config,
    )
    lines = (tmp_path / "run" / "latency.jsonl").read_text().splitlines()
    heatmaps = [json.loads(line) for line in lines if line.strip()]
    served = [h for h in heatmaps if not h.get("notice")]
    assert served, f"no heatmaps from the ACL engine (summary: {summary.get('reason')})"
    assert summary["reason"] == "ended" and summary["processes"]["inference"]["restarts"] == 0
    # every frame, whatever it shows and hears: the hand-computed sigmoid(0.5 + 20 / 100)
    assert all(h["confidence"] == pytest.approx(CONSTANT_HEAT, abs=1e-5) for h in served)


def test_bicubic_matrix_is_torch_bicubic() -> None:
    from torch.nn import functional as F

    from avloc.core.acl.model import bicubic_matrix

    torch.manual_seed(4)
    for src, dst in ((352, 224), (7, 11)):  # the paper's 352 -> 224 heatmap; an enlargement
        x = torch.randn(2, 1, src, src) * 100
        resize = bicubic_matrix(src, dst)
        expected = F.interpolate(x, size=(dst, dst), mode="bicubic", align_corners=False)
        torch.testing.assert_close(resize @ x @ resize.T, expected, atol=1e-3, rtol=0)  # 1e-5 of the scale


def test_heatmap_resize_at_the_paper_ratio_matches_pytorch(tmp_path) -> None:
    """352 -> 224 (11 : 7) shrunk to 176 -> 112: ONNX Resize(cubic) derives its float32 source coordinates
    differently from torch, 5e-4 off in this heatmap; the exported graph must compute torch's resize."""
    import onnxruntime as ort

    config = load_config(ROOT / "configs" / "acl_tiny.yaml")
    config["model"].update(image_size=176, heatmap_size=112)
    config["image"]["size"] = 176
    torch.manual_seed(0)
    model = build_acl_model(config["model"])  # random decoder logits: std ~26, max ~260
    with torch.no_grad():
        model.masker_i.b.zero_()  # threshold at logit 0, the middle of their range: many sensitive pixels
    checkpoint = save_checkpoint(
        tmp_path / "acl.pt",
        model,
        method="acl",
        model_config=config["model"],
        frontend=FrontEndConfig.from_dict(config["frontend"]),
        image=from_dict(ImageConfig, config["image"], "image"),
    )
    engine = export_acl(checkpoint, tmp_path / "engine")
    rng = np.random.default_rng(1)
    image = rng.standard_normal((2, 3, 176, 176), dtype=np.float32)
    emb = rng.standard_normal((2, 16), dtype=np.float32)
    with torch.no_grad():  # the unfrozen model: F.interpolate bicubic, as training and evaluation
        expected = model.heatmap_from_embedding(torch.from_numpy(image), torch.from_numpy(emb)).numpy()
    visual = ort.InferenceSession(str(engine / "visual.onnx"), providers=["CPUExecutionProvider"])
    heat, _ = visual.run(None, {"image": image, "audio_embedding": emb})
    assert heat.shape == (2, 112, 112)
    np.testing.assert_allclose(heat, expected, atol=1e-4, rtol=0)


def test_parity_relative_to_the_logit_scale_still_catches_a_wrong_graph(acl_engine) -> None:
    """The heatmap parity is relative to max(1, max|logit| / 4): the engine itself passes far below the bound,
    and torch graphs whose threshold moved by one logit (b / w + 1) are rejected."""
    from avloc.engines.acl_export import acl_graphs
    from avloc.engines.export import PARITY_FAIL, _parity

    checkpoint, engine = acl_engine
    graphs = acl_graphs(load_model(checkpoint), 48)
    shape = (1, 98, 128)
    exact = _parity(graphs, engine / "audio.onnx", engine / "visual.onnx", shape, 48)
    assert exact["heatmap"] <= 1e-5 and exact["confidence"] <= 1e-5
    masker = graphs.visual.model.masker_i
    with torch.no_grad():
        masker.b.add_(masker.w)
    wrong = _parity(graphs, engine / "audio.onnx", engine / "visual.onnx", shape, 48)
    assert wrong["heatmap"] > PARITY_FAIL

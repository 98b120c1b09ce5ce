"""Object-guided localization: the official test.py blend, the ResNet18 objectness network loaded strictly from
a local weights file, and the ``ogl/`` rows of ``avloc eval``."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from avloc.core.audio import FrontEndConfig
from avloc.core.checkpoint import ImageConfig, save_checkpoint
from avloc.core.errors import UserError
from avloc.core.ogl import (
    combine,
    load_objectness,
    load_resnet18_objectness,
    objectness_of,
    preprocess_imagenet,
    rgb_tensor,
)
from avloc.core.ssl_align import SSLAlign, SSLAlignConfig


def _official_normalize_img(value):  # utils.normalize_img
    vmin, vmax = value.min(), value.max()
    if not (vmax - vmin) == 0:
        value = (value - vmin) / (vmax - vmin)
    return value


def test_combine_is_the_official_blend():
    rng = np.random.default_rng(0)
    av = rng.standard_normal((224, 224)).astype(np.float32)
    obj7 = rng.random((7, 7)).astype(np.float32) * 5
    got = combine(av, obj7, 0.4)
    # test.py validate(): both maps at 224 (bilinear), normalised, blended with alpha on the AV map, normalised
    pred_av = _official_normalize_img(av)
    pred_obj = _official_normalize_img(cv2.resize(obj7, (224, 224), interpolation=cv2.INTER_LINEAR))
    expected = _official_normalize_img(pred_av * 0.4 + pred_obj * (1 - 0.4))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.dtype == np.float32 and got.min() == 0.0 and got.max() == pytest.approx(1.0)
    np.testing.assert_allclose(combine(av, obj7, 1.0), _official_normalize_img(av), atol=1e-6)
    with pytest.raises(UserError, match="--ogl-alpha 1.5"):
        combine(av, obj7, 1.5)


class _NormReducer(nn.Module):  # test.py
    def forward(self, x):
        return x.abs().mean(1)


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("w") / "resnet18-f37072fd.pth"
    torch.save(net.state_dict(), path)
    return path, net.eval()


def test_resnet18_objectness_equals_the_official_object_saliency_model(resnet_weights):
    path, net = resnet_weights
    # test.py: resnet18(pretrained=True) with avgpool = Identity and fc = Unflatten -> NormReducer -> Unsqueeze
    net.avgpool = nn.Identity()
    net.fc = nn.Sequential(nn.Unflatten(1, (512, 7, 7)), _NormReducer(), nn.Unflatten(1, (1, 7)))
    model = load_resnet18_objectness(path)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(2)]
    x = preprocess_imagenet(images)
    assert x.shape == (2, 3, 224, 224)
    with torch.no_grad():
        got, ref = model(x), net(x)[:, 0]
    assert got.shape == (2, 7, 7)
    torch.testing.assert_close(got, ref.reshape(2, 7, 7))
    # the OGL wrapper takes RGB in [0, 1] and normalises it itself (also inside the engine graph)
    np.testing.assert_allclose(objectness_of(images, load_objectness(str(path))), ref.numpy(), atol=1e-5)
    bad = path.with_name("bad.pth")
    state = net.state_dict()
    state.pop("layer2.0.bn1.bias")
    torch.save(state, bad)
    with pytest.raises(UserError, match=r"layer2\.0\.bn1\.bias"):
        load_resnet18_objectness(bad)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from avloc.core.data.synth import make_synth

    root = tmp_path_factory.mktemp("synth") / "data"
    make_synth(
        root,
        seed=5,
        n_train=2,
        n_val=1,
        n_test=6,
        distractors=1,
        silent_frac=0.3,
        image_size=64,
        clip_seconds=1.0,
        unheard_frac=0.0,
        workers=1,
    )
    return root


def test_eval_reports_rows_with_and_without_ogl(synth_root, resnet_weights, tmp_path):
    from avloc.cli import main as cli_main
    from avloc.core.datasets import AVDataset, load_vggss_json
    from avloc.core.metrics import evaluate_maps

    torch.manual_seed(0)
    ckpt = save_checkpoint(
        tmp_path / "best.pt",
        SSLAlign(SSLAlignConfig(width=8)),
        method="ssl_align",
        model_config={"width": 8},
        frontend=FrontEndConfig(window_seconds=1.0),
        image=ImageConfig(size=64),
    )
    runs = {}
    for name, extra in (("plain", []), ("alpha1", ["--ogl-alpha", "1"]), ("alpha0", ["--ogl-alpha", "0"])):
        ogl = [] if name == "plain" else ["--ogl", str(resnet_weights[0])]
        out = tmp_path / f"{name}.json"
        argv = [
            "eval",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(synth_root),
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--out",
            str(out),
            *ogl,
            *extra,
        ]
        assert cli_main(argv) == 0
        runs[name] = json.loads(out.read_text())
    plain, alpha1, alpha0 = runs["plain"], runs["alpha1"], runs["alpha0"]
    assert not any(k.startswith("ogl/") for k in plain)
    assert alpha1["ogl"] == {"objectness": str(resnet_weights[0]), "alpha": 1.0}
    for mode in ("median", "adaptive"):
        assert alpha1[f"{mode}/ciou_ap50"] == plain[f"{mode}/ciou_ap50"]  # the plain rows are unchanged
        # alpha 1 keeps only the (normalised) AV map: the same binarisation up to float32 rounding of near-ties
        for key in ("ciou_ap50", "ciou_mean", "auc"):
            assert alpha1[f"ogl/{mode}/{key}"] == pytest.approx(plain[f"{mode}/{key}"], abs=1e-4)
    # alpha 0 is the objectness map alone: score it independently
    dataset = AVDataset(synth_root, "test", FrontEndConfig(window_seconds=1.0))
    annotations = load_vggss_json(synth_root / "test.json")
    ids = [i for i in dataset.ids if i in annotations]
    obj = objectness_of([dataset.image(i) for i in ids], load_objectness(str(resnet_weights[0])))
    maps = {i: combine(np.zeros((64, 64), np.float32), o, 0.0) for i, o in zip(ids, obj)}
    expected = evaluate_maps(maps, {i: annotations[i] for i in ids}, binarize="median")
    assert alpha0["ogl/median/ciou_mean"] == pytest.approx(expected["ciou_mean"], abs=1e-9)
    assert alpha0["ogl/median/ciou_mean"] != pytest.approx(alpha1["ogl/median/ciou_mean"], abs=1e-6)


def test_effnet_objectness_is_the_official_reduction_of_its_head_features():
    from avloc.core.ogl import LITE0_MEAN, LITE0_STD, reduce_features

    model = load_objectness("effnet-lite0")
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)]
    with torch.no_grad():
        ref = model.net.feature_map((rgb_tensor(images) * 255 - LITE0_MEAN) / LITE0_STD).abs().mean(1)
    got = objectness_of(images, model)
    assert got.shape == (1, 7, 7) and float(got.std()) > 0
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-6)
    assert reduce_features(torch.tensor([[[[-2.0]], [[4.0]]]])).item() == 3.0


@pytest.fixture(scope="module")
def ogl_engine(resnet_weights, tmp_path_factory) -> Path:
    """A tiny SSL-Align engine exported with ``--ogl`` (the random-weight ResNet18 above)."""
    from avloc.cli import main as cli_main

    root = tmp_path_factory.mktemp("ogl_engine")
    torch.manual_seed(0)
    ckpt = save_checkpoint(
        root / "best.pt",
        SSLAlign(SSLAlignConfig(width=8)),
        method="ssl_align",
        model_config={"width": 8},
        frontend=FrontEndConfig(window_seconds=1.0),
        image=ImageConfig(size=64),
    )
    out = root / "engine"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--ogl", str(resnet_weights[0])]) == 0
    return out


def test_export_ogl_writes_a_third_graph_that_matches_torch(ogl_engine, resnet_weights):
    import onnxruntime as ort

    from avloc.engines.base import read_manifest, sha256_file

    image = ImageConfig(size=64)
    manifest = read_manifest(ogl_engine)
    entry = manifest["ogl"]
    assert entry["file"] == "objectness.onnx" and entry["objectness"] == "resnet18" and entry["alpha"] == 0.4
    assert entry["sha256"] == sha256_file(ogl_engine / "objectness.onnx")
    # the graph takes the engine's normalised image: the same frame through eval's path gives the same map
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    x = (rgb.astype(np.float32) / 255 - np.array(image.mean, np.float32)) / np.array(image.std, np.float32)
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    session = ort.InferenceSession(str(ogl_engine / "objectness.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x})[0]
    with torch.no_grad():
        ref = load_objectness(str(resnet_weights[0]))(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)
    assert got.shape == (1, 2, 2) and entry["outputs"][0]["shape"] == ["batch", 2, 2]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)


# --- live OGL: the engine's objectness graph, blend_live, bench engine --------------------------------------


def _engine_copy(engine: Path, dest: Path, **ogl_changes) -> Path:
    """A copy of the engine (graphs linked, not copied) whose manifest's ogl entry is changed (None removes it)."""
    dest.mkdir()
    for path in engine.iterdir():
        (dest / path.name).symlink_to(path)
    (dest / "manifest.json").unlink()
    manifest = json.loads((engine / "manifest.json").read_text())
    if ogl_changes.get("ogl", True) is None:
        manifest.pop("ogl")
    else:
        manifest["ogl"].update(ogl_changes)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_engines_run_the_objectness_graph_and_blend_live(ogl_engine, resnet_weights):
    from avloc.core.ogl import blend_live
    from avloc.engines.base import load_engine, preprocess_frames
    from avloc.stream.serve.inference_worker import _normalizer, encode_heatmap

    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(3)]  # BGR, as the worker gets
    with (
        load_engine(ogl_engine, "onnxruntime", threads=1) as ort_engine,
        load_engine(ogl_engine, "torch") as torch_engine,
    ):
        assert ort_engine.has_objectness and torch_engine.has_objectness
        images = preprocess_frames(frames, ort_engine.manifest)
        ort_maps = ort_engine.objectness(images)
        torch_maps = torch_engine.objectness(images)
        np.testing.assert_allclose(ort_maps, torch_maps, rtol=1e-4, atol=1e-4)
        # the same map as eval's path from RGB in [0, 1] at the engine's size
        rgb = torch.from_numpy(images) * torch.tensor(ImageConfig().std).view(1, 3, 1, 1)
        rgb = rgb + torch.tensor(ImageConfig().mean).view(1, 3, 1, 1)
        with torch.no_grad():
            ref = load_objectness(str(resnet_weights[0]))(rgb).numpy()
        np.testing.assert_allclose(ort_maps, ref, rtol=1e-4, atol=1e-4)
        with pytest.raises(UserError, match=r"objectness: image shape \(3, 3, 32, 32\)"):
            ort_engine.objectness(np.zeros((3, 3, 32, 32), np.float32))

        emb = ort_engine.embed_audio(rng.standard_normal((3, *ort_engine.spec_shape), dtype=np.float32))
        heatmaps, _ = ort_engine.localize(images, emb)
        lo, hi = _normalizer(ort_engine.manifest)
        for alpha in (0.4, 0.0):
            live = blend_live(ort_engine, images, heatmaps, alpha, value_range=(lo, hi))
            assert live.shape == heatmaps.shape and live.dtype == np.float32
            for i in range(3):
                # what the worker publishes is exactly the official blend, in [0, 1] with its extremes reached
                published = encode_heatmap(live[i], lo, hi, "float16").astype(np.float32)
                np.testing.assert_allclose(published, combine(heatmaps[i], ort_maps[i], alpha), atol=1e-3)
                assert published.min() == 0.0 and published.max() == 1.0
        # alpha 0: objectness only, so the live map no longer depends on the sound
        other, _ = ort_engine.localize(images, -emb)
        np.testing.assert_allclose(blend_live(torch_engine, images, other, 0.0, value_range=(lo, hi)), live, atol=1e-4)


def test_objectness_errors_are_one_line(ogl_engine, resnet_weights, tmp_path):
    from torchvision.models import resnet18

    from avloc.engines.base import load_engine

    image = np.zeros((1, 3, 64, 64), np.float32)
    from avloc.engines.bench import _runs_objectness

    plain = _engine_copy(ogl_engine, tmp_path / "plain", ogl=None)
    with load_engine(plain, "onnxruntime", threads=1) as engine:
        assert not engine.has_objectness
        with pytest.raises(UserError, match="no OGL objectness graph .*--ogl"):
            engine.objectness(image)
    # torch rebuilds the net from its source: a missing file is named, localize keeps working
    missing = _engine_copy(ogl_engine, tmp_path / "missing", source=str(tmp_path / "gone.pth"))
    with load_engine(missing, "torch") as engine:
        with pytest.raises(UserError, match="gone.pth"):
            engine.objectness(image)
        emb = np.zeros((1, engine.embed_dim), np.float32)
        assert engine.localize(image, emb)[0].shape[0] == 1
        # bench engine then times the other graphs and reports why not this one
        errors: dict[str, str] = {}
        assert not _runs_objectness(engine, image, "torch", errors) and "gone.pth" in errors["torch objectness"]
    # ... and weights changed since the export are caught by the check against objectness.onnx
    torch.manual_seed(1)
    changed_path = tmp_path / "other.pth"
    torch.save(resnet18().state_dict(), changed_path)
    changed = _engine_copy(ogl_engine, tmp_path / "changed", source=str(changed_path))
    with load_engine(changed, "torch") as engine, pytest.raises(UserError, match="differs from objectness.onnx"):
        engine.objectness(image)


def test_bench_engine_times_the_objectness_graph(ogl_engine):
    from avloc.engines.bench import bench_engine

    report = bench_engine(ogl_engine, ["onnxruntime"], [1], threads=1, iters=2, warmup=0)
    rows = {(r["backend"], r["graph"]) for r in report["results"]}
    assert rows == {(b, g) for b in ("onnxruntime", "torch") for g in ("audio", "visual", "objectness")}
    assert not report["errors"]
    for r in report["results"]:
        assert r["median_ms"] > 0 and r["speedup_vs_eager_torch"] > 0


def test_inference_worker_publishes_the_ogl_blend(ogl_engine, tmp_path):
    """The worker's batch path with --ogl: each published heatmap is combine(plain map, objectness map)."""
    import argparse
    import time

    import zmq

    from avloc.engines.base import load_engine, preprocess_frames
    from avloc.stream.run.launcher import StreamConfig
    from avloc.stream.run.pipeline import Endpoints, inference_spec
    from avloc.stream.serve.inference import _ogl_alpha
    from avloc.stream.serve.inference_worker import InferenceWorker
    from avloc.stream.wire import protocol

    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(2)]
    ctx = zmq.Context()
    endpoint = f"inproc://ogl-{time.monotonic_ns()}"
    pub = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=True, hwm=100)
    sub = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=100)
    try:
        with load_engine(ogl_engine, "onnxruntime", threads=1) as engine:
            spec = rng.standard_normal(engine.spec_shape, dtype=np.float32)
            for dtype, atol in (("float16", 1e-3), ("uint8", 0.5 / 255 + 1e-3)):
                worker = InferenceWorker(
                    engine,
                    frame_endpoints=[],
                    audio_endpoints=[],
                    heatmap_endpoint=endpoint,
                    heartbeat_endpoint=None,
                    heatmap_dtype=dtype,
                    ogl_alpha=0.4,
                )
                worker.warm_up()
                t = protocol.now()
                worker.take_audio(
                    [protocol.Message("audio", "mic0", 0, {"window_end": t - 0.01}, {"spec": spec}, {})], t
                )
                worker.take_frames(
                    [
                        protocol.Message("frame", f"cam{i}", 0, {"capture": t, "send": t}, {"frame": f}, {})
                        for i, f in enumerate(frames)
                    ],
                    t,
                )
                assert worker.process_pending(pub) == 2 and worker.stats.batches == 1
                time.sleep(0.05)
                got = {m.stream: m for m in protocol.drain_latest(sub)}
                images = preprocess_frames(frames, engine.manifest)
                plain, _ = engine.localize(images, engine.embed_audio(spec[None].repeat(2, axis=0)))
                objectness = engine.objectness(images)
                for i in range(2):
                    heat = got[f"cam{i}"].arrays["heatmap"]
                    assert heat.dtype == np.dtype(dtype)
                    published = heat.astype(np.float32) / (255.0 if dtype == "uint8" else 1.0)
                    expected = combine(plain[i], objectness[i], 0.4)
                    np.testing.assert_allclose(published, expected, atol=atol)
                    # the blend differs from the plain map (objectness is weighted 0.6)
                    assert np.abs(published - combine(plain[i], objectness[i], 1.0)).max() > 0.01
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()

    # --ogl-alpha without --ogl is a one-line error: the worker's command line and the launcher's spec
    with pytest.raises(UserError, match=r"^--ogl-alpha needs --ogl$"):
        _ogl_alpha(argparse.Namespace(ogl=False, ogl_alpha=0.5), None)
    endpoints = Endpoints(["tcp://127.0.0.1:1"], ["tcp://127.0.0.1:2"], "tcp://127.0.0.1:3", "tcp://127.0.0.1:4")
    with pytest.raises(UserError, match="--ogl-alpha needs --ogl"):
        inference_spec(ogl_engine, "onnxruntime", endpoints, StreamConfig(), extra=["--ogl-alpha", "0.5"])
    args = inference_spec(ogl_engine, "onnxruntime", endpoints, StreamConfig(ogl=True, ogl_alpha=0.3)).args
    assert args[args.index("--ogl") :][:3] == ["--ogl", "--ogl-alpha", "0.3"]
    # avloc run / replay pass --ogl / --ogl-alpha on to the worker (after the config's, so they win)
    from avloc.stream.run.args import inference_args
    from avloc.stream.run.replay_cli import add_arguments as replay_arguments

    parser = argparse.ArgumentParser()
    replay_arguments(parser)
    cli = parser.parse_args(["v.mp4", "--engine", str(ogl_engine), "--ogl", "--ogl-alpha", "0.7"])
    args = inference_spec(
        ogl_engine, "onnxruntime", endpoints, StreamConfig(ogl=True, ogl_alpha=0.3), extra=inference_args(cli)
    ).args
    assert args[-3:] == ["--ogl", "--ogl-alpha", "0.7"]
    with pytest.raises(UserError, match="--ogl-alpha 1.5"):
        inference_args(parser.parse_args(["v.mp4", "--engine", "e", "--ogl", "--ogl-alpha", "1.5"]))
    # ... and an engine without the objectness graph is refused when the worker is built
    plain_engine = _engine_copy(ogl_engine, tmp_path / "plain", ogl=None)
    with load_engine(plain_engine, "onnxruntime", threads=1) as engine, pytest.raises(UserError, match="--ogl"):
        InferenceWorker(
            engine,
            frame_endpoints=[],
            audio_endpoints=[],
            heatmap_endpoint="inproc://x",
            heartbeat_endpoint=None,
            ogl_alpha=0.4,
        )


def test_export_refuses_ogl_on_a_model_with_objectness_built_in(tmp_path):
    """The open-set recipe adds objectness to its heatmap itself (model.objectness): `avloc export --ogl` would
    blend objectness in a second time, so it is a one-line error before anything is written."""
    from avloc.core.audio import FrontEndConfig
    from avloc.core.checkpoint import ImageConfig, save_checkpoint
    from avloc.core.config import to_dict
    from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
    from avloc.engines.export import export_engine

    cfg = SSLAlignConfig(backbone="pretrained", width=4, visual_layer4_stride=2, objectness=True)
    ckpt = save_checkpoint(
        tmp_path / "m.pt",
        SSLAlign(cfg),
        method="ssl_align",
        model_config=to_dict(cfg),
        frontend=FrontEndConfig(kind="yamnet", level="window_rms"),
        image=ImageConfig(size=64),
    )
    with pytest.raises(UserError, match="already adds objectness .* count it twice"):
        export_engine(ckpt, tmp_path / "engine", ogl="effnet-lite0")
    assert not (tmp_path / "engine").exists() and not (tmp_path / "engine.tmp").exists()

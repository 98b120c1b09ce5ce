"""SSL-Align model shapes and invariants, and strict checkpoints that carry their preprocessing."""

from __future__ import annotations

import pytest
import torch

from avloc.core.audio import FrontEndConfig
from avloc.core.checkpoint import ImageConfig, load_model, read_checkpoint, save_checkpoint
from avloc.core.config import to_dict
from avloc.core.errors import UserError
from avloc.core.ssl_align import SSLAlign, SSLAlignConfig


@pytest.fixture(scope="module")
def tiny() -> SSLAlign:
    torch.manual_seed(0)
    return SSLAlign(SSLAlignConfig(width=4)).eval()


def test_shapes_follow_the_paper_geometry(tiny):
    image = torch.randn(2, 3, 224, 224)
    spec = torch.randn(2, 1, 257, 60)
    with torch.no_grad():
        vmap = tiny.encode_image(image)
        audio = tiny.encode_audio(spec)
        heat = tiny.heatmap(image, spec)
    assert vmap.shape == (2, 32, 14, 14)  # layer4 stride 1: 224 / 16
    assert audio.shape == (2, 32)
    assert heat.shape == (2, 224, 224)
    # stride 2 in layer4 halves the map
    half = SSLAlign(SSLAlignConfig(width=4, visual_layer4_stride=2)).eval()
    assert half.encode_image(image).shape[-2:] == (7, 7)


def test_similarities_are_consistent(tiny):
    torch.manual_seed(1)
    vmap, audio = torch.randn(3, 32, 5, 5), torch.randn(4, 32)
    maps = tiny.cosine_maps(vmap, audio)
    assert maps.shape == (3, 4, 5, 5)
    assert maps.abs().max() <= 1 + 1e-5
    own = tiny.cosine_map(vmap, audio[:3])
    torch.testing.assert_close(own, maps[torch.arange(3), torch.arange(3)])
    sl = tiny.localization_similarity(vmap, audio)
    # a weighted mean of S: between its min and max for every pair
    flat = maps.flatten(2)
    assert (sl >= flat.min(-1).values - 1e-6).all() and (sl <= flat.max(-1).values + 1e-6).all()
    sa = tiny.alignment_similarity(vmap, audio)
    assert sa.shape == (3, 4) and sa.abs().max() <= 1 + 1e-5


def test_soft_mask_focuses_on_matching_locations(tiny):
    audio = torch.nn.functional.normalize(torch.randn(1, 32), dim=1)
    other = torch.nn.functional.normalize(torch.randn(1, 32), dim=1)
    vmap = other[:, :, None, None].expand(1, 32, 4, 4).clone()
    vmap[0, :, 1, 2] = audio[0]  # one location matches the sound exactly
    # s_L ~ 1 although 15 of 16 locations are unrelated (a plain mean would be ~1/16)
    assert float(tiny.localization_similarity(vmap, audio)) > 0.98


def test_checkpoint_round_trip_carries_preprocessing(tmp_path, tiny):
    frontend = FrontEndConfig(window_seconds=1.0)
    image = ImageConfig(size=96)
    path = save_checkpoint(
        tmp_path / "m.pt",
        tiny,
        method="ssl_align",
        model_config=to_dict(tiny.config),
        frontend=frontend,
        image=image,
        extra={"epoch": 3},
    )
    torch.load(path, weights_only=True)  # no pickled objects
    loaded = load_model(path)
    assert loaded.frontend == frontend and loaded.image == image and loaded.meta["epoch"] == 3
    for (name, a), (_, b) in zip(tiny.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not any(p.is_file() for p in tmp_path.glob("*.tmp"))


def _edit_state(path, edit):
    payload = read_checkpoint(path)
    edit(payload["state_dict"])
    torch.save(payload, path)


def test_missing_and_unexpected_keys_are_user_errors_naming_them(tmp_path, tiny):
    path = save_checkpoint(
        tmp_path / "m.pt",
        tiny,
        method="ssl_align",
        model_config=to_dict(tiny.config),
        frontend=FrontEndConfig(),
        image=ImageConfig(),
    )
    _edit_state(path, lambda sd: sd.pop("audio_proj.bias"))
    with pytest.raises(UserError, match=r"missing 1 key\(s\) \[audio_proj.bias\]"):
        load_model(path)

    path = save_checkpoint(
        tmp_path / "u.pt",
        tiny,
        method="ssl_align",
        model_config=to_dict(tiny.config),
        frontend=FrontEndConfig(),
        image=ImageConfig(),
    )
    _edit_state(path, lambda sd: sd.__setitem__("extra_head.weight", torch.zeros(2)))
    with pytest.raises(UserError, match=r"unexpected 1 key\(s\) \[extra_head.weight\]"):
        load_model(path)

    # a model config that does not match the weights (width) is a shape error, not a silent partial load
    path = save_checkpoint(
        tmp_path / "w.pt",
        tiny,
        method="ssl_align",
        model_config={"width": 8},
        frontend=FrontEndConfig(),
        image=ImageConfig(),
    )
    with pytest.raises(UserError, match="shape mismatch"):
        load_model(path)


def test_localization_and_gate_unchanged_at_minus_30_db() -> None:
    """With level: window_rms the heatmap of a scene heard at -30 dB equals the 0 dB one, and so does the
    engine's confidence (top-k mean of the map): the silence gate decides the same at any threshold."""
    import numpy as np

    from avloc.core.audio import FrontEnd
    from avloc.engines.export import SSLAlignVisualGraph, top_fraction_k

    torch.manual_seed(0)
    model = SSLAlign(SSLAlignConfig(width=8)).eval()
    fe = FrontEnd(FrontEndConfig(kind="mel", level="window_rms"))
    rng = np.random.default_rng(0)
    waves = torch.from_numpy((0.3 * rng.standard_normal((6, 48000))).astype(np.float32))
    images = torch.randn(6, 3, 64, 64)
    graph = SSLAlignVisualGraph(model, top_fraction_k((4, 4)))
    with torch.no_grad():
        loud = graph(images, model.encode_audio(fe(waves)))
        quiet = graph(images, model.encode_audio(fe(waves * 10 ** (-30 / 20))))
    torch.testing.assert_close(quiet[0], loud[0], atol=1e-4, rtol=0)
    for threshold in loud[1].tolist():
        assert ((quiet[1] >= threshold) == (loud[1] >= threshold)).all() or torch.allclose(quiet[1], loud[1], atol=1e-5)


@pytest.mark.slow
def test_pretrained_backbone_exports_whole(tmp_path) -> None:
    """backbone: pretrained (frozen Lite0 + YAMNet, learned heads) with the label-space and objectness terms: 8x8
    map at 256 px, only the heads train, the cached-feature path is the end-to-end model, and the exported ONNX
    engine holds the whole model: its heatmap (audio graph -> visual graph, as the worker runs them) equals the
    torch model's, both fixed terms included. Slow (~1 min on 2 busy cores): two ImageNet/AudioSet trunks are
    exported."""
    import json

    import numpy as np
    import onnxruntime as ort

    from avloc.core.ogl import reduce_features
    from avloc.engines.export import export_engine

    cfg = SSLAlignConfig(
        backbone="pretrained",
        width=8,
        visual_layer4_stride=2,
        labelspace=True,
        labelspace_weight=0.5,
        objectness=True,
        objectness_weight=0.3,
    )
    model = SSLAlign(cfg).train()
    assert not model.visual.trunk.training and not model.audio.trunk.training  # frozen batch norm
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head", "weight", "bias"} or trainable <= {"head", "weight", "bias"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".trunk." in n)
    fe = FrontEndConfig(kind="yamnet", level="window_rms")
    image = ImageConfig(size=256, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    ckpt = save_checkpoint(
        tmp_path / "m.pt", model, method="ssl_align", model_config=to_dict(cfg), frontend=fe, image=image
    )
    model.eval()
    torch.manual_seed(0)
    images, specs = torch.randn(2, 3, 256, 256), torch.randn(2, 1, 64, 297) - 3
    with torch.no_grad():
        feats = model.visual.features(images)
        vmap, emb = model.encode_image(images), model.encode_audio(specs)
        # training and validation run the same model from the cached trunk outputs
        torch.testing.assert_close(model.image_from_features(feats), vmap)
        torch.testing.assert_close(model.audio_from_features(model.audio.features(specs)), emb)
        want = model.cosine_map(vmap, emb)
        learned = model.cosine_map(vmap[:, :64], emb[:, :64])
        model.objectness_weight.fill_(0.0)
        with_ls = model.cosine_map(vmap, emb)
        model.objectness_weight.fill_(0.3)
    assert vmap.shape == (2, 64 + 1000 + 1, 8, 8) and emb.shape == (2, 64 + 1000 + 1)
    # the label-space term is there, at its weight, scale-free: learned <= fused <= learned + weight
    assert (with_ls - learned).min() >= -1e-6 and (with_ls - learned).amax(dim=(1, 2)).sub(0.5).abs().max() < 1e-5
    # the objectness term: OGL's mean |x| of the same head features, min-max normalised per image, at its weight
    obj = reduce_features(feats)
    lo, hi = obj.amin(dim=(1, 2), keepdim=True), obj.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(want - with_ls, 0.3 * (obj - lo) / (hi - lo), atol=1e-5, rtol=0)
    out = export_engine(ckpt, tmp_path / "engine")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["frontend"]["kind"] == "yamnet" and manifest["frontend"]["level"] == "window_rms"
    assert manifest["outputs"]["heatmap"]["feature_size"] == [8, 8]
    assert manifest["outputs"]["heatmap"]["range"] == pytest.approx([-1.0, 1.8])  # the live worker's scaling
    # the confidence is a mean of heatmap cells: its bounds are the heatmap's (was [-1, 1] whatever the terms)
    assert manifest["outputs"]["confidence"]["range"] == pytest.approx([-1.0, 1.8])
    assert "objectness" in manifest["outputs"]["heatmap"]["meaning"]
    assert max(manifest["parity_max_abs_diff"].values()) < 1e-3
    audio = ort.InferenceSession(str(out / "audio.onnx"), providers=["CPUExecutionProvider"])
    visual = ort.InferenceSession(str(out / "visual.onnx"), providers=["CPUExecutionProvider"])
    (engine_emb,) = audio.run(None, {"spectrogram": specs.numpy()})
    heat, _ = visual.run(None, {"image": images.numpy(), "audio_embedding": engine_emb})
    np.testing.assert_allclose(heat, want.numpy(), atol=1e-4)


def test_labelspace_config_errors() -> None:
    with pytest.raises(UserError, match="labelspace=true: needs backbone pretrained"):
        SSLAlignConfig(labelspace=True)
    with pytest.raises(UserError, match="labelspace_weight=-1"):
        SSLAlignConfig(backbone="pretrained", labelspace=True, labelspace_weight=-1)
    with pytest.raises(UserError, match="objectness=true: needs backbone pretrained"):
        SSLAlignConfig(objectness=True)
    with pytest.raises(UserError, match="objectness_weight=-0.5"):
        SSLAlignConfig(backbone="pretrained", objectness=True, objectness_weight=-0.5)
    # NaN / inf passed a `< 0` check and failed only at the first validation, after a whole epoch of training
    for name, value in (("labelspace_weight", "nan"), ("objectness_weight", "nan"), ("objectness_weight", "inf")):
        with pytest.raises(UserError, match=f"{name}={value}: expected a finite weight"):
            SSLAlignConfig(backbone="pretrained", labelspace=True, objectness=True, **{name: float(value)})


def test_open_set_eval_zero_shot_floor_is_the_fixed_terms_alone() -> None:
    """scripts/open_set_eval.py's "fixed terms only (zero-shot)" row: the heatmap with the learned cosine switched
    off, i.e. exactly the label-space + objectness terms at the checkpoint's weights; the model itself untouched."""
    import importlib.util
    from pathlib import Path

    from avloc.core.pretrained import YAMNET_DIM

    spec = importlib.util.spec_from_file_location(
        "open_set_eval", Path(__file__).resolve().parents[1] / "scripts" / "open_set_eval.py"
    )
    ose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ose)
    cfg = SSLAlignConfig(
        backbone="pretrained", width=4, visual_layer4_stride=2, labelspace=True, objectness=True, objectness_weight=0.3
    )
    model = SSLAlign(cfg).eval()
    torch.manual_seed(0)
    feats, rows = torch.rand(2, 1280, 8, 8), torch.rand(2, YAMNET_DIM + 521)
    zero = ose.fixed_terms_only(model)
    with torch.no_grad():
        vmap, a = model.image_from_features(feats), model.audio_from_features(rows)
        full, learned = model.cosine_map(vmap, a), model.cosine_map(vmap[:, :32], a[:, :32])
        floor = zero.cosine_map(zero.image_from_features(feats), zero.audio_from_features(rows))
    assert learned.abs().max() > 0.01  # the model's own heads are not zeroed
    torch.testing.assert_close(floor, full - learned, atol=1e-5, rtol=0)
    assert ose.fixed_terms_only(SSLAlign(SSLAlignConfig(width=4))) is None
    # the paired gain: a map on the box vs one off it, scene by scene
    import numpy as np

    from avloc.core.datasets import Annotation

    ann = {f"s{i}": Annotation(f"s{i}", "x", np.array([[0.0, 0.0, 0.5, 0.5]])) for i in range(4)}
    on = np.zeros((16, 16), np.float32)
    on[:8, :8] = 1
    off = np.roll(on, 8, axis=(0, 1))
    good, bad = {k: on for k in ann}, {k: (on if k == "s0" else off) for k in ann}
    gain = ose.paired_gain(good, bad, ann)
    assert gain["ciou_ap50"] == pytest.approx(0.75) and gain["n"] == 4
    assert gain["ciou_ap50_ci"][0] <= 0.75 <= gain["ciou_ap50_ci"][1]

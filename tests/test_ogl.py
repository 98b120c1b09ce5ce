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


def test_export_ogl_writes_a_third_graph_that_matches_torch(resnet_weights, tmp_path):
    import onnxruntime as ort

    from avloc.cli import main as cli_main
    from avloc.engines.base import read_manifest, sha256_file

    torch.manual_seed(0)
    image = ImageConfig(size=64)
    ckpt = save_checkpoint(
        tmp_path / "best.pt",
        SSLAlign(SSLAlignConfig(width=8)),
        method="ssl_align",
        model_config={"width": 8},
        frontend=FrontEndConfig(window_seconds=1.0),
        image=image,
    )
    out = tmp_path / "engine"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--ogl", str(resnet_weights[0])]) == 0
    manifest = read_manifest(out)
    entry = manifest["ogl"]
    assert entry["file"] == "objectness.onnx" and entry["objectness"] == "resnet18" and entry["alpha"] == 0.4
    assert entry["sha256"] == sha256_file(out / "objectness.onnx")
    # the graph takes the engine's normalised image: the same frame through eval's path gives the same map
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    x = (rgb.astype(np.float32) / 255 - np.array(image.mean, np.float32)) / np.array(image.std, np.float32)
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    session = ort.InferenceSession(str(out / "objectness.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x})[0]
    with torch.no_grad():
        ref = load_objectness(str(resnet_weights[0]))(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)
    assert got.shape == (1, 2, 2) and entry["outputs"][0]["shape"] == ["batch", 2, 2]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)

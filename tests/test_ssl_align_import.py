"""`avloc import ssl-align`: the official kaistmm/SSLalignment AVENet key list imports strictly, every key is
accounted for, and the imported model computes the official heatmap ``A`` (the cosine map of the L2-normalised
visual map and the max-pooled audio vector), also through the exported ONNX graphs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avloc.cli import main as cli_main
from avloc.core.checkpoint import load_model, read_checkpoint
from avloc.core.errors import UserError
from avloc.core.ssl_align_import import convert_state_dict

# Facts, not code: the state dict of one ``models_lvs/base_models.py`` ``resnet18`` (kaistmm/SSLalignment at the
# fetched HEAD), key and shape ("-" = scalar num_batches_tracked). AVENet holds two of them, ``imgnet`` and
# ``audnet``; its Sigmoid and AdaptiveMaxPool2d have no state. Re-create with the official repository on the path:
#   python -c "import base_models; [print(k, 'x'.join(map(str, v.shape)) or '-') for k, v in
#              base_models.resnet18(modal='vision').state_dict().items()]"
OFFICIAL_RESNET18_KEYS = """
conv1_a.weight 64x1x7x7
conv1.weight 64x3x7x7
conv1_flow.weight 64x6x7x7
bn1.weight 64
bn1.bias 64
bn1.running_mean 64
bn1.running_var 64
bn1.num_batches_tracked -
layer1.0.conv1.weight 64x64x3x3
layer1.0.bn1.weight 64
layer1.0.bn1.bias 64
layer1.0.bn1.running_mean 64
layer1.0.bn1.running_var 64
layer1.0.bn1.num_batches_tracked -
layer1.0.conv2.weight 64x64x3x3
layer1.0.bn2.weight 64
layer1.0.bn2.bias 64
layer1.0.bn2.running_mean 64
layer1.0.bn2.running_var 64
layer1.0.bn2.num_batches_tracked -
layer1.1.conv1.weight 64x64x3x3
layer1.1.bn1.weight 64
layer1.1.bn1.bias 64
layer1.1.bn1.running_mean 64
layer1.1.bn1.running_var 64
layer1.1.bn1.num_batches_tracked -
layer1.1.conv2.weight 64x64x3x3
layer1.1.bn2.weight 64
layer1.1.bn2.bias 64
layer1.1.bn2.running_mean 64
layer1.1.bn2.running_var 64
layer1.1.bn2.num_batches_tracked -
layer2.0.conv1.weight 128x64x3x3
layer2.0.bn1.weight 128
layer2.0.bn1.bias 128
layer2.0.bn1.running_mean 128
layer2.0.bn1.running_var 128
layer2.0.bn1.num_batches_tracked -
layer2.0.conv2.weight 128x128x3x3
layer2.0.bn2.weight 128
layer2.0.bn2.bias 128
layer2.0.bn2.running_mean 128
layer2.0.bn2.running_var 128
layer2.0.bn2.num_batches_tracked -
layer2.0.downsample.0.weight 128x64x1x1
layer2.0.downsample.1.weight 128
layer2.0.downsample.1.bias 128
layer2.0.downsample.1.running_mean 128
layer2.0.downsample.1.running_var 128
layer2.0.downsample.1.num_batches_tracked -
layer2.1.conv1.weight 128x128x3x3
layer2.1.bn1.weight 128
layer2.1.bn1.bias 128
layer2.1.bn1.running_mean 128
layer2.1.bn1.running_var 128
layer2.1.bn1.num_batches_tracked -
layer2.1.conv2.weight 128x128x3x3
layer2.1.bn2.weight 128
layer2.1.bn2.bias 128
layer2.1.bn2.running_mean 128
layer2.1.bn2.running_var 128
layer2.1.bn2.num_batches_tracked -
layer3.0.conv1.weight 256x128x3x3
layer3.0.bn1.weight 256
layer3.0.bn1.bias 256
layer3.0.bn1.running_mean 256
layer3.0.bn1.running_var 256
layer3.0.bn1.num_batches_tracked -
layer3.0.conv2.weight 256x256x3x3
layer3.0.bn2.weight 256
layer3.0.bn2.bias 256
layer3.0.bn2.running_mean 256
layer3.0.bn2.running_var 256
layer3.0.bn2.num_batches_tracked -
layer3.0.downsample.0.weight 256x128x1x1
layer3.0.downsample.1.weight 256
layer3.0.downsample.1.bias 256
layer3.0.downsample.1.running_mean 256
layer3.0.downsample.1.running_var 256
layer3.0.downsample.1.num_batches_tracked -
layer3.1.conv1.weight 256x256x3x3
layer3.1.bn1.weight 256
layer3.1.bn1.bias 256
layer3.1.bn1.running_mean 256
layer3.1.bn1.running_var 256
layer3.1.bn1.num_batches_tracked -
layer3.1.conv2.weight 256x256x3x3
layer3.1.bn2.weight 256
layer3.1.bn2.bias 256
layer3.1.bn2.running_mean 256
layer3.1.bn2.running_var 256
layer3.1.bn2.num_batches_tracked -
layer4.0.conv1.weight 512x256x3x3
layer4.0.bn1.weight 512
layer4.0.bn1.bias 512
layer4.0.bn1.running_mean 512
layer4.0.bn1.running_var 512
layer4.0.bn1.num_batches_tracked -
layer4.0.conv2.weight 512x512x3x3
layer4.0.bn2.weight 512
layer4.0.bn2.bias 512
layer4.0.bn2.running_mean 512
layer4.0.bn2.running_var 512
layer4.0.bn2.num_batches_tracked -
layer4.0.downsample.0.weight 512x256x1x1
layer4.0.downsample.1.weight 512
layer4.0.downsample.1.bias 512
layer4.0.downsample.1.running_mean 512
layer4.0.downsample.1.running_var 512
layer4.0.downsample.1.num_batches_tracked -
layer4.1.conv1.weight 512x512x3x3
layer4.1.bn1.weight 512
layer4.1.bn1.bias 512
layer4.1.bn1.running_mean 512
layer4.1.bn1.running_var 512
layer4.1.bn1.num_batches_tracked -
layer4.1.conv2.weight 512x512x3x3
layer4.1.bn2.weight 512
layer4.1.bn2.bias 512
layer4.1.bn2.running_mean 512
layer4.1.bn2.running_var 512
layer4.1.bn2.num_batches_tracked -
fc.weight 1000x512
fc.bias 1000
"""
OFFICIAL_TRUNKS = ("imgnet", "audnet")


def official_key_shapes() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in OFFICIAL_RESNET18_KEYS.strip().splitlines():
        key, shape = line.split()
        for trunk in OFFICIAL_TRUNKS:
            out[f"{trunk}.{key}"] = () if shape == "-" else tuple(int(s) for s in shape.split("x"))
    return out


def random_official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official layout, with BatchNorm statistics far from identity."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_key_shapes().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) * 1.5 + 0.5
        elif key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:  # BatchNorm weight
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


# --- the reference forward, written from model_lvs.py AVENet.forward and base_models.py ResNet._forward_impl ---


def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"])


def _basic_block(x, sd, p, stride):
    out = F.relu(_bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), sd, f"{p}.bn1"))
    out = _bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2")
    identity = x
    if f"{p}.downsample.0.weight" in sd:
        identity = _bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
    return F.relu(out + identity)


def _official_resnet(x, sd, trunk, stem):
    x = F.conv2d(x, sd[f"{trunk}.{stem}.weight"], stride=2, padding=3)
    x = F.max_pool2d(F.relu(_bn(x, sd, f"{trunk}.bn1")), 3, 2, 1)
    for layer, stride in ((1, 1), (2, 2), (3, 2), (4, 1)):  # layer4 stride=1 in the official ResNet
        x = _basic_block(x, sd, f"{trunk}.layer{layer}.0", stride)
        x = _basic_block(x, sd, f"{trunk}.layer{layer}.1", 1)
    return x


def official_heatmap(sd, image, spec):
    """AVENet.forward's ``A`` [B,1,h,w]."""
    img = F.normalize(_official_resnet(image, sd, "imgnet", "conv1"), dim=1)
    aud = F.adaptive_max_pool2d(_official_resnet(spec, sd, "audnet", "conv1_a"), (1, 1)).flatten(1)
    aud = F.normalize(aud, dim=1)
    return torch.einsum("ncqa,nchw->nqa", img, aud[:, :, None, None]).unsqueeze(1)


@pytest.fixture(scope="module")
def official():
    state = random_official_state()
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 224, 224, generator=g)
    spec = torch.randn(2, 1, 257, 299, generator=g) * 0.5 - 1.0  # a 3 s linear spectrogram's shape and scale
    with torch.no_grad():
        ref = official_heatmap(state, image, spec)
    return state, image, spec, ref


def test_official_key_list_imports_strictly_and_every_key_is_accounted_for(official):
    state = official[0]
    assert len(state) == 248
    model, report = convert_state_dict(dict(state), "official")
    unused = set(report["unused_official_keys"])
    assert unused == {
        "imgnet.conv1_a.weight",
        "imgnet.conv1_flow.weight",
        "imgnet.fc.weight",
        "imgnet.fc.bias",
        "audnet.conv1.weight",
        "audnet.conv1_flow.weight",
        "audnet.fc.weight",
        "audnet.fc.bias",
    }
    assert report["mapped_keys"] + len(unused) == len(state)  # nothing unaccounted
    assert report["s_A_heads"] is None and report["unmapped_extra_keys"] == []
    assert model.config.audio_layer4_stride == 1 and model.config.visual_layer4_stride == 1
    assert not model.config.projection
    torch.testing.assert_close(model.audio.conv1.weight, state["audnet.conv1_a.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.visual.conv1.weight, state["imgnet.conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        model.audio.layer4[0].downsample[1].running_var, state["audnet.layer4.0.downsample.1.running_var"]
    )


def test_imported_heatmap_equals_the_official_forward(official):
    state, image, spec, ref = official
    model, _ = convert_state_dict(dict(state), "official")
    with torch.no_grad():
        vmap, audio = model.encode_image(image), model.encode_audio(spec)
        cos = model.cosine_map(vmap, audio)
        heat = model.heatmap(image, spec)
    assert ref.shape == (2, 1, 14, 14)
    assert float(ref.std()) > 0.01  # a map with structure, not a constant
    torch.testing.assert_close(cos, ref[:, 0], rtol=0, atol=2e-5)
    # The official test resizes A with cv2 INTER_LINEAR to 224: the model's upsampled heatmap is that map.
    for i in range(2):
        up = cv2.resize(ref[i, 0].numpy(), (224, 224), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(heat[i].numpy(), up, rtol=0, atol=2e-5)


def test_missing_key_is_named():
    state = random_official_state()
    del state["audnet.layer3.1.bn2.running_var"]
    with pytest.raises(UserError, match=r"official key audnet\.layer3\.1\.bn2\.running_var is missing"):
        convert_state_dict(state, "official")


def test_wrong_shape_is_named():
    state = random_official_state()
    state["imgnet.layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    with pytest.raises(UserError, match=r"imgnet\.layer2\.0\.conv1\.weight has shape \(128, 64, 5, 5\)"):
        convert_state_dict(state, "official")


def test_extra_linear_heads_become_s_a_projections_and_the_rest_is_listed(official):
    state = dict(official[0])
    g = torch.Generator().manual_seed(3)
    heads = {
        "img_proj.weight": torch.randn(512, 512, generator=g) * 0.05,
        "img_proj.bias": torch.randn(512, generator=g),
        "aud_proj.weight": torch.randn(512, 512, generator=g) * 0.05,
        "aud_proj.bias": torch.randn(512, generator=g),
    }
    state.update(heads)
    state["queue"] = torch.randn(512, 16, generator=g)
    state["predictor.0.weight"] = torch.randn(128, 512, generator=g)
    model, report = convert_state_dict(state, "official")
    assert report["s_A_heads"] == {"visual_proj": "img_proj", "audio_proj": "aud_proj"}
    assert report["unmapped_extra_keys"] == ["predictor.0.weight", "queue"]
    assert model.config.projection
    vmap, audio = torch.randn(3, 512, 4, 4, generator=g), torch.randn(3, 512, generator=g)
    with torch.no_grad():
        got = model.alignment_similarity(vmap, audio)
    pv = F.normalize(vmap.amax(dim=(2, 3)) @ heads["img_proj.weight"].T + heads["img_proj.bias"], dim=1)
    pa = F.normalize(audio @ heads["aud_proj.weight"].T + heads["aud_proj.bias"], dim=1)
    torch.testing.assert_close(got, pv @ pa.T)


def test_cli_writes_a_checkpoint_with_the_official_preprocessing(official, tmp_path, capsys):
    state, image, spec, ref = official
    src = tmp_path / "ours_sup_previs.pth.tar"
    # As a DataParallel training run saves it, with the extra a training-only key the official loader skips.
    wrapped = {f"module.{k}": v for k, v in state.items()}
    wrapped["module.logit_scale"] = torch.tensor(0.07)
    torch.save({"model_state_dict": wrapped, "epoch": 20}, src)
    out = tmp_path / "run" / "best.pt"
    assert cli_main(["import", "ssl-align", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "240 keys mapped" in printed and "audnet.conv1_flow.weight" in printed and "logit_scale" in printed
    loaded = load_model(out)
    assert loaded.method == "ssl_align"
    assert (loaded.frontend.kind, loaded.frontend.window_seconds, loaded.frontend.anchor) == ("linear", 3.0, "center")
    assert loaded.frontend.output_shape() == (1, 257, 299)
    assert loaded.image.size == 224 and tuple(loaded.image.mean) == (0.485, 0.456, 0.406)
    meta = read_checkpoint(out)["import"]
    assert meta["unmapped_extra_keys"] == ["logit_scale"] and len(meta["unused_official_keys"]) == 8
    assert len(meta["sha256"]) == 64
    with torch.no_grad():
        cos = loaded.model.cosine_map(loaded.model.encode_image(image), loaded.model.encode_audio(spec))
    torch.testing.assert_close(cos, ref[:, 0], rtol=0, atol=2e-5)
    # refuses to overwrite; a file that is not an official checkpoint is a one-line error
    assert cli_main(["import", "ssl-align", str(src), "--out", str(out)]) == 2
    bad = tmp_path / "bad.pth.tar"
    torch.save({"model": {"x": torch.zeros(1)}}, bad)
    assert cli_main(["import", "ssl-align", str(bad), "--out", str(tmp_path / "x.pt")]) == 2
    torch.save({"model_state_dict": {"x": torch.zeros(1)}}, bad)
    assert cli_main(["import", "ssl-align", str(bad), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "already exists" in err[0] and "expected a dict with 'model_state_dict'" in err[1]
    assert "official key audnet.bn1.bias is missing" in err[2]


def test_export_of_the_imported_model_matches_torch(official, tmp_path):
    import onnxruntime as ort

    from avloc.engines.export import export_engine

    state = official[0]
    src = tmp_path / "ours_sup.pth.tar"
    torch.save({"model_state_dict": state}, src)
    ckpt = tmp_path / "best.pt"
    assert cli_main(["import", "ssl-align", str(src), "--out", str(ckpt)]) == 0
    engine = export_engine(ckpt, tmp_path / "engine", image_size=64)  # export itself refuses parity > 1e-3
    model = load_model(ckpt).model
    rng = np.random.default_rng(0)
    spec = (rng.standard_normal((2, 1, 257, 299)) * 0.5 - 1).astype(np.float32)
    image = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    audio = ort.InferenceSession(str(engine / "audio.onnx"), providers=["CPUExecutionProvider"])
    visual = ort.InferenceSession(str(engine / "visual.onnx"), providers=["CPUExecutionProvider"])
    emb = audio.run(None, {"spectrogram": spec})[0]
    heat, _ = visual.run(None, {"image": image, "audio_embedding": emb})
    with torch.no_grad():
        emb_t = model.encode_audio(torch.from_numpy(spec)).numpy()
    assert emb.shape == (2, 512) and heat.shape == (2, 4, 4)
    assert np.abs(emb - emb_t).max() <= 1e-4 * max(1.0, float(np.abs(emb_t).max()))
    with torch.no_grad():
        ref = official_heatmap(state, torch.from_numpy(image), torch.from_numpy(spec))[:, 0].numpy()
    assert np.abs(heat - ref).max() <= 1e-4

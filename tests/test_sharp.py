"""The 16x16 refinement of the pretrained recipe's heatmap (model ``refine``, core/ssl_align.guided_upsample):
its weights, its effect on a sharp object, the model's shapes and the exported engine (docs/results.md
"Sharper maps")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avloc.core.errors import UserError
from avloc.core.ssl_align import (
    REFINE_CHANNELS,
    SSLAlign,
    SSLAlignConfig,
    guided_upsample,
    refine_weights,
    with_refine,
)


def _object_scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 16x16 guide with an object (feature A) on fine cells [5:8, 5:8] on a background (feature B): a 3x3
    object that straddles four 8x8 cells, as a narrow object on a 32-pixel grid does; and the coarse 8x8 map
    a perfect stride-32 localizer gives it (the share of each coarse cell the object covers)."""
    mask = torch.zeros(16, 16)
    mask[5:8, 5:8] = 1
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 1.0, 1.0
    guide = (mask[None] * a[:, None, None] + (1 - mask[None]) * b[:, None, None]).unsqueeze(0)
    coarse = F.avg_pool2d(mask[None, None], 2)[0, 0]
    return guide, coarse, mask.bool()


def test_weights_are_a_convex_combination_of_in_map_neighbours() -> None:
    torch.manual_seed(0)
    w = refine_weights(torch.rand(2, 5, 16, 12), 0.1, 0.5).reshape(2, 9, 4, 8, 6)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2, 4, 8, 6))
    assert w.min() >= 0
    assert w[:, :3, :, 0].max() < 1e-6 and w[:, [2, 5, 8], :, :, -1].max() < 1e-6  # nothing from outside the map
    # a constant map stays constant (so does the heatmap's range), whatever the guide
    flat = guided_upsample(torch.full((2, 8, 6), 0.7), w.reshape(2, REFINE_CHANNELS, 8, 6))
    assert flat.shape == (2, 16, 12)
    torch.testing.assert_close(flat, torch.full((2, 16, 12), 0.7))


def test_refinement_puts_the_map_on_a_sharp_object() -> None:
    """The coarse map of a 3x3 object straddling four 8x8 cells spreads it over them: its 2x bilinear upsampling
    puts barely half its mass on the object, its object cells hardly above the off-object ones of those cells;
    the guided one puts it on the object; without the guide (temperature inf) the refinement is a plain
    interpolation and misses as bilinear does."""
    guide, coarse, mask = _object_scene()
    sharp = guided_upsample(coarse[None], refine_weights(guide, 0.1, 0.5))[0]
    blind = guided_upsample(coarse[None], refine_weights(guide, math.inf, 0.5))[0]
    bilinear = F.interpolate(coarse[None, None], scale_factor=2, mode="bilinear", align_corners=False)[0, 0]
    near = torch.zeros(16, 16, dtype=torch.bool)
    near[4:8, 4:8] = True  # the four coarse cells the object straddles
    near &= ~mask

    def share(m: torch.Tensor) -> float:
        return float(m[mask].sum() / m.sum())

    assert share(sharp) > 0.85 and sharp[mask].min() > 5 * sharp[near].max()
    for plain in (bilinear, blind):
        assert share(plain) < 0.6 and plain[mask].min() < 1.5 * plain[near].max()
    # the peak the live worker reads (stream/serve/inference_worker.peak_of) lands inside the object's pixels
    from avloc.stream.serve.inference_worker import peak_of

    x, y = peak_of(sharp.numpy())
    assert 5 / 16 <= x <= 8 / 16 and 5 / 16 <= y <= 8 / 16


def _tiny(refine: bool) -> SSLAlign:
    cfg = SSLAlignConfig(backbone="pretrained", width=4, visual_layer4_stride=2, objectness=True, refine=refine)
    return SSLAlign(cfg).eval()


def test_model_maps_are_16x16_and_equal_the_8x8_model_without_a_guide() -> None:
    """With ``refine``: encode_image carries the 36 weight channels, cosine_map is 16x16 at 256 px and is the
    guided upsampling of the 8x8 map of the same model without the switch (same weights: with_refine loads
    strictly); cached features (no guide) keep the 8x8 map, as training and its validation use it."""
    from avloc.core.pretrained import YAMNET_DIM

    torch.manual_seed(0)
    sharp = _tiny(True)
    sharp.visual.head.weight.data.normal_()  # so the learned map is not flat
    plain = with_refine(sharp, False)
    assert not plain.config.refine and plain.refine_channels == 0 and sharp.refine_channels == REFINE_CHANNELS
    image, rows = torch.randn(1, 3, 256, 256), torch.rand(1, YAMNET_DIM + 521)
    with torch.no_grad():
        a = sharp.audio_from_features(rows)
        v = sharp.encode_image(image)
        v8 = plain.encode_image(image)
        assert v.shape == (1, 32 + 1 + REFINE_CHANNELS, 8, 8) and a.shape == (1, 33)
        s16, s8 = sharp.cosine_map(v, a), plain.cosine_map(v8, a)
        assert s16.shape == (1, 16, 16) and s8.shape == (1, 8, 8)
        torch.testing.assert_close(s16, guided_upsample(s8, v[:, 33:]))
        feats = sharp.visual.features(image)
        torch.testing.assert_close(sharp.cosine_map(sharp.image_from_features(feats), a), s8)
        assert sharp.heatmap(image, torch.randn(1, 1, 64, 297)).shape == (1, 256, 256)
    assert sharp.heatmap_range == plain.heatmap_range  # a convex combination of the 8x8 cells
    assert "stride-16" in sharp.heatmap_meaning and "stride-16" not in plain.heatmap_meaning


def test_guide_is_the_stride16_stage_of_the_same_pass() -> None:
    from avloc.core.pretrained import LITE0_GUIDE_DIM, FrozenLite0

    trunk = FrozenLite0(32).eval()
    with torch.no_grad():
        image = torch.randn(1, 3, 256, 256)
        feats, guide = trunk.with_guide(image)
        torch.testing.assert_close(feats, trunk(image))
    assert guide.shape == (1, LITE0_GUIDE_DIM, 16, 16)
    with pytest.raises(UserError, match="output stride 32"):
        FrozenLite0(16).with_guide(image)


def test_refine_config_errors() -> None:
    with pytest.raises(UserError, match="refine=true: needs backbone pretrained at visual_layer4_stride 2"):
        SSLAlignConfig(refine=True)
    with pytest.raises(UserError, match="refine=true: needs backbone pretrained at visual_layer4_stride 2"):
        SSLAlignConfig(backbone="pretrained", visual_layer4_stride=1, refine=True)
    with pytest.raises(UserError, match="refine_temperature=0.0"):
        SSLAlignConfig(backbone="pretrained", visual_layer4_stride=2, refine=True, refine_temperature=0.0)
    with pytest.raises(UserError, match="refine_sigma=nan"):
        SSLAlignConfig(backbone="pretrained", visual_layer4_stride=2, refine=True, refine_sigma=float("nan"))


def test_recipe_and_demo_configs_refine() -> None:
    """The open-set recipe and the demo run the refinement (chosen on val / val_unseen, docs/results.md)."""
    from pathlib import Path

    from avloc.core.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("cpu_pretrained.yaml", "demo.yaml"):
        model = load_config(root / name)["model"]
        cfg = SSLAlignConfig(**{k: v for k, v in model.items() if k in SSLAlignConfig.__dataclass_fields__})
        assert cfg.refine, name


@pytest.mark.slow
def test_refined_engine_is_16x16_and_matches_torch(tmp_path) -> None:
    """A checkpoint trained without the switch exports a 16x16 engine with ``--refine``: the manifest says 16x16
    at stride 16, ONNX Runtime's heatmap equals the torch model's (audio graph -> visual graph, as the worker runs
    them), and avloc.Localizer hands the 16x16 map on. Slow (~1.5 min on 2 busy cores): the Lite0 + YAMNet
    trunks are exported and checked for parity (the 8x8 engine: tests/test_ssl_align.py)."""
    import json

    import onnxruntime as ort

    import avloc
    from avloc.core.audio import FrontEndConfig
    from avloc.core.checkpoint import ImageConfig, save_checkpoint
    from avloc.core.config import to_dict
    from avloc.engines.export import export_engine

    model = _tiny(False)
    fe = FrontEndConfig(kind="yamnet", level="window_rms")
    image = ImageConfig(size=256, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    ckpt = save_checkpoint(
        tmp_path / "m.pt", model, method="ssl_align", model_config=to_dict(model.config), frontend=fe, image=image
    )
    out = export_engine(ckpt, tmp_path / "sharp", refine=True)
    manifest = json.loads((out / "manifest.json").read_text())
    heat_meta = manifest["outputs"]["heatmap"]
    assert heat_meta["feature_size"] == [16, 16] and heat_meta["shape"] == ["batch", 16, 16]
    assert heat_meta.get("feature_stride", 16.0) == 16.0
    assert manifest["outputs"]["confidence"]["top_k"] == 64  # the top 25 % of 256 cells
    assert manifest["model_config"]["refine"] is True
    assert max(manifest["parity_max_abs_diff"].values()) < 1e-3
    sharp = with_refine(model, True)
    torch.manual_seed(0)
    images, specs = torch.randn(2, 3, 256, 256), torch.randn(2, 1, 64, 297) - 3
    with torch.no_grad():
        want = sharp.cosine_map(sharp.encode_image(images), sharp.encode_audio(specs))
    audio = ort.InferenceSession(str(out / "audio.onnx"), providers=["CPUExecutionProvider"])
    visual = ort.InferenceSession(str(out / "visual.onnx"), providers=["CPUExecutionProvider"])
    (emb,) = audio.run(None, {"spectrogram": specs.numpy()})
    assert emb.shape == (2, 33)
    heat, _ = visual.run(None, {"image": images.numpy(), "audio_embedding": emb})
    np.testing.assert_allclose(heat, want.numpy(), atol=1e-4)
    frame = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    loc = avloc.Localizer(out)
    result = loc(frame, np.zeros(loc.sample_rate * 3, np.float32), loc.sample_rate)
    assert result.feature_map.shape == (16, 16)


@pytest.mark.parametrize("size", [208, 200])
def test_an_image_size_not_a_multiple_of_32_refines_too(size: int) -> None:
    """``avloc export --image-size 208`` of a refine checkpoint: Lite0's stride-16 guide is 13x13 over a 7x7
    map; refine_weights reshaped it into 2x2 sub-cells and raised. The guide's edge is repeated: a 14x14 map,
    each fine cell still a convex combination of its in-map neighbours."""
    m = _tiny(True)
    with torch.no_grad():
        v = m.encode_image(torch.randn(1, 3, size, size))
        heat = m.cosine_map(v, torch.randn(1, v.shape[1] - REFINE_CHANNELS))
    assert v.shape[2:] == (7, 7) and heat.shape == (1, 14, 14) and torch.isfinite(heat).all()
    torch.testing.assert_close(v[:, -REFINE_CHANNELS:].reshape(1, 9, 4, 7, 7).sum(1), torch.ones(1, 4, 7, 7))


def test_refined_map_is_finite_and_close_under_fp16_autocast() -> None:
    """GPU first run: torch fp16 engines run the visual graph under CUDA autocast, where the guide einsum runs in
    float16 and the 36 weight channels travel as float16 (weights below 6.1e-5 are subnormals that a flush-to-zero
    kernel makes 0). Stand-in: CPU float16 autocast, then the weight channels flushed as such a kernel would; the
    16x16 map stays finite and within float16's precision of the float32 one (heatmap range [-1, 1.375])."""
    from avloc.core.pretrained import YAMNET_DIM

    torch.manual_seed(0)
    sharp = _tiny(True)
    sharp.visual.head.weight.data.normal_()
    image, rows = torch.randn(2, 3, 256, 256), torch.rand(2, YAMNET_DIM + 521)
    with torch.inference_mode():
        a = sharp.audio_from_features(rows)
        ref = sharp.cosine_map(sharp.encode_image(image), a)
        with torch.autocast("cpu", dtype=torch.float16):
            v = sharp.encode_image(image)
            half = sharp.cosine_map(v, a)
        w = v[:, 33:].to(torch.float16)
        flushed = torch.where(w.abs() < torch.finfo(torch.float16).tiny, torch.zeros_like(w), w)
        ftz = guided_upsample(sharp.cosine_map(with_refine(sharp, False).encode_image(image), a), flushed.float())
    assert half.shape == ref.shape == (2, 16, 16)
    assert torch.isfinite(half).all() and torch.isfinite(ftz).all()
    assert (half.float() - ref).abs().max() < 2e-2, (half.float() - ref).abs().max()
    assert (ftz - ref).abs().max() < 2e-2, (ftz - ref).abs().max()

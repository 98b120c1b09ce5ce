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

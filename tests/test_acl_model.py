"""ACL model on the tiny random architecture of configs/acl_tiny.yaml: BEATs layout, splicing, gradients,
CLIPSeg parity with Hugging Face, and strict loading of the three kinds of local weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from avloc.core.acl import build_acl_model
from avloc.core.acl.beats import (
    BEATs,
    BEATsConfig,
    _SamePad,
    _WeightNormConv,
    official_key_shapes,
    relative_position_buckets,
)
from avloc.core.acl.losses import ACLLossConfig, acl_loss
from avloc.core.acl.model import ACL
from avloc.core.acl.weights import (
    BEATS_FILE,
    load_pretrained,
    load_released_acl,
    pretrained_model_config,
    read_beats,
    read_clipseg,
)
from avloc.core.checkpoint import load_state_dict_strict
from avloc.core.config import load_config
from avloc.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 98  # 1 s of fbank frames -> (98 // 16) * (128 // 16) = 48 BEATs tokens


def tiny_config(*overrides: str) -> dict:
    return load_config(ROOT / "configs" / "acl_tiny.yaml", list(overrides))


def tiny_model(*overrides: str) -> ACL:
    torch.manual_seed(0)
    return build_acl_model(tiny_config(*overrides)["model"])


def official_layout_state(cfg: BEATsConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=gen) * 0.1 for k, shape in official_key_shapes(cfg).items()}
    # the relative bias table is one tensor saved under every layer's name
    shared = [k for k in state if k.endswith("relative_attention_bias.weight")]
    for k in shared:
        state[k] = state[shared[0]]
    return state


def test_relative_position_buckets_hand_computed() -> None:
    # 8 buckets, max distance 16: 4 per direction, exact below 2, log-spaced above, positive side offset by 4
    buckets = relative_position_buckets(12, num_buckets=8, max_distance=16)
    assert buckets[0, 0] == 0 and buckets[5, 5] == 0
    assert buckets[0, 1] == 5 and buckets[1, 0] == 1  # key after query -> +4
    assert buckets[0, 3] == 4 + 2  # 2 + floor(log(3/2) / log(8) * 2) = 2
    assert buckets[10, 0] == 3  # 2 + floor(log(10/2) / log(8) * 2) = 3
    assert buckets[0, 11] == 4 + 3  # clamped to the last bucket of the side


def test_beats_official_layout_loads_strictly_and_gives_layer_features() -> None:
    cfg = BEATsConfig.from_official({**tiny_config()["model"]["beats"], "dropout": 0.1, "encoder_layerdrop": 0.05})
    model = BEATs(cfg).eval()
    state = official_layout_state(cfg)
    assert set(model.state_dict()) == set(state)
    load_state_dict_strict(model, state, "official layout")

    spec = torch.randn(2, 1, FRAMES, 128)
    with torch.no_grad():
        features = model(spec)
        tokens = (FRAMES // 16) * (128 // 16)
        assert features.shape == (2, tokens, 3 * cfg.encoder_embed_dim)
        # each third is that layer's own output
        for i, layer in enumerate((4, 8, 12)):
            alone = BEATs(cfg, output_layers=(layer,)).eval()
            alone.load_state_dict(state)
            c = cfg.encoder_embed_dim
            torch.testing.assert_close(features[..., i * c : (i + 1) * c], alone(spec))

    with pytest.raises(UserError, match="unexpected 1"):
        load_state_dict_strict(model, {**state, "encoder.extra.weight": torch.zeros(1)}, "extra")
    with pytest.raises(UserError, match="missing 1"):
        load_state_dict_strict(model, {k: v for k, v in state.items() if k != "predictor.bias"}, "missing")


def test_full_size_beats_shapes_on_meta() -> None:
    with torch.device("meta"):
        model = BEATs(BEATsConfig())
        features = model(torch.zeros(1, 1, 998, 128))
    assert features.shape == (1, 496, 2304)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_key_shapes(BEATsConfig())


def test_positional_conv_matches_torch_weight_norm_and_folds() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():  # the old API is the one that wrote the checkpoint's weight_g / weight_v
        warnings.simplefilter("ignore", FutureWarning)
        reference = nn.utils.weight_norm(nn.Conv1d(8, 8, kernel_size=4, padding=2, groups=2), name="weight", dim=2)
    ours = _WeightNormConv(8, 4, 2)
    ours.load_state_dict({"weight_g": reference.weight_g, "weight_v": reference.weight_v, "bias": reference.bias})
    x = torch.randn(2, 8, 10)
    expected = reference(x)[:, :, :-1]  # SamePad for an even kernel
    with torch.no_grad():
        torch.testing.assert_close(_SamePad(4)(ours(x)), expected)
        ours.fold()
        torch.testing.assert_close(_SamePad(4)(ours(x)), expected)


def test_export_preparation_keeps_the_output() -> None:
    cfg = BEATsConfig.from_official(tiny_config()["model"]["beats"])
    model = BEATs(cfg).eval()
    spec = torch.randn(1, 1, FRAMES, 128)
    with torch.no_grad():
        before = model(spec)
        model.prepare_for_export(FRAMES)
        assert model.encoder.fixed_bias is not None and model.encoder.fixed_bias.shape == (2, 48, 48)
        torch.testing.assert_close(model(spec), before)


def test_splicing_builds_six_tokens_and_pools_the_last_position() -> None:
    model = tiny_model().eval()
    text = model.av_grounder.clip.text_model
    embeddings = text.embeddings
    token = torch.randn(3, 32)
    spliced = model.splice(token)
    assert spliced.shape == (3, 6, 32)
    positions = embeddings.position_embedding.weight[:6]
    words = embeddings.token_embedding(torch.tensor([49406, 320, 1125, 539, 49407]))
    torch.testing.assert_close(spliced[:, 4], token + positions[4])
    torch.testing.assert_close(spliced[0, :4], words[:4] + positions[:4])
    torch.testing.assert_close(spliced[0, 5], words[4] + positions[5])

    # A word's own embedding in the audio slot must give what CLIP's text model gives for that sentence:
    # causal mask, 6 positions, pooled at the last (EOS) position, text projection.
    word = 2368
    ids = torch.tensor([[49406, 320, 1125, 539, word, 49407]])
    with torch.no_grad():
        ours = model.audio_driven_embedding(embeddings.token_embedding(torch.tensor([word])))
        hf = model.av_grounder.clip.get_text_features(input_ids=ids).pooler_output
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)


def test_decoder_matches_hugging_face_clipseg() -> None:
    model = tiny_model().eval()
    image = torch.randn(2, 3, 48, 48)  # 3x3 patches, positions interpolated from the 2x2 they were made for
    embedding = torch.randn(2, 16)
    with torch.no_grad():
        ours = model.logits(image, embedding)
        hf = model.av_grounder(pixel_values=image, conditional_embeddings=embedding).logits
        pooled = model.image_embedding(image)
        hf_pooled = model.av_grounder.clip.get_image_features(pixel_values=image).pooler_output
    assert ours.shape == (2, 1, 48, 48)
    torch.testing.assert_close(ours[:, 0], hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, hf_pooled, atol=1e-5, rtol=1e-5)


def test_heatmap_is_sigmoid_of_logits_plus_b_over_w_at_batch_one() -> None:
    model = tiny_model().eval()
    image, spec = torch.randn(1, 3, 48, 48), torch.randn(1, 1, FRAMES, 128)
    with torch.no_grad():
        heat = model.heatmap(image, spec)
        logits = model.logits(image, model.encode_audio(spec))
    assert heat.shape == (1, 32, 32)
    resized = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bicubic", align_corners=False)
    torch.testing.assert_close(heat, torch.sigmoid(resized[:, 0] + 14.0 / 10.0))


def test_only_tokenizer_and_mask_scalars_receive_gradients() -> None:
    model = tiny_model().train()
    assert not model.audio_backbone.training and not model.av_grounder.training  # frozen_eval
    assert model.audio_proj.training
    spec, image = torch.randn(3, 1, FRAMES, 128), torch.randn(3, 3, 48, 48)
    embedding = model.encode_audio(spec)
    outputs = model.training_outputs(image, embedding)
    assert outputs["v_f"].shape == (3, 3, 16) and outputs["v_i"].shape == (3, 16)
    loss, parts = acl_loss(outputs, embedding, ACLLossConfig())
    assert set(parts) >= {"acl_i", "acl_f", "area_reg"}
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n.split(".")[0] for n in with_grad} == {"audio_proj", "masker_i"}
    assert {
        "masker_i.w",
        "masker_i.b",
        "audio_proj.fc1.weight",
        "audio_proj.fga.reduce_potentials.0.weight",
    } <= with_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == {"audio_proj", "masker_i"}


# ---------------------------------------------------------------------------------------------- weights


def _write_pretrained(tmp_path: Path) -> tuple[Path, Path, ACL]:
    """An official-format BEATs file and a Hugging Face CLIPSeg folder from a random tiny model."""
    source = tiny_model()
    beats_cfg = {**tiny_config()["model"]["beats"], "dropout": 0.0, "layer_wise_gradient_decay_ratio": 0.6}
    beats = tmp_path / BEATS_FILE
    torch.save({"cfg": beats_cfg, "model": source.audio_backbone.state_dict()}, beats)
    clipseg = tmp_path / "clipseg"
    source.av_grounder.save_pretrained(clipseg)
    return beats, clipseg, source


def test_pretrained_weights_load_strictly(tmp_path: Path) -> None:
    beats, clipseg, source = _write_pretrained(tmp_path)
    config = pretrained_model_config(tiny_config()["model"], beats, clipseg)
    assert config["beats"]["encoder_embed_dim"] == 32 and config["clipseg"]["projection_dim"] == 16
    model = load_pretrained(build_acl_model(config), beats, clipseg)
    for name, tensor in source.state_dict().items():
        if not name.startswith(("audio_proj.", "masker_i.")):
            torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)


def test_missing_or_wrong_weight_files_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"--beats .*{BEATS_FILE}"):
        read_beats(tmp_path / "absent.pt")
    torch.save({"model": {}}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="--beats .*'cfg' and 'model'"):
        read_beats(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="--clipseg .*config.json.*clipseg-rd64-refined"):
        read_clipseg(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="--clipseg .*model.safetensors"):
        read_clipseg(tmp_path)
    with pytest.raises(UserError, match="--acl-checkpoint"):
        load_released_acl(tiny_model(), tmp_path / "Param_best.pth")


def test_released_acl_checkpoint_loads_strictly_through_the_key_mapping(tmp_path: Path) -> None:
    source = tiny_model()
    with torch.no_grad():
        source.masker_i.w.fill_(7.5)
    path = tmp_path / "Param_best.pth"
    torch.save({"audio_proj": source.audio_proj.state_dict(), "masker_i": source.masker_i.state_dict()}, path)
    torch.manual_seed(1)
    model = load_released_acl(build_acl_model(tiny_config()["model"]), path)
    assert model.masker_i.w.item() == 7.5
    torch.testing.assert_close(model.audio_proj.fc1.weight, source.audio_proj.fc1.weight)

    broken = source.audio_proj.state_dict()
    broken.pop("fga.pp_models.0.embed_X.bias")
    torch.save({"audio_proj": broken, "masker_i": source.masker_i.state_dict()}, path)
    with pytest.raises(UserError, match="missing 1 key"):
        load_released_acl(model, path)


def test_extended_confidence_is_the_official_cos_of_v_f_and_the_embedding() -> None:
    """Eval.py: ``confs = cosine_similarity(v_f[ind, ind, :], audio_driven_embedding)`` with ``v_f`` from
    ``encode_masked_vision`` (here :meth:`ACL.training_outputs`, all pairs)."""
    model = tiny_model().eval()
    torch.manual_seed(4)
    image, spec = torch.randn(3, 3, 48, 48), torch.randn(3, 1, FRAMES, 128)
    with torch.no_grad():
        embedding = model.encode_audio(spec)
        v_f = model.training_outputs(image, embedding)["v_f"]
        got = model.extended_confidence(image, embedding)
    index = torch.arange(3)
    expected = torch.cosine_similarity(v_f[index, index, :], embedding, dim=1)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a property of the pair, not of the image alone: another sound gives another confidence
    with torch.no_grad():
        swapped = model.extended_confidence(image, embedding.roll(1, dims=0))
    assert not torch.allclose(got, swapped)

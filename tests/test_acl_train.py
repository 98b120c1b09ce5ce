"""The ACL side of training: run-config split for the shared trainer, the train step, validation heatmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avloc.core.acl import build_acl_model
from avloc.core.acl.training import ACLTrainStep, build_training_model, compute_heatmaps, split_run_config
from avloc.core.acl.weights import BEATS_FILE
from avloc.core.audio import FrontEnd, FrontEndConfig
from avloc.core.config import load_config
from avloc.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _config(*overrides: str) -> dict:
    return load_config(ROOT / "configs" / "acl_tiny.yaml", list(overrides))


def test_split_run_config_feeds_the_shared_trainer_config() -> None:
    from avloc.train.trainer import parse_config

    shared, model_section, loss = split_run_config(_config())
    cfg = parse_config(shared)  # the shared RunConfig accepts the non-model sections as they are
    assert cfg.frontend.kind == "fbank" and cfg.frontend.window_seconds == 1.0
    assert tuple(cfg.loss.positives) == ("orig",) and cfg.train.nn_index is None
    assert cfg.image.size == 48 and cfg.image.mean[0] == pytest.approx(0.48145466)
    assert model_section["image_size"] == 48 and loss.tau == 0.07 and loss.positive_area == 0.4

    paper = load_config(ROOT / "configs" / "acl.yaml")
    shared, _, _ = split_run_config(paper)
    cfg = parse_config(shared)
    assert cfg.frontend.output_shape() == (1, 998, 128) and cfg.image.size == 352
    assert cfg.train.batch_size == 8 and cfg.optim.lr == pytest.approx(1e-4)

    with pytest.raises(UserError, match="frontend.kind='linear'"):
        split_run_config(_config("frontend.kind=linear", "frontend.window_seconds=3.0"))
    with pytest.raises(UserError, match="loss: unknown key"):
        split_run_config(_config("loss.use_sl=true"))


def test_train_step_trains_only_the_tokenizer_and_mask_scalars() -> None:
    shared, model_section, loss = split_run_config(_config())
    torch.manual_seed(0)
    model = build_acl_model(model_section)
    step = ACLTrainStep(model, FrontEndConfig.from_dict(shared["frontend"]), loss, amp=False)
    model.train()
    batch = {"wave_orig": torch.rand(3, 16000) - 0.5, "image_orig": torch.randn(3, 3, 48, 48)}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    frozen_before = model.av_grounder.decoder.film_mul.weight.clone()
    w_before = model.masker_i.w.item()
    total, parts = step(batch)
    assert torch.isfinite(total) and set(parts) >= {"acl_i", "acl_f", "area_reg", "positive_area"}
    torch.testing.assert_close(total, parts["acl_i"] + parts["acl_f"] + parts["area_reg"])
    assert total.requires_grad and not any(v.requires_grad for v in parts.values())  # logged, no graph kept
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    assert model.masker_i.w.item() != w_before
    torch.testing.assert_close(model.av_grounder.decoder.film_mul.weight, frozen_before)
    with pytest.raises(UserError, match="gather_negatives"):
        step(batch, gather=lambda x: x)


def test_validation_heatmaps_and_retrieval_features() -> None:
    _, model_section, _ = split_run_config(_config())
    torch.manual_seed(0)
    model = build_acl_model(model_section)
    frontend = FrontEnd(FrontEndConfig(kind="fbank", window_seconds=1.0))
    loader = [
        {
            "index": torch.tensor(ix),
            "image": torch.randn(len(ix), 3, 48, 48),
            "wave": torch.rand(len(ix), 16000) - 0.5,
        }
        for ix in ([2, 0], [1])
    ]
    maps, vis, aud = compute_heatmaps(model, frontend, loader, torch.device("cpu"))
    assert sorted(maps) == [0, 1, 2] and all(m.shape == (32, 32) for m in maps.values())
    assert all(0.0 <= m.min() and m.max() <= 1.0 for m in maps.values())  # sigmoid maps
    assert vis.shape == (3, 16) and aud.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(aud, axis=1), 1.0, rtol=1e-5)
    # row order is the index order: sample 1 came alone in the second batch
    with torch.no_grad():
        alone = model.encode_audio(frontend(loader[1]["wave"]))
    np.testing.assert_allclose(aud[1], torch.nn.functional.normalize(alone, dim=1)[0].numpy(), atol=1e-5)


def test_training_model_needs_local_weights(tmp_path: Path) -> None:
    _, model_section, _ = split_run_config(_config())
    with pytest.raises(UserError, match="--beats is required"):
        build_training_model(model_section, None, tmp_path)
    with pytest.raises(UserError, match=f"--beats .*{BEATS_FILE}"):
        build_training_model(model_section, tmp_path / BEATS_FILE, tmp_path)


def _import_released(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    from avloc.core.acl.convert import import_checkpoint

    config = _config()
    torch.manual_seed(0)
    source = build_acl_model(config["model"])
    with torch.no_grad():
        source.masker_i.b.fill_(9.0)
    beats = tmp_path / BEATS_FILE
    torch.save({"cfg": config["model"]["beats"], "model": source.audio_backbone.state_dict()}, beats)
    source.av_grounder.save_pretrained(tmp_path / "clipseg")
    released = tmp_path / "Param_best.pth"
    torch.save(
        {"audio_proj": source.audio_proj.state_dict(), "masker_i": source.masker_i.state_dict()}, released
    )

    return import_checkpoint(tmp_path / "acl.pt", beats, tmp_path / "clipseg", released, config), source


def test_import_released_weights_into_a_strict_checkpoint(tmp_path: Path) -> None:
    from avloc.core.checkpoint import load_model

    out, source = _import_released(tmp_path)
    loaded = load_model(out)
    assert loaded.method == "acl" and loaded.frontend.kind == "fbank" and loaded.image.size == 48
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, msg=name)


def test_eval_scores_an_acl_checkpoint(tmp_path: Path) -> None:
    """``avloc eval`` on an ACL checkpoint: CLIPSeg masks as heatmaps, retrieval in CLIP's space only."""
    from avloc.core.synth import make_synth
    from avloc.train.evaluate import evaluate_checkpoint

    checkpoint, _ = _import_released(tmp_path)
    root = tmp_path / "data"
    make_synth(root, seed=5, n_train=2, n_val=2, n_test=5, distractors=1, silent_frac=0.4, image_size=48,
               clip_seconds=1.0, workers=1)
    metrics = evaluate_checkpoint(checkpoint, root, audio_swap=True, batch_size=4, device="cpu")
    assert metrics["method"] == "acl" and metrics["n"] == 5 and metrics["n_silent"] >= 1
    assert 0.0 <= metrics["adaptive/ciou_ap50"] <= 1.0 and 0.0 <= metrics["median/ext_ap"] <= 1.0
    recalls = [metrics[f"map/a2i_r{k}"] for k in (1, 5, 10)]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0  # 5 test ids: R@10 finds every class
    assert not any(key.startswith("proj/") for key in metrics)
    assert metrics["audio_swap_n_pairs"] == 10

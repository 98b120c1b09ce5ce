"""The ACL side of training: run-config split for the shared trainer, the train step, validation heatmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avloc.core.acl import build_acl_model
from avloc.core.acl.model import ACL
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


def test_acl_outputs_on_a_hand_computed_case() -> None:
    import math

    from acl_helpers import constant_decoder_logits

    shared, model_section, loss = split_run_config(_config())
    torch.manual_seed(0)
    model = build_acl_model(model_section)
    frontend_config = FrontEndConfig.from_dict(shared["frontend"])
    # validation heatmaps: logits 0.5, b / w = 20 / 100 -> sigmoid(0.7) at every pixel
    constant_decoder_logits(model, 0.5, w=100.0, b=20.0)
    loader = [{"index": torch.tensor([1, 0]), "image": torch.randn(2, 3, 48, 48), "wave": torch.rand(2, 16000) - 0.5}]
    maps, _, _ = compute_heatmaps(model, FrontEnd(frontend_config), loader, torch.device("cpu"))
    for m in maps.values():
        np.testing.assert_allclose(m, 1 / (1 + math.exp(-0.7)), rtol=0, atol=1e-6)  # 0.66819

    # training, B = 3: mask logits 100 * 0.5 + 20 = 70 -> every hard mask is 1
    b = 3
    step = ACLTrainStep(model, frontend_config, loss, amp=False)
    image = torch.randn(b, 3, 48, 48)
    batch = {"wave_orig": torch.rand(b, 16000) - 0.5, "image_orig": image}
    model.train()
    with torch.no_grad():
        outputs = model.training_outputs(image, model.encode_audio(step.frontend(batch["wave_orig"])))
        full_image = model.image_embedding(image)
        dense = model.dense_features(image)
    # area matrix all ones: positive = mean of the diagonal = 1; negative = mean(all) - positive / B = 1 - 1/3
    assert outputs["p_area"].item() == 1.0
    assert outputs["n_area"].item() == pytest.approx(1 - 1 / b)
    # v_i: the image times a mask of ones is the image
    torch.testing.assert_close(outputs["v_i"], full_image, rtol=1e-5, atol=1e-5)
    # v_f: a constant soft mask pools every image's dense features into their mean, / B^2 (the reference
    # normalizes by the sum of all B x B masks), the same for every audio n
    expected_vf = dense.mean(dim=(2, 3)) / b**2
    torch.testing.assert_close(outputs["v_f"], expected_vf[:, None].expand(b, b, -1), rtol=1e-5, atol=1e-7)
    _, parts = step(batch)
    # area_reg = |1 - 0.4| + |2/3 - 0|
    assert parts["area_reg"].item() == pytest.approx(0.6 + 2 / 3, abs=1e-6)
    assert (parts["positive_area"].item(), parts["negative_area"].item()) == pytest.approx((1.0, 2 / 3))
    # logits -0.5: 100 * -0.5 + 20 = -30 -> every hard mask is 0: area_reg = |0 - 0.4| + |0 - 0|
    constant_decoder_logits(model, -0.5, w=100.0, b=20.0)
    _, parts = step(batch)
    assert parts["area_reg"].item() == pytest.approx(0.4, abs=1e-6)
    assert (parts["positive_area"].item(), parts["negative_area"].item()) == (0.0, 0.0)


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
    torch.save({"audio_proj": source.audio_proj.state_dict(), "masker_i": source.masker_i.state_dict()}, released)

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
    from avloc.core.data.synth import make_synth
    from avloc.train.evaluate import evaluate_checkpoint

    checkpoint, _ = _import_released(tmp_path)
    root = tmp_path / "data"
    make_synth(
        root,
        seed=5,
        n_train=2,
        n_val=2,
        n_test=5,
        distractors=1,
        silent_frac=0.4,
        image_size=48,
        clip_seconds=1.0,
        workers=1,
    )
    maps_dir = tmp_path / "maps"
    metrics = evaluate_checkpoint(checkpoint, root, audio_swap=True, batch_size=4, device="cpu", save_maps=maps_dir)
    assert metrics["method"] == "acl" and metrics["n"] == 5 and metrics["n_silent"] >= 1
    # the official absolute-threshold sweep, best by AUC, on the model's own 224 px map (images are 48 px here:
    # the map is not resized to the input and back)
    from avloc.core.checkpoint import load_model
    from avloc.core.datasets import load_vggss_json
    from avloc.core.eval_maps import NpyHeatmaps
    from avloc.core.metrics import ABS_SWEEP_THRESHOLDS, evaluate_maps

    rows = metrics["abs_sweep/rows"]
    assert [r["t"] for r in rows] == list(ABS_SWEEP_THRESHOLDS) and metrics["abs_sweep/select"] == "auc"
    assert metrics["abs_sweep/best/auc"] == max(r["auc"] for r in rows)
    saved = NpyHeatmaps(maps_dir)
    size = load_model(checkpoint).model.config.heatmap_size  # 32 in the tiny config; the images are 48 px
    assert all(saved[k].shape == (size, size) and 0.0 <= saved[k].min() <= saved[k].max() <= 1.0 for k in saved)
    annotations = load_vggss_json(root / "test.json")
    best_t = metrics["abs_sweep/best_t"]
    silent = [k for k in saved if k not in annotations]
    again = evaluate_maps(saved, annotations, silent=silent, binarize=f"abs:{best_t}")
    assert again["ciou_ap50"] == metrics["abs_sweep/best/ciou_ap50"] and again["auc"] == metrics["abs_sweep/best/auc"]
    # Extended rows use the official confidence cos(v_f, a), kept in the index for eval-maps
    import json

    from avloc.core.eval_maps import load_confidences

    assert metrics["ext_confidence"].startswith("cos(v_f, a)")
    index = json.loads((maps_dir / "index.json").read_text())
    assert "--confidences" in index["eval_maps"] and set(index["confidences"]) == set(saved)
    conf = load_confidences(maps_dir / "index.json")
    for mode in ("median", "adaptive"):
        rescored = evaluate_maps(saved, annotations, silent=silent, binarize=mode, confidences=conf)
        assert rescored["ext_ap"] == metrics[f"{mode}/ext_ap"] and rescored["ciou_ap50"] == metrics[f"{mode}/ciou_ap50"]
    by_heatmap = evaluate_maps(saved, annotations, silent=silent, binarize="median")
    assert by_heatmap["ciou_ap50"] == metrics["median/ciou_ap50"]
    assert 0.0 <= metrics["adaptive/ciou_ap50"] <= 1.0 and 0.0 <= metrics["median/ext_ap"] <= 1.0
    recalls = [metrics[f"map/a2i_r{k}"] for k in (1, 5, 10)]
    assert recalls == sorted(recalls)  # values: test_eval_acl_known_metrics
    assert not any(key.startswith("proj/") for key in metrics)
    assert metrics["audio_swap_n_pairs"] == 10


def test_eval_acl_known_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ACL branch of ``avloc eval`` (heatmaps + CLIP-space features from ``evaluation_outputs``, no proj/)
    on the hand-worked set of tests/eval_helpers.py."""
    from eval_helpers import Oracle, assert_known_metrics, patch_acl, write_dataset

    from avloc.core.acl.model import CLIP_MEAN, CLIP_STD
    from avloc.core.checkpoint import ImageConfig, save_checkpoint
    from avloc.train.evaluate import evaluate_checkpoint

    config = _config()
    root = write_dataset(tmp_path / "data")
    frontend = FrontEndConfig.from_dict(config["frontend"])
    image = ImageConfig(size=224, mean=CLIP_MEAN, std=CLIP_STD)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(
        tmp_path / "acl.pt",
        build_acl_model(config["model"]),
        method="acl",
        model_config=config["model"],
        frontend=frontend,
        image=image,
    )
    oracle = Oracle(root, frontend, image)
    patch_acl(monkeypatch, oracle)

    def extended_confidence(self, images, embedding):
        # the official-confidence path carries the hand-worked set's confidences (top 25 % of its maps)
        from avloc.core.metrics import confidence_top25, resize_map

        maps = oracle.heatmaps(oracle.image_ids(images)).numpy()
        return torch.from_numpy(confidence_top25(np.stack([resize_map(m) for m in maps])))

    monkeypatch.setattr(ACL, "extended_confidence", extended_confidence)
    metrics = evaluate_checkpoint(checkpoint, root, audio_swap=False, batch_size=4, device="cpu")
    assert metrics["method"] == "acl" and frontend.kind == "fbank"
    assert metrics["ext_confidence"].startswith("cos(v_f, a)")
    assert_known_metrics(metrics, prefixes=("map",))

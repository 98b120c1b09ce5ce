"""SSL-Align training: views, NN positives, run directory, exact resume, CLI, learning on synthetic data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avloc.core.audio import FrontEndConfig
from avloc.core.checkpoint import ImageConfig, load_model, read_checkpoint
from avloc.core.config import load_config, merge
from avloc.core.datasets import read_split
from avloc.core.errors import UserError
from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
from avloc.train.data import EpochSampler, EvalViews, TrainViews, load_nn_index, load_split
from avloc.train.trainer import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY = {
    "model": {"width": 4},
    "frontend": {"window_seconds": 0.1},
    "image": {"size": 32},
    "loss": {"positives": ["orig", "aug"]},
    "train": {"epochs": 2, "batch_size": 8, "num_workers": 0, "nn_index": None, "log_every": 1, "seed": 3},
}


def tiny_config(**sections) -> dict:
    return merge(merge(load_config(CONFIGS / "ssl_align.yaml"), TINY), sections)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from avloc.core.data.synth import make_synth

    root = tmp_path_factory.mktemp("synth") / "data"
    return make_synth(root, seed=1, n_train=24, n_val=8, n_test=8, silent_frac=0.0, image_size=48, clip_seconds=0.5)


def _split(root: Path, split: str = "train", size: int = 35):
    return load_split(root, split, FrontEndConfig(window_seconds=0.1), size, None)


def test_views_are_a_pure_function_of_seed_epoch_index(synth):
    split = _split(synth)
    ds = TrainViews(split, ImageConfig(size=32), FrontEndConfig(window_seconds=0.1), ("orig", "aug"), seed=0)
    state = torch.get_rng_state()
    a, b, c = ds[(0, 5)], ds[(0, 5)], ds[(1, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the main process's generator is untouched
    for key in ("image_orig", "image_aug", "wave_orig", "wave_aug"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["image_aug"], c["image_aug"])
    assert a["image_orig"].shape == (3, 32, 32) and a["wave_aug"].shape == (1600,)
    # original audio view = the window ending at the clip's centre (frontend.anchor: end, what live pairs)
    wave = split.wave(5)
    mid = len(wave) // 2
    np.testing.assert_allclose(a["wave_orig"].numpy(), wave[mid - 1600 : mid])
    centred = TrainViews(
        split, ImageConfig(size=32), FrontEndConfig(window_seconds=0.1, anchor="center"), ("orig",), seed=0
    )
    np.testing.assert_allclose(centred[(0, 5)]["wave_orig"].numpy(), wave[mid - 800 : mid + 800])


def test_cached_validation_inputs_equal_what_test_evaluation_reads_from_the_files(synth, tmp_path):
    """Model selection sees exactly the test path's pixels and samples (one resize, exact PCM16)."""
    from types import SimpleNamespace

    from avloc.train.evaluate import Evaluator

    frontend, image = FrontEndConfig(window_seconds=0.1), ImageConfig(size=32)
    loaded = SimpleNamespace(model=torch.nn.Identity(), frontend=frontend, image=image, method="ssl_align")
    evaluator = Evaluator(loaded, synth, "val")  # only its input path is used here
    source = evaluator.dataset
    # in memory, then written to the cache (load_split returns the written cache memory-mapped back)
    for cache_root in (None, tmp_path / "cache"):
        split = load_split(synth, "val", frontend, image.size, cache_root)
        assert (split.folder is None) == (cache_root is None)
        views = EvalViews(split, image, frontend)
        for i, sid in enumerate(split.ids):
            assert torch.equal(views[i]["image"], evaluator.image_tensor(source.image(sid)))
            np.testing.assert_array_equal(split.wave(i), source.audio(sid))


def test_sampler_shards_whole_batches_without_overlap():
    shards = [list(EpochSampler(50, 8, seed=0, rank=r, world=2)) for r in range(2)]
    assert all(len(s) == 24 for s in shards)  # 50 // 16 = 3 batches of 8 per rank
    indices = [i for s in shards for _, i in s]
    assert len(set(indices)) == 48
    with pytest.raises(UserError, match="fewer than one batch"):
        EpochSampler(5, 8, seed=0)


def test_nn_index_is_matched_by_id_and_drawn_from(synth, tmp_path):
    ids = read_split(synth, "train")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ids))  # the index lists ids in another order
    index_ids = [ids[i] for i in order]
    pos = {sid: i for i, sid in enumerate(index_ids)}
    # neighbours of train id j (by our order): j+1 and j+2 mod N, written in index positions
    image_nn = np.array([[pos[ids[(ids.index(s) + d) % len(ids)]] for d in (1, 2)] for s in index_ids])
    audio_nn = np.array([[pos[ids[(ids.index(s) + d) % len(ids)]] for d in (3, 4)] for s in index_ids])
    path = tmp_path / "nn.npz"
    np.savez(path, ids=np.array(index_ids), image_nn=image_nn, audio_nn=audio_nn, meta=np.array("{}"))
    img, aud = load_nn_index(path, ids, k=1000)
    n = len(ids)
    assert img.shape == (n, 2) and aud.shape == (n, 2)  # k capped by what the index holds
    np.testing.assert_array_equal(img, (np.arange(n)[:, None] + [1, 2]) % n)
    np.testing.assert_array_equal(aud, (np.arange(n)[:, None] + [3, 4]) % n)
    assert load_nn_index(path, ids, k=1)[0].shape == (n, 1)

    split = _split(synth)
    frontend = FrontEndConfig(window_seconds=0.1)
    ds = TrainViews(split, ImageConfig(size=32), frontend, ("orig", "nn"), 0, (img, aud))
    item = ds[(0, 0)]
    centre = [split.wave(j)[len(split.wave(j)) // 2 - 1600 : len(split.wave(j)) // 2] for j in (3, 4)]
    assert any(np.allclose(item["wave_nn"].numpy(), c) for c in centre)  # audio of one of the audio NNs
    with pytest.raises(UserError, match="NN index"):
        TrainViews(split, ImageConfig(size=32), FrontEndConfig(window_seconds=0.1), ("orig", "nn"), 0, None)


def test_run_directory_and_best_checkpoint(synth, tmp_path):
    out = tmp_path / "run"
    best = train(tiny_config(train={"epochs": 1}), synth, out)
    assert best == out / "best.pt"
    loaded = load_model(best)
    assert loaded.image.size == 32 and loaded.frontend.window_seconds == 0.1
    assert loaded.meta["val"]["binarize"].startswith("adaptive")
    assert (out / "config.yaml").is_file() and (out / "tb").is_dir()
    run = json.loads((out / "run.json").read_text())
    assert "git_revision" in run and run["frontend"]["kind"] == "linear"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0] and "val/ciou_ap50" in records[0]
    assert np.isfinite(records[0]["train/loss"])
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_config(), synth, out)


def test_resume_continues_bit_for_bit(synth, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_config(), synth, straight)
    split_run = tmp_path / "split"
    train(tiny_config(train={"epochs": 1}), synth, split_run)
    train(tiny_config(), synth, split_run, resume=True)
    a, b = read_checkpoint(straight / "last.pt"), read_checkpoint(split_run / "last.pt")
    assert a["step"] == b["step"] == 2 * (24 // 8) and a["epoch"] == b["epoch"] == 2
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for pid, st in a["optimizer"]["state"].items():
        for name, value in st.items():
            other = b["optimizer"]["state"][pid][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), name
    lines = (split_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]


def test_self_nn_mode_trains_and_stores_neighbours(synth, tmp_path):
    cfg = tiny_config(loss={"positives": ["orig", "nn"]}, train={"epochs": 1, "nn_index": "self", "nn_k": 3})
    train(cfg, synth, tmp_path / "self")
    state = read_checkpoint(tmp_path / "self" / "last.pt")
    nn_img = state["self_image_nn"].numpy()
    assert nn_img.shape == (24, 3)
    assert not (nn_img == np.arange(24)[:, None]).any()  # a sample is never its own neighbour


def test_cli_train_and_user_errors(synth, tmp_path, capsys):
    from avloc.cli import main

    config = tmp_path / "tiny.yaml"
    import yaml

    config.write_text(yaml.safe_dump(tiny_config()))
    out = tmp_path / "cli"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data",
                str(synth),
                "--out",
                str(out),
                "train.max_steps=1",
                "optim.lr=3e-4",
            ]
        )
        == 0
    )
    assert read_checkpoint(out / "last.pt")["step"] == 1
    assert (
        main(["train", "--config", str(config), "--data", str(synth), "--out", str(tmp_path / "x"), "loss.bogus=1"])
        == 2
    )
    assert "unknown key(s) bogus" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data",
                str(synth),
                "--out",
                str(tmp_path / "y"),
                "loss.positives=[orig,nn]",
                "train.nn_index=missing.npz",
            ]
        )
        == 2
    )


def test_visual_positive_sources_and_same_sound_mask():
    from avloc.train.data import same_sound_mask, visual_positive_candidates

    image_nn = np.array([[1, 2], [2, 0], [0, 1]])
    audio_nn = np.array([[2, 1], [0, 2], [1, 0]])
    assert [list(r) for r in visual_positive_candidates((image_nn, audio_nn), "image")] == [[1, 2], [2, 0], [0, 1]]
    assert [list(r) for r in visual_positive_candidates((image_nn, audio_nn), "audio")] == [[2, 1], [0, 2], [1, 0]]
    disjoint = np.array([[1, 1], [2, 2], [0, 0]])
    both = visual_positive_candidates((disjoint, np.array([[2, 1], [0, 0], [1, 1]])), "intersection")
    assert [list(r) for r in both] == [[1, 1], [0, 0], [1, 1]]  # rows 1, 2 share none: their audio list
    # batch holds clips 4, 7, 9; clip 4 sounds like 9 (and 5, not in the batch), 7 like nothing here
    table = np.zeros((10, 2), dtype=np.int64)
    table[4], table[7], table[9] = [9, 5], [1, 2], [3, 4]
    mask = same_sound_mask(torch.tensor([4, 7, 9]), table)
    assert mask.tolist() == [[False, False, True], [False, False, False], [True, False, False]]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from avloc.train.trainer import lr_factor

    f = [lr_factor(k, 110, 10, "cosine", 0.1) for k in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)  # the floor after the last step
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert [lr_factor(k, 110, 0, "constant", 0.0) for k in (0, 50, 200)] == [1.0, 1.0, 1.0]


def test_budget_fixes_the_step_count_and_the_schedule_ends_there(synth, tmp_path):
    out = tmp_path / "budget"
    cfg = tiny_config(
        optim={"schedule": "cosine", "lr": 1e-3},
        train={"epochs": 400, "budget_minutes": 0.25, "batch_size": 4, "val_every": 100},
    )
    t0 = time.perf_counter()
    train(cfg, synth, out)
    elapsed = time.perf_counter() - t0
    state = read_checkpoint(out / "last.pt")
    plan = state["plan"]
    assert plan["fixed"] and state["step"] == plan["total_steps"] < 400 * 6
    # the schedule reached its end: cosine to min_lr_ratio (0) at the last step
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-9)
    assert elapsed < 0.25 * 60 * 2.5, elapsed  # stopped near the budget, not after 400 epochs


def test_false_negative_mask_and_audio_guided_nn_train(synth, tmp_path):
    """train.false_negative_k / nn_visual=audio read the index file; audio-swap selection needs val scenes."""
    ids = read_split(synth, "train")
    n = len(ids)
    nn = np.stack([(np.arange(n) + d) % n for d in (1, 2, 3)], axis=1)
    np.savez(synth / "nn_test.npz", ids=np.array(ids), image_nn=nn, audio_nn=nn[:, ::-1], meta=np.array("{}"))
    cfg = tiny_config(
        loss={"positives": ["orig", "nn"]},
        train={"epochs": 1, "nn_index": "nn_test.npz", "nn_k": 2, "nn_visual": "audio", "false_negative_k": 2},
    )
    train(cfg, synth, tmp_path / "fn")
    record = json.loads((tmp_path / "fn" / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(record["train/loss"])
    with pytest.raises(UserError, match="false_negative_k needs train.nn_index"):
        train(tiny_config(train={"false_negative_k": 2}), synth, tmp_path / "fn2")
    (synth / "nn_test.npz").unlink()


@pytest.mark.slow
def test_pretrained_backbone_trains_heads_on_cached_trunk_features(synth, tmp_path):
    """backbone: pretrained: trunk features cached once under DATA/.cache (a second run reuses them), only the
    heads change, best.pt is a whole model that `avloc eval` loads, and the val audio-swap (with its
    audio-blind floor) is logged. Slow (~1 min on 2 busy cores): two pretrained trunks are exported to ONNX."""
    from avloc.train.frozen import LABELSPACE_WEIGHTS, augment_wave, cached_split, labelspace_grid, with_objectness

    config = merge(
        load_config(CONFIGS / "cpu_pretrained.yaml"),
        {
            "model": {"width": 4},
            "frontend": {"window_seconds": 1.0},
            "image": {"size": 64},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "budget_minutes": None,
                "seed": 3,
                "threads": 1,
            },
        },
    )
    best = train(config, synth, tmp_path / "run")
    loaded = load_model(best)
    assert loaded.frontend.kind == "yamnet" and loaded.frontend.level == "window_rms"
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["train/loss"]) for r in records)
    assert "val/ciou_ap50" in records[0]
    assert loaded.meta["selected_by"] == "val ciou"  # how best.pt was chosen, recorded in the checkpoint
    cache = list((synth / ".cache").glob("frozen-*/train.npz"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    fresh = SSLAlign(SSLAlignConfig(backbone="pretrained", width=4))
    trunk = {k: v for k, v in fresh.state_dict().items() if ".trunk." in k}
    for k, v in trunk.items():  # frozen trunks: exactly the packaged weights
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert float(loaded.model.labelspace_weight) == config["model"]["labelspace_weight"]  # the checkpoint's own
    # the label-space weight's measurement on a selection split (scripts/open_set_eval.py --labelspace-weights)
    feats = cached_split(cache[0].parent / "val.npz", lambda: None)
    grid = labelspace_grid(loaded.model, {"val": feats}, synth, 64)
    assert [g["weight"] for g in grid] == list(LABELSPACE_WEIGHTS) and all("val/ciou_ap50" in g for g in grid)
    assert float(loaded.model.labelspace_weight) == config["model"]["labelspace_weight"]  # restored
    # the recipe's objectness term: in the checkpoint, and its weight measured the same way (pairs of weights)
    assert loaded.model.config.objectness and float(loaded.model.objectness_weight) == 0.125
    pairs = labelspace_grid(loaded.model, {"val": feats}, synth, 64, (0.25,), (0.0, 0.5))
    assert [(g["weight"], g["objectness_weight"]) for g in pairs] == [(0.25, 0.0), (0.25, 0.5)]
    assert float(loaded.model.objectness_weight) == 0.125  # restored
    # a checkpoint trained without the term gets it switched on, heads unchanged (scripts/open_set_eval.py)
    plain = SSLAlign(SSLAlignConfig(backbone="pretrained", width=4, visual_layer4_stride=2, labelspace=True))
    switched = with_objectness(plain)
    assert switched.config.objectness and torch.equal(switched.visual.head.weight, plain.visual.head.weight)
    # a model without the label-space term has no weight to grid over: a one-line error, not an AttributeError
    bare = SSLAlign(SSLAlignConfig(backbone="pretrained", width=4, visual_layer4_stride=2, objectness=True))
    with pytest.raises(UserError, match="no label-space term"):
        labelspace_grid(bare, {"val": feats}, synth, 64, (0.25,))
    # same data + preprocessing, another head seed: the cached features are reused
    train(merge(config, {"train": {"seed": 4}}), synth, tmp_path / "run2")
    assert cache[0].stat().st_mtime_ns == stamp
    # the audio augmentation: same length, bounded, not the clean window
    rng = np.random.default_rng(0)
    wave = np.sin(np.arange(32000) / 10).astype(np.float32) * 0.5
    aug = augment_wave(wave, np.ones(8000, np.float32) * 0.1, 16000, rng)
    assert aug.shape == (16000,) and np.abs(aug).max() <= 1.0


def test_feature_map_augmentation_flips_crops_and_is_checked():
    """train.feature_crop: a random resized crop of the cached visual map (same crop on every channel), flips as
    before when off; out-of-range values of the feature augmentations are one-line config errors."""
    from avloc.train.frozen import augment_maps
    from avloc.train.trainer import parse_config

    vis = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    # off: exactly the old horizontal flip, drawn from the same random numbers
    flips = np.random.default_rng(5).random(2) < 0.5
    out = augment_maps(vis, np.random.default_rng(5), 1.0)
    for i in range(2):
        torch.testing.assert_close(out[i], vis[i].flip(-1) if flips[i] else vis[i])
    # on: a constant map stays constant; a ramp along x stays a ramp (a zoom in keeps the order, within the
    # range of the map) and every channel gets the same crop
    ramp = torch.linspace(0, 1, 8).expand(4, 2, 8, 8).clone()
    ramp[:, 1] *= 2.0
    out = augment_maps(ramp, np.random.default_rng(1), 0.5)
    torch.testing.assert_close(out[:, 1], 2.0 * out[:, 0])
    assert out[:, 0].min() >= 0 and out[:, 0].max() <= 1
    assert not torch.allclose(out, ramp) and not torch.allclose(out, ramp.flip(-1))
    rows = out[:, 0].diff(dim=-1)
    assert ((rows >= -1e-6).all(dim=(1, 2)) | (rows <= 1e-6).all(dim=(1, 2))).all()  # monotone (flipped or not)
    torch.testing.assert_close(
        augment_maps(torch.ones(3, 5, 8, 8), np.random.default_rng(2), 0.6), torch.ones(3, 5, 8, 8)
    )
    for key, value in (("feature_crop", 0.0), ("feature_crop", 1.5), ("feature_dropout", 1.0)):
        with pytest.raises(UserError, match=f"train.{key}={value}"):
            parse_config(merge(load_config(CONFIGS / "cpu_pretrained.yaml"), {"train": {key: value}}))
    # the resnet18 trainer (and ACL) have no cached features: the settings would be ignored without a word
    for key, value in (("feature_crop", 0.6), ("feature_dropout", 0.3)):
        with pytest.raises(UserError, match="train.feature_crop=.*model.backbone=pretrained only"):
            parse_config(merge(load_config(CONFIGS / "cpu.yaml"), {"train": {key: value}}))

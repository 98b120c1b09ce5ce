"""avloc eval end to end on a tiny synthetic set, strict checkpoint loading, the audio-swap count."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from avloc.core.audio import FrontEndConfig
from avloc.core.checkpoint import ImageConfig, save_checkpoint
from avloc.core.errors import UserError
from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
from avloc.train import evaluate

IMAGE = ImageConfig(size=64)
MODEL_CONFIG = {"width": 8}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avloc.core.data.synth import make_synth

    root = tmp_path_factory.mktemp("synth") / "data"
    make_synth(
        root,
        seed=3,
        n_train=4,
        n_val=2,
        n_test=6,
        distractors=1,
        silent_frac=0.3,
        image_size=64,
        clip_seconds=1.0,
        unheard_frac=0.2,
        workers=1,
    )
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = SSLAlign(SSLAlignConfig(**MODEL_CONFIG))
    path = tmp_path_factory.mktemp("run") / "best.pt"
    return save_checkpoint(
        path,
        model,
        method="ssl_align",
        model_config=MODEL_CONFIG,
        frontend=FrontEndConfig(window_seconds=1.0),
        image=IMAGE,
    )


def test_eval_end_to_end(synth_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    from avloc.cli import main as cli_main

    out, grid = tmp_path / "metrics.json", tmp_path / "grid.png"
    rc = cli_main(
        [
            "eval",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(synth_root),
            "--audio-swap",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--grid",
            str(grid),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 6 and metrics["n_silent"] >= 1 and metrics["image_size"] == 64
    for mode in ("median", "adaptive"):
        for key in ("ciou_ap50", "ciou_mean", "auc", "ext_ap", "ext_max_f1"):
            assert 0.0 <= metrics[f"{mode}/{key}"] <= 1.0, (mode, key)
    for feats in ("map", "proj"):
        for direction in ("a2i", "i2a"):
            recalls = [metrics[f"{feats}/{direction}_r{k}"] for k in (1, 5, 10)]
            assert all(0.0 <= r <= 1.0 for r in recalls) and recalls == sorted(recalls)
    assert metrics["heard/n"] + metrics["unheard/n"] == 6
    assert 0.0 <= metrics["heard/adaptive/ciou_ap50"] <= 1.0
    # every test scene has a sounding object + a distractor with a recording -> 2 pairs per scene
    assert metrics["audio_swap_n_scenes"] == 6 and metrics["audio_swap_n_pairs"] == 12
    assert 0.0 <= metrics["audio_swap_acc"] <= 1.0
    assert grid.is_file() and grid.read_bytes()[:4] == b"\x89PNG"
    examples = sorted((tmp_path / "metrics_audio_swap").glob("*.png"))
    assert 1 <= len(examples) <= 4


def test_eval_end_to_end_with_known_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``avloc eval`` on a set whose every number is worked out by hand (tests/eval_helpers.py): the model's
    evaluation methods return, per sample, maps right on some ids and wrong on others and retrieval features
    with known ranks; everything between (dataset reading, batching, silent rows, protocol, JSON) is real."""
    from eval_helpers import Oracle, assert_known_metrics, patch_ssl_align, write_dataset

    from avloc.cli import main as cli_main

    root = write_dataset(tmp_path / "data")
    frontend, image = FrontEndConfig(window_seconds=1.0), ImageConfig(size=224)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(
        tmp_path / "best.pt",
        SSLAlign(SSLAlignConfig(**MODEL_CONFIG)),
        method="ssl_align",
        model_config=MODEL_CONFIG,
        frontend=frontend,
        image=image,
    )
    patch_ssl_align(monkeypatch, Oracle(root, frontend, image))
    out = tmp_path / "metrics.json"
    rc = cli_main(
        [
            "eval",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(root),
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert metrics["method"] == "ssl_align" and metrics["image_size"] == 224
    assert_known_metrics(metrics, prefixes=("map", "proj"))


def test_eval_rejects_checkpoint_with_extra_key(synth_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    payload = torch.load(checkpoint, weights_only=True)
    payload["state_dict"]["visual_proj.extra"] = torch.zeros(3)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(UserError, match="unexpected 1 key"):
        evaluate.evaluate_checkpoint(bad, synth_root, audio_swap=False, device="cpu")
    del payload["state_dict"]["visual_proj.extra"]
    del payload["state_dict"]["audio_proj.bias"]
    torch.save(payload, bad)
    with pytest.raises(UserError, match="missing 1 key"):
        evaluate.evaluate_checkpoint(bad, synth_root, audio_swap=False, device="cpu")


def test_peak_inside() -> None:
    hm = np.zeros((10, 20), np.float32)
    hm[2, 15] = 1.0  # pixel centre (15.5/20, 2.5/10) = (0.775, 0.25)
    assert evaluate.peak_inside(hm, np.array([0.7, 0.2, 0.8, 0.3]))
    assert not evaluate.peak_inside(hm, np.array([0.0, 0.0, 0.7, 1.0]))
    assert not evaluate.peak_inside(hm, np.array([0.7, 0.3, 1.0, 1.0]))


def test_audio_swap_counts_hand_case(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two scenes, 5 pairs; heatmap peaks placed by hand: 3 inside the heard object's box."""
    import soundfile as sf

    from avloc.core.datasets import SceneObject

    for name in ("a", "b", "c"):
        sf.write(tmp_path / f"{name}.wav", np.full(1600, 0.1, np.float32), 16000)
    left, right, top = np.array([0, 0, 0.5, 1.0]), np.array([0.5, 0, 1.0, 1.0]), np.array([0, 0, 1.0, 0.3])
    scenes = {
        "s1": [SceneObject("dog", left, True, "a.wav"), SceneObject("cow", right, False, "b.wav")],
        "s2": [
            SceneObject("dog", left, True, "a.wav"),
            SceneObject("cow", right, False, "b.wav"),
            SceneObject("bee", top, False, "c.wav"),
        ],
    }
    # peaks (row, col) on a 10x10 map, per scene and object heard
    peaks = {"s1": [(5, 2), (5, 8)], "s2": [(5, 8), (5, 7), (8, 5)]}  # s1 both right; s2 only the cow right
    order = iter(["s1", "s2"])

    def fake_heatmaps(model: object, image: torch.Tensor, specs: torch.Tensor) -> np.ndarray:
        sid = next(order)
        assert specs.shape[0] == len(scenes[sid])
        maps = np.zeros((len(peaks[sid]), 10, 10), np.float32)
        for k, (r, c) in enumerate(peaks[sid]):
            maps[k, r, c] = 1.0
        return maps

    monkeypatch.setattr(evaluate, "swap_heatmaps", fake_heatmaps)
    fake = SimpleNamespace(
        dataset=SimpleNamespace(root=tmp_path, image=lambda sid: np.zeros((10, 10, 3), np.uint8)),
        loaded=SimpleNamespace(frontend=FrontEndConfig(window_seconds=0.1)),
        model=None,
        device=torch.device("cpu"),
        image_tensor=lambda img: torch.zeros(3, 10, 10),
        spectrograms=lambda waves: torch.zeros(len(waves), 1, 4, 4),
    )
    res = evaluate.audio_swap(fake, scenes, examples_dir=tmp_path / "ex", n_examples=1)  # type: ignore[arg-type]
    assert res["audio_swap_n_pairs"] == 5 and res["audio_swap_n_scenes"] == 2
    assert res["audio_swap_acc"] == pytest.approx(3 / 5)
    assert res["audio_swap_scene_acc"] == pytest.approx(1 / 2)
    assert res["audio_swap_on_any_object"] == 1.0  # left + right boxes cover the image
    assert res["audio_swap_peak_moves"] == 1.0
    assert [p.name for p in (tmp_path / "ex").iterdir()] == ["s1.png"]


def test_swap_scenes_needs_two_recordings() -> None:
    from avloc.core.datasets import Annotation, SceneObject

    box = np.array([0, 0, 1, 1], np.float32)
    anns = {
        "two": Annotation(
            "two", "dog", box[None], (SceneObject("dog", box, True, "a.wav"), SceneObject("cow", box, False, "b.wav"))
        ),
        "one": Annotation(
            "one", "dog", box[None], (SceneObject("dog", box, True, "a.wav"), SceneObject("cow", box, False, None))
        ),
        "none": Annotation("none", "dog", box[None]),
    }
    assert list(evaluate.swap_scenes(anns, ["two", "one", "none"])) == ["two"]


def test_silent_rows_reusing_annotated_images_keep_both_heatmaps(
    synth_root: Path, checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    """VGG-SS Extended pairs annotated test images with another clip's audio: the silent pair gets its own
    id ("<video>__<audio>") and the sounding heatmap of that image is kept, not overwritten."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    ids = (root / "test.txt").read_text().split()
    video, audio = ids[0], ids[1]
    (root / "test_plus_silent.csv").write_text(f"video,audio,non-sounding\n{video},{video},0\n{video},{audio},1\n")
    seen = {}
    real = evaluate._localization

    def spy(heatmaps, annotations, silent, prefix="", confidences=None):
        if not prefix:
            seen.update(heatmaps=dict(heatmaps), silent=list(silent))
        return real(heatmaps, annotations, silent, prefix=prefix, confidences=confidences)

    monkeypatch.setattr(evaluate, "_localization", spy)
    metrics = evaluate.evaluate_checkpoint(checkpoint, root, audio_swap=False, device="cpu")
    assert metrics["n_silent"] == 1 and seen["silent"] == [f"{video}__{audio}"]
    own, other = seen["heatmaps"][video], seen["heatmaps"][f"{video}__{audio}"]
    assert own.shape == other.shape and not np.allclose(own, other)


def test_save_maps_round_trip_through_eval_maps(synth_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    """``avloc eval --save-maps DIR`` -> ``avloc eval-maps`` (the command the index names) gives the same numbers,
    bit for bit, for every binarization mode."""
    from avloc.cli import main as cli_main

    maps_dir, out = tmp_path / "maps", tmp_path / "metrics.json"
    argv = [
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(synth_root),
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--save-maps",
        str(maps_dir),
    ]
    assert cli_main(argv) == 0
    metrics = json.loads(out.read_text())
    index = json.loads((maps_dir / "index.json").read_text())
    assert metrics["n_silent"] >= 1 and len(index["silent_ids"]) == metrics["n_silent"]
    assert sorted(p.stem for p in maps_dir.glob("*.npy")) == sorted(index["ids"] + index["silent_ids"])
    assert np.load(maps_dir / f"{index['ids'][0]}.npy").dtype == np.float32
    for mode in ("median", "adaptive"):
        again = tmp_path / f"again_{mode}.json"
        command = index["eval_maps"].split()[1:]  # without the leading "avloc"
        command = command[: command.index("--binarize")] + ["--binarize", mode, "--out", str(again)]
        assert cli_main(command) == 0
        rescored = json.loads(again.read_text())
        for key in ("ciou_ap50", "ciou_mean", "auc", "ext_ap", "ext_max_f1"):
            assert rescored[key] == metrics[f"{mode}/{key}"], (mode, key)
    # a folder holding other maps is refused rather than mixed
    np.save(maps_dir / "stranger.npy", np.zeros((4, 4), np.float32))
    assert cli_main(argv[:-1] + [str(maps_dir)]) == 2


def test_s4_masks_are_scored_as_eval_maps_does(synth_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    """A split with ``masks/<split>/<id>.png`` gets ``s4/<mode>/miou|fscore``; ``--save-maps`` -> the index's
    ``eval-maps`` command (now with ``--masks``) gives the same numbers bit for bit; masks alone need no boxes."""
    import shutil

    import cv2

    from avloc.cli import main as cli_main
    from avloc.core.datasets import load_vggss_json

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    ids = (root / "test.txt").read_text().split()
    boxes = load_vggss_json(root / "test.json")
    (root / "masks" / "test").mkdir(parents=True)
    for n, sample_id in enumerate(ids[:-1]):  # the last id keeps no mask: masks may cover part of a split
        mask = np.zeros((40, 50), np.uint8)  # not 224 x 224: resized with nearest neighbour
        if n > 0:  # the first mask is empty (AVSBench scores its true negatives)
            x1, y1, x2, y2 = boxes[sample_id].boxes[0]
            mask[int(y1 * 40) : int(y2 * 40) + 1, int(x1 * 50) : int(x2 * 50) + 1] = 255
        cv2.imwrite(str(root / "masks" / "test" / f"{sample_id}.png"), mask)

    def run_eval(name: str) -> tuple[dict, Path]:
        maps_dir, out = tmp_path / f"maps_{name}", tmp_path / f"{name}.json"
        argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(root), "--device", "cpu"]
        assert cli_main([*argv, "--out", str(out), "--save-maps", str(maps_dir)]) == 0
        return json.loads(out.read_text()), maps_dir

    metrics, maps_dir = run_eval("both")
    assert metrics["s4/n"] == len(ids) - 1
    index = json.loads((maps_dir / "index.json").read_text())
    assert f"--masks {root / 'masks' / 'test'}" in index["eval_maps"]
    for mode in ("median", "adaptive"):
        assert 0.0 < metrics[f"s4/{mode}/miou"] < 1.0 and 0.0 <= metrics[f"s4/{mode}/fscore"] <= 1.0
        again = tmp_path / f"again_{mode}.json"
        command = index["eval_maps"].split()[1:]
        command = command[: command.index("--binarize")] + ["--binarize", mode, "--out", str(again)]
        assert cli_main(command) == 0
        rescored = json.loads(again.read_text())
        assert rescored["n_masks"] == metrics["s4/n"]
        for key in ("miou", "fscore"):
            assert rescored[key] == metrics[f"s4/{mode}/{key}"], (mode, key)
        assert rescored["ciou_ap50"] == metrics[f"{mode}/ciou_ap50"]  # boxes win over masks for the cIoU rows
    assert metrics["s4/median/miou"] != metrics["s4/adaptive/miou"]

    # masks alone (an AVSBench split has no boxes): the same mask rows, no box rows
    (root / "test.json").unlink()
    masks_only, _ = run_eval("masks_only")
    assert not any(k.startswith(("median/", "adaptive/")) for k in masks_only)
    for key in ("s4/n", "s4/median/miou", "s4/median/fscore", "s4/adaptive/miou"):
        assert masks_only[key] == metrics[key]
    # a mask naming an id outside the split is refused (eval-maps would score a different set)
    cv2.imwrite(str(root / "masks" / "test" / "stranger.png"), np.zeros((4, 4), np.uint8))
    assert cli_main(["eval", "--checkpoint", str(checkpoint), "--data", str(root), "--out", str(tmp_path / "x")]) == 2

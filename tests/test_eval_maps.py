"""``avloc eval-maps`` end to end on small files written under tmp_path."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from avloc.cli import main
from avloc.core import metrics as M
from avloc.core.datasets import load_vggss_json

BOXES = {
    "a": [[0.0, 0.0, 0.5, 1.0]],
    "b": [[0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.25, 1.0]],
    "c": [[0.1, 0.1, 0.9, 0.9]],
}


def _write_set(root, silent_rows=(("s1", "a"),)):
    """test.json, heatmaps of assorted sizes, and an Extended csv."""
    entries = [{"file": k, "class": f"cls_{k}", "bbox": v} for k, v in BOXES.items()]
    (root / "test.json").write_text(json.dumps(entries))
    maps = root / "maps"
    maps.mkdir()
    rng = np.random.default_rng(0)
    left = np.zeros((7, 7), np.float32)
    left[:, :3] = 1
    np.save(maps / "a.npy", left + 0.01 * rng.random((7, 7)).astype(np.float32))
    np.save(maps / "b.npy", rng.random((224, 224)).astype(np.float32))
    np.save(maps / "c.npy", rng.random((30, 20)).astype(np.float64))  # any size, float64 accepted
    lines = ["video,audio,non-sounding"] + [f"{k},{k},0" for k in BOXES]
    for video, audio in silent_rows:
        lines.append(f"{video},{audio},1")
        name = M.silent_sample_id(video, audio, set(BOXES))
        np.save(maps / f"{name}.npy", rng.random((14, 14)).astype(np.float32))
    (root / "silent.csv").write_text("\n".join(lines) + "\n")
    return maps


def test_eval_maps_end_to_end_matches_library(tmp_path, capsys):
    maps = _write_set(tmp_path, silent_rows=(("s1", "a"), ("s2", "c")))
    out = tmp_path / "res" / "metrics.json"
    argv = ["eval-maps", "--heatmaps", str(maps), "--annotations", str(tmp_path / "test.json")]
    rc = main(argv + ["--silent", str(tmp_path / "silent.csv"), "--per-sample", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    for key in ("n", "ciou_ap50", "ciou_mean", "auc", "ext_ap", "ext_max_f1", "ext_loc_acc"):
        assert key in result
    assert result["n"] == 3 and result["n_silent"] == 2 and result["binarize"] == "median"
    # the same numbers as the library on the same arrays
    heatmaps = {p.stem: np.load(p) for p in maps.glob("*.npy")}
    expected = M.evaluate_maps(heatmaps, load_vggss_json(tmp_path / "test.json"), silent=["s1", "s2"])
    for key in ("ciou_ap50", "ciou_mean", "auc", "ext_ap", "ext_max_f1", "ext_loc_acc"):
        assert result[key] == pytest.approx(expected[key])
    assert result["per_sample"]["a"]["ciou"] > 0.95  # left-half map against the left-half box
    printed = capsys.readouterr().out
    assert "ciou_ap50" in printed and "ext_ap" in printed
    assert not list(out.parent.glob(".*tmp"))  # temp file renamed away


@pytest.mark.parametrize("mode", ["median", "adaptive"])
def test_eval_maps_hand_worked_values(tmp_path, mode):
    """The CLI on the hand-worked set of tests/eval_helpers.py (maps right on some ids, wrong on others, one
    silent image): every localization and Extended number as worked out there from the definitions."""
    from eval_helpers import ALL, LOCALIZATION, PER_SAMPLE_CIOU, heatmap, write_dataset

    root = write_dataset(tmp_path / "data")
    maps = tmp_path / "maps"
    maps.mkdir()
    for sample_id in ALL:
        np.save(maps / f"{sample_id}.npy", heatmap(sample_id))
    out = tmp_path / "metrics.json"
    argv = [
        "eval-maps",
        "--heatmaps",
        str(maps),
        "--annotations",
        str(root / "test.json"),
        "--silent",
        str(root / "test_plus_silent.csv"),
        "--binarize",
        mode,
        "--per-sample",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 6 and result["n_silent"] == 1 and result["binarize"] == mode
    for key, value in LOCALIZATION.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    assert {i: v["ciou"] for i, v in result["per_sample"].items() if v["sounding"]} == pytest.approx(
        PER_SAMPLE_CIOU, abs=1e-9
    )
    confidence = {i: v["confidence"] for i, v in result["per_sample"].items()}
    assert confidence == pytest.approx(
        {"t0": 0.9, "t1": 0.5, "t2": 0.3, "t3": 0.8, "t4": 0.6, "t5": 0.2, "s0": 0.7}, abs=1e-6
    )


def test_eval_maps_adaptive_and_sweep(tmp_path, capsys):
    maps = _write_set(tmp_path)
    out = tmp_path / "m.json"
    base = ["eval-maps", "--heatmaps", str(maps), "--annotations", str(tmp_path / "test.json")]
    assert main(base + ["--silent", str(tmp_path / "silent.csv"), "--binarize", "adaptive", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["binarize"] == "adaptive"
    (maps / "s1.npy").unlink()
    assert main(base + ["--binarize", "abs:0.5", "--sweep", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["t"] for r in result["sweep"]["rows"]] == list(M.ABS_SWEEP_THRESHOLDS)
    assert result["sweep"]["best"]["auc"] == max(r["auc"] for r in result["sweep"]["rows"])
    assert "best by auc" in capsys.readouterr().out


def test_eval_maps_id_mismatch_lists_ids(tmp_path, capsys):
    maps = _write_set(tmp_path)
    (maps / "b.npy").unlink()
    np.save(maps / "zz.npy", np.ones((4, 4), np.float32))
    out = tmp_path / "m.json"
    argv = ["eval-maps", "--heatmaps", str(maps), "--annotations", str(tmp_path / "test.json")]
    rc = main(argv + ["--silent", str(tmp_path / "silent.csv"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "missing heatmaps for 'b'" in err and "'zz'" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    # without --silent the silent sample's map is an extra id too
    rc = main(argv + ["--out", str(out)])
    assert rc == 2 and "'s1'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad, problem",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]], np.float32), "NaN"),
        (np.zeros((1, 4, 4), np.float32), "2-D"),
        (b"not an npy file", "not a readable .npy"),
    ],
)
def test_eval_maps_bad_heatmap_names_the_file(tmp_path, capsys, bad, problem):
    maps = _write_set(tmp_path)
    if isinstance(bad, bytes):
        (maps / "c.npy").write_bytes(bad)
    else:
        np.save(maps / "c.npy", bad)
    out = tmp_path / "m.json"
    rc = main(["eval-maps", "--heatmaps", str(maps), "--annotations", str(tmp_path / "test.json"),
               "--silent", str(tmp_path / "silent.csv"), "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and str(maps / "c.npy") in err and problem in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_eval_maps_masks_flickr_and_argument_errors(tmp_path, capsys):
    maps = tmp_path / "maps"
    masks = tmp_path / "masks"
    maps.mkdir()
    masks.mkdir()
    gt = M.gt_map_vggss([[0.25, 0.25, 0.75, 0.75]]) > 0
    for name, prob in (("m1", np.where(gt, 0.9, 0.1)), ("m2", np.where(gt[::-1, ::-1], 0.7, 0.2))):
        np.save(maps / f"{name}.npy", prob.astype(np.float32))
        cv2.imwrite(str(masks / f"{name}.png"), gt.astype(np.uint8) * 255)
    out = tmp_path / "m.json"
    rc = main(["eval-maps", "--heatmaps", str(maps), "--masks", str(masks), "--binarize", "abs:0.5",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["n_masks"] == 2 and result["miou"] == pytest.approx(1.0, abs=1e-6)
    assert result["fscore"] == pytest.approx(1.0)

    # Flickr: a folder of per-image XML with three annotators' boxes in 256-px coordinates
    xml_dir = tmp_path / "xml"
    xml_dir.mkdir()
    boxes = [(0, 0, 128, 256), (0, 0, 128, 256), (128, 0, 256, 256)]
    objects = "".join(
        f"<object><bbox><index>0</index><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bbox></object>"
        for b in boxes
    )
    (xml_dir / "m1.xml").write_text(f"<annotation>{objects}</annotation>")
    (maps / "m2.npy").unlink()
    left = np.zeros((224, 224), np.float32)
    left[:, :112] = 1
    np.save(maps / "m1.npy", left)
    rc = main(["eval-maps", "--heatmaps", str(maps), "--annotations", str(xml_dir), "--binarize", "abs:0.5",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    # G: left half 1 (two annotators), right half 0.5 (one): cIoU = 112*224 / (224*224 * 0.75) = 2/3
    assert json.loads(out.read_text())["ciou_mean"] == pytest.approx(2 / 3)

    capsys.readouterr()
    assert main(["eval-maps", "--heatmaps", str(maps), "--out", str(out)]) == 2
    assert "--annotations" in capsys.readouterr().err
    rc = main(["eval-maps", "--heatmaps", str(maps), "--annotations", str(xml_dir), "--binarize", "top:3",
               "--out", str(out)])  # fmt: skip
    assert rc == 2 and "binarize mode" in capsys.readouterr().err


def test_eval_maps_extended_names_for_reused_test_images(tmp_path):
    # VGG-SS Extended pairs annotated test images with other clips' audio: heatmap "<video>__<audio>"
    maps = _write_set(tmp_path, silent_rows=(("a", "b"),))
    assert (maps / "a__b.npy").exists()
    out = tmp_path / "m.json"
    rc = main(["eval-maps", "--heatmaps", str(maps), "--annotations", str(tmp_path / "test.json"),
               "--silent", str(tmp_path / "silent.csv"), "--out", str(out)])  # fmt: skip
    assert rc == 0 and json.loads(out.read_text())["n_silent"] == 1

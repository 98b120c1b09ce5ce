"""``avloc data scan``: every problem of a dataset listed at once, one line each, exit 1 if any."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile

from avloc.cli import main as cli_main
from avloc.core.data.scan import scan_dataset
from avloc.core.datasets import scan_dataset as scan_from_datasets
from avloc.core.media import write_video

SR = 16000


def make_clean(root: Path) -> None:
    (root / "frames").mkdir(parents=True)
    (root / "audio").mkdir()
    for i, id in enumerate(["a", "b", "c", "d", "s"]):
        cv2.imwrite(str(root / "frames" / f"{id}.jpg"), np.full((16, 16, 3), 40 * i, np.uint8))
        soundfile.write(root / "audio" / f"{id}.wav", np.zeros(SR // 2, np.float32), SR, subtype="PCM_16")
    (root / "train.txt").write_text("a\nb\n")
    (root / "val.txt").write_text("c\n")
    (root / "test.txt").write_text("d\n")
    for split, id in (("val", "c"), ("test", "d")):
        annotation = {"file": id, "class": "dog", "bbox": [[0, 0, 0.5, 0.5]]}
        (root / f"{split}.json").write_text(json.dumps([annotation]))
    (root / "test_plus_silent.csv").write_text("video,audio,non-sounding\nd,d,0\ns,a,1\n")
    (root / "labels.csv").write_text("id,class\na,dog\nb,cat\nc,dog\nd,dog\ns,cat\n")
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "meta.json").write_text(json.dumps({"sample_rate": SR}))
    frames = [np.full((32, 32, 3), 10 * i, np.uint8) for i in range(5)]
    write_video(root / "video" / "clip.mp4", frames, 10, np.zeros(SR // 2, np.float32))


def test_clean_dataset_has_no_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_clean(tmp_path)
    assert scan_dataset(tmp_path) == []
    assert scan_from_datasets(tmp_path) == []
    assert cli_main(["data", "scan", str(tmp_path)]) == 0
    assert "0 problems found" in capsys.readouterr().out


def test_every_problem_is_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_clean(tmp_path)
    (tmp_path / "frames" / "a.jpg").unlink()  # missing image
    (tmp_path / "frames" / "b.jpg").write_bytes(b"\xff\xd8 broken")  # unreadable image
    soundfile.write(tmp_path / "audio" / "b.wav", np.zeros(4410, np.float32), 44100)  # wrong rate
    whole = (tmp_path / "audio" / "c.wav").read_bytes()
    (tmp_path / "audio" / "c.wav").write_bytes(whole[: len(whole) // 2])  # truncated
    write_video(tmp_path / "video" / "mute.mp4", [np.zeros((32, 32, 3), np.uint8)] * 3, 10)  # no audio
    (tmp_path / "test.txt").write_text("d\nb\n")  # b also in train.txt, and not annotated
    (tmp_path / "test_plus_silent.csv").write_text("video,audio,non-sounding\nd,d,0\nghost,a,1\n")

    lines = scan_dataset(tmp_path)
    expected = [
        ("a.jpg", "image file not found"),
        ("b.jpg", "unreadable image"),
        ("b.wav", "sample rate 44100 Hz, expected 16000 Hz"),
        ("c.wav", "truncated"),
        ("mute.mp4", "no audio track"),
        ("test.txt", "id 'b' is also in train.txt"),
        ("test.json", "no annotation for id 'b'"),
        ("ghost.jpg", "image file not found"),
        ("ghost.wav", "audio file not found"),
        ("labels.csv", "no class for id 'ghost'"),
    ]
    for name, problem in expected:
        assert any(name in line and problem in line for line in lines), (name, problem, lines)
    assert len(lines) == len(expected)  # one line per problem, nothing else
    assert all(line.count("\n") == 0 for line in lines)

    assert cli_main(["data", "scan", str(tmp_path), "--split", "all"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:-1] == lines and out[-1].startswith(f"{len(lines)} problems found")


def test_single_split_and_bad_annotations(tmp_path: Path) -> None:
    make_clean(tmp_path)
    (tmp_path / "frames" / "a.jpg").unlink()
    (tmp_path / "val.json").write_text('[{"file": "c", "bbox": [[0, 0, 1]]}]')
    assert scan_dataset(tmp_path, splits=["test"]) == []  # a.jpg belongs to train, val.json to val
    lines = scan_dataset(tmp_path, splits=["val"])
    assert len(lines) == 1 and "val.json: entry 0 (c) bbox[0]: expected a box" in lines[0]
    (tmp_path / "val.json").write_text('[{"file": "c", "bbox": [[0.5, 0, 0.25, 1]]}]')
    assert scan_dataset(tmp_path, splits=["val"]) == [
        f"{tmp_path / 'val.json'}: id 'c': box [0.5, 0.0, 0.25, 1.0] has x2 < x1 or y2 < y1"
    ]


def test_missing_root_and_split_lists(tmp_path: Path) -> None:
    assert scan_dataset(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'}: dataset root is not a directory"]
    lines = scan_dataset(tmp_path)
    assert [line.split(": ", 1)[1] for line in lines] == [
        "split list not found (expected one id per line for split 'train')",
        "split list not found (expected one id per line for split 'val')",
        "split list not found (expected one id per line for split 'test')",
    ]


def test_scene_object_recordings_and_clip_boxes(tmp_path: Path) -> None:
    make_clean(tmp_path)
    objects = [
        {"class": "dog", "bbox": [0, 0, 0.5, 0.5], "sounding": True, "audio": "audio/d.wav"},
        {"class": "cat", "bbox": [0.5, 0.5, 1, 1], "sounding": False, "audio": "swap/d_1.wav"},
    ]
    (tmp_path / "test.json").write_text(
        json.dumps([{"file": "d", "class": "dog", "bbox": [[0, 0, 0.5, 0.5]], "objects": objects}])
    )
    boxes = {"fps": 10, "class": "dog", "boxes": [[0.1, 0.1, 0.3, 0.3]] * 4}  # the clip has 5 frames
    (tmp_path / "video" / "clip.json").write_text(json.dumps(boxes))
    lines = scan_dataset(tmp_path)
    assert len(lines) == 2
    assert "d_1.wav: audio file not found" in lines[1]
    assert "clip.json: 4 boxes for the 5 frames of clip.mp4" in lines[0]

"""``avloc data stamps``: stamp selection, categories, layout, and the missing-package error."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image
from test_synth import assert_layout

from avloc import cli
from avloc.core.data import scene_dataset, scenes
from avloc.core.data.stamps import DEFAULT_STAMPS_DIR, STAMPS_DIR_ENV, StampLibrary, make_stamps
from avloc.core.errors import UserError


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    """An RGBA cut-out: an opaque ellipse on a transparent canvas."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((xx - w / 2) / (w * 0.45)) ** 2 + ((yy - h / 2) / (h * 0.45)) ** 2 <= 1
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., :3] = colour
    rgba[..., 3] = np.where(inside, 255, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)


def _ogg(path: Path, wave: np.ndarray, rate: int = 22050) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wave.astype(np.float32), rate, format="OGG", subtype="VORBIS")


def _tone(freq: float, seconds: float = 0.6, rate: int = 22050) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.5 * np.sin(2 * np.pi * freq * t)


@pytest.fixture(scope="module")
def fake_stamps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stamps")
    for i, (rel, freq) in enumerate(
        [
            ("animals/cat", 440),
            ("animals/dog", 300),
            ("vehicles/car", 880),
            ("vehicles/bus", 150),
            ("animals/cow", 200),
            ("animals/cow_white", 210),
            ("symbols/letter_a", 500),
            ("town/sign", 600),
        ]
    ):
        _png(root / f"{rel}.png", (120 + 10 * i, 70), (40 * i % 255, 200, 100))
        _ogg(root / f"{rel}.ogg", _tone(freq))
    _ogg(root / "animals/cat_desc_fr.ogg", _tone(1000))  # a spoken description: never a category
    _png(root / "animals/wolf.png", (120, 80), (120, 120, 120))
    shutil.copy(root / "animals/dog.ogg", root / "animals/wolf.ogg")  # same recording as dog -> one category
    (root / "household").mkdir()
    (root / "household/fridge.svg").write_text("<svg/>")
    _ogg(root / "household/fridge.ogg", _tone(700))
    _png(root / "animals/quiet.png", (150, 120), (0, 0, 255))
    _ogg(root / "animals/quiet.ogg", np.zeros(5000))
    _png(root / "animals/tiny.png", (30, 30), (255, 0, 0))
    _ogg(root / "animals/tiny.ogg", _tone(900))
    _ogg(root / "animals/mosquito.ogg", _tone(1200))
    return root


def test_stamp_selection_and_categories(fake_stamps: Path) -> None:
    library = StampLibrary(fake_stamps, max_side=64)
    assert library.categories == ["bus", "car", "cat", "cow", "dog_wolf"]
    assert library.members["cow"] == ["cow", "cow_white"] and library.members["dog_wolf"] == ["dog", "wolf"]
    assert library.skipped == {
        "household/fridge": "SVG-only stamp (not rasterized)",
        "animals/quiet": "silent recording",
        "animals/tiny": "image under 96 px",
        "animals/mosquito": "no image",
    }
    rng = np.random.default_rng(0)
    sprite = library.sprite("cat", rng)
    assert sprite.dtype == np.float32 and sprite.shape[2] == 4 and max(sprite.shape[:2]) <= 64
    assert (sprite[0, :, 3] > 0.5).any() or (sprite[:, 0, 3] > 0.5).any(), "trimmed to the object"
    sound = library.sound("cat", rng, 16000)
    assert sound.shape == (16000,) and 0.9 < np.abs(sound).max() <= 1.0 + 1e-6
    # 0.6 s at 440 Hz looped to 1 s: the dominant frequency survives resampling to 16 kHz.
    spectrum = np.abs(np.fft.rfft(sound))
    assert abs(np.argmax(spectrum) - 440) <= 3


def test_make_stamps_layout_and_boxes_match_masks(fake_stamps: Path, tmp_path: Path) -> None:
    root = make_stamps(
        tmp_path / "ds",
        seed=5,
        n_train=4,
        n_val=2,
        n_test=4,
        distractors=2,
        silent_frac=0.5,
        image_size=80,
        clip_seconds=0.5,
        workers=1,
        stamps_root=fake_stamps,
        preview=True,
    )
    parts = assert_layout(root, 0.5, 80)
    assert (root / "preview.png").is_file()
    meta = parts["meta"]
    assert meta["generator"] == "stamps" and set(meta["source"]["categories"]) == set(meta["categories"])
    # The debug API re-renders a sample: its alpha masks give exactly the boxes written to test.json.
    library = StampLibrary(fake_stamps, max_side=int(80 * 0.95))
    params = scenes.SceneParams(image_size=80, clip_seconds=0.5, distractors=2)
    specs, _ = scene_dataset.plan_samples(library.categories, 5, 4, 2, 4, 0.5, 0.0, 0)
    for sub in ("frames", "audio", "swap"):
        (tmp_path / "re" / sub).mkdir(parents=True)
    for spec in [s for s in specs if s.split == "test"]:
        _, scene = scene_dataset.render_sample(spec, library, params, 5, tmp_path / "re")
        entry = parts["annotations"][spec.id]
        for obj, written in zip(scene.objects, entry["objects"]):
            ys, xs = np.nonzero(obj.alpha > 0.5)
            expected = [xs.min() / 80, ys.min() / 80, (xs.max() + 1) / 80, (ys.max() + 1) / 80]
            np.testing.assert_allclose(written["bbox"], expected, atol=1e-6)
            assert written["class"] == obj.category
        assert (tmp_path / "re/frames" / f"{spec.id}.jpg").read_bytes() == (
            root / "frames" / f"{spec.id}.jpg"
        ).read_bytes()


def test_missing_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with pytest.raises(UserError, match="sudo apt-get install tuxpaint-stamps-default"):
        StampLibrary(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no usable tuxpaint stamps.*apt-get install tuxpaint-stamps-default"):
        StampLibrary(tmp_path / "empty")
    monkeypatch.setenv(STAMPS_DIR_ENV, str(tmp_path / "empty"))
    code = cli.main(["data", "stamps", "--out", str(tmp_path / "ds"), "--n-train", "2", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "apt-get install tuxpaint-stamps-default" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.*"))


@pytest.mark.skipif(not DEFAULT_STAMPS_DIR.is_dir(), reason="tuxpaint-stamps-default is not installed")
def test_real_stamps_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STAMPS_DIR_ENV, raising=False)
    root = make_stamps(
        tmp_path / "ds",
        seed=0,
        n_train=3,
        n_val=2,
        n_test=3,
        silent_frac=0.34,
        image_size=96,
        clip_seconds=0.5,
        videos=1,
        video_size=(160, 120),
        video_seconds=1.0,
        workers=1,
    )
    parts = assert_layout(root, 0.5, 96)
    source = parts["meta"]["source"]
    members = [m for ms in source["categories"].values() for m in ms]
    assert len(parts["meta"]["categories"]) >= 50
    assert not any("_desc" in m for m in members)
    assert source["categories"]["mountaingoat_ram"] == ["mountaingoat", "ram"]  # same recording shipped twice
    assert not any(k.startswith(("symbols/", "town/")) for k in source["skipped"])
    video = json.loads((root / "video/clip_0000.json").read_text())
    assert video["fps"] == 30 and len(video["boxes"]) == 30 and (root / "video/clip_0000.mp4").stat().st_size > 0


def test_category_subset(fake_stamps: Path, tmp_path: Path, capsys) -> None:
    """--categories: only those classes anywhere in the dataset; an unknown name or fewer than 3 is an error."""
    subset = ["cat", "dog_wolf", "cow", "car"]
    root = make_stamps(
        tmp_path / "ds",
        seed=3,
        n_train=6,
        n_val=3,
        n_test=3,
        distractors=2,
        silent_frac=0.34,
        image_size=64,
        clip_seconds=0.5,
        workers=1,
        stamps_root=fake_stamps,
        categories=subset,
    )
    parts = assert_layout(root, 0.5, 64)
    assert (root / "classes.txt").read_text().split() == sorted(subset)
    assert parts["meta"]["categories"] == sorted(subset)
    with open(root / "labels.csv", newline="") as f:
        assert {row["class"] for row in csv.DictReader(f)} <= set(subset)
    for split in ("val", "test"):  # distractors too
        for entry in json.loads((root / f"{split}.json").read_text()):
            assert {o["class"] for o in entry["objects"]} <= set(subset)
    source = parts["meta"]["source"]
    assert set(source["categories"]) == set(subset) and source["excluded_categories"] == ["bus"]
    full = make_stamps(
        tmp_path / "all",
        n_train=3,
        n_val=0,
        n_test=0,
        image_size=64,
        clip_seconds=0.5,
        workers=1,
        stamps_root=fake_stamps,
    )
    # without --categories, meta.json (and every other byte) stays as before
    assert "excluded_categories" not in json.loads((full / "meta.json").read_text())["source"]

    with pytest.raises(UserError, match=r"unknown category 'dog'.*dog_wolf") as info:
        make_stamps(
            tmp_path / "x",
            n_train=3,
            n_val=0,
            n_test=0,
            image_size=64,
            workers=1,
            stamps_root=fake_stamps,
            categories=["cat", "dog", "cow"],
        )
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="silent scene holds 3 objects"):  # said before any rendering
        make_stamps(tmp_path / "x", n_train=3, workers=1, stamps_root=fake_stamps, categories=["cat", "cow", "car"])
    with pytest.raises(UserError, match="at least 3"):  # a repeated name counts once
        make_stamps(tmp_path / "x", n_train=3, workers=1, stamps_root=fake_stamps, categories=["cat", "cow", "cat"])
    argv = ["data", "stamps", "--out", str(tmp_path / "cli"), "--stamps-dir", str(fake_stamps)]
    code = cli.main([*argv, "--n-train", "3", "--workers", "1", "--categories", "cat,cow,zebra"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown category 'zebra'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "cli").exists()


def test_holdout_assets_open_set_split(fake_stamps: Path, tmp_path: Path, capsys) -> None:
    """--holdout-assets: held-out stamps (picture and recording) appear only as the sounding object of
    val_unseen / test_unseen scenes, val and test hold disjoint stamps, the split follows --seed."""
    library = StampLibrary(fake_stamps, max_side=64)
    held = library.holdout(seed=3, frac=0.67)
    assert held == library.holdout(seed=3, frac=0.67)  # deterministic
    val_stamps = {s for ms in held["val_unseen"].values() for s in ms}
    test_stamps = {s for ms in held["test_unseen"].values() for s in ms}
    assert val_stamps and test_stamps and not val_stamps & test_stamps
    # cow / cow_white (distinct recordings) loses one stamp; dog / wolf share a recording: never split
    assert sum(c == "cow" for split in held.values() for c in split) == 1
    assert all(c != "dog_wolf" for split in held.values() for c in split)
    assert sum(len(split) for split in held.values()) == 1 + round(0.67 * 3)  # cow's stamp + 2 of cat/car/bus

    kwargs = dict(n_train=6, n_val=3, n_test=3, silent_frac=0.0, image_size=64, clip_seconds=0.5, workers=1)
    kwargs["stamps_root"] = fake_stamps
    root = make_stamps(tmp_path / "ds", seed=3, holdout_assets=0.67, n_unseen=4, **kwargs)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["holdout_assets"] == held and meta["counts"]["val_unseen"] == meta["counts"]["test_unseen"] == 4
    views = scene_dataset.AssetViews(library, held)
    seen_stamps = {s for ms in views.seen.members.values() for s in ms}
    assert not seen_stamps & (val_stamps | test_stamps)
    whole = {c for split in held.values() for c in split if c != "cow"}  # unseen categories
    for split in ("train", "val", "test"):
        labels = {r["class"] for r in json.loads((root / f"{split}.json").read_text())} if split != "train" else set()
        objects = (
            {o["class"] for r in json.loads((root / f"{split}.json").read_text()) for o in r["objects"]}
            if split != "train"
            else set()
        )
        assert not (labels | objects) & whole
    train_labels = {row["class"] for row in csv.DictReader(open(root / "labels.csv")) if row["id"].startswith("train")}
    assert train_labels and not train_labels & whole
    for split in ("val_unseen", "test_unseen"):
        entries = json.loads((root / f"{split}.json").read_text())
        assert {e["class"] for e in entries} <= set(held[split]) and len(entries) == 4
        for e in entries:  # the distractors are seen categories; the sounding object a held-out one
            assert all(o["class"] not in whole for o in e["objects"] if not o["sounding"])
            spec = scene_dataset.SampleSpec(e["file"], split, 0, e["class"], e["class"])
            assert views.for_spec(spec).members[e["class"]] == held[split][e["class"]]
        new = (root / f"{split}_new_instance.txt").read_text().split()
        cat = (root / f"{split}_unseen_category.txt").read_text().split()
        assert sorted(new + cat) == sorted(e["file"] for e in entries)
        assert all((e["class"] == "cow") == (e["file"] in new) for e in entries)
    assert set((root / "classes.txt").read_text().split()) == set(library.categories)
    # the seen splits do not depend on n_unseen; another seed holds out other stamps
    again = make_stamps(tmp_path / "ds2", seed=3, holdout_assets=0.67, n_unseen=2, **kwargs)
    assert (again / "val.json").read_bytes() == (root / "val.json").read_bytes()
    assert any(StampLibrary(fake_stamps, max_side=64).holdout(seed=s, frac=0.67) != held for s in range(4, 10))
    with pytest.raises(UserError, match="pick one open-set protocol"):
        make_stamps(tmp_path / "x", holdout_assets=0.5, unheard_frac=0.3, **kwargs)
    code = cli.main(["data", "synth", "--out", str(tmp_path / "s"), "--n-train", "3", "--holdout-assets", "0.2"])
    err = capsys.readouterr().err
    assert code == 2 and "only `avloc data stamps`" in err and len(err.strip().splitlines()) == 1

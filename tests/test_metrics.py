"""The evaluation protocol against small hand-computed cases (numbers worked out in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from avloc.core import metrics as M
from avloc.core.errors import UserError


class Ann:
    """Stand-in for datasets.Annotation: only ``.boxes`` is read by the protocol."""

    def __init__(self, boxes):
        self.boxes = np.asarray(boxes, dtype=np.float64)


# ---------------------------------------------------------------------------------------- GT maps
def test_gt_map_vggss_single_box_rasterization():
    gt = M.gt_map_vggss([[0.1, 0.2, 0.5, 0.6]])
    # int(0.1*224)=22, int(0.2*224)=44, int(0.5*224)=112, int(0.6*224)=134 -> rows 44:134, cols 22:112
    expected = np.zeros((224, 224), np.float32)
    expected[44:134, 22:112] = 1
    np.testing.assert_array_equal(gt, expected)


def test_gt_map_vggss_union_of_boxes_and_clipping():
    gt = M.gt_map_vggss([[0.1, 0.2, 0.5, 0.6], [0.4, 0.5, 0.7, 0.9]])
    # second box: x 89:156, y 112:201; overlap x 89:112, y 112:134 = 23*22
    assert gt.max() == 1.0  # union, not a count
    assert gt.sum() == 90 * 90 + 67 * 89 - 23 * 22
    clipped = M.gt_map_vggss([[-0.1, 0.0, 1.2, 0.5]])
    assert clipped.sum() == 224 * 112 and clipped[:112].all()
    assert M.gt_map_vggss(np.zeros((0, 4))).sum() == 0


def test_gt_map_flickr_three_annotators_consensus():
    # 256-px boxes: A1 = A3 = [0,0,128,128] -> [0:112, 0:112]; A2 = [64,64,192,192] -> [56:168, 56:168]
    gt = M.gt_map_flickr([np.array([[0, 0, 128, 128]]), np.array([[64, 64, 192, 192]]), np.array([[0, 0, 128, 128]])])
    assert gt[0, 0] == 1.0  # two annotators: 2 / 2
    assert gt[100, 100] == 1.0  # three: 3 / 2 clipped to 1
    assert gt[150, 150] == 0.5  # one annotator
    assert gt[200, 200] == 0.0
    assert gt.sum() == 112 * 112 + 0.5 * (112 * 112 - 56 * 56)


def test_gt_map_flickr_coordinate_truncation():
    # int(224 * 100 / 256) = int(87.5) = 87; int(224 * 101.7) -> int(101.7)=101 -> int(88.375) = 88
    gt = M.gt_map_flickr([np.array([[100, 0, 101.7, 10]])] * 2)
    cols = np.flatnonzero(gt[0])
    assert cols.tolist() == [87]
    assert gt[:, 87].sum() == int(224 * 10 / 256)  # rows 0:8


# ---------------------------------------------------------------------------------------- binarization
def test_median_is_strictly_greater_with_ties():
    # n = 16, k = 8; sorted = [0]*6 + [1]*6 + [2]*4 -> element 8 is 1; only the four 2s are > 1
    h = np.array([0] * 6 + [1] * 6 + [2] * 4, dtype=np.float32)[np.random.default_rng(0).permutation(16)]
    b = M.binarize(h.reshape(4, 4), "median")
    np.testing.assert_array_equal(b.ravel(), h == 2)
    # no ties: values 0..15 -> threshold 8, predicted {9..15} = n/2 - 1 pixels
    assert M.binarize(np.arange(16, dtype=np.float32).reshape(4, 4), "median").sum() == 7


def test_adaptive_area_and_ties():
    gt = np.zeros((4, 4), np.float32)
    gt[0, :3] = 1  # |G| = 3 -> index 16 - 3 = 13
    h = np.array(list(range(12)) + [12, 13, 13, 14], np.float32).reshape(4, 4)
    np.testing.assert_array_equal(M.binarize(h, "adaptive", gt).ravel(), h.ravel() >= 13)  # 3 pixels
    tied = np.array(list(range(12)) + [13, 13, 13, 14], np.float32).reshape(4, 4)
    assert M.binarize(tied, "adaptive", gt).sum() == 4  # >= keeps every tie at the threshold
    # empty GT: predicted area falls back to n // 2 (SSL-Align): index 8 of 0..15 -> 8 pixels
    assert M.binarize(np.arange(16, dtype=np.float32).reshape(4, 4), "adaptive", np.zeros((4, 4))).sum() == 8
    # soft Flickr GT: |G| counts nonzero pixels
    soft = gt * 0.5
    assert M.binarize(h, "adaptive", soft).sum() == 3


def test_abs_threshold_is_inclusive_and_modes_parse():
    h = np.array([[0.49, 0.5, 0.51]], np.float32)
    assert M.binarize(h, "abs:0.5").tolist() == [[False, True, True]]
    assert str(M.parse_binarize("ABS:0.25")) == "abs:0.25"
    for bad in ("mean", "abs:", "abs:x", "abs:nan"):
        with pytest.raises(UserError, match="binarize mode"):
            M.parse_binarize(bad)


def test_batch_binarization_equals_single():
    rng = np.random.default_rng(1)
    maps = rng.random((5, 12, 12)).astype(np.float32)
    maps[2] = np.round(maps[2] * 3)  # heavy ties
    gts = (rng.random((5, 12, 12)) > 0.7).astype(np.float32)
    for mode in ("median", "adaptive", "abs:0.4"):
        batch = M.binarize_batch(maps, mode, gts)
        for i in range(5):
            np.testing.assert_array_equal(batch[i], M.binarize(maps[i], mode, gts[i]))


# ---------------------------------------------------------------------------------------- cIoU
def test_ciou_hand_cases():
    gt = np.zeros((4, 4), np.float32)
    gt[0:2, 0:2] = 1
    h = np.zeros((4, 4), np.float32)
    h[0:2, 0:3] = 1  # B: 6 pixels, 4 on G, 2 off
    assert M.ciou(h, gt, "abs:0.5") == pytest.approx(4 / 6)
    soft = gt.copy()
    soft[0, 0] = 0.5  # Flickr single-annotator pixel: inter 3.5, sum G 3.5, 2 pixels off G
    assert M.ciou(h, soft, "abs:0.5") == pytest.approx(3.5 / 5.5)
    # silent: empty G and empty B -> 0, not NaN; empty G with B -> 0
    assert M.ciou(np.zeros((4, 4)), np.zeros((4, 4)), "abs:0.5") == 0.0
    assert M.ciou(h, np.zeros((4, 4)), "abs:0.5") == 0.0


def test_ciou_resizes_bilinear_to_gt_grid():
    # an 8-column stripe map upsampled x28 with half-pixel centres crosses 0.5 between columns 111 and
    # 112 (input coordinate 3.5), so abs:0.5 recovers exactly the left-half GT box
    h = np.zeros((8, 8), np.float32)
    h[:, :4] = 1
    assert M.ciou(h, M.gt_map_vggss([[0, 0, 0.5, 1.0]]), "abs:0.5") == 1.0
    # cv2 INTER_LINEAR = torch bilinear with align_corners=False (what docs/evaluation.md states)
    torch = pytest.importorskip("torch")
    ref = torch.nn.functional.interpolate(torch.from_numpy(h)[None, None], size=(224, 224), mode="bilinear")
    np.testing.assert_allclose(M.resize_map(h), ref[0, 0].numpy(), atol=1e-5)
    assert M.resize_map(np.full((3, 5), 2.0)).shape == (224, 224)
    with pytest.raises(ValueError, match="2-D"):
        M.resize_map(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        M.resize_map(np.array([[0.0, np.nan]]))


def test_median_caps_ciou_at_twice_the_gt_fraction():
    gt = M.gt_map_vggss([[0.0, 0.0, 0.25, 0.5]])  # 56 x 112 pixels = 1/8 of the image
    area, n = gt.sum(), 224 * 224
    rng = np.random.default_rng(2)
    # the best possible map ranks G on top: B = top n/2 - 1 pixels covers G -> cIoU = |G| / (n/2 - 1)
    perfect = gt + 1e-3 * rng.random((224, 224)).astype(np.float32)
    best = M.ciou(perfect, gt, "median")
    assert best == pytest.approx(area / (n / 2 - 1))
    assert best < 0.5 and best == pytest.approx(2 * area / n, rel=1e-3)
    for _ in range(3):
        assert M.ciou(rng.random((28, 28)), gt, "median") <= area / (n / 2 - 1) + 1e-12
    # adaptive predicts |G| pixels and reaches 1
    assert M.ciou(perfect, gt, "adaptive") == 1.0


def test_summaries_ap50_mean_and_auc():
    s = M.summarize_ciou([0.12, 0.52, 0.87, 1.0])
    # success: 1 at t=0,.05,.1 (3 pts); .75 at .15...5 (8); .5 at .55...85 (7); .25 at .9...1 (3)
    # trapezoid: 0.05 * (3 + 8*.75 + 7*.5 + 3*.25 - (1 + .25)/2) = 0.63125
    assert s["auc"] == pytest.approx(0.63125)
    assert s["ciou_ap50"] == 0.75 and s["ciou_mean"] == pytest.approx(0.6275)
    assert M.summarize_ciou([1.0, 1.0])["auc"] == pytest.approx(1.0)
    assert M.summarize_ciou([0.0])["auc"] == pytest.approx(0.025)  # only t = 0 succeeds
    assert M.summarize_ciou([0.5, 0.49])["ciou_ap50"] == 0.5  # >= 0.5 counts


# ---------------------------------------------------------------------------------------- retrieval
def _unit(deg):
    r = np.deg2rad(np.asarray(deg, float))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


def test_retrieval_recall_hand_made_similarity():
    labels = ["x", "x", "y", "z"]
    audio = _unit([0, 100, 200, 300]) * 3.0  # scale must not matter (cosine)
    image = _unit([10, 185, 95, 290])
    # a2i rankings (by angle gap): a0: i0*  | a1: i2, i1*  | a2: i1, i3, i2*  | a3: i3*
    # i2a rankings:                i0: a0*  | i1: a2, a1*  | i2: a1, a0, a2*  | i3: a3*
    r = M.retrieval_recall(audio, image, labels, ks=(1, 2, 3))
    assert r == pytest.approx(
        {"a2i_r1": 0.5, "a2i_r2": 0.75, "a2i_r3": 1.0, "i2a_r1": 0.5, "i2a_r2": 0.75, "i2a_r3": 1.0}
    )
    # default ks: k larger than the set counts every query with a same-class item
    assert M.retrieval_recall(audio, image, labels)["a2i_r10"] == 1.0


def test_retrieval_same_class_other_item_is_a_hit():
    audio = _unit([0, 90])
    image = _unit([90, 0])  # each audio's nearest image is the other pair, of the same class
    assert M.retrieval_recall(audio, image, ["c", "c"], ks=(1,))["a2i_r1"] == 1.0
    assert M.retrieval_recall(audio, image, ["c", "d"], ks=(1,))["a2i_r1"] == 0.0


# ---------------------------------------------------------------------------------------- extended
def test_confidence_is_mean_of_top_quarter():
    assert M.confidence_top25(np.arange(16.0).reshape(4, 4)) == pytest.approx(13.5)  # 12..15
    assert M.confidence_top25(np.arange(10.0).reshape(2, 5)) == pytest.approx(8.0)  # top ceil(10/4)=3
    assert M.confidence_top25(np.zeros((3, 4, 4))).tolist() == [0.0, 0.0, 0.0]


def test_extended_metrics_hand_case():
    sounding = [True, True, True, True, False, False]
    cious = [0.8, 0.6, 0.3, 0.9, 0.0, 0.0]
    conf = [0.9, 0.4, 0.8, 0.2, 0.7, 0.1]
    # AP thresholds (sorted conf without the max, from the top): .8 .7 .4 .2 .1
    #   P = .5 1/3 .5 .6 .5   R = 1/3 1/3 2/3 1 1   running max P = .6 .6 .6 .6 .5
    #   AP = .6*0 + .6*(1/3) + .6*(1/3) + .6*0 = 0.4
    # F1 over every sorted conf: .1 -> 2/3, .2 -> .75, .4 -> 4/7, .7 -> 1/3, .8 -> .4, .9 -> .4
    # LocAcc: 3 of the 4 sounding samples have cIoU >= .5
    out = M.extended_metrics(cious, conf, sounding)
    assert out == pytest.approx({"ext_ap": 0.4, "ext_max_f1": 0.75, "ext_loc_acc": 0.75})


def test_extended_metrics_strided_thresholds_hand_case():
    """N = 400: AP uses every 2nd confidence from the second largest down (N // 200), F1 every 40th from the
    smallest (N // 10). By confidence rank r (0 = lowest; conf = (r + .5) / 400, fed in shuffled order):
    r 300-399 correct (100), r 200-299 silent (100), r 101-199 correct (99), r 0-100 silent (101); 199 correct.

    AP, thresholds at the even ranks 398, 396, ..., 0 (detected: rank >= r):
      r >= 300: P = 1, R = (400 - r) / 199        -> R goes 2/199 .. 100/199, area 98/199 at P 1
      200 <= r <= 298: TP 100, R = 100/199         -> no recall gained
      102 <= r <= 198: TP = 300 - r, FP 100, P = (300 - r) / (400 - r), best at r = 102: 198/298 = 99/149;
                       R goes 100/199 .. 198/199 (area 98/199 at max P 99/149), then 1 at r = 100 (1/199 more)
      r <= 100: TP 199, FP = 201 - r, P = 199 / (400 - r) < 99/149, R = 1
      AP = 98/199 + 99/199 * 99/149 = 24403 / 29651 = 0.82300...
      (every threshold: the odd r = 101 has P = 199/299 and AP = 98/199 + 99/299 = 0.8236...)
    F1 = 2TP / (2TP + FP + FN) at the ranks 0, 40, ..., 360:
      0: 398/599  40: 398/559  80: 398/519  120: 360/479  160: 280/439  200: 200/399  240: 200/359
      280: 200/319  320: 160/279  360: 80/239   -> max 398/519 = 0.76686 (every threshold: 398/498 at r = 101)
    """
    rank = np.arange(400)
    sounding = (rank >= 300) | ((rank >= 101) & (rank < 200))
    cious = np.where(sounding, 0.9, 0.0)
    conf = (rank + 0.5) / 400
    order = np.random.default_rng(0).permutation(400)
    out = M.extended_metrics(cious[order], conf[order], sounding[order])
    assert out["ext_ap"] == pytest.approx(24403 / 29651, abs=1e-12)
    assert out["ext_max_f1"] == pytest.approx(398 / 519, abs=1e-12)
    assert out["ext_loc_acc"] == 1.0


def _loop_extended(cious, conf, sounding):
    """Plain-loop restatement of the SLAVC definitions, for a parity check on larger N (the hand-worked values
    with striding are in test_extended_metrics_strided_thresholds_hand_case)."""

    def pr(thr):
        tp = fp = fn = 0
        for c, k, s in zip(cious, conf, sounding):
            if k >= thr:
                if s and c >= 0.5:
                    tp += 1
                else:
                    fp += 1
            elif s:
                fn += 1
        return (1.0 if tp + fp == 0 else tp / (tp + fp)), (1.0 if tp + fn == 0 else tp / (tp + fn))

    n = len(conf)
    thrs = sorted(conf)[:-1][:: -max(1, n // 200)]
    ps, rs = zip(*[pr(t) for t in thrs])
    ap = sum(max(ps[i:]) * (rs[i + 1] - rs[i]) for i in range(len(ps) - 1))
    f1 = [2 * p * r / (p + r) if p + r > 0 else 0.0 for p, r in (pr(t) for t in sorted(conf)[:: max(1, n // 10)])]
    return ap, max(f1)


def test_extended_metrics_parity_with_loop_definition():
    rng = np.random.default_rng(3)
    n = 450  # AP threshold stride 2, F1 stride 45
    sounding = rng.random(n) > 0.3
    cious = np.where(sounding, rng.random(n), 0.0)
    conf = rng.random(n) + 0.3 * (cious > 0.5)
    ap, f1 = _loop_extended(cious, conf, sounding)
    out = M.extended_metrics(cious, conf, sounding)
    assert out["ext_ap"] == pytest.approx(ap) and out["ext_max_f1"] == pytest.approx(f1)


# ---------------------------------------------------------------------------------------- AVSBench
def test_mask_iou_hand_cases():
    gt = np.zeros((1, 4, 4), bool)
    gt[0, 0:2, 0:3] = True
    pred = np.zeros((1, 4, 4), bool)
    pred[0, 0:2, 0:2] = True
    assert M.mask_iou(pred, gt)[0] == pytest.approx(4 / 6)
    # empty GT scores the true negatives: 12 of 16 pixels
    assert M.mask_iou(pred, np.zeros_like(gt))[0] == pytest.approx(0.75)
    assert M.mask_iou(np.zeros_like(pred), np.zeros_like(gt))[0] == pytest.approx(1.0)


def test_fscore_is_max_of_mean_curve_beta2_03():
    scores = np.array([[[0.9, 0.6], [0.3, 0.0]], [[0.05, 0.2], [0.1, 0.1]]], np.float32)
    masks = np.array([[[1, 0], [1, 0]], [[0, 1], [0, 0]]], np.float32)
    # F = 1.3 P R / (0.3 P + R).  Sample 1: t<=.3: P 2/3 R 1 -> .7222; .6<t<=.9: P 1 R .5 -> .8125
    # Sample 2: .1<t<=.2: P 1 R 1 -> 1.  Mean curve peaks on .1<t<=.2 at (.7222 + 1) / 2 = .86111
    # (the mean of per-sample maxima would be .90625: the protocol takes the max of the mean curve)
    out = M.avsbench_metrics(scores, masks, "abs:0.5")
    assert out["fscore"] == pytest.approx((1.3 * (2 / 3) / 1.2 + 1.0) / 2)
    # mIoU at abs:0.5: sample 1 B = {.9, .6} vs G -> 1/3; sample 2 B empty, G one pixel -> 0
    assert out["miou"] == pytest.approx(1 / 6, abs=1e-6)
    curves = M.fmeasure_curves(scores, masks)
    assert curves.shape == (2, 255) and curves[0, 0] == pytest.approx(1.3 * 0.5 / 1.15)  # t = 0: all pixels
    assert curves[0, -1] == 0.0  # t = 1.0: nothing predicted, NaN -> 0
    # samples with an empty mask are left out of the F-score
    assert M.fmeasure_curves(scores, np.zeros_like(masks)).shape == (0, 255)


def test_abs_sweep_reports_every_threshold_and_the_best():
    gt = M.gt_map_vggss([[0.25, 0.25, 0.75, 0.75]])
    maps = np.stack([0.3 + 0.7 * gt, 0.3 + 0.6 * gt]).astype(np.float32)  # object 1.0 / 0.9, background 0.3
    out = M.sweep_abs_thresholds(maps, np.stack([gt, gt]), masks=np.stack([gt, gt]))
    assert [r["t"] for r in out["rows"]] == list(M.ABS_SWEEP_THRESHOLDS)
    by_t = {r["t"]: r for r in out["rows"]}
    assert by_t[0.3]["ciou_mean"] == pytest.approx(gt.mean())  # everything predicted
    assert by_t[0.35]["auc"] == pytest.approx(1.0) and by_t[0.9]["ciou_ap50"] == 1.0
    assert by_t[0.95]["ciou_ap50"] == 0.5  # the 0.9 map is empty above 0.9
    assert out["select"] == "auc" and out["best"]["t"] == 0.35  # first of the equal maxima
    assert by_t[0.5]["miou"] == pytest.approx(1.0, abs=1e-6)
    for t in (0.3, 0.6, 0.95):
        assert by_t[t]["ciou_mean"] == pytest.approx(M.ciou_batch(maps, np.stack([gt, gt]), f"abs:{t}").mean())


def test_one_pass_sweep_equals_thresholding_each_t():
    rng = np.random.default_rng(4)
    maps = rng.random((6, 20, 20)).astype(np.float32)
    maps[:3] = np.round(maps[:3] * 20) / 20  # many values exactly on the thresholds (as float32)
    gts = (rng.random((6, 20, 20)) > 0.6).astype(np.float32)
    gts[1] *= 0.5  # soft Flickr-like G
    gts[4] = 0  # empty G (silent / empty mask)
    cious = M.abs_sweep_scores(maps, gts)
    ious = M.abs_sweep_scores(maps, gts, masks=True)
    for j, t in enumerate(M.ABS_SWEEP_THRESHOLDS):
        np.testing.assert_allclose(cious[j], M.ciou_from_binary(maps >= t, gts), atol=1e-12)
        np.testing.assert_allclose(ious[j], M.mask_iou(maps >= t, gts), atol=1e-12)


# ---------------------------------------------------------------------------------------- whole set
def test_evaluate_maps_sounding_and_silent():
    gt_box = [[0.0, 0.0, 0.5, 1.0]]  # left half
    left = np.zeros((8, 8), np.float32)
    left[:, :4] = 1.0
    annotations = {"a": Ann(gt_box), "b": Ann(gt_box), "c": Ann(gt_box)}
    heatmaps = {
        "a": left + 0.01 * np.arange(64, dtype=np.float32).reshape(8, 8),  # median picks ~left half
        "b": left[:, ::-1].copy(),  # right half: cIoU 0
        "c": np.full((5, 5), 0.2, np.float32),  # constant: nothing > median -> cIoU 0 (adaptive: all, 0.5)
        "s1": np.zeros((16, 16), np.float32),  # silent, empty map
        "s2": left.copy(),
    }
    out = M.evaluate_maps(heatmaps, annotations, silent=["s1", "s2"], per_sample=True)
    assert out["n"] == 3 and out["n_silent"] == 2 and out["binarize"] == "median"
    assert out["per_sample"]["a"]["ciou"] > 0.9 and out["per_sample"]["b"]["ciou"] == 0.0
    assert out["ciou_ap50"] == pytest.approx(1 / 3)
    for key in ("ext_ap", "ext_max_f1", "ext_loc_acc", "auc", "ciou_mean"):
        assert np.isfinite(out[key])
    assert out["ext_loc_acc"] == pytest.approx(1 / 3)
    assert out["gt_area_mean"] == pytest.approx(0.5) and out["median_capped"] == 0.0
    # the same numbers from the array functions
    maps = np.stack([M.resize_map(heatmaps[i]) for i in "abc"])
    gts = np.stack([M.gt_map_vggss(gt_box)] * 3)
    assert out["ciou_mean"] == pytest.approx(M.ciou_batch(maps, gts).mean())
    adaptive = M.evaluate_maps(heatmaps, annotations, silent=["s1", "s2"], binarize="adaptive")
    assert adaptive["binarize"] == "adaptive" and adaptive["ciou_ap50"] == pytest.approx(2 / 3)


def test_evaluate_maps_id_mismatch_and_bad_maps():
    annotations = {f"id{i}": Ann([[0, 0, 1, 1]]) for i in range(8)}
    maps = {f"id{i}": np.ones((4, 4), np.float32) for i in range(1, 8)}
    maps["stray"] = np.ones((4, 4), np.float32)
    with pytest.raises(UserError, match=r"missing heatmaps for 'id0' \(1\).*without an annotation 'stray'"):
        M.evaluate_maps(maps, annotations)
    many = {f"x{i}": Ann([[0, 0, 1, 1]]) for i in range(9)}
    with pytest.raises(UserError, match=r"\.\.\. \(9 in all\)"):
        M.evaluate_maps({}, many)
    maps = {f"id{i}": np.ones((4, 4), np.float32) for i in range(8)}
    maps["id3"] = np.array([[np.nan, 1.0]])
    with pytest.raises(UserError, match="heatmap 'id3'.*NaN"):
        M.evaluate_maps(maps, annotations)
    with pytest.raises(UserError, match="both sounding and silent"):
        M.evaluate_maps(maps, annotations, silent=["id1"])


def test_evaluate_maps_with_masks_and_sweep():
    gt = M.gt_map_vggss([[0.25, 0.25, 0.75, 0.75]]) > 0
    probs = np.where(gt, 0.8, 0.1).astype(np.float32)
    out = M.evaluate_maps({"m": probs}, {}, masks={"m": gt}, binarize="abs:0.5", sweep=True)
    assert out["miou"] == pytest.approx(1.0, abs=1e-6) and out["fscore"] == pytest.approx(1.0)
    assert out["ciou_ap50"] == 1.0  # the mask doubles as G without an annotation
    assert out["sweep"]["rows"][0]["t"] == 0.05 and "miou" in out["sweep"]["rows"][0]
    # float32(0.1) >= 0.1, so the background is predicted up to t = 0.1; t = 0.15 is the first exact map
    assert out["sweep"]["best"]["t"] == 0.15


def test_silent_sample_id_names():
    assert M.silent_sample_id("s7", "a3", {"a1", "a3"}) == "s7"  # avloc layout: silent image ids are new
    assert M.silent_sample_id("a1", "a3", {"a1", "a3"}) == "a1__a3"  # VGG-SS Extended reuses test images


def test_audio_swap_rule_needs_the_audio() -> None:
    """Hand-worked: two boxes overlapping in x 0.4..0.6. The old rule (peak in the heard box) counted a peak
    in the overlap for both objects; the audio-swap rule counts it for neither, and a map that ignores the
    audio (the same map whatever is heard) scores on at most one of the two."""
    from avloc.core.metrics import audio_blind_swap_hits, peak_inside, swap_hits

    left, right = np.array([0.0, 0.0, 0.6, 1.0]), np.array([0.4, 0.0, 1.0, 1.0])

    def peak_at(col: int) -> np.ndarray:  # a 10x10 map, peak in row 5 at ``col`` (centre (col + 0.5) / 10)
        m = np.zeros((10, 10), np.float32)
        m[5, col] = 1.0
        return m

    overlap = peak_at(5)  # x = 0.55: inside both boxes
    assert peak_inside(overlap, left) and peak_inside(overlap, right)
    assert swap_hits([overlap, overlap], [left, right]) == [False, False]
    # audio-driven maps: peak on the left box's own part when it is heard, on the right box's when that is
    assert swap_hits([peak_at(1), peak_at(8)], [left, right]) == [True, True]
    assert swap_hits([peak_at(8), peak_at(1)], [left, right]) == [False, False]  # swapped: both wrong
    # audio-blind: the mean of the two maps is the same map for both sounds -> at most one object scores
    assert sum(audio_blind_swap_hits([peak_at(1), peak_at(8)], [left, right])) <= 1
    saliency = peak_at(2) + 0.5 * peak_at(8)  # the model shows the same saliency whatever it hears
    assert swap_hits([saliency, saliency], [left, right]) == [True, False]
    assert audio_blind_swap_hits([saliency, saliency], [left, right]) == [True, False]
    # three objects, one box inside another's overlap region: only exclusive peaks count
    top = np.array([0.0, 0.0, 1.0, 0.3])
    m_top = np.zeros((10, 10), np.float32)
    m_top[1, 5] = 1.0  # (0.55, 0.15): in top, left and right
    assert swap_hits([peak_at(1), peak_at(8), m_top], [left, right, top]) == [True, True, False]

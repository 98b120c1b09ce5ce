"""A tiny evaluation set whose every metric is worked out by hand, and model outputs that produce it.

Six annotated test ids ``t0..t5`` (each its own class) and one silent image ``s0`` (heard with ``t1``'s audio).
Every image is a flat grey (``20 + 30 k``) and every clip a tone, so stand-in model methods can tell which
sample they were given; they return, per sample, the heatmap and retrieval features below.

Heatmaps (224 x 224, the evaluation grid: nothing is resized) and what they score, under ``median`` and
``adaptive`` alike (each map is 0 outside one region; the region is exactly the top |G| / above-median pixels):

======  ===========================  ========================================  =====  ================
id      GT box (x1, y1, x2, y2)      map = value inside a region               cIoU   confidence
======  ===========================  ========================================  =====  ================
t0      0, 0, .25, .5   (56x112)     1.8 on the box                            1      1.8 / 2 = 0.9
t1      .25, .5, .5, 1  (56x112)     1.0 on x 168:224, y 0:112 (disjoint)      0      1.0 / 2 = 0.5
t2      0, 0, .5, .5    (112x112)    0.3 on x 56:168, y 0:112 (half overlaps)  1/3    0.3
t3      .5, .5, 1, 1    (112x112)    0.8 on the box                            1      0.8
t4      .5, 0, 1, .5    (112x112)    0.6 on the box                            1      0.6
t5      0, .5, .25, 1   (56x112)     0.4 on x 168:224, y 112:224 (disjoint)    0      0.4 / 2 = 0.2
s0      (silent)                     0.7 everywhere                            0      0.7
======  ===========================  ========================================  =====  ================

t2: 6272 of the 12544 predicted pixels on the box: 6272 / (12544 + 6272) = 1/3. Confidence = mean of the top
quarter (12544 pixels): a 6272-pixel region at v gives v / 2.

- ``ciou_ap50`` = 3/6; ``ciou_mean`` = (3 + 1/3) / 6 = 5/9; success curve 1 at t = 0, 4/6 for t = .05...30,
  3/6 for t = .35..1 -> ``auc`` = .05 * (1 + 6 * 4/6 + 14 * 3/6 - (1 + 3/6) / 2) = .5625.
- Extended (N = 7, every threshold): correct = t0, t3, t4; sounding but wrong = t1, t2, t5; silent = s0.
  AP thresholds .8 .7 .6 .5 .3 .2: P = 1, 2/3, 3/4, 3/5, 1/2, 3/7; R = 1/3, 1/3, 1/2, 3/5, 3/4, 1;
  running max P = 1, 3/4, 3/4, 3/5, 1/2, 3/7 -> AP = 3/4 * 1/6 + 3/4 * 1/10 + 3/5 * 3/20 + 1/2 * 1/4 = .415.
  F1 = 2TP / (2TP + FP + FN) at .2 .3 .5 .6 .7 .8 .9: 6/10 6/10 6/10 6/10 4/9 4/8 2/7 -> max .6.
  LocAcc = 3/6.

Retrieval (``map/``): 2-D unit features, image k at IMAGE_DEG[k], audio k at AUDIO_DEG[k] (cosine falls with
the angle). Rank of each query's own pair (the only item of its class):
  a2i: audio 1 (31 deg) is nearer image 2 (40) than its own (20); audio 4 (175) nearer image 5 (100) than 4 (80);
       audio 5 (-60) has its own image (100) last -> ranks 0 1 0 0 1 5: R@1 3/6, R@5 5/6, R@10 1.
  i2a: image 4 (80): audios 3 (60), 2 (40), 1 (31), 0 (2) come before its own (175); image 5 (100): its own
       (-60) is last -> ranks 0 0 0 0 4 5: R@1 4/6, R@5 5/6, R@10 1.
``proj/``: image and audio k both at PROJ_DEG[k] (30 degrees apart): every query finds its own pair first
(R@k = 1); the two feature sets differ, so mixing them up changes the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf
import torch

SIZE = 224
SR = 16000
IDS = [f"t{k}" for k in range(6)]
SILENT = "s0"
ALL = [*IDS, SILENT]
GREY = {i: 20 + 30 * k for k, i in enumerate(ALL)}
TONE_HZ = {i: 31.25 * (16 + 16 * k) for k, i in enumerate(ALL)}  # on a 31.25 Hz bin of the linear front-end
BOXES = {
    "t0": [0.0, 0.0, 0.25, 0.5],
    "t1": [0.25, 0.5, 0.5, 1.0],
    "t2": [0.0, 0.0, 0.5, 0.5],
    "t3": [0.5, 0.5, 1.0, 1.0],
    "t4": [0.5, 0.0, 1.0, 0.5],
    "t5": [0.0, 0.5, 0.25, 1.0],
}
# (value, x1, y1, x2, y2) of the one non-zero region, in pixels of the 224 grid
REGIONS = {
    "t0": (1.8, 0, 0, 56, 112),
    "t1": (1.0, 168, 0, 224, 112),
    "t2": (0.3, 56, 0, 168, 112),
    "t3": (0.8, 112, 112, 224, 224),
    "t4": (0.6, 112, 0, 224, 112),
    "t5": (0.4, 168, 112, 224, 224),
}
IMAGE_DEG = [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
AUDIO_DEG = [2.0, 31.0, 40.0, 60.0, 175.0, -60.0]
PROJ_DEG = [0.0, 30.0, 60.0, 90.0, 120.0, 150.0]

PER_SAMPLE_CIOU = {"t0": 1.0, "t1": 0.0, "t2": 1 / 3, "t3": 1.0, "t4": 1.0, "t5": 0.0}
LOCALIZATION = {
    "ciou_ap50": 0.5,
    "ciou_mean": 5 / 9,
    "auc": 0.5625,
    "ext_ap": 0.415,
    "ext_max_f1": 0.6,
    "ext_loc_acc": 0.5,
}
MAP_RETRIEVAL = {
    "a2i_r1": 3 / 6,
    "a2i_r5": 5 / 6,
    "a2i_r10": 1.0,
    "i2a_r1": 4 / 6,
    "i2a_r5": 5 / 6,
    "i2a_r10": 1.0,
}


def heatmap(sample_id: str) -> np.ndarray:
    if sample_id == SILENT:
        return np.full((SIZE, SIZE), 0.7, np.float32)
    value, x1, y1, x2, y2 = REGIONS[sample_id]
    out = np.zeros((SIZE, SIZE), np.float32)
    out[y1:y2, x1:x2] = value
    return out


def write_dataset(root: Path) -> Path:
    """The layout of docs/architecture.md: frames, audio, test.txt, test.json, test_plus_silent.csv."""
    (root / "frames").mkdir(parents=True)
    (root / "audio").mkdir()
    t = np.arange(SR) / SR
    for i in ALL:
        cv2.imwrite(str(root / "frames" / f"{i}.jpg"), np.full((SIZE, SIZE, 3), GREY[i], np.uint8))
        sf.write(root / "audio" / f"{i}.wav", 0.5 * np.sin(2 * np.pi * TONE_HZ[i] * t), SR, subtype="PCM_16")
    (root / "test.txt").write_text("\n".join(IDS) + "\n")
    (root / "test.json").write_text(json.dumps([{"file": i, "class": f"class_{i}", "bbox": [BOXES[i]]} for i in IDS]))
    rows = ["video,audio,non-sounding", *(f"{i},{i},0" for i in IDS), f"{SILENT},t1,1"]
    (root / "test_plus_silent.csv").write_text("\n".join(rows) + "\n")
    return root


def _unit(degrees: list[float]) -> torch.Tensor:
    rad = torch.deg2rad(torch.tensor(degrees, dtype=torch.float32))
    return torch.stack([torch.cos(rad), torch.sin(rad)], dim=1)


class Oracle:
    """Tells samples apart from the evaluator's own inputs: the image's grey level (through the checkpoint's
    normalization) and the nearest of the clips' spectrograms (through its front-end)."""

    def __init__(self, root: Path, frontend_config, image_config) -> None:
        from avloc.core.audio import FrontEnd, frame_window, load_audio

        self.mean, self.std = image_config.mean[0], image_config.std[0]
        frontend = FrontEnd(frontend_config).eval()
        waves = [frame_window(load_audio(root / "audio" / f"{i}.wav"), frontend_config) for i in ALL]
        with torch.no_grad():
            self.specs = frontend(torch.from_numpy(np.stack(waves)))

    def image_ids(self, images: torch.Tensor) -> list[int]:
        grey = (images[:, 0].float().mean(dim=(1, 2)) * self.std + self.mean) * 255
        return [int(round((float(g) - 20) / 30)) for g in grey]

    def audio_ids(self, specs: torch.Tensor) -> list[int]:
        dist = ((specs[:, None].float() - self.specs[None]) ** 2).flatten(2).mean(2)
        return dist.argmin(1).tolist()

    def heatmaps(self, ids: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([heatmap(ALL[k]) for k in ids]))

    @staticmethod
    def image_features(ids: list[int]) -> torch.Tensor:
        return _unit([IMAGE_DEG[k] if k < len(IMAGE_DEG) else 0.0 for k in ids])

    @staticmethod
    def audio_features(ids: list[int]) -> torch.Tensor:
        return _unit([AUDIO_DEG[k] if k < len(AUDIO_DEG) else 0.0 for k in ids])

    @staticmethod
    def projections(ids: list[int]) -> torch.Tensor:
        return _unit([PROJ_DEG[k] if k < len(PROJ_DEG) else 0.0 for k in ids])


def patch_ssl_align(monkeypatch, oracle: Oracle) -> None:
    """SSLAlign's evaluation methods -> the oracle's outputs (a [B,1,1,1] 'visual map' carries the image id)."""
    from avloc.core.ssl_align import SSLAlign

    def encode_image(self, images):
        return torch.tensor(oracle.image_ids(images), dtype=torch.float32).view(-1, 1, 1, 1)

    def ids_of(vmap):
        return [int(v) for v in vmap.flatten().tolist()]

    def encode_audio(self, specs):
        return oracle.audio_features(oracle.audio_ids(specs))

    def project_audio(self, audio):  # back from the audio angle to the id, then to its projection
        degrees = torch.rad2deg(torch.atan2(audio[:, 1], audio[:, 0])).tolist()
        ids = [int(np.argmin([abs(d - a) for a in AUDIO_DEG])) for d in degrees]
        return oracle.projections(ids)

    monkeypatch.setattr(SSLAlign, "encode_image", encode_image)
    monkeypatch.setattr(SSLAlign, "encode_audio", encode_audio)
    monkeypatch.setattr(SSLAlign, "cosine_map", lambda self, vmap, audio: oracle.heatmaps(ids_of(vmap)))
    monkeypatch.setattr(SSLAlign, "map_embedding", lambda self, vmap: oracle.image_features(ids_of(vmap)))
    monkeypatch.setattr(SSLAlign, "project_image", lambda self, vmap: oracle.projections(ids_of(vmap)))
    monkeypatch.setattr(SSLAlign, "project_audio", project_audio)


def patch_acl(monkeypatch, oracle: Oracle) -> None:
    """ACL.evaluation_outputs -> (heatmaps, image features, audio features) of the oracle."""
    from avloc.core.acl.model import ACL

    def evaluation_outputs(self, image, spec):
        image_ids = oracle.image_ids(image)
        return (
            oracle.heatmaps(image_ids),
            oracle.image_features(image_ids),
            oracle.audio_features(oracle.audio_ids(spec)),
        )

    monkeypatch.setattr(ACL, "evaluation_outputs", evaluation_outputs)


def assert_known_metrics(metrics: dict, prefixes: tuple[str, ...] = ("map",)) -> None:
    import pytest

    assert metrics["n"] == 6 and metrics["n_silent"] == 1
    for mode in ("median", "adaptive"):
        for key, value in LOCALIZATION.items():
            assert metrics[f"{mode}/{key}"] == pytest.approx(value, abs=1e-9), (mode, key)
        assert metrics[f"{mode}/per_sample_ciou"] == pytest.approx(PER_SAMPLE_CIOU, abs=1e-9), mode
    for key, value in MAP_RETRIEVAL.items():
        assert metrics[f"map/{key}"] == pytest.approx(value), key
    if "proj" in prefixes:
        for key in MAP_RETRIEVAL:
            assert metrics[f"proj/{key}"] == 1.0, key
    else:
        assert not any(k.startswith("proj/") for k in metrics)

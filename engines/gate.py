"""Silence gate: calibrate the threshold below which a heatmap says "the sound's source is not in view".

The statistic is the engine's own ``confidence`` output (SSL-Align: mean of the top 25 % cells of the cosine
map, ``outputs.confidence`` in the manifest), computed by an engine on pairs of a dataset's val split:

- positives: each val image heard with its own audio (the sounding object is in view);
- negatives: each val image heard with the audio of another val sample whose sounding class is none of the
  image's objects (``val.json`` ``objects``, else its ``class``, else ``labels.csv``): a silent / off-screen
  pair, as the Extended protocol's silent rows. The other sample is drawn with a seeded generator.

The threshold is the max-F1 point of the precision/recall curve of detecting positives by
``confidence >= threshold`` (:func:`avloc.core.metrics.max_f1_threshold`). ``avloc export --gate-data DATA``
stores it as ``manifest["gate"]``; the inference worker then marks heatmaps below it ``not_visible``.

Only full windows of real audio are calibrated on. A live window that is mostly the start-up silence (less than
``stream.serve.batching.WARMING_UP_SHARE`` captured audio) is never judged by this threshold: the inference worker
marks it ``warming_up`` whatever its confidence (docs/engines.md#silence-gate, tests/test_gate.py).

Lives in ``avloc.engines`` (not ``avloc.train``): export calls it, and engines must not import training code.
Frames are preprocessed as the live worker does (:func:`avloc.engines.base.preprocess_frame` on BGR) and the
audio window is the dataset's window for the frame (:meth:`avloc.core.datasets.AVDataset.spectrogram`), so
the numbers are the ones the worker sees on these scenes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avloc.core.errors import UserError

log = logging.getLogger(__name__)

GATE_SPLIT = "val"
GATE_SEED = 0
STATISTIC = "confidence"  # the engine output the gate thresholds (manifest outputs.confidence)


@dataclass(frozen=True)
class GatePairs:
    """(image id, audio id) pairs of one split: positives (own audio) and negatives (off-screen audio)."""

    positives: list[tuple[str, str]]
    negatives: list[tuple[str, str]]


@dataclass(frozen=True)
class GateCalibration:
    threshold: float
    precision: float
    recall: float
    f1: float
    n_pos: int
    n_neg: int

    def val_dict(self) -> dict[str, float | int]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
        }


# ---------------------------------------------------------------------------------------------- threshold


def choose_threshold(
    positives: Sequence[float] | np.ndarray, negatives: Sequence[float] | np.ndarray
) -> GateCalibration:
    """Max-F1 threshold of "visible" (positives) vs silent (negatives) confidences; a heatmap is visible when
    ``confidence >= threshold``."""
    pos = np.asarray(positives, dtype=np.float64).reshape(-1)
    neg = np.asarray(negatives, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise UserError(f"gate calibration needs positive and negative pairs, got {pos.size} and {neg.size}")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise UserError("gate calibration: the engine returned NaN or infinite confidences")
    from avloc.core.metrics import max_f1_threshold

    best = max_f1_threshold(np.concatenate([pos, neg]), np.arange(pos.size + neg.size) < pos.size)
    return GateCalibration(
        best["threshold"], best["precision"], best["recall"], best["f1"], int(pos.size), int(neg.size)
    )


# ---------------------------------------------------------------------------------------------- pairs


def _classes(dataset: Any, sample_id: str) -> tuple[str | None, set[str]]:
    """(sounding class, classes of every object in the image) of one sample."""
    ann = dataset.annotation(sample_id)
    sounding = (ann.cls if ann is not None and ann.cls else None) or dataset.label(sample_id)
    in_view = {o.cls for o in ann.objects} if ann is not None else set()
    if sounding is not None:
        in_view.add(sounding)
    return sounding, in_view


def gate_pairs(dataset: Any, seed: int = GATE_SEED) -> GatePairs:
    """Positive and negative pairs of ``dataset`` (an :class:`~avloc.core.datasets.AVDataset`); see the module
    doc. An image for which no other sample's class is absent gets no negative."""
    ids = list(dataset.ids)
    if len(ids) < 2:
        raise UserError(f"{dataset.root}/{dataset.split}.txt: {len(ids)} id(s); the gate needs at least 2")
    info = {i: _classes(dataset, i) for i in ids}
    unlabeled = [i for i in ids if info[i][0] is None]
    if unlabeled:
        raise UserError(
            f"{dataset.root}: no class for {dataset.split} id {unlabeled[0]!r} ({len(unlabeled)} in all) in "
            f"{dataset.split}.json or labels.csv; the gate needs each sample's sounding class"
        )
    rng = np.random.default_rng(seed)
    negatives = []
    for i in ids:
        others = [j for j in ids if j != i and info[j][0] not in info[i][1]]
        if others:
            negatives.append((i, others[int(rng.integers(len(others)))]))
    if not negatives:
        raise UserError(
            f"{dataset.root}/{dataset.split}.json: every image holds every sounding class of the split; "
            "no off-screen pairs to calibrate the gate on"
        )
    return GatePairs([(i, i) for i in ids], negatives)


# ---------------------------------------------------------------------------------------------- confidences


def pair_confidences(engine: Any, dataset: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 16) -> np.ndarray:
    """The engine's ``confidence`` for each (image id, audio id) pair, float32 ``[len(pairs)]``.

    Each audio is embedded once (a negative reuses another sample's audio); images go through the live
    worker's preprocessing."""
    from avloc.engines.base import preprocess_frame

    if batch_size < 1:
        raise UserError(f"batch_size {batch_size}: expected >= 1")
    audio_ids = sorted({a for _, a in pairs})
    embeddings: dict[str, np.ndarray] = {}
    for start in range(0, len(audio_ids), batch_size):
        chunk = audio_ids[start : start + batch_size]
        specs = np.stack([dataset.spectrogram(a) for a in chunk]).astype(np.float32, copy=False)
        for a, emb in zip(chunk, np.asarray(engine.embed_audio(specs), dtype=np.float32)):
            embeddings[a] = emb
    out = np.empty(len(pairs), np.float32)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        images = np.stack(
            [
                # the worker receives BGR frames from the capture side
                preprocess_frame(cv2.cvtColor(dataset.image(i), cv2.COLOR_RGB2BGR), engine.manifest)
                for i, _ in chunk
            ]
        )
        embs = np.stack([embeddings[a] for _, a in chunk])
        _, conf = engine.localize(images, embs)
        out[start : start + len(chunk)] = np.asarray(conf, dtype=np.float32).reshape(-1)
    return out


def gate_dataset(data: str | Path, split: str, manifest: dict[str, Any]) -> Any:
    """``split`` of the dataset at ``data`` read with the engine's front-end (its audio window and spectrogram)."""
    from avloc.core.audio import FrontEndConfig
    from avloc.core.datasets import AVDataset

    return AVDataset(data, split, FrontEndConfig.from_dict(manifest["frontend"]))


def calibrate_engine(
    engine: Any, data: str | Path, split: str = GATE_SPLIT, seed: int = GATE_SEED, batch_size: int = 16
) -> GateCalibration:
    """Max-F1 gate of a loaded engine (any backend) on ``split`` of the dataset at ``data``."""
    dataset = gate_dataset(data, split, engine.manifest)
    pairs = gate_pairs(dataset, seed)
    pos = pair_confidences(engine, dataset, pairs.positives, batch_size)
    neg = pair_confidences(engine, dataset, pairs.negatives, batch_size)
    return choose_threshold(pos, neg)


class GraphRunner:
    """An engine-like view of a checkpoint's export graphs in PyTorch (what the ONNX graphs compute, held to
    1e-3 by export's parity check): ``manifest`` (``image``, ``frontend``), ``embed_audio``, ``localize``."""

    def __init__(self, loaded: Any, image_size: int | None = None) -> None:
        from avloc.engines.export import build_graphs, image_manifest

        size = int(image_size or loaded.image.size)
        self.graphs = build_graphs(loaded, size)
        self.manifest = {"image": image_manifest(loaded.image, size), "frontend": loaded.frontend.to_dict()}

    def embed_audio(self, spec: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.graphs.audio(torch.from_numpy(spec)).numpy()

    def localize(self, image: np.ndarray, audio_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            heat, conf = self.graphs.visual(torch.from_numpy(image), torch.from_numpy(audio_emb))
        return heat.numpy(), conf.numpy()


def calibrate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    image_size: int | None = None,
    split: str = GATE_SPLIT,
    seed: int = GATE_SEED,
    batch_size: int = 16,
) -> GateCalibration:
    """Max-F1 gate of a checkpoint (SSL-Align, or any method with an engine exporter) run in PyTorch through
    the graphs ``avloc export`` exports, at ``image_size`` (default: the trained size)."""
    from avloc.core.checkpoint import load_model

    return calibrate_engine(
        GraphRunner(load_model(checkpoint, device="cpu"), image_size), data, split, seed, batch_size
    )


# ---------------------------------------------------------------------------------------------- manifest


def check_gate_data(data: str | Path, split: str = GATE_SPLIT) -> Path:
    """``data`` as a Path, or a one-line UserError when it has no ``<split>.txt`` (checked before a long export)."""
    root = Path(data)
    if not (root / f"{split}.txt").is_file():
        raise UserError(f"--gate-data {root}: no {split}.txt; expected a dataset root (avloc data stamps|synth)")
    return root


def manifest_gate(
    calibration: GateCalibration,
    data: str | Path,
    split: str = GATE_SPLIT,
    seed: int = GATE_SEED,
    backend: str = "onnxruntime",
) -> dict[str, Any]:
    """The manifest's ``gate`` entry."""
    return {
        "threshold": calibration.threshold,
        "statistic": STATISTIC,
        "rule": f"not_visible when {STATISTIC} < threshold",
        "val": calibration.val_dict(),
        "data": str(data),
        "split": split,
        "seed": seed,
        "backend": backend,
        "pairs": "positives: each image with its own audio; negatives: each image with another sample's audio "
        "whose class is none of the image's objects (max-F1 threshold)",
    }


def gate_threshold(manifest: dict[str, Any]) -> float | None:
    """The gate threshold of an engine manifest; None when it has no gate (engines exported without one)."""
    gate = manifest.get("gate")
    if gate is None:
        return None
    threshold = gate.get("threshold") if isinstance(gate, dict) else None
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise UserError(
            f"engine manifest: gate.threshold {threshold!r} is not a finite number; re-export the "
            "engine with --gate-data"
        )
    if isinstance(gate, dict) and gate.get("statistic", STATISTIC) != STATISTIC:
        raise UserError(f"engine manifest: gate.statistic {gate.get('statistic')!r}, this avloc gates on {STATISTIC!r}")
    return float(threshold)

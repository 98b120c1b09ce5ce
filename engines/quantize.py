"""Optional int8 engines: ONNX Runtime static quantization, each graph kept only if the heatmaps agree.

``avloc export --int8 --calibration DATASET_ROOT`` calibrates ``audio.onnx`` on real spectrograms and
``visual.onnx`` on real frames paired with their own audio embeddings, quantizes the convolutions (QDQ,
per-channel int8 weights, uint8 activations; ``reduce_range`` because x86 AVX2 without VNNI saturates
full-range U8S8) and compares with fp32 on held-out samples where it matters, the heatmap: per-map Pearson
correlation and peak-cell agreement (for the audio graph: heatmaps from the fp32 visual graph fed int8 vs
fp32 embeddings), plus speed. Pooling, the cosine map and top-k stay float. A graph whose agreement is below
:data:`MIN_CORRELATION` / :data:`MIN_PEAK_AGREEMENT` is not shipped; the manifest records why.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from avloc.core.errors import UserError
from avloc.engines.base import preprocess_frame, sha256_file

log = logging.getLogger(__name__)
MIN_CORRELATION = 0.98  # mean per-map Pearson r of int8 vs fp32 heatmaps
MIN_PEAK_AGREEMENT = 0.9  # fraction of maps whose int8 peak is within one cell of the fp32 peak
CALIBRATION_FRAMES = 48
HELD_OUT_FRAMES = 48


def calibration_samples(
    root: str | Path, manifest: dict[str, Any], audio_graph: torch.nn.Module, limit: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image [3,H,W], spectrogram [1,F,T], audio embedding [D]) from a dataset root's val/test/train ids."""
    from avloc.core.audio import FrontEndConfig
    from avloc.core.datasets import AVDataset

    frontend = FrontEndConfig.from_dict(manifest["frontend"])
    ids: list[tuple[AVDataset, str]] = []
    for split in ("val", "test", "train"):
        if not (Path(root) / f"{split}.txt").is_file():
            continue
        dataset = AVDataset(root, split, frontend)
        ids.extend((dataset, i) for i in dataset.ids)
    if not ids:
        raise UserError(
            f"--calibration {root}: expected a dataset root with val.txt/test.txt/train.txt, "
            "frames/ and audio/ (avloc data stamps|synth layout)"
        )
    # Spread the picks over the whole list so classes/scenes vary.
    picks = [ids[int(j)] for j in np.linspace(0, len(ids) - 1, min(limit, len(ids)))]
    samples = []
    for dataset, id in picks:
        image = preprocess_frame(cv2.cvtColor(dataset.image(id), cv2.COLOR_RGB2BGR), manifest)
        spec = dataset.spectrogram(id).astype(np.float32)
        with torch.inference_mode():
            emb = audio_graph(torch.from_numpy(spec[None]))[0].numpy()
        samples.append((image, spec, emb))
    return samples


def _agreement(fp32: np.ndarray, int8: np.ndarray) -> dict[str, float]:
    a, b = fp32.reshape(len(fp32), -1), int8.reshape(len(int8), -1)
    ac, bc = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    corr = (ac * bc).sum(1) / np.maximum(np.linalg.norm(ac, axis=1) * np.linalg.norm(bc, axis=1), 1e-12)
    w = fp32.shape[-1]
    pa, pb = a.argmax(1), b.argmax(1)
    chebyshev = np.maximum(np.abs(pa // w - pb // w), np.abs(pa % w - pb % w))
    return {
        "mean_correlation": float(corr.mean()),
        "min_correlation": float(corr.min()),
        "peak_same_cell": float((chebyshev == 0).mean()),
        "peak_within_one_cell": float((chebyshev <= 1).mean()),
        "max_abs_diff": float(np.abs(a - b).max()),
        "mean_abs_diff": float(np.abs(a - b).mean()),
    }


def _median_ms(session: Any, feeds: dict[str, np.ndarray], iters: int = 10) -> float:
    session.run(None, feeds)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _quantize(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    prepared = dst.with_name(dst.stem + ".prep.tmp.onnx")
    root_logger = logging.getLogger()
    root_level = root_logger.level
    root_logger.setLevel(max(root_level, logging.WARNING))  # the quantizer logs every node at INFO on root
    try:
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        root_logger.setLevel(root_level)
        prepared.unlink(missing_ok=True)
        for extra in dst.parent.glob("augmented_model*.onnx"):  # calibration leftovers
            extra.unlink()


def quantize_graphs(
    engine_dir: Path, manifest: dict[str, Any], graphs: Any, calibration: str | Path | None
) -> dict[str, dict[str, Any]]:
    """Write ``audio.int8.onnx`` and ``visual.int8.onnx``; returns the entries (``rejected``: not kept)."""
    import onnxruntime as ort

    from avloc.engines.onnxruntime_backend import session_options

    if calibration is None:
        raise UserError("--int8 needs --calibration DATASET_ROOT (real frames + audio to calibrate on)")
    samples = calibration_samples(calibration, manifest, graphs.audio, CALIBRATION_FRAMES + HELD_OUT_FRAMES)
    if len(samples) < 8:
        raise UserError(f"--calibration {calibration}: only {len(samples)} samples, need at least 8")
    split = len(samples) // 2 if len(samples) < CALIBRATION_FRAMES + HELD_OUT_FRAMES else CALIBRATION_FRAMES
    calib, held_out = samples[:split], samples[split:]
    calib_feeds = {
        "audio": [{"spectrogram": spec[None]} for _, spec, _ in calib],
        "visual": [{"image": image[None], "audio_embedding": emb[None]} for image, _, emb in calib],
    }
    images = np.stack([s[0] for s in held_out])
    specs = np.stack([s[1] for s in held_out])
    embs = np.stack([s[2] for s in held_out])

    options = session_options(os.cpu_count())

    def open_session(path: Path) -> Any:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    fp32 = {g: open_session(engine_dir / manifest["graphs"][g]["file"]) for g in ("audio", "visual")}
    reference = fp32["visual"].run(None, {"image": images, "audio_embedding": embs})[0]
    entries = {}
    for graph in ("audio", "visual"):
        out = engine_dir / f"{graph}.int8.onnx"
        _quantize(engine_dir / manifest["graphs"][graph]["file"], out, calib_feeds[graph])
        int8 = open_session(out)
        if graph == "audio":
            emb8 = int8.run(None, {"spectrogram": specs})[0]
            maps = fp32["visual"].run(None, {"image": images, "audio_embedding": emb8})[0]
            cosine = (emb8 * embs).sum(1) / np.maximum(
                np.linalg.norm(emb8, axis=1) * np.linalg.norm(embs, axis=1), 1e-12
            )
            extra = {
                "embedding_cosine_mean": float(cosine.mean()),
                "embedding_cosine_min": float(cosine.min()),
            }
            feeds = {"spectrogram": specs[:1]}
        else:
            maps = int8.run(None, {"image": images, "audio_embedding": embs})[0]
            extra = {}
            feeds = {"image": images[:1], "audio_embedding": embs[:1]}
        agreement = {**_agreement(reference, maps), **extra}
        speed = {"fp32_ms_batch1": _median_ms(fp32[graph], feeds), "int8_ms_batch1": _median_ms(int8, feeds)}
        speed["threads"] = os.cpu_count()
        entry: dict[str, Any] = {
            "file": out.name,
            "sha256": sha256_file(out),
            "calibration": str(calibration),
            "calibration_samples": len(calib),
            "held_out_samples": len(held_out),
            "heatmap_agreement_vs_fp32": agreement,
            "speed": speed,
            "method": "onnxruntime quantize_static QDQ, Conv only, per-channel s8 weights (reduce_range), "
            "u8 activations, MinMax calibration",
        }
        log.info("int8 %s engine: %s; %s", graph, agreement, speed)
        if agreement["mean_correlation"] < MIN_CORRELATION or agreement["peak_within_one_cell"] < MIN_PEAK_AGREEMENT:
            log.warning(
                "int8 %s engine rejected: heatmap agreement below r>=%.2f / peak within one cell>=%.2f",
                graph,
                MIN_CORRELATION,
                MIN_PEAK_AGREEMENT,
            )
            del int8
            out.unlink()
            entry.update(file=None, sha256=None, rejected=True)
        entries[graph] = entry
    return entries

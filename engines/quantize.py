"""Optional int8 engines: ONNX Runtime static quantization, each graph kept only if the heatmaps agree.

``avloc export --int8 --calibration DATASET_ROOT`` calibrates ``audio.onnx`` on real spectrograms and
``visual.onnx`` on real frames paired with their own audio embeddings, quantizes the convolutions (QDQ,
per-channel int8 weights, uint8 activations; ``reduce_range`` because x86 AVX2 without VNNI saturates
full-range U8S8) and compares with fp32 on held-out samples where it matters, the heatmap: per-map Pearson
correlation and peak-cell agreement (for the audio graph: heatmaps from the fp32 visual graph fed int8 vs
fp32 embeddings), plus speed. Pooling, the cosine map and top-k stay float. A graph whose agreement is below
:data:`MIN_CORRELATION` / :data:`MIN_PEAK_AGREEMENT` is not shipped; the manifest records why.

Two things make a trained network's graphs quantize well (measured on the open-set recipe's EfficientNet-Lite0 +
YAMNet checkpoint, docs/engines.md "int8"):

- **The activation after a convolution is quantized with its own range** (``Relu``/``Clip`` are quantized
  with the convolutions, so ONNX Runtime folds them into the convolution's output): with convolutions alone,
  the output of each convolution was quantized over its pre-activation range (e.g. [-90, 97] ahead of a
  ReLU6), leaving ~8 of 256 levels for the [0, 6] that the next layer sees.
- **Activation equalization** (:func:`equalize_activations`): ahead of quantization, each channel of an
  activation between two convolutions joined by ``Relu`` (and zero padding) is scaled towards the range of the
  tensor's widest channel, the producing convolution's output channel multiplied and the consuming
  convolution's input channel divided by the same factor. ReLU is positively homogeneous, so the float graph
  computes the same function; per-tensor activation quantization then no longer rounds the narrow channels
  to zero. In YAMNet's last layers the median channel spans 1/25 to 1/340 of its tensor's range.
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
# Ops quantized: the convolutions and the activations that follow them (folded into the convolutions' outputs)
QUANTIZED_OPS = ["Conv", "Relu", "Clip"]
# Equalization scales a channel up by at most this much (a channel silent on the calibration data is not scaled
# past it: should it fire on other data, its values stay bounded by the tensor's range / EQUALIZE_CAP)
EQUALIZE_CAP = 1000.0
QUANTIZATION_METHOD = (
    "onnxruntime quantize_static QDQ, Conv with its Relu/Clip, per-channel s8 weights (reduce_range), "
    "u8 activations, MinMax calibration, activation equalization across Conv-Relu-Conv"
)
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
    # near ties of the fp32 maps: the best cell more than one cell from the peak within 2 % of the map's range
    # of it; any perturbation that large may move such a map's peak (why the peak test fails before r does)
    cells = np.arange(a.shape[1])
    far = np.maximum(np.abs(cells[None] // w - pa[:, None] // w), np.abs(cells[None] % w - pa[:, None] % w)) > 1
    runner_up = np.where(far, a, -np.inf).max(1)
    span = np.maximum(a.max(1) - a.min(1), 1e-12)
    return {
        "fp32_near_ties": float(((a.max(1) - runner_up) < 0.02 * span).mean()),
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


def _zero_pad(node: Any, constants: dict[str, np.ndarray]) -> bool:
    """A ``Pad`` that pads with zeros (constant mode, no or a zero pad value): scaling commutes with it."""
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    if mode != b"constant":
        return False
    if len(node.input) > 2 and node.input[2]:
        value = constants.get(node.input[2])
        return value is not None and not np.any(value)
    return True


def equalization_pairs(model: Any) -> list[tuple[Any, Any, str]]:
    """(producer Conv, consumer Conv, consumer's input tensor) joined only by ``Relu`` and zero ``Pad`` nodes,
    at least one ``Relu``, every tensor between them read by the next node alone (so a scale applied to the
    producer's output channels reaches nothing but the consumer), weights and the producer's bias constant."""
    graph = model.graph
    from onnx import numpy_helper

    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    pairs = []
    for consumer in graph.node:
        if consumer.op_type != "Conv" or consumer.input[1] not in constants:
            continue
        tensor, relu = consumer.input[0], False
        between = [tensor]
        while tensor in producer and (
            producer[tensor].op_type == "Relu"
            or (producer[tensor].op_type == "Pad" and _zero_pad(producer[tensor], constants))
        ):
            relu = relu or producer[tensor].op_type == "Relu"
            tensor = producer[tensor].input[0]
            between.append(tensor)
        source = producer.get(tensor)
        if (
            not relu
            or source is None
            or source.op_type != "Conv"
            or source.input[1] not in constants
            or len(source.input) < 3
            or source.input[2] not in constants
            or any(readers.get(t, 0) != 1 or t in outputs for t in between)
        ):
            continue
        pairs.append((source, consumer, consumer.input[0]))
    return pairs


def equalize_activations(model: Any, feeds: list[dict[str, np.ndarray]], cap: float = EQUALIZE_CAP) -> int:
    """Scale each channel of the activations between the :func:`equalization_pairs` of ``model`` (in place)
    so that per-tensor activation quantization resolves every channel; the float function is unchanged.

    For channel ``i`` with calibration range ``a_i`` (max |x| over ``feeds``) and tensor range ``A``: a
    depthwise consumer takes ``s_i = A / a_i`` (each of its channels has its own weight scale, so the factor
    costs its weights nothing); a dense consumer, whose weight rows are quantized across input channels,
    takes ``s_i ~ sqrt(c_i / a_i)`` with ``c_i`` the column's share of its rows' ranges (cross-layer
    equalization, Nagel et al. 2019, on activation ranges). The producer's weights and bias of channel ``i``
    are multiplied by ``s_i`` and the consumer's input channel ``i`` divided by it. Returns the pairs scaled."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    pairs = equalization_pairs(model)
    if not pairs:
        return 0
    probe = type(model)()
    probe.CopyFrom(model)
    names = [tensor for _, _, tensor in pairs]
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    ranges: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            channel = np.abs(value).max(axis=tuple(d for d in range(value.ndim) if d != 1))
            ranges[name] = np.maximum(ranges.get(name, 0.0), channel)
    del session, probe
    initializers = {i.name: i for i in model.graph.initializer}

    def weights(name: str) -> np.ndarray:
        return numpy_helper.to_array(initializers[name]).astype(np.float64)

    def store(name: str, value: np.ndarray) -> None:
        initializers[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    scaled = 0
    for source, consumer, tensor in pairs:
        top = float(ranges[tensor].max())
        if top <= 0.0:
            continue
        a = np.maximum(ranges[tensor].astype(np.float64), top / cap)
        w = weights(consumer.input[1])  # [out, in / group, kh, kw]
        group = next((at.i for at in consumer.attribute if at.name == "group"), 1)
        if group == w.shape[0] == len(a) and w.shape[1] == 1:
            scale = top / a
            w = w * (1.0 / scale).reshape(-1, 1, 1, 1)
        elif group == 1 and w.shape[1] == len(a):
            columns = np.abs(w).max(axis=(2, 3))  # [out, in]
            share = (columns / np.maximum(columns.max(axis=1, keepdims=True), 1e-30)).max(axis=0)
            scale = np.sqrt(np.maximum(share, 1.0 / cap) / a)
            scale *= top / float((a * scale).max())  # the tensor's range stays what it was
            w = w * (1.0 / scale).reshape(1, -1, 1, 1)
        else:
            continue  # grouped convolutions other than depthwise: left as they are
        store(consumer.input[1], w)
        pw = weights(source.input[1])
        store(source.input[1], pw * scale.reshape(-1, *[1] * (pw.ndim - 1)))
        store(source.input[2], weights(source.input[2]) * scale)
        scaled += 1
    return scaled


def _quantize(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """``src`` (fp32 ONNX) -> ``dst`` (QDQ int8) calibrated on ``feeds``; returns what was done, for the manifest."""
    import onnx
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
        model = onnx.load(str(prepared))
        equalized = equalize_activations(model, feeds)
        onnx.save(model, str(prepared))
        del model
        quantize_static(
            str(prepared),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS,
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
    return {"equalized_pairs": equalized}


def quantize_graphs(
    engine_dir: Path,
    manifest: dict[str, Any],
    graphs: Any,
    calibration: str | Path | None,
    keep_rejected: bool = False,
) -> dict[str, dict[str, Any]]:
    """Write ``audio.int8.onnx`` and ``visual.int8.onnx``; returns the entries (``rejected``: not kept).

    ``keep_rejected``: a rejected graph's file stays (``scripts/int8_accuracy.py --requantize`` measures what the
    gate turned down; the export never ships one)."""
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
        done = _quantize(engine_dir / manifest["graphs"][graph]["file"], out, calib_feeds[graph]) or {}
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
            "method": QUANTIZATION_METHOD,
            **done,
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
            if keep_rejected:
                entry.update(rejected=True)
            else:
                out.unlink()
                entry.update(file=None, sha256=None, rejected=True)
        entries[graph] = entry
    return entries

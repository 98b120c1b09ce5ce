"""``avloc export``: checkpoint -> engine directory (audio.onnx, visual.onnx, manifest.json, model.pt).

Export is dispatched by the checkpoint's ``method``: a builder turns the loaded model into the two
export-friendly modules (:class:`EngineGraphs`) that both ONNX export and the torch backend run, so the
torch backend computes exactly what the ONNX graphs compute. ACL registers its own builder with
:func:`register_graph_builder`; everything else (export, checks, manifest, backends) is shared.

The directory is written as ``ENGINE_DIR.tmp`` and renamed at the end, after ``onnx.checker`` and an
ONNX Runtime vs PyTorch parity run, so a failed export never leaves a half-written engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import io
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from avloc.core.checkpoint import ImageConfig, LoadedModel, load_model, save_checkpoint
from avloc.core.errors import UserError
from avloc.engines.base import ENGINE_FORMAT, ENGINE_FORMAT_VERSION, MANIFEST_NAME, sha256_file

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
TOP_FRACTION = 0.25  # SLAVC confidence: mean of the top 25 % of the heatmap
PARITY_FAIL = 1e-3  # export refuses graphs this far from PyTorch (fp32); the tests hold them to 1e-4
AUDIO_FILE, VISUAL_FILE, MODEL_FILE = "audio.onnx", "visual.onnx", "model.pt"
OBJECTNESS_FILE = "objectness.onnx"  # optional third graph (--ogl)


# ---------------------------------------------------------------------------------------------- graphs


@dataclass
class EngineGraphs:
    """The two modules of an engine and what their outputs mean (goes into the manifest)."""

    audio: nn.Module  # spectrogram [B,1,F,T] -> embedding [B,D]
    visual: nn.Module  # image [B,3,H,W], embedding [B,D] -> heatmap [B,h,w], confidence [B]
    embed_dim: int
    feature_size: tuple[int, int]  # (h, w) of the heatmap
    heatmap: dict[str, Any] = field(default_factory=dict)  # range, meaning
    confidence: dict[str, Any] = field(default_factory=dict)
    # Optional, torch only, for the parity check: (image, embedding) -> the size of the heatmap's float32
    # rounding error per unit of relative error in the graph (ACL: max |pre-sigmoid logit| / 4, see _parity).
    # None: heatmaps are compared absolutely.
    heatmap_scale: Callable[[Tensor, Tensor], float] | None = None


def top_fraction_k(feature_size: tuple[int, int], fraction: float = TOP_FRACTION) -> int:
    return max(1, math.ceil(fraction * feature_size[0] * feature_size[1]))


class SSLAlignAudioGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, spectrogram: Tensor) -> Tensor:
        return self.model.encode_audio(spectrogram)


class SSLAlignVisualGraph(nn.Module):
    """Cosine map of each image with its audio embedding, and the mean of its top-k cells."""

    def __init__(self, model: nn.Module, top_k: int) -> None:
        super().__init__()
        self.model = model
        self.top_k = top_k  # a constant in the graph: the feature size is fixed by the image size

    def forward(self, image: Tensor, audio_embedding: Tensor) -> tuple[Tensor, Tensor]:
        heatmap = self.model.cosine_map(self.model.encode_image(image), audio_embedding)
        top = torch.topk(heatmap.flatten(1), self.top_k, dim=1).values
        return heatmap, top.mean(dim=1)


def ssl_align_graphs(loaded: LoadedModel, image_size: int) -> EngineGraphs:
    model = loaded.model.eval()
    with torch.inference_mode():
        vmap = model.encode_image(torch.zeros(1, 3, image_size, image_size))
        embed_dim = int(vmap.shape[1]) - getattr(model, "refine_channels", 0)  # the audio embedding's width
        # the heatmap's own size: the visual map's, or twice it with the 16x16 refinement
        heat = model.cosine_map(vmap, torch.ones(1, embed_dim))
    feature_size = (int(heat.shape[1]), int(heat.shape[2]))
    k = top_fraction_k(feature_size)
    return EngineGraphs(
        audio=SSLAlignAudioGraph(model).eval(),
        visual=SSLAlignVisualGraph(model, k).eval(),
        embed_dim=embed_dim,
        feature_size=feature_size,
        heatmap={
            "range": list(model.heatmap_range),
            "meaning": model.heatmap_meaning + "; higher = more likely the sound source; upsample bilinearly "
            "to the frame",
        },
        confidence={
            "range": list(model.heatmap_range),  # a mean of heatmap cells: the heatmap's bounds (fixed terms too)
            "top_k": k,
            "meaning": f"mean of the top {int(TOP_FRACTION * 100)} % ({k} of "
            f"{feature_size[0] * feature_size[1]}) heatmap cells "
            "(SLAVC-style confidence that a visible object makes the sound)",
        },
    )


_GRAPH_BUILDERS: dict[str, Callable[[LoadedModel, int], EngineGraphs]] = {"ssl_align": ssl_align_graphs}
# Methods whose builder lives in its own module, imported (and so registered) on first use.
_BUILDER_MODULES = {"acl": "avloc.engines.acl_export"}


class ObjectnessGraph(nn.Module):
    """OGL's objectness net on the engine's own input: the normalised image is mapped back to RGB in [0, 1]
    (the manifest's mean / std) and handed to :class:`avloc.core.ogl.ObjectnessNet`."""

    def __init__(self, net: nn.Module, image: ImageConfig) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(image.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image * self.std + self.mean)


def _write_objectness(
    tmp: Path, loaded: LoadedModel, spec: str, size: int, feature_size: tuple[int, int], opset: int
) -> dict[str, Any]:
    """objectness.onnx (image -> objectness map) + its manifest entry, after an ORT vs torch parity check."""
    import onnxruntime as ort

    from avloc.core.ogl import OGL_ALPHA, load_objectness

    graph = ObjectnessGraph(load_objectness(spec), loaded.image).eval()
    _export_onnx(graph, (torch.zeros(1, 3, size, size),), tmp / OBJECTNESS_FILE, ["image"], ["objectness"], opset)
    session = ort.InferenceSession(str(tmp / OBJECTNESS_FILE), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (1, 3):
        image = np.random.default_rng(batch).standard_normal((batch, 3, size, size), dtype=np.float32)
        with torch.inference_mode():
            ref = graph(torch.from_numpy(image)).numpy()
        got = session.run(None, {"image": image})[0]
        worst = max(worst, float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max())))
    if worst > PARITY_FAIL:
        raise UserError(f"export parity check failed for {OBJECTNESS_FILE}: relative difference {worst:.2e}")
    h, w = (int(v) for v in ref.shape[1:])
    return {
        "file": OBJECTNESS_FILE,
        "sha256": sha256_file(tmp / OBJECTNESS_FILE),
        "objectness": "effnet-lite0" if spec == "effnet-lite0" else "resnet18",
        "source": spec,
        "inputs": [
            {
                "name": "image",
                "shape": ["batch", 3, size, size],
                "dtype": "float32",
                "meaning": "the visual graph's image input",
            }
        ],
        "outputs": [
            {
                "name": "objectness",
                "shape": ["batch", h, w],
                "dtype": "float32",
                "meaning": "audio-blind ImageNet objectness: mean |features| over channels",
            }
        ],
        "alpha": OGL_ALPHA,
        "blend": "avloc.core.ogl.combine: minmax(alpha * minmax(heatmap) + (1 - alpha) * minmax(bilinear("
        f"objectness -> {feature_size[0]}x{feature_size[1]} or the frame)))",
        "parity_max_rel_diff": worst,
    }


def register_graph_builder(method: str, builder: Callable[[LoadedModel, int], EngineGraphs]) -> None:
    """Let a method (e.g. ACL) export through the same engine interface."""
    _GRAPH_BUILDERS[method] = builder


def build_graphs(loaded: LoadedModel, image_size: int) -> EngineGraphs:
    if loaded.method not in _GRAPH_BUILDERS and loaded.method in _BUILDER_MODULES:
        importlib.import_module(_BUILDER_MODULES[loaded.method])
    builder = _GRAPH_BUILDERS.get(loaded.method)
    if builder is None:
        known = ", ".join(sorted(set(_GRAPH_BUILDERS) | set(_BUILDER_MODULES)))
        raise UserError(f"method {loaded.method!r} has no engine exporter; exportable methods: {known}")
    return builder(loaded, image_size)


# ---------------------------------------------------------------------------------------------- export


def _versions(opset: int) -> dict[str, Any]:
    import onnx
    import onnxruntime

    import avloc

    return {
        "avloc": avloc.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": opset,
    }


def _export_onnx(
    module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str], opset: int
) -> None:
    import onnx

    dynamic = {name: {0: "batch"} for name in inputs + outputs}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is the one that needs no onnxscript; its deprecation notice is noise here.
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    model.producer_name = "avloc"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def _parity(
    graphs: EngineGraphs, audio_path: Path, visual_path: Path, spec_shape: tuple[int, ...], image_size: int
) -> dict[str, float]:
    """Max |ORT - torch| of every output at batch 1 and 3 (exercises the dynamic batch axis).

    The unnormalized embedding is compared relative to its scale (``max(1, max|emb|)``): trained encoders can
    have large activations whose float32 rounding alone exceeds an absolute bound.

    Heatmap and confidence likewise, where the builder gives ``graphs.heatmap_scale``: an ACL heatmap is
    ``sigmoid(x + b / w)`` of decoder logits ``x`` that a random full-size CLIPSeg puts at +-3000 (trained: tens).
    Float32 rounding moves them by ~2e-6 of that, ~7e-3, and sigmoid (slope <= 1/4) passes up to a quarter
    of it on to pixels near the threshold: 1.2e-3 of pure rounding in an otherwise exact graph. Dividing by
    ``max(1, max|x| / 4)`` bounds the relative logit error instead, the same test as the embedding's: that
    engine is then at 1.3e-6, and a graph whose threshold is one logit off is still at ~1e-2 on the tiny
    model (tests/test_acl_export.py). Errors far below 1e-3 of the logit scale, such as ONNX's cubic resize
    (see ``avloc.core.acl.model.bicubic_matrix``), need a test of their own.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    audio = ort.InferenceSession(str(audio_path), options, providers=["CPUExecutionProvider"])
    visual = ort.InferenceSession(str(visual_path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = {"audio_embedding": 0.0, "heatmap": 0.0, "confidence": 0.0}  # relative, see above
    for batch in (1, 3):
        spec = rng.standard_normal((batch, *spec_shape), dtype=np.float32)
        image = rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
        with torch.inference_mode():
            emb_t = graphs.audio(torch.from_numpy(spec))
            heat_t, conf_t = graphs.visual(torch.from_numpy(image), emb_t)
        emb = audio.run(None, {"spectrogram": spec})[0]
        heat, conf = visual.run(None, {"image": image, "audio_embedding": emb_t.numpy()})
        heat_scale = 1.0
        if graphs.heatmap_scale is not None:
            with torch.inference_mode():
                heat_scale = max(1.0, float(graphs.heatmap_scale(torch.from_numpy(image), emb_t)))
        for name, a, b in (
            ("audio_embedding", emb, emb_t),
            ("heatmap", heat, heat_t),
            ("confidence", conf, conf_t),
        ):
            if a.shape != tuple(b.shape):
                raise UserError(f"export parity: {name} shape {a.shape} from ONNX Runtime, {tuple(b.shape)} from torch")
            scale = max(1.0, float(np.abs(b.numpy()).max())) if name == "audio_embedding" else heat_scale
            worst[name] = max(worst[name], float(np.abs(a - b.numpy()).max()) / scale)
    return worst


def image_manifest(image: ImageConfig, size: int) -> dict[str, Any]:
    """The manifest's ``image`` section: what ``preprocess_frame`` does to a frame for an engine of ``size``."""
    return {
        "size": size,
        "mean": list(image.mean),
        "std": list(image.std),
        "color": "RGB",
        "layout": "NCHW",
        "normalization": "x / 255, then (x - mean) / std per channel",
        "fit": image.fit,
        "resize": f"{image.fit} (core.media.frame_fit) to size x size (cv2 INTER_AREA shrinking, INTER_LINEAR"
        " enlarging)",
        "trained_size": image.size,
    }


def _io_spec(spec_shape: tuple[int, ...], image_size: int, graphs: EngineGraphs) -> dict[str, Any]:
    d = graphs.embed_dim
    h, w = graphs.feature_size
    embedding = {
        "name": "audio_embedding",
        "shape": ["batch", d],
        "dtype": "float32",
        "meaning": "audio embedding (not normalized); compute once per audio window and reuse",
    }
    return {
        "audio": {
            "file": AUDIO_FILE,
            "inputs": [
                {
                    "name": "spectrogram",
                    "shape": ["batch", *spec_shape],
                    "dtype": "float32",
                    "meaning": "one front-end window (see frontend): avloc.core.audio.FrontEnd output",
                }
            ],
            "outputs": [embedding],
        },
        "visual": {
            "file": VISUAL_FILE,
            "inputs": [
                {
                    "name": "image",
                    "shape": ["batch", 3, image_size, image_size],
                    "dtype": "float32",
                    "meaning": "RGB image normalized as in `image` (avloc.engines.base.preprocess_frame)",
                },
                {**embedding, "meaning": "output of the audio graph"},
            ],
            "outputs": [
                {
                    "name": "heatmap",
                    "shape": ["batch", h, w],
                    "dtype": "float32",
                    "meaning": graphs.heatmap["meaning"],
                },
                {
                    "name": "confidence",
                    "shape": ["batch"],
                    "dtype": "float32",
                    "meaning": graphs.confidence["meaning"],
                },
            ],
        },
    }


def export_engine(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    image_size: int | None = None,
    int8: bool = False,
    calibration: str | Path | None = None,
    force: bool = False,
    gate_data: str | Path | None = None,
    ogl: str | None = None,
    refine: bool | None = None,
) -> Path:
    """Export ``checkpoint`` to the engine directory ``out_dir`` (see module doc); returns ``out_dir``.

    ``ogl``: ``effnet-lite0`` or torchvision ResNet18 weights -> also ``objectness.onnx`` and ``manifest["ogl"]``
    (the inference worker blends its map with the heatmap, see :mod:`avloc.core.ogl`).
    ``gate_data``: a dataset root whose val split calibrates the silence gate (``manifest["gate"]``, see
    :mod:`avloc.engines.gate`); None writes no gate (the worker then never marks heatmaps ``not_visible``).
    ``refine``: switch an SSL-Align pretrained model's 16x16 refinement on / off whatever its checkpoint says
    (:func:`avloc.core.ssl_align.with_refine`; it has no weights); None: as the checkpoint says.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir}: already exists; pass --force to replace it")
    if int8 and calibration is None:
        raise UserError("--int8 needs --calibration DATASET_ROOT (real frames + audio to calibrate on)")
    if image_size is not None and image_size < 32:
        raise UserError(f"--image-size {image_size}: expected at least 32 pixels")
    if gate_data is not None:
        from avloc.engines.gate import check_gate_data

        gate_data = check_gate_data(gate_data)  # before the export, which takes a while
    loaded = load_model(checkpoint, device="cpu")
    if ogl is not None and loaded.model_config.get("objectness"):
        raise UserError(
            f"--ogl: {checkpoint} already adds objectness to its heatmap (model.objectness, weight "
            f"{loaded.model_config.get('objectness_weight')}); blending OGL's on top would count it twice"
        )
    if refine is not None:
        loaded = _with_refine(loaded, refine)
    size = int(image_size or loaded.image.size)
    spec_shape = tuple(loaded.frontend.output_shape())
    graphs = build_graphs(loaded, size)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _write_engine(loaded, graphs, tmp, checkpoint, opset, size, spec_shape, int8, calibration)
        if ogl is not None:
            manifest["ogl"] = _write_objectness(tmp, loaded, ogl, size, graphs.feature_size, opset)
        with open(tmp / MANIFEST_NAME, "w") as f:
            json.dump(manifest, f, indent=2)
        if gate_data is not None:
            _add_gate(tmp, manifest, gate_data)
        if out_dir.exists():  # --force: swap in the new directory, then drop the old one
            old = out_dir.with_name(out_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _with_refine(loaded: LoadedModel, refine: bool) -> LoadedModel:
    from avloc.core.ssl_align import SSLAlign, with_refine

    if not isinstance(loaded.model, SSLAlign) or loaded.model.config.backbone != "pretrained":
        raise UserError(f"--{'' if refine else 'no-'}refine: needs an SSL-Align backbone: pretrained checkpoint")
    model = with_refine(loaded.model, refine)
    return dataclasses.replace(loaded, model=model, model_config={**loaded.model_config, "refine": refine})


def _add_gate(engine_dir: Path, manifest: dict[str, Any], data: Path) -> None:
    """Calibrate the silence gate with the exported engine itself (ONNX Runtime fp32, the default backend, so
    the threshold is on exactly the confidence the worker reports) and rewrite the manifest with it."""
    from avloc.engines.base import load_engine
    from avloc.engines.gate import calibrate_engine, manifest_gate

    with load_engine(engine_dir, backend="onnxruntime") as engine:
        calibration = calibrate_engine(engine, data)
    manifest["gate"] = manifest_gate(calibration, data)
    log.info(
        "gate: confidence >= %.4f is visible (val precision %.3f, recall %.3f, F1 %.3f; %d pos / %d neg)",
        calibration.threshold,
        calibration.precision,
        calibration.recall,
        calibration.f1,
        calibration.n_pos,
        calibration.n_neg,
    )
    with open(engine_dir / MANIFEST_NAME, "w") as f:
        json.dump(manifest, f, indent=2)


def _write_engine(
    loaded: LoadedModel,
    graphs: EngineGraphs,
    tmp: Path,
    checkpoint: str | Path,
    opset: int,
    size: int,
    spec_shape: tuple[int, ...],
    int8: bool,
    calibration: str | Path | None,
) -> dict[str, Any]:
    spec = torch.zeros(1, *spec_shape)
    image = torch.zeros(1, 3, size, size)
    _export_onnx(graphs.audio, (spec,), tmp / AUDIO_FILE, ["spectrogram"], ["audio_embedding"], opset)
    with torch.inference_mode():
        emb = graphs.audio(spec)
    _export_onnx(
        graphs.visual,
        (image, emb),
        tmp / VISUAL_FILE,
        ["image", "audio_embedding"],
        ["heatmap", "confidence"],
        opset,
    )
    parity = _parity(graphs, tmp / AUDIO_FILE, tmp / VISUAL_FILE, spec_shape, size)
    log.info("ONNX Runtime vs torch max abs diff: %s", ", ".join(f"{k} {v:.2e}" for k, v in parity.items()))
    if max(parity.values()) > PARITY_FAIL:
        raise UserError(f"export parity check failed: ONNX Runtime differs from PyTorch by {parity} (> {PARITY_FAIL})")

    # A slim copy of the checkpoint (weights + preprocessing, no optimizer state) for the torch backend.
    save_checkpoint(
        tmp / MODEL_FILE,
        loaded.model,
        method=loaded.method,
        model_config=loaded.model_config,
        frontend=loaded.frontend,
        image=loaded.image,
        extra={"source_checkpoint": str(checkpoint)},
    )
    os.chmod(tmp / MODEL_FILE, 0o644)  # mkstemp made it owner-only; engines are shared read-only artefacts

    io_spec = _io_spec(spec_shape, size, graphs)
    for entry in io_spec.values():
        entry["sha256"] = sha256_file(tmp / entry["file"])
    h, w = graphs.feature_size
    manifest: dict[str, Any] = {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "method": loaded.method,
        "model_config": loaded.model_config,
        "frontend": loaded.frontend.to_dict(),
        "image": image_manifest(loaded.image, size),
        "embed_dim": graphs.embed_dim,
        "graphs": io_spec,
        "outputs": {
            "audio_embedding": {"shape": ["batch", graphs.embed_dim]},
            "heatmap": {
                **graphs.heatmap,
                "shape": ["batch", h, w],
                "feature_size": [h, w],
                "feature_stride": size / h,
                "upsample": "bilinear, align_corners=False, to the frame",
            },
            "confidence": graphs.confidence,
        },
        "heatmap_range": graphs.heatmap["range"],
        "feature_stride": size / h,
        "torch_checkpoint": {"file": MODEL_FILE, "sha256": sha256_file(tmp / MODEL_FILE)},
        "parity_max_abs_diff": parity,
        "versions": _versions(opset),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if int8:
        from avloc.engines.quantize import quantize_graphs

        for graph, entry in quantize_graphs(tmp, manifest, graphs, calibration).items():
            # A rejected variant is recorded (with its numbers) but not selectable.
            if entry.get("rejected"):
                manifest["graphs"][graph]["int8_rejected"] = entry
            else:
                manifest["graphs"][graph]["variants"] = {"int8": entry}
    return manifest


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (e.g. RUN/best.pt)")
    parser.add_argument("--out", type=Path, default=None, help="engine directory to write")
    parser.add_argument(
        "--engine",
        type=Path,
        default=None,
        metavar="ENGINE_DIR",
        help="an existing engine directory to write --triton from (instead of --checkpoint/--out)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="square input size in pixels (default: the checkpoint's training size); smaller is faster",
    )
    parser.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write audio/visual.int8.onnx (ONNX Runtime static int8, calibrated on --calibration), "
        "each kept only if its heatmaps agree with fp32; the CPU worker then uses them (docs/performance.md, "
        "int8). Default: on when --calibration is given; --no-int8: fp32 only",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="dataset root (split lists, frames/, audio/) whose frames and sounds calibrate the int8 graphs",
    )
    parser.add_argument(
        "--gate-data",
        type=Path,
        default=None,
        metavar="DATA",
        help="dataset root whose val split calibrates the silence gate (max-F1 confidence threshold stored "
        "in the manifest; the live worker marks heatmaps below it not_visible). Default: no gate",
    )
    parser.add_argument(
        "--ogl",
        metavar="OBJECTNESS",
        default=None,
        help="also write objectness.onnx for object-guided localization: effnet-lite0 (packaged weights) or "
        "the path of torchvision ResNet18 ImageNet weights (resnet18-f37072fd.pth)",
    )
    parser.add_argument(
        "--refine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="SSL-Align pretrained: the 16x16 refinement of the heatmap (model.refine, docs/results.md 'Sharper "
        "maps') on / off whatever the checkpoint says. Default: as the checkpoint says",
    )
    parser.add_argument("--force", action="store_true", help="replace --out (and --triton) if it exists")
    triton = parser.add_argument_group("Triton Inference Server model repository (docs/engines.md, Triton)")
    triton.add_argument(
        "--triton", type=Path, default=None, metavar="REPO", help="also write a Triton model repository"
    )
    triton.add_argument("--triton-max-batch", type=int, default=16, help="max_batch_size (default %(default)s)")
    triton.add_argument("--triton-instances", type=int, default=1, help="model instances (default %(default)s)")
    triton.add_argument(
        "--triton-kind",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="instance kind: auto (GPU where the server has one, else CPU; default), cpu or gpu",
    )
    triton.add_argument(
        "--triton-backend",
        choices=("onnxruntime", "python"),
        default="onnxruntime",
        help="onnxruntime (default), or python: ONNX Runtime in Triton's python backend (PyTriton's server)",
    )
    triton.add_argument("--triton-queue-delay-us", type=int, default=1000, help="dynamic batching max queue delay")
    triton.add_argument("--triton-prefix", default="avloc", help="model name prefix (default %(default)s)")


def _write_triton(engine_dir: Path, args: argparse.Namespace) -> None:
    from avloc.engines.triton_export import TritonOptions, export_triton

    options = TritonOptions(
        max_batch=args.triton_max_batch,
        instances=args.triton_instances,
        kind=args.triton_kind,
        queue_delay_us=args.triton_queue_delay_us,
        prefix=args.triton_prefix,
        backend=args.triton_backend,
    )
    repo = export_triton(engine_dir, args.triton, options, force=args.force)
    models = sorted(p.name for p in repo.iterdir() if p.is_dir())
    print(f"Triton model repository written to {repo}: {', '.join(models)} (configs parsed, shapes match ONNX)")


def main(args: argparse.Namespace) -> int:
    if args.engine is not None:
        if args.checkpoint is not None or args.out is not None:
            raise UserError("--engine ENGINE_DIR writes --triton from an existing engine; drop --checkpoint/--out")
        if args.triton is None:
            raise UserError("--engine ENGINE_DIR needs --triton REPO (the model repository to write)")
        _write_triton(args.engine, args)
        return 0
    if args.checkpoint is None or args.out is None:
        raise UserError("export needs --checkpoint CKPT --out ENGINE_DIR (or --engine ENGINE_DIR --triton REPO)")
    out = export_engine(
        args.checkpoint,
        args.out,
        opset=args.opset,
        image_size=args.image_size,
        int8=args.calibration is not None if args.int8 is None else args.int8,  # int8 by default with data
        calibration=args.calibration,
        force=args.force,
        gate_data=args.gate_data,
        ogl=args.ogl,
        refine=args.refine,
    )
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    parity = ", ".join(f"{k} {v:.1e}" for k, v in manifest["parity_max_abs_diff"].items())
    print(
        f"engine written to {out} (method {manifest['method']}, image {manifest['image']['size']} px, "
        f"heatmap {manifest['outputs']['heatmap']['feature_size']}; ORT-vs-torch max abs diff: {parity})"
    )
    if "gate" in manifest:
        gate, val = manifest["gate"], manifest["gate"]["val"]
        print(
            f"gate: confidence >= {gate['threshold']:.4f} is visible (val precision {val['precision']:.3f}, "
            f"recall {val['recall']:.3f}, F1 {val['f1']:.3f}; {val['n_pos']} pos / {val['n_neg']} neg)"
        )
    if args.triton is not None:
        _write_triton(out, args)
    return 0

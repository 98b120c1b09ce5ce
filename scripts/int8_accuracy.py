"""What the int8 engine costs in localization: fp32 vs int8 ONNX Runtime graphs of one engine on a test split.

Metrics as ``avloc eval`` computes them (train/evaluate.py and core/metrics.py, not copies): adaptive cIoU@50
with its bootstrap 95 % interval, the pointing game (the heatmap's peak inside the sounding object's box)
and audio-swap (each object of a multi-object scene heard in turn: the peak in the heard object's box), each
with a bootstrap interval over test scenes, plus the PAIRED bootstrap interval of the difference int8 - fp32
(the same scenes drawn for both: far narrower than comparing two intervals). Both engines see exactly the
inputs ``avloc eval`` gives the checkpoint (its image preprocessing and front-end window).

    python scripts/int8_accuracy.py --engine ENGINE_DIR --data DATA [--split test] --out int8.json

ENGINE_DIR must hold int8 variants (``avloc export --int8 --calibration DATA``) and the checkpoint it was
exported from (``manifest.torch_checkpoint``). ``--requantize WORK_DIR --calibration DATA`` measures what the export's
gate turned down: both graphs are quantized again with the export's own recipe and calibration
(``avloc.engines.quantize.quantize_graphs``, its gate numbers reported) into WORK_DIR, a copy of the engine whose
manifest lists them as int8 variants (marked ``rejected`` where the gate said no), and that copy is scored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from avloc.core.errors import UserError

SEED = 0


def engine_heatmaps(engine: Any, images: torch.Tensor, specs: torch.Tensor) -> np.ndarray:
    """[B,3,S,S] images heard with [B,1,F,T] spectrograms -> [B,S,S] maps, upsampled as avloc eval does."""
    heat, _ = engine.localize(images.numpy().astype(np.float32), engine.embed_audio(specs.numpy().astype(np.float32)))
    maps = torch.from_numpy(np.asarray(heat, np.float32)).unsqueeze(1)
    return F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0].numpy()


def score(engine: Any, evaluator: Any, annotations: dict[str, Any], scenes: dict[str, list[Any]]) -> dict[str, Any]:
    """Per-sample adaptive cIoU and pointing hits on the annotated ids, per-scene audio-swap hits."""
    from avloc.core.audio import load_audio
    from avloc.core.metrics import evaluate_maps
    from avloc.train.evaluate import peak_inside

    ids = sorted(annotations)
    maps: dict[str, np.ndarray] = {}
    for start in range(0, len(ids), 16):
        chunk = ids[start : start + 16]
        images = torch.stack([evaluator.image_tensor(evaluator.dataset.image(i)) for i in chunk])
        specs = evaluator.spectrograms([evaluator.dataset.audio(i) for i in chunk]).cpu()
        for i, m in zip(chunk, engine_heatmaps(engine, images, specs)):
            maps[i] = m
    res = evaluate_maps(maps, annotations, binarize="adaptive", per_sample=True)
    ciou = np.array([res["per_sample"][i]["ciou"] for i in ids])
    # the pointing game: the peak inside any box of the sounding object (an annotation may list several)
    pointing = np.array(
        [any(peak_inside(maps[i], np.asarray(box)) for box in annotations[i].boxes) for i in ids], dtype=np.float64
    )
    rate = evaluator.loaded.frontend.sample_rate
    swap = []
    for sid in sorted(scenes):
        objects = scenes[sid]
        image = evaluator.image_tensor(evaluator.dataset.image(sid))
        specs = evaluator.spectrograms([load_audio(evaluator.dataset.root / o.audio, rate) for o in objects]).cpu()
        heard = engine_heatmaps(engine, image.unsqueeze(0).expand(len(objects), -1, -1, -1), specs)
        swap.append([peak_inside(m, np.asarray(o.bbox)) for m, o in zip(heard, objects)])
    return {"ids": ids, "ciou": ciou, "pointing": pointing, "swap": swap, "maps": maps}


def _swap_acc(rows: list[list[bool]]) -> float:
    pairs = sum(len(r) for r in rows)
    return sum(sum(r) for r in rows) / pairs if pairs else float("nan")


def compare(fp32: dict[str, Any], int8: dict[str, Any], n_boot: int = 2000) -> dict[str, Any]:
    """Each metric per precision with its bootstrap interval, and the paired interval of int8 - fp32."""
    from avloc.core.metrics import bootstrap_interval, ciou_ap50_of

    out: dict[str, Any] = {}
    per_sample = {
        "adaptive_ciou_ap50": (ciou_ap50_of, fp32["ciou"], int8["ciou"]),
        "pointing": (np.mean, fp32["pointing"], int8["pointing"]),
    }
    for name, (stat, a, b) in per_sample.items():
        paired = np.stack([a, b], axis=1)
        out[name] = {
            "fp32": round(float(stat(a)), 4),
            "fp32_ci": [round(x, 4) for x in bootstrap_interval(a, stat, n_boot, seed=SEED)],
            "int8": round(float(stat(b)), 4),
            "int8_ci": [round(x, 4) for x in bootstrap_interval(b, stat, n_boot, seed=SEED)],
            "diff_ci": [
                round(x, 4)
                for x in bootstrap_interval(paired, lambda p, s=stat: s(p[:, 1]) - s(p[:, 0]), n_boot, seed=SEED)
            ],
        }
    rows = list(range(len(fp32["swap"])))
    if rows:

        def acc(idx: np.ndarray, which: list[list[bool]]) -> float:
            return _swap_acc([which[int(i)] for i in idx])

        idx = np.asarray(rows)
        out["audio_swap"] = {
            "fp32": round(_swap_acc(fp32["swap"]), 4),
            "fp32_ci": [
                round(x, 4) for x in bootstrap_interval(idx, lambda d: acc(d, fp32["swap"]), n_boot, seed=SEED)
            ],
            "int8": round(_swap_acc(int8["swap"]), 4),
            "int8_ci": [
                round(x, 4) for x in bootstrap_interval(idx, lambda d: acc(d, int8["swap"]), n_boot, seed=SEED)
            ],
            "diff_ci": [
                round(x, 4)
                for x in bootstrap_interval(
                    idx, lambda d: acc(d, int8["swap"]) - acc(d, fp32["swap"]), n_boot, seed=SEED
                )
            ],
            "n_scenes": len(rows),
        }
    same_peak = [
        int(np.argmax(fp32["maps"][i])) == int(np.argmax(int8["maps"][i])) for i in fp32["ids"] if i in int8["maps"]
    ]
    out["same_peak_pixel"] = round(float(np.mean(same_peak)), 4) if same_peak else None
    out["n"] = len(fp32["ids"])
    # within: every paired difference interval holds 0, or its lower end is above -0.02 (a loss of at most 2 points)
    out["int8_within_intervals"] = all(
        v["diff_ci"][0] <= 0.0 <= v["diff_ci"][1] or v["diff_ci"][0] >= -0.02
        for k, v in out.items()
        if isinstance(v, dict) and "diff_ci" in v
    )
    return out


def requantized_engine(engine: Path, calibration: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of ``engine`` in ``work`` (links to its files) with both graphs quantized as ``avloc export --int8``
    does, kept whatever the gate says; returns it and the gate's verdict per graph."""
    import onnxruntime as ort

    from avloc.engines.base import read_manifest
    from avloc.engines.quantize import quantize_graphs

    manifest = read_manifest(engine)
    if work.exists() and any(work.iterdir()):
        raise UserError(f"--requantize {work}: expected an empty or new directory")
    work.mkdir(parents=True, exist_ok=True)
    for item in engine.iterdir():
        if item.is_file() and item.name != "manifest.json" and ".int8." not in item.name:
            (work / item.name).symlink_to(item.resolve())
    for graph in manifest["graphs"].values():
        graph.pop("variants", None)
        graph.pop("int8_rejected", None)
    audio_file = engine / manifest["graphs"]["audio"]["file"]
    session = ort.InferenceSession(str(audio_file), providers=["CPUExecutionProvider"])

    class Audio:  # what quantize_graphs asks of the export's torch graphs: the audio embedding of a spectrogram
        @staticmethod
        def audio(spec: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"spectrogram": spec.numpy()})[0])

    entries = quantize_graphs(work, manifest, Audio, calibration, keep_rejected=True)
    for graph, entry in entries.items():
        manifest["graphs"][graph]["variants"] = {"int8": entry}
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
    gate = {
        graph: {"kept_by_export": not entry.get("rejected", False), **entry["heatmap_agreement_vs_fp32"]}
        for graph, entry in entries.items()
    }
    return work, gate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, type=Path, help="engine directory with int8 variants")
    parser.add_argument("--data", required=True, type=Path, help="dataset root (split lists, test.json)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the manifest's torch checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--requantize",
        type=Path,
        default=None,
        metavar="WORK_DIR",
        help="quantize both graphs again with the export's recipe (also those its gate rejected) into this new "
        "directory, and score that engine (needs --calibration)",
    )
    parser.add_argument("--calibration", type=Path, default=None, help="dataset root to calibrate on (--requantize)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        from avloc.core.checkpoint import load_model
        from avloc.core.datasets import load_vggss_json
        from avloc.engines.base import load_engine, read_manifest
        from avloc.train.evaluate import Evaluator, swap_scenes

        torch.set_num_threads(args.threads)
        gate = None
        if args.requantize is not None:
            if args.calibration is None:
                raise UserError("--requantize needs --calibration DATASET_ROOT (the data the export calibrated on)")
            args.engine, gate = requantized_engine(args.engine, args.calibration, args.requantize)
        manifest = read_manifest(args.engine)
        ckpt = args.checkpoint or args.engine / manifest.get("torch_checkpoint", {}).get("file", "model.pt")
        evaluator = Evaluator(load_model(ckpt, device="cpu"), args.data, args.split)
        ann_path = evaluator.dataset.root / f"{args.split}.json"
        if not ann_path.is_file():
            raise UserError(f"{ann_path}: no boxes to score")
        every = load_vggss_json(ann_path)
        ids = list(evaluator.dataset.ids)
        annotations = {i: every[i] for i in ids if i in every}
        scenes = swap_scenes(annotations, ids)
        results = {}
        for precision in ("fp32", "int8"):
            engine = load_engine(args.engine, backend="onnxruntime", threads=args.threads, precision=precision)
            results[precision] = score(engine, evaluator, annotations, scenes)
        report = {
            "engine": str(args.engine),
            "data": str(args.data),
            "split": args.split,
            "int8_graphs": {g: sorted(manifest["graphs"][g].get("variants") or {}) for g in ("audio", "visual")},
            "export_gate": gate,
            "metrics": compare(results["fp32"], results["int8"]),
            "command": "python scripts/int8_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

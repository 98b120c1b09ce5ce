"""What an engine's silence gate does: its precision/recall on the val pairs and how often it fires on test.

Runs the engine (``--backend``, default ONNX Runtime as the live worker) on
- the val pairs the gate was calibrated on (own audio vs off-screen audio, avloc.engines.gate): precision,
  recall and F1 of "visible" at the manifest's threshold;
- the rows of ``test_plus_silent.csv``: the fraction gated (``not_visible``) among sounding rows (image with
  its own audio; the gate should pass them) and among silent rows (image with audio from elsewhere; the
  gate should fire).

Prints one JSON object:

  .venv/bin/python scripts/gate_effect.py --engine engines/full --data data/stamps
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from avloc.core.datasets import load_silent_csv
from avloc.core.errors import UserError
from avloc.core.metrics import detection_precision_recall, f1_scores
from avloc.engines.base import load_engine
from avloc.engines.gate import (
    GATE_SEED,
    GATE_SPLIT,
    gate_dataset,
    gate_pairs,
    gate_threshold,
    pair_confidences,
)


def measure(engine_dir: Path, data: Path, backend: str = "onnxruntime", batch_size: int = 16) -> dict[str, Any]:
    with load_engine(engine_dir, backend=backend) as engine:
        threshold = gate_threshold(engine.manifest)
        if threshold is None:
            raise UserError(f"{engine_dir}: the engine has no gate; export it with --gate-data DATA")
        gate = engine.manifest["gate"]
        split, seed = gate.get("split", GATE_SPLIT), int(gate.get("seed", GATE_SEED))
        val = gate_dataset(data, split, engine.manifest)
        pairs = gate_pairs(val, seed)
        pos = pair_confidences(engine, val, pairs.positives, batch_size)
        neg = pair_confidences(engine, val, pairs.negatives, batch_size)
        conf = np.concatenate([pos, neg])
        visible = np.arange(conf.size) < pos.size
        precision, recall = detection_precision_recall([threshold], conf, visible)
        out: dict[str, Any] = {
            "engine": str(engine_dir),
            "backend": backend,
            "data": str(data),
            "threshold": threshold,
            "statistic": gate.get("statistic"),
            split: {
                "precision": float(precision[0]),
                "recall": float(recall[0]),
                "f1": float(f1_scores(precision, recall)[0]),
                "n_pos": int(pos.size),
                "n_neg": int(neg.size),
                "gated_pos": float(np.mean(pos < threshold)),
                "gated_neg": float(np.mean(neg < threshold)),
            },
            "manifest_val": gate.get("val"),
        }
        silent_csv = Path(data) / "test_plus_silent.csv"
        if not silent_csv.is_file():
            out["test"] = None  # nothing to measure: the dataset has no Extended test list
            return out
        test = gate_dataset(data, "test", engine.manifest)
        rows = load_silent_csv(silent_csv)
        groups = {
            "sounding": [(r.video, r.audio) for r in rows if not r.non_sounding],
            "silent": [(r.video, r.audio) for r in rows if r.non_sounding],
        }
        out["test"] = {}
        for name, group in groups.items():
            c = pair_confidences(engine, test, group, batch_size) if group else np.zeros(0)
            out["test"][name] = {"n": len(group), "gated": float(np.mean(c < threshold)) if group else None}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, type=Path, help="engine directory exported with --gate-data")
    parser.add_argument("--data", required=True, type=Path, help="dataset root (val split + test_plus_silent.csv)")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        result = measure(args.engine, args.data, args.backend, args.batch_size)
    except UserError as err:
        print(f"gate_effect: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

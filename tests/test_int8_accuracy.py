"""``scripts/int8_accuracy.py --requantize``: what the export's gate turned down is quantized again with the
export's own recipe, kept whatever the gate says, in a copy of the engine that loads with ``precision="int8"``
(docs/engines.md, "int8 — On a trained checkpoint")."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_export import _tiny_dataset

from avloc.core.errors import UserError
from avloc.engines import quantize
from avloc.engines.base import load_engine, read_manifest, sha256_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "int8_accuracy.py"


def _script():
    spec = importlib.util.spec_from_file_location("int8_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requantize_keeps_what_the_gate_rejected_in_a_copy(tiny_engine, tmp_path, monkeypatch):
    script = _script()
    data = _tiny_dataset(tmp_path / "data")
    before = (tiny_engine / "manifest.json").read_text()
    monkeypatch.setattr(quantize, "MIN_CORRELATION", 1.01)  # no quantized graph can pass: both rejected
    work, gate = script.requantized_engine(tiny_engine, data, tmp_path / "rq")
    assert (tiny_engine / "manifest.json").read_text() == before  # the engine itself is left alone
    assert not list(tiny_engine.glob("*.int8.onnx"))
    assert set(gate) == {"audio", "visual"} and not any(g["kept_by_export"] for g in gate.values())
    assert all(0.0 <= g["fp32_near_ties"] <= 1.0 and "mean_correlation" in g for g in gate.values())
    manifest = read_manifest(work)
    for graph in ("audio", "visual"):
        entry = manifest["graphs"][graph]["variants"]["int8"]
        assert entry["rejected"] is True and entry["sha256"] == sha256_file(work / f"{graph}.int8.onnx")
    with load_engine(work, precision="int8", threads=1) as engine:
        assert engine.precisions == {"audio": "int8", "visual": "int8"}
    json.loads((work / "manifest.json").read_text())
    with pytest.raises(UserError, match="empty or new directory"):
        script.requantized_engine(tiny_engine, data, work)
    assert (
        script.main(
            [
                "--engine",
                str(tiny_engine),
                "--data",
                str(data),
                "--requantize",
                str(tmp_path / "x"),
                "--out",
                str(tmp_path / "o.json"),
            ]
        )
        == 2
    )  # --calibration missing: one line, exit 2

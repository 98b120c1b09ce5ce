"""``avloc doctor`` on this (CPU) machine, and with a fake TensorRT module installed."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from avloc.cli import main as cli_main
from avloc.engines import doctor


def _row(report: dict, backend: str, device: str) -> dict:
    (row,) = [r for r in report["backends"] if r["backend"] == backend and r["device"] == device]
    return row


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_doctor_on_a_cpu_machine(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert cli_main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "CUDA        not available" in text
    assert "CPUExecutionProvider" in text
    assert "yes onnxruntime" in text and "no  tensorrt" in text
    report = doctor.collect()
    assert _row(report, "onnxruntime", "cpu")["runs"] and _row(report, "torch", "cpu")["runs"]
    assert not _row(report, "onnxruntime", "cuda")["runs"]
    assert _row(report, "torch eager / cuda_graphs", "cuda")["note"] == "no CUDA GPU visible to torch"
    assert "not importable" in _row(report, "tensorrt", "cuda")["note"]
    assert report["torch"]["version"] == torch.__version__


def test_doctor_json_and_tensorrt_version(capsys, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "11.4.0.106"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert cli_main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensorrt"]["version"] == "11.4.0.106"
    row = _row(report, "tensorrt", "cuda")
    assert row["runs"] == torch.cuda.is_available()
    old = types.ModuleType("tensorrt")
    old.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    assert _row(doctor.collect(), "tensorrt", "cuda") == {
        "backend": "tensorrt",
        "device": "cuda",
        "runs": False,
        "note": "TensorRT 8.6.1 < 10",
    }


def test_broken_probe_is_reported_not_fatal(monkeypatch):
    def broken() -> dict:
        raise OSError("libnvinfer.so.11: cannot open shared object file")

    monkeypatch.setattr(doctor, "probe_faiss", broken)
    report = doctor.collect()
    assert report["faiss"] == {"error": "OSError: libnvinfer.so.11: cannot open shared object file"}
    assert "faiss       not available (OSError" in doctor.format_report(report)

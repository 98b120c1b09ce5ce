"""ONNX Runtime "cuda" must never run on the CPU silently.

On this CPU-only machine a real ONNX Runtime already behaves like a CUDA build whose libraries fail to load,
once ``get_available_providers`` lists CUDA (as a CUDA build does whether or not its libraries load): asked for
``CUDAExecutionProvider``, the session falls back to ``CPUExecutionProvider`` with only a warning."""

from __future__ import annotations

import pytest

from avloc.core.errors import UserError
from avloc.engines import doctor, onnxruntime_backend
from avloc.engines.base import load_engine


@pytest.fixture()
def cuda_listed_but_broken(monkeypatch):
    """A CUDA build of onnxruntime whose CUDA/cuDNN libraries do not load: CUDA listed, sessions get the CPU."""
    import onnxruntime as ort

    calls: list[str] = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: calls.append("preload"), raising=False)
    monkeypatch.setattr(onnxruntime_backend, "_preloaded", [])
    return calls


def test_cuda_session_that_got_the_cpu_is_a_one_line_error(tiny_engine, cuda_listed_but_broken):
    with pytest.raises(UserError) as err:
        load_engine(tiny_engine, "onnxruntime", device="cuda", threads=1)
    text = str(err.value)
    assert "\n" not in text
    assert "asked for ONNX Runtime's CUDAExecutionProvider but the session got only CPUExecutionProvider" in text
    assert cuda_listed_but_broken == ["preload"]  # preload_dlls() ran before the session was made, once


def test_cpu_engine_reports_its_providers(tiny_engine):
    with load_engine(tiny_engine, "onnxruntime", threads=1) as engine:
        assert engine.providers == ["CPUExecutionProvider"]


def test_doctor_reports_the_providers_a_session_got(cuda_listed_but_broken, monkeypatch):
    monkeypatch.setattr(doctor, "probe_torch", lambda: {"cuda_available": True, "version": "x", "gpus": []})
    report = doctor.collect()
    ort = report["onnxruntime"]
    assert "CUDAExecutionProvider" in ort["providers"] and ort["session_providers"] == ["CPUExecutionProvider"]
    (row,) = [r for r in report["backends"] if r["backend"] == "onnxruntime" and r["device"] == "cuda"]
    assert not row["runs"] and "session asked for CUDA got only CPUExecutionProvider" in row["note"]
    assert "a session asked for CUDA got: CPUExecutionProvider" in doctor.format_report(report)


def test_both_wheels_installed_is_detected(monkeypatch):
    import importlib.metadata as md

    real = md.version
    monkeypatch.setattr(md, "version", lambda d: "1.32.0" if d == "onnxruntime-gpu" else real(d))
    assert onnxruntime_backend.both_wheels_installed()
    assert "pip uninstall -y onnxruntime" in doctor.probe_onnxruntime()["warning"]

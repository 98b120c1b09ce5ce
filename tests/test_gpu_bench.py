"""bench/gpu/run.sh: the summary it writes, and its CPU dry run (``--device cpu --quick``) end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "gpu" / "run.sh"


def _helpers():
    spec = importlib.util.spec_from_file_location("gpu_bench_helpers", ROOT / "bench" / "gpu" / "helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _engine_row(backend: str, graph: str, batch: int, median: float) -> dict:
    return {
        "backend": backend,
        "graph": graph,
        "batch": batch,
        "median_ms": median,
        "p99_ms": median * 1.5,
        "per_item_ms": median / batch,
        "speedup_vs_eager_torch": 2.0 / median,
    }


def test_summary_tables_from_reports(tmp_path):
    engine = {
        "method": "ssl_align",
        "device": {"kind": "cuda", "name": "NVIDIA H200"},
        "results": [_engine_row("torch", "visual", 4, 2.0), _engine_row("tensorrt:fp16", "visual", 4, 0.5)],
        "startup": {"torch": {"load_s": 1.0, "warmup_s": 0.25}},
        "errors": {"torch:compile": "triton missing"},
    }
    (tmp_path / "engine_ssl_align.json").write_text(json.dumps(engine))
    pipeline = {
        "pipeline": {
            "backend": "torch",
            "streams": 16,
            "heatmap_fps": 479.5,
            "e2e_ms": {"p50": 4.1, "p99": 9.7},
            "stages_ms": {"visual_engine": {"p50": 1.2, "p99": 2.5}},
            "drops": 3,
        }
    }
    (tmp_path / "pipeline_16.json").write_text(json.dumps(pipeline))
    (tmp_path / "doctor.txt").write_text("CUDA        available\n")
    (tmp_path / "steps.txt").write_text("doctor 0\nengine_acl 124\n")
    (tmp_path / "args.txt").write_text("--quick\n")
    md = _helpers().summarize(tmp_path).read_text()
    assert "Device: NVIDIA H200 (cuda). Re-create: `bench/gpu/run.sh --quick`" in md
    assert "| ssl_align | torch | visual | 4 | 2.000 | 3.000 | 0.500 | 1.00x | 0.2 |" in md
    assert "| ssl_align | tensorrt:fp16 | visual | 4 | 0.500 | 0.750 | 0.125 | 4.00x | nan |" in md
    assert "| pipeline_16 | torch | 16 | 479.5 | 4.1 | 9.7 | 1.2 | 2.5 | 3 |" in md
    assert "`torch:compile` skipped: triton missing" in md
    assert "- engine_acl: 124" in md and "- doctor" not in md
    assert "CUDA        available" in md
    assert (tmp_path / "summary.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_run_sh_cpu_dry_run(tmp_path):
    """The whole script on CPU with a tiny model: every step runs and lands in one folder."""
    out = tmp_path / "gpu-bench"
    env = {**os.environ, "PYTHON": sys.executable, "AVLOC_BENCH_BUDGET": "1300"}
    proc = subprocess.run(
        [str(RUN), "--device", "cpu", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1450,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = dict(line.split() for line in (out / "steps.txt").read_text().splitlines())
    assert set(steps) >= {"doctor", "models", "engine_ssl_align", "pipeline_1", "pipeline_2"}
    assert set(steps.values()) == {"0"}
    assert "backends:" in (out / "doctor.txt").read_text()
    report = json.loads((out / "engine_ssl_align.json").read_text())
    # --quick measures one batch size (2: the batched path), both graphs, on both CPU backends
    assert {(r["backend"], r["graph"], r["batch"]) for r in report["results"]} == {
        (b, g, 2) for b in ("onnxruntime", "torch") for g in ("audio", "visual")
    }
    assert set(report["startup"]) == {"onnxruntime", "torch"}
    for streams in (1, 2):
        pipe = json.loads((out / f"pipeline_{streams}.json").read_text())["pipeline"]
        assert pipe["streams"] == streams and pipe["heatmap_fps"] > 0
    md = (out / "summary.md").read_text()
    assert "| ssl_align | onnxruntime | visual | 2 |" in md and "| pipeline_2 | torch | 2 |" in md
    assert (out / "summary.png").is_file() and (out / "engine_ssl_align.png").is_file()

"""``avloc bench pipeline``: a short real run (pipeline, then the eager baseline) and the JSON it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from proc_helpers import orphans

from avloc.cli import main as cli_main
from avloc.stream.run.report import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_bench_pipeline_writes_its_json(engine_and_video, tmp_path):
    """2.5 s of the real pipeline + 2.5 s of the baseline: every part of the report is there and consistent."""
    engine, video = engine_and_video
    out = tmp_path / "bench" / "pipeline.json"
    # a loaded shared machine can stall the workers' start for long: more slack for the first heatmap
    config = tmp_path / "stream.yaml"
    config.write_text(f"_base: {ROOT / 'configs' / 'stream.yaml'}\nstartup_grace_s: 180.0\nheartbeat_timeout_s: 30.0\n")
    argv = [
        "bench",
        "pipeline",
        "--video",
        str(video),
        "--engine",
        str(engine),
        "--duration",
        "2.5",
        "--warmup",
        "0.5",
        "--threads",
        "1",
        "--config",
        str(config),
        "--out",
        str(out),
    ]
    assert cli_main(argv) == 0
    result = json.loads(out.read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["pipeline.json", "pipeline.png", "pipeline_run"]
    assert result["histograms_png"] == str(out.with_suffix(".png"))
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert result["video"] == {"path": str(video), "width": 160, "height": 120, "fps": 15.0, "has_audio": True}
    assert "--duration 2.5" in result["command"] and result["machine"]["cpus"] >= 1

    pipe = result["pipeline"]
    assert pipe["backend"] == "onnxruntime" and pipe["streams"] == 1
    assert 2.5 <= pipe["measured_s"] < 4.0
    assert all(n == 0 for n in pipe["restarts"].values()) and set(pipe["restarts"]) == {
        "replay",
        "inference",
        "display",
    }
    assert set(pipe["cpu_percent"]) == {"replay", "inference", "display", "launcher"}
    # CPU per unit of work over the same window: every process's CPU-ms / the heatmaps measured
    total_ms = sum(pipe["cpu_percent"].values()) * 10.0 * pipe["measured_s"]
    assert pipe["cpu_ms"]["all_per_heatmap"] == pytest.approx(total_ms / pipe["heatmaps"], rel=0.01)
    assert pipe["cpu_ms"]["capture_per_source_frame"] > 0
    # heatmaps of the measured window only: at most the video's 15 fps (+ one at each end of the window)
    assert pipe["heatmaps"] >= 3 and pipe["heatmaps"] <= 15 * pipe["measured_s"] + 2
    assert 0 < pipe["heatmap_fps"] <= 15 * 1.2
    e2e = pipe["e2e_ms"]
    assert e2e["n"] == pipe["heatmaps"] and 0 < e2e["p50"] <= e2e["p90"] <= e2e["p99"] <= e2e["max"]
    # the stages partition each heatmap's way (capture -> ... -> display): their means add up to the e2e mean
    stages = [name for name in STAGES if name != "e2e"]
    assert set(pipe["stages_ms"]) >= set(stages)
    assert all(pipe["stages_ms"][s]["n"] == e2e["n"] for s in stages)
    assert sum(pipe["stages_ms"][s]["mean"] for s in stages) == pytest.approx(e2e["mean"], abs=0.01)
    # the run's own latency log holds at least the measured heatmaps
    lines = (out.parent / "pipeline_run" / "latency.jsonl").read_text().splitlines()
    assert len(lines) >= pipe["heatmaps"]

    base = result["baseline"]
    assert base["frames"] >= 1 and base["fps"] > 0 and base["per_frame_ms"]["n"] == base["frames"]
    assert set(base["stages_ms"]) == {"decode", "spectrogram", "model"}
    assert result["speedup"]["heatmap_fps_ratio"] == pytest.approx(pipe["heatmap_fps"] / base["fps"], abs=0.01)
    assert orphans() == []


def test_sweep_finds_the_largest_passing_stream_count():
    from avloc.stream.tools.bench import sweep_streams

    for limit, upper in ((5, 16), (16, 16), (0, 8), (12, 12), (3, 3)):
        tried: list[int] = []

        def run(n: int, limit=limit, tried=tried) -> dict:
            tried.append(n)
            return {"streams": n, "passed": n <= limit}

        best, points = sweep_streams(run, upper)
        assert best == limit, (limit, upper, tried)
        assert len(tried) == len(set(tried)) and [p["streams"] for p in points] == sorted(tried)
        assert len(tried) <= 2 * upper.bit_length() + 1  # doubling then bisection, not a linear scan


def test_per_stream_summary_rates_served_share_and_fairness():
    from avloc.stream.run.report import summarize_records

    def rec(stream: str, seq: int, t: float, e2e: float, notice: str | None = None) -> dict:
        return {"stream": stream, "seq": seq, "notice": notice, "ts": {"capture": t - e2e, "display": t}}

    # over a 2 s window at a 10 fps source: cam0 gets all 20 frames, cam1 every other one (+ 3 suppressed)
    records = [rec("cam0", i, 100 + i / 10, 0.01) for i in range(20)]
    records += [rec("cam1", i, 100 + i / 10, 0.03) for i in range(0, 20, 2)]
    records += [rec("cam1", i, 100 + i / 10, 0.0, notice="no_audio") for i in (1, 3, 5)]
    result = summarize_records(records, window_s=2.0, fps=10.0)
    cam0, cam1 = result["per_stream"]["cam0"], result["per_stream"]["cam1"]
    assert (cam0["heatmaps"], cam0["fps"], cam0["served"]) == (20, 10.0, 1.0)
    assert (cam1["heatmaps"], cam1["fps"], cam1["served"]) == (10, 5.0, 0.5)
    assert cam0["e2e_ms"]["p50"] == pytest.approx(10.0) and cam1["e2e_ms"]["p99"] == pytest.approx(30.0)
    assert result["fairness"] == 0.5 and result["served_min"] == 0.5

"""What a run reports: the display's per-frame latency log (``latency.jsonl``) read and summarized.

Per-stage latencies and their percentiles, per-stream rates and fairness, how often a heatmap's peak falls in the
sounding object's box, and the summary ``avloc replay`` / ``avloc run`` print. One implementation for the command
lines in this room and the tools above it (``avloc bench pipeline``, ``avloc bench soak``, ``avloc demo``).
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from avloc.stream.capture.devices import why_no_heatmaps
from avloc.stream.wire.protocol import NOTICE_NOT_VISIBLE, NOTICE_WARMING_UP

# stage name -> (start timestamp, end timestamp) in a latency-log record's "ts"
STAGES: dict[str, tuple[str, str]] = {
    "capture_to_send": ("capture", "send"),
    "transport": ("send", "received"),
    "queue_wait": ("received", "infer_start"),
    "audio_and_preprocess": ("infer_start", "visual_start"),
    "visual_engine": ("visual_start", "infer_end"),
    "publish": ("infer_end", "publish"),
    "publish_to_display": ("publish", "display"),
    "e2e": ("capture", "display"),
}


def percentiles(values_s: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds (NaN when empty)."""
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    if arr.size == 0:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan, "mean": math.nan}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "n": int(arr.size),
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(arr.max()), 3),
        "mean": round(float(arr.mean()), 3),
    }


def read_latency_log(path: Path) -> list[dict[str, Any]]:
    records = []
    if not Path(path).is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed display
    return records


def suppressed(record: dict[str, Any]) -> bool:
    """A heatmap published without running the engine (e.g. no_audio). ``not_visible`` and ``warming_up`` ones
    were computed (the notice only marks them), so they count in the latencies like any other."""
    notice = record.get("notice")
    return bool(notice) and notice not in (NOTICE_NOT_VISIBLE, NOTICE_WARMING_UP)


def stage_samples(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Seconds per stage for every heatmap that was computed (suppressed ones only count as e2e-less)."""
    out: dict[str, list[float]] = {name: [] for name in STAGES}
    out["audio_embedding"] = []
    for rec in records:
        if suppressed(rec):
            continue
        ts = rec.get("ts", {})
        for name, (a, b) in STAGES.items():
            if a in ts and b in ts:
                out[name].append(ts[b] - ts[a])
        if rec.get("audio_ms") is not None:
            out["audio_embedding"].append(float(rec["audio_ms"]) / 1000.0)
    return out


def per_stream_summary(
    records: list[dict[str, Any]], window_s: float | None = None, fps: float | None = None
) -> dict[str, Any]:
    """Each stream's computed heatmaps, rate, e2e percentiles and (given the source ``fps``) the share of its
    frames served; plus ``fairness`` = slowest / fastest stream rate. Rates are over ``window_s`` (the
    measured window) when given, else over each stream's own span of display times."""
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        if not suppressed(rec):
            by_stream.setdefault(str(rec.get("stream")), []).append(rec)
    out: dict[str, Any] = {}
    for stream in sorted(by_stream):
        recs = by_stream[stream]
        shown = sorted(r["ts"]["display"] for r in recs if "display" in r.get("ts", {}))
        span = window_s if window_s else (shown[-1] - shown[0] if len(shown) > 1 else 0.0)
        count = len(recs) if window_s else max(0, len(shown) - 1)
        e2e = [r["ts"]["display"] - r["ts"]["capture"] for r in recs if {"display", "capture"} <= set(r["ts"])]
        info: dict[str, Any] = {
            "heatmaps": len(recs),
            "fps": round(count / span, 2) if span > 0 else 0.0,
            "e2e_ms": percentiles(e2e),
        }
        if fps and window_s:
            info["served"] = round(len(recs) / (fps * window_s), 3)
        out[stream] = info
    rates = [v["fps"] for v in out.values()]
    summary: dict[str, Any] = {"per_stream": out, "fairness": None, "served_min": None}
    if rates and max(rates) > 0:
        summary["fairness"] = round(min(rates) / max(rates), 3)
    served = [v["served"] for v in out.values() if "served" in v]
    if served:
        summary["served_min"] = min(served)
    return summary


def summarize_records(
    records: list[dict[str, Any]], window_s: float | None = None, fps: float | None = None
) -> dict[str, Any]:
    computed = [r for r in records if not suppressed(r)]
    display_ts = sorted(r["ts"]["display"] for r in computed if "display" in r.get("ts", {}))
    span = display_ts[-1] - display_ts[0] if len(display_ts) > 1 else 0.0
    samples = stage_samples(records)
    streams = sorted({r.get("stream") for r in records})
    embeds = [x for x in samples["audio_embedding"] if x > 0]
    return {
        "heatmaps": len(computed),
        "suppressed": len(records) - len(computed),
        "streams": streams,
        "heatmap_fps": round((len(display_ts) - 1) / span, 2) if span > 0 else 0.0,
        "heatmap_fps_per_stream": round((len(display_ts) - 1) / span / max(1, len(streams)), 2) if span > 0 else 0.0,
        "e2e_ms": percentiles(samples["e2e"]),
        "stages_ms": {name: percentiles(v) for name, v in samples.items() if name != "e2e"},
        "audio_embedding_computed_ms": percentiles(embeds),
        "drops": max((int(r.get("drops") or 0) for r in records), default=0),
        "frames_seen": len({(r.get("stream"), r.get("seq")) for r in records}),
        **per_stream_summary(records, window_s, fps),
    }


def summarize_latency_log(path: Path) -> dict[str, Any]:
    return summarize_records(read_latency_log(path))


def peak_hits(records: list[dict[str, Any]], boxes: list[list[float]], fps: float) -> dict[str, Any]:
    """How many computed heatmaps have their peak inside the box of the frame they were computed on."""
    hits = total = 0
    for rec in records:
        if rec.get("notice") or rec.get("peak") is None or rec.get("pts") is None:
            continue
        index = min(max(int(round(float(rec["pts"]) * fps)), 0), len(boxes) - 1)
        x1, y1, x2, y2 = boxes[index]
        x, y = rec["peak"]
        total += 1
        hits += int(x1 <= x <= x2 and y1 <= y <= y2)
    return {"frames_scored": total, "peak_in_box": hits, "fraction": round(hits / total, 4) if total else 0.0}


def box_area_fraction(boxes: list[list[float]]) -> float:
    """Mean area of the boxes as a fraction of the frame: the hit rate of a peak placed at random."""
    areas = [max(0.0, x2 - x1) * max(0.0, y2 - y1) for x1, y1, x2, y2 in boxes]
    return sum(areas) / len(areas) if areas else 0.0


def print_summary(summary: dict[str, Any]) -> None:
    lat = summary.get("latency") or {}
    e2e = lat.get("e2e_ms") or {}
    print(
        f"pipeline {summary['reason']}: {lat.get('heatmaps', 0)} heatmaps "
        f"at {lat.get('heatmap_fps', 0):.1f} fps, "
        f"e2e p50 {e2e.get('p50', float('nan')):.1f} ms, p99 {e2e.get('p99', float('nan')):.1f} ms, "
        f"suppressed {lat.get('suppressed', 0)}"
    )
    if explanation := why_no_heatmaps(summary):
        print(f"  {explanation}")
    per_stream = lat.get("per_stream") or {}
    if len(per_stream) > 1:
        for stream, info in per_stream.items():
            e2e_s = info.get("e2e_ms") or {}
            print(
                f"  {stream}: {info.get('heatmaps', 0)} heatmaps at {info.get('fps', 0):.1f} fps, "
                f"e2e p50 {e2e_s.get('p50', float('nan')):.1f} ms, p99 {e2e_s.get('p99', float('nan')):.1f} ms"
            )
        print(f"  fairness (min/max heatmap rate): {lat.get('fairness')}")
    for gap in summary.get("heatmap_gaps", []):
        print(f"  {gap['process']} restarted: heatmaps resumed after a {gap['gap_s']} s gap")
    for name, proc in summary["processes"].items():
        if proc["restarts"]:
            print(f"  {name}: {proc['restarts']} restart(s)")
    if summary.get("record"):
        print(f"recording: {summary['record']}")
    print(f"logs, latency log and summary: {summary['run_dir']}")


def machine_info() -> dict[str, Any]:
    """The machine a run was measured on, with its load average before it (reports quote it next to numbers)."""
    import psutil  # why: only when a report is written, not for --help

    return {
        "cpus": os.cpu_count(),
        "cpu_model": platform.processor() or platform.machine(),
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }

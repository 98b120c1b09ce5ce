"""The soak's report (``avloc bench soak``, stream/tools/soak.py): heatmap gaps matched to fault windows, RSS growth per
process, and the markdown section of docs/reliability.md."""

from __future__ import annotations

from typing import Any

import numpy as np

RSS_GROWTH_FLAG_PCT = 5.0
MIN_GAP_S = 2.0
GAP_MEDIAN_FACTOR = 4.0  # a gap is also at least this many typical heatmap intervals
RECOVERY_MARGIN_S = 1.0  # a fault's window ends this long after its first heatmap after recovery


def gap_threshold(records: list[dict[str, Any]]) -> float:
    """``MIN_GAP_S``, or ``GAP_MEDIAN_FACTOR`` typical intervals between heatmaps when they are that sparse."""
    intervals: list[float] = []
    by_stream: dict[str, list[float]] = {}
    for r in records:
        by_stream.setdefault(str(r.get("stream")), []).append(r["t"])
    for ts in by_stream.values():
        ts.sort()
        intervals += list(np.diff(ts))
    typical = float(np.median(intervals)) if intervals else 0.0
    return round(max(MIN_GAP_S, GAP_MEDIAN_FACTOR * typical), 3)


def find_gaps(records: list[dict[str, Any]], end_s: float) -> list[dict[str, Any]]:
    """Intervals longer than ``gap_threshold`` without a delivered heatmap, per stream (from the soak's start, at
    its first heatmap, to its end)."""
    threshold = gap_threshold(records)
    by_stream: dict[str, list[float]] = {}
    for r in records:
        by_stream.setdefault(str(r.get("stream")), []).append(r["t"])
    gaps = []
    for stream, ts in sorted(by_stream.items()):
        points = [0.0, *sorted(ts), end_s]
        for a, b in zip(points, points[1:]):
            if b - a > threshold:
                gaps.append(
                    {"stream": stream, "start_s": round(a, 3), "end_s": round(b, 3), "length_s": round(b - a, 3)}
                )
    for g in gaps:
        g["threshold_s"] = threshold
    return sorted(gaps, key=lambda g: g["start_s"])


def fault_windows(faults: list[Any], end_s: float) -> list[dict[str, Any]]:
    """When each fault may explain a gap: from its injection to ``RECOVERY_MARGIN_S`` after the first heatmap
    after its recovery (the end of the run when it never recovered)."""
    out = []
    for f in faults:
        if f.injected_s is None:
            continue
        last = f.resumed_s or f.ready_s or f.details.get("sent_until_s")
        end = end_s if last is None else min(end_s, last + RECOVERY_MARGIN_S)
        out.append({"fault": f"{f.kind} {f.target}", "start_s": f.injected_s, "end_s": round(end, 3)})
    return out


def rss_report(incarnations: dict[str, dict[int, dict[str, Any]]], min_quiet_s: float) -> dict[str, Any]:
    """Per process: RSS at the start (first incarnation, once settled) and at the end (last incarnation), and its
    growth: over the quiet end of the run (every fault over) when that lasted ``min_quiet_s``, else over its
    longest-lived incarnation (the schedule restarts every worker). Growth of ``RSS_GROWTH_FLAG_PCT`` or more is
    flagged."""

    def pct(a: int, b: int) -> float:
        return round(100.0 * (b - a) / a, 2)

    out: dict[str, Any] = {}
    for name, by_pid in incarnations.items():
        lives = [
            {
                "pid": pid,
                "from_s": e["rss_first"][0],
                "to_s": e["rss_last"][0],
                "rss_first_mb": round(e["rss_first"][1] / 2**20, 1),
                "rss_last_mb": round(e["rss_last"][1] / 2**20, 1),
                "growth_pct": pct(e["rss_first"][1], e["rss_last"][1]),
                **(
                    {"quiet_from_s": e["rss_quiet"][0], "quiet_growth_pct": pct(e["rss_quiet"][1], e["rss_last"][1])}
                    if "rss_quiet" in e
                    else {}
                ),
            }
            for pid, e in by_pid.items()
            if "rss_first" in e
        ]
        entry: dict[str, Any] = {"incarnations": len(by_pid), "restarts": max(0, len(by_pid) - 1)}
        if not lives:
            out[name] = {**entry, "rss_start_mb": None}
            continue
        longest = max(lives, key=lambda x: x["to_s"] - x["from_s"])
        last = lives[-1]
        quiet = "quiet_from_s" in last and last["to_s"] - last["quiet_from_s"] >= min_quiet_s
        growth = last["quiet_growth_pct"] if quiet else longest["growth_pct"]
        out[name] = {
            **entry,
            "rss_start_mb": lives[0]["rss_first_mb"],
            "rss_end_mb": last["rss_last_mb"],
            "growth_pct": growth,
            "growth_over": (
                f"quiet end {last['quiet_from_s']:.0f}-{last['to_s']:.0f} s"
                if quiet
                else f"longest life {longest['from_s']:.0f}-{longest['to_s']:.0f} s"
            ),
            "longest_life_growth_pct": longest["growth_pct"],
            "flag": growth >= RSS_GROWTH_FLAG_PCT,
            "lives": lives,
        }
    return out


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value}"


def markdown(report: dict[str, Any]) -> str:
    """The report as the markdown section of docs/reliability.md."""
    s = report["summary"]
    lines = [
        f"Command: `{report.get('command', 'avloc bench soak')}` ({report.get('date', '')}; "
        f"{report.get('machine_note', '')})",
        "",
        f"{report['duration_s']:.0f} s measured (planned {report['planned_s']:.0f} s, start-up "
        f"{report['startup_s']:.0f} s); {s['faults_injected']}/{s['faults_planned']} faults injected, "
        f"{s['faults_detected_and_recovered']} detected and recovered; {s['gaps']} heatmap gaps "
        f"(> {report['gap_threshold_s']} s), {s['unaccounted_gaps']} unaccounted; RSS growth flagged: "
        f"{', '.join(s['rss_flagged']) or 'none'}.",
        "",
        "| stream | source | frames captured | heatmaps delivered | delivered / captured | heatmaps/s |",
        "|---|---|---|---|---|---|",
    ]
    for stream, v in report["streams"].items():
        lines.append(
            f"| {stream} | {v['source']} | {v['frames_captured']} | {v['heatmaps_delivered']} | "
            f"{_fmt(v['delivered_per_captured'])} | {_fmt(v['heatmap_fps'])} |"
        )
    lines += [
        "",
        "| process | restarts | RSS start (MB) | RSS end (MB) | growth | over | growth of its longest life | "
        "flag (≥ 5 %) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p in report["processes"].items():
        if p.get("rss_start_mb") is None:
            lines.append(f"| {name} | {p['restarts']} | – | – | – | – | – | – |")
            continue
        lines.append(
            f"| {name} | {p['restarts']} | {p['rss_start_mb']} | {p['rss_end_mb']} | {p['growth_pct']} % | "
            f"{p['growth_over']} | {p['longest_life_growth_pct']} % | {'**yes**' if p['flag'] else 'no'} |"
        )
    lines += [
        "",
        "| fault | at (s) | detected after (s) | restarted after (s) | ready after (s) | heatmaps after (s) | ok | "
        "details |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in report["faults"]:
        details = ", ".join(
            f"{k} {v}" for k, v in f["details"].items() if k not in ("pid", "new_pid", "sent_until_s", "restored_s")
        )
        lines.append(
            f"| {f['kind']} {f['target']} | {_fmt(f['injected_s'])} | {_fmt(f.get('detected_after_s'))} | "
            f"{_fmt(f.get('restarted_after_s'))} | {_fmt(f.get('ready_after_s'))} | "
            f"{_fmt(f.get('resumed_after_s'))} | {'yes' if f['ok'] else '**no**'} | {details} |"
        )
    lines += ["", "| gap (stream) | from (s) | to (s) | length (s) | explained by |", "|---|---|---|---|---|"]
    for g in report["gaps"]:
        lines.append(
            f"| {g['stream']} | {g['start_s']} | {g['end_s']} | {g['length_s']} | "
            f"{'; '.join(g['faults']) or '**unaccounted**'} |"
        )
    return "\n".join(lines) + "\n"

#!/usr/bin/env bash
# Capacity and graceful overload (issue 24), third session: as bench/capacity-2026-12-07/run.sh (one inference
# worker, the configs/cpu.yaml engine, the 640x480 @ 30 fps stamps clip, flow control on) with the audio windows
# thinned while a stream is throttled (avloc.stream.wire.flow.audio_spacing) and each point's CPU cost per served
# heatmap and per source frame (`cpu_ms`). Sweep: the largest N with every stream served >= 95 % and e2e p99
# <= 100 ms, then 1.5x, 2x and 4x that N (at capacity 1: 2, 2 and 4 streams). Criterion, load average before and
# after each run, and every point are in sweep.json; sweep.png plots them. ~2 min at capacity 1, ~5 at capacity 2.
# Run it on an idle machine: `uptime` before and after is kept next to the JSON.
set -u
cd "$(dirname "$0")/../.."
OUT=bench/capacity-2026-12-07b
ENGINE=${ENGINE:-/work/data/flow_engine}   # avloc export --checkpoint RUN/best.pt --out ENGINE --calibration DATA
CLIP=${CLIP:-/work/data/flow_stamps/video/clip_0000.mp4}  # avloc data stamps ... --videos 2
PY=${PY:-.venv/bin/python}
uptime > $OUT/uptime_start.txt
$PY -m avloc bench pipeline --sweep --video "$CLIP" --engine "$ENGINE" --sweep-workers 1 \
    --sweep-max-streams 8 --overload 1.5,2,4 --duration 8 --warmup 3 --out $OUT/sweep.json > $OUT/sweep.log 2>&1
echo "exit $?" >> $OUT/sweep.log
uptime > $OUT/uptime_end.txt
find $OUT -name latency.jsonl -delete  # per-heatmap logs (MBs each); the summaries stay
# one line per point: streams, heatmaps/s, served, fairness, p99, CPU-ms per heatmap (all / inference / captures)
$PY - "$OUT/sweep.json" <<'PY' | tee $OUT/table.txt
import json, sys
d = json.load(open(sys.argv[1]))
print("criterion", json.dumps(d["criterion"]), "load", d["machine"].get("load_avg_before"), d["machine"].get("load_avg_after"))
for workers, s in d["sweep"].items():
    for p in s["points"]:
        c = p.get("cpu_ms") or {}
        print(f"w{workers} n{p['streams']}: {p['heatmap_fps']} heatmaps/s, served >= {p['served_min']}, fairness {p['fairness']}, "
              f"p99 {p['e2e_p99_ms']} ms, CPU-ms/heatmap all {c.get('all_per_heatmap')} inference {c.get('inference_per_heatmap')} "
              f"captures {c.get('captures_per_heatmap')}, capture CPU-ms/source frame {c.get('capture_per_source_frame')}, "
              f"load {p['load_avg_before'][0]}->{p['load_avg_after'][0]} {'pass' if p['passed'] else 'fail'}")
    for r in s.get("overload", {}).get("runs", []):
        print(f"w{workers} {r['factor']}x = {r['streams']} streams: goodput {r['goodput']}, fairness {r['fairness']}, "
              f"p99 {r['e2e_p99_ms']} (bound {r['p99_bound_ms']}) {'pass' if r['passed'] else 'fail'}")
PY

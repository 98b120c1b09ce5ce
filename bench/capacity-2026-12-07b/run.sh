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
$PY scripts/sweep_table.py $OUT/sweep.json | tee $OUT/table.txt

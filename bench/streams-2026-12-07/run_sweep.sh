#!/usr/bin/env bash
# Capacity and overload (issue 24) on this 2-core machine, one inference worker, the configs/cpu.yaml engine
# (SSL-Align width 64, 128 px, 3 s mel; speed does not depend on the weights). The machine was shared with other
# sessions' tests and a training run: each run's load average is in the JSON (load_avg_before/after).
#   with flow control (the default) and without (--no-flow-control), each: the largest N with every stream
#   served >= 95 % and e2e p99 <= 100 ms, then 1.5x, 2x and 4x that N.
set -u
cd "$(dirname "$0")/../.."
A=".venv/bin/python -m avloc"
OUT=bench/streams-2026-12-07
ENGINE=${ENGINE:-/work/data/flow_engine}   # avloc export --checkpoint RUN/best.pt --out ... (configs/cpu.yaml run)
CLIP=${CLIP:-/work/data/flow_stamps/video/clip_0000.mp4}  # avloc data stamps ... --videos 2 (640x480, 30 fps, boxes)
uptime > $OUT/uptime_start.txt
for MODE in flow noflow; do
  EXTRA=""; [ $MODE = noflow ] && EXTRA="--no-flow-control"
  $A bench pipeline --sweep --video $CLIP --engine $ENGINE --sweep-workers 1 --sweep-max-streams 16 \
      --overload 1.5,2,4 --duration 8 --warmup 3 $EXTRA --out $OUT/sweep_$MODE.json > $OUT/sweep_$MODE.log 2>&1
done
uptime > $OUT/uptime_end.txt
# keep the per-run logs and summaries, not the per-heatmap latency logs (MBs each)
find $OUT -name latency.jsonl -delete

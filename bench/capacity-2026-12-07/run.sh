#!/usr/bin/env bash
# Capacity and graceful overload (issue 24) on the 2-core machine, one inference worker, the configs/cpu.yaml
# engine (SSL-Align width 64, 128 px, 3 s mel; int8 audio graph as `avloc export --calibration` keeps it, fp32
# visual: its int8 failed the export's accuracy gate; speed does not depend on the weights), the 640x480 @ 30 fps
# stamps clip, flow control on (the default). Sweep: the largest N with every stream served >= 95 % and e2e
# p99 <= 100 ms, then 1.5x, 2x and 4x that N. The machine's load average is in the JSON per run.
set -u
cd "$(dirname "$0")/../.."
OUT=bench/capacity-2026-12-07
ENGINE=${ENGINE:-/work/data/flow_engine}   # avloc export --checkpoint RUN/best.pt --out ENGINE --calibration DATA
CLIP=${CLIP:-/work/data/flow_stamps/video/clip_0000.mp4}  # avloc data stamps ... --videos 2
uptime > $OUT/uptime_start.txt
.venv/bin/python -m avloc bench pipeline --sweep --video "$CLIP" --engine "$ENGINE" --sweep-workers 1 \
    --sweep-max-streams 12 --overload 1.5,2,4 --duration 8 --warmup 3 --out $OUT/sweep.json > $OUT/sweep.log 2>&1
echo "exit $?" >> $OUT/sweep.log
uptime > $OUT/uptime_end.txt
find $OUT -name latency.jsonl -delete  # per-heatmap logs (MBs each); the summaries stay

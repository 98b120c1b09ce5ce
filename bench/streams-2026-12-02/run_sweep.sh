#!/usr/bin/env bash
# Load benchmark (issue 11), run at normal priority with no training running: how many real-time replay streams one and two inference workers serve on this
# 2-core machine with the tiny demo engine. Outputs under bench/streams-2026-12-02/.
set -u
cd "$(dirname "$0")/../.."
A=.venv/bin/avloc
OUT=bench/streams-2026-12-02
ENGINE=/tmp/perf/demo_engine   # a copy of demo_out/engine (avloc demo: SSL-Align width 32, 128 px, 3 s mel)
CLIP=/tmp/perf/clip/video/clip_0000.mp4
[ -f $CLIP ] || $A data stamps --out /tmp/perf/clip --n-train 4 --n-val 2 --n-test 2 --videos 1 --video-seconds 10 --seed 3
uptime > $OUT/uptime_start.txt
# 1. the largest N with every stream served >= 95 % of its frames and e2e p99 <= 100 ms, 1 and 2 workers
$A bench pipeline --sweep --video $CLIP --engine $ENGINE --sweep-workers 1,2 --sweep-max-streams 16 \
    --duration 8 --warmup 2 --out $OUT/sweep.json > $OUT/sweep.log 2>&1
# 2. overload: twice the streams one worker can serve (N from the sweep), for the latency bound
N=$(.venv/bin/python -c "import json; print(2 * max(1, json.load(open('$OUT/sweep.json'))['sweep']['1']['max_streams']))")
$A bench pipeline --video $CLIP --engine $ENGINE --streams $N --duration 10 --warmup 2 --no-baseline \
    --out $OUT/overload_${N}.json > $OUT/overload.log 2>&1
uptime > $OUT/uptime_end.txt
# 3. the 12-stream run of issue 11 (one worker)
$A bench pipeline --video $CLIP --engine $ENGINE --streams 12 --duration 10 --warmup 2 --no-baseline \
    --out $OUT/overload_12.json > $OUT/overload_12.log 2>&1
# keep the per-run logs and summaries, not the per-heatmap latency logs (MBs each)
find $OUT -name latency.jsonl -delete

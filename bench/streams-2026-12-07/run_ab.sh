#!/usr/bin/env bash
# Flow control on/off (and capture niceness) at fixed overload, interleaved so the other sessions' load
# (recorded per run: load_avg_before/after) falls on both sides alike; two rounds.
set -u
cd "$(dirname "$0")/../.."
A=".venv/bin/python -m avloc"
OUT=bench/streams-2026-12-07/ab
ENGINE=${ENGINE:-/work/data/flow_engine}
CLIP=${CLIP:-/work/data/flow_stamps/video/clip_0000.mp4}
mkdir -p $OUT
for ROUND in 1 2; do
  for RUN in "flow 4" "noflow 4" "flow 8" "noflow 8" "flownice 8"; do
    set -- $RUN; MODE=$1; N=$2; EXTRA=""
    [ $MODE = noflow ] && EXTRA="--no-flow-control"
    [ $MODE = flownice ] && EXTRA="--capture-nice 10"
    $A bench pipeline --video $CLIP --engine $ENGINE --streams $N --duration 8 --warmup 3 --no-baseline $EXTRA \
        --out $OUT/${MODE}_n${N}_r${ROUND}.json > $OUT/${MODE}_n${N}_r${ROUND}.log 2>&1
  done
done
find $OUT -name latency.jsonl -delete

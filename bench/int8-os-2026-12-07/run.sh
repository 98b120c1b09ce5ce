#!/usr/bin/env bash
# int8 vs fp32 on a trained checkpoint (issue 24): the open-set recipe's os_s0 (configs/cpu_pretrained.yaml:
# EfficientNet-Lite0 256 px + YAMNet + label-space term), data /work/data/os. Results: docs/engines.md, "int8".
# The machine's load average before/after each step is in uptime_*.txt (and bench_engine.json).
set -u
cd "$(dirname "$0")/../.."
OUT=bench/int8-os-2026-12-07
CKPT=${CKPT:-/work/data/runs/os_s0/best.pt}
DATA=${DATA:-/work/data/os}
ENG=${ENG:-/work/data/engines}
# 1. the export with int8 (its gate's numbers are in the log and in the manifest's graphs.*.int8_rejected)
.venv/bin/python -m avloc export --checkpoint "$CKPT" --out $ENG/os_s0_int8 --int8 --calibration "$DATA" \
    > $OUT/export.log 2>&1
# 2. what the gate turned down: both graphs quantized again with the export's recipe, scored on test and test_unseen
uptime > $OUT/uptime_start.txt
.venv/bin/python scripts/int8_accuracy.py --engine $ENG/os_s0 --data "$DATA" --split test \
    --requantize $ENG/os_s0_rq --calibration "$DATA" --threads 2 --out $OUT/int8_accuracy_test.json
uptime >> $OUT/uptime_start.txt
uptime > $OUT/uptime_unseen.txt
.venv/bin/python scripts/int8_accuracy.py --engine $ENG/os_s0_rq --data "$DATA" --split test_unseen --threads 2 \
    --out $OUT/int8_accuracy_test_unseen.json
uptime >> $OUT/uptime_unseen.txt
# 3. per-call engine time, fp32 and int8 in the same run
uptime > $OUT/uptime_bench.txt
.venv/bin/python -m avloc bench engine --engine $ENG/os_s0_rq --backends onnxruntime,onnxruntime:int8 \
    --batch-sizes 1,4 --threads 2 --out $OUT/bench_engine.json > $OUT/bench_engine.log 2>&1
uptime >> $OUT/uptime_bench.txt

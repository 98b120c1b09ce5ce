#!/usr/bin/env bash
# Streaming benchmarks on the (now otherwise idle) 2-core machine. Outputs under bench/cpu-2026-11-30/.
set -u
cd "$(dirname "$0")/../.."
A=.venv/bin/avloc
OUT=bench/cpu-2026-11-30
mkdir -p $OUT
CLIP=/tmp/perf/clip/video/clip_0000.mp4
# inputs (made once): a full-size checkpoint after one step, its engines, a stamps clip
if [ ! -d /tmp/perf/e224q ]; then
  $A data synth --out /tmp/perf/synth --n-train 16 --n-val 8 --n-test 8 --image-size 224
  $A train --config configs/ssl_align.yaml --data /tmp/perf/synth --out /tmp/perf/run224 train.max_steps=1 \
      train.epochs=1 train.batch_size=8 train.num_workers=0 train.nn_index=null "loss.positives=[orig,aug]"
  $A export --checkpoint /tmp/perf/run224/best.pt --out /tmp/perf/e224 --force
  $A export --checkpoint /tmp/perf/run224/best.pt --out /tmp/perf/e224q --int8 --calibration /tmp/perf/synth --force
  $A data stamps --out /tmp/perf/clip --n-train 4 --n-val 2 --n-test 2 --videos 1 --video-seconds 10 --seed 3
fi
uptime > $OUT/uptime_start.txt
# 1. full-size SSL-Align (224 px, ResNet18 width 64, linear 3 s), fp32, with the eager baseline in the same run
$A bench pipeline --video $CLIP --engine /tmp/perf/e224 --backend onnxruntime --duration 20 --out $OUT/e224_fp32.json > $OUT/e224_fp32.log 2>&1
# 2. the same with the int8 audio graph (the int8 visual graph was rejected by the accuracy gate on this model)
$A bench pipeline --video $CLIP --engine /tmp/perf/e224q --backend onnxruntime --engine-option precision=int8 --duration 20 --no-baseline --out $OUT/e224_int8audio.json > $OUT/e224_int8audio.log 2>&1
# 3. the model trained in docs/results.md (128 px, width 16, 1 s audio): fp32 with baseline, and int8
$A export --checkpoint runs/results16/full/best.pt --out /tmp/perf/e128 --force > $OUT/export128.log 2>&1
$A export --checkpoint runs/results16/full/best.pt --out /tmp/perf/e128q --int8 --calibration data/stamps --force >> $OUT/export128.log 2>&1
$A bench pipeline --video $CLIP --engine /tmp/perf/e128 --backend onnxruntime --duration 20 --out $OUT/e128_fp32.json > $OUT/e128_fp32.log 2>&1
$A bench pipeline --video $CLIP --engine /tmp/perf/e128q --backend onnxruntime --engine-option precision=int8 --duration 20 --no-baseline --out $OUT/e128_int8.json > $OUT/e128_int8.log 2>&1
$A bench engine --engine /tmp/perf/e224 --out $OUT/engine_e224.json > $OUT/engine_e224.log 2>&1
uptime > $OUT/uptime_end.txt

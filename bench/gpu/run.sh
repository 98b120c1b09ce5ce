#!/usr/bin/env bash
# One GPU benchmark: bench/gpu/run.sh  (no arguments needed; about 8 minutes at most on one H100/H200)
#
#   1. avloc doctor                       -> OUT/doctor.txt
#   2. random-init engines + a 30 fps clip -> OUT/models/ (full-size SSL-Align; ACL if transformers is installed)
#   3. avloc bench engine, batch 1/4/16   -> OUT/engine_ssl_align.{json,png}, OUT/engine_acl.{json,png}
#      ONNX Runtime CUDA, torch eager / channels_last / CUDA graphs (fp32, fp16) / compile, TensorRT fp32/fp16
#      (TensorRT only if importable)
#   4. avloc bench pipeline, 1 and 16 replay streams at 30 fps -> OUT/pipeline_{1,16}.{json,png}
#   5. OUT/summary.md (tables, date, device) + OUT/summary.png
#
# Options: --out DIR (default bench/gpu-YYYY-MM-DD), --device cpu|cuda (default cuda),
#          --quick (tiny model, few iterations, short pipeline: the CPU dry run the tests use).
# Every step has a time limit inside one overall budget; a step that fails or runs out of time is listed in
# the summary and the next step still runs. Interpreter: $PYTHON, else .venv/bin/python, else python3.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
DEVICE=cuda
QUICK=0
OUT="bench/gpu-$(date -u +%F)"
ARGS="$*"
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
: > "$OUT/steps.txt"
echo "$ARGS" > "$OUT/args.txt"

# avloc's packages live in core/, engines/, ... (pyproject package-dir): without an install, a shim folder of
# symlinks makes `import avloc.engines` work from a bare checkout.
if ! "$PY" -c "import avloc.engines" 2>/dev/null; then
    SHIM="$OUT/.avloc-shim/avloc"
    mkdir -p "$SHIM"
    for f in "$ROOT"/avloc/*; do ln -sfn "$f" "$SHIM/$(basename "$f")"; done
    for pkg in core train engines stream; do ln -sfn "$ROOT/$pkg" "$SHIM/$pkg"; done
    export PYTHONPATH="$OUT/.avloc-shim${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$QUICK" = 1 ]; then
    # The dry run proves every step runs and lands in OUT, not speed: one (batched) size, a few calls, 2 s
    # pipelines. Its time is mostly process start-up (each step imports torch), which these cannot shorten.
    BUDGET=${AVLOC_BENCH_BUDGET:-900}; BATCHES=2; ITERS=3; WARMUP=1; PIPE_S=2; PIPE_WARM=0.5; STREAMS_MANY=2
else
    BUDGET=470; BATCHES=1,4,16; ITERS=200; WARMUP=20; PIPE_S=20; PIPE_WARM=3; STREAMS_MANY=16
fi
START=$SECONDS

# step NAME LIMIT_S CMD...: run with a limit (capped by what is left of the budget), log to OUT/NAME.log
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 10 ]; then
        echo "== $name: skipped, time budget spent"; echo "$name skipped-budget" >> "$OUT/steps.txt"; return 0
    fi
    # --quick (CPU dry run, possibly on a busy machine): only the overall budget limits a step.
    if [ "$QUICK" = 1 ] || [ "$limit" -gt "$left" ]; then limit=$left; fi
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name $rc" >> "$OUT/steps.txt"
    [ "$rc" = 0 ] || echo "== $name failed (exit $rc), continuing"
}

# The CPU dry run checks that each step runs, not how fast: two steps that each use one core (imports,
# --threads 1 benchmarks) run side by side there, on the 2 cores of a small machine. Measured runs stay
# one step at a time.
SIDE_BY_SIDE=0; [ "$QUICK" = 1 ] && [ "$DEVICE" = cpu ] && SIDE_BY_SIDE=1
# beside CMD...: `step CMD...` in the background when SIDE_BY_SIDE (collected by `wait`), else in the foreground
beside() { if [ "$SIDE_BY_SIDE" = 1 ]; then step "$@" & else step "$@"; fi; }

AVLOC=("$PY" -m avloc)
beside doctor 60 "${AVLOC[@]}" doctor

QUICK_FLAG=(); [ "$QUICK" = 1 ] && QUICK_FLAG=(--quick)
step models 240 "$PY" bench/gpu/helpers.py models "$OUT" "${QUICK_FLAG[@]}"
wait
cp "$OUT/doctor.log" "$OUT/doctor.txt" 2>/dev/null

if [ "$DEVICE" = cpu ]; then
    SSL_BACKENDS=onnxruntime,torch
    ACL_BACKENDS=onnxruntime,torch
    PIPE_OPTS=()
else
    SSL_BACKENDS=onnxruntime,torch,torch:channels_last,torch:cuda_graphs,torch:cuda_graphs+fp16,torch:compile
    ACL_BACKENDS=onnxruntime,torch,torch:cuda_graphs+fp16
    if "$PY" -c "import tensorrt" 2>/dev/null; then
        SSL_BACKENDS="$SSL_BACKENDS,tensorrt:fp32,tensorrt:fp16"
        ACL_BACKENDS="$ACL_BACKENDS,tensorrt:fp16"
    else
        echo "tensorrt is not importable: TensorRT rows skipped"
    fi
    PIPE_OPTS=(--engine-option mode=cuda_graphs)
fi
THREADS=(); [ "$DEVICE" = cpu ] && THREADS=(--threads 1)

beside engine_ssl_align 200 "${AVLOC[@]}" bench engine --engine "$OUT/models/ssl_align" --device "$DEVICE" \
    --backends "$SSL_BACKENDS" --batch-sizes "$BATCHES" --iters "$ITERS" --warmup "$WARMUP" "${THREADS[@]}" \
    --out "$OUT/engine_ssl_align.json"
if [ -d "$OUT/models/acl" ]; then
    step engine_acl 120 "${AVLOC[@]}" bench engine --engine "$OUT/models/acl" --device "$DEVICE" \
        --backends "$ACL_BACKENDS" --batch-sizes "$BATCHES" --iters $((ITERS / 4 + 1)) --warmup "$WARMUP" \
        "${THREADS[@]}" --out "$OUT/engine_acl.json"
fi
wait
BACKEND=torch
# The inference worker warms up (CUDA-graph capture, compilation) before it reports ready; the default 60 s
# start-up grace of configs/stream.yaml is too short for that (and for a busy CPU in the dry run).
sed -E 's/^startup_grace_s:.*/startup_grace_s: 600.0/' configs/stream.yaml > "$OUT/stream.yaml"
step pipeline_1 90 "${AVLOC[@]}" bench pipeline --video "$OUT/models/clip.mp4" --engine "$OUT/models/ssl_align" \
    --backend "$BACKEND" --device "$DEVICE" "${PIPE_OPTS[@]}" --streams 1 --duration "$PIPE_S" \
    --warmup "$PIPE_WARM" "${THREADS[@]}" --config "$OUT/stream.yaml" --out "$OUT/pipeline_1.json"
step "pipeline_$STREAMS_MANY" 90 "${AVLOC[@]}" bench pipeline --video "$OUT/models/clip.mp4" \
    --engine "$OUT/models/ssl_align" --backend "$BACKEND" --device "$DEVICE" "${PIPE_OPTS[@]}" \
    --streams "$STREAMS_MANY" --duration "$PIPE_S" --warmup "$PIPE_WARM" --no-baseline "${THREADS[@]}" \
    --config "$OUT/stream.yaml" --out "$OUT/pipeline_$STREAMS_MANY.json"

"$PY" bench/gpu/helpers.py summary "$OUT"
echo "total $((SECONDS - START)) s; everything is in $OUT (summary.md)"
# Exit 0 only if every step passed: the summary lists the ones that did not.
! grep -qv ' 0$' "$OUT/steps.txt"

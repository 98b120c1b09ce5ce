#!/usr/bin/env bash
# The GPU benchmark from a fresh clone, one command:   bench/gpu/run.sh
#
#   install           .venv-gpu with avloc[gpu] (bench/gpu/install.sh: pyproject's pins, offline via $AVLOC_WHEELS)
#   doctor            avloc doctor -> OUT/doctor.txt (providers a CUDA session really gets, TensorRT, triton)
#   clip              OUT/models/clip.mp4, 640x480 at 30 fps: first, so the pipeline steps have input whatever fails
#   models            random-init engines: full-size SSL-Align, ACL when transformers is installed
#   engine_ssl_align  avloc bench engine, batch 1/4/16 -> OUT/engine_ssl_align.{json,png}: eager torch (baseline,
#                     first), ONNX Runtime CUDA, torch channels_last / CUDA graphs fp32+fp16 / compile, TensorRT
#                     fp32+fp16; the JSON is rewritten after every backend
#   engine_acl        the same for ACL (fewer backends)
#   pipeline_1/_16    avloc bench pipeline, 1 and 16 replayed streams at 30 fps (torch CUDA graphs)
#   summary           OUT/summary.md + summary.png, then the table of what ran, failed or was skipped, and why
#
# Options: --out DIR (default bench/gpu-YYYY-MM-DD), --device cpu|cuda (default cuda), --quick (tiny model, few
#          iterations: the CPU dry run of the tests), --steps a,b,... (only these; e.g. to split the run over
#          several calls of a time-limited session: OUT is reused; the venv is made first if it is missing),
#          --budget S (overall seconds, default 3600), --archive FILE (also write OUT's results, logs and
#          summary, without the models, as one .tar.gz: e.g. for a machine that returns only a few files).
#          A bad option, step name or $PYTHON: one line, exit 2.
# $PYTHON: use this interpreter, no venv and no install (the tests); $AVLOC_BENCH_VENV: where the venv goes;
# $AVLOC_WHEELS: wheels to install from, no index (default: the checkout's .whl/ when it exists; install.sh).
# Every step has a time limit sized to its builds (capped by what is left of the budget); a step that fails or
# runs out of time is listed and the next step still runs. Exit status 0 only if no step failed.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
DEVICE=cuda
QUICK=0
OUT="bench/gpu-$(date -u +%F)"
STEPS=""
BUDGET=""
ARCHIVE=""
ARGS="$*"
# Bad arguments: one line, exit 2, before anything is created or run (a typo must not cost a GPU session).
die() { echo "run.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --device|--out|--steps|--budget|--archive) [ $# -ge 2 ] && [ -n "$2" ] && [[ "$2" != --* ]] || die "$1 needs a value (see --help)" ;;
    esac
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --steps) STEPS=",$2,"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --archive) ARCHIVE="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ "$DEVICE" =~ ^(cpu|cuda(:[0-9]+)?)$ ]] || die "--device $DEVICE: expected cpu, cuda or cuda:N"
[ -z "$BUDGET" ] || [[ "$BUDGET" =~ ^[1-9][0-9]*$ ]] || die "--budget $BUDGET: expected a whole number of seconds > 0"
STREAMS_MANY=16; [ "$QUICK" = 1 ] && STREAMS_MANY=2
KNOWN_STEPS="install doctor clip models engine_ssl_align engine_acl pipeline_1 pipeline_$STREAMS_MANY"
IFS=, read -ra ASKED <<< "$STEPS"  # not an unquoted expansion: --steps '*' must not glob
for s in "${ASKED[@]}"; do
    [ -z "$s" ] || [[ " $KNOWN_STEPS " == *" $s "* ]] || die "--steps: unknown step '$s'; known: ${KNOWN_STEPS// /,}"
done
[ -z "$STEPS" ] || [ -n "${STEPS//,/}" ] || die "--steps: no step named; known: ${KNOWN_STEPS// /,}"
if [ -n "${PYTHON:-}" ] && ! [ -x "$(command -v "$PYTHON")" ]; then
    die "PYTHON=$PYTHON: not an executable interpreter"
fi
mkdir -p "$OUT" || die "--out $OUT: cannot create this folder"
OUT="$(cd "$OUT" && pwd)"
touch "$OUT/steps.txt"
echo "$ARGS" > "$OUT/args.txt"

if [ "$QUICK" = 1 ]; then
    # The dry run proves every step runs and lands in OUT, not speed: one (batched) size, a few calls, 2 s
    # pipelines. Its time is mostly process start-up (each step imports torch), which these cannot shorten.
    BUDGET=${BUDGET:-${AVLOC_BENCH_BUDGET:-900}}; BATCHES=2; ITERS=3; WARMUP=1; PIPE_S=2; PIPE_WARM=0.5
    PIPE_RESERVE=0
else
    # PIPE_RESERVE: a pipeline step's start-up (processes, CUDA-graph capture for batch 1..16), warm-up and run
    BUDGET=${BUDGET:-3600}; BATCHES=1,4,16; ITERS=200; WARMUP=20; PIPE_S=20; PIPE_WARM=3; PIPE_RESERVE=90
fi
START=$SECONDS

# record NAME STATUS [REASON...]: one line of OUT/steps.txt (a re-run of a step replaces its line)
record() {
    local name="$1"; shift
    (  # under a lock: the dry run records two steps side by side
        flock 9
        grep -v "^$name " "$OUT/steps.txt" > "$OUT/steps.txt.new" || true
        echo "$name $*" >> "$OUT/steps.txt.new"
        mv "$OUT/steps.txt.new" "$OUT/steps.txt"
    ) 9> "$OUT/.steps.lock"
}
want() { [ -z "$STEPS" ] || [[ "$STEPS" == *",$1,"* ]]; }

# Seconds kept for the pipeline steps when they are asked for: a step before them (the engine benchmark, whose
# torch.compile and TensorRT builds can take every second they get) stops in time for them to run.
reserve_for_pipelines() {
    local r=0
    want pipeline_1 && r=$((r + PIPE_RESERVE))
    want "pipeline_$STREAMS_MANY" && r=$((r + PIPE_RESERVE))
    echo "$r"
}
# step NAME LIMIT_S CMD...: run with a limit (capped by what is left of the budget less $KEEP seconds), log to
# OUT/NAME.log
step() {
    local name="$1" limit="$2"
    shift 2
    if ! want "$name"; then return 0; fi
    local left=$((BUDGET - (SECONDS - START) - ${KEEP:-0}))
    if [ "$left" -lt 10 ]; then
        echo "== $name: skipped, time budget spent"; record "$name" skipped "budget of ${BUDGET}s spent"; return 0
    fi
    # --quick (CPU dry run, possibly on a busy machine): only the overall budget limits a step.
    if [ "$QUICK" = 1 ] || [ "$limit" -gt "$left" ]; then limit=$left; fi
    echo "== $name (limit ${limit}s)"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]} took=$((SECONDS - began))
    if [ "$rc" = 0 ]; then record "$name" 0 "${took}s"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then record "$name" "$rc" "time limit ${limit}s reached"
    else record "$name" "$rc" "see $name.log (${took}s)"; fi
    [ "$rc" = 0 ] || echo "== $name failed (exit $rc), continuing"
}
skip() { if want "$1"; then echo "== $1: skipped ($2)"; record "$1" skipped "$2"; fi; }

# --- interpreter: $PYTHON as given, else a venv of our own with avloc[gpu] -----------------------------------
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
    skip install "PYTHON=$PYTHON given: no venv, nothing installed"
else
    VENV="${AVLOC_BENCH_VENV:-$ROOT/.venv-gpu}"
    if [ ! -x "$VENV/bin/python" ] && ! want install; then
        # e.g. the second call of a split run on a fresh machine: the steps asked for need the venv
        echo "== no venv at $VENV: running the install step first"
        STEPS="$STEPS,install,"
    fi
    step install 1800 bash "$ROOT/bench/gpu/install.sh" "$VENV"
    PY="$VENV/bin/python"
    if [ ! -x "$PY" ]; then
        echo "== no venv at $VENV (see install.log): the steps run with $(command -v python3) as it is"
        PY=python3
    fi
fi
# Without an installed avloc (install failed, or $PYTHON without it) a shim folder of symlinks makes
# `import avloc.engines` work from the checkout (pyproject maps avloc's packages to core/, engines/, ...).
if ! "$PY" -c "import avloc.engines" 2>/dev/null; then
    SHIM="$OUT/.avloc-shim/avloc"
    mkdir -p "$SHIM"
    for f in "$ROOT"/avloc/*; do ln -sfn "$f" "$SHIM/$(basename "$f")"; done
    for pkg in core train engines stream configs; do ln -sfn "$ROOT/$pkg" "$SHIM/$pkg"; done
    export PYTHONPATH="$OUT/.avloc-shim${PYTHONPATH:+:$PYTHONPATH}"
    # `python -m avloc` puts the working directory (this checkout) first on sys.path, where avloc/ holds no
    # engines/ or core/: PYTHONSAFEPATH (Python >= 3.11, like avloc) leaves it out, also in the pipeline's workers.
    export PYTHONSAFEPATH=1
    "$PY" -c "import avloc.engines" || echo "== avloc is not importable even from the checkout: the steps will fail"
fi

# The CPU dry run checks that each step runs, not how fast: steps that each use about one core (imports,
# --threads 1 benchmarks) run side by side there, on the 2 cores of a small machine (doctor beside clip and
# models, the engine benchmark beside the pipelines). Measured runs stay one step at a time.
SIDE_BY_SIDE=0; [ "$QUICK" = 1 ] && [ "$DEVICE" = cpu ] && SIDE_BY_SIDE=1
# beside CMD...: `step CMD...` in the background when SIDE_BY_SIDE (collected by `wait`), else in the foreground
beside() { if [ "$SIDE_BY_SIDE" = 1 ]; then step "$@" & else step "$@"; fi; }

AVLOC=("$PY" -m avloc)
QUICK_FLAG=(); [ "$QUICK" = 1 ] && QUICK_FLAG=(--quick)
beside doctor 120 "${AVLOC[@]}" doctor
step clip 120 "$PY" bench/gpu/helpers.py clip "$OUT" "${QUICK_FLAG[@]}"
# Full-size exports with their ONNX Runtime parity runs: SSL-Align ~1 min, ACL (CLIPSeg) several.
ACL_FLAG=(); want engine_acl || ACL_FLAG=(--no-acl)
step models 900 "$PY" bench/gpu/helpers.py models "$OUT" "${QUICK_FLAG[@]}" "${ACL_FLAG[@]}"
wait
[ -f "$OUT/doctor.log" ] && cp "$OUT/doctor.log" "$OUT/doctor.txt"

if [ "$DEVICE" = cpu ]; then
    SSL_BACKENDS=onnxruntime,torch
    ACL_BACKENDS=onnxruntime,torch
    PIPE_OPTS=()
else
    SSL_BACKENDS=onnxruntime,torch,torch:channels_last,torch:cuda_graphs,torch:cuda_graphs+fp16,torch:compile
    ACL_BACKENDS=onnxruntime,torch,torch:cuda_graphs+fp16
    if TRT_ERR=$("$PY" -c "import tensorrt" 2>&1); then
        SSL_BACKENDS="$SSL_BACKENDS,tensorrt:fp32,tensorrt:fp16"
        ACL_BACKENDS="$ACL_BACKENDS,tensorrt:fp16"
    else
        want engine_ssl_align && record tensorrt skipped "not importable: $(echo "$TRT_ERR" | tail -n 1)"
    fi
    PIPE_OPTS=(--engine-option mode=cuda_graphs)
fi
THREADS=(); [ "$DEVICE" = cpu ] && THREADS=(--threads 1)

# Limits sized to the builds: SSL-Align's step compiles 2 graphs x 3 batch sizes (torch.compile, ~1 min each
# with autotuning) and builds 4 TensorRT plans (fp32/fp16 x audio/visual, 1-3 min each without a timing
# cache) before timing 9 backends x 3 sizes x 2 graphs x 220 calls.
if [ -f "$OUT/models/ssl_align/manifest.json" ]; then
    KEEP=$(reserve_for_pipelines) beside engine_ssl_align 1500 "${AVLOC[@]}" bench engine --engine "$OUT/models/ssl_align" --device "$DEVICE" \
        --backends "$SSL_BACKENDS" --batch-sizes "$BATCHES" --iters "$ITERS" --warmup "$WARMUP" "${THREADS[@]}" \
        --out "$OUT/engine_ssl_align.json"
else
    skip engine_ssl_align "no SSL-Align engine (the models step failed: see models.log)"
fi
if [ -f "$OUT/models/acl/manifest.json" ]; then
    KEEP=$(reserve_for_pipelines) step engine_acl 900 "${AVLOC[@]}" bench engine --engine "$OUT/models/acl" --device "$DEVICE" \
        --backends "$ACL_BACKENDS" --batch-sizes "$BATCHES" --iters $((ITERS / 4 + 1)) --warmup "$WARMUP" \
        "${THREADS[@]}" --out "$OUT/engine_acl.json"
else
    WHY=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["acl"]["skipped"])' \
        "$OUT/models/models.json" 2>/dev/null || echo "no ACL engine (the models step failed: see models.log)")
    skip engine_acl "$WHY"
fi
# The dry run's engine benchmark (one core: --threads 1) goes on beside the pipeline steps (they share no port
# or file); elsewhere every step already ran in the foreground, one at a time.
[ "$SIDE_BY_SIDE" = 1 ] || wait
BACKEND=torch
# The inference worker warms up (CUDA-graph capture for batch 1..16) before it reports ready; the default 60 s
# start-up grace of configs/stream.yaml is too short for that (and for a busy CPU in the dry run).
sed -E 's/^startup_grace_s:.*/startup_grace_s: 600.0/' configs/stream.yaml > "$OUT/stream.yaml"
if [ -f "$OUT/models/clip.mp4" ] && [ -f "$OUT/models/ssl_align/manifest.json" ]; then
    # pipeline_1 also runs the eager baseline on the same device (--device) for its speed-up ratio
    step pipeline_1 420 "${AVLOC[@]}" bench pipeline --video "$OUT/models/clip.mp4" \
        --engine "$OUT/models/ssl_align" --backend "$BACKEND" --device "$DEVICE" "${PIPE_OPTS[@]}" --streams 1 \
        --duration "$PIPE_S" --warmup "$PIPE_WARM" "${THREADS[@]}" --config "$OUT/stream.yaml" \
        --out "$OUT/pipeline_1.json"
    step "pipeline_$STREAMS_MANY" 420 "${AVLOC[@]}" bench pipeline --video "$OUT/models/clip.mp4" \
        --engine "$OUT/models/ssl_align" --backend "$BACKEND" --device "$DEVICE" "${PIPE_OPTS[@]}" \
        --streams "$STREAMS_MANY" --duration "$PIPE_S" --warmup "$PIPE_WARM" --no-baseline "${THREADS[@]}" \
        --config "$OUT/stream.yaml" --out "$OUT/pipeline_$STREAMS_MANY.json"
else
    skip pipeline_1 "no clip or no SSL-Align engine (see clip.log, models.log)"
    skip "pipeline_$STREAMS_MANY" "no clip or no SSL-Align engine (see clip.log, models.log)"
fi
wait  # the summary reads every step's JSON

"$PY" bench/gpu/helpers.py summary "$OUT"
echo "total $((SECONDS - START)) s on ${DEVICE}; everything is in $OUT (summary.md)"
"$PY" bench/gpu/helpers.py steps "$OUT"
if [ -n "$ARCHIVE" ]; then
    tar -czf "$ARCHIVE" -C "$(dirname "$OUT")" --exclude=models --exclude=.avloc-shim --exclude=.steps.lock \
        "$(basename "$OUT")" && echo "archive: $ARCHIVE"
fi
# Exit 0 only if no step failed or timed out (skipped steps say why in the table above).
! awk '$2 != "0" && $2 != "skipped"' "$OUT/steps.txt" | grep -q .

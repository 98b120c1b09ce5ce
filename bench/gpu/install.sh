#!/usr/bin/env bash
# bench/gpu/install.sh VENV: the benchmark's virtual environment with avloc[gpu] (run.sh's "install" step).
#
# - VENV is made with --system-site-packages: a GPU box's preinstalled torch (and CUDA wheels) is reused when
#   it satisfies pyproject.toml's pins, instead of downloading gigabytes again.
# - avloc is installed editable with the `gpu` extra: the pins of pyproject.toml (torch/torchvision/torchaudio
#   2.11 CUDA 13 builds, onnxruntime-gpu[cuda,cudnn], tensorrt-cu13), nothing listed twice here.
# - Offline: $AVLOC_WHEELS (a folder made with `pip download`, see bench/gpu/README.md) is used instead of
#   the index; with neither, avloc alone is installed over what the machine has (doctor says what is missing).
# - onnxruntime (a dependency of avloc) and onnxruntime-gpu write the same package directory; the CPU one is
#   removed and the GPU one reinstalled so that the CUDA provider is really there.
set -u -o pipefail
VENV="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV" || { echo "install: cannot create a venv at $VENV"; exit 10; }
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
SOURCE=(--retries 1 --timeout 30)
[ -n "${AVLOC_WHEELS:-}" ] && SOURCE+=(--no-index --find-links "$AVLOC_WHEELS")
# the gpu extra's onnxruntime-gpu requirement, exactly as pyproject.toml pins it
ORT_GPU=$("$PY" -c 'import sys, tomllib; d = tomllib.load(open(sys.argv[1], "rb")); print(next(r for r in d["project"]["optional-dependencies"]["gpu"] if r.startswith("onnxruntime-gpu")))' "$ROOT/pyproject.toml")
if "${PIP[@]}" install "${SOURCE[@]}" -e "$ROOT[gpu]"; then
    echo "install: avloc[gpu] installed"
else
    echo "install: avloc[gpu] could not be installed (offline, no \$AVLOC_WHEELS?); installing avloc alone"
    "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT" || { echo "install: avloc itself failed"; exit 11; }
fi
if "${PIP[@]}" show onnxruntime >/dev/null 2>&1 && "${PIP[@]}" show onnxruntime-gpu >/dev/null 2>&1; then
    echo "install: onnxruntime and onnxruntime-gpu share one package directory: keeping only $ORT_GPU"
    "${PIP[@]}" uninstall -y onnxruntime
    "${PIP[@]}" install "${SOURCE[@]}" --force-reinstall --no-deps "$ORT_GPU" || exit 12
fi
"$PY" -c "import avloc.engines, torch, torchvision, torchaudio; print('install: torch', torch.__version__, 'CUDA', torch.version.cuda)"

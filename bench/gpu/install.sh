#!/usr/bin/env bash
# bench/gpu/install.sh VENV: the benchmark's virtual environment with avloc[gpu] (run.sh's "install" step).
#
# - VENV is made with --system-site-packages: a GPU box's preinstalled torch (and CUDA wheels) is reused when
#   it satisfies pyproject.toml's pins, instead of downloading gigabytes again. When python3 is itself a venv
#   (the GPU image's python3 is /opt/torch/.venv/bin/python3, which holds torch), --system-site-packages reaches
#   only the *base* installation's site-packages, so that venv's are added with a .pth file: else VENV has no
#   torch. --without-pip: python3 may lack ensurepip (Debian without python3-venv); pip comes from the parent.
# - avloc is installed editable with the `gpu` extra: the pins of pyproject.toml (torch/torchvision/torchaudio
#   2.11 CUDA 13 builds, onnxruntime-gpu[cuda,cudnn], tensorrt-cu13), nothing listed twice here.
# - Offline: $AVLOC_WHEELS (a folder made with `pip download`, see bench/gpu/README.md; default: the checkout's
#   .whl/ when it exists) is used instead of the index. An unreachable index is detected first (5 s), so pip
#   does not spend minutes of a GPU session on retries. Without the full set, avloc alone is installed over
#   what the machine has, plus every wheel of the folder (e.g. pyzmq and av, which the GPU image lacks);
#   `avloc doctor` then says what is missing.
# - onnxruntime (a dependency of avloc) and onnxruntime-gpu write the same package directory; the CPU one is
#   removed and the GPU one reinstalled so that the CUDA provider is really there.
# $AVLOC_BASE_PYTHON: the interpreter the venv is made from (default python3).
set -u -o pipefail
VENV="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BASE="${AVLOC_BASE_PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$BASE" -m venv --without-pip --system-site-packages "$VENV" || { echo "install: cannot create a venv at $VENV"; exit 10; }
fi
PY="$VENV/bin/python"
# The parent venv's site directories, processed as site directories (their own .pth files too), after VENV's.
"$BASE" - "$PY" <<'EOF' || { echo "install: cannot link the parent venv's packages"; exit 10; }
import subprocess, sys, sysconfig
from pathlib import Path
if sys.prefix != sys.base_prefix:
    dirs = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    site = subprocess.check_output([sys.argv[1], "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True)
    lines = [f"import site; site.addsitedir({d!r})" for d in dirs]
    Path(site.strip(), "_avloc_parent_venv.pth").write_text("\n".join(lines) + "\n")
    print("install: the venv also sees", ", ".join(dirs), "(python3 is a venv)")
EOF
"$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip --default-pip >/dev/null 2>&1 \
    || { echo "install: no pip for $PY (and no ensurepip)"; exit 10; }
PIP=("$PY" -m pip --disable-pip-version-check)
WHEELS="${AVLOC_WHEELS:-}"
[ -z "$WHEELS" ] && [ -d "$ROOT/.whl" ] && WHEELS="$ROOT/.whl"
SOURCE=(--retries 1 --timeout 30)
if [ -n "$WHEELS" ]; then
    SOURCE=(--no-index --find-links "$WHEELS")
    echo "install: from the wheels in $WHEELS, no index"
elif ! timeout 20 "${PIP[@]}" index versions pip --retries 0 --timeout 5 >/dev/null 2>&1; then
    SOURCE=(--no-index)
    echo "install: the package index is unreachable: offline, from what the machine has"
fi
# the gpu extra's onnxruntime-gpu requirement, exactly as pyproject.toml pins it
ORT_GPU=$("$PY" -c 'import sys, tomllib; d = tomllib.load(open(sys.argv[1], "rb")); print(next(r for r in d["project"]["optional-dependencies"]["gpu"] if r.startswith("onnxruntime-gpu")))' "$ROOT/pyproject.toml")
if "${PIP[@]}" install "${SOURCE[@]}" -e "$ROOT[gpu]"; then
    echo "install: avloc[gpu] installed"
else
    echo "install: avloc[gpu] could not be installed (offline, or wheels missing); installing avloc alone"
    "${PIP[@]}" install --no-index --no-deps --no-build-isolation -e "$ROOT" \
        || echo "install: avloc itself could not be installed: run.sh runs it from the checkout"
    if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
        "${PIP[@]}" install --no-index --no-deps "$WHEELS"/*.whl || echo "install: some wheels of $WHEELS failed"
    fi
fi
if "${PIP[@]}" show onnxruntime >/dev/null 2>&1 && "${PIP[@]}" show onnxruntime-gpu >/dev/null 2>&1; then
    echo "install: onnxruntime and onnxruntime-gpu share one package directory: keeping only $ORT_GPU"
    "${PIP[@]}" uninstall -y onnxruntime
    "${PIP[@]}" install "${SOURCE[@]}" --force-reinstall --no-deps "$ORT_GPU" || exit 12
fi
"$PY" -c "import torch, torchvision, torchaudio; print('install: torch', torch.__version__, 'CUDA', torch.version.cuda)"

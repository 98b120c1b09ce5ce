#!/usr/bin/env bash
# bench/gpu/wheels.sh [DIR]: download, here, the wheels that the lent GPU machine's image lacks for run.sh's steps
# (it reaches no index; its python3 3.12 has torch 2.11 cu130, onnx, onnxruntime, opencv, but no pyzmq nor av:
# the pipeline steps need both). DIR defaults to the checkout's .whl/ (git-ignored), which install.sh installs
# from by itself; carry it with the device call (about 36 MB of the 64 MiB a call may carry).
set -eu -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${1:-$ROOT/.whl}"
mkdir -p "$DIR"
# pyproject.toml's own lower bounds; cp312 manylinux x86_64 as the device's interpreter
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "pyzmq>=25" "av>=12"
du -sh "$DIR"

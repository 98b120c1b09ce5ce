#!/usr/bin/env bash
# Optional: what the Triton tests and bench/triton/run.sh need, added to .venv without changing its other pins.
#  - tritonclient[grpc] (the client; its own pins would downgrade protobuf 7 -> 6 and ml_dtypes, and it runs
#    with the newer ones, so it goes in with --no-deps plus the one dependency it lacks here: python-rapidjson);
#  - nvidia-pytriton, only for the tritonserver binary its wheel bundles (python backend only; its Python
#    package pins numpy<2, which avloc does not use, hence --no-deps);
#  - numpy<2 in .venv/triton-stub for the server's python-backend stub (built against numpy 1: with numpy 2 it
#    moves zero bytes in and out).
# Cost measured here: ~70 MB download, ~230 MB on disk, ~2 min (with two training jobs sharing the 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=".venv/bin/python -m pip"
$PIP install -q --no-deps "tritonclient[grpc]==2.73.0" python-rapidjson "nvidia-pytriton==0.7.0"
[ -d .venv/triton-stub/numpy ] || $PIP install -q --no-deps --target .venv/triton-stub "numpy==1.26.4"
echo "triton setup: ok ($(.venv/bin/python -c 'from importlib.metadata import version as v; print("tritonclient", v("tritonclient"), "pytriton", v("nvidia-pytriton"))'))"

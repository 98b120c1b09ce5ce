#!/usr/bin/env bash
# The soak of docs/reliability.md: the demo-size engine at 30 fps under the launcher for 10 minutes with a fault
# schedule (kill -9 / SIGSTOP of each worker, 1,000 fuzzed messages into each socket, a camera file that goes
# away and comes back); writes OUT/soak.json and OUT/soak.md. Not part of the test suite (too long):
# tests/test_soak.py runs the same code for 30 s.
#   scripts/soak.sh [OUT [more `avloc bench soak` options, e.g. --minutes 60 --engine DIR]]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/soak-$(date -u +%Y%m%d-%H%M%S)}
shift || true
exec "${AVLOC:-.venv/bin/avloc}" bench soak --out "$out" "$@"

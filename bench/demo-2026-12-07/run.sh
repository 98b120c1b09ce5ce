#!/usr/bin/env bash
# Re-creates this folder's demo_report_sN.json: three fresh `avloc demo` runs (seeds 0, 1, 2: the seed changes
# the dataset, the clip and its sounding object), one after another at normal priority, each with the default
# 10-minute budget. Run from the repository root after `bash scripts/setup.sh`. Prints each run's score and wall
# time with the load average before and after it (the demo's training budget adapts to the load: a busy
# machine trains fewer steps).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${DEMO_RUNS:-demo_runs}
for seed in 0 1 2; do
    echo "seed $seed: $(uptime)"
    .venv/bin/avloc demo --fresh --out "$out/s$seed" --seed "$seed"
    cp "$out/s$seed/demo_report.json" "$here/demo_report_s$seed.json"
    echo "seed $seed done: $(uptime)"
done
.venv/bin/python - "$here" <<'PY'
import json, sys
from pathlib import Path
for p in sorted(Path(sys.argv[1]).glob("demo_report_s*.json")):
    r = json.loads(p.read_text())
    loc = r["localization"]
    print(f"{p.name}: {loc['peak_in_box']}/{loc['frames_scored']} = {loc['fraction']:.1%} "
          f"(chance {loc['chance']:.1%}), {r['total_s']:.0f} s, {r['sounding_class']}")
PY

"""One line per point of an `avloc bench pipeline --sweep` JSON: streams, heatmaps/s, served, fairness, p99, CPU-ms per
heatmap (all / inference / captures), then the overload runs.

    python scripts/sweep_table.py SWEEP_JSON
"""

import json
import sys

d = json.load(open(sys.argv[1]))
machine = d["machine"]
print("criterion", json.dumps(d["criterion"]), "load", machine.get("load_avg_before"), machine.get("load_avg_after"))
for workers, s in d["sweep"].items():
    for p in s["points"]:
        c = p.get("cpu_ms") or {}
        print(
            f"w{workers} n{p['streams']}: {p['heatmap_fps']} heatmaps/s, served >= {p['served_min']}, "
            f"fairness {p['fairness']}, p99 {p['e2e_p99_ms']} ms, CPU-ms/heatmap all {c.get('all_per_heatmap')} "
            f"inference {c.get('inference_per_heatmap')} captures {c.get('captures_per_heatmap')}, capture CPU-ms/"
            f"source frame {c.get('capture_per_source_frame')}, load {p['load_avg_before'][0]}->"
            f"{p['load_avg_after'][0]} {'pass' if p['passed'] else 'fail'}"
        )
    for r in s.get("overload", {}).get("runs", []):
        print(
            f"w{workers} {r['factor']}x = {r['streams']} streams: goodput {r['goodput']}, fairness {r['fairness']}, "
            f"p99 {r['e2e_p99_ms']} (bound {r['p99_bound_ms']}) {'pass' if r['passed'] else 'fail'}"
        )

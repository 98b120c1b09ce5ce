"""One line per `avloc bench pipeline` JSON in a folder: heatmaps/s, CPU by process, CPU-ms per served heatmap and
per source frame (30 fps clip), audio windows the worker received and embedded, load average.

    python bench/capacity-2026-12-07b/summary.py FOLDER
"""

import glob
import json
import os
import sys

for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    p = json.load(open(path))["pipeline"]
    cpu, heatmaps, seconds = p["cpu_percent"], p["heatmaps"], p["measured_s"]
    replays = [v for k, v in cpu.items() if k.startswith("replay")]
    stats = p["inference_stats"]
    total = sum(cpu.values())
    print(
        f"{os.path.basename(path):13s} {heatmaps / seconds:5.2f} heatmaps/s | CPU % all {total:5.1f} inference "
        f"{cpu['inference']:5.1f} replays {sum(replays):5.1f} display {cpu['display']:4.1f} | CPU-ms per heatmap all "
        f"{total * 10 * seconds / heatmaps:6.1f} inference {cpu['inference'] * 10 * seconds / heatmaps:5.1f} | "
        f"replay CPU-ms per source frame {sum(replays) * 10 / 30 / len(replays):.2f} | audio windows "
        f"{stats['audio']} embedded {stats['audio_embeds']} | fairness {p.get('fairness')} e2e p99 "
        f"{p['e2e_ms']['p99']:.0f} ms | load {p['load_avg_before'][0]}-{p['load_avg_after'][0]}"
    )

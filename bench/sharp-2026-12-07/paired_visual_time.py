"""Paired timing of two engines' visual graphs (ONNX Runtime, batch 1, 2 intra-op threads): calls interleaved
one by one, so a shared machine's load falls on both alike; median of each and of the per-pair ratio.

    .venv/bin/python bench/sharp-2026-12-07/paired_visual_time.py ENGINE_BEFORE ENGINE_AFTER [ITERS]
"""

import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

sessions, feeds = [], []
for engine in sys.argv[1:3]:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    s = ort.InferenceSession(f"{engine}/visual.onnx", options, providers=["CPUExecutionProvider"])
    d = {i.name: i.shape for i in s.get_inputs()}
    size = d["image"][-1]
    width = d["audio_embedding"][-1]
    rng = np.random.default_rng(0)
    feeds.append(
        {
            "image": rng.standard_normal((1, 3, size, size), np.float32),
            "audio_embedding": rng.random((1, width), np.float32),
        }
    )
    sessions.append(s)
iters = int(sys.argv[3]) if len(sys.argv) > 3 else 100
ms = [[], []]
for k in range(iters + 5):
    for j, (s, f) in enumerate(zip(sessions, feeds)):
        t0 = time.perf_counter()
        s.run(None, f)
        if k >= 5:
            ms[j].append(1000 * (time.perf_counter() - t0))
a, b = np.array(ms[0]), np.array(ms[1])
print(
    json.dumps(
        {
            "engines": sys.argv[1:3],
            "iters": iters,
            "load_average": os.getloadavg(),
            "median_ms": [round(float(np.median(a)), 2), round(float(np.median(b)), 2)],
            "median_ratio_after_over_before": round(float(np.median(b / a)), 3),
            "ratio_of_medians": round(float(np.median(b) / np.median(a)), 3),
        },
        indent=1,
    )
)

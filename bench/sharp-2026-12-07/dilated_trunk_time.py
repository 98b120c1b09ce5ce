"""Lite0 trunk alone at output stride 32 (8x8 at 256 px) vs 16 (its last stride-2 stage at stride 1: 16x16),
ONNX Runtime, batch 1, 2 threads, calls interleaved: the cost of a native 16x16 map (docs/results.md "Sharper maps").

    .venv/bin/python bench/sharp-2026-12-07/dilated_trunk_time.py
"""

import io
import time

import numpy as np
import onnxruntime as ort
import torch

from avloc.core.pretrained import FrozenLite0

sess = {}
for os_ in (32, 16):
    m = FrozenLite0(os_).load_packaged().eval()
    buf = io.BytesIO()
    torch.onnx.export(m, (torch.zeros(1, 3, 256, 256),), buf, opset_version=17, dynamo=False, input_names=["x"])
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    o.inter_op_num_threads = 1
    sess[os_] = ort.InferenceSession(buf.getvalue(), o, providers=["CPUExecutionProvider"])
x = np.random.randn(1, 3, 256, 256).astype(np.float32)
t = {32: [], 16: []}
for _ in range(30):
    for k, s in sess.items():
        t0 = time.perf_counter()
        s.run(None, {"x": x})
        t[k].append(time.perf_counter() - t0)
for k in t:
    print(k, "median ms", 1000 * np.median(t[k]))
print("ratio", np.median(t[16]) / np.median(t[32]))

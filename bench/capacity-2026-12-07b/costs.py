"""Per-operation CPU costs behind the capture and worker CPU of a pipeline run (process_time, best of 5; one
torch thread, as in the replay): decoding and BGR conversion of the clip's frames, one 3 s linear spectrogram, the
worker's preprocessing of a 640x480 frame and of one pre-resized to the engine's input, the resize itself, and
one message's transport (PUB -> SUB over loopback TCP, both ends in this process).

    .venv/bin/python bench/capacity-2026-12-07b/costs.py --video CLIP --engine ENGINE --out costs.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import zmq

from avloc.core.audio import FrontEndConfig, StreamingFrontEnd
from avloc.engines.base import preprocess_frame
from avloc.stream.capture.camera import resize_for_inference
from avloc.stream.capture.replay import _iter_frames
from avloc.stream.run.launcher import free_tcp_endpoint
from avloc.stream.wire import protocol


def best_ms(work, repeats: int = 5) -> float:
    """CPU ms per item: ``work()`` returns how many items it did."""
    costs = []
    for _ in range(repeats):
        t = time.process_time()
        n = work()
        costs.append((time.process_time() - t) / n)
    return round(min(costs) * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--video", required=True)
    parser.add_argument("--engine", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest = json.loads(Path(args.engine, "manifest.json").read_text())

    def decode() -> int:
        return sum(1 for _ in _iter_frames(Path(args.video)))

    def decode_bgr() -> int:
        return sum(1 for _, f in _iter_frames(Path(args.video)) if f.to_ndarray(format="bgr24") is not None)

    out: dict = {"load_avg_before": [round(x, 2) for x in os.getloadavg()]}
    out["decode_ms_per_frame"] = best_ms(decode, 3)
    out["bgr_ms_per_frame"] = round(best_ms(decode_bgr, 3) - out["decode_ms_per_frame"], 3)
    config = FrontEndConfig()
    frontend = StreamingFrontEnd(config, 1600)
    frontend.push(np.zeros(config.num_samples, np.float32))
    audio = np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.1
    # one hop at a time, as a replay pushes it (one window per push)
    out["spectrogram_ms_per_window"] = best_ms(
        lambda: sum(len(frontend.push(audio[i : i + 1600])) for i in range(0, len(audio), 1600))
    )
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)
    size = (int(manifest["image"]["size"]),) * 2
    small = resize_for_inference(image, size)
    out["preprocess_640x480_ms"] = best_ms(lambda: [preprocess_frame(image, manifest) for _ in range(100)] and 100)
    out["resize_to_engine_ms"] = best_ms(lambda: [resize_for_inference(image, size) for _ in range(100)] and 100)
    out["preprocess_pre_resized_ms"] = best_ms(lambda: [preprocess_frame(small, manifest) for _ in range(100)] and 100)
    spec = np.zeros((1, 257, 299), np.float32)
    for name, array in (("frame_640x480", image), ("frame_pre_resized", small), ("spectrogram", spec)):
        ctx = zmq.Context()
        endpoint = free_tcp_endpoint()
        pub = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=True, hwm=100)
        sub = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=100)
        time.sleep(0.3)

        def transport(pub=pub, sub=sub, array=array) -> int:
            for i in range(200):
                protocol.send(pub, "frame", stream="cam0", seq=i, ts={"capture": 1.0}, arrays={"frame": array})
                protocol.recv(sub, 2000)
            return 200

        out[f"transport_{name}_ms"] = best_ms(transport, 3)
        pub.close(0)
        sub.close(0)
        ctx.term()
    out["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

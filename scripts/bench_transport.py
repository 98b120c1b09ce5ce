"""Latency of one avloc message over loopback TCP, loopback TCP with CURVE, and ipc:// (docs/protocol.md, Security).

Publishes ``--count`` messages of a 640x480x3 uint8 frame (the replay/camera frame) and of a 1x257x299 float32
audio window through ``protocol.make_socket`` (the sockets every worker uses) and reports the one-way
latency (receive time - send stamp, one host's monotonic clock) per transport: p50 / p90 / p99 in ms.

    python scripts/bench_transport.py [--count 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import zmq

from avloc.stream.run.launcher import free_tcp_endpoint
from avloc.stream.wire import protocol, security
from avloc.stream.wire.security import make_keys


def one(transport: str, payload: np.ndarray, count: int, folder: Path) -> dict[str, float]:
    ctx = zmq.Context()
    env: dict[str, str] = {}
    if transport == "curve":
        keys = folder / "keys"
        if not keys.exists():
            make_keys(keys)
        env = {security.KEYS_ENV: str(keys)}
    endpoint = security.ipc_endpoint(folder, "bench") if transport == "ipc" else free_tcp_endpoint()
    with security.environment(env):
        pub = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=True, hwm=64)
        sub = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=64)
    try:
        time.sleep(0.5)  # connection + handshake
        lat = []
        for seq in range(count):
            protocol.send(pub, "frame", stream="b", seq=seq, ts={"send": protocol.now()}, arrays={"x": payload})
            msg = protocol.recv(sub, 2000)
            if msg is None:
                continue
            lat.append((protocol.now() - msg.ts["send"]) * 1e3)
            time.sleep(0.005)
    finally:
        pub.close(0)
        sub.close(0)
        security.stop_authenticators()
        ctx.term()
    q = np.percentile(lat, [50, 90, 99])
    return {
        "n": len(lat),
        "p50_ms": round(float(q[0]), 3),
        "p90_ms": round(float(q[1]), 3),
        "p99_ms": round(float(q[2]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    folder = security.ipc_run_dir("avloc-bench-")
    try:
        payloads = {
            "frame 640x480x3 u8": np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8),
            "audio 1x257x299 f32": np.random.default_rng(0).random((1, 257, 299), dtype=np.float32),
        }
        out = {}
        for name, payload in payloads.items():
            for transport in ("tcp", "curve", "ipc"):
                out[f"{name} {transport}"] = one(transport, payload, args.count, folder)
                print(f"{name:20s} {transport:6s} {out[f'{name} {transport}']}", flush=True)
        print(json.dumps(out))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Malformed input for the pipeline's sockets: what the soak (``avloc bench soak``) and the fuzzing tests send, and
every receiver must count and ignore without dying (docs/reliability.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import zmq

from avloc.stream.wire import protocol


def fuzz_messages(rng: np.random.Generator, n: int) -> list[list[bytes]]:
    """``n`` malformed multipart messages: broken JSON/versions/headers, size mismatches, random bytes, and
    well-formed messages a consumer must still refuse (wrong frame layout, wrong spectrogram shape)."""

    def header(**fields: Any) -> bytes:
        return json.dumps(fields).encode()

    streams = ["cam0", "cam1", "", "x" * 200]
    out: list[list[bytes]] = []
    while len(out) < n:
        stream = streams[int(rng.integers(len(streams) - 1))]  # the 200-char id only in headers built by hand
        seq = int(rng.integers(0, 2**31))
        good = protocol.encode(
            "frame", stream=stream, seq=seq, ts={"capture": 1.0}, arrays={"frame": np.zeros((2, 2, 3), np.uint8)}
        )[0]
        out += [
            [b"\xff\xfe not json"],
            [header(v=99, kind="frame")],
            [header(v=1, kind="frame", stream=stream, seq=-1, ts={}, arrays=[])],
            [header(v=1, kind="frame", stream=streams[3], seq=seq, ts={}, arrays=[])],
            [good, b"\x00" * int(rng.integers(13, 64))],  # size mismatch (the array is 12 bytes)
            [good],  # payload missing
            [b"[1, 2, 3]"],
            # a zero-size axis with huge others: prod(shape) is 0, numpy still refuses the shape (issue 22)
            [
                header(
                    v=1,
                    kind="frame",
                    stream=stream,
                    seq=seq,
                    ts={},
                    arrays=[{"name": "frame", "dtype": "uint8", "shape": [0, 2**31 - 1, 2**31 - 1, 3]}],
                    meta={},
                ),
                b"",
            ],
            [rng.bytes(int(rng.integers(1, 256))), rng.bytes(int(rng.integers(0, 1024)))],
            protocol.encode(
                "frame", stream=stream, seq=seq, ts={"capture": 1.0}, arrays={"frame": np.zeros((4, 4), np.uint8)}
            ),  # valid message, wrong frame layout
            protocol.encode(
                "audio",
                stream=stream,
                seq=seq,
                ts={"window_end": 1.0},
                arrays={"spec": np.zeros((1, 3, 3), np.float32)},
            ),  # wrong spectrogram shape
        ]
    return out[:n]


def fuzz_subscriptions(rng: np.random.Generator, n: int) -> list[bytes]:
    """``n`` subscription messages a publisher receives from a hostile subscriber: made-up topics, unsubscribes
    of topics never subscribed, random bytes, and some over ``protocol.MAX_SUBSCRIPTION_BYTES``."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(b"\x01" + rng.bytes(int(rng.integers(0, 256))))
        elif kind == 1:
            out.append(b"\x00" + rng.bytes(int(rng.integers(0, 256))))
        elif kind == 2:
            out.append(rng.bytes(int(rng.integers(1, 512))))
        else:
            out.append(b"\x01" + rng.bytes(protocol.MAX_SUBSCRIPTION_BYTES + int(rng.integers(1, 4096))))
    return out


# A badly tagged heartbeat: well-formed, so the receiver decodes and checks the tag of every one of them.
FLOOD_MESSAGE = json.dumps(
    {"v": 1, "kind": "heartbeat", "stream": "w", "seq": 1, "ts": {"send": 1.0}, "arrays": [],
     "meta": {"pid": 1, "auth": "00"}},
    separators=(",", ":"),
).encode()  # fmt: skip


def flood(endpoint: str, seconds: float) -> int:
    """Send ``FLOOD_MESSAGE`` to ``endpoint`` (a SUB, e.g. the launcher's heartbeats) as fast as one process can for
    ``seconds``; returns how many went out. Run it in its own process (``python -m avloc.stream.tools.fuzz EP SECONDS``)
    so that it competes with the receiver like an attacker's program would."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent, end = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            for _ in range(200):
                try:
                    sock.send(FLOOD_MESSAGE, zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    pass
    finally:
        sock.close(0)
        ctx.term()
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m avloc.stream.tools.fuzz", description="Flood a SUB endpoint with badly tagged heartbeats."
    )
    parser.add_argument("endpoint", help="where the receiver's SUB listens, e.g. tcp://127.0.0.1:5600")
    parser.add_argument("seconds", type=float, help="how long to flood")
    args = parser.parse_args(argv)
    print(flood(args.endpoint, args.seconds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory a publisher spends on distinct subscriptions (docs/protocol.md, Bounds).

Binds an avloc publisher (``worker.make_publisher``, an XPUB) with ``--limit`` as its ``MAXMSGSIZE`` (default: the
current ``protocol.MAX_SUBSCRIPTION_BYTES``; 4096 was the old one), lets another process send ``--count`` distinct
subscriptions of ``--size`` bytes from a raw XSUB, and prints the publisher's RSS growth in MB.

    python scripts/subscription_rss.py --count 2000 --size 4005 --limit 4096   # the old limit
    python scripts/subscription_rss.py --count 2000 --size 500 --limit 512     # the largest the new limit admits
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil
import zmq

from avloc.stream.run.launcher import free_tcp_endpoint
from avloc.stream.runtime.worker import make_publisher
from avloc.stream.wire import protocol

ATTACKER = """
import os, sys, time, zmq
sock = zmq.Context().socket(zmq.XSUB)
sock.setsockopt(zmq.SNDHWM, 1000000)
sock.connect(sys.argv[1])
time.sleep(0.5)
for i in range(int(sys.argv[2])):
    sock.send(b"\\x01" + i.to_bytes(4, "little") + os.urandom(int(sys.argv[3]) - 5))
time.sleep(3.0)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=500, help="bytes per subscription message (flag byte included)")
    parser.add_argument("--limit", type=int, default=protocol.MAX_SUBSCRIPTION_BYTES)
    args = parser.parse_args()
    protocol.MAX_SUBSCRIPTION_BYTES = args.limit  # what make_publisher sets as MAXMSGSIZE
    ctx = zmq.Context()
    endpoint = free_tcp_endpoint()
    pub = make_publisher(ctx, endpoint)
    me = psutil.Process()
    time.sleep(0.2)
    before = me.memory_info().rss
    attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, endpoint, str(args.count), str(args.size)])
    while attacker.poll() is None:
        protocol.send(pub, "heartbeat", stream="x", seq=0, ts={"send": 1.0})
        time.sleep(0.01)
    grown = (me.memory_info().rss - before) / 2**20
    pub.close(0)
    ctx.term()
    print(json.dumps({"count": args.count, "size": args.size, "limit": args.limit, "rss_growth_mb": round(grown, 1)}))


if __name__ == "__main__":
    main()

"""``avloc worker tap``: subscribe to publishers for a while and report what arrives (messages/s, bytes/s, age).

For pipelines spread over hosts: run it on the host that should be receiving, to see whether anything gets
there, how much data each endpoint carries and how old it is on arrival (``received - ts.capture`` on the
reference clock when started with ``--clock``). Prints one JSON object per endpoint; nothing is kept but counters.

Run as a process: ``python -m avloc.stream.clients.tap --connect tcp://10.0.0.1:5550 --seconds 5``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from avloc.core.errors import UserError
from avloc.stream.runtime.worker import USER_ERROR_EXIT, install_stop_handlers, setup_logging
from avloc.stream.wire import protocol

log = logging.getLogger(__name__)
MAX_SHAPES = 64  # distinct array shapes counted per endpoint


def tap(endpoints: list[str], seconds: float, stop: threading.Event | None = None) -> dict[str, dict[str, Any]]:
    """Counters per endpoint after listening ``seconds`` (from the first message of each endpoint on)."""
    stop = stop or threading.Event()
    ctx = zmq.Context.instance()
    socks = {ep: protocol.make_socket(ctx, zmq.SUB, ep, bind=False, hwm=1000) for ep in endpoints}
    poller = zmq.Poller()
    for sock in socks.values():
        poller.register(sock, zmq.POLLIN)
    state: dict[str, dict[str, Any]] = {
        ep: {"first": None, "last": None, "messages": 0, "bytes": 0, "kinds": Counter(), "shapes": Counter(), "age": []}
        for ep in endpoints
    }
    rejects = protocol.RejectCounter("tap", logger=log)
    deadline = None
    try:
        while not stop.is_set() and (deadline is None or protocol.now() < deadline):
            ready = dict(poller.poll(100))
            for ep, sock in socks.items():
                if sock not in ready:
                    continue
                messages, received = protocol.drain_stamped(sock, rejects=rejects)
                s = state[ep]
                for msg in messages:
                    s["first"] = received if s["first"] is None else s["first"]
                    s["last"] = received
                    s["messages"] += 1
                    s["bytes"] += msg.nbytes
                    s["kinds"][msg.kind] += 1
                    for name, array in msg.arrays.items():
                        key = f"{name} {'x'.join(map(str, array.shape))}"
                        if key in s["shapes"] or len(s["shapes"]) < MAX_SHAPES:  # made-up shapes cannot grow it
                            s["shapes"][key] += 1
                    if "capture" in msg.ts:
                        s["age"].append(received - msg.ts["capture"])
                if messages and deadline is None:
                    deadline = received + seconds
    finally:
        for sock in socks.values():
            sock.close(0)
    return {ep: _summary(s) for ep, s in state.items()}


def _summary(s: dict[str, Any]) -> dict[str, Any]:
    span = (s["last"] - s["first"]) if s["first"] is not None else 0.0
    age = np.asarray(s["age"]) * 1000.0
    return {
        "messages": s["messages"],
        "seconds": round(span, 3),
        "messages_per_s": round(s["messages"] / span, 2) if span > 0 else None,
        "bytes_per_s": round(s["bytes"] / span) if span > 0 else None,
        "bytes_per_message": round(s["bytes"] / s["messages"]) if s["messages"] else None,
        "kinds": dict(s["kinds"]),
        "arrays": dict(s["shapes"].most_common(4)),
        "age_ms": {"p50": round(float(np.percentile(age, 50)), 3), "p99": round(float(np.percentile(age, 99)), 3)}
        if len(age)
        else {},
        "clock": protocol.clock_stats(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m avloc.stream.clients.tap", description=__doc__.splitlines()[0])
    parser.add_argument("--connect", action="append", required=True, metavar="ENDPOINT", help="publisher (repeatable)")
    parser.add_argument("--seconds", type=float, default=5.0, help="listen this long after the first message")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--log-file", default=None, help="log file (default: stderr)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("tap", args.log_file, args.verbose)
    stop = install_stop_handlers()
    try:
        report = tap(args.connect, args.seconds, stop)
    except UserError as err:
        log.error("%s", err)
        return USER_ERROR_EXIT
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

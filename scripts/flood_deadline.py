"""How long the launcher takes to see a SIGSTOPped worker, with and without a flood on its heartbeat socket.

A worker that only beats (``avloc.stream.runtime.worker.Heartbeat``, 0.1 s interval) runs under the launcher
(``heartbeat_timeout_s`` 2 s); it is SIGSTOPped, and the time until the launcher's crash event is measured, ``--runs``
times without and with another process flooding the heartbeat socket (``python -m avloc.stream.tools.fuzz``: badly
tagged heartbeats as fast as one process sends them).
Prints one JSON line per run and the medians (docs/reliability.md).

    python scripts/flood_deadline.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from avloc.stream.run.launcher import Launcher, ProcessSpec, StreamConfig, free_tcp_endpoint

BEATER = """
import argparse, time, zmq
from avloc.stream.runtime.worker import Heartbeat, add_common_arguments, install_stop_handlers
p = argparse.ArgumentParser(); add_common_arguments(p, role="beater"); a = p.parse_args()
stop = install_stop_handlers()
hb = Heartbeat(zmq.Context.instance(), a.heartbeat, role="beater", stream="beater", interval_s=0.1)
while not stop.is_set():
    hb.maybe_send({})
    time.sleep(0.02)
hb.close()
"""
CONFIG = replace(StreamConfig(), heartbeat_timeout_s=2.0, startup_grace_s=60.0, restart_backoff_s=0.1, max_restarts=9)


def one(folder: Path, flood: bool) -> dict[str, float | bool | int]:
    endpoint = free_tcp_endpoint()
    launcher = Launcher(
        [ProcessSpec("w", "avloc_beater", [])],
        folder / f"run-{time.monotonic_ns()}",
        config=CONFIG,
        heartbeat_endpoint=endpoint,
    )
    launcher.start()
    flooder = None
    try:
        while not launcher.children["w"].ready:
            launcher.poll()
            time.sleep(0.05)
        if flood:
            flooder = subprocess.Popen(
                [sys.executable, "-m", "avloc.stream.tools.fuzz", endpoint, "15"], stdout=subprocess.PIPE
            )
            time.sleep(1.0)  # the flood is on (the launcher's first poll then shows how long one step takes)
        counted0 = sum(launcher.unauthenticated.values())
        os.kill(launcher.children["w"].popen.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        longest = 0.0  # the longest supervision step: what a flood could stretch
        while launcher.children["w"].restarts == 0 and time.monotonic() - stopped < 30:
            t = time.monotonic()
            launcher.poll()
            longest = max(longest, time.monotonic() - t)
            time.sleep(0.05)
        seen = time.monotonic() - stopped
        return {
            "flood": flood,
            "seen_after_s": round(seen, 3),
            "longest_poll_s": round(longest, 3),
            "flood_still_on": flooder is not None and flooder.poll() is None,
            "flood_messages_counted": sum(launcher.unauthenticated.values()) - counted0,
        }
    finally:
        if flooder is not None:
            flooder.kill()
            flooder.wait()
        launcher.shutdown("timeout")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "avloc_beater.py").write_text(BEATER)
        os.environ["PYTHONPATH"] = f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        results: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.runs):
            for flood in (False, True):
                r = one(folder, flood)
                print(json.dumps(r), flush=True)
                results[flood].append(float(r["seen_after_s"]))
    print(
        json.dumps(
            {f"median_seen_after_s_{'flood' if k else 'quiet'}": statistics.median(v) for k, v in results.items()}
        )
    )


if __name__ == "__main__":
    main()

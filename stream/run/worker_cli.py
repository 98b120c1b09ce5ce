"""``avloc worker ROLE [options]``: one pipeline process started on its own, for pipelines spread over hosts.

``avloc replay`` / ``avloc run`` start every process on one host under the launcher. Across hosts each process is
started by hand (or by systemd, a container, ...) with this command and is configured by endpoints only: a
capture host runs ``avloc worker replay|camera|mic`` binding its publishers, the inference host runs
``avloc worker inference`` connecting to them and binding the heatmap publisher, a display host runs
``avloc worker display`` connecting to frames and heatmaps (``avloc worker tap`` shows what reaches a host:
messages/s, bytes/s and age per endpoint). ROLE's own options are those of its worker module
(``avloc worker ROLE --help``); the options below are added to every role:

- ``--clock-serve EP``: this process serves the pipeline's reference clock (stream/wire/clock.py); normally the
  inference worker, whose host stamps ``received`` / ``infer_*`` / ``publish``;
- ``--clock EP``: before starting, measure this host's clock offset to that service and put every timestamp
  on the reference clock; measured again every ``--clock-interval`` seconds;
- ``--keys DIR`` / ``--insecure``: CURVE keys for every socket (required to bind a non-loopback address), or
  plain TCP on purpose.

Without a launcher nobody restarts a worker: each logs to stderr (or ``--log-file``) and still sends heartbeats
to ``--heartbeat EP`` when given (the clock offset and its uncertainty are in their stats).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
from pathlib import Path

from avloc.stream.runtime.worker import exit_status
from avloc.stream.wire import protocol, security
from avloc.stream.wire.clock import ClockServer, ClockSync

log = logging.getLogger(__name__)

ROLES = {
    "camera": "avloc.stream.capture.camera",
    "mic": "avloc.stream.capture.microphone",
    "replay": "avloc.stream.capture.replay",
    "inference": "avloc.stream.serve.inference",
    "display": "avloc.stream.clients.display",
    "tap": "avloc.stream.clients.tap",  # no pipeline role: reports what arrives from publishers (rates, bytes/s, age)
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=sorted(ROLES), help="which worker this process runs")
    # REMAINDER: ROLE's own options go to its worker's parser untouched (see `avloc worker ROLE --help`)
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the worker's options and the ones below")
    parser.epilog = _own_parser("ROLE").format_help()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the epilog is a formatted help text


def _own_parser(role: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"avloc worker {role}", add_help=False, allow_abbrev=False)
    group = parser.add_argument_group("multi-host options (every role)")
    group.add_argument(
        "--clock",
        default=None,
        metavar="ENDPOINT",
        help="reference clock service to sync to (another host's --clock-serve), e.g. tcp://10.0.0.2:5554",
    )
    group.add_argument(
        "--clock-serve",
        default=None,
        metavar="ENDPOINT",
        help="serve this host's clock as the pipeline's reference, e.g. tcp://0.0.0.0:5554",
    )
    group.add_argument("--clock-interval", type=float, default=30.0, help="seconds between clock resyncs")
    group.add_argument("--clock-timeout", type=float, default=30.0, help="wait this long for the clock service")
    group.add_argument("--keys", type=Path, default=None, help="CURVE keys from `avloc keys --out DIR`")
    group.add_argument("--insecure", action="store_true", help="allow binding non-loopback endpoints without keys")
    return parser


def _configure_security(keys: Path | None, insecure: bool) -> None:
    """The worker modules read their security settings from the environment (as under the launcher)."""
    if keys is not None:
        security.load_keys(keys)  # a UserError now, not in the middle of starting sockets
        os.environ[security.KEYS_ENV] = str(keys.resolve())
    if insecure:
        os.environ[security.INSECURE_ENV] = "1"


def main(args: argparse.Namespace) -> int:
    own_parser = _own_parser(args.role)
    own, rest = own_parser.parse_known_args(args.options)
    if "-h" in rest or "--help" in rest:
        own_parser.print_help()
        try:
            return int(importlib.import_module(ROLES[args.role]).main(["--help"]) or 0)
        except SystemExit as done:
            return exit_status(done)
    _configure_security(own.keys, own.insecure)
    server = ClockServer(own.clock_serve).start() if own.clock_serve else None
    sync = None
    try:
        if own.clock:
            # before the worker's first timestamp: a replay schedules its whole file from now() at start
            sync = ClockSync(own.clock, interval_s=own.clock_interval)
            estimate = sync.sync(timeout_s=own.clock_timeout)
            log.info(
                "%s: clock offset %+.6f s ± %.3f ms to %s",
                args.role,
                estimate.offset_s,
                estimate.uncertainty_s * 1e3,
                own.clock,
            )
            sync.start()
        # imported after the clock service is up: the inference worker's imports take seconds on a busy host
        status = int(importlib.import_module(ROLES[args.role]).main(rest) or 0)
    finally:
        if sync is not None:
            sync.stop()
        if server is not None:
            server.stop()
    log.info("%s exited %d; clock %s", args.role, status, protocol.clock_stats())
    return status

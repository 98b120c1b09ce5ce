"""Small helpers shared by every avloc worker process.

Each worker (camera, microphone, replay, inference, display) is its own OS process started by the launcher.
They all need the same few things: one log file per process, a stop flag set by SIGTERM/SIGINT so that
loops end and sockets close cleanly, heartbeats to the launcher (which restarts a silent worker), and a
command-line skeleton. Sockets are created inside the worker (never inherited across a fork).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import zmq

from avloc.core.errors import UserError
from avloc.stream.wire import protocol, security

if TYPE_CHECKING:
    from avloc.core.audio import FrontEndConfig

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5
# stats["state"] of a worker that is alive but whose work is stuck (e.g. a camera grab that never returns):
# the launcher does not count such a heartbeat as a sign of life and restarts the worker after the timeout.
STATE_STALLED = "stalled"


USER_ERROR_EXIT = 2  # a worker's exit status on a user error: the launcher reports it and does not restart


def setup_logging(role: str, log_file: str | Path | None = None, verbose: bool = False) -> None:
    """Per-process logging: to ``log_file`` when given (the launcher keeps one per process), else stderr."""
    handler: logging.Handler
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def exit_status(stop: SystemExit) -> int:
    """The status ``raise SystemExit(x)`` gives a process: None 0, an int itself, anything else printed and 1."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


def exit_without_finalizing(code: int) -> None:
    """End the process now with ``code``, once what must outlive ``main`` is done: non-daemon threads joined,
    ``atexit`` handlers run (logging's flush and pyzmq's garbage collector among them; cleared once run), every
    ZeroMQ context terminated (which sends what its closed sockets still hold, up to their linger), stdio
    flushed. Returns, leaving the normal exit to the caller, when a socket is still open (a thread may own it)."""
    # What the interpreter's exit does first: the threading-atexit hooks (concurrent.futures' executors stop
    # their idle workers there: joining those threads without them waits forever), then non-daemon threads
    # joined. Idempotent: the normal exit's own call returns at once.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    contexts = [obj for obj in gc.get_objects() if issubclass(type(obj), zmq.Context)]  # type(): no __class__ lookups
    if any(not ctx.closed and len(getattr(ctx, "_sockets", (None,))) for ctx in contexts):
        return  # an open socket (or a pyzmq without _sockets): only the normal exit is known to be safe
    for ctx in contexts:
        # a shadow's context is its owner's to terminate: a second term of one libzmq context is a use after free
        # (EFAULT: the worker's status lost to a traceback)
        if not ctx.closed and not getattr(ctx, "_shadow", False):
            # every socket is closed: returns once their lingering messages are out, bounded by each socket's
            # linger (finite for every avloc socket: protocol.make_socket; libzmq's default -1 would wait forever)
            ctx.term()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(code)


def run_worker_main(main: Callable[[], int | None]) -> NoReturn:
    """``raise SystemExit(main())`` for a worker process that writes no files of its own (captures, inference),
    without the interpreter's finalization once ``main`` returned (``exit_without_finalizing``): with torch loaded
    that takes about a second, and a pipeline stops its processes one after another. Displays and recorders keep
    the normal exit."""
    try:
        code = main()
    except SystemExit as stop:
        code = exit_status(stop)
    exit_without_finalizing(code or 0)
    raise SystemExit(code)


def install_stop_handlers(stop: threading.Event | None = None) -> threading.Event:
    """Return an event set on SIGTERM/SIGINT (and SIGHUP), so the worker's loops can end cleanly.

    Must be called from the main thread. A second signal while stopping exits immediately.
    """
    stop = stop or threading.Event()

    def _handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _handler)
    return stop


class Heartbeat:
    """Publishes ``heartbeat`` messages (role, pid, stats) to the launcher at a fixed interval.

    The socket connects a PUB to the launcher's bound SUB: a missing launcher costs nothing (messages to
    no peer are dropped), so a worker also runs stand-alone. ``endpoint=None`` disables it.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str | None,
        *,
        role: str,
        stream: str,
        interval_s: float = HEARTBEAT_INTERVAL_S,
    ) -> None:
        self.role = role
        self.stream = stream
        self.interval_s = interval_s
        self._socket = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=False, hwm=16) if endpoint else None
        self._seq = 0
        self._last = -float("inf")
        self._token = security.run_token()  # from the launcher's environment; None when started by hand
        self._sender = security.new_sender_id()  # this heartbeat's own seq counter (see security.Verifier)
        self.truncated = 0  # heartbeats whose stats did not fit in a header and were cut

    def due(self) -> bool:
        """Whether the next ``maybe_send`` would send (to skip building stats when it would not)."""
        return protocol.now() - self._last >= self.interval_s

    def maybe_send(self, stats: dict[str, Any] | None = None, force: bool = False) -> None:
        """Send a heartbeat when ``interval_s`` passed since the last one (cheap to call every loop)."""
        t = protocol.now()
        if not force and t - self._last < self.interval_s:
            return
        # Even with no socket the interval restarts: callers pace their periodic work (stats, evictions) by due();
        # a display started by hand without --heartbeat rebuilt its stats on every loop (60 % of its CPU).
        self._last = t
        if self._socket is None:
            return
        meta = {"role": self.role, "pid": os.getpid(), "stats": {**(stats or {}), "clock": protocol.clock_stats()}}
        try:
            self._send("heartbeat", {"send": t}, meta)
        except ValueError:  # stats too large for one header (protocol.MAX_HEADER_BYTES): beat without them
            self.truncated += 1
            meta["stats"] = {"state": (stats or {}).get("state"), "stats_truncated": self.truncated}
            self._send("heartbeat", {"send": t}, meta)

    def control(self, command: str, **meta: Any) -> None:
        """Tell the launcher about an event (e.g. ``end`` of a replayed file)."""
        if self._socket is None:
            return
        payload = {"role": self.role, "pid": os.getpid(), "command": command, **meta}
        self._send("control", {"send": protocol.now()}, payload)

    def _send(self, kind: str, ts: dict[str, float], meta: dict[str, Any]) -> None:
        assert self._socket is not None
        meta = security.signed_meta(self._token, kind, self.stream, self._seq, ts, meta, self._sender)
        protocol.send(self._socket, kind, stream=self.stream, seq=self._seq, ts=ts, meta=meta)
        self._seq += 1

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=200)  # let a final control message out
            self._socket = None


class RateLimitedLog:
    """One log line per ``interval_s`` for a recurring condition (dropped frames, device errors)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0) -> None:
        self._logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def __call__(self, key: str, level: int, msg: str, *args: Any) -> None:
        t = protocol.now()
        if t - self._last.get(key, -float("inf")) < self.interval_s:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return
        skipped = self.suppressed.pop(key, 0)
        self._last[key] = t
        self._logger.log(level, msg + (f" (+{skipped} similar)" if skipped else ""), *args)


def add_common_arguments(parser: argparse.ArgumentParser, *, role: str) -> None:
    """Arguments every worker takes from the launcher."""
    parser.add_argument("--stream-id", default="cam0", help="stream id carried in every message")
    parser.add_argument(
        "--heartbeat",
        default=None,
        metavar="ENDPOINT",
        help=f"launcher heartbeat endpoint (e.g. {protocol.DEFAULT_ENDPOINTS['heartbeats']})",
    )
    parser.add_argument("--log-file", default=None, help=f"log file of this {role} process (default: stderr)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def load_frontend(value: str | None) -> FrontEndConfig:
    """``--frontend``: JSON text, a JSON file (a manifest's ``frontend`` key is used when present), an
    engine directory (its ``manifest.json``), or None for the default (linear, 3 s, 16 kHz)."""
    from avloc.core.audio import FrontEndConfig  # why: torch, which workers without a front-end never need

    if not value:
        return FrontEndConfig()
    text = value.strip()
    where = "--frontend"
    if not text.startswith("{"):
        path = Path(value)
        if path.is_dir():
            path = path / "manifest.json"
        if not path.is_file():
            raise UserError(f"--frontend {value}: expected JSON text, a JSON file or an engine directory")
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("frontend"), dict):
        data = data["frontend"]
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object with front-end fields (kind, sample_rate, ...)")
    return FrontEndConfig.from_dict(data, where)


def make_publisher(
    ctx: zmq.Context, endpoint: str, *, nodrop: bool = False, hwm: int = protocol.DEFAULT_HWM
) -> zmq.Socket:
    """A bound XPUB: a PUB (plain SUBs connect to it) that also reports subscribers joining.

    ``nodrop``: when a subscriber's queue is full, sending fails with EAGAIN (``protocol.send`` → False)
    instead of silently dropping, so a producer that may wait (replay at full speed) gets back-pressure.
    """
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.SNDTIMEO, 1000)
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # one notification per subscriber, not per distinct topic
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_SUBSCRIPTION_BYTES)  # subscriptions are all it receives
    if nodrop:
        sock.setsockopt(zmq.XPUB_NODROP, 1)
    try:
        security.check_bind(endpoint)
        security.secure_socket(sock, bind=True)
        protocol.bind_retrying(sock, endpoint)
    except protocol.UserError:  # refused by the security checks
        sock.close(0)
        raise
    except zmq.ZMQError as err:
        sock.close(0)
        raise protocol.EndpointError(
            f"cannot bind publisher to {endpoint}: {err} "
            "(another pipeline running? choose other ports, e.g. --auto-ports)"
        ) from err
    return sock


def _new_subscribers(sock: zmq.Socket) -> int:
    joined = 0
    while True:
        try:
            note = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return joined
        joined += {b"\x01": 1, b"\x00": -1}.get(note[:1], 0)


def wait_for_subscribers(
    sockets: list[zmq.Socket],
    count: int | list[int],
    timeout_s: float,
    stop: threading.Event | None = None,
    heartbeat: Heartbeat | None = None,
) -> list[int]:
    """Wait (bounded) until each XPUB has ``count`` subscribers (one number for all, or one per socket),
    so the first messages are not lost to ZeroMQ's slow-joiner effect; returns the subscriber counts seen
    (a timeout only logs a warning). Heartbeats keep going meanwhile, so the launcher does not take the
    waiting worker for a hung one."""
    counts = [0] * len(sockets)
    needed = list(count) if isinstance(count, list) else [count] * len(sockets)
    if max(needed, default=0) <= 0:
        return counts
    deadline = protocol.now() + timeout_s
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    while any(c < n for c, n in zip(counts, needed)) and not (stop is not None and stop.is_set()):
        remaining = deadline - protocol.now()
        if remaining <= 0:
            log.warning("%s subscriber(s) after %.1f s; starting anyway", counts, timeout_s)
            break
        ready = dict(poller.poll(min(remaining, 0.1) * 1000))
        for i, sock in enumerate(sockets):
            if sock in ready:
                counts[i] += _new_subscribers(sock)
        if heartbeat is not None:
            heartbeat.maybe_send({"waiting_for_subscribers": counts})
    return counts

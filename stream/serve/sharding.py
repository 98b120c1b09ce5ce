"""Several inference workers sharing the streams: who owns which stream, and one heatmap endpoint for all.

- **Assignment.** Every stream has a home worker (stream ``i`` -> worker ``i mod N``), so the split is even and
  the same on every run. While its home worker is not serving (dead, restarting, still loading the engine)
  a stream goes to the live worker owning the fewest streams; when the home worker is back it gets its
  streams back. Only the streams of a dead worker move, so the other workers keep their audio caches.
- **Distribution.** The launcher binds a PUB socket and publishes the whole table as a signed ``control``
  message (``command: "assign"``) on every change and again every ``REPUBLISH_S`` (a worker that connects
  late, or a message lost to the slow-joiner race of PUB/SUB, is corrected within that time). Each worker
  keeps its own entry: it connects its frame/audio SUB sockets to its streams' endpoints, disconnects from
  the others and forgets their state.
- **One heatmap endpoint.** Workers connect their heatmap PUB to the XSUB side of a proxy the launcher runs
  in a thread (``zmq.proxy_steerable``); subscribers (display, viewer, third parties) connect to its XPUB
  side, the configured ``heatmaps_endpoint``, exactly as to a single worker. Subscriptions travel upstream
  through the proxy, so workers still publish nothing nobody asked for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import zmq

from avloc.stream.wire import protocol, security

log = logging.getLogger(__name__)

ASSIGN_COMMAND = "assign"
REPUBLISH_S = 0.5
PROXY_HWM = 256  # heatmaps the proxy holds per peer (small messages): then drops, like any avloc PUB


@dataclass(frozen=True)
class StreamRoute:
    """One stream and where its frames and audio windows are published."""

    stream: str
    frames: str
    audio: str | None = None

    def as_list(self) -> list[str | None]:
        return [self.stream, self.frames, self.audio]


def assign(streams: list[str], workers: list[str], live: Iterable[str]) -> dict[str, list[str]]:
    """``{worker: [stream, ...]}`` for the ``live`` workers (see the module docstring); {} when none is live."""
    live = [w for w in workers if w in set(live)]
    table: dict[str, list[str]] = {w: [] for w in live}
    if not live:
        return table
    orphans = []
    for i, stream in enumerate(streams):
        home = workers[i % len(workers)]
        (table[home] if home in table else orphans).append(stream)
    for stream in orphans:  # fewest streams first; ties by worker order, so the result is deterministic
        table[min(live, key=lambda w: (len(table[w]), live.index(w)))].append(stream)
    return table


@dataclass
class ShardPlan:
    """Everything the launcher needs to run ``workers`` inference workers over ``routes``."""

    routes: list[StreamRoute]
    workers: list[str]
    assignments_endpoint: str  # launcher PUB (bind) -> workers SUB (connect)
    heatmaps_in: str  # proxy XSUB (bind) <- workers' heatmap PUB (connect)
    heatmaps_out: str  # proxy XPUB (bind) -> subscribers

    def table(self, live: Iterable[str]) -> dict[str, list[list[str | None]]]:
        by_stream = {r.stream: r for r in self.routes}
        owned = assign([r.stream for r in self.routes], self.workers, live)
        return {w: [by_stream[s].as_list() for s in streams] for w, streams in owned.items()}


def parse_assignment(
    msg: protocol.Message, worker: str, token: str | None, verifier: security.Verifier | None = None
) -> list[StreamRoute] | None:
    """This worker's routes from an ``assign`` control message; None when it is not a valid one (unsigned
    while the worker has a run token, an older table sent again — ``verifier`` —, malformed). A worker missing
    from a valid table owns nothing."""
    if msg.kind != "control" or msg.meta.get("command") != ASSIGN_COMMAND:
        return None
    if verifier is not None:
        if verifier.check(msg) is not None:
            return None
    elif token is not None and not security.verify(token, msg):
        return None
    table = msg.meta.get("workers")
    if not isinstance(table, dict):
        return None
    entries = table.get(worker, [])
    routes = []
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not all(isinstance(x, str) for x in entry[:2])
            or not (entry[2] is None or isinstance(entry[2], str))
        ):
            return None
        routes.append(StreamRoute(*entry))
    return routes


class AssignmentPublisher:
    """The launcher's side: publishes the table (signed with the run token) on change and periodically."""

    def __init__(self, ctx: zmq.Context, endpoint: str, token: str | None) -> None:
        self._socket = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=True, hwm=16)
        self._token = token
        self._seq = 0
        self._last_sent = -float("inf")
        self.table: dict[str, Any] | None = None
        self.changes = 0

    def update(self, table: dict[str, Any]) -> bool:
        """Publish ``table`` now if it differs from the last one, else when ``REPUBLISH_S`` has passed;
        returns whether it changed."""
        changed = table != self.table
        if changed:
            self.table = table
            self.changes += 1
        if changed or time.monotonic() - self._last_sent >= REPUBLISH_S:
            ts = {"send": protocol.now()}
            meta = {"command": ASSIGN_COMMAND, "epoch": self.changes, "workers": table}
            meta = security.signed_meta(self._token, "control", "launcher", self._seq, ts, meta)
            protocol.send(self._socket, "control", stream="launcher", seq=self._seq, ts=ts, meta=meta)
            self._seq += 1
            self._last_sent = time.monotonic()
        return changed

    def close(self) -> None:
        self._socket.close(0)


def _proxy_socket(ctx: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
    """An XSUB/XPUB bound with the limits ``protocol.make_socket`` gives PUB/SUB sockets (and CURVE when
    keys are configured)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, PROXY_HWM)
    sock.setsockopt(zmq.RCVHWM, PROXY_HWM)
    # XSUB receives heatmaps from the workers; XPUB only subscriptions from subscribers
    limit = protocol.DEFAULT_MAX_MESSAGE_BYTES if kind == zmq.XSUB else protocol.MAX_SUBSCRIPTION_BYTES
    sock.setsockopt(zmq.MAXMSGSIZE, limit)
    try:
        security.check_bind(endpoint)
        security.secure_socket(sock, bind=True)
        sock.bind(endpoint)
    except zmq.ZMQError as err:
        sock.close(0)
        raise protocol.EndpointError(f"cannot bind the heatmap proxy to {endpoint}: {err}") from err
    except Exception:
        sock.close(0)
        raise
    return sock


class HeatmapProxy:
    """XSUB (``inbound``, workers connect) -> XPUB (``outbound``, subscribers connect), in a thread.

    The sockets are bound in the calling thread, so a port in use is an error of ``start``, and handed to
    the proxy thread, which alone uses them from then on (ZeroMQ sockets move between threads safely when
    the hand-over is a full memory barrier: ``Thread.start``)."""

    def __init__(self, ctx: zmq.Context, inbound: str, outbound: str) -> None:
        self.inbound = inbound
        self.outbound = outbound
        self._ctx = ctx
        self._control_endpoint = f"inproc://heatmap-proxy-{id(self)}"
        self._control: zmq.Socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        xsub = _proxy_socket(self._ctx, zmq.XSUB, self.inbound)
        try:
            xpub = _proxy_socket(self._ctx, zmq.XPUB, self.outbound)
        except Exception:
            xsub.close(0)
            raise
        control_in = self._ctx.socket(zmq.PAIR)
        control_in.bind(self._control_endpoint)
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.connect(self._control_endpoint)

        def run() -> None:
            try:
                zmq.proxy_steerable(xsub, xpub, None, control_in)
            except zmq.ContextTerminated:
                pass
            finally:
                for sock in (xsub, xpub, control_in):
                    sock.close(0)

        self._thread = threading.Thread(target=run, name="heatmap-proxy", daemon=True)
        self._thread.start()
        log.info("heatmap proxy: workers -> %s, subscribers <- %s", self.inbound, self.outbound)

    def stop(self) -> None:
        """End the proxy thread and close its sockets (the context is the caller's to terminate)."""
        if self._control is not None and self._thread is not None:
            self._control.send(b"TERMINATE")
            self._thread.join(timeout=5.0)
            self._control.close(0)
            self._control = None

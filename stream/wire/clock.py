"""One clock for a pipeline spread over hosts: the offset of this host's clock to a reference host's (NTP-style).

Every timestamp on the wire is ``protocol.now()``. On one host that is CLOCK_MONOTONIC, shared by all processes;
across hosts each monotonic clock has its own zero, so a capture stamp from host A and a display stamp from host
B differ by an arbitrary amount. One process on the reference host (``avloc worker inference --clock-serve EP``)
runs a :class:`ClockServer`: a ROUTER socket answering each request with the reference clock. Every worker on
another host (``avloc worker ROLE --clock EP``) measures its offset before it starts (:func:`measure`) and again
every ``interval_s`` (:class:`ClockSync`), and ``protocol.set_clock_offset`` puts its ``now()`` on the reference
clock, so e2e latency (display - capture) and A/V pairing (frame capture vs audio window end) hold across hosts.

Each exchange is one round trip: the client stamps t0 (its local clock), the server replies with its clock ts,
the client stamps t1. Whatever the path's asymmetry, the server read its clock somewhere inside [t0, t1], so
``offset = ts - (t0 + t1) / 2`` is off by at most ``(t1 - t0) / 2``. Of a burst of exchanges the one with the
smallest round trip is kept (least queueing, tightest bound): its half round trip is the reported uncertainty.

Messages are ordinary protocol messages of kind ``control`` (``meta.command = "clock"``), over CURVE when keys are
configured like every other socket (which authenticates the server: a client never takes a clock from a process
without the server key). Under a launcher (a run token) replies also carry an HMAC tag and untagged ones are
ignored. Once synced, a resync that would move the clock by more than ``MAX_JUMP_S`` is refused and counted
(``rejected_jumps`` in the heartbeat's ``stats.clock``): a reference clock does not jump, a forged one would.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from avloc.core.errors import UserError
from avloc.stream.wire import protocol, security

log = logging.getLogger(__name__)

DEFAULT_CLOCK_ENDPOINT = "tcp://127.0.0.1:5554"
COMMAND = "clock"
SAMPLES = 16  # exchanges per measurement: a few ms on a LAN, and one of them nearly always without queueing
RESYNC_S = 30.0  # monotonic clocks drift by tens of ppm at most: well under 1 ms per resync interval
REPLY_TIMEOUT_S = 1.0
# Largest offset change a resync may apply (monotonic clocks drift by microseconds per resync interval). A larger
# one means the reference process restarted on a rebooted host or someone answers in its place: refused, logged;
# restart the worker to take the new clock.
MAX_JUMP_S = 0.5


@dataclass(frozen=True)
class ClockEstimate:
    """``reference clock ≈ local clock + offset_s``, within ±``uncertainty_s`` (half the best round trip)."""

    offset_s: float
    uncertainty_s: float
    rtt_s: float
    samples: int  # exchanges that got a reply

    def as_dict(self) -> dict[str, Any]:
        return {
            "offset_s": self.offset_s,
            "uncertainty_s": self.uncertainty_s,
            "rtt_s": self.rtt_s,
            "samples": self.samples,
        }


def best_estimate(exchanges: list[tuple[float, float, float]]) -> ClockEstimate:
    """The estimate of the exchange ``(t0, server, t1)`` with the smallest round trip."""
    if not exchanges:
        raise ValueError("no clock exchanges")
    t0, server, t1 = min(exchanges, key=lambda e: e[2] - e[0])
    rtt = t1 - t0
    return ClockEstimate(server - (t0 + t1) / 2, rtt / 2, rtt, len(exchanges))


class ClockServer:
    """Answers clock requests with this process's ``protocol.now()`` from a background thread.

    The socket is created and used only inside the thread (ZeroMQ sockets are not thread-safe). ``start`` raises
    the bind error (a UserError such as a port in use, or a non-loopback bind without keys) in the caller.
    """

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self._ctx = ctx or zmq.Context.instance()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="clock-server", daemon=True)
        self.replies = 0
        self.rejects = protocol.RejectCounter("clock", logger=log)
        self._token = security.run_token()  # under a launcher: replies are tagged

    def start(self) -> ClockServer:
        self._thread.start()
        self._ready.wait(10.0)
        if self._error is not None:
            raise self._error
        log.info("clock service on %s", self.endpoint)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def _run(self) -> None:
        try:
            sock = protocol.make_socket(self._ctx, zmq.ROUTER, self.endpoint, bind=True, hwm=64)
        except BaseException as err:  # handed to start(): a bad endpoint is the caller's user error
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100, zmq.POLLIN):
                    continue
                frames = sock.recv_multipart(copy=False)
                server_t = protocol.now()  # as soon as the request is in: the reply's queueing adds to the RTT only
                self._answer(sock, frames, server_t)
        finally:
            sock.close(0)

    def _answer(self, sock: zmq.Socket, frames: list[Any], server_t: float) -> None:
        if len(frames) < 2:
            self.rejects.reject(protocol.ProtocolError("empty", "clock request without a body"))
            return
        try:
            msg = protocol.decode(frames[1:], max_message_bytes=protocol.MAX_SUBSCRIPTION_BYTES)
        except protocol.ProtocolError as err:
            self.rejects.reject(err)
            return
        if msg.kind != "control" or msg.meta.get("command") != COMMAND or "t0" not in msg.ts:
            self.rejects.reject(protocol.ProtocolError("unexpected", f"{msg.kind} {msg.meta.get('command')!r}"))
            return
        ts = {"t0": msg.ts["t0"], "server": server_t}
        meta = security.signed_meta(self._token, "control", msg.stream, msg.seq, ts, {"command": COMMAND})
        reply = protocol.encode("control", stream=msg.stream, seq=msg.seq, ts=ts, meta=meta)
        try:
            sock.send_multipart([frames[0], *reply], flags=zmq.NOBLOCK)
            self.replies += 1
        except zmq.ZMQError:  # the client went away or its queue is full: it times out and asks again
            pass


def _exchange(sock: zmq.Socket, seq: int, timeout_s: float) -> tuple[float, float, float] | None:
    t0 = protocol.local_clock()
    if not protocol.send(sock, "control", stream="clock", seq=seq, ts={"t0": t0}, meta={"command": COMMAND}):
        time.sleep(0.05)  # no room to queue the request (not connected yet): do not spin
        return None
    deadline = t0 + timeout_s
    while (remaining := deadline - protocol.local_clock()) > 0:
        try:
            msg = protocol.recv(sock, int(remaining * 1000) + 1)
        except protocol.ProtocolError as err:
            log.warning("clock: bad reply (%s)", err)
            continue
        t1 = protocol.local_clock()
        if msg is None:
            return None
        if msg.seq == seq and msg.ts.get("t0") == t0 and "server" in msg.ts:
            token = security.run_token()
            if token is not None and not security.verify(token, msg):  # t0 echoed makes it fresh; the tag, ours
                log.warning("clock: reply without a valid run token tag ignored")
                continue
            return t0, msg.ts["server"], t1
        # a late reply to an earlier exchange: its round trip is not this one's
    return None


def measure(
    endpoint: str,
    *,
    samples: int = SAMPLES,
    timeout_s: float = 10.0,
    ctx: zmq.Context | None = None,
) -> ClockEstimate:
    """Estimate ``reference - local`` against the clock service at ``endpoint`` (min-RTT of ``samples``).

    Keeps asking for up to ``timeout_s`` (the reference host may still be starting); UserError when no reply came.
    """
    ctx = ctx or zmq.Context.instance()
    # DEALER, not REQ: a lost reply never leaves the socket stuck in REQ's send/receive lock-step
    sock = protocol.make_socket(ctx, zmq.DEALER, endpoint, bind=False, hwm=samples)
    exchanges: list[tuple[float, float, float]] = []
    deadline = time.monotonic() + timeout_s
    seq = 0
    try:
        while len(exchanges) < samples and time.monotonic() < deadline:
            got = _exchange(sock, seq, min(REPLY_TIMEOUT_S, max(0.05, deadline - time.monotonic())))
            seq += 1
            if got is not None:
                exchanges.append(got)
    finally:
        sock.close(0)
    if not exchanges:
        raise UserError(
            f"--clock {endpoint}: no reply from a clock service within {timeout_s:.0f} s "
            "(is `avloc worker inference --clock-serve` running there, with the same keys?)"
        )
    return best_estimate(exchanges)


def apply(estimate: ClockEstimate, endpoint: str) -> None:
    """Put this process's ``protocol.now()`` on the reference clock."""
    protocol.set_clock_offset(
        estimate.offset_s,
        estimate.uncertainty_s,
        rtt_s=estimate.rtt_s,
        reference=endpoint,
        synced_at=protocol.local_clock(),
    )


class ClockSync:
    """Measures and applies the offset at start (:meth:`sync`) and every ``interval_s`` in a thread."""

    def __init__(
        self,
        endpoint: str,
        *,
        interval_s: float = RESYNC_S,
        samples: int = SAMPLES,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.interval_s = interval_s
        self.samples = samples
        self._ctx = ctx or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.estimate: ClockEstimate | None = None
        self.resyncs = 0
        self.rejected_jumps = 0

    def sync(self, timeout_s: float = 30.0) -> ClockEstimate:
        """Measure and apply now (before the worker takes its first timestamp)."""
        estimate = measure(self.endpoint, samples=self.samples, timeout_s=timeout_s, ctx=self._ctx)
        self._apply(estimate)
        return estimate

    def _apply(self, estimate: ClockEstimate) -> None:
        old = self.estimate
        # A burst that only saw queued round trips (a busy network for a moment) is less precise than what we
        # have: keep the old offset, which drifts far less than such an estimate is off.
        if old is not None and estimate.uncertainty_s > max(2 * old.uncertainty_s, 0.001):
            log.info(
                "clock: kept offset %+.6f s (new burst ±%.1f ms is worse)", old.offset_s, estimate.uncertainty_s * 1e3
            )
            return
        if old is not None and abs(estimate.offset_s - old.offset_s) > MAX_JUMP_S:
            self.rejected_jumps += 1
            log.error(
                "clock: refused to move the clock by %+.3f s (more than %.1f s; the reference restarted on another "
                "boot, or something else answered); keeping offset %+.6f s, restart this worker to take the new clock",
                estimate.offset_s - old.offset_s,
                MAX_JUMP_S,
                old.offset_s,
            )
            info = {k: v for k, v in protocol.clock_stats().items() if k not in ("offset_s", "uncertainty_s", "synced")}
            protocol.set_clock_offset(
                old.offset_s, old.uncertainty_s, **{**info, "rejected_jumps": self.rejected_jumps}
            )
            return
        if old is not None and abs(estimate.offset_s - old.offset_s) > 0.05:
            log.warning("clock: offset moved %+.3f s (reference host restarted?)", estimate.offset_s - old.offset_s)
        self.estimate = estimate
        apply(estimate, self.endpoint)
        log.info(
            "clock: offset %+.6f s ± %.3f ms to %s (best RTT %.3f ms of %d)",
            estimate.offset_s,
            estimate.uncertainty_s * 1e3,
            self.endpoint,
            estimate.rtt_s * 1e3,
            estimate.samples,
        )

    def start(self) -> ClockSync:
        self._thread = threading.Thread(target=self._run, name="clock-sync", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                estimate = measure(
                    self.endpoint, samples=self.samples, timeout_s=min(5.0, self.interval_s), ctx=self._ctx
                )
            except UserError as err:  # the reference host is away for now: keep the last offset
                log.warning("clock: resync failed (%s); keeping offset", err)
                continue
            self.resyncs += 1
            self._apply(estimate)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)

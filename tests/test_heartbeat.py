"""The heartbeat's `due()` paces the callers' periodic work (stats, evictions), with or without an endpoint."""

import time

import zmq

from avloc.stream.runtime.worker import Heartbeat
from avloc.stream.wire import protocol


def test_heartbeat_without_endpoint_is_due_once_per_interval() -> None:
    """No --heartbeat: still due once per interval (evictions run), not on every loop (stats rebuilt for nothing)."""
    beat = Heartbeat(None, None, role="display", stream="s", interval_s=0.05)
    assert beat.due()
    beat.maybe_send({"x": 1})  # sends nothing, but the interval restarts
    assert not beat.due()
    time.sleep(0.06)
    assert beat.due()


def test_heartbeat_with_endpoint_is_due_after_its_interval() -> None:
    ctx = zmq.Context()
    sub = protocol.make_socket(ctx, zmq.SUB, f"inproc://hb-due-{time.monotonic_ns()}", bind=True, hwm=10)
    beat = Heartbeat(ctx, sub.getsockopt_string(zmq.LAST_ENDPOINT), role="t", stream="t", interval_s=0.05)
    try:
        assert beat.due()  # never sent yet
        beat.maybe_send({}, force=True)
        assert not beat.due()
        time.sleep(0.06)
        assert beat.due()
    finally:
        beat.close()
        sub.close(0)
        ctx.term()

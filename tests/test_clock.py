"""Clock offset between hosts (stream/wire/clock.py): the NTP-style estimate, the service, the skew test hook."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from avloc.core.errors import UserError
from avloc.stream.run.launcher import free_tcp_endpoint
from avloc.stream.wire import clock, protocol


def test_min_rtt_estimate_is_within_its_uncertainty_of_the_true_offset():
    rng = random.Random(4)
    true_offset = -5.0321
    exchanges = []
    for i in range(16):
        t0 = 100.0 + i
        out, back = rng.uniform(1e-4, 0.02), rng.uniform(1e-4, 0.02)  # asymmetric, queued paths
        server = t0 + out + true_offset
        exchanges.append((t0, server, t0 + out + back))
    est = clock.best_estimate(exchanges)
    rtts = [t1 - t0 for t0, _, t1 in exchanges]
    assert est.rtt_s == pytest.approx(min(rtts)) and est.samples == 16
    assert abs(est.offset_s - true_offset) <= est.uncertainty_s + 1e-12
    with pytest.raises(ValueError):
        clock.best_estimate([])


def test_a_process_with_a_skewed_clock_measures_and_applies_the_offset():
    endpoint = free_tcp_endpoint()
    server = clock.ClockServer(endpoint).start()
    child = (
        "import json, time\n"
        "from avloc.stream.wire import clock, protocol\n"
        f"est = clock.ClockSync({endpoint!r}).sync(timeout_s=60)\n"
        # each difference of two clocks is bracketed by reading the second one before and after the first
        "m0 = time.monotonic(); local = protocol.local_clock(); m1 = time.monotonic()\n"
        "l0 = protocol.local_clock(); now = protocol.now(); l1 = protocol.local_clock()\n"
        "print(json.dumps({'offset': est.offset_s, 'unc': est.uncertainty_s,"
        " 'skew': [local - m1, local - m0], 'applied': [now - l1, now - l0],"
        " 'stats': protocol.clock_stats()}))\n"
    )
    try:
        env = {**os.environ, protocol.CLOCK_SKEW_ENV: "5"}
        done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["skew"][0] - 1e-9 <= 5.0 <= out["skew"][1] + 1e-9  # the hook moved its local clock
    # same kernel clock underneath: the true offset is exactly -5 s, and the estimate knows how close it is
    assert abs(out["offset"] + 5.0) <= out["unc"] + 1e-3 and out["unc"] < 0.05
    assert out["applied"][0] - 1e-9 <= out["offset"] <= out["applied"][1] + 1e-9  # now() = local_clock() + offset
    assert out["stats"]["synced"] and out["stats"]["reference"] == endpoint
    assert server.replies >= 16


def test_resync_keeps_the_offset_when_a_burst_is_much_less_precise(monkeypatch):
    applied = []
    monkeypatch.setattr(clock, "apply", lambda estimate, endpoint: applied.append(estimate))
    sync = clock.ClockSync("tcp://127.0.0.1:1")
    good = clock.ClockEstimate(-5.0, 0.0002, 0.0004, 16)
    sync._apply(good)
    sync._apply(clock.ClockEstimate(-5.03, 0.04, 0.08, 16))  # a congested burst: kept the precise one
    sync._apply(clock.ClockEstimate(-5.0001, 0.0003, 0.0006, 16))
    assert [e.offset_s for e in applied] == [-5.0, -5.0001] and sync.estimate == applied[-1]


def test_no_clock_service_is_a_one_line_user_error():
    with pytest.raises(UserError, match="no reply from a clock service"):
        clock.measure(free_tcp_endpoint(), samples=2, timeout_s=0.5)


def test_clock_server_answers_only_clock_requests():
    import zmq

    endpoint = free_tcp_endpoint()
    server = clock.ClockServer(endpoint).start()
    ctx = zmq.Context.instance()
    sock = protocol.make_socket(ctx, zmq.DEALER, endpoint, bind=False)
    try:
        sock.send_multipart([b"not json"])
        protocol.send(sock, "control", stream="x", seq=1, ts={"t0": 1.0}, meta={"command": "end"})
        assert protocol.recv(sock, 300) is None
        est = clock.measure(endpoint, samples=4, timeout_s=30)
        assert abs(est.offset_s) <= est.uncertainty_s + 1e-3  # same process, same clock
    finally:
        sock.close(0)
        server.stop()
    assert server.rejects.counts["bad_json"] == 1 and server.rejects.counts["unexpected"] == 1


def test_worker_command_user_errors_are_one_line(capsys, tmp_path):
    from avloc.cli import main

    assert main(["worker", "replay", "clip.mp4", "--keys", str(tmp_path / "nokeys")]) == 2
    assert "--keys" in capsys.readouterr().err
    dead = free_tcp_endpoint()
    assert main(["worker", "display", "--headless", "--clock", dead, "--clock-timeout", "0.3"]) == 2
    err = capsys.readouterr().err
    assert f"--clock {dead}: no reply" in err and "Traceback" not in err


def test_worker_help_shows_the_worker_options_and_the_multihost_ones(capsys):
    from avloc.cli import main

    assert main(["worker", "display", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--clock-serve" in out and "--latency-log" in out and "--heatmaps" in out

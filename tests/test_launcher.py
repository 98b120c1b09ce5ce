"""Launcher: restarts of crashed / silent workers, kill -9 of the inference worker, Ctrl-C, no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from proc_helpers import orphans, worker_processes

from avloc.stream.run.launcher import Launcher, ProcessSpec, StreamConfig, ephemeral_port_range, free_tcp_endpoint

DUMMY_WORKER = textwrap.dedent('''
    """A worker that beats, then (by --mode) keeps going, crashes, hangs without heartbeats, beats "stalled" or
    says "loading" for --after seconds. AVLOC_DUMMY_MARKS=DIR: times of its import, main start and readiness."""
    import argparse, os, time
    import zmq
    from avloc.stream.runtime.worker import Heartbeat, add_common_arguments, install_stop_handlers, setup_logging

    MARKS = os.environ.get("AVLOC_DUMMY_MARKS")


    def mark(what):  # the first time only (a held start runs the module body twice: import, then as __main__)
        if MARKS and not os.path.exists(os.path.join(MARKS, what)):
            with open(os.path.join(MARKS, what), "w") as f:
                f.write(repr(time.time()))


    mark("imported")


    def main():
        mark("main")
        p = argparse.ArgumentParser()
        p.add_argument("--mode", default="ok")
        p.add_argument("--after", type=float, default=0.5)
        add_common_arguments(p, role="dummy")
        a = p.parse_args()
        setup_logging("dummy", a.log_file)
        stop = install_stop_handlers()
        hb = Heartbeat(zmq.Context.instance(), a.heartbeat, role="dummy", stream=a.stream_id, interval_s=0.1)
        start = time.monotonic()
        ready = False
        while not stop.is_set():
            elapsed = time.monotonic() - start
            if a.mode == "crash" and elapsed > a.after:
                os._exit(3)
            if a.mode == "usererror" and elapsed > a.after:
                import logging
                logging.getLogger("dummy").error("--mic bogus: no input device name contains it")
                hb.close()
                raise SystemExit(2)
            if a.mode == "end" and elapsed > a.after:
                hb.control("end")
                break
            if a.mode == "stall" and elapsed > a.after:  # the loop beats on, but reports its work stuck
                hb.maybe_send({"elapsed": elapsed, "state": "stalled"})
            elif a.mode == "load" and elapsed < a.after:
                hb.maybe_send({"elapsed": elapsed, "state": "loading"})
            elif not (a.mode == "hang" and elapsed > a.after):
                if not ready:
                    ready = True
                    mark("ready")
                hb.maybe_send({"elapsed": elapsed}, force=a.mode == "load")
            time.sleep(0.02)
        hb.close()


    if __name__ == "__main__":
        main()
''')


@pytest.fixture()
def dummy_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "avloc_dummy_worker.py").write_text(DUMMY_WORKER)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return "avloc_dummy_worker"


def _assert_no_orphans(parent: psutil.Process | None = None) -> None:
    parent = parent or psutil.Process()
    alive = orphans(parent)
    assert not alive, f"orphan processes: {[p.cmdline() for p in alive]}"


def _poll_until(launcher: Launcher, condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        launcher.poll()
        time.sleep(0.05)


FAST = StreamConfig(
    heartbeat_timeout_s=1.0,
    startup_grace_s=20.0,
    restart_backoff_s=0.1,
    restart_backoff_max_s=0.2,
    max_restarts=2,
    drain_s=0.1,
    stop_timeout_s=5.0,
    display_stop_timeout_s=5.0,
)


# Back-off 0.25 s doubling per restart, capped at 0.6 s: waits of 0.25, 0.5, 0.6 (uncapped: 1.0) before restarts
# 1, 2, 3. The gaps between the schedule's steps (>= 0.1 s) tell doubling, cap and instant restarts apart.
BACKOFF = replace(FAST, restart_backoff_s=0.25, restart_backoff_max_s=0.6, max_restarts=3)
BACKOFF_SCHEDULE = [0.25, 0.5, 0.6]


def _restart_waits(events: list[dict], name: str) -> list[float]:
    """Seconds from each crash (exit, or kill for silence) of ``name`` to its restart, from the event log."""
    waits, crashed_at = [], None
    for e in events:
        if e["process"] != name:
            continue
        if e["event"] == "crash":
            crashed_at = e["t"]
        elif e["event"] == "restart":
            assert crashed_at is not None, "restart without a crash"
            waits.append(round(e["t"] - crashed_at, 3))
            crashed_at = None
    return waits


def test_restarts_crashed_and_silent_workers_then_gives_up(dummy_module, tmp_path):
    specs = [
        ProcessSpec("steady", dummy_module, ["--mode", "ok"], role="display"),
        ProcessSpec("crasher", dummy_module, ["--mode", "crash", "--after", "0.3"], role="inference"),
        ProcessSpec("hanger", dummy_module, ["--mode", "hang", "--after", "0.3"], role="source"),
    ]
    launcher = Launcher(specs, tmp_path / "run", config=BACKOFF, heartbeat_endpoint=free_tcp_endpoint())
    launcher.start()
    try:
        deadline = time.monotonic() + 60
        while not (launcher.children["crasher"].done and launcher.children["hanger"].done):
            assert time.monotonic() < deadline, "workers were not given up on"
            launcher.poll()
            time.sleep(0.05)
    finally:
        summary = launcher.shutdown("timeout")
    procs = summary["processes"]
    assert procs["crasher"]["restarts"] == BACKOFF.max_restarts and procs["crasher"]["exit_code"] == 3
    assert procs["hanger"]["restarts"] == BACKOFF.max_restarts  # killed for silence, restarted, then given up
    # exponential back-off with its cap, measured between each crash event and the restart that follows
    # (events are stamped to the millisecond; a restart is due at the first poll, every 50 ms, after its wait)
    for name in ("crasher", "hanger"):
        waits = _restart_waits(summary["events"], name)
        assert len(waits) == BACKOFF.max_restarts, (name, waits)
        for wait, expected in zip(waits, BACKOFF_SCHEDULE):
            assert expected - 0.005 <= wait < expected + 0.3, (name, waits, BACKOFF_SCHEDULE)
    assert procs["steady"]["restarts"] == 0 and procs["steady"]["exit_code"] == 0  # stopped by SIGTERM cleanly
    whys = {e["why"] for e in summary["events"] if e["event"] == "crash"}
    assert "stopped sending heartbeats" in whys and "exited" in whys
    assert summary["reason"] == "timeout"
    for name in ("steady", "crasher", "hanger"):
        assert (tmp_path / "run" / f"{name}.log").is_file()  # one log per process
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["processes"].keys() == procs.keys()
    _assert_no_orphans()


def _finite_source(module: str, args: list[str], **extra: Any) -> ProcessSpec:
    """A replay-like source: finite, named "replay"."""
    return ProcessSpec("replay", module, args, role="source", finite=True, **extra)


def test_finite_source_end_stops_everything(dummy_module, tmp_path):
    specs = [
        ProcessSpec("display", dummy_module, [], role="display"),
        ProcessSpec("inference", dummy_module, [], role="inference"),
        _finite_source(dummy_module, ["--mode", "end", "--after", "1.0"], after=("inference", "display")),
    ]
    started = time.monotonic()
    summary = Launcher(specs, tmp_path / "run", config=FAST, heartbeat_endpoint=free_tcp_endpoint()).run(timeout_s=40)
    assert summary["reason"] == "ended" and time.monotonic() - started < 30
    assert all(p["restarts"] == 0 and p["exit_code"] == 0 for p in summary["processes"].values())
    order = [e["process"] for e in summary["events"] if e["event"] == "start"]
    assert order[-1] == "replay"  # the source waited for its consumers
    _assert_no_orphans()


def test_a_source_imports_while_the_engine_loads_and_runs_once_it_is_ready(dummy_module, tmp_path):
    """A source with ``after`` is started held: its imports (torch: seconds) overlap the engine's loading, its
    work starts only once the inference worker is ready."""
    marks = {name: tmp_path / name for name in ("inference", "replay")}
    for folder in marks.values():
        folder.mkdir()
    specs = [
        ProcessSpec(
            "inference",
            dummy_module,
            ["--mode", "load", "--after", "2.0"],
            role="inference",
            env={"AVLOC_DUMMY_MARKS": str(marks["inference"])},
        ),
        _finite_source(
            dummy_module,
            ["--mode", "end", "--after", "0.5"],
            after=("inference",),
            env={"AVLOC_DUMMY_MARKS": str(marks["replay"])},
        ),
    ]
    summary = Launcher(specs, tmp_path / "run", config=FAST, heartbeat_endpoint=free_tcp_endpoint()).run(timeout_s=40)
    assert summary["reason"] == "ended", summary["reason"]
    assert summary["processes"]["replay"]["exit_code"] == 0 and summary["processes"]["replay"]["restarts"] == 0

    def when(process: str, what: str) -> float:
        return float((marks[process] / what).read_text())

    assert when("replay", "imported") < when("inference", "ready")  # imported beside the loading engine
    assert when("replay", "main") >= when("inference", "ready")  # and ran only once it was ready
    assert [e["process"] for e in summary["events"] if e["event"] == "start"] == ["inference", "replay"]
    _assert_no_orphans()


def test_a_source_restarted_while_its_engine_reloads_waits_for_it(dummy_module, tmp_path):
    """Both killed past startup_grace_s after the launch: the restarted source is held until the restarted engine
    is ready again, not let go at once with a warning that it waited startup_grace_s (the wait is its own)."""
    specs = [
        ProcessSpec("inference", dummy_module, ["--mode", "load", "--after", "1.0"], role="inference"),
        ProcessSpec("replay", dummy_module, [], role="source", after=("inference",)),
    ]
    config = replace(FAST, startup_grace_s=8.0)  # the restarted engine gets ready well within it (~2 s)
    launcher = Launcher(specs, tmp_path / "run", config=config, heartbeat_endpoint=free_tcp_endpoint())
    inference, replay = launcher.children["inference"], launcher.children["replay"]
    launched = time.monotonic()
    launcher.start()
    try:
        _poll_until(launcher, lambda: replay.ready and time.monotonic() - launched > 8.5, 40, "never ready")
        for child in (inference, replay):
            os.kill(child.popen.pid, signal.SIGKILL)
        _poll_until(launcher, lambda: inference.restarts == replay.restarts == 1, 30, "not restarted")
        let_go_early = []

        def engine_ready_again() -> bool:
            if not replay.held and not inference.ready:
                let_go_early.append(time.monotonic())
            return inference.ready

        _poll_until(launcher, engine_ready_again, 30, "the engine never came back")
        assert not let_go_early, "the restarted source ran while its engine was still loading"
        _poll_until(launcher, lambda: replay.ready, 30, "the source never ran again")
    finally:
        launcher.shutdown("timeout")
    _assert_no_orphans()


def test_a_source_that_died_held_is_not_let_go(tmp_path, monkeypatch):
    """A held source that died before its engine got ready is restarted, never 'let go' (no start event for a
    dead pid)."""
    (tmp_path / "avloc_import_crash.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    specs = [ProcessSpec("replay", "avloc_import_crash", [], role="source", after=("inference",))]
    specs.insert(0, ProcessSpec("inference", "avloc_import_crash", [], role="inference"))
    launcher = Launcher(specs, tmp_path / "run", config=FAST, heartbeat_endpoint=free_tcp_endpoint())
    launcher.start()
    try:
        replay = launcher.children["replay"]
        assert replay.held
        replay.popen.wait(timeout=30)
        launcher.children["inference"].ready = True  # its engine gets ready just after
        launcher._start_waiting()
        assert [e for e in launcher.events if e["process"] == "replay"] == []
    finally:
        launcher.shutdown("timeout")
    _assert_no_orphans()


def test_user_error_is_not_restarted_and_fails_the_pipeline_with_its_message(dummy_module, tmp_path):
    specs = [
        ProcessSpec("display", dummy_module, [], role="display"),
        ProcessSpec("inference", dummy_module, [], role="inference"),
        ProcessSpec("mic", dummy_module, ["--mode", "usererror", "--after", "0.2"], role="source"),
    ]
    started = time.monotonic()
    summary = Launcher(specs, tmp_path / "run", config=FAST, heartbeat_endpoint=free_tcp_endpoint()).run(timeout_s=40)
    assert time.monotonic() - started < 30
    assert summary["reason"] == "failed: mic: --mic bogus: no input device name contains it"
    assert summary["processes"]["mic"]["restarts"] == 0 and summary["processes"]["mic"]["exit_code"] == 2
    _assert_no_orphans()


def test_finite_source_that_gives_up_fails_the_pipeline(dummy_module, tmp_path):
    specs = [
        ProcessSpec("display", dummy_module, [], role="display"),
        ProcessSpec("inference", dummy_module, [], role="inference"),
        ProcessSpec("replay", dummy_module, ["--mode", "crash", "--after", "0.2"], role="source", finite=True),
    ]
    summary = Launcher(specs, tmp_path / "run", config=FAST, heartbeat_endpoint=free_tcp_endpoint()).run(timeout_s=40)
    assert summary["reason"] == "failed: replay"  # not a hang, and not "ended"
    assert summary["processes"]["replay"]["restarts"] == FAST.max_restarts
    _assert_no_orphans()


def test_pipeline_fails_when_inference_keeps_crashing(dummy_module, tmp_path):
    specs = [
        ProcessSpec("display", dummy_module, [], role="display"),
        ProcessSpec("inference", dummy_module, ["--mode", "crash", "--after", "0.2"], role="inference"),
    ]
    launcher = Launcher(specs, tmp_path / "run", config=FAST, heartbeat_endpoint=free_tcp_endpoint())
    summary = launcher.run(timeout_s=60)
    assert summary["reason"] == "failed: inference"
    assert summary["processes"]["inference"]["restarts"] == FAST.max_restarts
    _assert_no_orphans()


def test_children_die_when_launcher_is_sigkilled(dummy_module, tmp_path):
    script = textwrap.dedent(f"""
        from pathlib import Path
        from avloc.stream.run.launcher import Launcher, ProcessSpec, StreamConfig, free_tcp_endpoint
        specs = [ProcessSpec(f"w{{i}}", {dummy_module!r}, []) for i in range(3)]
        Launcher(specs, Path({str(tmp_path / "run")!r}), config=StreamConfig(),
                 heartbeat_endpoint=free_tcp_endpoint()).run()
    """)
    launcher = subprocess.Popen([sys.executable, "-c", script])
    proc = psutil.Process(launcher.pid)
    deadline = time.monotonic() + 30
    while len(proc.children()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    children = proc.children()
    assert len(children) == 3
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, "workers outlived a SIGKILLed launcher"


PDEATHSIG_PROBE = textwrap.dedent("""
    import ctypes, sys
    signal_number = ctypes.c_int(-1)
    ctypes.CDLL("libc.so.6").prctl(2, ctypes.byref(signal_number), 0, 0, 0)  # PR_GET_PDEATHSIG
    print(signal_number.value, sys.argv[1:], __name__)
""")


def test_workers_set_their_own_death_signal_with_no_python_between_fork_and_exec(dummy_module, tmp_path, monkeypatch):
    """A preexec_fn runs Python in the forked child, which can deadlock it when the launcher runs in a thread
    (it did, under the suite): the launcher must not use one, and each child sets PR_SET_PDEATHSIG itself."""
    popen_kwargs: list[dict] = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        popen_kwargs.append(kwargs)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    specs = [
        ProcessSpec("inference", dummy_module, [], role="inference"),
        ProcessSpec("replay", dummy_module, ["--mode", "end", "--after", "0.3"], role="source", finite=True),
    ]
    summary = Launcher(specs, tmp_path / "run", config=FAST, heartbeat_endpoint=free_tcp_endpoint()).run(timeout_s=40)
    assert summary["reason"] == "ended"
    assert len(popen_kwargs) == 2 and all(kw.get("preexec_fn") is None for kw in popen_kwargs)
    monkeypatch.undo()

    (tmp_path / "avloc_pdeathsig_probe.py").write_text(PDEATHSIG_PROBE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    entry = [sys.executable, "-m", "avloc.stream.run.child_entry"]
    run = subprocess.run(
        [*entry, str(os.getpid()), "avloc_pdeathsig_probe", "--x", "1"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split(maxsplit=1) == [str(int(signal.SIGTERM)), "['--x', '1'] __main__\n"]
    # started by a launcher that is already gone (the pid is not its parent): exits before running the worker
    # (pid 0: never a parent here, even where pytest itself runs as pid 1 in a container)
    gone = subprocess.run([*entry, "0", "avloc_pdeathsig_probe"], env=env, capture_output=True, text=True)
    assert gone.returncode == 1 and gone.stdout == ""


FAST_EXIT_PROBE = textwrap.dedent("""
    import atexit, os, sys
    import zmq
    from avloc.stream.runtime.worker import run_worker_main

    def main():
        endpoint, marks, keep_open = sys.argv[1], sys.argv[2], sys.argv[3] == "open"
        atexit.register(lambda: open(os.path.join(marks, "atexit"), "w").close())
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(endpoint)
        for i in range(400):
            push.send(i.to_bytes(4, "little") + bytes(64 * 1024))  # 26 MB: still queued when main returns
        if not keep_open:
            push.close(linger=30000)
        raise SystemExit(3)

    if __name__ == "__main__":
        run_worker_main(main)
""")


@pytest.mark.parametrize("keep_open", [False, True], ids=["closed", "left-open"])
def test_worker_exit_sends_what_closed_sockets_hold_and_keeps_exit_code_and_atexit(tmp_path, keep_open):
    """run_worker_main skips the interpreter's finalization only after atexit ran and every context was terminated
    (their lingering messages sent); a socket left open means the normal exit. Both keep the exit status."""
    (tmp_path / "avloc_fast_exit_probe.py").write_text(FAST_EXIT_PROBE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    try:
        probe = subprocess.Popen(
            [sys.executable, "-m", "avloc_fast_exit_probe", f"tcp://127.0.0.1:{port}", str(tmp_path)]
            + ["open" if keep_open else "closed"],
            env=env,
        )
        assert probe.wait(timeout=120) == 3
        received = set()
        while pull.poll(5000 if not received else 2000):
            received.add(int.from_bytes(pull.recv()[:4], "little"))
    finally:
        pull.close(0)
        ctx.term()
    assert (tmp_path / "atexit").exists()
    if not keep_open:  # terminated before os._exit: nothing a closed socket held is lost
        assert received == set(range(400))


def test_worker_exit_stops_a_live_thread_pool_as_the_interpreter_would(tmp_path):
    """A ThreadPoolExecutor still referenced when main returns: its idle worker threads end only through the
    threading-atexit hook the interpreter runs before joining threads; joining them without it hung forever."""
    (tmp_path / "avloc_pool_probe.py").write_text(
        textwrap.dedent("""
            import time
            from concurrent.futures import ThreadPoolExecutor
            from avloc.stream.runtime.worker import run_worker_main
            POOL = ThreadPoolExecutor(2)

            def main():
                POOL.submit(time.sleep, 0.01).result()
                return 4

            if __name__ == "__main__":
                run_worker_main(main)
        """)
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    probe = subprocess.Popen([sys.executable, "-m", "avloc_pool_probe"], env=env)
    try:
        assert probe.wait(timeout=60) == 4
    finally:
        probe.kill()
        probe.wait()


def test_worker_exit_terminates_a_shadowed_context_once(tmp_path):
    """A shadow (zmq.Context.shadow, as zmq.asyncio makes) of a context: terminating both freed the one libzmq
    context twice (EFAULT) and the worker ended with a traceback and status 1 instead of its own."""
    (tmp_path / "avloc_shadow_probe.py").write_text(
        textwrap.dedent("""
            import zmq
            from avloc.stream.runtime.worker import run_worker_main
            OWNER = zmq.Context()
            SHADOW = zmq.Context.shadow(OWNER.underlying)

            def main():
                SHADOW.socket(zmq.PUB).close(0)
                return 5

            if __name__ == "__main__":
                run_worker_main(main)
        """)
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    probe = subprocess.run([sys.executable, "-m", "avloc_shadow_probe"], env=env, capture_output=True, timeout=60)
    assert probe.returncode == 5, probe.stderr.decode()[-2000:]


# ---------------------------------------------------------------------------------------------- real pipeline


def _inference_pid(launcher: psutil.Process) -> int | None:
    for child in launcher.children():
        try:
            if "avloc.stream.serve.inference" in child.cmdline():
                return child.pid
        except psutil.Error:
            continue
    return None


def _heatmaps(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_kill9_inference_recovers_and_ctrl_c_stops_cleanly(engine_and_video, tmp_path):
    engine, video = engine_and_video
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "avloc.cli",
        "replay",
        str(video),
        "--engine",
        str(engine),
        "--headless",
        "--loop",
        "--auto-ports",
        "--threads",
        "1",
        "--run-dir",
        str(run_dir),
    ]
    launcher = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc = psutil.Process(launcher.pid)
    latency_log = run_dir / "latency.jsonl"
    try:
        deadline = time.monotonic() + 90
        # 15 heatmaps (1 s at 15 fps): the worker has sent a heartbeat reporting its last heatmap
        while len([r for r in _heatmaps(latency_log) if not r.get("notice")]) < 15:
            assert time.monotonic() < deadline, "no heatmaps from the pipeline"
            assert launcher.poll() is None
            time.sleep(0.2)
        victim = _inference_pid(proc)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # heatmaps resume from a new inference worker
        while True:
            after = [r for r in _heatmaps(latency_log) if not r.get("notice") and r["ts"]["display"] > killed_at]
            if len(after) >= 5:
                break
            assert time.monotonic() - killed_at < 60, "heatmaps did not resume after kill -9"
            time.sleep(0.2)
        new_pid = _inference_pid(proc)
        assert new_pid is not None and new_pid != victim
    finally:
        workers = worker_processes(proc)
        launcher.send_signal(signal.SIGINT)  # Ctrl-C
        code = launcher.wait(timeout=60)
    assert code == 0
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"orphan processes: {alive}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reason"] == "stopped"
    assert summary["processes"]["inference"]["restarts"] == 1
    gap = summary["heatmap_gaps"][0]
    assert gap["since"] in ("last_heatmap", "crash")
    # The gap the launcher reports = what the latency log shows: the last heatmap published by the killed worker
    # to the first one published by its successor (one monotonic clock). The launcher learns of the last one from
    # a heartbeat (every 0.5 s), so it may count from up to one interval earlier ("last_heatmap"); without a
    # report it counts from the crash it saw (a poll after the kill, shorter by up to a frame + a poll); the
    # display may miss the successor's first heatmaps while it reconnects.
    published = sorted(r["ts"]["publish"] for r in _heatmaps(latency_log) if not r.get("notice"))
    last_old = max(t for t in published if t < killed_at)
    first_new = min(t for t in published if t > killed_at)
    measured = first_new - last_old
    low, high = (-0.35, 0.6) if gap["since"] == "last_heatmap" else (-0.65, 0.05)
    assert measured + low <= gap["gap_s"] <= measured + high, (gap, measured)
    assert all(p["exit_code"] == 0 for n, p in summary["processes"].items() if n != "inference")
    _assert_no_orphans(psutil.Process())


def test_stream_config_errors_name_the_file_and_field(tmp_path):
    from avloc.core.errors import UserError
    from avloc.stream.run.launcher import load_stream_config

    with pytest.raises(UserError, match="no such file"):
        load_stream_config(tmp_path / "missing.yaml")
    bad = tmp_path / "stream.yaml"
    bad.write_text("frames_endpoint: localhost:5550\n")
    with pytest.raises(UserError, match="frames_endpoint .*expected tcp://"):
        load_stream_config(bad)
    good = tmp_path / "ok.yaml"
    good.write_text("audio_reuse_s: 0.3\n")
    assert load_stream_config(good).audio_reuse_s == 0.3
    for line, field in (("inference_workers: 0", "inference_workers"), ("max_batch: -2", "max_batch")):
        bad.write_text(line + "\n")
        with pytest.raises(UserError, match=f"stream.yaml: {field}: .*expected a positive integer"):
            load_stream_config(bad)
    good.write_text("inference_workers: 2\nmax_batch: 4\n")
    config = load_stream_config(good)
    assert (config.inference_workers, config.max_batch) == (2, 4)


def test_gap_counts_from_the_crash_when_the_worker_never_reported_a_heatmap(tmp_path):
    """kill -9 within a heartbeat interval of the first heatmap: the gap is still measured (from the crash)."""
    from avloc.stream.wire import protocol

    launcher = Launcher(
        [ProcessSpec("inference", "unused", [], role="inference")],
        tmp_path / "run",
        config=FAST,
        heartbeat_endpoint=free_tcp_endpoint(),
    )
    child = launcher.children["inference"]
    for last_stats, since in (({}, "crash"), ({"last_publish": protocol.now() - 2.0}, "last_heatmap")):
        child.last_stats = last_stats
        crashed = protocol.now()
        launcher._on_exit(child, -9, "killed by signal 9")
        child.last_stats = {"first_publish": crashed + 1.5}
        launcher._check_gap(child)
        entry = launcher.gaps[-1]
        assert entry["since"] == since
        assert entry["gap_s"] == pytest.approx(1.5 if since == "crash" else 3.5, abs=0.1)


def test_auto_ports_are_outside_the_ephemeral_range_and_never_repeat():
    # Ports from the ephemeral range can be taken by any outgoing connection between the check and the
    # worker's bind ("Address already in use" in CI); auto ports avoid that range.
    low, high = ephemeral_port_range()
    ports = [int(free_tcp_endpoint().rsplit(":", 1)[1]) for _ in range(100)]
    assert len(set(ports)) == len(ports)
    assert not any(low <= p <= high for p in ports)
    context = zmq.Context.instance()
    sockets = [context.socket(zmq.PUB) for _ in ports[:10]]
    try:
        for sock, port in zip(sockets, ports[:10]):
            sock.bind(f"tcp://127.0.0.1:{port}")
    finally:
        for sock in sockets:
            sock.close(linger=0)


def test_a_spec_startup_grace_overrides_the_config(dummy_module, tmp_path):
    """A worker that never sends its first heartbeat is given up on after the config's startup grace, unless its
    spec allows longer (an inference worker building a TensorRT engine or compiling every batch size)."""
    config = replace(FAST, startup_grace_s=1.0, max_restarts=0)
    specs = [
        ProcessSpec("quick", dummy_module, ["--mode", "hang", "--after", "0"], role="source"),
        ProcessSpec("building", dummy_module, ["--mode", "hang", "--after", "0"], role="display", startup_grace_s=60.0),
    ]
    launcher = Launcher(specs, tmp_path / "run", config=config, heartbeat_endpoint=free_tcp_endpoint())
    launcher.start()
    try:
        deadline = time.monotonic() + 30
        while not launcher.children["quick"].done:
            assert time.monotonic() < deadline, "the silent worker was not given up on"
            launcher.poll()
            time.sleep(0.05)
        until = time.monotonic() + 2.0  # well past the config's grace for the other one too
        while time.monotonic() < until:
            launcher.poll()
            time.sleep(0.05)
        assert not launcher.children["building"].done
        assert launcher.children["building"].popen is not None and launcher.children["building"].popen.poll() is None
    finally:
        launcher.shutdown("timeout")
    _assert_no_orphans()


def test_inference_spec_gives_engine_builds_a_long_startup_grace():
    from avloc.stream.run.pipeline import SLOW_STARTUP_GRACE_S, Endpoints, inference_spec

    endpoints = Endpoints.auto(1)
    config = StreamConfig()
    assert inference_spec(Path("e"), "onnxruntime", endpoints, config).startup_grace_s is None
    assert inference_spec(Path("e"), "tensorrt", endpoints, config).startup_grace_s == SLOW_STARTUP_GRACE_S
    compile_spec = inference_spec(Path("e"), "torch", endpoints, config, extra=["--engine-option", "mode=compile"])
    assert compile_spec.startup_grace_s == SLOW_STARTUP_GRACE_S
    eager = inference_spec(Path("e"), "torch", endpoints, config, extra=["--engine-option", "mode=eager"])
    assert eager.startup_grace_s is None


def test_ipc_endpoints_checked_before_start_and_restart_and_heartbeat_rejects(dummy_module, tmp_path):
    """A bad ipc folder is refused before anything starts; a (re)started worker's stats are its own; malformed
    heartbeats are counted in the summary."""
    import zmq

    from avloc.core.errors import UserError
    from avloc.stream.wire import protocol

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # others may write here: a socket in it could be someone else's
    bad = ProcessSpec("cam", dummy_module, ["--endpoint", f"ipc://{shared}/frames"], role="source")
    with pytest.raises(UserError, match="ipc://"):
        Launcher([bad], tmp_path / "refused", config=FAST, heartbeat_endpoint=free_tcp_endpoint())
    assert not (tmp_path / "refused" / "cam.log").exists()

    hb = free_tcp_endpoint()
    launcher = Launcher(
        [ProcessSpec("w", dummy_module, [], role="source")], tmp_path / "run", config=FAST, heartbeat_endpoint=hb
    )
    launcher.start()
    ctx = zmq.Context()
    garbage = protocol.make_socket(ctx, zmq.PUB, hb, bind=False, hwm=10)
    try:
        child = launcher.children["w"]
        deadline = time.monotonic() + 30
        while "elapsed" not in child.last_stats:
            assert time.monotonic() < deadline, "no heartbeat with stats"
            launcher.poll()
            time.sleep(0.05)
        child.popen.kill()
        child.popen.wait()
        launcher._start(child)
        assert child.last_stats == {}  # not the previous process's
        deadline = time.monotonic() + 10
        while not launcher.summary()["heartbeat_rejects"]:
            assert time.monotonic() < deadline, "malformed heartbeats not counted"
            garbage.send_multipart([b"\xff\xfe not json"])
            launcher.poll()
            time.sleep(0.05)
        assert sum(launcher.summary()["heartbeat_rejects"].values()) == launcher.heartbeat_rejects.total >= 1
    finally:
        garbage.close(0)
        ctx.term()
        launcher.shutdown("timeout")
    _assert_no_orphans()

"""``avloc bench soak``: a long run of the real pipeline under a fault schedule, and its fault report.

The pipeline is the one ``avloc replay --loop`` / ``avloc run`` start through the launcher (``stream/run/launcher.py``):
a looping replay worker (frames + audio of a 30 fps clip, stream ``cam0``), a camera worker reading a video file
(stream ``cam1``, paired with the replay's audio as ``avloc run`` pairs cameras with one microphone), the inference
worker and a headless display writing the latency log. The soak runs it for ``--minutes`` (10 by default) and,
spread over the run, injects:

- ``kill9`` and ``sigstop`` of each worker once (a stopped worker gets SIGCONT once the launcher saw the hang);
- ``fuzz``: ``--fuzz-messages`` (1,000) malformed messages into every socket it can reach: the inference worker's
  and the display's frame subscribers and the inference worker's audio subscriber (through an extra publisher
  both are connected to, as an attacker who took an endpoint would be), the launcher's heartbeat socket (garbage
  and untagged heartbeats / ``end``), and, on every publisher (replay frames and audio, camera, heatmaps),
  made-up and oversized subscriptions from a raw XSUB;
- ``source_gone``: the camera's file is renamed away and back (a camera that disappears and comes back);
- ``flood``: another process floods the launcher's heartbeat socket with badly tagged heartbeats (``python -m
  avloc.stream.tools.fuzz``, as fast as it can, for ``max(10 s, 3 x heartbeat_timeout_s)``) and the display is
  SIGSTOPped once the launcher has counted some of it: the hang must be seen within ``heartbeat_timeout_s + 1 s``
  with the flood still on (``deadline_held`` in the fault's details).

The pipeline runs without CURVE keys (as ``--insecure``): with the per-run keys ``avloc run/replay`` use by default
none of the fuzzers could even connect; the soak shows what the receivers survive from a process that can.

A fault is injected at its planned time once the processes it touches are ready (faults never pile onto one
process), and followed until it is detected and recovered from. The report (``OUT/soak.json`` + ``OUT/soak.md``)
holds the RSS of every process at start and end (growth of 5 % or more flagged), heatmaps delivered vs frames
captured per stream, every gap in the delivered heatmaps matched to the faults whose windows it overlaps
(unaccounted gaps listed), and each fault's detection, restart and recovery times.

Its inputs and the fault plan are in ``avloc.stream.tools.soak_plan``, the report's analysis in
``avloc.stream.tools.soak_report``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq

from avloc.core.errors import UserError
from avloc.engines.base import known_backends, read_manifest
from avloc.stream.run.report import machine_info, read_latency_log, suppressed
from avloc.stream.tools.fuzz import fuzz_messages, fuzz_subscriptions
from avloc.stream.tools.soak_plan import Fault, build_demo_engine, fault_schedule, make_clips
from avloc.stream.tools.soak_report import fault_windows, find_gaps, gap_threshold, markdown, rss_report
from avloc.stream.wire import protocol, security

log = logging.getLogger(__name__)

FUZZ_MESSAGES = 1000
FUZZ_PER_TICK = 25  # messages a fuzzer sends per supervision tick (~50 ms): paced so no queue drops them
SOURCE_GONE_S = 5.0  # how long the camera's file stays away (longer than its 2 s clip + a reopen back-off)
FAULT_TIMEOUT_S = 120.0  # a fault not detected / recovered within this is reported as such
RUN_OVER_S = 300.0  # the run goes on past --minutes until every fault is injected and followed, at most this long
TICK_S = 0.05
STREAMS = ("cam0", "cam1")
# the streams whose heatmaps stop when a process stops: cam1 (the camera) is paired with the replay's audio
STREAMS_OF = {"replay": STREAMS, "camera": ("cam1",), "inference": STREAMS, "display": STREAMS}


def computed_heatmaps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Latency-log records of heatmaps the engine computed: a fault is over when these come back. ``warming_up``
    (a restarted replay's first seconds) and ``not_visible`` maps were computed; ``no_audio`` / ``non_finite``
    were not (the bench's rule, :func:`avloc.stream.run.report.suppressed`)."""

    return [r for r in records if not suppressed(r)]


def _reject_total(stats: dict[str, Any], which: str | None) -> int:
    """Rejected-message count of a worker's heartbeat stats (``which``: the inference worker's socket)."""
    rejects = stats.get("rejects") or {}
    if which is not None:
        rejects = rejects.get(which) or {}
    return int(sum(v for v in rejects.values() if isinstance(v, int)))


# ---------------------------------------------------------------------------------------------- the soak


class Soak:
    """The pipeline of the soak, its fault schedule and the samples the report is made of."""

    def __init__(
        self,
        engine: Path,
        video: Path,
        camera_video: Path,
        out: Path,
        *,
        duration_s: float,
        backend: str = "onnxruntime",
        threads: int | None = None,
        config_path: Path | None = None,
        fuzz_count: int = FUZZ_MESSAGES,
        seed: int = 0,
    ) -> None:
        from avloc.stream.run import launcher as L  # why: keeps `avloc bench soak --help` fast
        from avloc.stream.run import pipeline as P

        self.out = out
        self.duration_s = duration_s
        self.fuzz_count = fuzz_count
        self.rng = np.random.default_rng(seed)
        self.camera_video = camera_video
        self.config = L.load_stream_config(config_path)
        self.run_dir = out / "run"
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.latency_log = self.run_dir / "latency.jsonl"
        source = P.Endpoints.auto(1)  # the replay's frames and audio, the heatmaps, the heartbeats
        self.camera_endpoint = L.free_tcp_endpoint()
        # Publishers of this process the consumers also connect to: what a local attacker who took an endpoint
        # could send them.
        self.fuzz_frames_endpoint, self.fuzz_audio_endpoint = L.free_tcp_endpoint(), L.free_tcp_endpoint()
        consumers = P.Endpoints(
            [source.frames[0], self.camera_endpoint, self.fuzz_frames_endpoint],
            [source.audio[0], self.fuzz_audio_endpoint],
            source.heatmaps,
            source.heartbeats,
        )
        camera = L.ProcessSpec(
            "camera",
            "avloc.stream.capture.camera",
            ["--source", str(camera_video), "--endpoint", self.camera_endpoint, "--stream-id", "cam1"]
            + ["--backoff-max", "1"],
            role="source",
        )
        specs = [
            *P.replay_specs(video, engine, source, self.config, loop=True),
            camera,
            P.inference_spec(engine, backend, consumers, self.config, threads=threads),
            P.display_spec(consumers, self.config, headless=True, latency_log=self.latency_log),
        ]
        self.launcher = L.Launcher(specs, self.run_dir, config=self.config, heartbeat_endpoint=source.heartbeats)
        self.publishers = {
            "replay.frames": (source.frames[0], "replay"),
            "replay.audio": (source.audio[0], "replay"),
            "camera.frames": (self.camera_endpoint, "camera"),
            "inference.heatmaps": (source.heatmaps, "inference"),
        }
        fuzz_targets = {
            "inference+display.frames": ("inference", "display"),
            "inference.audio": ("inference",),
            "launcher.heartbeats": (),
            **{f"{name} (subscriptions)": (proc,) for name, (_, proc) in self.publishers.items()},
        }
        self.faults = fault_schedule(duration_s, fuzz_targets)
        # long enough that a launcher reading until the socket is empty would miss the hang's deadline by far
        self.flood_s = max(10.0, 3 * self.config.heartbeat_timeout_s)
        self.t0 = 0.0
        self.ctx: zmq.Context | None = None
        self.fuzz_pubs: dict[str, zmq.Socket] = {}
        # per process name: {pid: {"stats": last stats, "ready_s", rss samples}}
        self.incarnations: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in self.launcher.children}
        self.incarnations["launcher"] = {os.getpid(): {"stats": {}, "ready_s": 0.0}}
        self._next_rss = 0.0
        self.rss_settle_s = min(20.0, 0.05 * duration_s)
        # once every fault is over (+ rss_settle_s): memory from then to the end is the pipeline's own, with no
        # restart, fuzz buffers or warm-up in it
        self.quiet_from_s: float | None = None

    def now(self) -> float:
        return protocol.now() - self.t0

    # --- sampling ---------------------------------------------------------------------------------------
    def _current(self, name: str) -> tuple[int | None, dict[str, Any]]:
        """The live pid of ``name`` and its stats, once that incarnation has sent a heartbeat (until then the
        launcher still holds the previous one's stats)."""
        child = self.launcher.children[name]
        if child.popen is None or child.popen.poll() is not None:
            return None, {}
        if child.last_heartbeat is None and not child.ready:
            return child.popen.pid, {}
        return child.popen.pid, child.last_stats

    def _sample(self) -> None:
        t = self.now()
        for name, child in self.launcher.children.items():
            pid, stats = self._current(name)
            if pid is None:
                continue
            entry = self.incarnations[name].setdefault(pid, {"stats": {}, "ready_s": None})
            if stats:
                entry["stats"] = dict(stats)
            if child.ready and entry["ready_s"] is None:
                entry["ready_s"] = t
        if t < self._next_rss:
            return
        self._next_rss = t + 2.0
        for name, by_pid in self.incarnations.items():
            for pid, entry in by_pid.items():
                if entry["ready_s"] is None or t - entry["ready_s"] < self.rss_settle_s or entry.get("gone"):
                    continue
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    entry["gone"] = True
                    continue
                if name != "launcher" and self._current(name)[0] != pid:
                    entry["gone"] = True  # a dead worker's pid may already belong to another process
                    continue
                entry.setdefault("rss_first", (round(t, 3), rss))
                entry["rss_last"] = (round(t, 3), rss)
                if self.quiet_from_s is not None and t >= self.quiet_from_s:
                    entry.setdefault("rss_quiet", (round(t, 3), rss))

    def _ready(self, names: tuple[str, ...]) -> bool:
        children = self.launcher.children
        return all(
            children[n].ready and children[n].popen is not None and children[n].popen.poll() is None for n in names
        )

    # --- faults -----------------------------------------------------------------------------------------
    def _inject(self, fault: Fault) -> None:
        t = self.now()
        fault.injected_s = round(t, 3)
        fault._events_from = len(self.launcher.events)
        if fault.kind in ("kill9", "sigstop", "flood"):
            child = self.launcher.children[fault.target]
            fault._pid = child.popen.pid
            fault._proc = psutil.Process(fault._pid)
            if fault.kind == "flood":
                fault._baseline = {"counted": self._heartbeat_socket_count()}
                fault.details["flood_s"] = self.flood_s
                fault._socket = subprocess.Popen(  # not a socket: the flooding process, ended when the fault is
                    [
                        sys.executable,
                        "-m",
                        "avloc.stream.tools.fuzz",
                        self.launcher.heartbeat_endpoint,
                        str(self.flood_s),
                    ],
                    stdout=subprocess.DEVNULL,
                )
                # The flood must be arriving before the worker stops: wait (supervising as usual) until the launcher
                # has counted some of it. A fixed pause was too short on a busy machine (the flooder's start-up
                # alone took ~1.5 s at load 8), and the SIGSTOP then landed before any flood.
                flood_seen_by = time.monotonic() + 15.0
                while self._heartbeat_socket_count() == fault._baseline["counted"] and time.monotonic() < flood_seen_by:
                    self.launcher.poll()
                    time.sleep(0.02)
                fault.injected_s = round(self.now(), 3)
            os.kill(fault._pid, signal.SIGKILL if fault.kind == "kill9" else signal.SIGSTOP)
            fault.details["pid"] = fault._pid
        elif fault.kind == "source_gone":
            pid, stats = self._current("camera")
            fault._pid = pid
            fault._baseline = {"open_failures": stats.get("open_failures", 0), "reopens": stats.get("reopens", 0)}
            os.replace(self.camera_video, self._gone_path())
        elif fault.target == "launcher.heartbeats":
            fault._baseline = {
                "unauthenticated": sum(self.launcher.unauthenticated.values()),
                "rejected": self.launcher.heartbeat_rejects.total,
                "ends": self._end_events(),
            }
            pids = [p for p in self.launcher.pids().values()]
            fault._queue = self._forged_control(pids, self.fuzz_count // 4)
            fault._queue += fuzz_messages(self.rng, self.fuzz_count - len(fault._queue))
            assert self.ctx is not None
            sock = self.ctx.socket(zmq.PUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, self.fuzz_count)
            sock.connect(self.launcher.heartbeat_endpoint)
            fault._socket = sock
            fault._send_after = t + 0.5  # a PUB drops what it sends before the connection is up
        elif fault.target.endswith("(subscriptions)"):
            endpoint, proc = self.publishers[fault.target.split(" ")[0]]
            fault._pid = self._current(proc)[0]
            assert self.ctx is not None
            sock = self.ctx.socket(zmq.XSUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, self.fuzz_count)
            sock.connect(endpoint)
            fault._socket = sock
            fault._queue = list(fuzz_subscriptions(self.rng, self.fuzz_count))
            fault._send_after = t + 0.3
        else:  # frames / audio subscribers, through this process's own publishers
            which = "frames" if fault.target.endswith(".frames") else "audio"
            fault._socket = self.fuzz_pubs[which]
            fault._queue = fuzz_messages(self.rng, self.fuzz_count)
            fault._baseline = {p: (self._current(p)[0], self._rejects(p, which)) for p in fault.processes}
        log.info("soak %.1f s: %s %s", t, fault.kind, fault.target)

    def _gone_path(self) -> Path:
        return self.camera_video.with_name(self.camera_video.name + ".gone")

    def _end_events(self) -> int:
        return sum(1 for e in self.launcher.events if e["event"] == "end")

    def _forged_control(self, pids: list[int], n: int) -> list[list[Any]]:
        """Well-formed heartbeats and 'end' messages for the workers' pids, untagged or tagged under a token of our
        own: the launcher must count and ignore them."""
        other = security.new_run_token()
        out = []
        for i in range(n):
            pid = pids[i % len(pids)] if pids else os.getpid()
            kind, meta = (
                ("control", {"command": protocol.CONTROL_END, "pid": pid})
                if i % 2
                else (
                    "heartbeat",
                    {"role": "replay", "pid": pid, "stats": {"state": "ok"}},
                )
            )
            ts = {"send": protocol.now()}
            if i % 4 >= 2:
                meta = security.signed_meta(other, kind, "cam0", i, ts, meta)
            out.append(protocol.encode(kind, stream="cam0", seq=i, ts=ts, meta=meta))
        return out

    def _rejects(self, process: str, which: str) -> int:
        stats = self._current(process)[1]
        return _reject_total(stats, which if process == "inference" else None)

    def _send_some(self, fault: Fault) -> None:
        if not fault._queue or self.now() < fault._send_after:
            return
        sent = fault.details.setdefault("sent", 0)
        for _ in range(min(FUZZ_PER_TICK, len(fault._queue))):
            parts = fault._queue.pop(0)
            try:
                if isinstance(parts, bytes):
                    fault._socket.send(parts, zmq.NOBLOCK)
                else:
                    fault._socket.send_multipart(parts, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                fault.details["not_sent"] = fault.details.get("not_sent", 0) + 1
        fault.details["sent"] = sent
        if not fault._queue:
            fault.details["sent_until_s"] = round(self.now(), 3)

    def _new_events(self, fault: Fault) -> list[dict[str, Any]]:
        return [e for e in self.launcher.events[fault._events_from :] if e["process"] == fault.target]

    def _follow(self, fault: Fault) -> None:
        """Advance one injected fault: detection, restart, recovery."""
        t = self.now()
        if fault.kind in ("kill9", "sigstop", "flood"):
            events = self._new_events(fault)
            crash = next((e for e in events if e["event"] == "crash"), None)
            if crash and fault.detected_s is None:
                fault.detected_s = round(t, 3)
                fault.details["why"] = crash.get("why")
                if fault.kind == "flood":
                    self._judge_flood(fault)
                if fault.kind in ("sigstop", "flood"):
                    # the launcher kills a hung worker (SIGKILL works on a stopped process): a SIGCONT can only
                    # reach it if it is somehow still there
                    if fault._proc.is_running():
                        fault._proc.resume()
                        fault.details["sigcont"] = "sent"
                    else:
                        fault.details["sigcont"] = "not needed: the launcher had killed the stopped process"
            if fault.restarted_s is None and any(e["event"] == "restart" for e in events):
                fault.restarted_s = round(t, 3)
            pid, _ = self._current(fault.target)
            if (
                fault.restarted_s is not None
                and pid not in (None, fault._pid)
                and self.launcher.children[fault.target].ready
            ):
                fault.ready_s = round(t, 3)
                fault.details["new_pid"] = pid
                fault.done = True
                fault.ok = fault.details.get("deadline_held", True)
        elif fault.kind == "source_gone":
            pid, stats = self._current("camera")
            if pid != fault._pid:
                fault.details["camera_restarted"] = True
            if fault.detected_s is None and stats.get("open_failures", 0) > fault._baseline["open_failures"]:
                fault.detected_s = round(t, 3)
            if "restored_s" not in fault.details and t - fault.injected_s >= SOURCE_GONE_S:
                os.replace(self._gone_path(), self.camera_video)
                fault.details["restored_s"] = round(t, 3)
            if (
                "restored_s" in fault.details
                and fault.detected_s is not None
                and stats.get("reopens", 0) > fault._baseline["reopens"]
            ):
                fault.ready_s = round(t, 3)
                fault.details["open_failures"] = stats["open_failures"] - fault._baseline["open_failures"]
                fault.done = fault.ok = True
        else:
            self._send_some(fault)
            if fault._queue or t - fault.details.get("sent_until_s", t) < 1.5:
                return  # heartbeats carry the counters twice a second: give the last messages time to be counted
            self._judge_fuzz(fault, t)
        if not fault.done and t - fault.injected_s > FAULT_TIMEOUT_S:
            fault.done = True
            fault.details["timeout"] = f"not recovered within {FAULT_TIMEOUT_S:.0f} s"
        if fault.done and fault.kind == "source_gone" and "restored_s" not in fault.details:
            os.replace(self._gone_path(), self.camera_video)

    def _heartbeat_socket_count(self) -> int:
        return sum(self.launcher.unauthenticated.values()) + self.launcher.heartbeat_rejects.total

    def _judge_flood(self, fault: Fault) -> None:
        """Was the hang seen within the normal deadline while the flood was still on?"""
        flooder = fault._socket
        after = fault.detected_s - fault.injected_s
        # heartbeat_timeout_s from the last beat (at most one heartbeat interval before the stop), plus the soak's
        # own step; what the launcher's bounded reads must keep under any flood
        deadline = self.config.heartbeat_timeout_s + 1.0
        fault.details.update(
            flood_on_at_detection=flooder.poll() is None,
            flood_counted=self._heartbeat_socket_count() - fault._baseline["counted"],
            detection_deadline_s=deadline,
            deadline_held=flooder.poll() is None and after <= deadline,
        )
        flooder.kill()
        flooder.wait()
        fault._socket = None

    def _judge_fuzz(self, fault: Fault, t: float) -> None:
        if fault.target == "launcher.heartbeats":
            got = {
                "unauthenticated": sum(self.launcher.unauthenticated.values()) - fault._baseline["unauthenticated"],
                "rejected": self.launcher.heartbeat_rejects.total - fault._baseline["rejected"],
                "ends_accepted": self._end_events() - fault._baseline["ends"],
            }
            fault.details.update(got)
            detected = got["unauthenticated"] > 0 and got["rejected"] > 0 and got["ends_accepted"] == 0
        elif fault.target.endswith("(subscriptions)"):
            proc = fault.processes[0]
            child = self.launcher.children[proc]
            alive = self._current(proc)[0] == fault._pid and child.last_heartbeat is not None
            fresh = alive and time.monotonic() - child.last_heartbeat < self.config.heartbeat_timeout_s
            fault.details["publisher"] = "still running and beating" if fresh else "restarted or silent"
            detected = fresh
            fault._socket.close(0)
        else:
            which = "frames" if fault.target.endswith(".frames") else "audio"
            detected = True
            for proc in fault.processes:
                pid0, count0 = fault._baseline[proc]
                pid, _ = self._current(proc)
                delta = self._rejects(proc, which) - count0 if pid == pid0 else None
                fault.details[f"{proc}_rejected"] = delta
                detected = detected and pid == pid0 and bool(delta)
        if detected:
            fault.detected_s = fault.ready_s = round(t, 3)
        fault.done = True
        fault.ok = detected

    def _step_faults(self) -> None:
        busy = {p for f in self.faults if f.injected_s is not None and not f.done for p in f.processes}
        for fault in self.faults:
            if fault.injected_s is None:
                # a fault waits for its time, and for its processes to be ready and free of other faults (a late
                # one does not hold back the faults planned after it on other processes)
                if self.now() < fault.planned_s or busy & set(fault.processes) or not self._ready(fault.processes):
                    continue
                self._inject(fault)
                busy |= set(fault.processes)
            elif not fault.done:
                self._follow(fault)

    # --- run --------------------------------------------------------------------------------------------
    def _tick(self) -> None:
        self.launcher.poll()
        self._sample()
        if self.launcher.user_errors:
            raise UserError("soak: " + "; ".join(f"{n}: {m}" for n, m in self.launcher.user_errors.items()))
        given_up = [n for n, c in self.launcher.children.items() if c.done]
        if given_up:
            raise UserError(f"soak: the launcher gave up on {given_up} (see {self.run_dir})")
        time.sleep(TICK_S)

    def run(self) -> dict[str, Any]:
        self.ctx = zmq.Context()
        for which, endpoint in (("frames", self.fuzz_frames_endpoint), ("audio", self.fuzz_audio_endpoint)):
            self.fuzz_pubs[which] = protocol.make_socket(self.ctx, zmq.PUB, endpoint, bind=True, hwm=self.fuzz_count)
        reason = "error"
        started = time.monotonic()
        try:
            self.launcher.start()
            self.t0 = protocol.now()
            # each worker has the launcher's startup_grace_s to get ready (then it is restarted, and given up
            # after max_restarts: _tick raises); once all are, every stream must deliver within a minute
            deadline = math.inf
            while not (self._ready(tuple(self.launcher.children)) and self._heatmaps_seen()):
                if deadline == math.inf and self._ready(tuple(self.launcher.children)):
                    deadline = time.monotonic() + 60.0
                if time.monotonic() > deadline:
                    raise UserError(f"soak: workers ready but {STREAMS} not all delivering heatmaps within 60 s")
                self._tick()
            startup_s = time.monotonic() - started
            self.t0 = protocol.now()  # the soak's clock starts with the first heatmap
            self._next_rss = 0.0
            for by_pid in self.incarnations.values():
                for entry in by_pid.values():  # counters and memory from here on
                    entry["ready_s"] = 0.0
                    entry["stats0"] = dict(entry["stats"])
                    entry.pop("rss_first", None)
                    entry.pop("rss_last", None)
            hard_end = self.duration_s + RUN_OVER_S
            while self.now() < self.duration_s or not all(f.done for f in self.faults):
                if self.now() > hard_end:
                    break
                if self.quiet_from_s is None and all(f.done for f in self.faults):
                    self.quiet_from_s = self.now() + self.rss_settle_s
                self._step_faults()
                self._tick()
            self._step_faults()
            self._sample()
            self.end_s = self.now()
            reason = "soak"
        finally:
            for fault in self.faults:
                if fault.kind == "source_gone" and self._gone_path().exists():
                    os.replace(self._gone_path(), self.camera_video)
                if isinstance(fault._socket, subprocess.Popen):
                    fault._socket.kill()
                    fault._socket.wait()
                elif fault._socket is not None and fault._socket not in self.fuzz_pubs.values():
                    fault._socket.close(0)
            summary = self.launcher.shutdown(reason)
            for sock in self.fuzz_pubs.values():
                sock.close(0)
            self.ctx.term()
        return self.report(summary, startup_s)

    def _heatmaps_seen(self) -> bool:
        """Every stream has delivered a heatmap (the soak's clock starts there, so no gap is a start-up)."""
        if not self.latency_log.is_file():
            return False
        seen = set()
        with open(self.latency_log, encoding="utf-8") as f:
            for line in f:
                seen.add(line.partition('"stream":"')[2].partition('"')[0])
        return seen.issuperset(STREAMS)

    # --- report -----------------------------------------------------------------------------------------
    def report(self, summary: dict[str, Any], startup_s: float) -> dict[str, Any]:
        records = [r for r in read_latency_log(self.latency_log) if "display" in r.get("ts", {})]
        for r in records:
            r["t"] = r["ts"]["display"] - self.t0
        records = [r for r in records if 0.0 <= r["t"] <= self.end_s]
        computed = computed_heatmaps(records)
        for fault in self.faults:
            if fault.ready_s is None or fault.kind == "fuzz":
                continue
            # heatmaps are back when every stream the faulted process feeds has one again
            firsts = [
                min((r["t"] for r in computed if r.get("stream") == s and r["t"] >= fault.ready_s), default=None)
                for s in STREAMS_OF[fault.target]
            ]
            fault.resumed_s = None if None in firsts else round(max(firsts), 3)  # type: ignore[type-var]
        gaps = find_gaps(computed, self.end_s)
        windows = fault_windows(self.faults, self.end_s)
        for gap in gaps:
            gap["faults"] = [
                w["fault"] for w in windows if gap["start_s"] <= w["end_s"] and gap["end_s"] >= w["start_s"]
            ]
        unaccounted = [g for g in gaps if not g["faults"]]
        processes = rss_report(self.incarnations, min_quiet_s=min(60.0, 0.1 * self.duration_s))
        streams = {}
        for name, stream, counter in (("replay", "cam0", "frames"), ("camera", "cam1", "grabbed")):
            captured = sum(
                int(e["stats"].get(counter, 0)) - int(e.get("stats0", {}).get(counter, 0))
                for e in self.incarnations[name].values()
            )
            delivered = sum(1 for r in records if r.get("stream") == stream)
            done = sum(1 for r in computed if r.get("stream") == stream)
            streams[stream] = {
                "source": name,
                "frames_captured": captured,
                "heatmaps_delivered": delivered,
                "heatmaps_computed": done,
                "delivered_per_captured": round(delivered / captured, 4) if captured else None,
                "heatmap_fps": round(done / self.end_s, 2) if self.end_s > 0 else None,
            }
        faults = [f.report() for f in self.faults]
        injected = sum(1 for f in self.faults if f.injected_s is not None)
        ok_faults = sum(1 for f in self.faults if f.ok)
        flagged = [n for n, p in processes.items() if p.get("flag")]
        return {
            "duration_s": round(self.end_s, 3),
            "planned_s": self.duration_s,
            "startup_s": round(startup_s, 3),
            "gap_threshold_s": gaps[0]["threshold_s"] if gaps else gap_threshold(computed),
            "processes": processes,
            "streams": streams,
            "faults": faults,
            "gaps": gaps,
            "unaccounted_gaps": unaccounted,
            "restarts": {n: p["restarts"] for n, p in summary["processes"].items()},
            "unauthenticated": summary.get("unauthenticated", {}),
            "launcher_stop": summary["reason"],
            "run_dir": str(self.run_dir),
            "summary": {
                "faults_planned": len(self.faults),
                "faults_injected": injected,
                "faults_detected_and_recovered": ok_faults,
                "gaps": len(gaps),
                "unaccounted_gaps": len(unaccounted),
                "rss_flagged": flagged,
                "ok": injected == ok_faults == len(self.faults) and not unaccounted and not flagged,
            },
        }


def training_running() -> bool:
    """Whether an ``avloc train`` runs on this machine (the figures then share its CPU)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if "avloc train" in cmd or "avloc.cli train" in cmd:
            return True
    return False


def run_soak(
    out: Path,
    *,
    minutes: float = 10.0,
    engine: Path | None = None,
    video: Path | None = None,
    backend: str = "onnxruntime",
    threads: int | None = None,
    config_path: Path | None = None,
    fuzz_count: int = FUZZ_MESSAGES,
    seed: int = 0,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the soak; writes ``out/soak.json`` and ``out/soak.md`` and returns the report."""
    from avloc.core.media import probe_video  # why: keeps `avloc bench soak --help` fast

    if not minutes > 0:
        raise UserError(f"--minutes {minutes}: expected a positive number")
    if fuzz_count < 1:
        raise UserError(f"--fuzz-messages {fuzz_count}: expected >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    replay_clip, camera_src = make_clips(out, seed, replay=video is None)
    video = Path(video) if video is not None else replay_clip
    assert video is not None
    probe_video(video)  # a DataError naming the file
    engine = Path(engine) if engine is not None else build_demo_engine(out)
    read_manifest(engine)
    camera_video = out / "camera_source.mp4"  # a copy: the soak renames it away and back
    shutil.copyfile(camera_src, camera_video)
    training = training_running()
    load_before = os.getloadavg()
    soak = Soak(
        engine,
        video,
        camera_video,
        out,
        duration_s=minutes * 60.0,
        backend=backend,
        threads=threads,
        config_path=config_path,
        fuzz_count=fuzz_count,
        seed=seed,
    )
    report = soak.run()
    report.update(
        {
            "command": command or f"avloc bench soak --out {out} --minutes {minutes:g}",
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "engine": str(engine),
            "video": str(video),
            "camera_source": str(camera_video),
            "backend": backend,
            "machine": machine_info(),
            "training_running": training or training_running(),
            "nice": os.nice(0),
            "loadavg_start_end": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        }
    )
    report["machine_note"] = (
        f"{os.cpu_count()} cores, nice {report['nice']}, "
        + ("an `avloc train` running alongside" if report["training_running"] else "no training running")
        + f", load average {report['loadavg_start_end'][0]} → {report['loadavg_start_end'][1]}"
    )
    tmp = out / ".soak.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "soak.json")
    (out / "soak.md").write_text(markdown(report))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder for soak.json, soak.md, logs, inputs")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (faults over its first 70 %%)")
    parser.add_argument("--engine", type=Path, default=None, help="engine directory (default: a demo-size one)")
    parser.add_argument("--video", type=Path, default=None, help="clip to replay in a loop (default: a 30 fps synth)")
    parser.add_argument("--backend", default="onnxruntime", choices=known_backends())
    parser.add_argument("--threads", type=int, default=None, help="inference intra-op threads")
    parser.add_argument("--config", type=Path, default=None, help="stream config (default configs/stream.yaml)")
    parser.add_argument("--fuzz-messages", type=int, default=FUZZ_MESSAGES, help="malformed messages per socket")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    report = run_soak(
        args.out,
        minutes=args.minutes,
        engine=args.engine,
        video=args.video,
        backend=args.backend,
        threads=args.threads,
        config_path=args.config,
        fuzz_count=args.fuzz_messages,
        seed=args.seed,
        command="avloc " + " ".join(sys.argv[1:]),
    )
    s = report["summary"]
    print(
        f"soak {report['duration_s']:.0f} s: {s['faults_detected_and_recovered']}/{s['faults_planned']} faults "
        f"detected and recovered, {s['gaps']} gaps ({s['unaccounted_gaps']} unaccounted), "
        f"RSS flagged: {s['rss_flagged'] or 'none'}"
    )
    for stream, v in report["streams"].items():
        print(f"  {stream}: {v['heatmaps_delivered']} heatmaps for {v['frames_captured']} frames captured")
    print(f"wrote {args.out / 'soak.json'} and {args.out / 'soak.md'}")
    return 0 if s["ok"] else 1

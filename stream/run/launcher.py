"""Launcher: starts the pipeline's processes, watches their heartbeats, restarts crashed ones, stops them all.

Every worker is its own OS process, ``python -m avloc.stream.<room>.<worker> ...`` (sockets are created inside the
worker, never inherited). The launcher binds the heartbeat SUB socket every worker connects to and
supervises:

- a worker that exits with an error or stops sending heartbeats (after a start-up grace period for imports
  and engine loading) is killed (SIGKILL) and restarted with back-off; for the inference worker, the gap
  between its last heatmap before the crash and the first after the restart is logged and put in the
  summary;
- with ``inference_workers`` > 1, the workers share the streams (``avloc.stream.serve.sharding``): the launcher
  publishes which worker serves which stream, moves the streams of a worker that dies to the live ones at
  once (its first poll after the exit, not its restart) and gives them back when it is ready again, and
  runs the proxy through which every worker's heatmaps reach subscribers on one endpoint;
- a finite source (a replayed file) that ends — its ``end`` control message or its clean exit — stops the
  pipeline: sources first, then the inference worker, then the display (which finishes its recording);
- Ctrl-C / SIGTERM stop everything the same way. Children run in their own session (the launcher
  orchestrates the order) and get ``PR_SET_PDEATHSIG`` = SIGTERM (set by each child itself, first thing:
  ``avloc.stream.run.child_entry``), so they also stop if the launcher itself
  is SIGKILLed: no orphans.

The processes of a run and their wiring are built by ``avloc.stream.run.pipeline``.

One log file per process (``RUN_DIR/<name>.log``, plus ``<name>.out`` for anything written to stdout/stderr)
and ``RUN_DIR/summary.json`` at the end.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from avloc.core.config import from_dict, load_yaml, packaged_config, resolve_config
from avloc.core.errors import UserError
from avloc.stream.capture.devices import report_problem
from avloc.stream.run.child_entry import GO_LINE, HOLD_FLAG
from avloc.stream.runtime.worker import STATE_STALLED, USER_ERROR_EXIT
from avloc.stream.serve.batching import MAX_STREAMS
from avloc.stream.serve.sharding import AssignmentPublisher, HeatmapProxy, ShardPlan
from avloc.stream.wire import protocol, security

log = logging.getLogger(__name__)

CONFIG_PATH = packaged_config("stream")
CHILD_ENTRY = "avloc.stream.run.child_entry"  # python -m CHILD_ENTRY LAUNCHER_PID [--held] MODULE ARGS...
# Stop order: sources first so nothing new arrives, the display last so it records every heatmap.
STOP_ORDER = ("source", "inference", "display")
# Messages taken off the heartbeat socket per supervision step (every 50 ms): far more than the workers send
# (2 per second each), few enough that a flood of them cannot delay the step's deadline checks.
HEARTBEAT_BATCH = 200
# How long a restarted worker waits for its port to be free (protocol.bind_retrying) before it gives up with exit 2;
# within its startup grace, so the wait is not taken for a hang.
BIND_RETRY_S = 20.0


@dataclass(frozen=True)
class StreamConfig:
    """Defaults of the streaming pipeline (configs/stream.yaml)."""

    frames_endpoint: str = protocol.DEFAULT_ENDPOINTS["frames"]
    audio_endpoint: str = protocol.DEFAULT_ENDPOINTS["audio"]
    heatmaps_endpoint: str = protocol.DEFAULT_ENDPOINTS["heatmaps"]
    heartbeats_endpoint: str = protocol.DEFAULT_ENDPOINTS["heartbeats"]
    heartbeat_timeout_s: float = 5.0
    startup_grace_s: float = 60.0
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 10.0
    max_restarts: int = 5  # ... within restart_window_s: a worker restarted more often than that is given up
    restart_window_s: float = 600.0
    drain_s: float = 1.5  # after a source ends: time for the last frames to reach the display
    stop_timeout_s: float = 10.0
    display_stop_timeout_s: float = 60.0  # finishing a recording (encoder flush + audio mux)
    audio_hop_s: float = 0.1
    inference_threads: int = 0  # 0: the engine backend's default (per worker: cores / inference_workers)
    inference_workers: int = 1  # > 1: the streams are shared among this many workers (avloc.stream.serve.sharding)
    max_batch: int = 8  # frames per engine batch (never more than the engine's own max batch)
    max_frame_age_s: float = 0.0  # older frames are dropped when their turn comes; 0: 50 ms + two batch times
    heatmap_dtype: str = "float16"
    max_audio_age_s: float = 1.5
    audio_reuse_s: float = 0.3  # > 0: while behind, skip audio windows (reuse one this much older; batching)
    gate: bool = True  # apply the engine's silence gate (heatmaps below it marked not_visible), if it has one
    ogl: bool = False  # object-guided localization (an engine exported with --ogl); --ogl
    ogl_alpha: float | None = None  # weight of the audio-visual map in the OGL blend; None: the manifest's (0.4)
    alpha: float = 0.45
    colormap: str = "jet"


def load_stream_config(path: Path | None = None) -> StreamConfig:
    """``configs/stream.yaml`` (defaults when the package has none), or the ``--config`` file given."""
    path = CONFIG_PATH if path is None else resolve_config(path)  # a path, or a packaged name (stream_acl)
    if not path.is_file():
        return StreamConfig()
    config = from_dict(StreamConfig, load_yaml(path), str(path))
    for name in ("frames_endpoint", "audio_endpoint", "heatmaps_endpoint", "heartbeats_endpoint"):
        security.check_endpoint(getattr(config, name), f"{path}: {name}")
    for name in ("inference_workers", "max_batch"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{path}: {name}: {value!r}, expected a positive integer")
    if config.max_frame_age_s < 0:
        raise UserError(f"{path}: max_frame_age_s: {config.max_frame_age_s!r}, expected >= 0 (0: automatic)")
    if config.ogl_alpha is not None and not 0.0 <= config.ogl_alpha <= 1.0:
        raise UserError(f"{path}: ogl_alpha: {config.ogl_alpha!r}, expected a value in [0, 1] (or null)")
    return config


_ports_handed_out: set[int] = set()
_port_random = random.Random(os.urandom(16))  # not the global RNG: seeded runs must not pick the same ports


def ephemeral_port_range() -> tuple[int, int]:
    """The range the OS draws the local port of outgoing connections from."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535  # the IANA dynamic range (macOS, Windows)


def free_tcp_endpoint() -> str:
    """A loopback TCP endpoint on a free port outside the OS's ephemeral range (for tests and parallel runs).

    The port is checked here but bound later by a worker. A port from the ephemeral range (what binding to
    port 0 returns) can meanwhile become the local end of any outgoing connection, ZeroMQ's own included,
    and the worker's bind then fails with "Address already in use". Ports outside that range are only ever
    taken by an explicit bind.
    """
    low, high = ephemeral_port_range()
    candidates = [p for p in range(10000, 65536) if not low <= p <= high and p not in _ports_handed_out]
    for port in _port_random.sample(candidates, min(200, len(candidates))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_handed_out.add(port)
        return f"tcp://127.0.0.1:{port}"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # no free port outside: any free one
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


@dataclass
class ProcessSpec:
    """How to start one worker: ``python -m MODULE ARGS``; ``role`` decides stop order and end handling."""

    name: str
    module: str
    args: list[str]
    role: str = "source"  # "source" | "inference" | "display"
    finite: bool = False  # a clean exit means "the input ended" (replay), not a crash
    restart: bool = True
    after: tuple[str, ...] = ()  # start once these processes report ready (e.g. the engine is loaded)
    env: dict[str, str] = field(default_factory=dict)  # extra environment (e.g. HOME for an ALSA config)
    startup_grace_s: float | None = None  # overrides the config's (an engine build / compile takes minutes)


@dataclass
class Child:
    spec: ProcessSpec
    popen: subprocess.Popen | None = None
    started: float = 0.0
    last_heartbeat: float | None = None
    last_stats: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0  # over the whole run (the summary); the budget counts only recent_restarts
    recent_restarts: deque[float] = field(default_factory=deque)  # monotonic times within restart_window_s
    exit_code: int | None = None
    done: bool = False  # finished for good (ended or gave up); not restarted
    restart_at: float | None = None
    ready: bool = False  # sent a heartbeat that is not "loading"
    held: bool = False  # started with --held: imports done or under way, waiting for its ``after`` to be ready


def _close_stdin(child: Child) -> None:
    """The pipe to a held child's stdin (never let go, or gone): closed with the process."""
    if child.popen is not None and child.popen.stdin is not None and not child.popen.stdin.closed:
        try:
            child.popen.stdin.close()
        except OSError:  # the child is gone: nothing was waiting in the pipe
            pass


class Launcher:
    """Start, supervise and stop a set of worker processes."""

    def __init__(
        self,
        specs: list[ProcessSpec],
        run_dir: Path,
        *,
        config: StreamConfig | None = None,
        heartbeat_endpoint: str | None = None,
        verbose: bool = False,
        keys: Path | None = None,
        insecure: bool = False,
        shards: ShardPlan | None = None,
        run_keys: bool = False,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"process names must be unique: {names}")
        self.config = config or StreamConfig()
        self.children = {s.name: Child(s) for s in specs}
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_endpoint = heartbeat_endpoint or self.config.heartbeats_endpoint
        self.verbose = verbose
        self.events: list[dict[str, Any]] = []
        self.gaps: list[dict[str, Any]] = []
        self._pending_gap: dict[str, tuple[float, str]] = {}  # process -> (gap start, "last_heatmap" | "crash")
        self._ended_sources: set[str] = set()
        self.started_at = time.time()
        self.stop_reason = ""
        self.user_errors: dict[str, str] = {}  # process -> its error line (it exited 2)
        self.stop_event = threading.Event()
        self.quit_requested = False
        # Handed to the children in their environment; heartbeats and control messages not tagged with it
        # (security.verify) are counted here by kind and ignored: a local process cannot fake an 'end' or
        # keep a hung worker looking alive.
        self.token = security.new_run_token()
        # CURVE keys (a folder name, not a secret: the secret keys stay in their 0600 files) and --insecure
        # reach the children, and this process's own heartbeat socket, through the environment
        self._security_env = {security.INSECURE_ENV: "1"} if insecure else {}
        if insecure:  # said where the user sees it: the opt-out must never look like the default
            log.warning(
                "--insecure: no CURVE keys; any local process can read this run's video and audio, inject "
                "frames, audio and heatmaps, and stand in for a crashed worker (docs/protocol.md#security)"
            )
        if run_keys and keys is None and not insecure:
            # secure by default (avloc run/replay/demo): fresh CURVE keys for this run only, in a 0700 folder; a
            # process without them can neither read nor inject, nor stand in for a worker's port
            keys = security.make_run_keys(self.run_dir)
            log.info("this run's CURVE keys: %s (a subscriber needs them, see docs/protocol.md)", keys)
        self.keys_dir = Path(keys) if keys is not None else None  # what a subscriber needs (None: plain sockets)
        loaded = security.load_keys(keys) if keys is not None else None  # a UserError now, not in every child
        if keys is not None:
            self._security_env[security.KEYS_ENV] = str(Path(keys).resolve())
        # refuse a non-loopback endpoint without keys before anything starts (the workers check again)
        for spec in specs:
            for flag, value in zip(spec.args, spec.args[1:]):
                if flag in ("--frames", "--audio", "--heatmaps", "--endpoint") and value.startswith(
                    ("tcp://", "ipc://")
                ):
                    security.check_bind(value, loaded, insecure)
        security.check_bind(self.heartbeat_endpoint, loaded, insecure)
        self.unauthenticated: Counter[str] = Counter()  # by kind: untagged, wrongly tagged, replayed or stale
        self.tag_rejects: Counter[str] = Counter()  # the same, by reason (security.Verifier)
        self.verifier = security.Verifier(self.token)
        self.heartbeat_rejects = protocol.RejectCounter("heartbeats", logger=log)  # malformed, by reason
        self._ctx: zmq.Context | None = None
        self._sub: zmq.Socket | None = None
        self.shards = shards
        if shards is not None:
            for endpoint in (shards.heatmaps_in, shards.heatmaps_out, shards.assignments_endpoint):
                security.check_bind(endpoint, loaded, insecure)
        self._proxy: HeatmapProxy | None = None
        self._assigner: AssignmentPublisher | None = None

    # --- processes ----------------------------------------------------------------------------------
    def _waiting_for(self, child: Child) -> list[str]:
        """The processes in ``child``'s ``after`` that are neither ready nor done."""
        deps = [self.children[n] for n in child.spec.after if n in self.children]
        return [d.spec.name for d in deps if not (d.ready or d.done)]

    def _start(self, child: Child) -> None:
        """Start ``child``'s process; one whose ``after`` is not ready yet is started held (its imports run
        beside the engine's loading) and let go by ``_start_waiting``."""
        spec = child.spec
        held = bool(self._waiting_for(child))
        cmd = [
            sys.executable,
            "-m",
            CHILD_ENTRY,  # sets PR_SET_PDEATHSIG in the child itself: no Python between fork and exec here
            str(os.getpid()),
            *([HOLD_FLAG] if held else []),
            spec.module,
            *spec.args,
            "--heartbeat",
            self.heartbeat_endpoint,
            "--log-file",
            str(self.run_dir / f"{spec.name}.log"),
        ]
        if self.verbose:
            cmd.append("--verbose")
        out = open(self.run_dir / f"{spec.name}.out", "ab")  # noqa: SIM115 - handed to the child
        # the token goes in the environment: a command line is readable by every local user
        env = {**os.environ, **spec.env, **self._security_env, security.RUN_TOKEN_ENV: self.token}
        if child.restarts:  # its port may still be held (by what crashed, or by a squatter): wait, not crash-loop
            grace = spec.startup_grace_s or self.config.startup_grace_s
            env[protocol.BIND_RETRY_ENV] = f"{min(BIND_RETRY_S, grace / 2):.1f}"
        try:
            child.popen = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.PIPE if held else subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            out.close()
        child.started = time.monotonic()
        child.held = held
        child.ready = False
        child.last_heartbeat = None
        child.last_stats = {}  # a restarted worker's stats are its own, not the previous process's
        child.exit_code = None
        child.restart_at = None
        command = " ".join(cmd[cmd.index(spec.module) :])
        if held:
            log.info("started %s (pid %d) held until %s ready: %s", spec.name, child.popen.pid, spec.after, command)
            return
        log.info("started %s (pid %d): %s", spec.name, child.popen.pid, command)
        self._event("start", spec.name, pid=child.popen.pid)

    def _release(self, child: Child) -> None:
        """Let a held child run: the ``go`` line on its stdin. Its start-up grace counts from now."""
        assert child.popen is not None and child.popen.stdin is not None
        try:
            child.popen.stdin.write(GO_LINE)
            child.popen.stdin.close()
        except OSError:  # it died while held: poll() sees the exit and restarts it
            pass
        child.held = False
        child.started = time.monotonic()
        log.info("%s let go (pid %d)", child.spec.name, child.popen.pid)
        self._event("start", child.spec.name, pid=child.popen.pid)

    def _event(self, kind: str, name: str, **info: Any) -> None:
        self.events.append({"t": round(time.time() - self.started_at, 3), "event": kind, "process": name, **info})

    def pids(self) -> dict[str, int]:
        return {n: c.popen.pid for n, c in self.children.items() if c.popen is not None and c.popen.poll() is None}

    def start(self) -> None:
        self._ctx = zmq.Context()
        with security.environment(self._security_env):  # this process's own socket follows the same rules
            try:
                self._sub = protocol.make_socket(
                    self._ctx,
                    zmq.SUB,
                    self.heartbeat_endpoint,
                    bind=True,
                    hwm=1000,
                    max_message_bytes=protocol.MAX_CONTROL_BYTES,
                )
            except protocol.EndpointError as err:
                raise protocol.EndpointError(f"{err}; `--auto-ports` picks free ones") from None
            if self.shards is not None:
                self._proxy = HeatmapProxy(self._ctx, self.shards.heatmaps_in, self.shards.heatmaps_out)
                self._proxy.start()
                self._assigner = AssignmentPublisher(self._ctx, self.shards.assignments_endpoint, self.token)
        # Consumers first so the first frames find their subscribers connected; processes with ``after``
        # (the sources) are held until those are ready, so a replay never plays into an engine still loading.
        for role in ("display", "inference", "source"):
            for child in self.children.values():
                if child.spec.role == role:
                    self._start(child)

    def _start_waiting(self) -> None:
        for child in self.children.values():
            # one that died while held is left to poll()'s exit check: a "start" for it would be a lie
            if not child.held or child.done or child.popen is None or child.popen.poll() is not None:
                continue
            waiting = self._waiting_for(child)
            if not waiting:
                self._release(child)
            # its own wait, not the launcher's: a source restarted while the engine reloads (a kill -9 of both)
            # waits for it too, instead of being let go at once as "not ready after startup_grace_s"
            elif time.monotonic() - child.started > self.config.startup_grace_s:
                log.warning(
                    "%s: %s not ready after %.0f s; starting anyway",
                    child.spec.name,
                    waiting,
                    self.config.startup_grace_s,
                )
                self._release(child)

    # --- supervision --------------------------------------------------------------------------------
    def _read_heartbeats(self, max_messages: int = HEARTBEAT_BATCH) -> None:
        """Take at most ``max_messages`` messages off the heartbeat socket (any that are left wait for the next
        poll): a flood of messages, valid or not, cannot keep supervision from its deadlines."""
        if self._sub is None:  # start() failed before binding it: nothing to read
            return
        by_pid = {c.popen.pid: c for c in self.children.values() if c.popen is not None}
        messages = protocol.drain_latest(
            self._sub,
            rejects=self.heartbeat_rejects,
            max_messages=max_messages,
            max_message_bytes=protocol.MAX_CONTROL_BYTES,
        )
        for msg in messages:
            refused = self.verifier.check(msg)
            if refused is not None:
                self._unauthenticated(msg.kind, refused)
                continue
            pid = msg.meta.get("pid")
            child = by_pid.get(pid) if isinstance(pid, int) else None
            if child is None:
                continue
            if msg.kind == "heartbeat":
                stats = msg.meta.get("stats")
                before = child.last_stats.get("problem")
                child.last_stats = stats if isinstance(stats, dict) else {}
                report_problem(log, child.spec.name, before, child.last_stats)  # a device that does not deliver
                # a worker whose work is stuck (a camera grab that never returns) still beats, as "stalled":
                # that is not a sign of life, so it is killed after heartbeat_timeout_s like a silent one
                if child.last_stats.get("state") != STATE_STALLED:
                    child.last_heartbeat = time.monotonic()
                if child.last_stats.get("state") != "loading" and not child.ready:
                    child.ready = True
                    log.info("%s ready (pid %d)", child.spec.name, child.popen.pid)  # type: ignore[union-attr]
                self._check_gap(child)
            elif msg.kind == "control" and msg.meta.get("command") == protocol.CONTROL_END:
                child.last_heartbeat = time.monotonic()
                if child.spec.finite and child.spec.name not in self._ended_sources:
                    log.info("%s: input ended", child.spec.name)
                    self._ended_sources.add(child.spec.name)
                    self._event("end", child.spec.name)

    def _unauthenticated(self, kind: str, reason: str = "unauthenticated") -> None:
        self.unauthenticated[kind] += 1
        self.tag_rejects[reason] += 1
        total = sum(self.unauthenticated.values())
        if total & (total - 1) == 0:  # 1, 2, 4, 8, ...: visible without flooding the log
            log.warning(
                "heartbeat socket: %d message(s) without a valid run token ignored (%s)",
                total,
                dict(self.unauthenticated),
            )

    def _check_gap(self, child: Child) -> None:
        name = child.spec.name
        if name not in self._pending_gap:
            return
        first = child.last_stats.get("first_publish")
        if isinstance(first, int | float):
            since, since_what = self._pending_gap.pop(name)
            gap = float(first) - since
            log.warning(
                "%s: heatmaps resumed after a %.2f s gap (since its %s)", name, gap, since_what.replace("_", " ")
            )
            entry = {
                "process": name,
                "gap_s": round(gap, 3),
                "since": since_what,  # "last_heatmap" or "crash"
                "resumed_t": round(time.time() - self.started_at, 3),
            }
            self.gaps.append(entry)
            self._event("resumed", name, gap_s=entry["gap_s"])

    def _last_error(self, name: str) -> str | None:
        """The last ERROR line of a worker's log, without the logging prefix."""
        path = self.run_dir / f"{name}.log"
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            if " ERROR " in line:
                return line.split(": ", 1)[-1].strip()
        return None

    def _on_exit(self, child: Child, code: int, why: str) -> None:
        spec = child.spec
        child.exit_code = code
        child.ready = False  # gone: what waits for it (a source's ``after``) waits for its restart to be ready
        if code == USER_ERROR_EXIT:  # bad arguments or a missing device/file: a restart cannot help
            child.done = True
            message = self._last_error(spec.name) or f"see {self.run_dir / (spec.name + '.log')}"
            self.user_errors[spec.name] = message
            log.error("%s: %s", spec.name, message)
            self._event("user_error", spec.name, message=message)
            return
        if spec.finite and (code == 0 or spec.name in self._ended_sources):
            child.done = True
            self._ended_sources.add(spec.name)
            log.info("%s finished (exit %d)", spec.name, code)
            self._event("finished", spec.name, exit_code=code)
            return
        if spec.role == "display" and code == 0 and not self.stop_event.is_set():
            child.done = True  # the user closed the window ("q"): stop the whole pipeline
            log.info("display closed by the user; stopping")
            self._event("quit", spec.name)
            self.quit_requested = True
            return
        log.error("%s %s (exit code %s)", spec.name, why, code)
        self._event("crash", spec.name, exit_code=code, why=why)
        if spec.role == "inference":
            # The gap runs from the worker's last heatmap. A worker that died within a heartbeat interval of
            # its first heatmap never reported one: count from the crash then (short by < that interval).
            last = child.last_stats.get("last_publish")
            self._pending_gap[spec.name] = (
                (float(last), "last_heatmap") if isinstance(last, int | float) else (protocol.now(), "crash")
            )
        # The budget is a rate: restarts older than restart_window_s no longer count (5 hiccups in a day
        # must not kill a pipeline), and the back-off starts afresh once a worker has been stable that long.
        t = time.monotonic()
        while child.recent_restarts and t - child.recent_restarts[0] > self.config.restart_window_s:
            child.recent_restarts.popleft()
        recent = len(child.recent_restarts)
        if not spec.restart or recent >= self.config.max_restarts:
            child.done = True
            log.error(
                "%s: not restarting (%d restarts in the last %.0f s, %d in all)",
                spec.name,
                recent,
                self.config.restart_window_s,
                child.restarts,
            )
            return
        backoff = min(self.config.restart_backoff_s * 2**recent, self.config.restart_backoff_max_s)
        child.restart_at = time.monotonic() + backoff
        log.info("%s: restarting in %.1f s", spec.name, backoff)

    def serving_workers(self) -> list[str]:
        """Inference workers that are up and ready (engine loaded), in the plan's order."""
        if self.shards is None:
            return []
        out = []
        for name in self.shards.workers:
            child = self.children.get(name)
            if (
                child is not None
                and child.ready
                and child.restart_at is None
                and child.popen is not None
                and child.popen.poll() is None
            ):
                out.append(name)
        return out

    def _reassign(self) -> None:
        """Publish who serves which stream (on change at once; else the periodic resend)."""
        if self.shards is None or self._assigner is None:
            return
        table = self.shards.table(self.serving_workers())
        if self._assigner.update(table):
            owned = {w: [route[0] for route in routes] for w, routes in table.items()}
            log.info("stream assignment %d: %s", self._assigner.changes, owned)
            self._event("assign", "launcher", assignment=owned)

    def poll(self) -> None:
        """One supervision step: heartbeats, exits, silent workers, due restarts, stream assignment."""
        self._read_heartbeats()
        self._start_waiting()
        t = time.monotonic()
        for child in self.children.values():
            if child.done or child.popen is None:
                continue
            if child.restart_at is not None:
                if t >= child.restart_at:
                    child.restarts += 1
                    child.recent_restarts.append(t)
                    self._event("restart", child.spec.name, restarts=child.restarts)
                    self._start(child)
                continue
            code = child.popen.poll()
            if code is not None:
                child.held = False
                _close_stdin(child)
                self._on_exit(child, code, "exited" if code >= 0 else f"killed by signal {-code}")
                continue
            if child.held:  # not running its work yet: no heartbeats to expect
                continue
            # Until it is ready (imports, engine loading: seconds of GIL-holding C code on a busy machine, when
            # even a heartbeat thread can fall silent) a worker has startup_grace_s; then heartbeat_timeout_s.
            if not child.ready:
                why = None
                if t - child.started > (child.spec.startup_grace_s or self.config.startup_grace_s):
                    why = "no first heartbeat" if child.last_heartbeat is None else "not ready after startup_grace_s"
            elif t - (child.last_heartbeat or child.started) > self.config.heartbeat_timeout_s:
                stalled = child.last_stats.get("state") == STATE_STALLED
                why = "stalled (still beating)" if stalled else "stopped sending heartbeats"
            else:
                why = None
            if why:
                log.error("%s: %s; killing it", child.spec.name, why)
                child.popen.kill()
                child.popen.wait()
                self._on_exit(child, child.popen.returncode, why)
        self._reassign()

    def finished(self) -> bool:
        """True when every finite source has ended (and there is at least one), or nothing is left alive."""
        finite = [c for c in self.children.values() if c.spec.finite]
        if finite and all(c.spec.name in self._ended_sources for c in finite):
            return True
        return all(c.done for c in self.children.values())

    def supervise(self, timeout_s: float | None = None) -> str:
        """Run until the sources end, ``stop_event`` is set (signal) or ``timeout_s`` passes; returns why."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self.stop_event.is_set():
                return "stopped"
            if self.user_errors:
                return "failed: " + "; ".join(f"{n}: {m}" for n, m in self.user_errors.items())
            # a finite source that gave up (crashed too often) without reaching its end
            gave_up = [
                c.spec.name
                for c in self.children.values()
                if c.spec.finite and c.done and c.spec.name not in self._ended_sources
            ]
            if gave_up:
                return "failed: " + ", ".join(gave_up)
            if self.quit_requested:
                return "quit"
            if self.finished():
                crashed = [c.spec.name for c in self.children.values() if c.done and not c.spec.finite]
                return "failed: " + ", ".join(crashed) if crashed and not self._ended_sources else "ended"
            # the consumers gave up (too many crashes): nothing useful can happen any more
            given_up = [c.spec.name for c in self.children.values() if c.done and c.spec.role == "display"]
            inference = [c for c in self.children.values() if c.spec.role == "inference"]
            if inference and all(c.done for c in inference):  # one of several workers left: its streams move
                given_up += [c.spec.name for c in inference]
            if given_up:
                return "failed: " + ", ".join(given_up)
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"
            self.poll()
            time.sleep(0.05)

    # --- shutdown -----------------------------------------------------------------------------------
    def shutdown(self, reason: str) -> dict[str, Any]:
        """Stop every process in order (SIGTERM, then SIGKILL after a timeout) and write the summary."""
        self.stop_reason = reason
        if reason == "ended":
            # Let the last frames travel through inference to the display before stopping them.
            end = time.monotonic() + self.config.drain_s
            while time.monotonic() < end:
                self._read_heartbeats()
                time.sleep(0.05)
        for role in STOP_ORDER:
            group = [c for c in self.children.values() if c.spec.role == role]
            timeout = self.config.display_stop_timeout_s if role == "display" else self.config.stop_timeout_s
            for child in group:
                # a source that sent 'end' exits by itself (a SIGTERM during its exit would kill it with -15)
                ended = child.spec.finite and child.spec.name in self._ended_sources
                if child.popen is not None and child.popen.poll() is None and not ended:
                    child.popen.send_signal(signal.SIGTERM)
            for child in group:
                self._wait_or_kill(child, timeout)
            self._read_heartbeats()
        if self._sub is not None:
            self._sub.close(0)
        if self._assigner is not None:
            self._assigner.close()
        if self._proxy is not None:
            self._proxy.stop()
        security.stop_authenticators()  # a ZAP thread's socket would keep term() waiting
        if self._ctx is not None:
            self._ctx.term()
        summary = self.summary()
        path = self.run_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, path)
        log.info("pipeline stopped (%s); summary in %s", reason, path)
        return summary

    def _wait_or_kill(self, child: Child, timeout: float) -> None:
        if child.popen is None:
            return
        try:
            child.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", child.spec.name, timeout)
            child.popen.kill()
            child.popen.wait()
        if child.exit_code is None or child.popen.returncode is not None:
            child.exit_code = child.popen.returncode
        _close_stdin(child)

    def summary(self) -> dict[str, Any]:
        return {
            "reason": self.stop_reason,
            "run_dir": str(self.run_dir),
            "wall_s": round(time.time() - self.started_at, 3),
            "processes": {
                name: {
                    "module": c.spec.module,
                    "restarts": c.restarts,
                    "exit_code": c.exit_code,
                    "stats": c.last_stats,
                    "log": str(self.run_dir / f"{name}.log"),
                }
                for name, c in self.children.items()
            },
            "heatmap_gaps": self.gaps,
            "streams": self.stream_stats(),
            "assignment": None if self._assigner is None else self._assigner.table,
            "events": self.events,
            "unauthenticated": dict(self.unauthenticated),
            "tag_rejects": dict(self.tag_rejects),
            "heartbeat_rejects": self.heartbeat_rejects.as_dict(),
        }

    def stream_stats(self) -> dict[str, dict[str, Any]]:
        """Per-stream stats of the inference workers' last heartbeats (several workers: the one that served
        the stream most, i.e. its owner at the end unless it moved)."""
        out: dict[str, dict[str, Any]] = {}
        for child in self.children.values():
            if child.spec.role != "inference":
                continue
            per_stream = child.last_stats.get("per_stream")
            for stream, stats in (per_stream or {}).items() if isinstance(per_stream, dict) else ():
                if not isinstance(stats, dict) or not isinstance(stats.get("heatmaps", 0), int | float):
                    continue
                if stream not in out and len(out) >= MAX_STREAMS:  # workers cap theirs too; a report stays small
                    continue
                if stats.get("heatmaps", 0) >= out.get(stream, {}).get("heatmaps", -1):
                    out[stream] = {**stats, "worker": child.spec.name}
        return out

    def run(self, timeout_s: float | None = None) -> dict[str, Any]:
        """start + supervise + shutdown, with SIGINT/SIGTERM stopping the pipeline cleanly."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: self.stop_event.set())
        reason = "error"
        try:
            self.start()
            reason = self.supervise(timeout_s)
        except UserError as err:  # a port in use, a refused endpoint: the summary says which, the caller exits 2
            reason = f"failed: {err}"
            raise
        finally:
            summary = self.shutdown(reason)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return summary

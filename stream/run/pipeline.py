"""Pipeline builders: which processes a run starts and how they are wired (endpoints, command lines).

``Endpoints`` says where each stream lives (the stream config's endpoints, or free loopback ports with
``auto()``); ``inference_specs`` / ``display_spec`` / ``replay_specs`` turn them and the stream config
(``avloc.stream.run.launcher.StreamConfig``) into the ``ProcessSpec`` list the ``Launcher`` supervises, plus the
shard plan when several inference workers share the streams (``avloc.stream.serve.sharding``). ``avloc replay``,
``avloc run``, ``avloc bench pipeline`` and the soak test build their runs from these; ``view_spec`` adds the browser
viewer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from avloc.core.errors import UserError
from avloc.stream.run.launcher import ProcessSpec, StreamConfig, free_tcp_endpoint
from avloc.stream.serve.sharding import ShardPlan, StreamRoute

SLOW_STARTUP_GRACE_S = 600.0  # inference start-up allowed for an engine build (TensorRT) or compile warm-up


@dataclass
class Endpoints:
    """Where each stream lives; ``auto()`` picks free loopback ports so runs (and tests) never collide."""

    frames: list[str]
    audio: list[str]
    heatmaps: str
    heartbeats: str
    # several inference workers only (auto-picked when None): the heatmap proxy's inbound side and the
    # launcher's assignment publisher
    heatmaps_in: str | None = None
    assignments: str | None = None

    @classmethod
    def defaults(cls, config: StreamConfig, streams: int = 1) -> Endpoints:
        if streams == 1:
            return cls(
                [config.frames_endpoint],
                [config.audio_endpoint],
                config.heatmaps_endpoint,
                config.heartbeats_endpoint,
            )
        auto = cls.auto(streams)
        return cls(auto.frames, auto.audio, config.heatmaps_endpoint, config.heartbeats_endpoint)

    @classmethod
    def auto(cls, streams: int = 1) -> Endpoints:
        return cls(
            [free_tcp_endpoint() for _ in range(streams)],
            [free_tcp_endpoint() for _ in range(streams)],
            free_tcp_endpoint(),
            free_tcp_endpoint(),
        )


def inference_spec(
    engine: Path,
    backend: str,
    endpoints: Endpoints,
    config: StreamConfig,
    threads: int | None = None,
    extra: list[str] | None = None,
    *,
    name: str = "inference",
    max_batch: int | None = None,
    shards: ShardPlan | None = None,
) -> ProcessSpec:
    """One inference worker; with ``shards`` it serves what the launcher assigns to ``name``."""
    args = [
        "--engine",
        str(engine),
        "--backend",
        backend,
        "--heatmap-dtype",
        config.heatmap_dtype,
        "--max-audio-age",
        str(config.max_audio_age_s),
        "--audio-reuse",
        str(config.audio_reuse_s),
        "--max-batch",
        str(max_batch or config.max_batch),
        "--max-frame-age",
        str(config.max_frame_age_s),
    ]
    if shards is None:
        args += ["--heatmaps", endpoints.heatmaps]
        for ep in endpoints.frames:
            args += ["--frames", ep]
        for ep in endpoints.audio:
            args += ["--audio", ep]
    else:
        args += ["--heatmaps", shards.heatmaps_in, "--heatmaps-connect"]
        args += ["--assignments", shards.assignments_endpoint, "--worker-name", name]
    threads = threads or config.inference_threads or None
    if threads:
        args += ["--threads", str(threads)]
    if not config.gate:
        args.append("--no-gate")
    if config.ogl:  # the command line's --ogl / --ogl-alpha (in extra, after these) win over the config
        args.append("--ogl")
        if config.ogl_alpha is not None:
            args += ["--ogl-alpha", str(config.ogl_alpha)]
    args += list(extra or [])
    if "--ogl-alpha" in args and "--ogl" not in args:  # refused here, before anything starts
        raise UserError("--ogl-alpha needs --ogl (or ogl: true in the stream config)")
    # A first TensorRT build or torch.compile of every batch size takes minutes before the worker is ready (its
    # heartbeats say "loading" meanwhile); the other backends load in seconds.
    slow_start = backend == "tensorrt" or any("mode=compile" in a for a in args)
    grace = max(config.startup_grace_s, SLOW_STARTUP_GRACE_S) if slow_start else None
    return ProcessSpec(name, "avloc.stream.serve.inference", args, role="inference", startup_grace_s=grace)


def inference_specs(
    engine: Path,
    backend: str,
    endpoints: Endpoints,
    config: StreamConfig,
    *,
    workers: int | None = None,
    threads: int | None = None,
    extra: list[str] | None = None,
    max_batch: int | None = None,
    stream_ids: list[str] | None = None,
) -> tuple[list[ProcessSpec], ShardPlan | None]:
    """The inference worker(s) for ``endpoints`` (``workers`` overrides ``config.inference_workers``) and,
    for more than one, the plan the Launcher needs (``shards=``). Stream ``i`` is ``stream_ids[i]``
    (default ``cam{i}``, as the replay and camera workers name them) on ``endpoints.frames[i]``, with its
    own audio endpoint when there is one per stream, else the single microphone's."""
    count = workers or config.inference_workers
    if count < 1:
        raise UserError(f"--inference-workers {count}: expected a positive number of workers")
    if count == 1:
        spec = inference_spec(engine, backend, endpoints, config, threads, extra, max_batch=max_batch)
        return [spec], None
    ids = stream_ids or [f"cam{i}" for i in range(len(endpoints.frames))]
    routes = []
    for i, (stream, frames) in enumerate(zip(ids, endpoints.frames)):
        audio = endpoints.audio[i] if len(endpoints.audio) == len(endpoints.frames) else None
        routes.append(StreamRoute(stream, frames, audio or (endpoints.audio[0] if endpoints.audio else None)))
    endpoints.heatmaps_in = endpoints.heatmaps_in or free_tcp_endpoint()
    endpoints.assignments = endpoints.assignments or free_tcp_endpoint()
    plan = ShardPlan(
        routes=routes,
        workers=[f"inference{i}" for i in range(count)],
        assignments_endpoint=endpoints.assignments,
        heatmaps_in=endpoints.heatmaps_in,
        heatmaps_out=endpoints.heatmaps,
    )
    # N workers on one host share its cores (each backend would take them all by default)
    threads = threads or config.inference_threads or max(1, (os.cpu_count() or 1) // count)
    specs = [
        inference_spec(engine, backend, endpoints, config, threads, extra, name=w, max_batch=max_batch, shards=plan)
        for w in plan.workers
    ]
    return specs, plan


def display_spec(
    endpoints: Endpoints,
    config: StreamConfig,
    *,
    headless: bool,
    record: Path | None = None,
    audio_source: Path | None = None,
    latency_log: Path | None = None,
    snapshot_every: int = 0,
    fps: float = 30.0,
    alpha: float | None = None,
    colormap: str | None = None,
) -> ProcessSpec:
    args = [
        "--heatmaps",
        endpoints.heatmaps,
        "--alpha",
        str(config.alpha if alpha is None else alpha),
        "--colormap",
        colormap or config.colormap,
        "--fps",
        str(fps),
    ]
    for ep in endpoints.frames:
        args += ["--frames", ep]
    if headless:
        args.append("--headless")
    if record is not None:
        args += ["--record", str(record)]
    if audio_source is not None:
        args += ["--audio-source", str(audio_source)]
    if latency_log is not None:
        args += ["--latency-log", str(latency_log)]
    if snapshot_every:
        args += ["--snapshot-every", str(snapshot_every)]
    return ProcessSpec("display", "avloc.stream.clients.display", args, role="display")


def replay_specs(
    video: Path,
    engine: Path,
    endpoints: Endpoints,
    config: StreamConfig,
    *,
    speed: str = "1.0",
    loop: bool = False,
    after: tuple[str, ...] = ("inference", "display"),
    flow_control: bool = True,
) -> list[ProcessSpec]:
    """One replay worker per stream (several streams replay the same file under different ids); each starts
    once the processes in ``after`` (the inference workers and the display) are ready."""
    specs = []
    for i, (frames_ep, audio_ep) in enumerate(zip(endpoints.frames, endpoints.audio)):
        args = [
            str(video),
            "--frames",
            frames_ep,
            "--audio",
            audio_ep,
            "--stream-id",
            f"cam{i}",
            "--speed",
            str(speed),
            "--hop",
            str(config.audio_hop_s),
            "--frontend",
            str(engine),
            "--wait-subscribers",
            "2",  # frames: the inference worker and the display (audio: the inference worker)
            "--wait-timeout",
            "10",
        ]
        if flow_control:  # past capacity, send about what the worker serves (avloc.stream.wire.flow)
            args += ["--flow-control", endpoints.heatmaps, "--flow-audio-reuse", str(config.audio_reuse_s)]
        if loop:
            args.append("--loop")
        specs.append(
            ProcessSpec(
                f"replay{i}" if len(endpoints.frames) > 1 else "replay",
                "avloc.stream.capture.replay",
                args,
                role="source",
                finite=not loop,
                after=after,
            )
        )
    return specs


def view_spec(endpoints: Endpoints, http: str | None = None, token: str | None = None) -> ProcessSpec:
    """The viewer as a launcher process (``avloc run/replay --view``): stopped last, with the displays.

    The token travels in the child's environment (``$AVLOC_VIEW_TOKEN``), not on its command line, which every
    local user can read; without one the child inherits the launcher's ``$AVLOC_VIEW_TOKEN``, if any. ``http``
    defaults to the viewer's own default address.
    """
    from avloc.stream.clients.view import DEFAULT_HTTP, TOKEN_ENV  # why: the viewer pulls in aiohttp and cv2

    http = DEFAULT_HTTP if http is None else http
    args = ["--heatmaps", endpoints.heatmaps, "--http", http]
    for ep in endpoints.frames:
        args += ["--frames", ep]
    return ProcessSpec(
        "view", "avloc.stream.clients.view", args, role="display", env={TOKEN_ENV: token} if token else {}
    )

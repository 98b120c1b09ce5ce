"""``avloc run --camera 0 --mic default --engine ENGINE_DIR``: live capture through the streaming pipeline.

One camera worker per ``--camera`` (device index, video file, RTSP/HTTP URL), one microphone worker, the
inference worker (batches the cameras' frames together) and the display, supervised by the launcher.
Stop with ``q`` in the window or Ctrl-C.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from avloc.core.errors import UserError
from avloc.stream.run.args import add_display_arguments, check_display, default_run_dir, inference_args, run_view_token
from avloc.stream.run.report import print_summary, summarize_latency_log


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--camera",
        action="append",
        default=None,
        metavar="SOURCE",
        help="OpenCV source: device index, file or rtsp:// URL (repeat for several streams)",
    )
    parser.add_argument(
        "--mic",
        default="default",
        help="microphone: index, name part, 'default', or 'none' (heatmaps suppressed)",
    )
    parser.add_argument("--fps-limit", type=float, default=None, help="publish at most this many frames/s per camera")
    add_display_arguments(parser)


def live_specs(
    cameras: list[str],
    mic: str,
    engine: Path,
    backend: str,
    endpoints: Any,
    config: Any,
    *,
    threads: int | None,
    extra_inference_args: list[str],
    inference_workers: int | None = None,
    max_batch: int | None = None,
    headless: bool,
    record: Path | None,
    latency_log: Path,
    snapshot_every: int,
    fps_limit: float | None,
    alpha: float | None,
    colormap: str | None,
) -> tuple[list[Any], Any]:
    """The processes of a live run, and the shard plan when several inference workers share the cameras."""
    from avloc.stream.run import launcher as L  # why: keeps `avloc run --help` fast (zmq, psutil)
    from avloc.stream.run import pipeline as P

    specs = []
    for i, (source, frames_ep) in enumerate(zip(cameras, endpoints.frames)):
        args = ["--source", str(source), "--endpoint", frames_ep, "--stream-id", f"cam{i}"]
        # past the worker's capacity, convert and send about what it serves (avloc.stream.wire.flow)
        args += ["--flow-control", endpoints.heatmaps]
        if fps_limit:
            args += ["--fps-limit", str(fps_limit)]
        specs.append(L.ProcessSpec(f"camera{i}", "avloc.stream.capture.camera", args, role="source"))
    if mic != "none":
        specs.append(
            L.ProcessSpec(
                "microphone",
                "avloc.stream.capture.microphone",
                [
                    "--device",
                    mic,
                    "--endpoint",
                    endpoints.audio[0],
                    "--frontend",
                    str(engine),
                    "--hop",
                    str(config.audio_hop_s),
                    "--stream-id",
                    "mic0",
                ],
                role="source",
            )
        )
        endpoints.audio = endpoints.audio[:1]
    else:
        endpoints.audio = []
    inference, shards = P.inference_specs(
        engine,
        backend,
        endpoints,
        config,
        workers=inference_workers,
        threads=threads,
        extra=extra_inference_args,
        max_batch=max_batch,
    )
    specs.extend(inference)
    specs.append(
        P.display_spec(
            endpoints,
            config,
            headless=headless,
            record=record,
            latency_log=latency_log,
            snapshot_every=snapshot_every,
            alpha=alpha,
            colormap=colormap,
        )
    )
    return specs, shards


def main(args: argparse.Namespace) -> int:
    # why: these (cv2, zmq, psutil) are not needed for `avloc run --help`
    from avloc.engines.base import read_manifest
    from avloc.stream.run import launcher as L
    from avloc.stream.run import pipeline as P
    from avloc.stream.wire import security

    check_display(args)
    cameras = args.camera or ["0"]
    read_manifest(args.engine)
    if len(set(cameras)) != len(cameras):
        raise UserError(f"--camera {cameras}: each camera source may be given once")
    config = L.load_stream_config(args.config)
    endpoints = P.Endpoints.auto(len(cameras)) if args.auto_ports else P.Endpoints.defaults(config, len(cameras))
    run_dir = Path(args.run_dir or default_run_dir("run"))
    run_dir = security.private_dir(run_dir)  # its logs name the sources; its keys/ must stay ours
    latency_log = run_dir / "latency.jsonl"
    specs, shards = live_specs(
        cameras,
        args.mic,
        args.engine,
        args.backend,
        endpoints,
        config,
        threads=args.threads,
        extra_inference_args=inference_args(args),
        headless=args.headless,
        record=args.record,
        latency_log=latency_log,
        snapshot_every=args.snapshot_every,
        fps_limit=args.fps_limit,
        alpha=args.alpha,
        colormap=args.colormap,
        inference_workers=args.inference_workers,
        max_batch=args.max_batch,
    )
    if args.view:
        token = run_view_token(run_dir, args.view, args.view_token, args.insecure)
        specs.append(P.view_spec(endpoints, args.view, token))
    launcher = L.Launcher(
        specs,
        run_dir,
        config=config,
        heartbeat_endpoint=endpoints.heartbeats,
        verbose=getattr(args, "verbose", False),
        keys=args.keys,
        insecure=args.insecure,
        shards=shards,
        run_keys=True,  # secure by default: per-run CURVE keys unless --keys or --insecure
    )
    print(f"live pipeline running ({len(cameras)} camera(s), mic {args.mic}); Ctrl-C to stop; logs in {run_dir}")
    if launcher.keys_dir is not None:
        print(f"CURVE keys of this run (for your own subscribers, docs/protocol.md): {launcher.keys_dir}")
    summary = launcher.run(timeout_s=args.timeout)
    summary["latency"] = summarize_latency_log(latency_log)
    summary["record"] = str(args.record) if args.record is not None and args.record.is_file() else None
    print_summary(summary)
    return 0

"""``avloc replay VIDEO --engine ENGINE_DIR``: a video file through the real multi-process pipeline.

replay worker (PyAV: paced frames + audio windows from the file's own track) -> inference worker ->
display (window, or ``--headless`` with ``--record out.mp4``), all started and supervised by the launcher.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from avloc.core.errors import UserError
from avloc.stream.run.args import add_display_arguments, check_display, default_run_dir, inference_args, run_view_token
from avloc.stream.run.report import print_summary, summarize_latency_log

log = logging.getLogger(__name__)


def parse_speed(value: str) -> str:
    """Checked here (the replay worker's own rule) so a bad value fails before any process starts."""
    from avloc.stream.capture.replay import parse_speed as worker_speed  # why: the replay worker imports torch

    try:
        speed = worker_speed(value)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return "max" if speed is None else str(speed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", type=Path, help="mp4/mkv/webm file (audio track optional)")
    add_display_arguments(parser)
    parser.add_argument("--speed", type=parse_speed, default="1.0", help="1.0 = real time, 'max' = unpaced")
    parser.add_argument("--loop", action="store_true", help="start over at the end (stop with Ctrl-C)")


def run_replay(
    video: Path,
    engine: Path,
    *,
    backend: str = "onnxruntime",
    run_dir: Path | None = None,
    record: Path | None = None,
    headless: bool = True,
    speed: str = "1.0",
    loop: bool = False,
    streams: int = 1,
    threads: int | None = None,
    extra_inference_args: list[str] | None = None,
    auto_ports: bool = True,
    snapshot_every: int = 0,
    alpha: float | None = None,
    colormap: str | None = None,
    timeout_s: float | None = None,
    config_path: Path | None = None,
    verbose: bool = False,
    keys: Path | None = None,
    insecure: bool = False,
    view: str | None = None,
    view_token: str | None = None,
    inference_workers: int | None = None,
    max_batch: int | None = None,
) -> dict[str, Any]:
    """Replay ``video`` through the pipeline; returns the launcher summary plus the latency report."""
    # why: these (cv2, zmq, psutil) add ~35 % to `avloc replay --help`
    from avloc.core.media import probe_video
    from avloc.engines.base import read_manifest
    from avloc.stream.run import launcher as L
    from avloc.stream.run import pipeline as P
    from avloc.stream.wire import security

    info = probe_video(video)  # DataError with the file name if missing / unreadable
    read_manifest(engine)  # UserError if not an engine directory
    config = L.load_stream_config(config_path)
    run_dir = Path(run_dir or default_run_dir("replay"))
    run_dir = security.private_dir(run_dir)  # its logs name the sources; its keys/ must stay ours
    endpoints = P.Endpoints.auto(streams) if auto_ports else P.Endpoints.defaults(config, streams)
    latency_log = run_dir / "latency.jsonl"
    latency_log.unlink(missing_ok=True)
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
    after = (*(s.name for s in inference), "display")
    specs = [
        *P.replay_specs(video, engine, endpoints, config, speed=speed, loop=loop, after=after),
        *inference,
        P.display_spec(
            endpoints,
            config,
            headless=headless,
            record=record,
            audio_source=video if (info.has_audio and not loop) else None,
            latency_log=latency_log,
            snapshot_every=snapshot_every,
            fps=info.fps or 30.0,
            alpha=alpha,
            colormap=colormap,
        ),
    ]
    if view:
        specs.append(P.view_spec(endpoints, view, run_view_token(run_dir, view, view_token, insecure)))
    launcher = L.Launcher(
        specs,
        run_dir,
        config=config,
        heartbeat_endpoint=endpoints.heartbeats,
        verbose=verbose,
        keys=keys,
        insecure=insecure,
        shards=shards,
        run_keys=True,  # secure by default: per-run CURVE keys unless --keys or --insecure
    )
    summary = launcher.run(timeout_s=timeout_s)
    summary["latency"] = summarize_latency_log(latency_log)
    summary["latency_log"] = str(latency_log)
    summary["record"] = str(record) if record is not None and record.is_file() else None
    summary["video"] = {
        "path": str(video),
        "fps": info.fps,
        "width": info.width,
        "height": info.height,
        "has_audio": info.has_audio,
        "duration": info.duration,
    }
    return summary


def main(args: argparse.Namespace) -> int:
    check_display(args)
    if not args.video.is_file():
        raise UserError(f"{args.video}: video file not found")
    summary = run_replay(
        args.video,
        args.engine,
        backend=args.backend,
        run_dir=args.run_dir,
        record=args.record,
        headless=args.headless,
        speed=args.speed,
        loop=args.loop,
        threads=args.threads,
        extra_inference_args=inference_args(args),
        auto_ports=args.auto_ports,
        snapshot_every=args.snapshot_every,
        alpha=args.alpha,
        colormap=args.colormap,
        timeout_s=args.timeout,
        config_path=args.config,
        verbose=getattr(args, "verbose", False),
        keys=args.keys,
        insecure=args.insecure,
        view=args.view,
        view_token=args.view_token,
        inference_workers=args.inference_workers,
        max_batch=args.max_batch,
    )
    print_summary(summary)
    return 0 if summary["reason"] in ("ended", "stopped", "timeout", "quit") else 1

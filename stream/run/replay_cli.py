"""``avloc replay VIDEO --engine ENGINE_DIR``: a video file through the real multi-process pipeline.

replay worker (PyAV: paced frames + audio windows from the file's own track) -> inference worker ->
display (window, or ``--headless`` with ``--record out.mp4``), all started and supervised by the launcher.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

from avloc.core.errors import UserError
from avloc.engines.base import known_backends

log = logging.getLogger(__name__)


def default_run_dir(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_view_token(run_dir: Path, view: str, token: str | None, insecure: bool) -> str | None:
    """The token of a run's own ``--view``. With keys (the default) a viewer without a token would serve the
    streams to any local user over HTTP, around the keys: it gets a fresh one, kept in ``RUN_DIR/view-token``
    (0600, in the 0700 run folder) and printed in the address to open. ``--insecure``, or a token of the
    user's own (``--view-token-file``, ``$AVLOC_VIEW_TOKEN``), keep what they say."""
    import secrets

    from avloc.stream.clients.view import TOKEN_ENV, parse_http

    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None or insecure:
        return token
    token = secrets.token_urlsafe(24)
    path = run_dir / "view-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    host, port = parse_http(view, "--view")
    host = f"[{host}]" if ":" in host else host
    print(f"viewer: http://{host}:{port}/?token={token} (this run's token, also in {path})", flush=True)
    return token


def parse_speed(value: str) -> str:
    """Checked here (the replay worker's own rule) so a bad value fails before any process starts."""
    from avloc.stream.capture.replay import parse_speed as worker_speed

    try:
        speed = worker_speed(value)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return "max" if speed is None else str(speed)


def add_triton_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--triton-url",
        default=None,
        metavar="HOST:PORT",
        help="with --backend triton: the server's gRPC address (docs/engines.md; default 127.0.0.1:8001)",
    )


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --engine-option, --triton-url and --ogl / --ogl-alpha, passed on to the inference worker."""
    parser.add_argument("--device", default="cpu", help="inference device (cpu, cuda, cuda:1)")
    add_triton_url_argument(parser)
    parser.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine backend option, e.g. precision=int8 (onnxruntime) or mode=cuda_graphs (torch)",
    )
    parser.add_argument(
        "--ogl",
        action="store_true",
        help="object-guided localization: blend heatmaps with the engine's objectness map (avloc export --ogl)",
    )
    parser.add_argument(
        "--ogl-alpha",
        type=float,
        default=None,
        metavar="ALPHA",
        help="weight of the audio-visual map in the OGL blend (default: ogl_alpha of the stream config, "
        "else the engine manifest's, 0.4)",
    )


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a positive integer")
    return number


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """How many inference workers share the streams, and their batch size (default: the stream config)."""
    parser.add_argument(
        "--inference-workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="inference workers sharing the streams (default: inference_workers of the stream config, 1)",
    )
    parser.add_argument(
        "--max-batch",
        type=_positive_int,
        default=None,
        metavar="N",
        help="frames per engine batch (default: max_batch of the stream config; never above the engine's)",
    )


def inference_args(args: argparse.Namespace) -> list[str]:
    """Extra command-line arguments of the inference worker from --device / --engine-option / --ogl(-alpha)."""
    out = ["--device", getattr(args, "device", "cpu")]
    for option in getattr(args, "engine_option", []) or []:
        out += ["--engine-option", option]
    if getattr(args, "triton_url", None):
        out += ["--triton-url", args.triton_url]
    ogl, alpha = getattr(args, "ogl", False), getattr(args, "ogl_alpha", None)
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise UserError(f"--ogl-alpha {alpha}: expected a value in [0, 1]")
    if ogl:
        out.append("--ogl")
    if alpha is not None:  # without --ogl here it still applies when the stream config turns OGL on
        out += ["--ogl-alpha", str(alpha)]
    return out


def add_display_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``avloc replay`` and ``avloc run``."""
    parser.add_argument("--engine", required=True, type=Path, help="engine directory (avloc export)")
    parser.add_argument("--backend", default="onnxruntime", choices=known_backends())
    parser.add_argument("--threads", type=int, default=None, help="inference intra-op threads")
    add_engine_arguments(parser)
    add_worker_arguments(parser)
    parser.add_argument("--headless", action="store_true", help="no window (use with --record)")
    parser.add_argument("--record", type=Path, default=None, metavar="OUT.mp4", help="record the overlaid video")
    parser.add_argument("--snapshot-every", type=int, default=0, metavar="N", help="save every N-th frame as PNG")
    parser.add_argument("--alpha", type=float, default=None, help="heatmap opacity 0..1")
    parser.add_argument("--colormap", choices=("jet", "inferno"), default=None)
    parser.add_argument("--run-dir", type=Path, default=None, help="logs + latency log + summary (default runs/...)")
    parser.add_argument(
        "--auto-ports",
        action="store_true",
        help="use free loopback ports instead of the default endpoints (parallel runs)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    parser.add_argument(
        "--keys",
        type=Path,
        default=None,
        metavar="DIR",
        help="CURVE keys from `avloc keys --out DIR`: every socket encrypted and authenticated",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no CURVE keys (by default each run makes its own in RUN_DIR/keys): any local process can read and "
        "inject; also allows binding non-loopback endpoints without --keys",
    )
    parser.add_argument("--config", type=Path, default=None, help="stream config (default configs/stream.yaml)")
    parser.add_argument(
        "--view",
        nargs="?",
        const="127.0.0.1:8080",
        default=None,
        metavar="HOST:PORT",
        help="also serve the browser viewer (docs/viewer.md; default 127.0.0.1:8080)",
    )
    parser.add_argument(
        "--view-token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="file holding the token a non-loopback --view requires (default $AVLOC_VIEW_TOKEN)",
    )
    parser.add_argument("--view-token", default=None, help=argparse.SUPPRESS)  # refused: `ps` shows argv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", type=Path, help="mp4/mkv/webm file (audio track optional)")
    add_display_arguments(parser)
    parser.add_argument("--speed", type=parse_speed, default="1.0", help="1.0 = real time, 'max' = unpaced")
    parser.add_argument("--loop", action="store_true", help="start over at the end (stop with Ctrl-C)")


def check_display(args: argparse.Namespace) -> None:
    if not args.headless and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise UserError("no display available (DISPLAY is not set): pass --headless, e.g. with --record out.mp4")
    if args.record is not None and args.record.suffix.lower() not in (".mp4", ".mkv", ".mov"):
        raise UserError(f"--record {args.record}: expected an .mp4, .mkv or .mov file name")
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha {args.alpha}: expected a value between 0 and 1")
    if getattr(args, "view", None):
        from avloc.stream.clients.view import check_http, read_token

        args.view_token = read_token(args.view_token_file, args.view_token, "--view-token")
        check_http(args.view, args.view_token, "--view")


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
    from avloc.core.media import probe_video
    from avloc.engines.base import read_manifest
    from avloc.stream.run import launcher as L
    from avloc.stream.run import pipeline as P
    from avloc.stream.tools.bench import summarize_latency_log
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
        from avloc.stream.clients.view import view_spec

        specs.append(view_spec(endpoints, view, run_view_token(run_dir, view, view_token, insecure)))
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


def print_summary(summary: dict[str, Any]) -> None:
    lat = summary.get("latency") or {}
    e2e = lat.get("e2e_ms") or {}
    print(
        f"pipeline {summary['reason']}: {lat.get('heatmaps', 0)} heatmaps "
        f"at {lat.get('heatmap_fps', 0):.1f} fps, "
        f"e2e p50 {e2e.get('p50', float('nan')):.1f} ms, p99 {e2e.get('p99', float('nan')):.1f} ms, "
        f"suppressed {lat.get('suppressed', 0)}"
    )
    from avloc.stream.capture.devices import why_no_heatmaps

    if explanation := why_no_heatmaps(summary):
        print(f"  {explanation}")
    per_stream = lat.get("per_stream") or {}
    if len(per_stream) > 1:
        for stream, info in per_stream.items():
            e2e_s = info.get("e2e_ms") or {}
            print(
                f"  {stream}: {info.get('heatmaps', 0)} heatmaps at {info.get('fps', 0):.1f} fps, "
                f"e2e p50 {e2e_s.get('p50', float('nan')):.1f} ms, p99 {e2e_s.get('p99', float('nan')):.1f} ms"
            )
        print(f"  fairness (min/max heatmap rate): {lat.get('fairness')}")
    for gap in summary.get("heatmap_gaps", []):
        print(f"  {gap['process']} restarted: heatmaps resumed after a {gap['gap_s']} s gap")
    for name, proc in summary["processes"].items():
        if proc["restarts"]:
            print(f"  {name}: {proc['restarts']} restart(s)")
    if summary.get("record"):
        print(f"recording: {summary['record']}")
    print(f"logs, latency log and summary: {summary['run_dir']}")


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

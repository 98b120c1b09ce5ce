"""Command-line options shared by ``avloc replay``, ``avloc run`` and ``avloc bench pipeline``, and their checks.

The engine options passed on to the inference worker, the worker count and batch size, the display and viewer
options, and the run folder: each defined once here, so every command spells and checks them alike.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from pathlib import Path

from avloc.core.errors import UserError
from avloc.engines.base import known_backends


def default_run_dir(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_view_token(run_dir: Path, view: str, token: str | None, insecure: bool) -> str | None:
    """The token of a run's own ``--view``. With keys (the default) a viewer without a token would serve the
    streams to any local user over HTTP, around the keys: it gets a fresh one, kept in ``RUN_DIR/view-token``
    (0600, in the 0700 run folder) and printed in the address to open. ``--insecure``, or a token of the
    user's own (``--view-token-file``, ``$AVLOC_VIEW_TOKEN``), keep what they say."""
    from avloc.stream.clients.view import TOKEN_ENV, parse_http  # why: the viewer pulls in aiohttp, cv2

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


def check_display(args: argparse.Namespace) -> None:
    if not args.headless and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise UserError("no display available (DISPLAY is not set): pass --headless, e.g. with --record out.mp4")
    if args.record is not None and args.record.suffix.lower() not in (".mp4", ".mkv", ".mov"):
        raise UserError(f"--record {args.record}: expected an .mp4, .mkv or .mov file name")
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha {args.alpha}: expected a value between 0 and 1")
    if getattr(args, "view", None):
        from avloc.stream.clients.view import check_http, read_token  # why: aiohttp, cv2 only with --view

        args.view_token = read_token(args.view_token_file, args.view_token, "--view-token")
        check_http(args.view, args.view_token, "--view")

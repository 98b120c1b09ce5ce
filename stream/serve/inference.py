"""Inference worker: frames + audio windows in, heatmaps out.

The process: ``python -m avloc.stream.serve.inference --engine ENGINE_DIR --frames EP --audio EP`` (the launcher
starts it so, docs/protocol.md). Parses the command line, loads the engine while heartbeats say ``loading``,
warms it up and runs ``avloc.stream.serve.inference_worker.InferenceWorker`` (what the worker does with frames,
audio and heatmaps: see that module) until stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from avloc.core.errors import UserError
from avloc.engines.base import known_backends, load_engine, read_manifest
from avloc.stream.runtime.worker import (
    USER_ERROR_EXIT,
    Heartbeat,
    add_common_arguments,
    install_stop_handlers,
    run_worker_main,
    setup_logging,
)
from avloc.stream.serve.batching import DEFAULT_MAX_BATCH
from avloc.stream.serve.inference_worker import InferenceWorker
from avloc.stream.wire import protocol
from avloc.stream.wire.flow import DEFAULT_AUDIO_REUSE_S

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", required=True, type=Path, help="engine directory (avloc export)")
    parser.add_argument("--backend", default="onnxruntime", choices=known_backends())
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--triton-url",
        default=None,
        metavar="HOST:PORT",
        help="with --backend triton: the server's gRPC address (default 127.0.0.1:8001)",
    )
    parser.add_argument("--threads", type=int, default=None, help="engine intra-op threads (default: backend's)")
    parser.add_argument(
        "--frames",
        action="append",
        default=None,
        metavar="ENDPOINT",
        help="frame publisher to subscribe to (repeat for several cameras)",
    )
    parser.add_argument(
        "--audio",
        action="append",
        default=None,
        metavar="ENDPOINT",
        help="audio-window publisher to subscribe to (repeatable)",
    )
    parser.add_argument(
        "--heatmaps",
        default=protocol.DEFAULT_ENDPOINTS["heatmaps"],
        metavar="ENDPOINT",
        help="endpoint to bind the heatmap publisher to",
    )
    parser.add_argument(
        "--heatmaps-connect",
        action="store_true",
        help="connect the heatmap publisher to --heatmaps (a proxy's XSUB) instead of binding it",
    )
    parser.add_argument("--heatmap-dtype", default="float16", choices=("float16", "uint8"))
    parser.add_argument(
        "--max-batch",
        type=_positive_int,
        default=None,
        help=f"frames per engine batch (default {DEFAULT_MAX_BATCH}; never more than the engine's own limit)",
    )
    parser.add_argument(
        "--max-frame-age",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="drop a frame older than this when its turn comes (0: automatic, 50 ms + two batch times)",
    )
    parser.add_argument(
        "--assignments",
        default=None,
        metavar="ENDPOINT",
        help="launcher's assignment publisher: serve only the streams it assigns to --worker-name",
    )
    parser.add_argument("--worker-name", default=None, help="this worker's name in the assignment table")
    parser.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option, e.g. precision=int8 (onnxruntime), mode=cuda_graphs or fp16=true (torch)",
    )
    parser.add_argument(
        "--max-audio-age",
        type=float,
        default=1.5,
        help="seconds after which the newest audio window is too old to pair (mic lost)",
    )
    parser.add_argument(
        "--audio-reuse",
        type=float,
        default=DEFAULT_AUDIO_REUSE_S,
        metavar="SECONDS",
        help="while behind (frames replaced or dropped in the last second), reuse an embedded audio window up to this "
        f"much older than the newest (default {DEFAULT_AUDIO_REUSE_S}; 0: never)",
    )
    parser.add_argument(
        "--no-gate",
        action="store_true",
        help="ignore the engine's silence gate (never mark heatmaps not_visible)",
    )
    parser.add_argument(
        "--ogl",
        action="store_true",
        help="object-guided localization: blend each heatmap with the engine's objectness map "
        "(an engine exported with avloc export --ogl)",
    )
    parser.add_argument(
        "--ogl-alpha",
        type=float,
        default=None,
        metavar="ALPHA",
        help="weight of the audio-visual map in the OGL blend (default: the manifest's ogl.alpha, 0.4)",
    )
    add_common_arguments(parser, role="inference")


def _ogl_alpha(args: argparse.Namespace, engine: Any) -> float | None:
    """--ogl / --ogl-alpha -> the blend weight (the manifest's, 0.4 by default), or None without --ogl."""
    if not args.ogl:
        if args.ogl_alpha is not None:
            raise UserError("--ogl-alpha needs --ogl")
        return None
    from avloc.core.ogl import OGL_ALPHA  # why: torch, only with --ogl

    if args.ogl_alpha is not None:
        return float(args.ogl_alpha)
    return float((engine.manifest.get("ogl") or {}).get("alpha", OGL_ALPHA))


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a positive integer")
    return number


def _triton_options(args: argparse.Namespace) -> dict[str, Any]:
    """--triton-url -> the triton backend's ``url`` option (refused with any other backend)."""
    if not args.triton_url:
        return {}
    if args.backend != "triton":
        raise UserError(f"--triton-url {args.triton_url}: only with --backend triton (not {args.backend})")
    return {"url": args.triton_url}


def parse_engine_options(items: list[str]) -> dict[str, Any]:
    """``["precision=int8", "fp16=true", "max_batch=4"]`` -> typed keyword arguments for ``load_engine``."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--engine-option {item!r}: expected KEY=VALUE, e.g. precision=int8")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    continue
        options[key.strip().replace("-", "_")] = value
    return options


def default_precision(engine_dir: Path) -> str:
    """The CPU worker's ONNX Runtime precision when ``--engine-option precision=`` is not given: "int8" when the
    engine holds an int8 variant of a graph (``avloc export`` with calibration data keeps one only where its
    heatmaps agree with fp32; its accuracy on the test split is in docs/performance.md), else "fp32".
    ``--engine-option precision=fp32`` turns it off."""
    try:
        graphs = read_manifest(engine_dir).get("graphs") or {}
    except UserError:
        return "fp32"  # load_engine reports the bad engine itself
    has_int8 = any("int8" in ((g or {}).get("variants") or {}) for g in graphs.values() if isinstance(g, dict))
    return "int8" if has_int8 else "fp32"


@contextlib.contextmanager
def heartbeats_while_starting(endpoint: str | None) -> Iterator[None]:
    """A thread sends ``state: loading`` heartbeats while the block runs (imports, engine sessions and the
    warm-up batch take seconds, far more on a busy machine), so the launcher neither kills the worker for
    silence nor starts the sources before the worker can serve."""
    done = threading.Event()

    def beat() -> None:
        early = Heartbeat(zmq.Context.instance(), endpoint, role="inference", stream="inference")
        while not done.wait(early.interval_s):
            early.maybe_send({"state": "loading"}, force=True)
        early.close()

    thread = threading.Thread(target=beat, name="heartbeat-while-starting", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avloc.stream.serve.inference", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.assignments and not args.worker_name:
        parser.error("--assignments needs --worker-name (this worker's name in the launcher's table)")
    setup_logging("inference", args.log_file, args.verbose)
    stop = install_stop_handlers()
    with heartbeats_while_starting(args.heartbeat):
        try:
            options = parse_engine_options(args.engine_option)
            if args.backend == "onnxruntime" and args.device == "cpu" and "precision" not in options:
                options["precision"] = default_precision(args.engine)
            engine = load_engine(
                args.engine,
                backend=args.backend,
                device=args.device,
                threads=args.threads,
                **options,
                **_triton_options(args),
            )
            worker = InferenceWorker(
                engine,
                frame_endpoints=args.frames or [protocol.DEFAULT_ENDPOINTS["frames"]],
                audio_endpoints=args.audio if args.audio is not None else [protocol.DEFAULT_ENDPOINTS["audio"]],
                heatmap_endpoint=args.heatmaps,
                heartbeat_endpoint=args.heartbeat,
                heatmap_dtype=args.heatmap_dtype,
                max_audio_age_s=args.max_audio_age,
                audio_reuse_s=args.audio_reuse,
                max_batch=args.max_batch,
                max_frame_age_s=args.max_frame_age,
                gate=not args.no_gate,
                ogl_alpha=_ogl_alpha(args, engine),
                worker_name=args.worker_name,
                assignments_endpoint=args.assignments,
                heatmaps_connect=args.heatmaps_connect,
            )
        except UserError as err:  # a bad engine, option or endpoint: one line, and the launcher does not retry
            log.error("%s", err)
            return USER_ERROR_EXIT
        worker.warm_up()
    log.info("engine %s (%s) ready; batches of at most %d", args.engine, args.backend, worker.max_batch)
    try:
        worker.run(stop)
    except UserError as err:  # its sockets: a port still taken after the retries, a refused endpoint
        log.error("%s", err)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    run_worker_main(main)

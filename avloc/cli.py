"""The ``avloc`` console script.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``. Modules are imported only when their command runs, so ``avloc --help``
stays fast and an optional dependency of one command never breaks another.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from avloc.core.errors import UserError

# command -> (help, module) or command -> (help, {subcommand: (help, module)})
COMMANDS: dict[str, tuple[str, str | dict[str, tuple[str, str]]]] = {
    "demo": ("run the whole chain on an embedded default (no camera, no dataset needed)", "avloc.stream.tools.demo"),
    "data": (
        "make or check datasets",
        {
            "stamps": ("benchmark of real photo cut-outs with their real recordings", "avloc.core.data.stamps"),
            "gcompris": ("external test set: new farm-animal photos and recordings", "avloc.core.data.gcompris"),
            "synth": ("procedural benchmark (no apt package needed)", "avloc.core.data.synth"),
            "scan": ("list every problem of a dataset at once", "avloc.core.data.scan"),
            "prepare": (
                "turn a folder of raw videos into a dataset ROOT (parallel, resumable)",
                "avloc.core.data.prepare",
            ),
        },
    ),
    "index": (
        "nearest-neighbour positives",
        {"build": ("extract pretrained features and find neighbours with faiss", "avloc.train.nn_index")},
    ),
    "train": ("train a model from a YAML config", "avloc.train.main"),
    "eval": ("evaluate a checkpoint: localization, retrieval, extended, audio-swap", "avloc.train.evaluate"),
    "eval-maps": ("score saved heatmaps with the evaluation protocol", "avloc.core.eval_maps"),
    "localize": (
        "offline, batched: an image + sound, a video or a folder of videos -> overlays and per-frame peaks",
        "avloc.localize",
    ),
    "info": ("what a checkpoint, engine folder or Triton repository is, and what can run it here", "avloc.info"),
    "export": ("export a checkpoint to ONNX engines + manifest", "avloc.engines.export"),
    "import": (
        "import published weights into an avloc checkpoint",
        {
            "ssl-align": (
                "official SSL-Align (kaistmm/SSLalignment) checkpoint -> RUN/best.pt",
                "avloc.core.ssl_align_import",
            ),
            "acl": ("ACL from local BEATs / CLIPSeg / released ACL weights", "avloc.core.acl.convert"),
        },
    ),
    "replay": ("replay a video file through the streaming pipeline", "avloc.stream.run.replay_cli"),
    "run": ("live: camera + microphone through the streaming pipeline", "avloc.stream.run.run_cli"),
    "devices": ("list cameras and microphones", "avloc.stream.capture.devices"),
    "view": ("browser viewer: serve the live overlay of a running pipeline over HTTP", "avloc.stream.clients.view"),
    "keys": ("make CURVE keypairs for an authenticated pipeline", "avloc.stream.wire.keys"),
    "worker": (
        "one pipeline process on its own (camera, mic, replay, inference, display; tap), for several hosts",
        "avloc.stream.run.worker_cli",
    ),
    "doctor": (
        "what this machine has (CUDA, GPU, TensorRT, ORT providers, faiss) and which backends run",
        "avloc.engines.doctor",
    ),
    "bench": (
        "benchmarks (JSON + plots)",
        {
            "engine": ("time engines alone per backend and batch size", "avloc.engines.bench"),
            "pipeline": (
                "per-stage latency of the streaming pipeline vs an eager baseline",
                "avloc.stream.tools.bench",
            ),
            "soak": ("long run with a fault schedule: memory, delivery, restarts", "avloc.stream.tools.soak"),
        },
    ),
}


def _build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avloc", description="Real-time audio-visual sound source localization.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Import only the module of the command being run (argv[0]), keeping --help cheap.
    wanted = [a for a in argv if not a.startswith("-")]
    for name, (help_text, target) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if isinstance(target, str):
            if wanted[:1] == [name]:
                _attach(p, target)
            continue
        group = p.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
        for sub_name, (sub_help, module) in target.items():
            sp = group.add_parser(sub_name, help=sub_help, description=sub_help)
            if wanted[:2] == [name, sub_name]:
                _attach(sp, module)
    return parser


def _attach(parser: argparse.ArgumentParser, module_name: str) -> None:
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    parser.set_defaults(_main=module.main)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = _build_parser(argv)  # imports the command's module, which may find the install broken
    except UserError as err:
        print(f"avloc: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._main(args) or 0)
    except UserError as err:
        print(f"avloc: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("avloc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

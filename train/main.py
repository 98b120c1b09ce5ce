"""``avloc train``: SSL-Align from a YAML config with ``key=value`` overrides (one process or torchrun)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from avloc.core.config import load_config

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="YAML config, e.g. configs/ssl_align.yaml")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (see docs/architecture.md)")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, logs, config)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.epochs=5 image.size=128 loss.use_sa=false")


def main(args: argparse.Namespace) -> int:
    from avloc.train.trainer import train

    config = load_config(args.config, args.overrides)
    best = train(config, args.data, args.out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # torchrun: report once
        print(best)
    return 0

"""``avloc train``: SSL-Align or ACL from a YAML config with ``key=value`` overrides (one process or torchrun)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from avloc.core.config import load_config
from avloc.core.errors import UserError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="YAML config, e.g. configs/ssl_align.yaml")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (see docs/architecture.md)")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, logs, config)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    acl = parser.add_argument_group("ACL (method: acl) — local weight files, never downloaded")
    acl.add_argument("--beats", type=Path, help="BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt")
    acl.add_argument("--clipseg", type=Path, help="local Hugging Face CIDAS/clipseg-rd64-refined folder")
    acl.add_argument("--acl-checkpoint", type=Path, help="released ACL weights to start from (optional)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. train.epochs=5 image.size=128 loss.use_sa=false",
    )


def main(args: argparse.Namespace) -> int:
    from avloc.train.trainer import train

    config = load_config(args.config, args.overrides)
    pretrained = {"beats": args.beats, "clipseg": args.clipseg, "acl_checkpoint": args.acl_checkpoint}
    if config.get("method") != "acl":
        given = [f"--{k.replace('_', '-')}" for k, v in pretrained.items() if v is not None]
        if given:
            method = config.get("method", "ssl_align")
            raise UserError(f"{' '.join(given)} only apply to method: acl ({args.config} trains {method})")
        pretrained = {}
    best = train(config, args.data, args.out, resume=args.resume, pretrained=pretrained)
    if os.environ.get("RANK", "0") == "0":  # torchrun: report once
        print(best)
    return 0

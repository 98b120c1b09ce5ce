"""``avloc import acl``: local BEATs + CLIPSeg weights (+ the released ACL tokenizer) -> an avloc checkpoint.

The checkpoint carries the paper's preprocessing (fbank 10 s, CLIP mean/std at 352 px) and loads strictly
with ``avloc.core.checkpoint.load_model``, so ``avloc export`` / ``avloc eval`` take it like a trained run::

    avloc import acl --beats BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt --clipseg clipseg-rd64-refined/ \
        --acl-checkpoint Param_best.pth --out acl.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from avloc.core.audio import FrontEndConfig
from avloc.core.checkpoint import ImageConfig, save_checkpoint
from avloc.core.config import from_dict, load_config, packaged_config
from avloc.core.errors import UserError

DEFAULT_CONFIG = packaged_config("acl")


def import_checkpoint(
    out: str | Path,
    beats: str | Path,
    clipseg: str | Path,
    acl_checkpoint: str | Path | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write ``out`` (atomically); ``config`` is an ACL run config (default: configs/acl.yaml)."""
    from avloc.core.acl.training import build_training_model, split_run_config

    if config is None:
        if not DEFAULT_CONFIG.is_file():
            raise UserError(f"{DEFAULT_CONFIG}: default ACL config not found; pass --config")
        config = load_config(DEFAULT_CONFIG)
    shared, model_section, _ = split_run_config(config)
    model, model_config = build_training_model(model_section, beats, clipseg, acl_checkpoint)
    extra = {"source": {"beats": str(beats), "clipseg": str(clipseg), "acl_checkpoint": str(acl_checkpoint)}}
    return save_checkpoint(
        out,
        model,
        method="acl",
        model_config=model_config,
        frontend=FrontEndConfig.from_dict(shared.get("frontend")),
        image=from_dict(ImageConfig, shared.get("image"), "image"),
        extra=extra,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--beats", type=Path, required=True, help="BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt")
    parser.add_argument("--clipseg", type=Path, required=True, help="local Hugging Face clipseg-rd64-refined folder")
    parser.add_argument(
        "--acl-checkpoint",
        type=Path,
        default=None,
        help="released ACL weights (audio_proj + masker_i), optional",
    )
    parser.add_argument("--config", type=Path, default=None, help="ACL run config (default configs/acl.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (e.g. acl.pt)")


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config is not None else None
    out = import_checkpoint(args.out, args.beats, args.clipseg, args.acl_checkpoint, config)
    print(f"ACL checkpoint written to {out}; next: avloc export --checkpoint {out} --out ENGINE_DIR")
    return 0

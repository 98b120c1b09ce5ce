"""Local pretrained weights for ACL: BEATs checkpoint, CLIPSeg (Hugging Face folder), released ACL checkpoint.

Nothing is ever downloaded: every loader takes a local path and a missing file is a one-line UserError
naming the option and the file it expected. All loads are strict.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from avloc.core.acl.beats import BEATsConfig
from avloc.core.acl.model import ACL, PROMPT_TEXT, ACLConfig
from avloc.core.checkpoint import load_state_dict_strict
from avloc.core.config import from_dict, to_dict
from avloc.core.errors import UserError

log = logging.getLogger(__name__)

BEATS_FILE = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
CLIPSEG_NAME = "CIDAS/clipseg-rd64-refined"
_CLIPSEG_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def read_beats(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``--beats PATH`` -> (official cfg dict, state dict)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--beats {path}: file not found; expected the BEATs checkpoint {BEATS_FILE}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a wrong file
        raise UserError(f"--beats {path}: not a readable BEATs checkpoint ({err.__class__.__name__})") from None
    if not isinstance(payload, dict) or "cfg" not in payload or "model" not in payload:
        raise UserError(f"--beats {path}: expected a BEATs checkpoint with 'cfg' and 'model' ({BEATS_FILE})")
    return dict(payload["cfg"]), dict(payload["model"])


def _check_clipseg_dir(directory: Path) -> None:
    if not (directory / "config.json").is_file():
        raise UserError(
            f"--clipseg {directory}: no config.json; expected a local Hugging Face copy of {CLIPSEG_NAME} "
            f"(config.json + {' or '.join(_CLIPSEG_WEIGHTS)})"
        )
    if not any((directory / name).is_file() for name in _CLIPSEG_WEIGHTS):
        raise UserError(f"--clipseg {directory}: no {' or '.join(_CLIPSEG_WEIGHTS)}; expected {CLIPSEG_NAME} weights")


def read_clipseg(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``--clipseg DIR`` -> (CLIPSegConfig dict, state dict of ``CLIPSegForImageSegmentation``)."""
    from transformers import CLIPSegForImageSegmentation

    directory = Path(directory)
    _check_clipseg_dir(directory)
    model, info = CLIPSegForImageSegmentation.from_pretrained(
        str(directory), local_files_only=True, output_loading_info=True
    )
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise UserError(f"--clipseg {directory}: weights miss {len(missing)} key(s), e.g. {', '.join(missing[:3])}")
    return model.config.to_dict(), model.state_dict()


def prompt_ids_from(directory: str | Path) -> tuple[int, ...] | None:
    """Tokenize the prompt with the folder's CLIP tokenizer, when it has one (vocab.json + merges.txt)."""
    directory = Path(directory)
    if not ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
        return None
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
    return tuple(int(i) for i in tokenizer(PROMPT_TEXT.replace("{}", ""))["input_ids"])


def pretrained_model_config(base: dict[str, Any], beats: str | Path, clipseg: str | Path) -> dict[str, Any]:
    """The run's model config with the architecture read from the local weights (stored in checkpoints)."""
    beats_cfg, _ = read_beats(beats)
    _check_clipseg_dir(Path(clipseg))
    from transformers import CLIPSegConfig

    clipseg_cfg = CLIPSegConfig.from_pretrained(str(clipseg), local_files_only=True).to_dict()
    config = dict(base)
    config["beats"] = BEATsConfig.from_official(beats_cfg).to_dict()
    config["clipseg"] = clipseg_cfg
    ids = prompt_ids_from(clipseg)
    if ids is not None:
        config["prompt_ids"] = list(ids)
        config["audio_position"] = len(ids) - 1  # just before EOS
    return to_dict(from_dict(ACLConfig, config, "model"))


def load_pretrained(model: ACL, beats: str | Path, clipseg: str | Path) -> ACL:
    """Load BEATs and CLIPSeg weights strictly into ``model`` (built from :func:`pretrained_model_config`)."""
    _, beats_state = read_beats(beats)
    load_state_dict_strict(model.audio_backbone, beats_state, f"--beats {beats}")
    _, clipseg_state = read_clipseg(clipseg)
    load_state_dict_strict(model.av_grounder, clipseg_state, f"--clipseg {clipseg}")
    return model


def released_acl_state_dict(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Key mapping of the released ACL checkpoint ``{"audio_proj": sd, "masker_i": {"w", "b"}}`` to ours."""
    if not isinstance(payload, dict) or set(payload) != {"audio_proj", "masker_i"}:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise UserError(f"ACL checkpoint: expected keys audio_proj and masker_i, found {keys}")
    mapped = {f"audio_proj.{k}": v for k, v in payload["audio_proj"].items()}
    mapped.update({f"masker_i.{k}": v for k, v in payload["masker_i"].items()})
    return mapped


def load_released_acl(model: ACL, path: str | Path) -> ACL:
    """Load the released tokenizer + (w, b) (``Param_best.pth``-style file) strictly."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--acl-checkpoint {path}: file not found; expected the released ACL checkpoint (.pth)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"--acl-checkpoint {path}: not readable ({err.__class__.__name__})") from None
    mapped = released_acl_state_dict(payload)
    for prefix, module in (("audio_proj.", model.audio_proj), ("masker_i.", model.masker_i)):
        part = {k[len(prefix) :]: v for k, v in mapped.items() if k.startswith(prefix)}
        load_state_dict_strict(module, part, f"--acl-checkpoint {path} ({prefix[:-1]})")
    return model

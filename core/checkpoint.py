"""Checkpoints that carry their own preprocessing, loaded strictly.

A checkpoint is a ``torch.save``d dict of tensors and plain containers (loadable with
``weights_only=True``): the method name, model config, audio front-end config and image config,
so live capture and export compute exactly what the model was trained on.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avloc.core.config import from_dict, to_dict
from avloc.core.errors import UserError

FORMAT = "avloc-checkpoint"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageConfig:
    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # How a live frame of another aspect becomes the square input (core.media.frame_fit), written into the
    # engine manifest as image.fit. crop: the centred square, undistorted as the square training scenes are;
    # chosen over stretch / letterbox on val + val_unseen 4:3 scenes and replayed clips (docs/engines.md).
    # Dataset evaluation (avloc eval) keeps the benchmarks' protocol: frames resized whole, boxes with them.
    fit: str = "crop"

    def __post_init__(self) -> None:
        from avloc.core.media import RESIZE_MODES  # why: cv2, only when an image config is built

        if self.fit not in RESIZE_MODES:
            raise UserError(f"image.fit {self.fit!r}: expected one of {', '.join(RESIZE_MODES)}")


@dataclass
class LoadedModel:
    model: nn.Module
    method: str
    model_config: dict[str, Any]
    frontend: Any  # avloc.core.audio.FrontEndConfig
    image: ImageConfig
    meta: dict[str, Any] = field(default_factory=dict)


def build_model(method: str, model_config: dict[str, Any]) -> nn.Module:
    """Construct a model by method name; an unknown name lists the known ones."""
    if method == "ssl_align":
        from avloc.core.ssl_align import SSLAlign, SSLAlignConfig

        return SSLAlign(from_dict(SSLAlignConfig, model_config, "model"))
    if method == "acl":
        from avloc.core.acl import build_acl_model

        return build_acl_model(model_config)
    raise UserError(f"unknown method {method!r}; expected one of ssl_align, acl")


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    method: str,
    model_config: dict[str, Any],
    frontend: Any,
    image: ImageConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "model_config": dict(model_config),
        "frontend": frontend.to_dict() if hasattr(frontend, "to_dict") else dict(frontend),
        "image": to_dict(image),
        "state_dict": model.state_dict(),
        **(extra or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(f"{path}: not a readable checkpoint ({err.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not an avloc checkpoint (missing format={FORMAT!r})")
    if payload.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format_version {payload.get('format_version')}, expected {FORMAT_VERSION}")
    return payload


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, Any], source: str) -> None:
    """Strict load with a one-line error listing missing/unexpected keys (never silently dropped)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        raise UserError(
            f"{source}: state dict does not match the model: "
            f"missing {len(missing)} key(s) [{show(missing)}], unexpected {len(unexpected)} key(s) [{show(unexpected)}]"
        )
    bad = [k for k, v in state_dict.items() if hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise UserError(f"{source}: shape mismatch for {', '.join(bad[:5])}")
    model.load_state_dict(state_dict, strict=True)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint into its model (strict) in eval mode on ``device``."""
    from avloc.core.audio import FrontEndConfig

    payload = read_checkpoint(path)
    model = build_model(payload["method"], payload["model_config"])
    load_state_dict_strict(model, payload["state_dict"], str(path))
    model.to(device).eval()
    meta = {k: v for k, v in payload.items() if k not in {"state_dict", "optimizer", "scheduler", "scaler"}}
    return LoadedModel(
        model=model,
        method=payload["method"],
        model_config=payload["model_config"],
        frontend=FrontEndConfig.from_dict(payload["frontend"]),
        image=from_dict(ImageConfig, payload["image"], "image"),
        meta=meta,
    )

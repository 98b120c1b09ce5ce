"""``avloc import ssl-align``: an official SSL-Align checkpoint (kaistmm/SSLalignment) -> an avloc checkpoint.

The official ``test.py`` loads ``checkpoint['model_state_dict']`` into the LVS-style ``AVENet``
(``model_lvs.py``) with ``strict=False``. That network is two ``models_lvs/base_models.py`` ResNet18s:

* ``imgnet``: ``conv1`` (3->64) -> ``bn1`` -> maxpool -> ``layer1..4``, **layer4 stride 1** (14x14 at 224 px);
* ``audnet``: the same class, entered through ``conv1_a`` (1->64), layer4 stride 1 too, then a global max pool;
* each ResNet also defines ``conv1_a`` / ``conv1`` / ``conv1_flow`` stems and an ImageNet ``fc`` that its
  modality never runs.

The heatmap is ``A = einsum(normalize(imgnet(x)), normalize(maxpool(audnet(spec))))``: the cosine map, which is
exactly :meth:`avloc.core.ssl_align.SSLAlign.cosine_map` with ``audio_layer4_stride=1``.

Every key is accounted for, never dropped silently:

* **mapped**: every key the avloc model needs comes from one named official key (a missing one is an error
  naming it; a shape mismatch names both shapes);
* **unused by the official forward**: the stems and ``fc`` the official model defines but never runs; listed;
* **extra** (keys ``AVENet`` does not define, which ``strict=False`` skips): a pair of Linear(512, 512) heads,
  one named for the image and one for the audio, becomes avloc's s_A projections; anything else is listed by
  name in the output and in the checkpoint's ``import`` metadata.

The checkpoint records the official preprocessing: the ``linear`` front-end (``scipy.signal.spectrogram``
nperseg 512 / noverlap 353, ``log(S + 1e-7) / 12``) over 3 s centred on the frame (the loader's 3.5-6.5 s of
a 10 s clip around its middle frame), and 224 px ImageNet mean/std images.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from avloc.core.audio import FrontEndConfig
from avloc.core.checkpoint import ImageConfig, load_state_dict_strict, save_checkpoint
from avloc.core.errors import UserError
from avloc.core.ssl_align import SSLAlign, SSLAlignConfig

log = logging.getLogger(__name__)

SOURCE = "kaistmm/SSLalignment"
# Official trunk name -> (avloc trunk, the stem its forward runs): models_lvs/base_models.py _forward_impl.
_TRUNKS = (("imgnet", "visual", "conv1"), ("audnet", "audio", "conv1_a"))
_STEMS = ("conv1", "conv1_a", "conv1_flow")
_UNUSED_HEAD = ("fc.weight", "fc.bias")  # ImageNet classifier the AVENet forward never reaches
# Name hints of an s_A head among the keys AVENet does not define.
_VISUAL_HINT = re.compile(r"(img|image|vis|visual|video|frame)", re.IGNORECASE)
_AUDIO_HINT = re.compile(r"(aud|audio|sound|spec)", re.IGNORECASE)

OFFICIAL_FRONTEND = FrontEndConfig(kind="linear", sample_rate=16000, window_seconds=3.0, anchor="center")
OFFICIAL_IMAGE = ImageConfig(size=224)  # ImageNet mean / std (datasets_lvs.py _init_transform)


def official_config(projection: bool = False) -> SSLAlignConfig:
    """The avloc variant with the official structure: width 64, layer4 stride 1 in both trunks."""
    return SSLAlignConfig(width=64, visual_layer4_stride=1, audio_layer4_stride=1, projection=projection)


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``model_state_dict`` of an official ``.pth.tar`` (or a bare state dict), ``module.`` prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: SSL-Align checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise UserError(
            f"{path}: not loadable as tensors only ({first[:200]}); if it holds other Python objects, re-save "
            "just the weights: torch.save({'model_state_dict': torch.load(F, weights_only=False)"
            "['model_state_dict']}, OUT)"
        ) from None
    if isinstance(payload, dict) and "model_state_dict" in payload:
        state = payload["model_state_dict"]
    else:
        state = payload
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise UserError(f"{path}: expected a dict with 'model_state_dict' (official test.py format), found {keys}")
    # DataParallel / DDP saves carry 'module.'; the official loader adds it back itself.
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def official_key(avloc_key: str) -> str:
    """The official key an avloc SSL-Align key is read from.

    ``visual.conv1.weight`` -> ``imgnet.conv1.weight``, ``audio.conv1.weight`` -> ``audnet.conv1_a.weight``,
    ``audio.layer4.0.bn1.bias`` -> ``audnet.layer4.0.bn1.bias``.
    """
    trunk, _, rest = avloc_key.partition(".")
    for official, ours, stem in _TRUNKS:
        if trunk == ours:
            if rest.startswith("conv1."):
                rest = stem + rest[len("conv1") :]
            return f"{official}.{rest}"
    raise KeyError(avloc_key)  # the projection heads: handled by _find_heads


def _unused_official_keys() -> set[str]:
    """Keys AVENet defines whose parameters its forward never runs."""
    unused = set()
    for official, _, stem in _TRUNKS:
        unused |= {f"{official}.{s}.weight" for s in _STEMS if s != stem}
        unused |= {f"{official}.{k}" for k in _UNUSED_HEAD}
    return unused


def _find_heads(extra: dict[str, torch.Tensor], dim: int) -> dict[str, str] | None:
    """One Linear(dim, dim) named for the image and one for the audio -> {visual_proj: name, audio_proj: name}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in extra.items():
        name, _, leaf = key.rpartition(".")
        modules.setdefault(name, {})[leaf] = value
    linear = [
        name
        for name, params in modules.items()
        if set(params) == {"weight", "bias"}
        and tuple(params["weight"].shape) == (dim, dim)
        and tuple(params["bias"].shape) == (dim,)
    ]
    visual = [n for n in linear if _VISUAL_HINT.search(n) and not _AUDIO_HINT.search(n)]
    audio = [n for n in linear if _AUDIO_HINT.search(n) and not _VISUAL_HINT.search(n)]
    if len(visual) == 1 and len(audio) == 1:
        return {"visual_proj": visual[0], "audio_proj": audio[0]}
    return None


def convert_state_dict(state: dict[str, torch.Tensor], source: str) -> tuple[SSLAlign, dict[str, Any]]:
    """Official state dict -> (avloc model loaded strictly, import report). See the module doc for the rules."""
    unused_defined = _unused_official_keys()
    # Key lists and shapes from a model on the meta device: no memory, no initialisation cost.
    with torch.device("meta"):
        trunks_only = SSLAlign(official_config(projection=False)).state_dict()
    trunk_keys = {official_key(k): k for k in trunks_only}
    extra = {k: v for k, v in state.items() if k not in trunk_keys and k not in unused_defined}
    heads = _find_heads(extra, official_config().embed_dim)
    config = official_config(projection=heads is not None)
    with torch.device("meta"):
        own = SSLAlign(config).state_dict()
    mapping = dict(trunk_keys)
    if heads is not None:
        for ours, theirs in heads.items():
            mapping[f"{theirs}.weight"] = f"{ours}.weight"
            mapping[f"{theirs}.bias"] = f"{ours}.bias"

    missing = sorted(k for k in mapping if k not in state)
    if missing:
        raise UserError(
            f"{source}: official key {missing[0]} is missing"
            + (f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}...)" if len(missing) > 1 else "")
            + "; not an SSL-Align AVENet checkpoint"
        )
    converted: dict[str, torch.Tensor] = {}
    for theirs, ours in mapping.items():
        value = state[theirs]
        if tuple(value.shape) != tuple(own[ours].shape):
            raise UserError(
                f"{source}: {theirs} has shape {tuple(value.shape)}, expected {tuple(own[ours].shape)} (for {ours})"
            )
        converted[ours] = value.to(own[ours].dtype)
    model = SSLAlign(config)
    load_state_dict_strict(model, converted, source)
    model.eval()
    report = {
        "source": SOURCE,
        "mapped_keys": len(mapping),
        "unused_official_keys": sorted(k for k in state if k in unused_defined),
        "s_A_heads": heads,
        "unmapped_extra_keys": sorted(k for k in extra if k not in mapping),
    }
    return model, report


def import_checkpoint(src: str | Path, out: str | Path) -> tuple[Path, dict[str, Any]]:
    """Read an official checkpoint, convert it and write an avloc checkpoint to ``out``; returns (out, report)."""
    src = Path(src)
    model, report = convert_state_dict(read_official_state_dict(src), str(src))
    digest = hashlib.sha256()
    with open(src, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    report = {"file": src.name, "sha256": digest.hexdigest(), **report}
    written = save_checkpoint(
        out,
        model,
        method="ssl_align",
        model_config=asdict(model.config),
        frontend=OFFICIAL_FRONTEND,
        image=OFFICIAL_IMAGE,
        extra={
            "import": report,
            # What the official loader does and avloc does not reproduce bit for bit (see docs/weights.md).
            "official_preprocessing": {
                "image": "torchvision Resize((224, 224), BICUBIC) on the float tensor, ImageNet mean/std",
                "audio": "first 10 s (tiled if shorter), samples 3.5-6.5 s, clipped to [-1, 1], linear front-end",
            },
        },
    )
    return written, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="official checkpoint, e.g. ours_sup_previs.pth.tar")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write, e.g. runs/ssl_official/best.pt")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def main(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise UserError(f"{args.out}: already exists; pass --force to replace it")
    out, report = import_checkpoint(args.file, args.out)
    print(f"{report['file']}: {report['mapped_keys']} keys mapped into avloc SSL-Align (official structure)")
    print(
        f"  unused by the official forward ({len(report['unused_official_keys'])}): "
        f"{', '.join(report['unused_official_keys']) or '-'}"
    )
    heads = report["s_A_heads"]
    print(
        "  s_A heads: "
        + (
            f"visual_proj <- {heads['visual_proj']}, audio_proj <- {heads['audio_proj']}"
            if heads
            else "none in the file (s_A = cosine of the max-pooled embeddings)"
        )
    )
    unmapped = report["unmapped_extra_keys"]
    print(f"  extra keys not used ({len(unmapped)}): {', '.join(unmapped) or '-'}")
    print(f"checkpoint written to {out}; next: avloc export --checkpoint {out} --out ENGINE_DIR")
    return 0

"""Score the zero-shot label-space map (core/labelspace.py) on scene splits, with the floors beside it.

    .venv/bin/python scripts/labelspace_eval.py --data /work/data/os --splits val,val_unseen --out ls_val.json

Per split and per variant: adaptive cIoU@50 and AUC with bootstrap 95 % intervals over scenes, the audio-swap
rule (:func:`avloc.core.metrics.swap_hits`, peak in the heard object's box and no other) with its interval,
and the swap score of the variant's audio-blind map (mean of the scene's K maps,
:func:`avloc.core.metrics.audio_blind_swap_hits`). Floors on the same scenes: a centre prior and audio-blind
objectness (L2 norm over channels of the same EfficientNet-Lite0 head features). Breakdowns by
``<split>_<group>.txt`` (heard / unheard, new_instance / unseen_category) where the dataset has them.

Variants (``--variants``, all by default): ``<vision>-s<stride>`` with vision ``softmax`` / ``logits_mean``
(:class:`avloc.core.labelspace.LabelSpaceMap`) and EfficientNet-Lite0 at output stride 32 (8x8 at 256 px) or
16 (the last stride-2 stage at stride 1, 16x16). Features (ImageNet logit maps, YAMNet class scores) are
cached under ``--cache``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SIZE = 256


def lite0(output_stride: int) -> torch.nn.Module:
    from avloc.core.ogl import load_effnet_lite0

    net = load_effnet_lite0()
    if output_stride == 16:  # the first block of the last stride-2 stage (112 -> 192 channels) at stride 1
        for block in net._blocks:
            if block._depthwise_conv.stride == (2, 2) and block._depthwise_conv.in_channels == 6 * 112:
                block._depthwise_conv.stride = (1, 1)
    return net


def extract(data: Path, split: str, cache: Path, threads: int) -> dict[str, Any]:
    """Per scene: ImageNet logit maps at strides 32 and 16, objectness maps, YAMNet scores of each object's
    recording (the sounding one first as in the annotations' object order)."""
    path = cache / f"{data.name}-{split}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=True) as z:
            result = {k: z[k] for k in z.files}
        if "logits32_512" not in result:  # 512 px input at stride 32: 16x16 with the network's own receptive field
            from avloc.core.labelspace import imagenet_logit_map
            from avloc.core.media import read_image
            from avloc.train.encoders import preprocess_lite0

            net, chunks = lite0(32), []
            with torch.no_grad():
                for start in range(0, len(result["ids"]), 8):
                    chunk = result["ids"][start : start + 8]
                    x = preprocess_lite0([read_image(data / "frames" / f"{sid}.jpg") for sid in chunk], 2 * SIZE)
                    chunks.append(imagenet_logit_map(net, x).half().numpy())
            result["logits32_512"] = np.concatenate(chunks)
            np.savez(path, **result)
        return result
    from avloc.core.audio import read_audio_file
    from avloc.core.datasets import load_vggss_json
    from avloc.core.labelspace import imagenet_logit_map
    from avloc.core.media import read_image
    from avloc.train.encoders import YAMNetClassScores, preprocess_lite0

    annotations = load_vggss_json(data / f"{split}.json")
    ids = sorted(annotations)
    yam = YAMNetClassScores(threads=threads)
    nets = {32: lite0(32), 16: lite0(16)}
    out: dict[str, list] = {"logits32": [], "logits16": [], "obj32": [], "obj16": [], "audio": [], "n_audio": []}
    with torch.no_grad():
        for start in range(0, len(ids), 16):
            chunk = ids[start : start + 16]
            x = preprocess_lite0([read_image(data / "frames" / f"{sid}.jpg") for sid in chunk], SIZE)
            for s, net in nets.items():
                out[f"logits{s}"].append(imagenet_logit_map(net, x).half().numpy())
                out[f"obj{s}"].append(net.feature_map(x).norm(dim=1).numpy())
            for sid in chunk:
                objs = [o for o in annotations[sid].objects if o.audio] or []
                paths = [o.audio for o in objs] if objs else [f"audio/{sid}.wav"]
                waves = [read_audio_file(data / p)[0] for p in paths]
                out["audio"].extend(yam(waves))
                out["n_audio"].append(len(waves))
    result = {
        "ids": np.array(ids),
        **{k: np.concatenate(v) for k, v in out.items() if k.startswith(("logits", "obj"))},
        "audio": np.stack(out["audio"]),
        "n_audio": np.array(out["n_audio"]),
    }
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **result)
    return result


def centre_prior(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-(((xx + 0.5) / size - 0.5) ** 2 + ((yy + 0.5) / size - 0.5) ** 2) / (2 * 0.2**2))


VARIANTS = (
    "softmax-s32",
    "softmax-s16",
    "softmax-s32_512",
    "logits_mean-s32",
    "logits_mean-s16",
    "logits_mean-s32_512",
)


def evaluate(
    data: Path, split: str, cache: Path, threads: int, variants: list[str], bridge: Path | None = None
) -> dict[str, Any]:
    from avloc.core.datasets import load_vggss_json
    from avloc.core.labelspace import LabelSpaceMap, load_bridge
    from avloc.train.evaluate import scene_scores as score
    from avloc.train.evaluate import scene_scores_line

    t0 = time.perf_counter()
    feats = extract(data, split, cache, threads)
    annotations = load_vggss_json(data / f"{split}.json")
    ids = [str(s) for s in feats["ids"]]
    offsets = np.concatenate([[0], np.cumsum(feats["n_audio"])])
    groups = {}
    for group in ("heard", "unheard", "new_instance", "unseen_category"):
        path = data / f"{split}_{group}.txt"
        if path.is_file():
            groups[group] = set(path.read_text().split())
    rows: dict[str, Any] = {}
    audio = torch.from_numpy(feats["audio"])
    for variant in variants:
        vision, stride = variant.rsplit("-s", 1)
        module = LabelSpaceMap(load_bridge(bridge) if bridge else None, vision=vision).eval()
        logits = torch.from_numpy(feats[f"logits{stride}"].astype(np.float32))  # stride "32_512": 512 px input
        maps, swap = {}, {}
        with torch.no_grad():
            for i, sid in enumerate(ids):
                k = int(feats["n_audio"][i])
                m = module(logits[i : i + 1].expand(k, -1, -1, -1), audio[offsets[i] : offsets[i + 1]]).numpy()
                maps[sid] = m[0]  # the sounding object's recording comes first
                swap[sid] = list(m)
        rows[variant] = score(maps, swap, annotations, groups)
    size = 16
    centre = centre_prior(size)
    rows["centre prior"] = score({k: centre for k in ids}, {k: [centre] for k in ids}, annotations, groups)
    for s in (32, 16):
        obj = {sid: feats[f"obj{s}"][i] for i, sid in enumerate(ids)}
        rows[f"objectness-s{s} (audio-blind)"] = score(obj, {k: [obj[k]] for k in ids}, annotations, groups)
    for name, row in rows.items():
        print(scene_scores_line(f"{data.name}/{split} {name:26s}", row, groups), flush=True)
    return {"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--splits", default="val,val_unseen")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/avloc-labelspace-cache"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bridge", type=Path, default=None, help="another bridge .npz (default: the committed one)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    result = {
        str(args.data): {
            s: evaluate(args.data, s, args.cache, args.threads, variants, args.bridge) for s in args.splits.split(",")
        }
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

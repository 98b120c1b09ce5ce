"""Training a ``backbone: pretrained`` SSL-Align (frozen EfficientNet-Lite0 + YAMNet, learned heads) on 2 cores.

The frozen trunks cost ~99 % of a step and never change, so their outputs are computed once per sample and
cached (``RUN/features/<split>.npz``); training and validation then run only the heads. Trunk outputs are
computed with onnxruntime from the trunks exported to ONNX in memory (MobileNet-style depthwise convolutions
run ~3x faster there than in torch on a CPU); the checkpoint holds the whole torch model, trunks included, so
``avloc eval`` / ``avloc export`` run the same network end to end.

What is cached and which augmentation that allows:
- image: the evaluation view (``Resize(size)``, no crop) of each frame; the image augmentation acts on the cached
  map: a random horizontal flip and (``train.feature_crop``) a random resized crop of the map, plus
  (``train.feature_dropout``) channel dropout on both heads' inputs, which keep the heads from memorizing the
  training assets (docs/results.md); the scenes themselves are the composition augmentation: every scene places
  the stamps anew, on a new background, at a new scale, with colour jitter;
- audio: ``audio_views`` windows per clip: the clean window of the frame (what evaluation uses) and augmented
  ones (random window start, gain, mixed with another training clip at -20..-6 dB, white noise at 10-40 dB
  SNR), one drawn per step.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from avloc.core.errors import UserError
from avloc.core.pretrained import YAMNET_DIM

log = logging.getLogger(__name__)

SPLITS_SCORED = ("val", "val_unseen")  # selection splits, when the data has them (never a test split)
EXTRACT_BATCH = 16
# The augmented audio views are drawn with a fixed seed: the cached features are a function of the data and the
# preprocessing only, so runs that differ in train.seed (the heads' initialisation and batches) share them.
FEATURE_SEED = 0


# ---------------------------------------------------------------------------------------------- augmentation


def augment_wave(
    wave: np.ndarray, other: np.ndarray, num_samples: int, rng: np.random.Generator, pad: str = "tile"
) -> np.ndarray:
    """An augmented window of ``wave``: random start, gain -30..+6 dB, ``other`` (another clip) mixed in at
    -20..-6 dB relative, white noise at 10..40 dB SNR. Float32, clipped to [-1, 1]."""
    from avloc.train.augment import shifted_window

    x = shifted_window(wave, num_samples, rng, pad).astype(np.float64)
    rms = float(np.sqrt(np.mean(x**2))) + 1e-8
    if rng.random() < 0.5:
        y = shifted_window(other, num_samples, rng, pad).astype(np.float64)
        y *= rms / (float(np.sqrt(np.mean(y**2))) + 1e-8) * 10 ** (rng.uniform(-20, -6) / 20)
        x = x + y
    if rng.random() < 0.5:
        x = x + rng.standard_normal(num_samples) * rms * 10 ** (-rng.uniform(10, 40) / 20)
    x *= 10 ** (rng.uniform(-30, 6) / 20)
    return np.clip(x, -1, 1).astype(np.float32)


def augment_maps(vis: Tensor, rng: np.random.Generator, crop: float = 1.0) -> Tensor:
    """Cached visual maps [B,C,h,w] -> the same maps seen through a random horizontal flip and, with ``crop`` < 1,
    a random resized crop (side scale in [crop, 1], placed anywhere inside the map, resampled bilinearly to h x w):
    the zoom / translation a view of the picture would give, on features computed once (the trunk is not re-run,
    so it is the features' crop, not the crop's features)."""
    b = vis.shape[0]
    flip = np.where(rng.random(b) < 0.5, -1.0, 1.0)
    if crop >= 1.0:
        return torch.where(torch.from_numpy(flip < 0)[:, None, None, None], vis.flip(-1), vis)
    scale = rng.uniform(crop, 1.0, size=b)
    tx, ty = (rng.uniform(-1.0, 1.0, size=(2, b)) * (1.0 - scale)).astype(np.float64)
    theta = np.zeros((b, 2, 3))
    theta[:, 0, 0], theta[:, 0, 2] = scale * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = scale, ty
    grid = F.affine_grid(torch.from_numpy(theta).float(), list(vis.shape), align_corners=False)
    return F.grid_sample(vis, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------- trunk features


class TrunkRunner:
    """The model's frozen trunks as onnxruntime sessions (exported from the torch modules themselves)."""

    def __init__(self, model: Any, image_size: int, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.sessions = {}
        for name, module, example in (
            ("visual", model.visual.trunk, torch.zeros(1, 3, image_size, image_size)),
            ("audio", _EmbedAndScore(model.audio.trunk), torch.zeros(5, 1, 96, 64)),
        ):
            buf = io.BytesIO()
            torch.onnx.export(
                module.eval(),
                (example,),
                buf,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
            self.sessions[name] = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    def visual(self, images: Tensor) -> np.ndarray:
        return self.sessions["visual"].run(None, {"x": images.numpy().astype(np.float32)})[0]

    def audio(self, specs: Tensor) -> np.ndarray:
        """[B,1,64,T] -> [B,1024 + 521]: YAMNet's embedding (max over the window's patches) and its AudioSet
        class scores (mean over them), as PretrainedAudio computes them."""
        from avloc.core.pretrained import pool_patches, yamnet_patches

        patches, _ = yamnet_patches(specs)
        out = self.sessions["audio"].run(None, {"x": patches.numpy().astype(np.float32)})[0]
        emb, scores = pool_patches(torch.from_numpy(out), specs.shape[0])
        return torch.cat([emb, scores], dim=1).numpy()


class _EmbedAndScore(torch.nn.Module):
    def __init__(self, trunk: torch.nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, patches: Tensor) -> Tensor:
        return self.trunk.embed_and_score(patches)


@dataclass
class SplitFeatures:
    ids: list[str]
    visual: np.ndarray  # [N, 1280, h, w] float16
    audio: np.ndarray  # [V, N, 1024 + 521] float32: YAMNet embedding + class scores (V views; 0 = clean)
    swap: dict[str, np.ndarray]  # scene id -> [K, 1024 + 521] of its recorded objects (val splits)


def extract_split(
    runner: TrunkRunner,
    data: Path,
    split: str,
    frontend_cfg: Any,
    image_cfg: Any,
    audio_views: int,
    seed: int,
    limit: int | None = None,
    with_swap: bool = False,
) -> SplitFeatures:
    from avloc.core.audio import FrontEnd, frame_window, load_audio
    from avloc.core.datasets import AVDataset, load_vggss_json
    from avloc.train.augment import ImageViews, chw_tensor
    from avloc.train.evaluate import swap_scenes

    dataset = AVDataset(data, split, frontend_cfg)
    ids = dataset.ids[:limit] if limit else list(dataset.ids)
    views = ImageViews(image_cfg)
    frontend = FrontEnd(frontend_cfg).eval()
    rng = np.random.default_rng([seed, 11])
    vis, aud = [], []
    waves = [dataset.audio(i) for i in ids]
    t0 = time.perf_counter()
    for start in range(0, len(ids), EXTRACT_BATCH):
        chunk = ids[start : start + EXTRACT_BATCH]
        images = torch.stack([views.evaluation(chw_tensor(dataset.image(i))) for i in chunk])
        vis.append(runner.visual(images).astype(np.float16))
        rows = []
        for v in range(audio_views):
            windows = []
            for k in range(start, start + len(chunk)):
                if v == 0:
                    windows.append(frame_window(waves[k], frontend_cfg))
                else:
                    other = waves[int(rng.integers(len(waves)))]
                    windows.append(augment_wave(waves[k], other, frontend_cfg.num_samples, rng, frontend_cfg.pad_mode))
            with torch.no_grad():
                rows.append(runner.audio(frontend(torch.from_numpy(np.stack(windows)))))
        aud.append(np.stack(rows))
        if start // EXTRACT_BATCH % 20 == 0:
            log.info("%s: trunk features %d/%d (%.1f s)", split, start + len(chunk), len(ids), time.perf_counter() - t0)
    swap: dict[str, np.ndarray] = {}
    if with_swap and (data / f"{split}.json").is_file():
        annotations = load_vggss_json(data / f"{split}.json")
        for sid, objects in swap_scenes(annotations, ids).items():
            windows = np.stack(
                [frame_window(load_audio(data / o.audio, frontend_cfg.sample_rate), frontend_cfg) for o in objects]
            )
            with torch.no_grad():
                swap[sid] = runner.audio(frontend(torch.from_numpy(windows)))
    return SplitFeatures(ids, np.concatenate(vis), np.concatenate(aud, axis=1), swap)


def cached_split(path: Path, make: Any) -> SplitFeatures:
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        swap_ids = [str(s) for s in z["swap_ids"]]
        offsets = z["swap_offsets"]
        swap = {sid: z["swap_rows"][offsets[k] : offsets[k + 1]] for k, sid in enumerate(swap_ids)}
        return SplitFeatures([str(i) for i in z["ids"]], z["visual"], z["audio"], swap)
    feats = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    swap_ids = list(feats.swap)
    rows = [feats.swap[s] for s in swap_ids]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        ids=np.array(feats.ids),
        visual=feats.visual,
        audio=feats.audio,
        swap_ids=np.array(swap_ids, dtype=str),
        swap_offsets=offsets,
        swap_rows=np.concatenate(rows) if rows else np.zeros((0, feats.audio.shape[-1]), np.float32),
    )
    tmp.replace(path)
    return feats


def feature_dir(cfg: Any, data: Path, out: Path) -> Path:
    """Where the trunk features of this data + preprocessing live: DATA/.cache/frozen-<key> (shared by runs that
    differ only in their heads or schedule), else RUN/features when DATA is not writable."""
    import hashlib

    key = {
        "frontend": cfg.frontend.to_dict(),
        "image": [cfg.image.size, list(cfg.image.mean), list(cfg.image.std)],
        "stride": cfg.model.visual_layer4_stride,
        "views": cfg.train.audio_views,
        "limit": cfg.train.max_train_samples,
        "audio": "embedding+scores",  # [.., 1024 + 521] rows (the label-space term needs the class scores)
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = data / ".cache" / f"frozen-{digest}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:
        return out / "features"


# ---------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def split_maps(
    model: Any, feats: SplitFeatures, image_size: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Heads on cached trunk features: {id: heatmap of its own audio}, {scene id: [K, S, S] swap heatmaps}."""
    model.eval()
    maps: dict[str, np.ndarray] = {}
    swap: dict[str, np.ndarray] = {}
    index = {sid: k for k, sid in enumerate(feats.ids)}

    def upsample(s: Tensor) -> np.ndarray:
        return F.interpolate(s.unsqueeze(1), size=(image_size, image_size), mode="bilinear", align_corners=False)[
            :, 0
        ].numpy()

    vmaps = []
    for start in range(0, len(feats.ids), 64):
        # the model's own encode_image / encode_audio / cosine_map after the trunks (label-space term included)
        vmap = model.image_from_features(torch.from_numpy(feats.visual[start : start + 64].astype(np.float32)))
        a = model.audio_from_features(torch.from_numpy(feats.audio[0, start : start + 64]))
        for sid, m in zip(feats.ids[start : start + 64], upsample(model.cosine_map(vmap, a))):
            maps[sid] = m
        vmaps.append(vmap)
    if feats.swap:
        all_vmaps = torch.cat(vmaps)
        for sid, rows in feats.swap.items():
            vmap = all_vmaps[index[sid]].unsqueeze(0).expand(len(rows), -1, -1, -1)
            swap[sid] = upsample(model.cosine_map(vmap, model.audio_from_features(torch.from_numpy(rows))))
    return maps, swap


def score_split(model: Any, feats: SplitFeatures, data: Path, split: str, image_size: int) -> dict[str, Any]:
    """Adaptive cIoU@50 / AUC and the audio-swap rule on cached trunk features (heads only), as ``avloc eval``
    computes them on the full model."""
    from avloc.core.datasets import load_vggss_json
    from avloc.core.metrics import audio_blind_swap_hits, evaluate_maps, swap_hits

    annotations = load_vggss_json(data / f"{split}.json")
    maps, swap = split_maps(model, feats, image_size)
    scored = {k: maps[k] for k in maps if k in annotations}
    out = evaluate_maps(scored, {k: annotations[k] for k in scored}, binarize="adaptive")
    result = {"ciou_ap50": out["ciou_ap50"], "auc": out["auc"]}
    hits = blind = pairs = 0
    for sid, scene_maps in swap.items():
        boxes = [o.bbox for o in annotations[sid].objects if o.audio]
        hits += sum(swap_hits(scene_maps, boxes))
        blind += sum(audio_blind_swap_hits(scene_maps, boxes))
        pairs += len(boxes)
    if pairs:
        result.update(audio_swap_acc=hits / pairs, audio_swap_blind_acc=blind / pairs)
    return result


# ---------------------------------------------------------------------------------------------- training


def train_frozen(cfg: Any, data: Path, out: Path, model: Any, model_config: dict[str, Any], method: str) -> Path:
    """Cache trunk features, train the heads within the budget, keep the best val epoch as OUT/best.pt."""
    from avloc.core.checkpoint import save_checkpoint
    from avloc.core.config import to_dict
    from avloc.core.losses import SSLAlignLoss
    from avloc.train.trainer import lr_factor

    t = cfg.train
    if tuple(cfg.loss.positives) != ("orig",):
        raise UserError(f"config loss.positives {list(cfg.loss.positives)}: backbone pretrained trains on [orig]")
    threads = t.threads or torch.get_num_threads()
    run_start = time.perf_counter()
    runners: list[TrunkRunner] = []

    def runner() -> TrunkRunner:  # exported only when some features are not cached yet
        if not runners:
            runners.append(TrunkRunner(model, cfg.image.size, threads))
        return runners[0]

    feat_dir = feature_dir(cfg, data, out)
    common = (cfg.frontend, cfg.image)
    train_feats = cached_split(
        feat_dir / "train.npz",
        lambda: extract_split(runner(), data, "train", *common, t.audio_views, FEATURE_SEED, t.max_train_samples),
    )
    vals = {
        split: cached_split(
            feat_dir / f"{split}.npz",
            lambda split=split: extract_split(runner(), data, split, *common, 1, FEATURE_SEED, None, with_swap=True),
        )
        for split in SPLITS_SCORED
        if (data / f"{split}.txt").is_file() and (data / f"{split}.json").is_file()
    }
    extract_s = time.perf_counter() - run_start
    log.info("trunk features: %d train, %s val in %.1f min", len(train_feats.ids), list(vals), extract_s / 60)
    if not vals:
        # Said once, up front: without a val split nothing is selected, so best.pt is simply the last epoch.
        log.warning(
            "%s has no %s split (SPLIT.txt + SPLIT.json): no epoch selection, best.pt will be the last epoch",
            data,
            " / ".join(SPLITS_SCORED),
        )

    torch.manual_seed(t.seed)
    loss_fn = SSLAlignLoss(cfg.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    n = len(train_feats.ids)
    steps_per_epoch = max(n // t.batch_size, 1)
    budget_s = t.budget_minutes * 60.0 if t.budget_minutes is not None else math.inf
    rng = np.random.default_rng(t.seed)
    best, best_path, metrics_path = None, out / "best.pt", out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    step, epoch_seconds = 0, None
    total_steps = t.epochs * steps_per_epoch
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    for epoch in range(t.epochs):
        elapsed = time.perf_counter() - run_start
        if epoch_seconds is not None and elapsed + epoch_seconds > budget_s:
            break
        if epoch_seconds is not None and t.budget_minutes is not None:  # the cosine ends where the budget does
            fitting = epoch + int((budget_s - elapsed) / epoch_seconds)
            total_steps = min(t.epochs, fitting) * steps_per_epoch
        e0 = time.perf_counter()
        model.train()
        order = rng.permutation(n)
        losses = []
        for b in range(steps_per_epoch):
            idx = np.sort(order[b * t.batch_size : (b + 1) * t.batch_size])
            vis = torch.from_numpy(train_feats.visual[idx].astype(np.float32))
            if t.train_pool > 1:  # a linear head commutes with average pooling: same map, 4x fewer cells
                vis = F.avg_pool2d(vis, t.train_pool)
            vis = augment_maps(vis, rng, t.feature_crop)
            view = rng.integers(train_feats.audio.shape[0], size=len(idx))
            aud = torch.from_numpy(train_feats.audio[view, idx, :YAMNET_DIM])
            if t.feature_dropout > 0:  # whole visual channels (the same at every place), audio dimensions
                vis = F.dropout2d(vis, t.feature_dropout)
                aud = F.dropout(aud, t.feature_dropout)
            vmap, a = model.visual.head(vis), model.audio.head(aud)
            loss, _ = loss_fn(model, {"orig": vmap}, {"orig": a})
            for group in optimizer.param_groups:
                group["lr"] = cfg.optim.lr * lr_factor(
                    step, total_steps, warmup, cfg.optim.schedule, cfg.optim.min_lr_ratio
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
        record: dict[str, Any] = {"epoch": epoch, "step": step, "train/loss": float(np.mean(losses))}
        for split, feats in vals.items():
            for k, v in score_split(model, feats, data, split, cfg.image.size).items():
                record[f"{split}/{k}"] = v
        epoch_seconds = time.perf_counter() - e0
        record["epoch_seconds"] = epoch_seconds
        record["elapsed_s"] = time.perf_counter() - run_start
        keys = [f"{s}/audio_swap_acc" if t.select == "audio_swap" else f"{s}/ciou_ap50" for s in vals]
        score = float(np.mean([record[k] for k in keys if k in record])) if vals else float(epoch)
        if best is None or score > best:
            best = score
            save_checkpoint(
                best_path,
                model,
                method=method,
                model_config=model_config,
                frontend=cfg.frontend,
                image=cfg.image,
                extra={
                    "epoch": epoch + 1,
                    "step": step,
                    "config": to_dict(cfg),
                    "val": {k: v for k, v in record.items() if "/" in k},
                    "selected_by": f"val {t.select}" if vals else "last epoch (no val split)",
                },
            )
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.info(
            "epoch %d: loss %.4f, %s (%.1f s)",
            epoch + 1,
            record["train/loss"],
            ", ".join(f"{k} {v:.3f}" for k, v in record.items() if "/" in k and k != "train/loss"),
            epoch_seconds,
        )
    if best is None:
        raise UserError(f"{out}: no epoch fitted in train.budget_minutes={t.budget_minutes}")
    return best_path


LABELSPACE_WEIGHTS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 1000.0)  # 1000: the label-space map alone, in effect


def with_objectness(model: Any) -> Any:
    """A ``backbone: pretrained`` model with the objectness term switched on (weight as configured, else the
    config default), its other weights as they are: how a checkpoint trained without the term is scored with it
    (the term has no learned part, so the heads are unchanged)."""
    import dataclasses

    from avloc.core.ssl_align import SSLAlign

    if model.config.objectness:
        return model
    if model.config.backbone != "pretrained":
        raise UserError("the objectness term needs a backbone: pretrained model")
    new = SSLAlign(dataclasses.replace(model.config, objectness=True))
    # the term's only state is its configured weight; every other key must match exactly (strict load)
    state = {**model.state_dict(), "objectness_weight": new.objectness_weight}
    try:
        new.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"objectness term: state dict mismatch ({str(err).splitlines()[0]})") from None
    return new.eval()


@torch.no_grad()
def labelspace_grid(
    model: Any,
    vals: dict[str, SplitFeatures],
    data: Path,
    image_size: int,
    weights: tuple[float, ...] = LABELSPACE_WEIGHTS,
    objectness_weights: tuple[float, ...] = (),
) -> list[dict[str, Any]]:
    """The selection splits scored at each label-space weight (and, with ``objectness_weights``, each pair of
    label-space and objectness weights; the model must then have the objectness term), the trained heads fixed:
    how ``model.labelspace_weight`` / ``model.objectness_weight`` are chosen (scripts/open_set_eval.py
    --labelspace-weights / --objectness-weights, docs/results.md)."""
    if model.labelspace is None:  # the grid moves model.labelspace_weight, which only that term has
        raise UserError("label-space weights: the model has no label-space term (model.labelspace=false)")
    if objectness_weights and not model.config.objectness:
        raise UserError("objectness weights: the model has no objectness term (train.frozen.with_objectness)")
    keep = float(model.labelspace_weight)
    keep_obj = float(model.objectness_weight) if objectness_weights else None
    rows = []
    for w in weights:
        for wo in objectness_weights or (None,):
            model.labelspace_weight.fill_(w)
            row: dict[str, Any] = {"weight": w}
            if wo is not None:
                model.objectness_weight.fill_(wo)
                row["objectness_weight"] = wo
            for split, feats in vals.items():
                for k, v in score_split(model, feats, data, split, image_size).items():
                    row[f"{split}/{k}"] = v
            for k in ("ciou_ap50", "audio_swap_acc", "auc"):
                vs = [row[f"{s}/{k}"] for s in vals if f"{s}/{k}" in row]
                row[k] = float(np.mean(vs)) if vs else float("nan")
            rows.append(row)
    model.labelspace_weight.fill_(keep)
    if keep_obj is not None:
        model.objectness_weight.fill_(keep_obj)
    return rows

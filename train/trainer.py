"""SSL-Align training: config, one step (3 image + 3 audio forwards -> up to 9 pairs), the epoch loop,
validation-based model selection, exact resume and multi-process (DDP) training.

Resume is bit-for-bit on the CPU (steps, optimizer, RNG, losses); on CUDA it continues the same schedule
and state, but cuDNN kernels are not forced deterministic (that would cost speed), so losses can differ in
the last digits.

Reads top to bottom: config dataclasses, ``TrainStep`` (the module DDP wraps), then ``train`` (the Python API
``avloc train`` calls). What it measures between epochs (``validate``, ``validate_audio_swap``,
``self_neighbours``) is ``avloc.train.validation``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from avloc.core.audio import FrontEnd, FrontEndConfig
from avloc.core.checkpoint import ImageConfig, build_model, read_checkpoint, save_checkpoint
from avloc.core.config import from_dict, to_dict
from avloc.core.errors import UserError
from avloc.core.losses import Gather, LossConfig, SSLAlignLoss
from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
from avloc.train.augment import cache_size
from avloc.train.data import (
    EpochSampler,
    EvalViews,
    TrainViews,
    load_nn_index,
    load_split,
    resolve_cache_dir,
    same_sound_mask,
)
from avloc.train.validation import (
    SwapScene,
    compute_heatmaps,
    load_swap_scenes,
    self_neighbours,
    validate,
    validate_audio_swap,
)

log = logging.getLogger(__name__)

METHOD = "ssl_align"
PROBE_SKIP, PROBE_STEPS = 3, 10  # budget mode: steps skipped, then timed, before the step count is fixed


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    # constant: lr throughout (the reference); cosine: linear warm-up over warmup_epochs, then cosine decay
    # to min_lr_ratio * lr at the last step of the run (train.epochs, or what train.budget_minutes allows)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 20
    batch_size: int = 128  # per process
    num_workers: int = 4
    amp: bool = True  # mixed precision (float16 + GradScaler) when training on CUDA; ignored on CPU
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    nn_index: str | None = "nn.npz"  # path (relative: to the data dir, then the working dir) | self | null
    nn_k: int = 1000  # neighbours kept per sample (capped by the split size)
    nn_refresh_epochs: int = 5  # self mode: recompute neighbours from the model every N epochs
    val_every: int = 1
    # adaptive: `median` predicts half the map, so its cIoU cannot reach 0.5 for boxes under a quarter
    # of the image (most stamps/synth objects): ciou_ap50 would be 0 for every model and select nothing.
    val_binarize: str = "adaptive"
    # stop after this many optimizer steps (still checkpoints and validates; the lr schedule ends there); a
    # partial epoch then counts as done, so `--resume` with a larger budget continues at the next epoch
    max_steps: int | None = None
    log_every: int = 10
    gather_negatives: bool = False  # DDP: negatives from every process (all_gather with gradients)
    threads: int | None = None  # torch intra-op threads (None = torch's default)
    # Where the NN visual positive comes from (Senocak et al. Sec. 3.3 "cross-modal guided sampling"):
    # image = the image's own neighbours; audio = the frame of an audio neighbour's clip; intersection =
    # neighbours in both lists (falls back to audio where the lists share none).
    nn_visual: Literal["image", "audio", "intersection"] = "image"
    # Drop known same-sound clips from each row's in-batch negatives: the top false_negative_k audio
    # neighbours of the NN index (0 = off; docs/results.md measures it).
    false_negative_k: int = 0
    # Wall-clock budget (minutes, validation included): after a short probe the run fixes its step count
    # to what fits, and the lr schedule ends there. None = train.epochs.
    budget_minutes: float | None = None
    # Model selection on val: ciou (adaptive cIoU@50, then AUC) or audio_swap (val audio-swap accuracy,
    # then adaptive cIoU@50; needs val scenes with 2+ recorded objects, as `avloc data stamps` writes).
    select: Literal["ciou", "audio_swap"] = "ciou"
    # model.backbone: pretrained only (avloc.train.frozen): audio windows cached per training clip (1 clean +
    # augmented ones), and at most this many training samples (the first ones of train.txt; null = all)
    audio_views: int = 2
    max_train_samples: int | None = None
    train_pool: int = 1  # average-pool the cached maps by this factor while training the heads (1 = off)
    # model.backbone: pretrained only, augmentation of the cached trunk features (avloc.train.frozen.augment_maps):
    # a random resized crop of each cached visual map (scale drawn in [feature_crop, 1] of its side, anywhere
    # inside it, resampled to the full map: 1 = off), and channel dropout on the heads' inputs (whole visual
    # channels, audio embedding dimensions; 0 = off).
    feature_crop: float = 1.0
    feature_dropout: float = 0.0


@dataclass(frozen=True)
class DataConfig:
    cache: str | None = "auto"  # auto (DATA/.cache, else RUN/cache) | none (memory) | a folder


@dataclass(frozen=True)
class RunConfig:
    method: str = METHOD
    model: SSLAlignConfig = field(default_factory=SSLAlignConfig)
    frontend: FrontEndConfig = field(default_factory=FrontEndConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataConfig = field(default_factory=DataConfig)


def parse_config(config: dict[str, Any]) -> RunConfig:
    """Plain dict (YAML + overrides) -> RunConfig; unknown keys and wrong types are UserErrors."""
    cfg = from_dict(RunConfig, config, "")
    if cfg.method != METHOD:
        raise UserError(f"config method={cfg.method!r}: this trainer trains {METHOD!r}")
    t = cfg.train
    for name in ("epochs", "batch_size", "val_every", "log_every", "nn_k", "nn_refresh_epochs"):
        if getattr(t, name) < 1:
            raise UserError(f"config train.{name}={getattr(t, name)}: expected >= 1")
    if t.budget_minutes is not None and t.budget_minutes <= 0:
        raise UserError(f"config train.budget_minutes={t.budget_minutes}: expected > 0 (or null: train.epochs)")
    if t.false_negative_k < 0:
        raise UserError(f"config train.false_negative_k={t.false_negative_k}: expected >= 0 (0 = off)")
    o = cfg.optim
    if o.warmup_epochs < 0 or not 0 <= o.min_lr_ratio <= 1:
        raise UserError(
            f"config optim.warmup_epochs={o.warmup_epochs}, min_lr_ratio={o.min_lr_ratio}: "
            "expected warmup_epochs >= 0 and 0 <= min_lr_ratio <= 1"
        )
    if t.batch_size < 2:
        raise UserError(f"config train.batch_size={t.batch_size}: in-batch negatives need at least 2")
    if not 0 < t.feature_crop <= 1:
        raise UserError(f"config train.feature_crop={t.feature_crop}: expected a scale in (0, 1] (1 = off)")
    if not 0 <= t.feature_dropout < 1:
        raise UserError(f"config train.feature_dropout={t.feature_dropout}: expected a probability in [0, 1)")
    if (t.feature_crop != 1 or t.feature_dropout != 0) and cfg.model.backbone != "pretrained":
        # they act on cached trunk features (train/frozen.py): any other trainer would silently ignore them
        raise UserError(
            f"config train.feature_crop={t.feature_crop}, feature_dropout={t.feature_dropout}: augment the cached "
            f"features of model.backbone=pretrained only (not ACL, not {cfg.model.backbone}); leave them at 1 / 0"
        )
    return cfg


# ---------------------------------------------------------------------------------------------- one step


class TrainStep(nn.Module):
    """Spectrograms, encoders and loss in one ``forward`` (so DDP sees every parameter's use).

    Each distinct view is encoded once (up to 3 image and 3 audio forwards); the loss forms the pairs.
    """

    def __init__(self, model: SSLAlign, frontend: FrontEndConfig, loss: LossConfig, amp: bool) -> None:
        super().__init__()
        self.model = model
        self.frontend = FrontEnd(frontend)
        self.loss = SSLAlignLoss(loss)
        self.views = tuple(loss.positives)
        self.amp = amp

    def forward(self, batch: dict[str, Tensor], gather: Gather | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        vmaps, audios = {}, {}
        device_type = batch["image_orig"].device.type
        for view in self.views:
            with torch.no_grad():
                spec = self.frontend(batch[f"wave_{view}"])
            with torch.autocast(device_type, dtype=torch.float16, enabled=self.amp):
                vmaps[view] = self.model.encode_image(batch[f"image_{view}"])
                audios[view] = self.model.encode_audio(spec)
        # Similarities in float32: s_L's soft threshold (S - 0.65) / 0.03 is sensitive to rounding.
        vmaps = {k: v.float() for k, v in vmaps.items()}
        audios = {k: v.float() for k, v in audios.items()}
        return self.loss(self.model, vmaps, audios, gather, batch.get("negatives_mask"))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    torch.distributed.nn's all_gather backward hands the incoming gradients to all_to_all (gloo) as
    they are; a strided gradient (einsum backward produces transposed ones) is then sent as raw memory
    in the wrong element order. Measured: wrong audio gradients on CPU/gloo without this.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001 - autograd signature
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        return grad.contiguous()


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' rows (gradients flow back to their owners); offset of this rank's rows."""
    import torch.distributed.nn.functional as dist_fn

    parts = [_ContiguousGrad.apply(p) for p in dist_fn.all_gather(x)]
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of optim.lr at ``step`` (0-based): linear warm-up, then constant or cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- helpers


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _resolve_nn_path(setting: str, data: Path) -> Path:
    path = Path(setting).expanduser()
    if path.is_absolute():
        return path
    return data / path if (data / path).exists() or not path.exists() else path


def _select_device(setting: str, local_rank: int) -> torch.device:
    if setting == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config train.device={setting!r}: CUDA is not available here")
    return device


def _score(metrics: dict[str, Any], select: str = "ciou") -> tuple[float, float]:
    if select == "audio_swap":
        return (float(metrics["audio_swap_acc"]), float(metrics["ciou_ap50"]))
    return (float(metrics["ciou_ap50"]), float(metrics["auc"]))


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # created here (torchrun): destroyed at the end of train()

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return _Dist(dist.get_rank(), dist.get_world_size(), local, owned)


# ---------------------------------------------------------------------------------------------- training


def train(
    config: dict[str, Any], data: Path, out: Path, resume: bool = False, pretrained: dict[str, Any] | None = None
) -> Path:
    """Train SSL-Align on DATA (layout of docs/architecture.md) into OUT; returns OUT/best.pt.

    OUT gets config.yaml (resolved), run.json (front-end, image, git revision, world size), last.pt
    (each epoch; optimizer, scaler, RNG, epoch/step), best.pt (best validation ciou_ap50), metrics.jsonl
    and TensorBoard scalars under tb/. ``resume`` continues from OUT/last.pt.
    """
    acl = config.get("method") == "acl"
    if acl:  # ACL: its model/loss sections, the rest parsed as for SSL-Align
        from avloc.core.acl import training as acl_training

        run_config, (config, acl_model, acl_loss) = config, acl_training.split_run_config(config)
    cfg = parse_config(config)
    data, out = Path(data), Path(out)
    t = cfg.train
    ddp = _init_distributed()
    if t.budget_minutes is not None and ddp.world > 1:
        raise UserError(
            "config train.budget_minutes: not with several processes (each would time its own "
            "steps); give train.epochs or train.max_steps instead"
        )
    device = _select_device(t.device, ddp.local_rank)
    if t.threads:
        torch.set_num_threads(t.threads)
    amp = t.amp and device.type == "cuda"
    if not data.is_dir():
        raise UserError(f"{data}: data directory not found")
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume and not last_path.is_file():
        raise UserError(f"{last_path}: nothing to resume (no last.pt in the run directory)")
    if not resume and last_path.is_file():
        raise UserError(f"{out}: already holds a run (last.pt); pass --resume or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    if not acl and cfg.model.backbone == "pretrained":
        return _train_pretrained(cfg, data, out, device, ddp)

    # --- data -----------------------------------------------------------------------------------
    cache_dir = resolve_cache_dir(cfg.data.cache, data, out)
    frame_size = cache_size(cfg.image.size)
    if ddp.main:  # decode once; the other ranks wait and read the cache
        train_split = load_split(data, "train", cfg.frontend, frame_size, cache_dir)
    if ddp.world > 1:
        dist.barrier()
    if not ddp.main:
        train_split = load_split(data, "train", cfg.frontend, frame_size, cache_dir)
    has_val = (data / "val.txt").is_file() and (data / "val.json").is_file()
    val_loader = annotations = None
    swap_val: list[SwapScene] = []
    if has_val and ddp.main:
        from avloc.core.datasets import load_vggss_json

        val_split = load_split(data, "val", cfg.frontend, cfg.image.size, cache_dir)
        annotations = load_vggss_json(data / "val.json")
        val_loader = DataLoader(
            EvalViews(val_split, cfg.image, cfg.frontend), batch_size=t.batch_size, num_workers=min(t.num_workers, 2)
        )
        if not acl:
            swap_val = load_swap_scenes(data, val_split.ids, annotations, cfg.frontend)
        if t.select == "audio_swap" and not swap_val:
            raise UserError(
                f"config train.select=audio_swap: {data / 'val.json'} has no scene with two or more "
                "recorded objects (objects[].audio)"
            )
    elif not has_val:
        log.warning("%s: no val.txt + val.json; best.pt will be the last epoch (no model selection)", data)

    views = tuple(cfg.loss.positives)
    nn_mode = None if "nn" not in views else t.nn_index
    if "nn" in views and not nn_mode:
        raise UserError("config loss.positives contains 'nn' but train.nn_index is null")
    neighbours = same_sound = None
    if nn_mode and nn_mode != "self":
        neighbours = load_nn_index(_resolve_nn_path(nn_mode, data), train_split.ids, t.nn_k)
    if t.false_negative_k:
        if not t.nn_index or t.nn_index == "self":
            raise UserError(
                "config train.false_negative_k needs train.nn_index set to an index file "
                "(`avloc index build`): its audio neighbours are the known same-sound clips"
            )
        if t.gather_negatives:
            raise UserError("config train.false_negative_k cannot be combined with train.gather_negatives")
        same_sound = load_nn_index(_resolve_nn_path(t.nn_index, data), train_split.ids, t.false_negative_k)[1]
    dataset = TrainViews(
        train_split,
        cfg.image,
        cfg.frontend,
        views,
        t.seed,
        neighbours if nn_mode != "self" else _placeholder_neighbours(len(train_split.ids)),
        nn_visual=t.nn_visual,
    )
    sampler = EpochSampler(len(dataset), t.batch_size, t.seed, ddp.rank, ddp.world)
    loader = DataLoader(
        dataset,
        batch_size=t.batch_size,
        sampler=sampler,
        num_workers=t.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    self_loader = None
    if nn_mode == "self":
        self_loader = DataLoader(
            EvalViews(load_split(data, "train", cfg.frontend, cfg.image.size, cache_dir), cfg.image, cfg.frontend),
            batch_size=t.batch_size,
            num_workers=min(t.num_workers, 2),
        )

    # --- model, optimizer ------------------------------------------------------------------------
    torch.manual_seed(t.seed)
    if acl:
        model, model_config = acl_training.build_training_model(acl_model, **(pretrained or {}))
        model = model.to(device)
        step_module = acl_training.ACLTrainStep(model, cfg.frontend, acl_loss, amp).to(device)
    else:
        model, model_config = build_model(METHOD, to_dict(cfg.model)).to(device), to_dict(cfg.model)
        step_module = TrainStep(model, cfg.frontend, cfg.loss, amp).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    steps_per_epoch = sampler.batches_per_epoch()
    # total steps of the lr schedule: train.epochs, or (budget) fixed after the probe steps below
    plan = {"total_steps": min(t.epochs * steps_per_epoch, t.max_steps or math.inf), "fixed": t.budget_minutes is None}
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, plan["total_steps"], warmup_steps, cfg.optim.schedule, cfg.optim.min_lr_ratio)
    )
    start_epoch, step, best, best_epoch = 0, 0, None, None
    if resume:
        state = read_checkpoint(last_path, map_location=device)
        from avloc.core.checkpoint import load_state_dict_strict

        load_state_dict_strict(model, state["state_dict"], str(last_path))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if state.get("plan") is not None and t.budget_minutes is not None:
            plan.update(state["plan"])  # the budget's step count (and time spent) carry over; epochs do not
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best = tuple(state["best_score"]) if state.get("best_score") is not None else None
        best_epoch = state.get("best_epoch")
        if nn_mode == "self" and state.get("self_image_nn") is not None:
            dataset.set_neighbours((state["self_image_nn"].numpy(), state["self_audio_nn"].numpy()))
        log.info("resumed %s at epoch %d, step %d", last_path, start_epoch, step)
    runner: nn.Module = step_module
    if ddp.world > 1:
        runner = nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not acl and not cfg.loss.use_sa,  # s_A heads idle when alignment is off
        )
    gather = gather_with_grad if (ddp.world > 1 and t.gather_negatives) else None

    # --- run directory ----------------------------------------------------------------------------
    writer = None
    metrics_path = out / "metrics.jsonl"
    if ddp.main:
        resolved = run_config if acl else to_dict(cfg)
        _write_text_atomic(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        run_info = {
            "method": METHOD,
            "frontend": cfg.frontend.to_dict(),
            "image": to_dict(cfg.image),
            "git_revision": _git_revision(),
            "world_size": ddp.world,
            "device": str(device),
            "data": str(data.resolve()),
            "torch": torch.__version__,
            "amp": amp,
        }
        _write_text_atomic(out / "run.json", json.dumps(run_info, indent=2))
        if resume and metrics_path.is_file():  # drop records of epochs that will be redone
            lines = metrics_path.read_text().splitlines()
            kept = [ln for ln in lines if ln and json.loads(ln)["epoch"] < start_epoch]
            _write_text_atomic(metrics_path, "".join(ln + "\n" for ln in kept))
        elif not resume:
            metrics_path.unlink(missing_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))

    def save(path: Path, epoch_done: int, extra: dict[str, Any]) -> None:
        save_checkpoint(
            path,
            model,
            method="acl" if acl else METHOD,
            model_config=model_config,
            frontend=cfg.frontend,
            image=cfg.image,
            extra={"epoch": epoch_done, "step": step, "config": to_dict(cfg), **extra},
        )

    max_steps = t.max_steps or math.inf
    budget_s = t.budget_minutes * 60.0 if t.budget_minutes is not None else math.inf
    run_start = time.perf_counter() - (plan.get("elapsed_s", 0.0) if resume else 0.0)
    epoch = start_epoch
    first_step, probe_t0 = step, None
    if not plan["fixed"] and val_loader is not None and ddp.main:
        # budget mode: a validation pass is part of the budget; time one (of the untrained model) to reserve
        # that much per epoch when the step count is fixed
        v0 = time.perf_counter()
        val0 = validate(
            model,
            step_module.frontend,
            val_loader,
            annotations,
            t.val_binarize,
            device,
            acl_training.compute_heatmaps if acl else compute_heatmaps,
        )
        if swap_val:
            val0.update(validate_audio_swap(model, step_module.frontend, val_loader.dataset, swap_val, device))
        plan["val_pass_s"] = time.perf_counter() - v0
        log.info(
            "untrained: val ciou_ap50 %.3f, audio-swap %s (%.1f s a validation pass)",
            val0["ciou_ap50"],
            f"{val0['audio_swap_acc']:.3f}" if "audio_swap_acc" in val0 else "-",
            plan["val_pass_s"],
        )

    def fix_plan(probe_steps: int, probe_seconds: float) -> None:
        """Budget mode: the steps that fit what is left of the budget (validation reserved). Fixed after
        the probe, then re-estimated after every epoch from that epoch's pace (a machine that got busier or
        idler moves the end, and the cosine's end with it, by what the pace changed)."""
        per_step = probe_seconds / max(probe_steps, 1)
        left = budget_s - (time.perf_counter() - run_start)
        epochs_left = max(left / (per_step * steps_per_epoch), 1e-9)
        reserve = plan.get("val_pass_s", 0.0) * min(math.ceil(epochs_left), t.epochs - epoch)
        fitting = step + max(int((left - reserve) / per_step), 1)
        plan.update(
            total_steps=min(t.epochs * steps_per_epoch, t.max_steps or math.inf, fitting),
            fixed=True,
            seconds_per_step=per_step,
        )
        log.info(
            "budget %.1f min: %.3f s/step -> %d steps in all (%.2f epochs)",
            t.budget_minutes,
            per_step,
            plan["total_steps"],
            plan["total_steps"] / steps_per_epoch,
        )

    for epoch in range(start_epoch, t.epochs):
        if step >= min(max_steps, plan["total_steps"]):
            break
        if nn_mode == "self" and epoch % t.nn_refresh_epochs == 0:  # in between: restored from last.pt
            dataset.set_neighbours(self_neighbours(model, step_module.frontend, self_loader, t.nn_k, device))
        sampler.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        n_steps, n_samples, t0 = 0, 0, time.perf_counter()
        bar = tqdm(
            loader,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{t.epochs}",
            disable=not ddp.main,
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            if same_sound is not None:
                batch["negatives_mask"] = same_sound_mask(batch["index"], same_sound)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss, parts = runner(batch, gather)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            if not plan["fixed"]:  # skip the first steps (allocator, loader start-up), then time a few
                if step - first_step == PROBE_SKIP:
                    probe_t0 = time.perf_counter()
                elif probe_t0 is not None and step - first_step == PROBE_SKIP + PROBE_STEPS:
                    fix_plan(PROBE_STEPS, time.perf_counter() - probe_t0)
            n_steps += 1
            n_samples += t.batch_size * ddp.world
            # Accumulate on the device: a float() per term would synchronize the GPU 19 times a step.
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            rate = n_samples / max(time.perf_counter() - t0, 1e-9)
            if step % t.log_every == 0 or n_steps == 1:
                value = float(loss.detach())
                if not math.isfinite(value) and not amp:  # AMP: GradScaler skips such steps
                    raise RuntimeError(f"loss is {value} at step {step}; lower optim.lr or check the data")
                bar.set_postfix(loss=f"{value:.3f}", samples_s=f"{rate:.1f}")
                if writer is not None:
                    writer.add_scalar("train/loss", value, step)
                    writer.add_scalar("train/samples_per_s", rate, step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
            if step >= min(max_steps, plan["total_steps"]):
                break
        bar.close()
        train_seconds = time.perf_counter() - t0
        if t.budget_minutes is not None and n_steps >= PROBE_SKIP + PROBE_STEPS and step < plan["total_steps"]:
            fix_plan(n_steps - PROBE_SKIP, train_seconds * (n_steps - PROBE_SKIP) / n_steps)
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "steps": n_steps,
            "samples_per_s": n_samples / max(train_seconds, 1e-9),
            "train_seconds": train_seconds,
            "lr": optimizer.param_groups[0]["lr"],
        }
        record.update({f"train/{k}": float(v) / max(n_steps, 1) for k, v in sums.items()})
        last_epoch = epoch + 1 == t.epochs or step >= min(max_steps, plan["total_steps"])
        if ddp.main:
            if val_loader is not None and ((epoch + 1) % t.val_every == 0 or last_epoch):
                v0 = time.perf_counter()
                val = validate(
                    model,
                    step_module.frontend,
                    val_loader,
                    annotations,
                    t.val_binarize,
                    device,
                    acl_training.compute_heatmaps if acl else compute_heatmaps,
                )
                if swap_val:
                    val.update(validate_audio_swap(model, step_module.frontend, val_loader.dataset, swap_val, device))
                record["val_seconds"] = time.perf_counter() - v0
                record.update({f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))})
                score = _score(val, t.select)
                if best is None or score > best:
                    best, best_epoch = score, epoch
                    scalars = {k: v for k, v in val.items() if isinstance(v, (int, float, str))}
                    save(best_path, epoch + 1, {"val": scalars})
            elif val_loader is None:
                save(best_path, epoch + 1, {})
                best_epoch = epoch
            record["elapsed_s"] = time.perf_counter() - run_start
            plan["elapsed_s"] = record["elapsed_s"]
            extra = {
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "scheduler": scheduler.state_dict(),
                "plan": dict(plan),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "best_score": list(best) if best is not None else None,
                "best_epoch": best_epoch,
            }
            if nn_mode == "self":
                extra["self_image_nn"] = torch.from_numpy(dataset.neighbours[0])
                extra["self_audio_nn"] = torch.from_numpy(dataset.neighbours[1])
            save(last_path, epoch + 1, extra)
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    writer.add_scalar(k if "/" in k else f"epoch/{k}", v, epoch + 1)
            log.info(
                "epoch %d: loss %.4f, %.1f samples/s, %.1f min%s%s",
                epoch + 1,
                record.get("train/loss", math.nan),
                record["samples_per_s"],
                record["elapsed_s"] / 60,
                f", val ciou_ap50 {record['val/ciou_ap50']:.3f}" if "val/ciou_ap50" in record else "",
                f", val audio-swap {record['val/audio_swap_acc']:.3f}" if "val/audio_swap_acc" in record else "",
            )
        if ddp.world > 1:
            dist.barrier()
    if writer is not None:
        writer.close()
    if ddp.owns_group:
        dist.destroy_process_group()
    if ddp.main and not best_path.is_file():
        raise UserError(f"{out}: train.epochs={t.epochs} already reached, no epoch trained")
    return best_path


def _train_pretrained(cfg: RunConfig, data: Path, out: Path, device: torch.device, ddp: _Dist) -> Path:
    """``model.backbone: pretrained``: frozen trunks, their outputs cached once, heads trained on the cache
    (avloc.train.frozen). One process, CPU; no resume (a run takes minutes once the cache exists)."""
    from avloc.train.frozen import train_frozen

    if ddp.world > 1 or device.type != "cpu":
        raise UserError("config model.backbone=pretrained: trains in one CPU process (its trunks are frozen)")
    if cfg.train.audio_views < 1:
        raise UserError(f"config train.audio_views={cfg.train.audio_views}: expected >= 1")
    torch.manual_seed(cfg.train.seed)
    model_config = to_dict(cfg.model)
    model = build_model(METHOD, model_config)
    _write_text_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    run_info = {
        "method": METHOD,
        "frontend": cfg.frontend.to_dict(),
        "image": to_dict(cfg.image),
        "git_revision": _git_revision(),
        "world_size": 1,
        "device": str(device),
        "data": str(data.resolve()),
        "torch": torch.__version__,
    }
    _write_text_atomic(out / "run.json", json.dumps(run_info, indent=2))
    return train_frozen(cfg, data, out, model, model_config, METHOD)


def _placeholder_neighbours(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Self mode before the first refresh: each sample is its own neighbour."""
    own = np.arange(n, dtype=np.int64)[:, None]
    return own, own.copy()

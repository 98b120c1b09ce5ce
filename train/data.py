"""Training data for SSL-Align: a decoded-once cache, the view-producing Dataset and NN positives.

On a 2-core machine decoding JPEGs and WAVs every epoch is a large share of the step time, so a split
is decoded once into a cache: frames resized to ``1.1 * image size`` (uint8, ``frames.npy``; the
validation split to the image size, with the evaluation's own resize) and the clips as PCM16
(``audio.npy``, concatenated, with ``offsets.npy``; scaled by 32768 as soundfile reads PCM16, so 16-bit
sources round-trip exactly). Audio stays a waveform because the
time-shift augmentation needs it; the spectrogram is computed per batch by the FrontEnd in the trainer
(on the GPU when there is one).

Randomness: every draw uses generators seeded with ``(seed, epoch, index)``, so a sample's views do not
depend on the worker that made them, and a resumed run redraws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from avloc.core.audio import FrontEndConfig, frame_window
from avloc.core.checkpoint import ImageConfig
from avloc.core.datasets import AVDataset
from avloc.core.errors import DataError, UserError
from avloc.train.augment import ImageViews, chw_tensor, resize_square, shifted_window

log = logging.getLogger(__name__)

PCM16_SCALE = 32768.0  # soundfile's float <-> PCM16 scale

CACHE_VERSION = 2  # 2: frames resized bicubic (was INTER_AREA), PCM16 scale 32768 (was 32767)


# ---------------------------------------------------------------------------------------------- cache


@dataclass
class DecodedSplit:
    """A decoded split: ``frames[i]`` uint8 [S, S, 3]; clip i = ``audio[offsets[i]:offsets[i+1]]`` (PCM16)."""

    ids: list[str]
    frames: np.ndarray
    audio: np.ndarray
    offsets: np.ndarray
    folder: Path | None = None  # cache folder when memory-mapped

    def __getstate__(self) -> dict:
        # DataLoader workers started with spawn/forkserver get the cache path, not a copy of the arrays.
        if self.folder is None:
            return dict(self.__dict__)
        return {"ids": self.ids, "offsets": self.offsets, "folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "frames" not in state:
            self.frames = np.load(self.folder / "frames.npy", mmap_mode="r")
            self.audio = np.load(self.folder / "audio.npy", mmap_mode="r")

    def wave(self, index: int) -> np.ndarray:
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.audio[a:b].astype(np.float32) / PCM16_SCALE

    def frame(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.frames[index])).permute(2, 0, 1)


def _source_stamp(source: AVDataset) -> str:
    """Fingerprint of the split: ids + size and mtime of every source file (a changed dataset rebuilds)."""
    h = hashlib.sha1()
    for sid in source.ids:
        h.update(sid.encode())
        for path in (source.root / "frames" / f"{sid}.jpg", source.root / "audio" / f"{sid}.wav"):
            if path.is_file():
                st = path.stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _decode(source: AVDataset, frame_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    frames = np.empty((len(source.ids), frame_size, frame_size, 3), dtype=np.uint8)
    waves = []
    for i, sid in enumerate(tqdm(source.ids, desc=f"decode {source.split}", unit="clip", leave=False)):
        # Square resize: boxes are normalized to the whole frame, and evaluation resizes to a square too.
        frames[i] = resize_square(chw_tensor(source.image(sid)), frame_size).permute(1, 2, 0).numpy()
        wave = source.audio(sid)
        if wave.size == 0:
            raise DataError(source.root / "audio" / f"{sid}.wav", "clip holds no samples")
        waves.append(np.clip(np.round(wave * PCM16_SCALE), -32768, 32767).astype(np.int16))
    return frames, waves


def load_split(
    root: Path, split: str, frontend: FrontEndConfig, frame_size: int, cache_root: Path | None
) -> DecodedSplit:
    """Decode ``split`` of ``root`` (or reuse the cache under ``cache_root``; None = keep in memory only)."""
    source = AVDataset(root, split, frontend)
    if not source.ids:
        raise DataError(root / f"{split}.txt", "split is empty")
    if cache_root is None:
        frames, waves = _decode(source, frame_size)
        return DecodedSplit(source.ids, frames, np.concatenate(waves), _offsets(waves))
    stamp = _source_stamp(source)
    key = f"{split}-{frame_size}px-{frontend.sample_rate}hz-{stamp[:12]}"
    folder = cache_root / key
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("version") == CACHE_VERSION and meta.get("stamp") == stamp:
            log.info("using cache %s", folder)
            return DecodedSplit(
                list(meta["ids"]),
                np.load(folder / "frames.npy", mmap_mode="r"),
                np.load(folder / "audio.npy", mmap_mode="r"),
                np.load(folder / "offsets.npy"),
                folder,
            )
    frames, waves = _decode(source, frame_size)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_root))
    try:
        np.save(tmp / "frames.npy", frames)
        np.save(tmp / "audio.npy", np.concatenate(waves))
        np.save(tmp / "offsets.npy", _offsets(waves))
        meta = {
            "version": CACHE_VERSION,
            "stamp": stamp,
            "ids": source.ids,
            "root": str(root),
            "split": split,
            "frame_size": frame_size,
            "sample_rate": frontend.sample_rate,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        if folder.exists():  # stale entry with the same key
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote cache %s (%d clips)", folder, len(source.ids))
    return load_split(root, split, frontend, frame_size, cache_root)


def _offsets(waves: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(w) for w in waves])]).astype(np.int64)


def resolve_cache_dir(setting: str | None, data: Path, out: Path) -> Path | None:
    """``auto``: DATA/.cache when writable, else RUN/cache; ``none``: memory only; else that folder."""
    if setting in (None, "none", False):
        return None
    if setting != "auto":
        return Path(setting)
    target = data / ".cache"
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=target, delete=True)  # noqa: SIM115 - probe only
        probe.close()
        return target
    except OSError:
        return out / "cache"


# ---------------------------------------------------------------------------------------------- NN positives


def load_nn_index(path: Path, ids: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """``nn.npz`` of ``avloc index build`` -> (image_nn, audio_nn) [N, k'] as indices into ``ids``.

    Rows are matched by id, so the index may list the train ids in any order; k' = min(k, stored k).
    """
    if not path.is_file():
        raise UserError(f"{path}: NN index not found (`avloc index build` makes one; or train.nn_index=self)")
    with np.load(path, allow_pickle=False) as z:
        missing_keys = [key for key in ("ids", "image_nn", "audio_nn") if key not in z.files]
        if missing_keys:
            raise DataError(path, f"missing array(s) {', '.join(missing_keys)}; need ids, image_nn, audio_nn")
        index_ids = [str(s) for s in z["ids"]]
        image_nn, audio_nn = z["image_nn"], z["audio_nn"]
    position = {sid: i for i, sid in enumerate(index_ids)}
    absent = [sid for sid in ids if sid not in position]
    if absent:
        raise DataError(path, f"{len(absent)} train id(s) not in the index, e.g. {absent[0]!r}; rebuild it")
    rows = np.array([position[sid] for sid in ids])
    # Map index positions -> positions in `ids` (neighbours outside this split are dropped per row).
    to_ours = np.full(len(index_ids), -1, dtype=np.int64)
    to_ours[rows] = np.arange(len(ids))
    out = []
    for table in (image_nn, audio_nn):
        table = to_ours[np.asarray(table)[rows]]
        if (table < 0).any():
            raise DataError(path, "neighbours point outside the train split; rebuild the index for this data")
        out.append(table[:, : min(k, table.shape[1])].copy())
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------- datasets


NN_VISUAL_SOURCES = ("image", "audio", "intersection")


def visual_positive_candidates(neighbours: tuple[np.ndarray, np.ndarray], source: str) -> list[np.ndarray]:
    """Per sample, the clips whose frame may serve as its NN visual positive.

    ``image``: its image neighbours (the paper's default); ``audio``: its audio neighbours (cross-modal
    guided: the frame of a clip that *sounds* alike, so the shared content is the sounding object, not the
    scene); ``intersection``: neighbours in both lists, in image-list order, or the audio list where they
    share none.
    """
    image_nn, audio_nn = neighbours
    if source == "image":
        return list(image_nn)
    if source == "audio":
        return list(audio_nn)
    out = []
    for img_row, aud_row in zip(image_nn, audio_nn):
        both = img_row[np.isin(img_row, aud_row)]
        out.append(both if len(both) else aud_row)
    return out


def same_sound_mask(index: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """[N, N] bool: ``mask[i, j]`` when batch item j is among item i's known same-sound clips (``table[i]``,
    the top audio neighbours), j != i: these leave i's in-batch negatives (false negatives)."""
    rows = torch.from_numpy(table[index.numpy()])  # [N, k] clip indices
    mask = (rows[:, :, None] == index[None, None, :]).any(dim=1)
    mask.fill_diagonal_(False)
    return mask


def _item_seed(seed: int, epoch: int, index: int) -> list[int]:
    return [seed, epoch, index]


class TrainViews(Dataset):
    """Yields the views of one training sample: ``image_<view>`` [3, s, s] and ``wave_<view>`` [N].

    Indexed by ``(epoch, index)`` pairs (see :class:`EpochSampler`) so the draw is a pure function of the
    seed, the epoch and the sample.  ``neighbours`` = (image_nn, audio_nn) tables [N, k] into this split.
    """

    def __init__(
        self,
        split: DecodedSplit,
        image: ImageConfig,
        frontend: FrontEndConfig,
        views: tuple[str, ...],
        seed: int,
        neighbours: tuple[np.ndarray, np.ndarray] | None = None,
        nn_visual: str = "image",
    ) -> None:
        if "nn" in views and neighbours is None:
            raise UserError("loss.positives contains 'nn' but no NN index is set (train.nn_index)")
        if nn_visual not in NN_VISUAL_SOURCES:
            raise UserError(f"config train.nn_visual={nn_visual!r}: expected one of {', '.join(NN_VISUAL_SOURCES)}")
        self.split = split
        self.views = views
        self.seed = seed
        self.nn_visual = nn_visual
        self.neighbours = neighbours
        self.visual_candidates = visual_positive_candidates(neighbours, nn_visual) if neighbours else None
        self.frontend = frontend
        self.num_samples = frontend.num_samples
        self.pad = frontend.pad_mode
        self.image_views = ImageViews(image)

    def __len__(self) -> int:
        return len(self.split.ids)

    def set_neighbours(self, neighbours: tuple[np.ndarray, np.ndarray]) -> None:
        self.neighbours = neighbours
        self.visual_candidates = visual_positive_candidates(neighbours, self.nn_visual)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        rng = np.random.default_rng(_item_seed(self.seed, epoch, index))
        # torchvision v2 draws from torch's global generator: seed a forked one so the main process's
        # state is untouched (num_workers=0) and the draw is the same in any worker.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(0, 2**62)))
            frame = self.split.frame(index)
            wave = self.split.wave(index)
            out = {
                "index": torch.tensor(index),
                "image_orig": self.image_views.original(frame),
                "wave_orig": torch.from_numpy(frame_window(wave, self.frontend)),
            }
            if "aug" in self.views:
                out["image_aug"] = self.image_views.augmented(frame)
                out["wave_aug"] = torch.from_numpy(shifted_window(wave, self.num_samples, rng, self.pad))
            if "nn" in self.views:
                _, audio_nn = self.neighbours
                candidates = self.visual_candidates[index]
                j_img = int(candidates[rng.integers(0, len(candidates))])
                j_aud = int(audio_nn[index, rng.integers(0, audio_nn.shape[1])])
                out["image_nn"] = self.image_views.original(self.split.frame(j_img))
                nn_wave = frame_window(self.split.wave(j_aud), self.frontend)
                out["wave_nn"] = torch.from_numpy(nn_wave)
        return out


class EvalViews(Dataset):
    """Deterministic evaluation inputs: ``Resize(size)`` image and the centred audio window."""

    def __init__(self, split: DecodedSplit, image: ImageConfig, frontend: FrontEndConfig) -> None:
        self.split = split
        self.frontend = frontend
        self.image_views = ImageViews(image)

    def __len__(self) -> int:
        return len(self.split.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "index": torch.tensor(index),
            "image": self.image_views.evaluation(self.split.frame(index)),
            "wave": torch.from_numpy(frame_window(self.split.wave(index), self.frontend)),
        }


class EpochSampler(Sampler):
    """A seeded permutation per epoch, sharded over ranks, cut to whole batches (in-batch negatives need
    full batches); yields ``(epoch, index)`` keys for :class:`TrainViews`."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0
        if self.batches_per_epoch() == 0:
            raise UserError(
                f"train split has {n} samples: fewer than one batch "
                f"(train.batch_size={batch_size} x {world} process(es))"
            )

    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.batches_per_epoch() * self.batch_size * self.world]
        for index in perm[self.rank :: self.world].tolist():
            yield (self.epoch, index)

"""Image and audio views for SSL-Align training (torchvision.transforms.v2 on uint8 tensors).

Views of one sample (Senocak et al., ICCV 2023, Sec. 3.3):

- ``plain`` (the "original" view, also used for NN samples): the EZ-VSL/SSL-Align training transform,
  ``Resize(1.1 * size) -> RandomCrop(size) -> RandomHorizontalFlip``. Frames are cached already resized
  to ``1.1 * size`` (square: annotation boxes are normalized to the full frame), so only crop + flip
  remain per draw.
- ``augmented``: the plain view followed by a random k*90 degree rotation, colour jitter, Gaussian blur,
  vertical flip, random affine translation and random grayscale.
- ``eval``: ``Resize(size)`` bicubic, no randomness (validation / evaluation / feature extraction).

Audio: the original view is the front-end's window for the clip's (centre) frame, ``frame_window`` (what the
evaluation and the live worker use: ``frontend.anchor``); the augmented
view shifts it in time -- a random window start inside the clip, or a random circular shift when the
clip is no longer than the window (the reference tiles short clips).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from avloc.core.audio import crop_window
from avloc.core.checkpoint import ImageConfig

CACHE_SCALE = 1.1  # Resize(int(size * 1.1)) before RandomCrop(size), as the EZ-VSL/SSL-Align loaders


def cache_size(size: int) -> int:
    return int(size * CACHE_SCALE)


def chw_tensor(image: np.ndarray) -> Tensor:
    """uint8 HxWx3 array (as decoded) -> uint8 [3, H, W] tensor view, the layout the transforms take."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def resize_square(frame: Tensor, size: int) -> Tensor:
    """uint8 [3, H, W] -> [3, size, size]: bicubic with antialias (the reference loaders' PIL BICUBIC).

    The one resize of evaluation frames and of the decoded-frame cache, so a cached validation frame is
    exactly the frame the test evaluation computes from the file.
    """
    return v2.functional.resize(frame, [size, size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


class RandomRot90(torch.nn.Module):
    """Rotate by k * 90 degrees, k uniform in {0, 1, 2, 3} (the paper's rotation augmentation)."""

    def forward(self, image: Tensor) -> Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(image, k, dims=(-2, -1))


class ImageViews:
    """Callable transforms from a cached uint8 [3, S, S] frame to normalized float [3, size, size]."""

    def __init__(self, image: ImageConfig) -> None:
        size = image.size
        self.size = size
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(image.mean, image.std)])
        self.plain = v2.Compose([v2.RandomCrop(size), v2.RandomHorizontalFlip()])
        blur_kernel = 2 * (size // 20) + 1  # ~10% of the side, odd
        self.augment = v2.Compose(
            [
                RandomRot90(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5),
                v2.RandomVerticalFlip(),
                v2.RandomAffine(degrees=0, translate=(0.1, 0.1)),
                v2.RandomGrayscale(p=0.2),
            ]
        )

    def original(self, frame: Tensor) -> Tensor:
        return self.normalize(self.plain(frame))

    def augmented(self, frame: Tensor) -> Tensor:
        return self.normalize(self.augment(self.plain(frame)))

    def evaluation(self, frame: Tensor) -> Tensor:
        """Frame of any size -> Resize((size, size)) bicubic -> normalized."""
        if tuple(frame.shape[-2:]) != (self.size, self.size):
            frame = resize_square(frame, self.size)
        return self.normalize(frame)


def shifted_window(wave: np.ndarray, num_samples: int, rng: np.random.Generator, pad: str = "tile") -> np.ndarray:
    """Time-shift augmentation: a random window inside the clip, or a circular shift of a short clip."""
    n = wave.shape[-1]
    if n > num_samples:
        return crop_window(wave, num_samples, start=int(rng.integers(0, n - num_samples + 1)), pad=pad)
    window = crop_window(wave, num_samples, pad=pad)
    return np.roll(window, int(rng.integers(0, num_samples)))

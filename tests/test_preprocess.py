"""Device preprocessing (engines/preprocess.py) against the CPU path (engines/base.py), on CPU tensors; the
pinned-memory CUDA path in the ``gpu`` test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avloc.core.checkpoint import ImageConfig
from avloc.core.errors import UserError
from avloc.engines.base import preprocess_frames
from avloc.engines.preprocess import (
    TOLERANCE_LEVELS,
    DevicePreprocessor,
    cpu_agreement,
    resize_normalize,
    resize_weights,
)

SIZE = 64
IMAGE = ImageConfig(size=SIZE)
MANIFEST = {"image": {"size": SIZE, "mean": list(IMAGE.mean), "std": list(IMAGE.std)}}
# One uint8 level after normalisation, for the channel with the smallest std (the largest step).
LEVEL = 1.0 / (255.0 * min(IMAGE.std))


def _frames(h: int, w: int, n: int, smooth: bool, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if not smooth:  # worst case for rounding differences: independent noise per pixel
        return [rng.integers(0, 256, (h, w, 3), np.uint8) for _ in range(n)]
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        phase = rng.uniform(0, 6, 3)
        img = np.stack([127 + 120 * np.sin(xx / (7 + 5 * c) + yy / 11 + phase[c]) for c in range(3)], -1)
        out.append(img.astype(np.uint8))
    return out


@pytest.mark.parametrize(
    "shape",
    [(480, 640), (128, 128), (100, 90), (32, 40), (SIZE, SIZE)],
    ids=["shrink-nonint", "shrink-2x", "shrink-odd", "enlarge", "same"],
)
@pytest.mark.parametrize("smooth", [False, True], ids=["noise", "smooth"])
def test_matches_cpu_path(shape, smooth):
    frames = _frames(*shape, n=3, smooth=smooth)
    dev = DevicePreprocessor(MANIFEST, device="cpu", max_batch=4)(frames)
    assert dev.shape == (3, 3, SIZE, SIZE) and dev.dtype == torch.float32
    worst, mean = cpu_agreement(frames, MANIFEST)
    assert worst <= TOLERANCE_LEVELS + 1e-3, f"max diff {worst:.2f} levels"
    if shape == (SIZE, SIZE):
        assert worst <= 1e-3  # no resize: only float rounding differs
    else:
        assert mean <= 0.35  # typically a quarter of a level (uint8 rounding), not just bounded
    # the level unit itself: one uint8 step of the smallest-std channel
    assert np.abs(dev.numpy() - preprocess_frames(frames, MANIFEST)).max() <= (worst + 1e-3) * LEVEL


def test_resize_weights_are_averages():
    for n_in, n_out in [(640, 64), (128, 64), (32, 64), (64, 64), (7, 3)]:
        w = resize_weights(n_in, n_out)
        assert w.shape == (n_out, n_in) and (w >= 0).all()
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    # 2x shrink = mean of pixel pairs; 2x enlarge with half-pixel centres = 3/4, 1/4 mixes
    np.testing.assert_allclose(resize_weights(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(resize_weights(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])


def test_mixed_sizes_and_buffer_reuse():
    pre = DevicePreprocessor(MANIFEST, device="cpu", max_batch=4)
    big, small = _frames(480, 640, 2, smooth=True), _frames(32, 40, 1, smooth=True, seed=1)
    mixed = [big[0], small[0], big[1]]
    out = pre(mixed)
    np.testing.assert_allclose(out.numpy(), preprocess_frames(mixed, MANIFEST), atol=TOLERANCE_LEVELS * LEVEL + 1e-5)
    # staging buffers are reused: a later batch must not change an earlier result
    kept = out.clone()
    pre(_frames(480, 640, 3, smooth=False, seed=2))
    pre(_frames(32, 40, 2, smooth=False, seed=3))
    assert torch.equal(out, kept)


def test_bad_input_is_a_user_error():
    pre = DevicePreprocessor(MANIFEST, device="cpu", max_batch=2)
    with pytest.raises(UserError, match="uint8"):
        pre([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(UserError, match="max_batch 2"):
        pre(_frames(8, 8, 3, smooth=False))
    with pytest.raises(UserError, match=r"\[B,h,w,3\] uint8"):
        resize_normalize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), MANIFEST)


@pytest.mark.gpu
def test_cuda_path_matches_cpu():
    frames = _frames(480, 640, 8, smooth=False)
    pre = DevicePreprocessor(MANIFEST, device="cuda", max_batch=8)
    for _ in range(3):  # both pinned buffers, then reuse after their events
        out = pre(frames)
    assert out.device.type == "cuda"
    diff = np.abs(out.cpu().numpy() - preprocess_frames(frames, MANIFEST))
    assert diff.max() <= TOLERANCE_LEVELS * LEVEL + 1e-4
    assert all(s.buffers[0].is_pinned() for s in pre._staging.values())


class _HostToDevice(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that takes a host (CPU) tensor and makes a device one: on CUDA each is a host-to-device
    copy, which from pageable memory blocks the host until the device has reached it (a hidden sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.uploads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        host_in = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in flat)
        outs = torch.utils._pytree.tree_leaves(out)
        if host_in and any(isinstance(o, torch.Tensor) and o.device.type != "cpu" for o in outs):
            self.uploads.append(str(func))
        elif func is torch.ops.aten.index.Tensor:  # advanced indexing: its index list went up from the host
            self.uploads.append(str(func))
        return out


@pytest.mark.parametrize("sizes", [[(48, 64)] * 3, [(48, 64), (32, 40), (48, 64)]], ids=["one_size", "mixed"])
def test_device_path_uploads_only_the_frames(sizes):
    """Per batch the only host-to-device copy is the uint8 frames' (from the pinned buffer on CUDA): no list
    index upload (``frames[..., [2, 1, 0]]``) and no scale/bias from NumPy (``torch.as_tensor(numpy,
    device=...)``). The ``meta`` device stands in for CUDA: same dispatch, no data."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in sizes]
    pre = DevicePreprocessor(MANIFEST, device="meta", max_batch=4)
    pre(frames)  # first batch: per-size resize matrices and staging buffers are made (once)
    with _HostToDevice() as mode:
        out = pre(frames)
    assert out.device.type == "meta" and tuple(out.shape) == (len(frames), 3, SIZE, SIZE)
    assert len(mode.uploads) == len(set(sizes)), mode.uploads  # one frame upload per size group


def test_bgr_to_rgb_by_flip_matches_the_cpu_path():
    frames = _frames(48, 64, 2, smooth=True)
    out = DevicePreprocessor(MANIFEST, device="cpu", max_batch=2)(frames).numpy()
    assert np.abs(out - preprocess_frames(frames, MANIFEST)).max() <= TOLERANCE_LEVELS * LEVEL


@pytest.mark.gpu
def test_cuda_resize_normalize_never_syncs():
    """On a real GPU: the device part (flip, resize matmuls, affine) raises under sync debug mode "error" if
    anything in it waits for the device (a list index or a NumPy constant uploaded from pageable memory)."""
    from avloc.engines.preprocess import _affine, _weights, normalize_params

    _, _, scale, bias = normalize_params(MANIFEST)
    device = torch.device("cuda")
    frames = torch.from_numpy(np.stack(_frames(480, 640, 2, smooth=False))).to(device)
    weights, affine = _weights(480, 640, SIZE, SIZE, device), _affine(scale, bias, device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = resize_normalize(frames, MANIFEST, weights, affine)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (2, 3, SIZE, SIZE)

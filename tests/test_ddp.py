"""A 2-process DDP step on CPU (gloo over loopback) with negatives gathered across processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from avloc.core.audio import FrontEndConfig
from avloc.core.losses import LossConfig
from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
from avloc.stream.run.launcher import free_tcp_endpoint
from avloc.train.trainer import TrainStep, gather_with_grad

PER_RANK = 4
FRONTEND = FrontEndConfig(window_seconds=0.1)
LOSS = LossConfig(positives=("orig", "aug"), symmetric=True)


def _batch(seed: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for view in LOSS.positives:
        out[f"image_{view}"] = torch.randn(n, 3, 32, 32, generator=g)
        out[f"wave_{view}"] = torch.rand(n, FRONTEND.num_samples, generator=g) * 2 - 1
    return out


def _step_module() -> TrainStep:
    torch.manual_seed(0)
    step = TrainStep(SSLAlign(SSLAlignConfig(width=2)), FRONTEND, LOSS, amp=False)
    # BatchNorm from running statistics: with batch statistics a rank's forward would depend on its
    # share of the batch, and the two runs below could not be compared exactly.
    return step.eval()


def _flat_grads(module: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]).numpy()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        step = _step_module()
        ddp = torch.nn.parallel.DistributedDataParallel(step)
        full = _batch(0, PER_RANK * world)
        local = {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in full.items()}
        shapes = []

        def gather(x):
            y, offset = gather_with_grad(x)
            shapes.append((tuple(y.shape), offset))
            return y, offset

        loss, _ = ddp(local, gather)
        loss.backward()
        np.save(Path(out) / f"grads{rank}.npy", _flat_grads(step))
        np.save(Path(out) / f"shapes{rank}.npy", np.array([s[0][0] for s in shapes] + [s[1] for s in shapes]))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    return int(free_tcp_endpoint().rsplit(":", 1)[1])


def test_two_process_step_with_gathered_negatives(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    g0, g1 = np.load(tmp_path / "grads0.npy"), np.load(tmp_path / "grads1.npy")
    np.testing.assert_array_equal(g0, g1)  # DDP averaged the gradients: identical on both ranks

    # every gathered key tensor covers the global batch; this rank's rows start at rank * PER_RANK
    for rank in range(world):
        shapes = np.load(tmp_path / f"shapes{rank}.npy")
        rows, offsets = shapes[: len(shapes) // 2], shapes[len(shapes) // 2 :]
        assert (rows == PER_RANK * world).all() and (offsets == rank * PER_RANK).all()

    # Gathered negatives + DDP averaging == one process on the whole batch (mean over all rows).
    step = _step_module()
    loss, _ = step(_batch(0, PER_RANK * world))
    loss.backward()
    np.testing.assert_allclose(g0, _flat_grads(step), rtol=2e-4, atol=1e-6)

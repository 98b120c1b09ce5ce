"""Orphan checks for tests that start worker processes.

multiprocessing's helper processes (the resource tracker a ``torch.multiprocessing`` spawn leaves for
the life of the pytest process, a forkserver) are not workers of ours and outlive any one test, so
they are left out.
"""

from __future__ import annotations

from pathlib import Path

import psutil

_MP_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _is_mp_helper(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(name in cmdline for name in _MP_HELPERS)


def worker_processes(parent: psutil.Process | None = None) -> list[psutil.Process]:
    """All descendants of ``parent`` (default: this process) except multiprocessing's helpers."""
    parent = parent or psutil.Process()
    return [p for p in parent.children(recursive=True) if not _is_mp_helper(p)]


def orphans(parent: psutil.Process | None = None, timeout: float = 15.0) -> list[psutil.Process]:
    """Descendant workers still alive after waiting up to ``timeout`` seconds for them to exit."""
    _, alive = psutil.wait_procs(worker_processes(parent), timeout=timeout)
    return alive


def tiny_engine_and_clip(root: Path, seed: int) -> tuple[Path, Path]:
    """A width-8 SSL-Align exported to ``root/engine`` (64 px, 1 s linear front-end) and a 2 s 160x120 synth
    clip with a moving sounding object at ``root/clip.mp4``: what the stream tests replay."""
    from avloc.core.audio import FrontEndConfig
    from avloc.core.checkpoint import ImageConfig, save_checkpoint
    from avloc.core.data.synth import write_synth_video
    from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
    from avloc.engines.export import export_engine

    save_checkpoint(
        root / "ckpt.pt",
        SSLAlign(SSLAlignConfig(width=8)),
        method="ssl_align",
        model_config={"width": 8},
        frontend=FrontEndConfig(kind="linear", window_seconds=1.0),
        image=ImageConfig(size=64),
    )
    engine = export_engine(root / "ckpt.pt", root / "engine")
    write_synth_video(root / "clip.mp4", seconds=2.0, fps=15, size=(160, 120), seed=seed)
    return engine, root / "clip.mp4"

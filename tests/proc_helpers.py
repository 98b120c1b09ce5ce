"""Orphan checks for tests that start worker processes.

multiprocessing's helper processes (the resource tracker a ``torch.multiprocessing`` spawn leaves for
the life of the pytest process, a forkserver) are not workers of ours and outlive any one test, so
they are left out.
"""

from __future__ import annotations

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

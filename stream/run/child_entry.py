"""How the launcher starts each worker: ``python -m avloc.stream.run.child_entry LAUNCHER_PID MODULE ARGS...``.

The worker must die (SIGTERM, so it stops cleanly) when the launcher dies, even by SIGKILL: Linux's
``PR_SET_PDEATHSIG``. Setting it in a ``preexec_fn`` runs Python between fork and exec, which can deadlock the
child when the launcher runs in a thread beside others (a lock held by another thread at fork time is never
released in the child: it happened under the test suite). So the child sets it itself, first thing, here, and
then runs the worker module as ``python -m MODULE ARGS...`` would.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1
LAUNCHER_DIED_EXIT = 1


def _libc_prctl() -> Any:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:  # not Linux: the session and the launcher's explicit shutdown only
        return None


def die_with(launcher_pid: int) -> bool:
    """Ask for SIGTERM when the launcher exits; False when it is already gone (we were re-parented)."""
    prctl = _libc_prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == launcher_pid  # checked after prctl: a launcher dying in between is seen here


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: python -m avloc.stream.run.child_entry LAUNCHER_PID MODULE [ARGS...]")
    launcher_pid, module = int(argv[0]), argv[1]
    if not die_with(launcher_pid):
        sys.exit(LAUNCHER_DIED_EXIT)
    sys.argv = [module, *argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])

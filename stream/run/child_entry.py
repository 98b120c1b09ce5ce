"""How the launcher starts each worker:
``python -m avloc.stream.run.child_entry LAUNCHER_PID [--held] MODULE ARGS...``.

The worker must die (SIGTERM, so it stops cleanly) when the launcher dies, even by SIGKILL: Linux's
``PR_SET_PDEATHSIG``. Setting it in a ``preexec_fn`` runs Python between fork and exec, which can deadlock the
child when the launcher runs in a thread beside others (a lock held by another thread at fork time is never
released in the child: it happened under the test suite). So the child sets it itself, first thing, here, and
then runs the worker module as ``python -m MODULE ARGS...`` would.

``--held``: a process that must wait for others (a replay for the engine it plays into) is started at once but
held: it imports its module (torch and the rest: seconds, done while the engine loads) and then waits for the
launcher's ``go`` line on stdin before it runs. A stdin closed without ``go`` (the launcher is gone) ends it.
The module's work must therefore sit under ``if __name__ == "__main__":``, as every avloc worker's does.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import runpy
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1
LAUNCHER_DIED_EXIT = 1
HOLD_FLAG = "--held"
GO_LINE = b"go\n"  # what the launcher writes to a held child's stdin to let it run


def _libc_prctl() -> Any:
    try:  # the C library this interpreter is linked with (glibc's libc.so.6, musl's, ...)
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the session and the launcher's explicit shutdown only
        return None


def die_with(launcher_pid: int) -> bool:
    """Ask for SIGTERM when the launcher exits; False when it is already gone (we were re-parented)."""
    prctl = _libc_prctl()
    if prctl is not None and prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        print(
            f"avloc: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}): "
            "this process will not stop by itself if the launcher is killed",
            file=sys.stderr,
        )
    return os.getppid() == launcher_pid  # checked after prctl: a launcher dying in between is seen here


def main(argv: list[str]) -> None:
    held = len(argv) > 1 and argv[1] == HOLD_FLAG
    if held:
        argv = [argv[0], *argv[2:]]
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit(f"usage: python -m avloc.stream.run.child_entry LAUNCHER_PID [{HOLD_FLAG}] MODULE [ARGS...]")
    launcher_pid, module = int(argv[0]), argv[1]
    if not die_with(launcher_pid):
        sys.exit(LAUNCHER_DIED_EXIT)
    if held:
        importlib.import_module(module)  # its imports now, while what it waits for gets ready
        sys.modules.pop(module)  # runpy runs it afresh as __main__ (and warns about a module already imported)
        if sys.stdin.buffer.readline() != GO_LINE:  # closed without "go": the launcher is gone or stopping
            sys.exit(0)
    sys.argv = [module, *argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""How the launcher starts each worker:
``python -m avloc.stream.run.child_entry LAUNCHER_PID [--held] [--fast-exit] MODULE ARGS...``.

The worker must die (SIGTERM, so it stops cleanly) when the launcher dies, even by SIGKILL: Linux's
``PR_SET_PDEATHSIG``. Setting it in a ``preexec_fn`` runs Python between fork and exec, which can deadlock the
child when the launcher runs in a thread beside others (a lock held by another thread at fork time is never
released in the child: it happened under the test suite). So the child sets it itself, first thing, here, and
then runs the worker module as ``python -m MODULE ARGS...`` would.

``--fast-exit``: once the module's main has returned and what must outlive it is done (non-daemon threads
joined; ``atexit`` handlers run, logging's flush and pyzmq's garbage collector among them; every ZeroMQ context
terminated, which sends what its closed sockets still hold, up to their linger), the process ends with
``os._exit`` instead of finalizing the interpreter: with torch loaded that takes about a second, and a pipeline
stops its processes one after another. A socket still open (a thread may own it) means the normal exit instead.
The launcher asks for it for sources and inference workers, which write no files of their own.

``--held``: a process that must wait for others (a replay for the engine it plays into) is started at once but
held: it imports its module (torch and the rest: seconds, done while the engine loads) and then waits for the
launcher's ``go`` line on stdin before it runs. A stdin closed without ``go`` (the launcher is gone) ends it.
The module's work must therefore sit under ``if __name__ == "__main__":``, as every avloc worker's does.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import importlib
import os
import runpy
import signal
import sys
import threading
from typing import Any

import zmq

PR_SET_PDEATHSIG = 1
LAUNCHER_DIED_EXIT = 1
HOLD_FLAG = "--held"
FAST_EXIT_FLAG = "--fast-exit"
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


def exit_code(stop: SystemExit) -> int:
    """The status ``raise SystemExit(x)`` gives a process: None 0, an int itself, anything else printed and 1."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


def exit_without_finalizing(code: int) -> None:
    """End the process now, once what must outlive main is done (see the module's doc); returns (and the
    interpreter exits normally) when a ZeroMQ socket is still open."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()  # what the interpreter's exit would wait for
    # logging.shutdown, pyzmq's own garbage-collector thread and context, the rest: run here, and cleared once
    # run, so a normal exit below does not run them twice
    atexit._run_exitfuncs()
    contexts = [obj for obj in gc.get_objects() if issubclass(type(obj), zmq.Context)]  # type(): no __class__ lookups
    if any(not ctx.closed and len(getattr(ctx, "_sockets", (None,))) for ctx in contexts):
        return  # an open socket (or a pyzmq without _sockets): only the normal exit is known to be safe
    for ctx in contexts:
        if not ctx.closed:
            ctx.term()  # every socket is closed: returns once their lingering messages are out
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(code)


def main(argv: list[str]) -> None:
    flags = {HOLD_FLAG: False, FAST_EXIT_FLAG: False}
    while len(argv) > 1 and argv[1] in flags:
        flags[argv.pop(1)] = True
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit(
            "usage: python -m avloc.stream.run.child_entry LAUNCHER_PID "
            f"[{HOLD_FLAG}] [{FAST_EXIT_FLAG}] MODULE [ARGS...]"
        )
    launcher_pid, module = int(argv[0]), argv[1]
    if not die_with(launcher_pid):
        sys.exit(LAUNCHER_DIED_EXIT)
    if flags[HOLD_FLAG]:
        importlib.import_module(module)  # its imports now, while what it waits for gets ready
        sys.modules.pop(module)  # runpy runs it afresh as __main__ (and warns about a module already imported)
        if sys.stdin.buffer.readline() != GO_LINE:  # closed without "go": the launcher is gone or stopping
            sys.exit(0)
    sys.argv = [module, *argv[2:]]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        if not flags[FAST_EXIT_FLAG]:
            raise
        code = exit_code(stop)
    if flags[FAST_EXIT_FLAG]:
        exit_without_finalizing(code)
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])

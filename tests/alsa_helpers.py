"""Microphones for tests on machines without a sound card: ALSA's file plugin as PortAudio's default capture
device (../shared/README.md), set up by an ``.asoundrc`` in the ``HOME`` of the capturing process.

- :func:`file_microphone`: the plugin reads a raw file, as fast as it is read (no clock);
- :class:`PipeMicrophone`: the plugin reads a named pipe that a thread here fills at the sample rate, so the
  device delivers in real time; :meth:`PipeMicrophone.unplug` stops the samples (the capture thread then
  blocks in its read, as with a device that went away) and :meth:`PipeMicrophone.replug` resumes them.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import numpy as np


def _asoundrc(home: Path, infile: Path) -> None:
    (home / ".asoundrc").write_text(
        'pcm.!default { type plug slave.pcm "filein" }\n'
        f'pcm.filein {{ type file slave.pcm "nullpcm" file "/dev/null" infile "{infile}" format "raw" }}\n'
        "pcm.nullpcm { type null }\n"
    )


def file_microphone(home: Path, samples: np.ndarray) -> Path:
    """Default capture device of a process with ``HOME=home``: the raw little-endian int16 ``samples``
    ([n] mono or [n, channels] interleaved; the capture's own rate and channel count read them)."""
    raw = home / "mic.s16le"
    np.ascontiguousarray(samples, dtype="<i2").tofile(raw)
    _asoundrc(home, raw)
    return raw


class PipeMicrophone:
    """Real-time mono int16 samples (``samples`` looped) through a named pipe; use as a context manager."""

    def __init__(self, home: Path, samples: np.ndarray, rate: int) -> None:
        self.path = home / "mic.fifo"
        os.mkfifo(self.path)
        _asoundrc(home, self.path)
        self.samples = np.ascontiguousarray(samples, dtype="<i2")
        self.rate = rate
        self.written = 0  # samples written (the ones read by a probe that closed at once included)
        self._stop = threading.Event()
        self._unplugged = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipe-mic", daemon=True)

    def __enter__(self) -> PipeMicrophone:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def unplug(self) -> None:
        self._unplugged.set()

    def replug(self) -> None:
        self._unplugged.clear()

    def _run(self) -> None:
        fd = None
        pos = 0
        clock0 = time.monotonic()
        while not self._stop.is_set():
            if fd is None:
                try:  # never blocks: ENXIO until a reader (PortAudio opening the device) has the pipe open
                    fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as err:
                    if err.errno != errno.ENXIO:
                        raise
                    time.sleep(0.005)
                    continue
                clock0, pos = time.monotonic(), 0  # a new reader starts hearing "now"
            due = int((time.monotonic() - clock0) * self.rate)
            if self._unplugged.is_set():
                pos = due  # nothing delivered while unplugged
            elif due > pos:
                n = min(due - pos, self.rate // 10)
                start = self.written % len(self.samples)
                chunk = np.take(self.samples, np.arange(start, start + n), mode="wrap")
                try:
                    os.write(fd, chunk.tobytes())
                except BlockingIOError:  # the reader is not reading: those samples are lost, as on a device
                    pass
                except BrokenPipeError:  # the reader closed the device (a probe, or a reopen)
                    os.close(fd)
                    fd = None
                    continue
                pos += n
                self.written += n
            time.sleep(0.005)
        if fd is not None:
            os.close(fd)

"""Camera capture worker: any OpenCV source → latest frame → ``frame`` messages on a PUB socket.

A grab thread reads the source as fast as it delivers and keeps only the newest frame, so the OpenCV
(driver) buffer is always drained and the publisher never sends a stale frame: if publishing (or a
subscriber) is slower than the camera, intermediate frames are overwritten, never queued. A source that
fails to open or stops delivering is released and reopened with exponential back-off, so unplugging a
USB camera or a dropped RTSP connection heals by itself.

A source can also hang instead of failing (an RTSP server that accepts the connection and then sends
nothing: ``cap.grab()`` never returns). Files and URLs are opened with OpenCV's open/read timeouts
(``CAP_PROP_OPEN_TIMEOUT_MSEC`` / ``CAP_PROP_READ_TIMEOUT_MSEC``, honoured by the FFmpeg and GStreamer
backends), and a watchdog sees a grab thread stuck in one call for longer than ``--stall-timeout``: the worker
then beats ``state: stalled``, which the launcher does not count as alive, so it restarts the process (a thread
stuck inside a driver call cannot be interrupted from Python).

``--flow-control ENDPOINT`` (the heatmap publisher; ``avloc run`` passes it): past the inference worker's capacity the
camera converts and sends only about as many frames as the worker serves of its stream
(``avloc.stream.wire.flow``), like a replay. The grab thread still grabs every frame the source delivers, so the
driver's buffer stays drained and the frame that is sent is the newest; a skipped frame is never retrieved
(``cap.retrieve()``: the decoding/colour conversion of a grabbed frame) nor resized, copied or sent. Skipped frames are
counted in ``flow_skipped``, the allowance in the heartbeat's ``flow_allowance_fps``.

``--infer-frames EP --infer-size WxH`` also publishes every frame resized to the engine's input size (same seq and
timestamps) for the inference worker, so full frames cross the network only to the display (docs/multihost.md).

Run as a process: ``python -m avloc.stream.capture.camera --source 0 --endpoint tcp://127.0.0.1:5550``.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from avloc.core.errors import UserError
from avloc.core.media import fit_frame
from avloc.stream.runtime.worker import (
    STATE_STALLED,
    USER_ERROR_EXIT,
    Heartbeat,
    RateLimitedLog,
    add_common_arguments,
    install_stop_handlers,
    run_worker_main,
    setup_logging,
)
from avloc.stream.wire import protocol
from avloc.stream.wire.flow import FlowFeedback, add_flow_control_argument

log = logging.getLogger(__name__)

# A source that keeps failing to deliver this many reads in a row is considered lost and reopened.
MAX_CONSECUTIVE_READ_FAILURES = 5
OPEN_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 5.0
STALL_TIMEOUT_S = 15.0  # one OpenCV call running longer than this: the source hangs (beyond its timeouts)
DEVICES_HINT_CAMERAS = "`avloc devices` lists the cameras of this machine"


def parse_source(source: str | int) -> str | int:
    """``"0"`` → device index 0; anything else (file path, rtsp://, http://, a GStreamer pipeline) as is."""
    if isinstance(source, int):
        return source
    return int(source) if source.strip().isdigit() else source


def _is_file(source: str | int) -> bool:
    return isinstance(source, str) and "://" not in source and Path(source).suffix != ""


def open_with_timeouts(
    source: str | int, open_timeout_s: float = OPEN_TIMEOUT_S, read_timeout_s: float = READ_TIMEOUT_S
) -> Any:
    """``cv2.VideoCapture`` with open/read timeouts for files and URLs (FFmpeg/GStreamer honour them).

    Device indices are opened without: V4L2 refuses parameters it does not know, and the grab-thread watchdog
    covers a device that hangs. A local source (file, pipeline string) that fails with them gets a plain open.
    """
    if isinstance(source, int):
        return cv2.VideoCapture(source)
    params = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        int(open_timeout_s * 1000),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        int(read_timeout_s * 1000),
    ]
    cap = cv2.VideoCapture(source, cv2.CAP_ANY, params)
    if cap.isOpened() or "://" in source:  # a URL failing within its timeout must not be retried without
        return cap
    cap.release()  # e.g. a GStreamer pipeline string whose backend took no timeouts
    return cv2.VideoCapture(source)


def retry_schedule(initial_s: float, max_s: float) -> str:
    """The back-off of a failing device in words (what the console says the worker will do)."""
    return f"retrying after {initial_s:g} s, doubling up to every {max_s:g} s"


def why_not_open(source: str | int) -> str:
    """What went wrong opening ``source`` and what was tried, in one clause, for the console: a device index
    names its ``/dev/videoN`` node and whether it exists or is readable; a file whether it exists."""
    if isinstance(source, int):
        node = Path(f"/dev/video{source}")
        tried = f"tried OpenCV VideoCapture({source}) ({node})"
        if not node.exists():
            return f"{node} does not exist; {tried}"
        if not os.access(node, os.R_OK | os.W_OK):
            return f"{node} exists but this user may not open it (not in its group, e.g. 'video'); {tried}"
        return f"{node} exists but does not deliver (in use by another program, or not a capture node); {tried}"
    if "://" in source:
        return f"no stream from {source} (tried OpenCV with a {OPEN_TIMEOUT_S:g} s open timeout)"
    if _is_file(source) and not Path(source).exists():
        return f"{source}: no such file"
    return f"OpenCV cannot open or decode {source!r} (tried every OpenCV backend)"


# The --infer-fit modes a capture can apply: letterbox pads with the engine's normalisation mean, which a capture
# does not know (that engine is served with full frames).
INFER_FITS = ("stretch", "crop")


def parse_infer_size(value: str) -> tuple[int, int]:
    """``--infer-size WxH`` -> (width, height): the engine's input size (``image.size`` in its manifest)."""
    width, sep, height = value.lower().partition("x")
    try:
        size = (int(width), int(height)) if sep else (int(value), int(value))
    except ValueError:
        raise UserError(f"--infer-size {value!r}: expected WIDTHxHEIGHT in pixels, e.g. 224x224") from None
    if min(size) < 2 or max(size) > 8192:
        raise UserError(f"--infer-size {value!r}: expected WIDTHxHEIGHT between 2 and 8192 pixels")
    return size


def add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of a second frame publisher carrying frames already resized for the engine."""
    parser.add_argument(
        "--infer-frames",
        default=None,
        metavar="ENDPOINT",
        help="also publish each frame resized to --infer-size here (for the inference worker; "
        "the display keeps the full frames)",
    )
    parser.add_argument("--infer-size", default=None, metavar="WxH", help="the engine's input size, e.g. 224x224")
    parser.add_argument(
        "--infer-fit",
        default="crop",
        choices=INFER_FITS,
        help="how a frame becomes --infer-size: the engine's image.fit (`avloc info ENGINE`; crop, the export's "
        "default, or stretch); sent along, so the worker maps its map and peak back onto the full frame",
    )


def infer_output(args: argparse.Namespace) -> tuple[str | None, tuple[int, int] | None]:
    """(endpoint, size) of the resized frame stream, both None when not asked for."""
    if (args.infer_frames is None) != (args.infer_size is None):
        raise UserError("--infer-frames and --infer-size go together (the endpoint and the engine's input size)")
    return args.infer_frames, parse_infer_size(args.infer_size) if args.infer_size else None


def resize_for_inference(image: np.ndarray, size: tuple[int, int], fit: str = "stretch") -> np.ndarray:
    """``image`` at the engine's input size (W, H), made as the inference worker would (the live path's one
    definition, ``core.media.fit_frame``: the ``fit`` rectangle, INTER_AREA when shrinking, INTER_LINEAR when
    enlarging), so its own resize becomes a no-op and the heatmap is the same as from the full frame."""
    if fit not in INFER_FITS:
        raise UserError(f"--infer-fit {fit!r}: expected one of {', '.join(INFER_FITS)}")
    return fit_frame(image, (size[1], size[0]), fit)


@dataclass
class GrabbedFrame:
    index: int  # grab counter since the worker started (across reopens)
    capture_ts: float  # protocol.now() right after the frame was grabbed
    image: np.ndarray  # HxWx3 uint8 BGR, owned by this object (a fresh array per grab)


class LatestFrameGrabber:
    """Background thread that owns the ``cv2.VideoCapture`` and keeps only the newest frame.

    ``pace_fps``: a video *file* is read at its own frame rate (like a camera would deliver it) instead of
    as fast as it decodes; ``None`` → the file's fps for files, no pacing for devices and streams.

    ``flow``: flow control (``avloc.stream.wire.flow``), asked after each grab whether that frame is wanted; one it
    is not is grabbed (the source's queue drained) but not retrieved. Used by the grab thread only (a ZeroMQ
    socket belongs to one thread); the caller closes it after :meth:`stop`.
    """

    def __init__(
        self,
        source: str | int,
        *,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
        pace_fps: float | None = None,
        open_capture: Callable[[str | int], Any] = open_with_timeouts,
        flow: FlowFeedback | None = None,
    ) -> None:
        self.source = parse_source(source)
        self._flow = flow
        self.flow_skipped = 0  # grabbed frames past the flow-control allowance: never retrieved
        self.flow_state: dict[str, Any] = {}  # the allowance as of the last grab (heartbeats read it)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.pace_fps = pace_fps
        self._open_capture = open_capture
        self._cond = threading.Condition()
        self._latest: GrabbedFrame | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="grab", daemon=True)
        self.grabbed = 0
        self.overwritten = 0  # grabbed frames nobody took before the next one arrived
        self.open_attempts = 0
        self.open_failures = 0
        self.reopens = 0
        self.open_times: list[float] = []  # when each open attempt happened (for the back-off schedule)
        self._taken_index = -1
        self._busy: tuple[str, float] | None = None  # (OpenCV call, since when) while the thread is inside one
        # Why the source delivers nothing right now (cannot open / stopped delivering), for the console through
        # the heartbeat; None while frames flow. Worded without counters, so the launcher says it once.
        self.problem: str | None = None

    def _enter(self, call: str) -> None:
        self._busy = (call, time.monotonic())

    def _leave(self) -> None:
        self._busy = None

    def stalled(self, limit_s: float) -> str | None:
        """The OpenCV call the grab thread has been inside for more than ``limit_s`` (None when it is not)."""
        busy = self._busy
        if busy is not None and time.monotonic() - busy[1] > limit_s:
            return f"{busy[0]} for {time.monotonic() - busy[1]:.1f} s"
        return None

    def start(self) -> LatestFrameGrabber:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop the grab thread; False when it is still inside an OpenCV call after ``timeout_s``."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def latest(self, newer_than: int = -1, timeout_s: float = 1.0) -> GrabbedFrame | None:
        """The newest frame with ``index > newer_than``; waits up to ``timeout_s`` for one."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._latest is None or self._latest.index <= newer_than:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(remaining)
            self._taken_index = self._latest.index
            return self._latest

    def _open(self) -> Any | None:
        self.open_attempts += 1
        self.open_times.append(time.monotonic())
        self._enter("open")
        try:
            cap = self._open_capture(self.source)
        except Exception as err:  # a custom opener or a backend may raise instead of returning closed
            log.debug("opening %r raised %s", self.source, err)
            cap = None
        finally:
            self._leave()
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            self.open_failures += 1
            return None
        if isinstance(self.source, int):
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # ask the driver for a shallow queue too, where supported
        return cap

    def _run(self) -> None:
        backoff = self.backoff_initial_s
        ever_opened = False
        while not self._stop.is_set():
            cap = self._open()
            if cap is None:
                if self.problem is None or self.problem.startswith("stopped"):
                    self.problem = (
                        f"cannot open {self._what()}: {why_not_open(self.source)}; "
                        f"{retry_schedule(self.backoff_initial_s, self.backoff_max_s)}{self._hint()}"
                    )
                log.warning("cannot open source %r; retrying in %.1f s", self.source, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            if ever_opened:
                self.reopens += 1
            ever_opened = True
            log.info(
                "opened source %r (%dx%d @ %.1f fps)",
                self.source,
                int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                cap.get(cv2.CAP_PROP_FPS),
            )
            delivered = self._read_until_lost(cap)
            cap.release()
            if delivered:
                backoff = self.backoff_initial_s  # it worked for a while: start the back-off afresh
            if not self._stop.is_set():
                if not (delivered and _is_file(self.source)):  # a file at its end starts over: not a problem
                    self.problem = (
                        f"stopped delivering frames: {self._what()} "
                        f"({'no frame since it opened' if not delivered else f'after {delivered} frame(s)'}); "
                        f"reopening, {retry_schedule(self.backoff_initial_s, self.backoff_max_s)}{self._hint()}"
                    )
                log.warning("source %r stopped delivering frames; reopening in %.1f s", self.source, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)

    def _read_until_lost(self, cap: Any) -> int:
        pace = self.pace_fps
        if pace is None and _is_file(self.source):
            fps = cap.get(cv2.CAP_PROP_FPS)
            pace = fps if 0 < fps < 1000 else 30.0
        period = 1.0 / pace if pace else 0.0
        next_due = time.monotonic()
        failures = delivered = 0
        last_grab: float | None = None
        while not self._stop.is_set():
            if period:
                delay = next_due - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                next_due = max(next_due + period, time.monotonic() - period)
            self._enter("grab")
            ok = cap.grab()
            capture_ts = protocol.now()
            self._leave()
            if ok and self._flow is not None:
                step = capture_ts - last_grab if last_grab is not None else 0.0
                last_grab = capture_ts
                admitted = self._flow.admit(step)
                self.flow_state = self._flow.control.stats(capture_ts)
                if not admitted:
                    # past the worker's capacity: the frame is grabbed (the source's queue stays fresh) but
                    # neither retrieved (decoded, converted) nor offered for sending
                    failures = 0
                    delivered += 1
                    self.problem = None
                    self.flow_skipped += 1
                    self.grabbed += 1
                    continue
            self._enter("retrieve")
            ok, image = cap.retrieve() if ok else (False, None)
            self._leave()
            if not ok or image is None:
                failures += 1
                if failures >= MAX_CONSECUTIVE_READ_FAILURES or _is_file(self.source):
                    return delivered  # lost device, or end of a file (which then starts over)
                self._stop.wait(0.01)
                continue
            failures = 0
            delivered += 1
            self.problem = None
            if image.ndim == 2:
                image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
            with self._cond:
                if self._latest is not None and self._latest.index > self._taken_index:
                    self.overwritten += 1
                self._latest = GrabbedFrame(self.grabbed, capture_ts, image)
                self.grabbed += 1
                self._cond.notify_all()
        return delivered

    def _hint(self) -> str:
        return f"; {DEVICES_HINT_CAMERAS}" if isinstance(self.source, int) else ""

    def _what(self) -> str:
        return f"camera {self.source}" if isinstance(self.source, int) else f"source {self.source}"

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "grabbed": self.grabbed,
            "overwritten": self.overwritten,
            "open_attempts": self.open_attempts,
            "open_failures": self.open_failures,
            "reopens": self.reopens,
        }
        if self._flow is not None:
            out.update(flow_skipped=self.flow_skipped, **self.flow_state)
        return out


def run_camera(
    source: str | int,
    endpoint: str = protocol.DEFAULT_ENDPOINTS["frames"],
    stream_id: str = "cam0",
    *,
    fps_limit: float | None = None,
    heartbeat_endpoint: str | None = None,
    stop: threading.Event | None = None,
    backoff_initial_s: float = 0.5,
    backoff_max_s: float = 10.0,
    max_frames: int | None = None,
    ctx: zmq.Context | None = None,
    stall_timeout_s: float = STALL_TIMEOUT_S,
    open_capture: Callable[[str | int], Any] = open_with_timeouts,
    infer_endpoint: str | None = None,
    infer_size: tuple[int, int] | None = None,
    infer_fit: str = "crop",  # as --infer-fit and the export's image.fit
    flow_endpoint: str | None = None,
) -> dict[str, Any]:
    """Publish the newest frame of ``source`` on ``endpoint`` until ``stop`` is set; returns the counters.

    ``infer_endpoint``: also publish each frame resized to ``infer_size`` (width, height) there, with the same
    stream, seq and timestamps, so heatmaps computed from it match the full frames by seq.
    ``flow_endpoint``: the heatmap publisher; frames past what the worker serves of this stream are skipped.
    """
    stop = stop or threading.Event()
    ctx = ctx or zmq.Context.instance()
    warn = RateLimitedLog(log, 5.0)
    sock = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=True)
    infer_sock = (
        protocol.make_socket(ctx, zmq.PUB, infer_endpoint, bind=True) if infer_endpoint and infer_size else None
    )
    heartbeat = Heartbeat(ctx, heartbeat_endpoint, role="camera", stream=stream_id)
    flow = FlowFeedback(ctx, flow_endpoint, stream_id) if flow_endpoint else None
    grabber = LatestFrameGrabber(
        source,
        backoff_initial_s=backoff_initial_s,
        backoff_max_s=backoff_max_s,
        open_capture=open_capture,
        flow=flow,
    ).start()
    min_period = 1.0 / fps_limit if fps_limit else 0.0
    # ``published``: frames handed to libzmq. A PUB send never fails for a slow subscriber (it drops
    # silently), so there is no "dropped" count here: subscribers count the sequence gaps.
    published = 0
    last_index = -1
    last_publish = -float("inf")

    def stats() -> dict[str, Any]:
        stuck = grabber.stalled(stall_timeout_s)
        if stuck:
            warn("stalled", logging.ERROR, "grab thread stuck in %s: reporting stalled", stuck)
        # "loading" (not ready, for the launcher) until the source has delivered a frame
        state = STATE_STALLED if stuck else "ok" if grabber.grabbed else "loading"
        return {
            **grabber.stats(),
            "published": published,
            "state": state,
            "problem": grabber.problem,
            **({"stalled": stuck} if stuck else {}),
        }

    told: str | None = None  # the problem the last heartbeat carried
    try:
        while not stop.is_set() and (max_frames is None or published < max_frames):
            if heartbeat.due() or grabber.problem != told:  # a new problem goes out at once
                told = grabber.problem
                heartbeat.maybe_send(stats(), force=True)
            if min_period:
                wait = last_publish + min_period - protocol.now()
                if wait > 0:
                    stop.wait(wait)
                    continue
            frame = grabber.latest(newer_than=last_index, timeout_s=0.2)
            if frame is None:
                continue
            last_index = frame.index
            last_publish = protocol.now()
            height, width = frame.image.shape[:2]
            meta = {"width": width, "height": height, "source": str(source), "grab_index": frame.index}
            protocol.send(
                sock,
                "frame",
                stream=stream_id,
                seq=published,
                ts={"capture": frame.capture_ts, "send": protocol.now()},
                arrays={"frame": frame.image},
                meta=meta,
            )
            if infer_sock is not None and infer_size is not None:
                small = resize_for_inference(frame.image, infer_size, infer_fit)
                protocol.send(
                    infer_sock,
                    "frame",
                    stream=stream_id,
                    seq=published,
                    ts={"capture": frame.capture_ts, "send": protocol.now()},
                    arrays={"frame": small},
                    meta={
                        **meta,
                        "width": infer_size[0],
                        "height": infer_size[1],
                        "full_size": [width, height],
                        "fit": infer_fit,
                    },
                )
            published += 1
    finally:
        stopped = grabber.stop()
        if flow is not None and stopped:  # a grab thread stuck in the driver may still reach the socket: left open
            flow.close()
        final = stats()
        heartbeat.maybe_send(final, force=True)
        heartbeat.close()
        sock.close()
        if infer_sock is not None:
            infer_sock.close()
    log.info("camera %s stopped: %s", stream_id, final)
    return final


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m avloc.stream.capture.camera", description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="0", help="device index, video file, or rtsp:// / http:// URL")
    parser.add_argument(
        "--endpoint", "--frames", default=protocol.DEFAULT_ENDPOINTS["frames"], help="PUB endpoint to bind"
    )
    parser.add_argument("--fps-limit", type=float, default=None, help="publish at most this many frames/s")
    parser.add_argument("--backoff-max", type=float, default=10.0, help="longest wait between reopens (s)")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=STALL_TIMEOUT_S,
        help="an OpenCV open/grab running longer than this (s) reports the worker stalled",
    )
    add_flow_control_argument(parser, "convert and send", "every frame is still grabbed, so the newest is sent")
    add_infer_arguments(parser)
    add_common_arguments(parser, role="camera")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(f"camera:{args.stream_id}", args.log_file, args.verbose)
    stop = install_stop_handlers()
    try:
        infer_endpoint, infer_size = infer_output(args)
        run_camera(
            args.source,
            args.endpoint,
            args.stream_id,
            fps_limit=args.fps_limit,
            heartbeat_endpoint=args.heartbeat,
            stop=stop,
            backoff_max_s=args.backoff_max,
            stall_timeout_s=args.stall_timeout,
            infer_endpoint=infer_endpoint,
            infer_size=infer_size,
            infer_fit=args.infer_fit,
            flow_endpoint=args.flow_control,
        )
    except UserError as err:  # e.g. the endpoint is taken: one line, and the launcher does not retry
        log.error("%s", err)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    run_worker_main(main)

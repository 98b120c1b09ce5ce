"""Replay capture worker: a video file → ``frame`` and ``audio`` messages, as a camera and microphone would.

PyAV demuxes the file (mp4/mkv/webm/..., variable frame rate, any audio sample rate, mono or stereo). The
video and the audio track are read through two independent demuxers of the same file, so the audio can
always be decoded up to the current frame's time whatever the file's interleaving, with bounded memory.

Timing: media time m (seconds from the container's start) maps to the host's monotonic clock as
``t = t0 + (m - m0) / speed`` where ``t0`` is the clock when replay starts and ``m0`` the first frame's time.
At ``--speed 1.0`` (or any number) each frame is published at its own time ``t`` with ``ts.capture = t``;
audio windows come from the file's own track through the shared ``StreamingFrontEnd`` every hop, each
published at (and stamped ``ts.window_end`` with) the time of its last sample, so a window always goes out
before the frames that follow it. The audio before the file's start is taken as silence, so windows exist
from the first hop on (causal: a window never contains samples after its end time).

At ``--speed max`` nothing waits for the clock: the sockets use ``XPUB_NODROP``, so when a subscriber's
queue (high-water mark) is full the replay waits instead of dropping or queueing: it runs as fast as the
slowest subscriber, with nothing unbounded anywhere. Timestamps are then the actual publish times.

A file without an audio track still plays: every frame carries ``meta.has_audio = false`` and
``meta.notice = "no_audio"``, and a ``control`` notice is repeated every 2 s. When the file ends (and
``--loop`` is off) an ``end`` control message goes to the frame subscribers and the launcher, then the
worker exits 0. A truncated or corrupt file logs an error and ends the same way (``meta.error`` says why).

``--flow-control ENDPOINT`` (the heatmap publisher; ``avloc.stream.run.pipeline`` passes it): past the worker's capacity
the replay sends about as many frames as the worker serves of its stream and skips the others before they are
converted to BGR, copied or sent (``avloc.stream.wire.flow``); the skipped frames are counted in ``flow_skipped``.
While throttled it also computes and sends one audio window every ``--flow-audio-reuse`` + hop seconds (the
worker's ``audio_reuse_s``, which the pipelines pass: the worker would reuse one embedding over that span) instead
of one every hop; the windows not computed are counted in ``flow_audio_skipped``.

``--infer-frames EP --infer-size WxH`` also publishes every frame resized to the engine's input size (same stream,
seq and timestamps, control messages too) for the inference worker, while the display keeps the full frames on
``--frames`` (docs/multihost.md).

Run as a process: ``python -m avloc.stream.capture.replay VIDEO --frames EP --audio EP --speed 1.0``.
"""

from __future__ import annotations

import argparse
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import zmq

from avloc.core.audio import FrontEndConfig, StreamingFrontEnd
from avloc.core.errors import DataError, UserError
from avloc.stream.capture.camera import add_infer_arguments, infer_output, resize_for_inference
from avloc.stream.runtime.worker import (
    USER_ERROR_EXIT,
    Heartbeat,
    RateLimitedLog,
    add_common_arguments,
    install_stop_handlers,
    load_frontend,
    make_publisher,
    run_worker_main,
    setup_logging,
    wait_for_subscribers,
)
from avloc.stream.wire import protocol, security
from avloc.stream.wire.flow import DEFAULT_AUDIO_REUSE_S, FlowFeedback, add_flow_control_argument, audio_spacing

log = logging.getLogger(__name__)

DEFAULT_HOP_SECONDS = 0.1
NOTICE_EVERY_S = 2.0
START_LEAD_S = 0.05  # first frame goes out this long after start, so it is never already late


def parse_speed(value: str | float | None) -> float | None:
    """``"max"`` → None (as fast as subscribers take it); else a positive factor (1.0 = real time)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "max"):
        return None
    try:
        speed = float(value)
    except ValueError:
        raise UserError(f"--speed {value!r}: expected a positive number or 'max'") from None
    if not math.isfinite(speed) or speed <= 0:
        raise UserError(f"--speed {value!r}: expected a positive number or 'max'")
    return speed


def _open(path: Path) -> Any:
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise DataError(path, f"cannot open as a video ({err})") from None


class _AudioTrack:
    """The file's audio, decoded lazily, mono at the front-end rate; sample k is media time k / rate.

    ``take(n)`` returns samples [pos, n): audio before the track's first packet is silence, and past its
    end (or after a decoding error) zeros, so the clock mapping never slips.
    """

    def __init__(self, path: Path, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.pos = 0
        self.error: str | None = None
        self._container = _open(path)
        stream = self._container.streams.audio[0]
        self._frames = self._container.decode(stream)
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        self._pending: deque[np.ndarray] = deque()
        self._decoded = 0  # samples (media coordinates) decoded so far
        self._started = False
        self.finished = False

    def _decode_more(self) -> None:
        if self._container is None:  # closed: nothing more will come
            self.finished = True
            return
        try:
            frame = next(self._frames)
        except StopIteration:
            self._finish(None)
            return
        except av.error.FFmpegError as err:
            self._finish(f"audio decoding failed: {err}")
            return
        if not self._started:
            self._started = True
            start = frame.time or 0.0
            lead = round(start * self.sample_rate)
            if lead > 0:
                self._push(np.zeros(lead, np.float32))
            elif lead < 0:
                self._decoded = lead  # drop the samples before media time 0 as they arrive
        for out in self._resampler.resample(frame):
            self._push(out.to_ndarray()[0])

    def _push(self, samples: np.ndarray) -> None:
        if self._decoded < 0:
            skip = min(-self._decoded, len(samples))
            samples = samples[skip:]
            self._decoded += skip
        if len(samples):
            self._pending.append(samples.astype(np.float32, copy=False))
            self._decoded += len(samples)

    def _finish(self, error: str | None) -> None:
        if error:
            self.error = error
            log.error("%s; the rest of the audio is silence", error)
        try:
            for out in self._resampler.resample(None):
                self._push(out.to_ndarray()[0])
        except (av.error.FFmpegError, ValueError):
            pass
        self.finished = True
        self.close()

    def take(self, until: int) -> np.ndarray:
        while self._decoded < until and not self.finished:
            self._decode_more()
        want = max(0, until - self.pos)
        parts = []
        got = 0
        while got < want and self._pending:
            chunk = self._pending.popleft()
            if got + len(chunk) > want:
                self._pending.appendleft(chunk[want - got :])
                chunk = chunk[: want - got]
            parts.append(chunk)
            got += len(chunk)
        if got < want:
            parts.append(np.zeros(want - got, np.float32))
        self.pos = max(self.pos, until)
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class TruncatedError(Exception):
    """The video stream ends well before the duration its header claims."""


def _claimed_seconds(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000
    return None


def _iter_frames(path: Path) -> Iterator[tuple[float, Any]]:
    """(media seconds, decoded ``av.VideoFrame``) of the first video stream; the caller converts the frames
    it sends (``to_ndarray(format="bgr24")``: about as much CPU as decoding) and skips the others.

    Raises av.error.FFmpegError on corrupt data and TruncatedError when a file cut short (Matroska/WebM
    decode up to the cut without any FFmpeg error) ends before the duration in its header.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        last = None
        for frame in container.decode(stream):
            t = frame.time
            if t is None:  # no timestamp: continue from the previous frame
                t = 0.0 if last is None else last + 1.0 / rate
            last = t
            yield t, frame
        claimed = _claimed_seconds(container, stream)
        decoded = 0.0 if last is None else last + 1.0 / rate
        if claimed is not None and decoded < claimed - (0.25 + 0.02 * claimed):
            raise TruncatedError(f"video decodes to {decoded:.2f} s, the file claims {claimed:.2f} s")
    finally:
        container.close()


def iter_bgr_frames(path: Path) -> Iterator[tuple[float, np.ndarray]]:
    """(media seconds, HxWx3 BGR uint8) of every frame: the offline readers' view of :func:`_iter_frames`
    (``avloc localize``, ``avloc.Localizer.video``), converted exactly as a replay converts the frames it sends."""
    for t, decoded in _iter_frames(path):
        yield t, decoded.to_ndarray(format="bgr24")


class ReplaySource:
    """Publishes one file's frames and audio windows on two PUB (XPUB) sockets; see the module docstring."""

    def __init__(
        self,
        video: str | Path,
        frames_endpoint: str,
        audio_endpoint: str,
        stream_id: str = "cam0",
        *,
        speed: float | None = 1.0,
        loop: bool = False,
        frontend: FrontEndConfig | None = None,
        hop_seconds: float = DEFAULT_HOP_SECONDS,
        heartbeat_endpoint: str | None = None,
        stop: threading.Event | None = None,
        wait_subscribers: int = 1,
        wait_timeout_s: float = 30.0,
        ctx: zmq.Context | None = None,
        infer_endpoint: str | None = None,
        infer_size: tuple[int, int] | None = None,
        infer_fit: str = "crop",  # as --infer-fit and the export's image.fit
        flow_endpoint: str | None = None,
        flow_audio_reuse_s: float = DEFAULT_AUDIO_REUSE_S,
    ) -> None:
        self.path = Path(video)
        if not self.path.is_file():
            raise DataError(self.path, "no such video file")
        self.has_audio = False
        self.stream_id = stream_id
        self.speed = speed
        self.loop = loop
        self.config = frontend or FrontEndConfig()
        self.hop = max(1, round(hop_seconds * self.config.sample_rate))
        self.stop = stop or threading.Event()
        self.wait_subscribers = wait_subscribers
        self.wait_timeout_s = wait_timeout_s
        self._ctx = ctx or zmq.Context.instance()
        self._frames_endpoint = frames_endpoint
        self._audio_endpoint = audio_endpoint
        self._heartbeat_endpoint = heartbeat_endpoint
        # a second frame stream at the engine's input size (camera.resize_for_inference), same seq and timestamps
        self._infer_endpoint = infer_endpoint if infer_size else None
        self._infer_size = infer_size
        self._infer_fit = infer_fit
        self._infer_sock: zmq.Socket | None = None
        # flow control from the worker's heatmaps (real-time speeds only: at --speed max back-pressure paces)
        self._flow_endpoint = flow_endpoint if speed is not None else None
        self._flow: FlowFeedback | None = None
        if not (math.isfinite(flow_audio_reuse_s) and flow_audio_reuse_s >= 0):
            raise UserError(f"--flow-audio-reuse {flow_audio_reuse_s}: expected seconds >= 0")
        self._flow_audio_spacing = audio_spacing(flow_audio_reuse_s, self.hop / self.config.sample_rate)
        self._warn = RateLimitedLog(log, 5.0)
        self._token = security.run_token()
        # frames/windows count what was handed to libzmq; a PUB never refuses a send at a finite speed (a slow
        # subscriber's queue drops silently), so drops are counted by consumers from sequence gaps
        self.stats: dict[str, Any] = {
            "frames": 0,
            "windows": 0,
            "loops": 0,
            "late_frames": 0,
            "flow_skipped": 0,
            "flow_audio_skipped": 0,
        }

    def _send(self, sock: zmq.Socket, kind: str, **fields: Any) -> bool:
        """Publish; at --speed max wait while the subscriber queue is full (until stopped)."""
        while True:
            if protocol.send(sock, kind, stream=self.stream_id, **fields):
                return True
            if self.speed is not None:
                return False
            if self.stop.wait(0.002):
                return False

    # ------------------------------------------------------------------------------------------ run

    def run(self, max_frames: int | None = None) -> dict[str, Any]:
        frames_sock = make_publisher(self._ctx, self._frames_endpoint, nodrop=self.speed is None)
        audio_sock = make_publisher(self._ctx, self._audio_endpoint, nodrop=self.speed is None)
        if self._infer_endpoint:
            self._infer_sock = make_publisher(self._ctx, self._infer_endpoint, nodrop=self.speed is None)
        if self._flow_endpoint:
            self._flow = FlowFeedback(self._ctx, self._flow_endpoint, self.stream_id, self._flow_audio_spacing)
        heartbeat = Heartbeat(self._ctx, self._heartbeat_endpoint, role="replay", stream=self.stream_id)
        error: str | None = None
        try:
            try:
                self._probe()
            except DataError as err:
                error = str(err)
                log.error("%s", error)
            # also when the file is unreadable, so that subscribers do get the 'end' (with the error)
            # frames go to the inference worker and the display, audio only to the inference worker
            sockets, needed = [frames_sock], [self.wait_subscribers]
            if self._infer_sock is not None:  # the inference worker
                sockets.append(self._infer_sock)
                needed.append(min(self.wait_subscribers, 1))
            if self.has_audio:
                sockets.append(audio_sock)
                needed.append(min(self.wait_subscribers, 1))
            wait_for_subscribers(sockets, needed, self.wait_timeout_s, self.stop, heartbeat)
            if error is None:
                error = self._play(frames_sock, audio_sock, heartbeat, max_frames)
        finally:
            ended = not self.stop.is_set()
            if ended:
                self._send_end(frames_sock, error)
                heartbeat.control(protocol.CONTROL_END, error=error, stats=dict(self.stats))
            heartbeat.maybe_send(self.stats, force=True)
            heartbeat.close()
            frames_sock.close(linger=500 if ended else 0)  # let the "end" message out
            audio_sock.close()
            if self._infer_sock is not None:
                self._infer_sock.close(linger=500 if ended else 0)
            if self._flow is not None:
                self._flow.close()
        log.info("replay %s finished (error: %s): %s", self.path.name, error, self.stats)
        return {**self.stats, "error": error}

    def _send_end(self, sock: zmq.Socket, error: str | None) -> None:
        """The 'end' must not be dropped behind a full subscriber queue: wait for room (at most 2 s)."""
        meta = {"command": protocol.CONTROL_END, "error": error, **self.stats}
        deadline = protocol.now() + 2.0
        for target in (sock, self._infer_sock):
            if target is None:
                continue
            target.setsockopt(zmq.XPUB_NODROP, 1)
            while not self._send_control(target, meta, also_infer=False):
                if protocol.now() > deadline:
                    log.warning("a subscriber is not reading: the 'end' message could not be sent")
                    break
                time.sleep(0.005)

    def _send_control(self, sock: zmq.Socket, meta: dict[str, Any], also_infer: bool = True) -> bool:
        """A control message tagged with the run token (the inference worker ignores untagged ones); also on the
        resized-frame stream, which is where the inference worker listens then."""
        seq, ts = self.stats["frames"], {"send": protocol.now()}
        meta = security.signed_meta(self._token, "control", self.stream_id, seq, ts, meta)
        if also_infer and self._infer_sock is not None:
            protocol.send(self._infer_sock, "control", stream=self.stream_id, seq=seq, ts=ts, meta=meta)
        return protocol.send(sock, "control", stream=self.stream_id, seq=seq, ts=ts, meta=meta)

    def _probe(self) -> None:
        container = _open(self.path)
        try:
            if not container.streams.video:
                raise DataError(self.path, "has no video stream")
            self.has_audio = bool(container.streams.audio)
        finally:
            container.close()
        if not self.has_audio:
            log.warning("%s has no audio track: frames only, with a 'no_audio' notice", self.path)

    def _clock(self, media_t: float) -> float:
        return self._t0 + (media_t - self._m0) / self.speed if self.speed else protocol.now()

    def _wait_until(self, t: float) -> bool:
        """Sleep until clock time t (no-op at --speed max); False when stopped meanwhile."""
        if self.speed is None:
            return not self.stop.is_set()
        delay = t - protocol.now()
        if delay > 0:
            return not self.stop.wait(delay)
        return not self.stop.is_set()

    def _play(
        self, frames_sock: zmq.Socket, audio_sock: zmq.Socket, heartbeat: Heartbeat, max_frames: int | None
    ) -> str | None:
        sr = self.config.sample_rate
        frontend = StreamingFrontEnd(self.config, self.hop)
        # Silence before the file: the first window ends one hop into it (prefill of num_samples - hop).
        prefill = self.config.num_samples - self.hop
        frontend.push(np.zeros(prefill, np.float32))
        frontend.frontend.compute(np.zeros(self.config.num_samples, np.float32))  # warm up before the clock
        pending: deque[tuple[int, np.ndarray]] = deque()  # (global end sample, spec) not yet published
        loop_offset = 0.0  # media seconds played in previous loops
        self._t0 = protocol.now() + START_LEAD_S
        self._m0: float | None = None
        last_notice = -math.inf
        keep = None  # which windows are computed: all, or while throttled the flow control's spacing
        if self._flow is not None and self._flow.control.audio_spacing_s > 0:
            control = self._flow.control

            def keep(end: int) -> bool:
                if control.admit_window(self._clock((end - prefill) / sr), protocol.now()):
                    return True
                self.stats["flow_audio_skipped"] += 1
                return False

        while True:
            track = _AudioTrack(self.path, sr) if self.has_audio else None
            last_t = None
            frame_step = 1.0 / 30
            try:
                for t, decoded in _iter_frames(self.path):
                    if self.stop.is_set() or (max_frames is not None and self.stats["frames"] >= max_frames):
                        return None
                    if last_t is not None and t > last_t:
                        frame_step = t - last_t
                    last_t = t
                    media = loop_offset + t
                    if self._m0 is None:
                        self._m0 = media
                    if track is not None:  # audio up to this frame -> windows ending at or before it
                        block = track.take(math.floor(t * sr))
                        for end, spec in frontend.push(block, keep):
                            pending.append((end - prefill, spec))
                        while pending and pending[0][0] <= round(media * sr):
                            end, spec = pending.popleft()
                            self._publish_window(audio_sock, end, spec)
                    elif protocol.now() - last_notice >= NOTICE_EVERY_S:
                        last_notice = protocol.now()
                        notice = {"command": protocol.CONTROL_NOTICE, "notice": protocol.NOTICE_NO_AUDIO}
                        self._send_control(frames_sock, notice)
                    if self._flow is not None and not self._flow.admit(frame_step):
                        # the worker serves fewer frames of this stream than it is sent: skip this one
                        # before it costs a conversion and a copy to every subscriber (keeping the clock)
                        self.stats["flow_skipped"] += 1
                        if not self._wait_until(self._clock(media)):
                            return None
                    elif not self._publish_frame(frames_sock, media, t, decoded.to_ndarray(format="bgr24")):
                        return None
                    if heartbeat.due():
                        flow = self._flow.control.stats(protocol.now()) if self._flow is not None else {}
                        heartbeat.maybe_send({**self.stats, **flow})
                if last_t is None:
                    return f"{self.path}: no decodable video frames"
                if not self.loop:
                    return track.error if track is not None else None
                # The next loop continues the clock and the audio one frame after this loop's last frame.
                loop_duration = last_t + frame_step
                if track is not None:
                    for end, spec in frontend.push(track.take(round(loop_duration * sr)), keep):
                        pending.append((end - prefill, spec))
            except (av.error.FFmpegError, TruncatedError) as err:
                error = f"{self.path}: truncated or corrupt after {self.stats['frames']} frames ({err})"
                log.error("%s", error)
                return error
            finally:
                if track is not None:
                    track.close()
            loop_offset += loop_duration
            self.stats["loops"] += 1
            log.info("replay %s: loop %d", self.path.name, self.stats["loops"])

    def _publish_window(self, sock: zmq.Socket, end: int, spec: np.ndarray) -> None:
        t = self._clock(end / self.config.sample_rate)
        if not self._wait_until(t):
            return
        ts = {"window_end": t if self.speed else protocol.now()}
        ts["send"] = protocol.now()
        if self._send(
            sock,
            "audio",
            seq=self.stats["windows"],
            ts=ts,
            arrays={"spec": spec},
            meta={
                "end_sample": end,
                "sample_rate": self.config.sample_rate,
                "frontend": self.config.to_dict(),
                "hop_samples": self.hop,
            },
        ):
            self.stats["windows"] += 1

    def _publish_frame(self, sock: zmq.Socket, media: float, pts: float, image: np.ndarray) -> bool:
        t = self._clock(media)
        if not self._wait_until(t):
            return False
        now = protocol.now()
        if self.speed and now - t > 0.1:
            self.stats["late_frames"] += 1
            self._warn("late", logging.WARNING, "frames late (decoding slower than %.2fx)", self.speed)
        meta: dict[str, Any] = {
            "width": image.shape[1],
            "height": image.shape[0],
            "source": str(self.path),
            "pts": round(pts, 6),
            "has_audio": self.has_audio,
        }
        if not self.has_audio:
            meta["notice"] = protocol.NOTICE_NO_AUDIO
        capture = t if self.speed else now
        ok = self._send(
            sock,
            "frame",
            seq=self.stats["frames"],
            ts={"capture": capture, "send": protocol.now()},
            arrays={"frame": image},
            meta=meta,
        )
        if self._infer_sock is not None and self._infer_size is not None:
            small = resize_for_inference(image, self._infer_size, self._infer_fit)
            self._send(
                self._infer_sock,
                "frame",
                seq=self.stats["frames"],
                ts={"capture": capture, "send": protocol.now()},
                arrays={"frame": small},
                meta={
                    **meta,
                    "width": small.shape[1],
                    "height": small.shape[0],
                    "full_size": [image.shape[1], image.shape[0]],
                    "fit": self._infer_fit,  # the worker maps its map and peak back onto the full frame
                },
            )
        self.stats["frames"] += 1
        return ok or self.speed is not None


def run_replay(
    video: str | Path,
    frames_endpoint: str = protocol.DEFAULT_ENDPOINTS["frames"],
    audio_endpoint: str = protocol.DEFAULT_ENDPOINTS["audio"],
    stream_id: str = "cam0",
    **options: Any,
) -> dict[str, Any]:
    """Replay ``video`` until it ends (or ``stop``); returns counters and ``error`` (None when clean)."""
    max_frames = options.pop("max_frames", None)
    return ReplaySource(video, frames_endpoint, audio_endpoint, stream_id, **options).run(max_frames)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m avloc.stream.capture.replay", description=__doc__.splitlines()[0])
    parser.add_argument("video", help="video file (mp4, mkv, webm, ...)")
    parser.add_argument("--frames", default=protocol.DEFAULT_ENDPOINTS["frames"], help="frames endpoint")
    parser.add_argument("--audio", default=protocol.DEFAULT_ENDPOINTS["audio"], help="audio endpoint")
    parser.add_argument("--speed", default="1.0", help="playback speed factor, or 'max'")
    parser.add_argument("--loop", action="store_true", help="start over at the end (never sends 'end')")
    parser.add_argument("--hop", type=float, default=DEFAULT_HOP_SECONDS, help="seconds between windows")
    parser.add_argument(
        "--frontend",
        default=None,
        metavar="JSON|FILE|ENGINE_DIR",
        help="audio front-end config (default: linear 3 s, as SSL-Align)",
    )
    parser.add_argument(
        "--wait-subscribers",
        type=int,
        default=1,
        help="wait for this many frame subscribers (audio: at most 1) before starting (0: don't)",
    )
    parser.add_argument("--wait-timeout", type=float, default=30.0, help="longest wait for subscribers (s)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    add_flow_control_argument(parser, "send")
    parser.add_argument(
        "--flow-audio-reuse",
        type=float,
        default=DEFAULT_AUDIO_REUSE_S,
        metavar="SECONDS",
        help="the inference worker's audio_reuse_s: with --flow-control, while throttled send one audio window "
        "every this + --hop seconds (0: every window; default %(default)s, the worker's default)",
    )
    add_infer_arguments(parser)
    add_common_arguments(parser, role="replay")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(f"replay:{args.stream_id}", args.log_file, args.verbose)
    torch.set_num_threads(1)  # one window per hop is cheap; leave the cores to the inference worker
    stop = install_stop_handlers()
    try:
        infer_endpoint, infer_size = infer_output(args)
        run_replay(
            args.video,
            args.frames,
            args.audio,
            args.stream_id,
            speed=parse_speed(args.speed),
            loop=args.loop,
            frontend=load_frontend(args.frontend),
            hop_seconds=args.hop,
            heartbeat_endpoint=args.heartbeat,
            stop=stop,
            wait_subscribers=args.wait_subscribers,
            wait_timeout_s=args.wait_timeout,
            max_frames=args.max_frames,
            infer_endpoint=infer_endpoint,
            infer_size=infer_size,
            infer_fit=args.infer_fit,
            flow_endpoint=args.flow_control,
            flow_audio_reuse_s=args.flow_audio_reuse,
        )
    except UserError as err:
        log.error("%s", err)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    run_worker_main(main)

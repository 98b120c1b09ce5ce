"""Inference worker: frames + audio windows in, heatmaps out.

One process subscribes to every camera/replay frame stream and audio-window stream, pairs each frame with
the newest audio window that ends at or before the frame's capture time (causal: never audio from the
future), runs the engine and publishes one ``heatmap`` message per processed frame (docs/protocol.md).

Real time first, so nothing here can queue without bound:
- each loop drains both sockets completely and keeps only the newest frame per stream; a frame replaced
  before it was processed is counted in ``drops`` (sequence gaps seen on the wire — frames the HWM dropped
  upstream — are counted in ``gaps``);
- the audio embedding is computed once per window (cached by window), so every frame of one hop reuses
  it; when the worker is idle it embeds the newest window ahead of need;
- frames of several streams that are pending together run as one batch.

Silence gate: when the engine's manifest has a ``gate`` (``avloc export --gate-data``), a heatmap whose
confidence is below ``gate.threshold`` is still published, array and peak included, with
``meta.notice = "not_visible"`` (the source is probably silent or off-screen); ``--no-gate`` turns this off.

Malformed messages are rejected and counted (per socket, reported in the heartbeat's stats), never fatal.
Run as a process: ``python -m avloc.stream.inference --engine ENGINE_DIR --frames EP --audio EP``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from avloc.core.errors import UserError
from avloc.stream import protocol, security
from avloc.stream.worker import (
    USER_ERROR_EXIT,
    Heartbeat,
    RateLimitedLog,
    add_common_arguments,
    install_stop_handlers,
    setup_logging,
)

log = logging.getLogger(__name__)

AUDIO_HISTORY = 64  # audio windows kept per stream (several seconds at a 100 ms hop)
EMBED_CACHE = 16  # audio embeddings kept per stream
POLL_MS = 20
# Per-stream state is bounded: at most MAX_STREAMS stream ids (the least recently heard is forgotten first),
# and a stream silent for STREAM_SILENCE_S is forgotten, so made-up stream ids cannot grow memory or the stats.
MAX_STREAMS = 64
STREAM_SILENCE_S = 60.0
FRAME_RCVHWM = 64  # frames libzmq may hold for us (~2 s at 30 fps; 60 MB of 640x480 BGR at most)


@dataclass
class AudioWindow:
    seq: int
    end_ts: float  # clock time of the window's last sample
    spec: np.ndarray  # [1, F, T] float32


@dataclass
class PendingFrame:
    message: protocol.Message
    received: float


@dataclass
class AudioTrack:
    """Recent audio windows of one stream and their embeddings (computed at most once each)."""

    windows: deque[AudioWindow] = field(default_factory=lambda: deque(maxlen=AUDIO_HISTORY))
    embeddings: OrderedDict[int, np.ndarray] = field(default_factory=OrderedDict)
    last_received: float = -math.inf

    def add(self, window: AudioWindow, received: float) -> None:
        # Windows normally arrive in order. A restarted publisher starts its seq again (with later end
        # times): embeddings are cached by seq, so a seq that does not grow starts the track afresh.
        last = self.windows[-1] if self.windows else None
        if last is not None and (window.end_ts < last.end_ts or window.seq <= last.seq):
            self.windows.clear()
            self.embeddings.clear()
        self.windows.append(window)
        self.last_received = received

    def window_for(self, capture_ts: float) -> AudioWindow | None:
        """The newest window ending at or before ``capture_ts``."""
        for window in reversed(self.windows):
            if window.end_ts <= capture_ts:
                return window
        return None


@dataclass
class WorkerStats:
    frames: int = 0  # frame messages received
    audio: int = 0  # audio windows received
    processed: int = 0  # frames that went through the engine (or were suppressed)
    published: int = 0
    drops: int = 0  # frames replaced by a newer one of the same stream before processing
    gaps: int = 0  # frames missing in the sequence numbers (dropped upstream by the HWM)
    suppressed: int = 0  # heatmaps suppressed for lack of audio
    not_visible: int = 0  # heatmaps published with notice not_visible (confidence below the gate)
    audio_embeds: int = 0
    audio_reused: int = 0  # frames paired with an older, already embedded window (audio_reuse_s)
    batches: int = 0
    streams_evicted: int = 0  # stream ids forgotten (silent for STREAM_SILENCE_S, or over MAX_STREAMS)
    first_publish: float | None = None
    last_publish: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _normalizer(manifest: dict[str, Any]) -> tuple[float, float]:
    """Value range of the engine's heatmap (cosine similarity: [-1, 1]) mapped linearly onto [0, 1]."""
    outputs = manifest.get("outputs", {}) if isinstance(manifest.get("outputs"), dict) else {}
    heat = outputs.get("heatmap", {}) if isinstance(outputs.get("heatmap"), dict) else {}
    lo, hi = heat.get("range", manifest.get("heatmap_range", (-1.0, 1.0)))
    return float(lo), float(hi)


def _spec_shape(manifest: dict[str, Any]) -> tuple[int, ...] | None:
    """Shape of one spectrogram window the engine takes, from the manifest's front-end config."""
    frontend = manifest.get("frontend")
    if not isinstance(frontend, dict):
        return None
    from avloc.core.audio import FrontEndConfig

    try:
        return tuple(FrontEndConfig.from_dict(frontend).output_shape())
    except UserError as err:  # an odd manifest only disables the shape check
        log.warning("cannot derive the spectrogram shape from the manifest (%s); not checking it", err)
        return None


def encode_heatmap(heatmap: np.ndarray, lo: float, hi: float, dtype: str) -> np.ndarray:
    """Map ``[lo, hi]`` onto ``[0, 1]``; float16, or uint8 holding ``round(255 * v)`` (docs/protocol.md)."""
    unit = np.clip((heatmap.astype(np.float32) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    if dtype == "uint8":
        return np.round(unit * 255.0).astype(np.uint8)
    return unit.astype(np.float16)


def peak_of(heatmap: np.ndarray, upsample: int = 8) -> tuple[float, float]:
    """Normalized (x, y) of the hottest point of the heatmap upsampled bilinearly (as a display shows it).

    The map is coarse (e.g. 14x14), so the argmax is taken on a ``upsample``-times larger bilinear resize
    (half-pixel centres, like ``F.interpolate(align_corners=False)``) for a sub-cell peak.
    """
    h, w = heatmap.shape
    if upsample > 1:
        heatmap = cv2.resize(heatmap.astype(np.float32), (w * upsample, h * upsample), interpolation=cv2.INTER_LINEAR)
    hh, ww = heatmap.shape
    y, x = divmod(int(np.argmax(heatmap)), ww)
    return (x + 0.5) / ww, (y + 0.5) / hh


class InferenceWorker:
    """The worker's state and loop; sockets are created in :meth:`run` (inside the worker process)."""

    def __init__(
        self,
        engine: Any,
        *,
        frame_endpoints: list[str],
        audio_endpoints: list[str],
        heatmap_endpoint: str,
        heartbeat_endpoint: str | None,
        heatmap_dtype: str = "float16",
        max_audio_age_s: float = 1.5,
        audio_reuse_s: float = 0.0,
        max_batch: int = 8,
        gate: bool = True,
    ) -> None:
        from avloc.engines.base import preprocess_frame
        from avloc.engines.gate import gate_threshold

        self.engine = engine
        self.manifest = engine.manifest
        self._preprocess = preprocess_frame
        self.frame_endpoints = frame_endpoints
        self.audio_endpoints = audio_endpoints
        self.heatmap_endpoint = heatmap_endpoint
        self.heartbeat_endpoint = heartbeat_endpoint
        self.heatmap_dtype = heatmap_dtype
        self.max_audio_age_s = max_audio_age_s
        self.audio_reuse_s = audio_reuse_s
        self.max_batch = max_batch
        anchor = (self.manifest.get("frontend") or {}).get("anchor", "end")
        if anchor != "end":
            # Live audio after the frame does not exist yet: pairing a centred window would mean holding every
            # frame back by half a window. The worker pairs causally; the model saw centred windows.
            log.warning(
                "engine trained with frontend.anchor=%r; live frames are paired with the window "
                "ending at the frame (anchor end)",
                anchor,
            )
        self.range = _normalizer(self.manifest)
        # Frames resized/normalised on the device the engine runs on (uint8 uploads through pinned buffers).
        self._device_preprocess = None
        device = getattr(engine, "torch_device", None)
        if device is not None and device.type == "cuda":
            from avloc.engines.preprocess import DevicePreprocessor

            self._device_preprocess = DevicePreprocessor(self.manifest, device, max_batch)
        # None: no gating (gate disabled, or an engine exported without --gate-data)
        self.gate_threshold = gate_threshold(self.manifest) if gate else None
        if self.gate_threshold is not None:
            log.info("silence gate: heatmaps with confidence < %.4f are marked not_visible", self.gate_threshold)
        self.stats = WorkerStats()
        self.frame_rejects = protocol.RejectCounter("frames", logger=log)
        self.audio_rejects = protocol.RejectCounter("audio", logger=log)
        self.pending: dict[str, PendingFrame] = {}
        self.tracks: dict[str, AudioTrack] = {}
        self.no_audio_streams: set[str] = set()
        self.ended_streams: set[str] = set()
        self._last_seq: dict[str, int] = {}
        self._last_heard: OrderedDict[str, float] = OrderedDict()  # stream -> last message time, oldest first
        self.spec_shape = _spec_shape(self.manifest)
        self._ratelog = RateLimitedLog(log)
        self._token = security.run_token()

    # --- receiving --------------------------------------------------------------------------------
    def take_frames(self, messages: list[protocol.Message], received: float) -> None:
        for msg in messages:
            if msg.kind == "control":
                self._on_control(msg, self.frame_rejects)
                continue
            if msg.kind != "frame" or "frame" not in msg.arrays:
                self.frame_rejects.reject(protocol.ProtocolError("unexpected", f"{msg.kind} on frames socket"))
                continue
            frame = msg.arrays["frame"]
            if (
                frame.ndim != 3
                or frame.shape[2] != 3
                or min(frame.shape[:2]) < 2
                or frame.dtype != np.uint8
                or "capture" not in msg.ts
            ):
                self.frame_rejects.reject(
                    protocol.ProtocolError("bad_frame", f"frame {frame.dtype} {frame.shape}, ts {sorted(msg.ts)}")
                )
                continue
            self.stats.frames += 1
            self._heard(msg.stream, received)
            last = self._last_seq.get(msg.stream)
            if last is not None and msg.seq > last + 1:
                self.stats.gaps += msg.seq - last - 1
            self._last_seq[msg.stream] = msg.seq
            if msg.meta.get("notice") == protocol.NOTICE_NO_AUDIO or msg.meta.get("has_audio") is False:
                self.no_audio_streams.add(msg.stream)
            self.ended_streams.discard(msg.stream)
            if msg.stream in self.pending:
                self.stats.drops += 1  # newest wins: the older frame is stale now
            self.pending[msg.stream] = PendingFrame(msg, received)

    def _on_control(self, msg: protocol.Message, rejects: protocol.RejectCounter) -> None:
        # Started by the launcher (a run token): only the run's own sources may send control messages.
        if self._token is not None and not security.verify(self._token, msg):
            rejects.reject(protocol.ProtocolError("unauthenticated", f"control {msg.meta.get('command')!r}"))
            return
        self._heard(msg.stream, protocol.now())
        command = msg.meta.get("command")
        if command == protocol.CONTROL_NOTICE and msg.meta.get("notice") == protocol.NOTICE_NO_AUDIO:
            self.no_audio_streams.add(msg.stream)
        elif command == protocol.CONTROL_END:
            self.ended_streams.add(msg.stream)

    def take_audio(self, messages: list[protocol.Message], received: float) -> None:
        for msg in messages:
            if msg.kind == "control":
                self._on_control(msg, self.audio_rejects)
                continue
            spec = msg.arrays.get("spec")
            if msg.kind != "audio" or spec is None or "window_end" not in msg.ts:
                self.audio_rejects.reject(protocol.ProtocolError("unexpected", f"{msg.kind} on audio socket"))
                continue
            expected = tuple(self.spec_shape or spec.shape)
            if spec.dtype != np.float32 or spec.shape != expected:
                self.audio_rejects.reject(
                    protocol.ProtocolError("bad_spec", f"spec {spec.dtype} {spec.shape}, expected float32 {expected}")
                )
                continue
            self.stats.audio += 1
            self._heard(msg.stream, received)
            self.tracks.setdefault(msg.stream, AudioTrack()).add(
                AudioWindow(msg.seq, msg.ts["window_end"], spec), received
            )
            self.no_audio_streams.discard(msg.stream)

    def _heard(self, stream: str, t: float) -> None:
        self._last_heard[stream] = t
        self._last_heard.move_to_end(stream)
        while len(self._last_heard) > MAX_STREAMS:
            self._forget(next(iter(self._last_heard)))

    def evict_silent(self, t: float) -> None:
        """Forget every stream not heard from for ``STREAM_SILENCE_S``."""
        while self._last_heard:
            stream, heard = next(iter(self._last_heard.items()))
            if t - heard <= STREAM_SILENCE_S:
                return
            self._forget(stream)

    def _forget(self, stream: str) -> None:
        self._last_heard.pop(stream, None)
        self.pending.pop(stream, None)
        self.tracks.pop(stream, None)
        self._last_seq.pop(stream, None)
        self.no_audio_streams.discard(stream)
        self.ended_streams.discard(stream)
        self.stats.streams_evicted += 1

    # --- pairing ------------------------------------------------------------------------------------
    def _track_for(self, stream: str) -> AudioTrack | None:
        if stream in self.tracks:
            return self.tracks[stream]
        if len(self.tracks) == 1:  # one microphone serving every camera
            return next(iter(self.tracks.values()))
        return None

    def _embedding(self, track: AudioTrack, window: AudioWindow) -> tuple[np.ndarray, float]:
        """The window's embedding (cached) and the seconds spent computing it now (0 when cached)."""
        emb = track.embeddings.get(window.seq)
        if emb is not None:
            track.embeddings.move_to_end(window.seq)
            return emb, 0.0
        t0 = time.monotonic()
        emb = np.asarray(self.engine.embed_audio(window.spec[None].astype(np.float32, copy=False)))[0]
        spent = time.monotonic() - t0
        self.stats.audio_embeds += 1
        track.embeddings[window.seq] = emb
        while len(track.embeddings) > EMBED_CACHE:
            track.embeddings.popitem(last=False)
        return emb, spent

    def _reusable(self, track: AudioTrack, window: AudioWindow) -> AudioWindow:
        """``window``, or when it is not embedded yet an already embedded window at most ``audio_reuse_s``
        older (0 = never): when the worker falls behind it skips audio windows like it skips frames,
        instead of paying an audio embedding on nearly every frame. Idle time still embeds the newest
        window ahead (``embed_ahead``), so a worker that keeps up always uses the newest window."""
        if self.audio_reuse_s <= 0 or window.seq in track.embeddings:
            return window
        for older in reversed(track.windows):
            if older.end_ts < window.end_ts - self.audio_reuse_s:
                break
            if older.end_ts <= window.end_ts and older.seq in track.embeddings:
                self.stats.audio_reused += 1
                return older
        return window

    def embed_ahead(self) -> None:
        """Idle time: embed the newest window of each track so the next frame finds it cached."""
        for track in self.tracks.values():
            if track.windows and track.windows[-1].seq not in track.embeddings:
                self._embedding(track, track.windows[-1])

    # --- processing ---------------------------------------------------------------------------------
    def process_pending(self, pub: zmq.Socket) -> int:
        """Run every pending frame (newest per stream) as one batch and publish the heatmaps."""
        if not self.pending:
            return 0
        streams = sorted(self.pending, key=lambda s: self.pending[s].message.ts["capture"])[-self.max_batch :]
        batch = [self.pending.pop(s) for s in streams]
        infer_start = protocol.now()
        ready: list[tuple[PendingFrame, np.ndarray, AudioWindow, float]] = []
        for item in batch:
            msg = item.message
            track = self._track_for(msg.stream)
            window = track.window_for(msg.ts["capture"]) if track is not None else None
            stale = window is None or msg.ts["capture"] - window.end_ts > self.max_audio_age_s
            if msg.stream in self.no_audio_streams or stale:
                self._publish_suppressed(pub, item, infer_start)
                continue
            assert track is not None and window is not None
            window = self._reusable(track, window)
            emb, spent = self._embedding(track, window)
            ready.append((item, emb, window, spent))
        if not ready:
            return len(batch)
        frames = [np.asarray(item.message.arrays["frame"]) for item, *_ in ready]
        if self._device_preprocess is not None:
            images = self._device_preprocess(frames)
        else:
            images = np.stack([self._preprocess(f, self.manifest) for f in frames]).astype(np.float32, copy=False)
        embs = np.stack([emb for _, emb, _, _ in ready]).astype(np.float32, copy=False)
        visual_start = protocol.now()
        heatmaps, confidence = self.engine.localize(images, embs)
        infer_end = protocol.now()
        self.stats.batches += 1
        heatmaps = np.asarray(heatmaps)
        confidence = np.asarray(confidence).reshape(-1)
        for i, (item, _emb, window, spent) in enumerate(ready):
            self._publish(
                pub,
                item,
                heatmaps[i],
                float(confidence[i]),
                window,
                {
                    "infer_start": infer_start,
                    "visual_start": visual_start,
                    "infer_end": infer_end,
                },
                spent,
                len(ready),
            )
        return len(batch)

    def _base_ts(self, item: PendingFrame) -> dict[str, float]:
        ts = {k: v for k, v in item.message.ts.items() if k in ("capture", "send")}
        ts["received"] = item.received
        return ts

    def _publish(
        self,
        pub: zmq.Socket,
        item: PendingFrame,
        heatmap: np.ndarray,
        confidence: float,
        window: AudioWindow,
        stage_ts: dict[str, float],
        audio_seconds: float,
        batch_size: int,
    ) -> None:
        msg = item.message
        encoded = encode_heatmap(heatmap, *self.range, self.heatmap_dtype)
        ts = {**self._base_ts(item), **stage_ts}
        confidence = confidence if math.isfinite(confidence) else 0.0
        # gated on the value we publish, so a subscriber can redo the decision from meta alone
        not_visible = self.gate_threshold is not None and confidence < self.gate_threshold
        if not_visible:
            self.stats.not_visible += 1
        meta = {
            "peak": list(peak_of(heatmap)),
            "confidence": confidence,
            "frame_seq": msg.seq,
            "audio_end": window.end_ts,
            "audio_seq": window.seq,
            "audio_ms": round(audio_seconds * 1000.0, 3),
            "batch": batch_size,
            "notice": protocol.NOTICE_NOT_VISIBLE if not_visible else None,
            "drops": self.stats.drops,
        }
        if self.gate_threshold is not None:
            meta["gate"] = self.gate_threshold
        if "pts" in msg.meta:
            meta["pts"] = msg.meta["pts"]
        self._send(pub, msg, ts, {"heatmap": encoded}, meta)

    def _publish_suppressed(self, pub: zmq.Socket, item: PendingFrame, infer_start: float) -> None:
        msg = item.message
        self.stats.suppressed += 1
        ts = {**self._base_ts(item), "infer_start": infer_start, "infer_end": infer_start}
        meta = {
            "peak": None,
            "confidence": 0.0,
            "frame_seq": msg.seq,
            "audio_end": None,
            "notice": protocol.NOTICE_NO_AUDIO,
            "drops": self.stats.drops,
        }
        if "pts" in msg.meta:
            meta["pts"] = msg.meta["pts"]
        self._ratelog("no_audio", logging.INFO, "stream %s: no audio window, heatmap suppressed", msg.stream)
        self._send(pub, msg, ts, {}, meta)

    def _send(
        self,
        pub: zmq.Socket,
        msg: protocol.Message,
        ts: dict[str, float],
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any],
    ) -> None:
        ts["publish"] = protocol.now()
        protocol.send(pub, "heatmap", stream=msg.stream, seq=msg.seq, ts=ts, arrays=arrays, meta=meta)
        self.stats.processed += 1
        self.stats.published += 1
        if self.stats.first_publish is None:
            self.stats.first_publish = ts["publish"]
        self.stats.last_publish = ts["publish"]

    def heartbeat_stats(self) -> dict[str, Any]:
        return {
            **self.stats.as_dict(),
            "rejects": {"frames": self.frame_rejects.as_dict(), "audio": self.audio_rejects.as_dict()},
            "rejects_total": self.frame_rejects.total + self.audio_rejects.total,
            "streams": sorted(self._last_seq),
            "ended": sorted(self.ended_streams),
        }

    # --- loop ---------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run the engine before reporting ready, so the first real frame does not pay for lazy set-up. On a
        GPU every batch size up to ``max_batch`` (CUDA graphs are captured and compiled graphs built per
        size); host backends need one call."""
        if self.spec_shape is None:
            return
        on_device = str(getattr(self.engine, "device", "cpu")) != "cpu"
        self.engine.warmup(range(1, self.max_batch + 1) if on_device else (1,))

    def _frame_socket(self, ctx: zmq.Context) -> zmq.Socket:
        """SUB for frames whose queue is deep on purpose: PUB/SUB drops the NEWEST message when a queue is
        full, so a shallow queue here would back up into the publisher and leave us a backlog of old frames.
        libzmq's I/O thread moves every frame into this queue as it arrives and each loop drains it keeping
        only the newest, so a frame is at most one loop old (bounded: FRAME_RCVHWM x frame size)."""
        return protocol.make_socket(ctx, zmq.SUB, self.frame_endpoints, bind=False, hwm=FRAME_RCVHWM)

    def run(self, stop: Any) -> None:
        ctx = zmq.Context.instance()
        heartbeat = Heartbeat(ctx, self.heartbeat_endpoint, role="inference", stream="inference")
        frames = self._frame_socket(ctx)
        audio = (
            protocol.make_socket(ctx, zmq.SUB, self.audio_endpoints, bind=False, hwm=64)
            if self.audio_endpoints
            else None
        )
        pub = protocol.make_socket(ctx, zmq.PUB, self.heatmap_endpoint, bind=True, hwm=16)
        poller = zmq.Poller()
        poller.register(frames, zmq.POLLIN)
        if audio is not None:
            poller.register(audio, zmq.POLLIN)
        log.info(
            "serving: frames %s, audio %s -> heatmaps %s",
            self.frame_endpoints,
            self.audio_endpoints,
            self.heatmap_endpoint,
        )
        try:
            while not stop.is_set():
                if heartbeat.due():
                    self.evict_silent(protocol.now())
                    heartbeat.maybe_send(self.heartbeat_stats())
                events = dict(poller.poll(0 if self.pending else POLL_MS))
                if audio is not None and audio in events:
                    self.take_audio(*protocol.drain_stamped(audio, rejects=self.audio_rejects))
                if frames in events:
                    self.take_frames(*protocol.drain_stamped(frames, rejects=self.frame_rejects))
                if self.pending:
                    self.process_pending(pub)
                else:
                    self.embed_ahead()
        finally:
            heartbeat.maybe_send(self.heartbeat_stats(), force=True)
            log.info("stopping: %s", self.heartbeat_stats())
            for sock in (frames, audio, pub):
                if sock is not None:
                    sock.close(0)
            heartbeat.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", required=True, type=Path, help="engine directory (avloc export)")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch", "tensorrt"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="engine intra-op threads (default: backend's)")
    parser.add_argument(
        "--frames",
        action="append",
        default=None,
        metavar="ENDPOINT",
        help="frame publisher to subscribe to (repeat for several cameras)",
    )
    parser.add_argument(
        "--audio",
        action="append",
        default=None,
        metavar="ENDPOINT",
        help="audio-window publisher to subscribe to (repeatable)",
    )
    parser.add_argument(
        "--heatmaps",
        default=protocol.DEFAULT_ENDPOINTS["heatmaps"],
        metavar="ENDPOINT",
        help="endpoint to bind the heatmap publisher to",
    )
    parser.add_argument("--heatmap-dtype", default="float16", choices=("float16", "uint8"))
    parser.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option, e.g. precision=int8 (onnxruntime), mode=cuda_graphs or fp16=true (torch)",
    )
    parser.add_argument(
        "--max-audio-age",
        type=float,
        default=1.5,
        help="seconds after which the newest audio window is too old to pair (mic lost)",
    )
    parser.add_argument(
        "--audio-reuse",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="when behind, reuse an embedded audio window up to this much older than the newest (0: never)",
    )
    parser.add_argument(
        "--no-gate",
        action="store_true",
        help="ignore the engine's silence gate (never mark heatmaps not_visible)",
    )
    add_common_arguments(parser, role="inference")


def parse_engine_options(items: list[str]) -> dict[str, Any]:
    """``["precision=int8", "fp16=true", "max_batch=4"]`` -> typed keyword arguments for ``load_engine``."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--engine-option {item!r}: expected KEY=VALUE, e.g. precision=int8")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    continue
        options[key.strip().replace("-", "_")] = value
    return options


@contextlib.contextmanager
def heartbeats_while_starting(endpoint: str | None) -> Iterator[None]:
    """A thread sends ``state: loading`` heartbeats while the block runs (imports, engine sessions and the
    warm-up batch take seconds, far more on a busy machine), so the launcher neither kills the worker for
    silence nor starts the sources before the worker can serve."""
    done = threading.Event()

    def beat() -> None:
        early = Heartbeat(zmq.Context.instance(), endpoint, role="inference", stream="inference")
        while not done.wait(early.interval_s):
            early.maybe_send({"state": "loading"}, force=True)
        early.close()

    thread = threading.Thread(target=beat, name="heartbeat-while-starting", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avloc.stream.inference", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging("inference", args.log_file, args.verbose)
    stop = install_stop_handlers()
    with heartbeats_while_starting(args.heartbeat):
        from avloc.engines.base import load_engine

        try:
            engine = load_engine(
                args.engine,
                backend=args.backend,
                device=args.device,
                threads=args.threads,
                **parse_engine_options(args.engine_option),
            )
            worker = InferenceWorker(
                engine,
                frame_endpoints=args.frames or [protocol.DEFAULT_ENDPOINTS["frames"]],
                audio_endpoints=args.audio if args.audio is not None else [protocol.DEFAULT_ENDPOINTS["audio"]],
                heatmap_endpoint=args.heatmaps,
                heartbeat_endpoint=args.heartbeat,
                heatmap_dtype=args.heatmap_dtype,
                max_audio_age_s=args.max_audio_age,
                audio_reuse_s=args.audio_reuse,
                gate=not args.no_gate,
            )
        except UserError as err:  # a bad engine, option or endpoint: one line, and the launcher does not retry
            log.error("%s", err)
            return USER_ERROR_EXIT
        worker.warm_up()
    log.info("engine %s (%s) ready", args.engine, args.backend)
    worker.run(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

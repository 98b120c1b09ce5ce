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
- frames of several streams that are pending together run as one batch of at most ``max_batch`` frames
  (``--max-batch``, never more than the engine's own ``Engine.max_batch``). Streams take turns: the batch
  takes the streams served longest ago first (then the oldest capture), so with more streams than a batch
  holds every stream is served in rotation and none starves; the others wait for the next batch;
- a frame older than ``max_frame_age`` when its turn comes (default: 50 ms + two batch times; measured from
  capture, or from its arrival here when the sender's clock is not this host's) is dropped and counted as
  ``late`` instead of being served: under overload heatmaps get fewer, never older.

The per-stream state behind this (pending frames, audio tracks and their embedding cache, turns, deadlines,
bounded stream ids) is ``avloc.stream.serve.batching.StreamScheduler``, which the worker extends.

Per-stream counts (frames, heatmaps, replaced, late), heatmap rate and capture->publish latency are in the
heartbeat's stats (``per_stream``, the launcher's summary). State of every stream id is bounded (see
``MAX_STREAMS``).

Sharding (``--assignments ENDPOINT --worker-name NAME``, started so by the launcher for
``inference_workers`` > 1): the worker serves only the streams the launcher's assignment table gives it,
connecting and disconnecting its frame/audio sockets as the table changes, and publishes its heatmaps into
the launcher's proxy (``--heatmaps-connect``); see ``avloc.stream.serve.sharding``.

Silence gate: when the engine's manifest has a ``gate`` (``avloc export --gate-data``), a heatmap whose
confidence is below ``gate.threshold`` is still published, array and peak included, with
``meta.notice = "not_visible"`` (the source is probably silent or off-screen); ``--no-gate`` turns this off.

Malformed messages are rejected and counted (per socket, reported in the heartbeat's stats), never fatal.
The process around it (command line, engine loading, start-up heartbeats) is ``avloc.stream.serve.inference``:
``python -m avloc.stream.serve.inference --engine ENGINE_DIR --frames EP --audio EP``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import zmq

from avloc.core.errors import UserError
from avloc.core.media import RESIZE_MODES, FrameFit, engine_frame_fit, frame_fit, resize_mode
from avloc.engines.base import preprocess_frame, to_host
from avloc.engines.gate import gate_threshold
from avloc.stream.runtime.worker import (
    Heartbeat,
    RateLimitedLog,
)
from avloc.stream.serve.batching import (
    WARMING_UP_SHARE,
    AudioTrack,
    AudioWindow,
    PendingFrame,
    StreamScheduler,
    StreamStats,
    effective_max_batch,
    real_share,
)
from avloc.stream.serve.sharding import parse_assignment
from avloc.stream.wire import protocol, security
from avloc.stream.wire.flow import DEFAULT_AUDIO_REUSE_S

log = logging.getLogger(__name__)

POLL_MS = 20
FRAME_RCVHWM = 64  # frames libzmq may hold for us (~2 s at 30 fps; 60 MB of 640x480 BGR at most)


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
    from avloc.core.audio import FrontEndConfig  # why: torch, only for an engine with a front-end

    try:
        return tuple(FrontEndConfig.from_dict(frontend).output_shape())
    except UserError as err:  # an odd manifest only disables the shape check
        log.warning("cannot derive the spectrogram shape from the manifest (%s); not checking it", err)
        return None


def _window_samples(manifest: dict[str, Any]) -> int | None:
    """Samples in one audio window of the engine's front-end (None when the manifest does not say)."""
    frontend = manifest.get("frontend")
    if not isinstance(frontend, dict):
        return None
    from avloc.core.audio import FrontEndConfig  # why: torch, only for an engine with a front-end

    try:
        return int(FrontEndConfig.from_dict(frontend).num_samples)
    except UserError:
        return None


def encode_heatmap(heatmap: np.ndarray, lo: float, hi: float, dtype: str) -> np.ndarray:
    """Map ``[lo, hi]`` onto ``[0, 1]``; float16, or uint8 holding ``round(255 * v)`` (docs/protocol.md)."""
    unit = np.clip((heatmap.astype(np.float32) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    if dtype == "uint8":
        return np.round(unit * 255.0).astype(np.uint8)
    return unit.astype(np.float16)


def peak_of(heatmap: np.ndarray) -> tuple[float, float]:
    """Normalized (x, y) of the sound's peak: the hottest cell, moved within it to the centroid of its 3x3
    neighbourhood weighted by each cell's excess over the map's median.

    Why not the argmax of a bilinear upsampling (the earlier rule): the maximum of a bilinear interpolant lies on
    a cell centre, so on the CPU recipes' 8x8 maps (80-pixel cells on a 640x480 frame) the peak moved in whole-cell
    steps, and at the border the upsampling's flat edge put it on the frame's outermost pixel instead of the cell
    centre. A source spanning two cells lights both; the weighted centroid puts the peak between them. Measured as
    a pointing game (peak in a sounding object's box), same maps, centroid vs bilinear: 0.95 vs 0.885 on the
    open-set benchmark's val scenes (os3_s0 engine), 0.69 vs 0.677 on val_unseen (scripts/peak_effect.py,
    docs/results.md "The live peak"). Non-finite cells count as the map's minimum.
    """
    m = np.asarray(heatmap, dtype=np.float32)
    h, w = m.shape
    finite = np.isfinite(m)
    if not finite.all():
        m = np.where(finite, m, m[finite].min() if finite.any() else 0.0)
    y, x = divmod(int(np.argmax(m)), w)
    y0, y1, x0, x1 = max(0, y - 1), min(h, y + 2), max(0, x - 1), min(w, x + 2)
    weights = np.clip(m[y0:y1, x0:x1] - np.median(m), 0.0, None)
    total = float(weights.sum())
    if total <= 0.0:  # a flat map (or one cell): the hottest cell's centre
        return (x + 0.5) / w, (y + 0.5) / h
    yy, xx = np.mgrid[y0:y1, x0:x1]
    return (float((xx * weights).sum()) / total + 0.5) / w, (float((yy * weights).sum()) / total + 0.5) / h


class InferenceWorker(StreamScheduler):
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
        audio_reuse_s: float = DEFAULT_AUDIO_REUSE_S,
        max_batch: int | None = None,
        max_frame_age_s: float = 0.0,
        gate: bool = True,
        ogl_alpha: float | None = None,
        worker_name: str | None = None,
        assignments_endpoint: str | None = None,
        heatmaps_connect: bool = False,
    ) -> None:
        self.manifest = engine.manifest
        self._preprocess = preprocess_frame
        self.frame_endpoints = frame_endpoints
        self.audio_endpoints = audio_endpoints
        self.heatmap_endpoint = heatmap_endpoint
        self.heartbeat_endpoint = heartbeat_endpoint
        self.heatmap_dtype = heatmap_dtype
        self.max_audio_age_s = max_audio_age_s
        # never more than the engine takes: a TensorRT plan built for batch 4 raises on a batch of 5
        super().__init__(
            engine,
            max_batch=effective_max_batch(max_batch, engine),
            max_frame_age_s=max_frame_age_s,
            audio_reuse_s=audio_reuse_s,
            ratelog=RateLimitedLog(log),
        )
        if max_batch and self.max_batch < max_batch:
            log.info("max_batch %d > the engine's %d: batches of at most %d", max_batch, self.max_batch, self.max_batch)
        self.worker_name = worker_name
        self.assignments_endpoint = assignments_endpoint
        self.heatmaps_connect = heatmaps_connect
        # None: every stream on the configured endpoints; else the streams the launcher assigned to us
        self.owned: set[str] | None = None if assignments_endpoint is None else set()
        self.routes: list[Any] = []
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
        # OGL (--ogl): blend each heatmap with the engine's objectness map; None: off
        if ogl_alpha is not None and not engine.has_objectness:
            raise UserError(f"--ogl: engine {engine.engine_dir} has no objectness graph; export it with --ogl")
        if ogl_alpha is not None and not 0.0 <= ogl_alpha <= 1.0:
            raise UserError(f"--ogl-alpha {ogl_alpha}: expected a value in [0, 1]")
        self.ogl_alpha = ogl_alpha
        # Frames resized/normalised on the device the engine runs on (uint8 uploads through pinned buffers);
        # None: on the host. Duck-typed engines (tests) may lack the method.
        make = getattr(engine, "device_preprocessor", None)
        self._device_preprocess = make(self.max_batch) if make is not None else None
        # None: no gating (gate disabled, or an engine exported without --gate-data)
        self.gate_threshold = gate_threshold(self.manifest) if gate else None
        if self.gate_threshold is not None:
            log.info("silence gate: heatmaps with confidence < %.4f are marked not_visible", self.gate_threshold)
        self.frame_rejects = protocol.RejectCounter("frames", logger=log)
        self.audio_rejects = protocol.RejectCounter("audio", logger=log)
        self.spec_shape = _spec_shape(self.manifest)
        self.window_samples = _window_samples(self.manifest)
        self._token = security.run_token()
        self.non_finite_maps = 0  # engine outputs with NaN/inf, published as notice "non_finite"
        # one per socket: a source may send the same tagged control message on its frame and audio streams
        self._verifiers = (
            {}
            if self._token is None
            else {id(r): security.Verifier(self._token) for r in (self.frame_rejects, self.audio_rejects)}
        )
        self._assignment_verifier = None if self._token is None else security.Verifier(self._token)

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
            if self.owned is not None and msg.stream not in self.owned:
                self.stats.not_owned += 1  # still in flight from an endpoint we just left
                continue
            self.stats.frames += 1
            self._heard(msg.stream, received)
            stream_stats = self.per_stream.setdefault(msg.stream, StreamStats())
            stream_stats.frames += 1
            stream_stats.transport.append(received - msg.ts["capture"])
            last = self._last_seq.get(msg.stream)
            if last is not None and msg.seq > last + 1:
                self.stats.gaps += msg.seq - last - 1
            self._last_seq[msg.stream] = msg.seq
            if msg.meta.get("notice") == protocol.NOTICE_NO_AUDIO or msg.meta.get("has_audio") is False:
                self.no_audio_streams.add(msg.stream)
            self.ended_streams.discard(msg.stream)
            if msg.stream in self.pending:
                self.stats.drops += 1  # newest wins: the older frame is stale now
                stream_stats.replaced += 1
            self.pending[msg.stream] = PendingFrame(msg, received)

    def _on_control(self, msg: protocol.Message, rejects: protocol.RejectCounter) -> None:
        # Started by the launcher (a run token): only the run's own sources may send control messages.
        verifier = self._verifiers.get(id(rejects))
        refused = verifier.check(msg) if verifier is not None else None
        if refused is not None:  # unauthenticated, replayed or stale
            rejects.reject(protocol.ProtocolError(refused, f"control {msg.meta.get('command')!r}"))
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
            if not protocol.all_finite(spec):  # NaN/inf samples would make every heatmap of the window garbage
                self.audio_rejects.reject(protocol.ProtocolError("non_finite", f"{msg.stream} audio seq {msg.seq}"))
                continue
            self.stats.audio += 1
            self._heard(msg.stream, received)
            self.tracks.setdefault(msg.stream, AudioTrack()).add(
                AudioWindow(msg.seq, msg.ts["window_end"], spec, real_share(msg.meta, self.window_samples)), received
            )
            self.no_audio_streams.discard(msg.stream)

    # --- processing ---------------------------------------------------------------------------------
    def process_pending(self, pub: zmq.Socket) -> int:
        """Run the next batch of pending frames (newest per stream, fair turns) and publish the heatmaps."""
        t = protocol.now()
        self.drop_late(t)
        # before the early return: a frame dropped late with nothing left to serve starts the behind hold now
        self.note_losses(t, backlog=len(self.pending) > self.max_batch)
        if not self.pending:
            return 0
        streams = self.next_batch()
        for stream in streams:  # one turn per stream, in batch order: a strict rotation, no tie to break
            if stream in self.per_stream:
                self.per_stream[stream].served_turn = self._turns
            self._turns += 1
        self.stats.batches += 1  # counts turns (a batch whose frames were all suppressed too)
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
        if self.ogl_alpha is not None:  # object guidance; confidence (and the gate) stay the AV graph's
            from avloc.core.ogl import blend_live  # why: torch, only with --ogl

            heatmaps = blend_live(self.engine, images, heatmaps, self.ogl_alpha, value_range=self.range)
        # Device outputs (torch/TensorRT on CUDA) to the host: the copy waits for the device, so infer_end
        # is stamped after the GPU work, not when it was queued.
        heatmaps, confidence = to_host(heatmaps), to_host(confidence).reshape(-1)
        infer_end = protocol.now()
        # a moving average over ~10 batches: the automatic frame deadline follows the engine's real speed
        spent = infer_end - infer_start
        self.batch_time_s = spent if self.batch_time_s == 0.0 else 0.9 * self.batch_time_s + 0.1 * spent
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

    def _frame_fit(self, frame: np.ndarray, meta: dict[str, Any] | None = None, stream: str = "") -> FrameFit | None:
        """Where the map lies on the frame the display shows: the engine's ``image.fit`` for this frame
        (core.media.engine_frame_fit); None for ``stretch``. A frame a capture already made into the input
        (``--infer-size``) says how (meta ``fit``) and from what (``full_size`` [w, h]): mapped from the full frame.
        Anything else in those fields (a hostile peer) falls back to the frame itself."""
        fit, full = (meta or {}).get("fit"), (meta or {}).get("full_size")
        if (
            fit in RESIZE_MODES
            and isinstance(full, list)
            and len(full) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 16384 for v in full)
        ):
            engine_fit = resize_mode(self.manifest.get("image"))
            if fit != engine_fit:  # e.g. --infer-fit's default crop for an engine exported before image.fit
                self._ratelog(
                    "infer_fit",
                    logging.WARNING,
                    "stream %s: frames pre-resized with --infer-fit %s for an engine whose image.fit is %s: the "
                    "engine sees other pixels than from the full frame (capture with --infer-fit %s, or send full "
                    "frames)",
                    stream,
                    fit,
                    engine_fit,
                    engine_fit,
                )
            if fit == "stretch":
                return None
            return frame_fit((full[1], full[0]), np.shape(frame)[:2], fit)
        return engine_frame_fit(self.manifest.get("image"), np.shape(frame))

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
        if not protocol.all_finite(heatmap):  # a NaN/inf map (a broken engine output) is never published as valid
            return self._publish_non_finite(pub, item, stage_ts)
        msg = item.message
        encoded = encode_heatmap(heatmap, *self.range, self.heatmap_dtype)
        ts = {**self._base_ts(item), **stage_ts}
        confidence = confidence if math.isfinite(confidence) else 0.0
        # gated on the value we publish, so a subscriber can redo the decision from meta alone
        not_visible = self.gate_threshold is not None and confidence < self.gate_threshold
        # a window still mostly start-up silence: the map is computed and published, but marked (and counted)
        # as not trustworthy yet; this notice wins over the gate's, whose threshold was set on full windows
        warming_up = window.real < WARMING_UP_SHARE
        if warming_up:
            self.stats.warming_up += 1
            notice = protocol.NOTICE_WARMING_UP
        elif not_visible:
            self.stats.not_visible += 1
            notice = protocol.NOTICE_NOT_VISIBLE
        else:
            notice = None
        peak: tuple[float, float] | None = peak_of(heatmap)
        fit = self._frame_fit(msg.arrays["frame"], msg.meta, msg.stream)
        if fit is not None:  # a crop / letterbox engine: the map covers fit.map_box of the frame, not all of it
            peak = fit.input_to_frame(*peak)  # None: the peak is in the letterbox padding
        meta = {
            "peak": list(peak) if peak is not None else None,
            "confidence": confidence,
            "frame_seq": msg.seq,
            "audio_end": window.end_ts,
            "audio_seq": window.seq,
            "audio_ms": round(audio_seconds * 1000.0, 3),
            "batch": batch_size,
            "notice": notice,
            "audio_real": round(window.real, 3),
            "drops": self.stats.drops,
        }
        if fit is not None:
            meta["map_box"] = [round(v, 6) for v in fit.map_box]
        if self.gate_threshold is not None:
            meta["gate"] = self.gate_threshold
        if "pts" in msg.meta:
            meta["pts"] = msg.meta["pts"]
        self._send(pub, msg, ts, {"heatmap": encoded}, meta)

    def _publish_non_finite(self, pub: zmq.Socket, item: PendingFrame, stage_ts: dict[str, float]) -> None:
        """The frame's message without a map: ``notice: "non_finite"``, no array, no peak (counted)."""
        msg = item.message
        self.non_finite_maps += 1
        ts = {**self._base_ts(item), **stage_ts}
        meta = {"peak": None, "confidence": 0.0, "frame_seq": msg.seq, "notice": protocol.NOTICE_NON_FINITE}
        self._ratelog("non_finite", logging.WARNING, "stream %s: the engine returned a non-finite map", msg.stream)
        self._send(pub, msg, ts, {}, meta)

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
        stream_stats = self.per_stream.get(msg.stream)
        if stream_stats is not None:
            stream_stats.heatmaps += 1
            stream_stats.publish_times.append(ts["publish"])
            if stream_stats.same_clock():
                stream_stats.latencies.append(ts["publish"] - ts["capture"])
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
            "non_finite_maps": self.non_finite_maps,
            "streams": sorted(self._last_seq),
            "ended": sorted(self.ended_streams),
            "per_stream": {s: self.per_stream[s].as_dict() for s in sorted(self.per_stream)},
            "max_batch": self.max_batch,
            "frame_deadline_ms": round(self.frame_deadline() * 1000.0, 1),
            "batch_ms": round(self.batch_time_s * 1000.0, 2),
            "owned": None if self.owned is None else sorted(self.owned),
        }

    # --- loop ---------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run the engine before reporting ready, so the first real frame does not pay for lazy set-up. On a
        GPU every batch size up to ``max_batch`` (CUDA graphs are captured and compiled graphs built per
        size; audio only at batch 1, the one size this worker embeds); host backends need one call."""
        if self.spec_shape is None:
            return
        on_device = str(getattr(self.engine, "device", "cpu")) != "cpu"
        if on_device:
            self.engine.warmup(range(1, self.max_batch + 1), audio_batch_sizes=(1,))
        else:
            self.engine.warmup((1,))
        if self.ogl_alpha is not None:  # torch builds / TensorRT plans the objectness graph on first use
            self.engine.objectness(np.zeros((1, *self.engine.image_shape), np.float32))

    def _frame_socket(self, ctx: zmq.Context, endpoints: list[str] | None = None) -> zmq.Socket:
        """SUB for frames whose queue is deep on purpose: PUB/SUB drops the NEWEST message when a queue is
        full, so a shallow queue here would back up into the publisher and leave us a backlog of old frames.
        libzmq's I/O thread moves every frame into this queue as it arrives and each loop drains it keeping
        only the newest, so a frame is at most one loop old (bounded: FRAME_RCVHWM x frame size)."""
        eps = self.frame_endpoints if endpoints is None else endpoints
        return protocol.make_socket(ctx, zmq.SUB, eps, bind=False, hwm=FRAME_RCVHWM)

    def _audio_socket(self, ctx: zmq.Context, endpoints: list[str] | None = None) -> zmq.Socket:
        eps = self.audio_endpoints if endpoints is None else endpoints
        return protocol.make_socket(ctx, zmq.SUB, eps, bind=False, hwm=64)

    @staticmethod
    def _rewire(sock: zmq.Socket, old: set[str], new: set[str], make: Any, poller: zmq.Poller | None) -> zmq.Socket:
        """``sock`` connected to ``new``. Leaving an endpoint replaces the socket instead of disconnecting it:
        libzmq aborts the process (``!_more``, fq.cpp; zeromq/libzmq#2163) when a multipart message from a
        pipe being disconnected is read, and frames and audio windows are multipart. The queued messages of
        the kept endpoints are lost with the old socket: one frame per stream, once per reassignment."""
        if not old - new:
            for ep in sorted(new - old):
                sock.connect(ep)
            return sock
        if poller is not None:
            poller.unregister(sock)
        sock.close(0)
        fresh = make(zmq.Context.instance(), sorted(new))
        if poller is not None:
            poller.register(fresh, zmq.POLLIN)
        return fresh

    def apply_assignment(
        self, routes: list[Any], frames: zmq.Socket, audio: zmq.Socket | None, poller: zmq.Poller | None = None
    ) -> tuple[zmq.Socket, zmq.Socket | None]:
        """Serve exactly ``routes`` (``sharding.StreamRoute``): connect to new endpoints, leave the others and
        forget the streams given to another worker (their audio cache and pending frame move with them).
        Returns the frame and audio sockets (new ones when an endpoint was left, registered in ``poller``)."""
        old_frames, old_audio = set(self.frame_endpoints), set(self.audio_endpoints)
        new_frames = {r.frames for r in routes}
        new_audio = {r.audio for r in routes if r.audio}
        frames = self._rewire(frames, old_frames, new_frames, self._frame_socket, poller)
        if audio is not None:
            audio = self._rewire(audio, old_audio, new_audio, self._audio_socket, poller)
        owned = {r.stream for r in routes}
        for stream in sorted((self.owned or set()) - owned):
            self._forget(stream)
            self.stats.streams_evicted -= 1  # handed over, not evicted
        self.frame_endpoints, self.audio_endpoints = sorted(new_frames), sorted(new_audio)
        self.owned = owned
        self.routes = list(routes)
        log.info("assigned streams: %s", sorted(owned) or "none")
        return frames, audio

    def _take_assignments(
        self, sock: zmq.Socket, frames: zmq.Socket, audio: zmq.Socket | None, poller: zmq.Poller
    ) -> tuple[zmq.Socket, zmq.Socket | None]:
        latest = None
        for msg in protocol.drain_latest(
            sock, rejects=self.frame_rejects, max_message_bytes=protocol.MAX_CONTROL_BYTES
        ):
            routes = parse_assignment(msg, self.worker_name or "", self._token, self._assignment_verifier)
            if routes is None:
                self.frame_rejects.reject(protocol.ProtocolError("bad_assignment", f"{msg.kind} from {msg.stream}"))
            else:
                latest = routes
        if latest is not None and latest != self.routes:
            return self.apply_assignment(latest, frames, audio, poller)
        return frames, audio

    def run(self, stop: Any) -> None:
        ctx = zmq.Context.instance()
        heartbeat = Heartbeat(ctx, self.heartbeat_endpoint, role="inference", stream="inference")
        assigned = self.assignments_endpoint is not None
        if assigned:  # the launcher's table decides what to connect to
            self.frame_endpoints, self.audio_endpoints = [], []
        frames = self._frame_socket(ctx)
        audio = self._audio_socket(ctx) if self.audio_endpoints or assigned else None
        pub = protocol.make_socket(ctx, zmq.PUB, self.heatmap_endpoint, bind=not self.heatmaps_connect, hwm=16)
        assignments = (
            protocol.make_socket(
                ctx,
                zmq.SUB,
                self.assignments_endpoint,
                bind=False,
                hwm=16,
                max_message_bytes=protocol.MAX_CONTROL_BYTES,
            )
            if assigned
            else None
        )
        poller = zmq.Poller()
        poller.register(frames, zmq.POLLIN)
        if audio is not None:
            poller.register(audio, zmq.POLLIN)
        if assignments is not None:
            poller.register(assignments, zmq.POLLIN)
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
                if assignments is not None and assignments in events:
                    frames, audio = self._take_assignments(assignments, frames, audio, poller)
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
            for sock in (frames, audio, pub, assignments):
                if sock is not None:
                    sock.close(0)
            heartbeat.close()

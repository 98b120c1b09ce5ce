"""Per-stream state and fair batching of the inference worker (``avloc.stream.serve.inference``).

- the newest pending frame per stream (a frame replaced before its turn is counted in ``drops``);
- each stream's recent audio windows and their embeddings, computed once per window (``AudioTrack``), the
  causal pairing of a frame with the newest window ending at or before its capture, and the reuse of an older
  embedded window while the worker is behind (``audio_reuse_s``, ``DEFAULT_AUDIO_REUSE_S``; ``behind``);
- the turn order of batches: streams served longest ago first (then the oldest capture), at most
  ``max_batch`` frames, so every stream is served in rotation and none starves;
- the frame deadline (``max_frame_age_s``, automatically 50 ms + two batch times) past which a frame is dropped
  as ``late``;
- bounded stream ids: at most ``MAX_STREAMS``, and a stream silent for ``STREAM_SILENCE_S`` is forgotten.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avloc.stream.runtime.worker import RateLimitedLog
from avloc.stream.wire import protocol

AUDIO_HISTORY = 64  # audio windows kept per stream (several seconds at a 100 ms hop)
EMBED_CACHE = 16  # audio embeddings kept per stream
# Per-stream state is bounded: at most MAX_STREAMS stream ids (the least recently heard is forgotten first),
# and a stream silent for STREAM_SILENCE_S is forgotten, so made-up stream ids cannot grow memory or the stats.
MAX_STREAMS = 64
STREAM_SILENCE_S = 60.0
DEFAULT_MAX_BATCH = 8  # when neither the command line nor the engine sets one
AGE_FLOOR_S = 0.05  # automatic max frame age: this + AGE_BATCHES batch times
AGE_BATCHES = 2.0
# A stream whose frames arrive more than this "old" (or from the future) at their best is stamped by another
# clock (another host): its frames' age is then measured from their reception.
CLOCK_MISMATCH_S = 1.0
STREAM_LATENCIES = 256  # capture->publish samples kept per stream (p50/p99 in the stats)
# A heatmap whose audio window holds less than this share of captured audio (the rest is the silence a replay or
# microphone pre-fills its first window with) is published with notice "warming_up": in the first seconds the
# window is mostly the log floor, lower than anything seen in training, and its maps point elsewhere (issue 25).
WARMING_UP_SHARE = 0.5
# A worker stays "behind" (reusing embedded audio windows, audio_reuse_s) this long after its last replaced or late
# frame or backlog, not only in the batch right after one: an overloaded worker loses a frame every few batches (about
# every second batch at two streams in bench/capacity-2026-12-08/ab/hold2), and embedding a new window in each batch
# between losses is what keeps it losing frames. A second spans several such batches and is short next to the time a
# stream takes to recover from an overload (flow control counts heatmaps over the last second too).
BEHIND_HOLD_S = 1.0


@dataclass
class AudioWindow:
    seq: int
    end_ts: float  # clock time of the window's last sample
    spec: np.ndarray  # [1, F, T] float32
    real: float = 1.0  # share of the window that is captured audio, not start-up silence (real_share)


def real_share(meta: dict[str, Any], window_samples: int | None) -> float:
    """Share of an audio window that holds captured audio: ``end_sample`` (samples captured when the window
    ends; replay and microphone pre-fill the first window with silence, docs/protocol.md) over the window's
    length. 1.0 when either is unknown (a sender that does not pre-fill need not say)."""
    end = meta.get("end_sample")
    if not window_samples or not isinstance(end, int | float) or isinstance(end, bool) or not math.isfinite(end):
        return 1.0
    return float(min(1.0, max(0.0, end / window_samples)))


@dataclass
class PendingFrame:
    message: protocol.Message
    received: float
    arrived: float = field(default_factory=protocol.now)  # when this worker took it (its own clock, always)


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
    warming_up: int = 0  # heatmaps published with notice warming_up (window mostly start-up silence)
    audio_embeds: int = 0
    audio_reused: int = 0  # frames paired with an older, already embedded window (audio_reuse_s)
    batches: int = 0
    late: int = 0  # frames dropped for being older than max_frame_age when their turn came
    not_owned: int = 0  # frames of streams assigned to another worker (in flight during a reassignment)
    streams_evicted: int = 0  # stream ids forgotten (silent for STREAM_SILENCE_S, or over MAX_STREAMS)
    first_publish: float | None = None
    last_publish: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class StreamStats:
    """One stream's counters and recent latencies (bounded), and when it was last served (its turn)."""

    frames: int = 0
    heatmaps: int = 0
    replaced: int = 0  # frames replaced by a newer one before their turn
    late: int = 0
    served_turn: int = -1  # the worker's turn counter (one per frame served) when this stream was last served
    transport: deque[float] = field(default_factory=lambda: deque(maxlen=32))  # received - capture
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=STREAM_LATENCIES))
    publish_times: deque[float] = field(default_factory=lambda: deque(maxlen=STREAM_LATENCIES))

    def same_clock(self) -> bool:
        """Whether capture stamps come from this host's clock (best recent transport within bounds)."""
        if not self.transport:
            return True
        best = min(self.transport)
        return -CLOCK_MISMATCH_S < best < CLOCK_MISMATCH_S

    def as_dict(self) -> dict[str, Any]:
        times = self.publish_times
        hz = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        lat = np.asarray(self.latencies, np.float64) * 1000.0
        p50, p99 = np.percentile(lat, [50, 99]) if lat.size else (math.nan, math.nan)
        return {
            "frames": self.frames,
            "heatmaps": self.heatmaps,
            "replaced": self.replaced,
            "late": self.late,
            "hz": round(hz, 2),
            "latency_p50_ms": round(float(p50), 2) if lat.size else None,
            "latency_p99_ms": round(float(p99), 2) if lat.size else None,
        }


def effective_max_batch(requested: int | None, engine: Any) -> int:
    """``min(requested, engine.max_batch)``, ignoring whichever is not set (DEFAULT_MAX_BATCH if neither)."""
    limits = [int(x) for x in (requested, getattr(engine, "max_batch", None)) if x]
    return min(limits) if limits else DEFAULT_MAX_BATCH


class StreamScheduler:
    """The inference worker's per-stream state (pending frames, audio tracks, stats) and its batch order;
    :class:`avloc.stream.serve.inference_worker.InferenceWorker` receives, runs the engine and publishes on top of
    it."""

    def __init__(
        self,
        engine: Any,
        *,
        max_batch: int,
        max_frame_age_s: float,
        audio_reuse_s: float,
        ratelog: RateLimitedLog,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_frame_age_s = max_frame_age_s  # 0: automatic (frame_deadline)
        self.audio_reuse_s = audio_reuse_s
        self.batch_time_s = 0.0  # moving average of a batch's time (audio + preprocess + engine)
        self.stats = WorkerStats()
        self.pending: dict[str, PendingFrame] = {}
        self.tracks: dict[str, AudioTrack] = {}
        self.no_audio_streams: set[str] = set()
        self.ended_streams: set[str] = set()
        self._last_seq: dict[str, int] = {}
        self.per_stream: dict[str, StreamStats] = {}
        self._turns = 0
        # behind: frames were replaced or dropped late, or streams waited beyond a batch, within BEHIND_HOLD_S
        self.behind = False
        self._behind_until = -math.inf
        self._losses_seen = 0
        self._last_heard: OrderedDict[str, float] = OrderedDict()  # stream -> last message time, oldest first
        self._ratelog = ratelog

    # --- stream ids ---------------------------------------------------------------------------------
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
        self.per_stream.pop(stream, None)
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
        older (0 = never) while the worker is ``behind``: then it skips audio windows like it skips frames,
        instead of paying an audio embedding on nearly every frame. Idle time still embeds the newest
        window ahead (``embed_ahead``), so a worker that keeps up always uses the newest window."""
        if self.audio_reuse_s <= 0 or not self.behind or window.seq in track.embeddings:
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

    # --- turns ---------------------------------------------------------------------------------------
    def frame_deadline(self) -> float:
        """Seconds a frame may be old when its turn comes: ``max_frame_age_s``, or automatically
        ``AGE_FLOOR_S`` + ``AGE_BATCHES`` batch times (one batch to wait for, one to be served in)."""
        return self.max_frame_age_s if self.max_frame_age_s > 0 else AGE_FLOOR_S + AGE_BATCHES * self.batch_time_s

    def drop_late(self, t: float) -> int:
        """Drop (and count per stream) every pending frame older than :meth:`frame_deadline` at ``t``."""
        deadline = self.frame_deadline()
        late = []
        for stream, item in self.pending.items():
            stream_stats = self.per_stream.get(stream)
            same_clock = stream_stats is None or stream_stats.same_clock()
            # time waiting here + how old it was on arrival (unknowable when another clock stamped it)
            on_arrival = max(0.0, item.received - item.message.ts["capture"]) if same_clock else 0.0
            age = (t - item.arrived) + on_arrival
            if age > deadline:
                late.append(stream)
                if stream_stats is not None:
                    stream_stats.late += 1
        for stream in late:
            del self.pending[stream]
        self.stats.late += len(late)
        if late:
            self._ratelog("late", logging.INFO, "frames older than %.0f ms dropped (overload)", deadline * 1000)
        return len(late)

    def note_losses(self, t: float, backlog: bool = False) -> None:
        """Update ``behind`` at time ``t``, before a batch: held for ``BEHIND_HOLD_S`` from the last frame replaced or
        dropped late (counted since the previous call) or the last ``backlog`` (more streams pending than one batch
        takes)."""
        losses = self.stats.drops + self.stats.late
        if backlog or losses > self._losses_seen:
            self._behind_until = t + BEHIND_HOLD_S
        self._losses_seen = losses
        self.behind = t < self._behind_until

    def next_batch(self) -> list[str]:
        """The streams of the next batch: served longest ago first, then oldest capture; at most max_batch."""
        never = StreamStats()

        def turn(stream: str) -> tuple[int, float]:
            served = self.per_stream.get(stream, never).served_turn
            return served, self.pending[stream].message.ts["capture"]

        return sorted(self.pending, key=turn)[: self.max_batch]

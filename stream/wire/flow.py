"""Flow control: a capture sends the inference worker about as many frames as it serves of its stream.

Past capacity the worker serves each stream ``c`` heatmaps/s (fair turns, ``avloc.stream.serve.batching``) while a
capture keeps sending 30 frames/s: the worker replaces the rest unseen, yet every one of them was decoded,
converted, copied to every subscriber and parsed, on the same cores the engine needs. Measured on 2 cores
(bench/streams-2026-12-02/overload_12.json): 12 replays took ~126 % CPU against the worker's 31 %, and
total heatmaps/s fell past the peak instead of staying there.

The feedback is the worker's own output, so no message kind is added: a capture subscribes to the heatmap
publisher (``--flow-control ENDPOINT``) and counts the heatmaps of its stream (every kind of heatmap: a
suppressed ``no_audio`` one is served too). Over the last ``WINDOW_S`` it serves ``r`` per second; the capture
then sends at most ``HEADROOM * r + STEP_UP`` frames per second (never fewer than ``MIN_FPS``), skipping the
others before they are converted or sent. ``HEADROOM`` keeps a fresh frame waiting at each of the stream's
turns; a worker that keeps up serves all it is sent, so the allowance grows by ``HEADROOM`` every window
until the source's own rate is reached (a few seconds after the overload ends). Without feedback for
``STALE_S`` (worker starting, restarting, or not subscribed to) the capture sends every frame, as before.
Measured effect (1.3x the heatmaps at 4 streams, 2-4x at 8, twice and four times the stream count of the
peak, under the same load): docs/performance.md, "Overload without collapse".

Audio windows follow too (``audio_spacing_s``): while a stream is throttled (its allowance below the source's
frame rate) the worker is behind, and a worker behind reuses an embedded window up to ``audio_reuse_s`` older
than the newest (``avloc.stream.serve.batching``) instead of embedding the windows in between; those were
computed (a 3 s spectrogram each), sent and parsed for nothing. A throttled capture then sends one window
every ``audio_reuse_s + hop`` seconds (:func:`audio_spacing`): each one is more than ``audio_reuse_s`` older
than the next, so the worker embeds every window it gets and never pairs a frame with audio older than it
does now (the newest window at or before the frame, at most ``audio_reuse_s + hop`` old either way).
"""

from __future__ import annotations

import argparse
import math
from collections import deque
from typing import Any

import zmq

from avloc.stream.wire import protocol

# Audio reuse (audio_reuse_s) by default: a worker that is BEHIND (it replaced or dropped frames since its last
# batch, or streams wait beyond this batch) pairs a frame with an embedded window up to this much older than
# the newest instead of paying an embedding per stream per hop; a worker that keeps up always uses the newest.
# Here, in the wire, because both ends use it: the worker reuses, a throttled capture thins its windows to match.
DEFAULT_AUDIO_REUSE_S = 0.3
WINDOW_S = 1.0  # served heatmaps are counted over this many seconds
HEADROOM = 1.3  # frames sent per heatmap served: a fresh frame waits at each turn, few are replaced
STEP_UP = 2.0  # frames/s added to the allowance, so a stream throttled to ~0 comes back
MIN_FPS = 2.0  # never fewer (the display still moves; the worker still sees the stream)
STALE_S = 2.0  # no heatmap of any stream for this long: no feedback, send every frame


WINDOW_SLACK_S = 1e-3  # window end times are sample counts / rate: equal spacings may differ by rounding


def audio_spacing(audio_reuse_s: float, hop_s: float) -> float:
    """Seconds between the audio windows a throttled capture sends, for a worker reusing embeddings over
    ``audio_reuse_s`` (0: no reuse, so every window is sent) and windows every ``hop_s``."""
    return audio_reuse_s + hop_s if audio_reuse_s > 0 else 0.0


class FlowControl:
    """Decides, frame by frame, whether a capture sends a frame (pure logic: times are passed in), and
    window by window whether it computes and sends an audio window (``audio_spacing_s``, 0: every one)."""

    def __init__(self, stream: str, audio_spacing_s: float = 0.0) -> None:
        self.stream = stream
        self.audio_spacing_s = audio_spacing_s
        self._frame_step = 0.0  # the source's frame interval, from the last admit()
        self._last_window = -math.inf  # end time of the last window sent
        self.windows_skipped = 0
        self._served: deque[float] = deque()  # receive times of this stream's heatmaps within WINDOW_S
        self._last_feedback = -math.inf  # when any heatmap (of any stream) was last heard
        self._first_feedback = math.inf
        self._credit = 1.0
        self.skipped = 0

    def heard(self, messages: list[protocol.Message], t: float) -> None:
        """Heatmaps received at ``t`` (any stream's: they prove the worker is there and publishing)."""
        for msg in messages:
            if msg.kind != "heatmap":
                continue
            self._last_feedback = t
            self._first_feedback = min(self._first_feedback, t)
            if msg.stream == self.stream:
                self._served.append(t)

    def allowance(self, t: float) -> float | None:
        """Frames/s this stream may send now; None: no feedback (send everything)."""
        while self._served and self._served[0] <= t - WINDOW_S:
            self._served.popleft()
        if t - self._last_feedback > STALE_S or t - self._first_feedback < WINDOW_S:
            return None  # no worker heard lately, or not a full window of evidence yet
        return max(MIN_FPS, HEADROOM * len(self._served) / WINDOW_S + STEP_UP)

    def admit(self, t: float, frame_step: float) -> bool:
        """Whether the frame due at ``t`` (``frame_step`` s after the previous one) is sent. A credit of
        ``allowance * frame_step`` per frame spreads the frames sent evenly; what is saved up is capped at one
        frame (no burst after a pause), and what is left after a frame is sent carries over (exact rates)."""
        self._frame_step = frame_step
        rate = self.allowance(t)
        if rate is None or rate * frame_step >= 1.0:
            self._credit = 1.0
            return True
        self._credit = min(1.0, self._credit) + rate * frame_step
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        self.skipped += 1
        return False

    def throttled(self, t: float) -> bool:
        """Whether this stream now gets fewer frames than its source delivers (the worker is behind on it)."""
        rate = self.allowance(t)
        return rate is not None and rate * self._frame_step < 1.0

    def admit_window(self, end_t: float, t: float) -> bool:
        """Whether the audio window ending at ``end_t`` (clock seconds) is computed and sent, decided at ``t``:
        always unless throttled; throttled, one every ``audio_spacing_s``."""
        if self.audio_spacing_s > 0 and self.throttled(t):
            if end_t - self._last_window < self.audio_spacing_s - WINDOW_SLACK_S:
                self.windows_skipped += 1
                return False
        self._last_window = end_t
        return True

    def stats(self, t: float) -> dict[str, Any]:
        """For the capture's heartbeat: the frames/s it may send now (None: no feedback, every frame)."""
        rate = self.allowance(t)
        return {"flow_allowance_fps": None if rate is None else round(rate, 1)}


class FlowFeedback:
    """The heatmap subscription behind :class:`FlowControl` (drained without blocking, frame by frame)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, stream: str, audio_spacing_s: float = 0.0) -> None:
        # heatmaps are small (a 16x16 float16 map), and only the newest second matters: a shallow queue
        self.socket = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=256)
        self.control = FlowControl(stream, audio_spacing_s)
        self.rejects = protocol.RejectCounter("flow")

    def admit(self, frame_step: float) -> bool:
        messages, received = protocol.drain_stamped(self.socket, rejects=self.rejects)
        self.control.heard(messages, received)
        return self.control.admit(protocol.now(), frame_step)

    def close(self) -> None:
        self.socket.close(0)


def add_flow_control_argument(parser: argparse.ArgumentParser, what: str, note: str = "past its capacity") -> None:
    """``--flow-control ENDPOINT`` of a capture (camera, replay); ``what`` the capture does only for the frames it
    is allowed, ``note`` a last word for the help text."""
    parser.add_argument(
        "--flow-control",
        default=None,
        metavar="ENDPOINT",
        help=f"heatmap publisher to watch: {what} about as many frames as the inference worker serves of this "
        f"stream, skipping the rest ({note})",
    )

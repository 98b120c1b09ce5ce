"""Display client: frames + heatmaps in, an overlay on screen or in a recorded video, and a latency log.

Subscribes to the capture workers' frames and the inference worker's heatmaps, matches them by stream and
sequence number and draws the heatmap over the frame it was computed on (colormap JET or INFERNO,
adjustable alpha), with a HUD: heatmap fps, end-to-end latency p50 and drops, and a "no audio" notice.
A heatmap marked ``not_visible`` by the engine's silence gate is not drawn (no overlay, no peak: a faint map
would still point at something that is probably not there); the frame shows a "NOT VISIBLE" notice instead.
A ``warming_up`` map (its audio window still mostly the start-up silence) is drawn with a "WARMING UP 40%"
notice (``meta.audio_real``, the share of captured audio in the window); a ``non_finite`` one has no map and
says so. :func:`notice_text` is the one wording, shared with the browser viewer. The ``notices`` count per kind
is in the display's stats (the run's summary.json) and every notice is in the latency log.

- window mode (``cv2.imshow``): ``q``/Esc quits, ``+``/``-`` change alpha, ``c`` toggles the colormap;
- ``--headless``: no window; ``--record out.mp4`` encodes the overlaid frames with PyAV (libx264), timed by
  the frames' own timestamps, into crash-safe segments joined at the end with the original audio
  (``--audio-source VIDEO``; stream/clients/recording.py);
  ``--snapshot-every N`` saves every N-th recorded frame as PNG;
- ``--latency-log FILE``: one JSON line per heatmap with every timestamp of its way through the pipeline
  plus ``display`` (when this process received it, before drawing), read by ``avloc bench pipeline`` and ``avloc demo``.

Run as a process: ``python -m avloc.stream.clients.display --frames EP --heatmaps EP [--headless --record out.mp4]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from avloc.core.errors import UserError
from avloc.core.media import checked_map_box, map_on_frame
from avloc.stream.clients.recording import Recorder
from avloc.stream.runtime.worker import (
    USER_ERROR_EXIT,
    Heartbeat,
    add_common_arguments,
    install_stop_handlers,
    setup_logging,
)
from avloc.stream.wire import protocol

log = logging.getLogger(__name__)

COLORMAPS = {"jet": cv2.COLORMAP_JET, "inferno": cv2.COLORMAP_INFERNO}
FRAME_BUFFER = 90  # frames kept per stream while their heatmaps are computed (~3 s at 30 fps)
STALE_HEATMAP_S = 0.5  # window mode: show plain frames when no heatmap came for this long
RECORD_WAIT_S = 0.6  # a recorded frame waits this long for its heatmap before the latest one is used
# per-stream state is bounded like the inference worker's: at most MAX_STREAMS stream ids, and one silent for
# STREAM_SILENCE_S is forgotten
MAX_STREAMS = 16
STREAM_SILENCE_S = 60.0
LOGGED_META = ("peak", "confidence", "notice", "audio_real", "pts", "audio_ms", "batch", "drops")  # latency log
KNOWN_NOTICES = (
    protocol.NOTICE_NO_AUDIO,
    protocol.NOTICE_NOT_VISIBLE,
    protocol.NOTICE_NON_FINITE,
    protocol.NOTICE_WARMING_UP,
)


def heatmap_to_unit(arr: np.ndarray) -> np.ndarray:
    """Wire heatmap (float16 in [0, 1] or uint8 = round(255 v)) -> float32 in [0, 1]."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def overlay(
    bgr: np.ndarray,
    unit_heatmap: np.ndarray,
    alpha: float,
    colormap: int,
    peak: tuple[float, float] | None = None,
    map_box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Blend a colour-mapped heatmap (stretched to its own min..max so the hot spot shows) over the frame.

    ``map_box`` (meta ``map_box``, an engine whose ``image.fit`` is crop / letterbox): the normalized frame
    rectangle the map covers (core.media.FrameFit.map_box); the frame outside it is left as it is. None: the
    whole frame (``stretch``)."""
    h, w = bgr.shape[:2]
    lo, hi = float(unit_heatmap.min()), float(unit_heatmap.max())
    stretched = (unit_heatmap - lo) / (hi - lo) if hi > lo else np.zeros_like(unit_heatmap)
    resized, (fx0, fy0, fx1, fy1) = map_on_frame(stretched, (h, w), map_box)
    colored = cv2.applyColorMap(np.round(resized * 255).astype(np.uint8), colormap)
    if map_box is None:
        out = cv2.addWeighted(bgr, 1.0 - alpha, colored, alpha, 0.0)
    else:  # the frame outside the map's box is left as it is
        out = bgr.copy()
        if fx1 > fx0 and fy1 > fy0:
            box = (slice(fy0, fy1), slice(fx0, fx1))
            out[box] = cv2.addWeighted(bgr[box], 1.0 - alpha, colored[box], alpha, 0.0)
    if peak is not None:
        center = (int(peak[0] * w), int(peak[1] * h))
        cv2.circle(out, center, max(4, w // 60), (255, 255, 255), 2, cv2.LINE_AA)
    return out


def notice_text(notice: str | None, audio_real: Any = None) -> str | None:
    """What a person reads for a heatmap's notice: ``WARMING UP 40%`` (share of captured audio in the window,
    so they see it fill), ``NOT VISIBLE``, ``NO AUDIO``, ``NO MAP (NON-FINITE)``; None when there is none."""
    if not notice:
        return None
    if notice == protocol.NOTICE_WARMING_UP:
        if isinstance(audio_real, int | float) and not isinstance(audio_real, bool) and math.isfinite(audio_real):
            return f"WARMING UP {round(100 * min(1.0, max(0.0, float(audio_real))))}%"
        return "WARMING UP"
    if notice == protocol.NOTICE_NON_FINITE:
        return "NO MAP (NON-FINITE)"
    return notice.replace("_", " ").upper()


def draw_hud(image: np.ndarray, lines: list[str], notice: str | None = None) -> None:
    """White text on a dark box (OpenCV's glyph advance depends on thickness, so no outlined text)."""
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.5
    if lines:
        width = max(cv2.getTextSize(t, font, scale, 1)[0][0] for t in lines) + 16
        box = image[4 : 10 + 20 * len(lines), 4 : 4 + width]
        box[:] = (box * 0.4).astype(np.uint8)
        for i, text in enumerate(lines):
            cv2.putText(image, text, (12, 22 + 20 * i), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    if notice:
        h, w = image.shape[:2]
        text = notice
        (tw, th), _ = cv2.getTextSize(text, font, 0.9, 2)
        x, y = (w - tw) // 2, h - 20
        region = image[max(0, y - th - 8) : y + 8, max(0, x - 8) : x + tw + 8]
        region[:] = (region * 0.4).astype(np.uint8)
        cv2.putText(image, text, (x, y), font, 0.9, (60, 60, 255), 2, cv2.LINE_AA)


@dataclass
class HeatmapView:
    seq: int
    unit: np.ndarray | None  # [h, w] float32 in [0, 1]; None when suppressed
    peak: tuple[float, float] | None
    notice: str | None
    confidence: float
    audio_real: float | None = None  # share of captured audio in the window (meta.audio_real)
    map_box: tuple[float, float, float, float] | None = None  # meta.map_box: the map's frame rectangle (crop/letterbox)


class Display:
    """Matching, drawing, recording and the latency log; sockets live in :meth:`run`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.alpha = float(args.alpha)
        self.colormap_name = args.colormap
        self.frames: dict[str, deque[tuple[protocol.Message, float]]] = {}
        self.heatmaps: dict[str, HeatmapView] = {}  # newest per stream (what the window shows)
        # every recent heatmap per stream: a drain can bring several, and each recorded frame gets its own
        self._heatmap_history: dict[str, deque[HeatmapView]] = {}
        self._last_heard: OrderedDict[str, float] = OrderedDict()
        self.streams_evicted = 0
        self.latencies: deque[float] = deque(maxlen=200)
        self.heatmap_times: deque[float] = deque(maxlen=240)
        self.drops = 0
        self.frame_gaps = 0
        self._last_frame_seq: dict[str, int] = {}
        self.record_stream: str | None = args.record_stream
        self.recorder = (
            Recorder(Path(args.record), Path(args.audio_source) if args.audio_source else None, fps=args.fps)
            if args.record
            else None
        )
        self.recorded_upto = -1
        self.snapshots = 0
        self.rejects = protocol.RejectCounter("display", logger=log)
        self._log_file = open(args.latency_log, "a", encoding="utf-8", buffering=1) if args.latency_log else None  # noqa: SIM115
        self.heatmaps_received = 0
        self.notices: dict[str, int] = {}  # heatmaps received per notice (summary.json: what a person was told)
        self._last_shown: dict[str, float] = {}
        self._shown_frame: dict[str, protocol.Message] = {}
        self._heartbeat: Heartbeat | None = None  # set by run()

    # --- state --------------------------------------------------------------------------------------
    def handle(self, handler: Any, msg: protocol.Message) -> Any:
        """Run ``handler(msg)``; a well-formed message with unusable content is counted, never fatal."""
        try:
            return handler(msg)
        except (TypeError, ValueError, OverflowError, AttributeError, cv2.error) as err:
            self.rejects.reject(protocol.ProtocolError("bad_content", f"{msg.kind} {msg.stream}: {err}"[:160]))
            return None

    def on_frame(self, msg: protocol.Message) -> None:
        if msg.kind != "frame" or "frame" not in msg.arrays:
            return  # control messages on the frames socket are for the inference worker / launcher
        frame = msg.arrays["frame"]
        if frame.ndim != 3 or frame.shape[2] != 3 or min(frame.shape[:2]) < 2 or frame.dtype != np.uint8:
            raise ValueError(f"frame {frame.dtype} {frame.shape}, expected uint8 HxWx3")
        self._heard(msg.stream)
        buf = self.frames.setdefault(msg.stream, deque(maxlen=FRAME_BUFFER))
        if buf and msg.seq < buf[-1][0].seq:  # a restarted or looping source: sequence starts over
            self._flush_record(msg.stream, everything=True)
            buf.clear()
            self.recorded_upto = -1
        last = self._last_frame_seq.get(msg.stream)
        if last is not None and msg.seq > last + 1:
            self.frame_gaps += msg.seq - last - 1
        self._last_frame_seq[msg.stream] = msg.seq
        buf.append((msg, protocol.now()))
        if self.record_stream is None:
            self.record_stream = msg.stream

    def on_heatmap(self, msg: protocol.Message) -> HeatmapView | None:
        if msg.kind != "heatmap":
            return None
        arr = msg.arrays.get("heatmap")
        if arr is not None and not protocol.all_finite(arr):  # counted as bad_content by handle()
            raise ValueError(f"heatmap {arr.dtype} {arr.shape} has non-finite values")
        peak = msg.meta.get("peak")
        if peak is not None:
            peak = (float(peak[0]), float(peak[1])) if isinstance(peak, list) and len(peak) == 2 else None
            # a peak is on the frame (0..1); compose() draws it outside handle()'s guard, where a peer's 1e12
            # made cv2.circle raise and killed the display: far off the frame is bad content (NaN fails too)
            if peak is not None and not all(-1.0 <= v <= 2.0 for v in peak):
                raise ValueError(f"peak {peak!r}")
        notice = msg.meta.get("notice")
        audio_real = msg.meta.get("audio_real")
        map_box = msg.meta.get("map_box")
        if map_box is not None:  # bounded here: compose() draws it outside handle()'s guard
            map_box = checked_map_box(map_box)
        view = HeatmapView(
            seq=msg.seq,
            unit=heatmap_to_unit(arr) if arr is not None and arr.ndim == 2 and arr.size else None,
            peak=peak,
            notice=notice if isinstance(notice, str) else None,
            confidence=float(msg.meta.get("confidence") or 0.0),
            audio_real=float(audio_real) if isinstance(audio_real, int | float) else None,
            map_box=map_box,
        )
        if view.notice:  # bounded: only the protocol's notice names get a counter of their own
            kind = view.notice if view.notice in KNOWN_NOTICES else "other"
            self.notices[kind] = self.notices.get(kind, 0) + 1
        drops = int(msg.meta.get("drops") or 0)
        self._heard(msg.stream)
        self.heatmaps[msg.stream] = view
        history = self._heatmap_history.setdefault(msg.stream, deque(maxlen=FRAME_BUFFER))
        if history and view.seq < history[-1].seq:  # a restarted source: its sequence starts over
            history.clear()
        history.append(view)
        self.drops = drops
        self.heatmaps_received += 1
        t = protocol.now()
        self.heatmap_times.append(t)
        if "capture" in msg.ts:
            self.latencies.append(t - msg.ts["capture"])
        return view

    def log_latency(self, msg: protocol.Message, display_ts: float) -> None:
        if self._log_file is None:
            return
        record = {
            "stream": msg.stream,
            "seq": msg.seq,
            "ts": {**msg.ts, "display": display_ts},
            **{
                k: msg.meta.get(k)
                for k in ("peak", "confidence", "notice", "audio_real", "pts", "audio_ms", "batch", "drops")
            },
        }
        self._log_file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def hud_lines(self) -> list[str]:
        t = protocol.now()
        recent = [x for x in self.heatmap_times if t - x <= 2.0]
        fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
        p50 = float(np.median(self.latencies)) * 1000 if self.latencies else float("nan")
        lines = [
            f"heatmaps {fps:4.1f} fps",
            f"e2e p50 {p50:5.1f} ms",
            f"drops {self.drops + self.frame_gaps}",
            f"alpha {self.alpha:.2f} ({self.colormap_name})",
        ]
        clock = protocol.clock_stats()
        if clock.get("synced"):  # on another host than the reference clock: how well e2e can be trusted
            lines.append(f"clock {clock['offset_s']:+.3f} s +/- {clock['uncertainty_s'] * 1000:.1f} ms")
        return lines

    def compose(self, stream: str, frame_msg: protocol.Message, view: HeatmapView | None) -> np.ndarray:
        bgr = np.array(frame_msg.arrays["frame"])  # writable copy of the received buffer
        if view is not None and view.unit is not None and view.notice != protocol.NOTICE_NOT_VISIBLE:
            # warming_up maps are drawn too (computed, just not to be trusted yet): the notice says so
            bgr = overlay(bgr, view.unit, self.alpha, COLORMAPS[self.colormap_name], view.peak, view.map_box)
        # not_visible (map below the gate: not drawn), no_audio / non_finite (no map), warming_up (drawn)
        notice = notice_text(view.notice, view.audio_real) if view is not None else None
        draw_hud(bgr, [stream, *self.hud_lines()], notice)
        return bgr

    def _frame_time(self, msg: protocol.Message) -> float:
        pts = msg.meta.get("pts")
        return float(pts) if isinstance(pts, int | float) else float(msg.ts.get("capture", 0.0))

    def _flush_record(self, stream: str, everything: bool = False) -> None:
        """Record buffered frames whose heatmap arrived (or that waited long enough), in order."""
        if self.recorder is None or stream != self.record_stream:
            return
        history = self._heatmap_history.get(stream, deque())
        t = protocol.now()
        for msg, received in self.frames.get(stream, ()):
            if msg.seq <= self.recorded_upto:
                continue
            while history and history[0].seq < msg.seq:  # heatmaps of frames already recorded
                history.popleft()
            # the frame's own heatmap, or the next one when its own was skipped; after RECORD_WAIT_S the newest
            view = history[0] if history else None
            if view is None:
                if not (everything or t - received > RECORD_WAIT_S):
                    break
                view = self.heatmaps.get(stream)
            bgr = self.compose(stream, msg, view)
            # write() waits while the encoder is behind: keep beating, or the launcher kills a busy display
            if self._heartbeat is not None and self._heartbeat.due():
                self._heartbeat.maybe_send(self.stats())
            self.recorder.write(bgr, self._frame_time(msg))
            self.recorded_upto = msg.seq
            if self.args.snapshot_every and self.recorder.frames % self.args.snapshot_every == 0:
                self._snapshot(bgr, msg.seq)

    def _heard(self, stream: str) -> None:
        self._last_heard[stream] = protocol.now()
        self._last_heard.move_to_end(stream)
        while len(self._last_heard) > MAX_STREAMS:
            self._forget(next(iter(self._last_heard)))

    def evict_silent(self) -> None:
        """Forget every stream not heard from for ``STREAM_SILENCE_S`` (its frames are recorded first)."""
        t = protocol.now()
        while self._last_heard:
            stream, heard = next(iter(self._last_heard.items()))
            if t - heard <= STREAM_SILENCE_S:
                return
            self._forget(stream)

    def _forget(self, stream: str) -> None:
        self._flush_record(stream, everything=True)
        for state in (
            self._last_heard,
            self.frames,
            self.heatmaps,
            self._heatmap_history,
            self._last_frame_seq,
            self._last_shown,
            self._shown_frame,
        ):
            state.pop(stream, None)  # type: ignore[attr-defined]
        self.streams_evicted += 1

    def _snapshot(self, bgr: np.ndarray, seq: int) -> None:
        folder = (
            Path(self.args.snapshot_dir or Path(self.args.record).with_suffix(""))
            if self.args.record
            else Path(self.args.snapshot_dir or "snapshots")
        )
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"frame_{seq:06d}.png"), bgr)
        self.snapshots += 1

    def _frame_for(self, stream: str, seq: int) -> protocol.Message | None:
        for msg, _ in reversed(self.frames.get(stream, ())):
            if msg.seq == seq:
                return msg
            if msg.seq < seq:
                break
        return None

    # --- loop ---------------------------------------------------------------------------------------
    def run(self, stop: Any) -> None:
        args = self.args
        ctx = zmq.Context.instance()
        heartbeat = Heartbeat(ctx, args.heartbeat, role="display", stream="display")
        self._heartbeat = heartbeat
        frames = protocol.make_socket(ctx, zmq.SUB, args.frames, bind=False, hwm=32)
        heatmaps = protocol.make_socket(ctx, zmq.SUB, args.heatmaps, bind=False, hwm=64)
        poller = zmq.Poller()
        poller.register(frames, zmq.POLLIN)
        poller.register(heatmaps, zmq.POLLIN)
        window = None if args.headless else "avloc"
        if window:
            cv2.namedWindow(window, cv2.WINDOW_NORMAL)
        try:
            while not stop.is_set():
                if heartbeat.due():
                    self.evict_silent()
                    heartbeat.maybe_send(self.stats())
                events = dict(poller.poll(10))
                if frames in events:
                    for msg in protocol.drain_latest(frames, rejects=self.rejects):
                        self.handle(self.on_frame, msg)
                newest: dict[str, protocol.Message] = {}
                if heatmaps in events:
                    for msg in protocol.drain_latest(heatmaps, rejects=self.rejects):
                        if self.handle(self.on_heatmap, msg) is not None:
                            newest[msg.stream] = msg
                            self.log_latency(msg, protocol.now())
                for stream in list(self.frames):
                    self._flush_record(stream)
                if window:
                    self._show(window, newest)
                    key = cv2.waitKey(1) & 0xFF
                    if key in (ord("q"), 27):
                        log.info("quit key pressed")
                        break
                    self._on_key(key)
        finally:
            if self._log_file is not None:  # first: finishing the recording may take long or fail
                self._log_file.close()
                self._log_file = None
            for stream in list(self.frames):
                self._flush_record(stream, everything=True)
            if self.recorder is not None:
                try:
                    path = self.recorder.close()
                    log.info("recorded %d frames to %s", self.recorder.frames, path)
                except RuntimeError as err:
                    log.error("%s", err)
            if self._log_file is not None:
                self._log_file.close()
            final = self.stats()
            heartbeat.maybe_send(final, force=True)
            log.info("display summary: %s", json.dumps(final, separators=(",", ":")))
            frames.close(0)
            heatmaps.close(0)
            heartbeat.close()
            if window:
                cv2.destroyAllWindows()

    def _show(self, window: str, newest: dict[str, protocol.Message]) -> None:
        """Show each stream's newest heatmap on the frame it was computed from; without heatmaps for a
        while (inference restarting, still loading) show the newest frame, so the window never freezes."""
        t = protocol.now()
        for stream, frames in self.frames.items():
            if not frames:
                continue
            frame_msg: protocol.Message | None = None
            view = self.heatmaps.get(stream)
            if stream in newest:
                frame_msg = self._frame_for(stream, newest[stream].seq)
            elif t - self._last_shown.get(stream, -math.inf) > STALE_HEATMAP_S and frames[-1][
                0
            ] is not self._shown_frame.get(stream):
                frame_msg, view = frames[-1][0], None
            if frame_msg is None:
                continue
            title = window if len(self.frames) == 1 else f"{window} {stream}"
            cv2.imshow(title, self.compose(stream, frame_msg, view))
            self._shown_frame[stream] = frame_msg
            if stream in newest:
                self._last_shown[stream] = t

    def _on_key(self, key: int) -> None:
        if key in (ord("+"), ord("=")):
            self.alpha = min(1.0, self.alpha + 0.05)
        elif key in (ord("-"), ord("_")):
            self.alpha = max(0.0, self.alpha - 0.05)
        elif key == ord("c"):
            names = list(COLORMAPS)
            self.colormap_name = names[(names.index(self.colormap_name) + 1) % len(names)]

    def e2e_ms(self) -> dict[str, float]:
        """p50/p99 of capture -> display over the recent heatmaps (timestamps from several hosts on one clock)."""
        if not self.latencies:
            return {}
        values = np.asarray(self.latencies) * 1000.0
        return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3)}

    def stats(self) -> dict[str, Any]:
        return {
            "heatmaps": self.heatmaps_received,
            "e2e_ms": self.e2e_ms(),
            "clock": protocol.clock_stats(),
            "recorded": self.recorder.frames if self.recorder else 0,
            "drops": self.drops,
            "frame_gaps": self.frame_gaps,
            "rejects": self.rejects.as_dict(),
            "snapshots": self.snapshots,
            "streams_evicted": self.streams_evicted,
            "notices": dict(self.notices),
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frames",
        action="append",
        default=None,
        metavar="ENDPOINT",
        help="frame publisher(s) to show (repeatable)",
    )
    parser.add_argument("--heatmaps", default=protocol.DEFAULT_ENDPOINTS["heatmaps"], metavar="ENDPOINT")
    parser.add_argument("--headless", action="store_true", help="no window (record and/or log only)")
    parser.add_argument("--record", default=None, metavar="OUT.mp4", help="write the overlaid video here")
    parser.add_argument("--record-stream", default=None, help="stream to record (default: the first seen)")
    parser.add_argument(
        "--audio-source",
        default=None,
        metavar="VIDEO",
        help="mux this file's audio track into the recording (replay)",
    )
    parser.add_argument("--fps", type=float, default=30.0, help="nominal frame rate of the recording")
    parser.add_argument("--alpha", type=float, default=0.45, help="heatmap opacity (0..1; +/- keys)")
    parser.add_argument("--colormap", default="jet", choices=sorted(COLORMAPS))
    parser.add_argument(
        "--snapshot-every", type=int, default=0, metavar="N", help="save every N-th recorded frame as PNG"
    )
    parser.add_argument("--snapshot-dir", default=None, help="folder for PNG snapshots (default: next to --record)")
    parser.add_argument(
        "--latency-log",
        default=None,
        metavar="FILE.jsonl",
        help="append one JSON line of timestamps per heatmap",
    )
    add_common_arguments(parser, role="display")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avloc.stream.clients.display", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.frames = args.frames or [protocol.DEFAULT_ENDPOINTS["frames"]]
    setup_logging("display", args.log_file, args.verbose)
    stop = install_stop_handlers()
    try:
        Display(args).run(stop)
    except UserError as err:  # e.g. an endpoint that cannot be reached: one line, not retried
        log.error("%s", err)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

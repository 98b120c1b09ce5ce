"""Recordings that survive a crash: fragmented-MP4 segments, joined (with the source's audio) at the end.

The display's ``Recorder`` encodes H.264 (PyAV, libx264) into a *segment* next to the requested file,
``.<stem>.<run>.<NNN>.mp4``: a fragmented MP4 (``movflags=frag_keyframe+empty_moov``) with a keyframe every
second and no encoder look-ahead (``tune=zerolatency``), flushed fragment by fragment. A display killed with
``kill -9`` leaves a segment that plays up to its last complete fragment, so at most about the last second is
lost. A restarted display of the same run (same launcher token → same ``<run>``) continues into the next
segment; when a display closes cleanly it joins every segment of its run, in order, into the requested file
(muxing in the source's audio for a replay) and removes them.

Segments left behind by a run that never closed cleanly can be joined by hand::

    python -m avloc.stream.clients.recording out.mp4 .out.*.mp4 [--audio-source VIDEO]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import os
import queue
import re
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from avloc.core.errors import UserError
from avloc.stream.wire import security

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, 1000)  # recorded video pts in milliseconds
ENCODE_QUEUE = 30  # frames waiting for the encoder thread (1 s at 30 fps) before write() waits
# fragment at every keyframe, one keyframe per second: a fragment (≤ 1 s) is the most a kill -9 can lose
FRAGMENTED_MP4 = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}


def run_id() -> str:
    """Names the segments of one run: from the launcher's token (a restarted display continues the run's
    segments), else this process (a display started by hand)."""
    token = security.run_token()
    return hashlib.sha256(token.encode()).hexdigest()[:8] if token else f"p{os.getpid()}"


def segment_paths(path: Path, run: str) -> list[Path]:
    """The run's segments of ``path`` (always .mp4, whatever the suffix of ``path``), in order."""
    pattern = re.compile(rf"^\.{re.escape(path.stem)}\.{re.escape(run)}\.(\d{{3,}})\.mp4$")
    found = [
        (int(m.group(1)), p) for p in path.parent.glob(f".{path.stem}.{run}.*.mp4") if (m := pattern.match(p.name))
    ]
    return [p for _, p in sorted(found)]


class Recorder:
    """H.264 writer (PyAV) timed by media timestamps, into crash-safe segments; see the module docstring.

    Encoding runs on its own thread (libx264 releases the GIL), fed through a bounded queue, so the
    display keeps receiving heatmaps while frames are encoded; a full queue makes ``write`` wait.
    """

    def __init__(self, path: Path, audio_source: Path | None = None, fps: float = 30.0, run: str | None = None) -> None:
        import av  # why: PyAV only when recording (the display imports this module)

        self.path = path
        self.audio_source = audio_source
        path.parent.mkdir(parents=True, exist_ok=True)
        self.run = run or run_id()
        earlier = segment_paths(path, self.run)
        index = int(earlier[-1].name.split(".")[-2]) + 1 if earlier else 0
        if earlier:
            log.info("continuing the recording of this run in segment %d (%d earlier)", index, len(earlier))
        self.segment = path.with_name(f".{path.stem}.{self.run}.{index:03d}.mp4")
        self._container = av.open(str(self.segment), mode="w", format="mp4", options=dict(FRAGMENTED_MP4))
        self._fps = fps
        self._stream: Any = None
        self._last_pts = -1
        self._offset = 0.0  # added after a --loop wrap so time keeps going forward
        self._last_t: float | None = None
        self.frames = 0
        self._queue: queue.Queue[tuple[np.ndarray, int] | None] = queue.Queue(maxsize=ENCODE_QUEUE)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._encode_loop, name="encoder", daemon=True)
        self._thread.start()

    def write(self, bgr: np.ndarray, t_seconds: float) -> None:
        """Queue one frame shown at media time ``t_seconds`` (the caller must not modify ``bgr`` after)."""
        if self._error is not None:
            raise RuntimeError(f"recording to {self.path} failed: {self._error}")
        if self._last_t is not None and t_seconds + self._offset < self._last_t:
            self._offset = self._last_t + 1.0 / self._fps - t_seconds  # the replay looped
        t = t_seconds + self._offset
        pts = int(round(t / TIME_BASE))
        if pts <= self._last_pts:
            return  # duplicate timestamp: keep the stream strictly increasing
        self._last_t, self._last_pts = t, pts
        self._queue.put((bgr, pts))
        self.frames += 1

    def _encode_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._encode(*item)
                except Exception as err:  # noqa: BLE001 - reported by write()/close() on the main thread
                    self._error = err

    def _encode(self, bgr: np.ndarray, pts: int) -> None:
        import av  # why: PyAV only when recording

        if self._stream is None:
            h, w = bgr.shape[:2]
            rate = max(1, round(self._fps))
            self._stream = self._container.add_stream("libx264", rate=rate)
            self._stream.width, self._stream.height = w - w % 2, h - h % 2
            self._stream.pix_fmt = "yuv420p"
            self._stream.time_base = TIME_BASE
            self._stream.codec_context.time_base = TIME_BASE
            self._stream.codec_context.gop_size = rate  # a keyframe (and so a fragment) every second
            self._stream.options = {"preset": "veryfast", "crf": "23", "tune": "zerolatency"}
        h, w = self._stream.height, self._stream.width
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(bgr[:h, :w]), format="bgr24")
        frame.pts, frame.time_base = pts, TIME_BASE
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self, join: bool = True) -> Path | None:
        """Finish this segment and join the run's segments into ``path`` (None when nothing was recorded);
        ``join=False`` leaves the finished segment for a later recorder of the run (or a join by hand)."""
        self._queue.put(None)
        self._thread.join()
        error = self._error
        try:
            if error is None and self._stream is not None:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
        finally:
            self._container.close()
        if self.frames == 0:
            self.segment.unlink(missing_ok=True)
        if error is not None:
            raise RuntimeError(f"recording to {self.path} failed: {error} (segments kept: {self.segment.parent})")
        segments = segment_paths(self.path, self.run)
        if not join:
            return self.segment if self.frames else None
        if not segments:
            return None
        join_segments(segments, self.path, self.audio_source)
        for segment in segments:
            segment.unlink(missing_ok=True)
        return self.path


def _video_packets(segments: list[Path]) -> Any:
    """Every video packet of ``segments`` in order, each segment shifted so decode times keep increasing
    (a segment that restarted its media clock, e.g. a display restarted during a --loop replay)."""
    import av  # why: PyAV only when recording

    last_end: float | None = None  # seconds
    for path in segments:
        try:
            container = av.open(str(path))
        except (av.error.FFmpegError, OSError) as err:  # a segment killed before its first fragment
            log.warning("skipping unreadable segment %s (%s)", path, err)
            continue
        with container:
            if not container.streams.video:
                continue
            stream = container.streams.video[0]
            shift: int | None = None
            end = last_end
            try:
                for packet in container.demux(stream):
                    if packet.dts is None or packet.pts is None:
                        continue
                    if shift is None:
                        start = float(packet.dts * stream.time_base)
                        gap = 1.0 / float(stream.average_rate or 30)
                        shift = (
                            0
                            if last_end is None or start >= last_end
                            else round((last_end + gap - start) / stream.time_base)
                        )
                    packet.dts += shift
                    packet.pts += shift
                    end = float((packet.dts + (packet.duration or 0)) * stream.time_base)
                    yield stream, packet
            except av.error.FFmpegError as err:  # the unfinished tail of a killed display's segment
                log.warning("segment %s ends early (%s); keeping what decodes", path, err)
            last_end = end


def join_segments(segments: list[Path], out_path: Path, audio_source: Path | None = None) -> Path:
    """Concatenate the video of ``segments`` (no re-encode) into ``out_path``, optionally with the first audio
    track of ``audio_source`` (AAC) cut to the video's length; written atomically."""
    import av  # why: PyAV only when recording

    if not segments:
        raise UserError(f"{out_path}: no segments to join")
    tmp = out_path.with_name(f".{out_path.stem}.join.tmp{out_path.suffix}")
    packets = _video_packets(segments)
    try:
        with av.open(str(tmp), mode="w") as out:
            first = next(packets, None)
            if first is None:
                raise UserError(f"{', '.join(map(str, segments))}: no video in the segments")
            vstream = out.add_stream_from_template(first[0])
            audio = None
            if audio_source is not None:  # every stream is added before the first packet (the header)
                try:
                    audio = _AudioTrack(out, audio_source)
                except Exception as err:  # noqa: BLE001 - keep the video even if the audio cannot be added
                    log.warning("could not mux audio from %s (%s); writing video only", audio_source, err)
            duration = 0.0
            for _, packet in itertools.chain([first], packets):
                packet.stream = vstream
                duration = max(duration, float((packet.pts + (packet.duration or 0)) * packet.time_base))
                out.mux(packet)
            if audio is not None:
                audio.encode(duration)
        os.replace(tmp, out_path)
    finally:
        packets.close()
        tmp.unlink(missing_ok=True)
    return out_path


class _AudioTrack:
    """The source's first audio track, re-encoded into ``out`` up to a duration (+0.1 s): AAC, or Opus for a
    webm file (which cannot hold AAC)."""

    def __init__(self, out: Any, audio_source: Path) -> None:
        import av  # why: PyAV only when recording

        self._av = av
        self._in = av.open(str(audio_source))
        try:
            if not self._in.streams.audio:
                raise ValueError("no audio track")
            self._src = self._in.streams.audio[0]
            codec = av.codec.Codec("libopus" if "webm" in out.format.name else "aac", "w")
            self.rate = int(self._src.codec_context.sample_rate or 48000)
            if codec.audio_rates and self.rate not in codec.audio_rates:
                self.rate = max(codec.audio_rates)  # Opus: 48 kHz (and a few lower rates) only
            layout = "stereo" if (self._src.codec_context.channels or 1) >= 2 else "mono"
            self._stream = out.add_stream(codec.name, rate=self.rate, layout=layout)
            fmt = codec.audio_formats[0].name if codec.audio_formats else "fltp"
            self._resampler = av.AudioResampler(format=fmt, layout=layout, rate=self.rate)
            self._out = out
        except Exception:
            self._in.close()
            raise

    def encode(self, duration_s: float) -> None:
        try:
            limit = int(round(duration_s * self.rate)) + self.rate // 10
            written = 0
            for frame in self._in.decode(self._src):
                frame.pts = None
                for chunk in self._resampler.resample(frame):
                    if written >= limit:
                        break
                    written += chunk.samples
                    for packet in self._stream.encode(chunk):
                        self._out.mux(packet)
            for packet in self._stream.encode(None):
                self._out.mux(packet)
        finally:
            self._in.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m avloc.stream.clients.recording",
        description="join recording segments (left by a killed display) into one file",
    )
    parser.add_argument("out", type=Path, help="the joined file (mp4)")
    parser.add_argument("segments", type=Path, nargs="+", help="segments in order (.<stem>.<run>.<NNN>.mp4)")
    parser.add_argument("--audio-source", type=Path, default=None, help="mux this file's audio track in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        missing = [str(p) for p in args.segments if not p.is_file()]
        if missing:
            raise UserError(f"segments not found: {', '.join(missing)}")
        join_segments(args.segments, args.out, args.audio_source)
    except UserError as err:
        print(f"error: {err}")
        return 2
    print(f"joined {len(args.segments)} segment(s) into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

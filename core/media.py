"""Images (OpenCV) and video containers (PyAV): frames as RGB uint8, audio tracks as 16 kHz mono float32.

Every failure on a user's file is a ``DataError`` naming the file and the problem (missing, truncated,
not decodable, no audio track), so a dataset scan can list them one per line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from avloc.core.errors import DataError, UserError


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds (container duration, else the video stream's)
    fps: float  # average frame rate (0.0 when unknown)
    width: int
    height: int
    has_audio: bool
    audio_rate: int  # 0 without an audio track
    audio_channels: int  # 0 without an audio track


def read_image(path: str | Path) -> np.ndarray:
    """H x W x 3 uint8 RGB (grey and alpha images are converted); DataError if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file not found")
    # imdecode from bytes: also handles non-ASCII paths, and never prints to stderr on failure like imread.
    raw = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    if bgr is None:
        raise DataError(path, f"unreadable image ({raw.size} bytes, not a decodable image or truncated)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _open(path: Path):  # -> av.container.InputContainer
    import av

    if not path.is_file():
        raise DataError(path, "video file not found")
    try:
        return av.open(str(path), mode="r")
    except av.FFmpegError as err:
        raise DataError(path, f"unreadable video container ({_ffmpeg_message(err)})") from None


def _ffmpeg_message(err: Exception) -> str:
    text = getattr(err, "strerror", None) or str(err)
    return " ".join(str(text).split()) or err.__class__.__name__


def probe_video(path: str | Path) -> VideoInfo:
    """Container metadata without decoding."""
    path = Path(path)
    with _open(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        if video is None:
            raise DataError(path, "no video stream")
        if container.duration is not None:
            duration = float(container.duration) / 1_000_000  # AV_TIME_BASE
        elif video.duration is not None and video.time_base is not None:
            duration = float(video.duration * video.time_base)
        else:
            duration = 0.0
        rate = video.average_rate or video.guessed_rate
        return VideoInfo(
            duration=duration,
            fps=float(rate) if rate else 0.0,
            width=int(video.codec_context.width),
            height=int(video.codec_context.height),
            has_audio=audio is not None,
            audio_rate=int(audio.codec_context.sample_rate) if audio is not None else 0,
            audio_channels=int(audio.codec_context.channels) if audio is not None else 0,
        )


def _frame_seconds(frame, stream) -> float | None:
    if frame.pts is None:
        return None
    time_base = frame.time_base or stream.time_base
    return float(frame.pts * time_base)


def iter_video(path: str | Path) -> Iterator[tuple[float, np.ndarray]]:
    """Yield ``(pts_seconds, rgb uint8 frame)`` in decode order; timestamps come from the stream (VFR-aware).

    Frames without a pts get the previous timestamp plus one nominal frame period.
    """
    import av

    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise DataError(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        period = 1.0 / float(rate) if rate else 0.0
        last: float | None = None
        count = 0
        try:
            for frame in container.decode(stream):
                t = _frame_seconds(frame, stream)
                if t is None:
                    t = 0.0 if last is None else last + period
                last = t
                count += 1
                yield t, frame.to_ndarray(format="rgb24")
        except av.FFmpegError as err:
            problem = f"video decoding failed after {count} frames ({_ffmpeg_message(err)})"
            raise DataError(path, problem) from None
        if count == 0:
            raise DataError(path, "no decodable video frames (empty or truncated)")
        _check_complete(path, "video", (last or 0.0) + period, _container_seconds(container, stream))


def read_video_frame(path: str | Path, t_seconds: float) -> np.ndarray:
    """The RGB frame whose timestamp is nearest ``t_seconds`` (seek to the keyframe before, then decode)."""
    import av

    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise DataError(path, "no video stream")
        stream = container.streams.video[0]
        best: tuple[float, object] | None = None
        reached = False  # decoded up to t (else the stream ended first)
        try:
            if stream.time_base is not None and t_seconds > 0:
                target = int(Fraction(t_seconds).limit_denominator(1_000_000) / stream.time_base)
                container.seek(target, stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                ft = _frame_seconds(frame, stream)
                ft = 0.0 if ft is None else ft
                if best is None or abs(ft - t_seconds) < abs(best[0] - t_seconds):
                    best = (ft, frame)
                if ft >= t_seconds:  # frames only get later from here
                    reached = True
                    break
        except av.FFmpegError as err:
            if best is None:
                problem = f"video decoding failed near t={t_seconds:.3f}s ({_ffmpeg_message(err)})"
                raise DataError(path, problem) from None
        if best is None:
            raise DataError(path, f"no decodable video frame near t={t_seconds:.3f}s (empty or truncated)")
        if not reached:  # ran out of frames before t: fine at the very end, not in a cut-short file
            rate = stream.average_rate or stream.guessed_rate
            period = 1.0 / float(rate) if rate else 0.0
            expected = _container_seconds(container, stream)
            if expected is not None and t_seconds < expected:
                _check_complete(path, "video", best[0] + period, expected)
        return best[1].to_ndarray(format="rgb24")  # type: ignore[attr-defined]


def read_video_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Decode the first audio track as mono float32 in [-1, 1] at ``sample_rate``.

    FFmpeg (``av.AudioResampler``) only converts the sample format; channels are averaged and the rate changed
    exactly as :func:`avloc.core.audio.load_audio` does for wav files, so a clip gives the same samples
    whichever container it comes in (FFmpeg's own stereo->mono downmix is -3 dB per channel, not a mean).
    """
    import av

    from avloc.core.audio import resample

    path = Path(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise DataError(path, "no audio track")
        stream = container.streams.audio[0]
        source_rate = int(stream.codec_context.sample_rate or 0)
        to_float = av.AudioResampler(format="fltp")  # keep layout and rate: planar float [C, n]
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                source_rate = frame.sample_rate or source_rate
                frame.pts = None  # gaps in pts are not resampled over; samples are taken as they come
                chunks.extend(out.to_ndarray().mean(axis=0) for out in to_float.resample(frame))
            chunks.extend(out.to_ndarray().mean(axis=0) for out in to_float.resample(None))
        except av.FFmpegError as err:
            raise DataError(path, f"audio decoding failed ({_ffmpeg_message(err)})") from None
        expected = _container_seconds(container, stream)
    total = sum(c.size for c in chunks)
    if total == 0 or source_rate <= 0:
        raise DataError(path, "audio track holds no decodable samples (empty or truncated)")
    _check_complete(path, "audio", total / source_rate, expected)
    wave = resample(np.concatenate(chunks).astype(np.float32, copy=False), source_rate, sample_rate)
    return np.clip(wave, -1.0, 1.0)


def _container_seconds(container, stream) -> float | None:
    """The duration the file claims (stream's, else container's), to detect truncated files."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000
    return None


def _check_complete(path: Path, what: str, decoded_seconds: float, expected_seconds: float | None) -> None:
    # Matroska/WebM cut short still open and decode up to the cut without an FFmpeg error: compare with the
    # duration in the header (slack for codec priming/padding and the last frame's length).
    if expected_seconds is None:
        return
    if decoded_seconds < expected_seconds - (0.25 + 0.02 * expected_seconds):
        raise DataError(
            path,
            f"truncated: {what} decodes to {decoded_seconds:.2f} s, the file claims {expected_seconds:.2f} s",
        )


_CODECS = {  # suffix -> (container format, video codec, audio codec)
    ".mp4": ("mp4", "libx264", "aac"),
    ".mkv": ("matroska", "libx264", "aac"),
    ".webm": ("webm", "libvpx-vp9", "libopus"),
}


def video_codec(path: str | Path) -> str:
    """The video encoder ``write_video`` uses for this file's extension (mpeg4 where FFmpeg lacks libx264)."""
    import av

    suffix = Path(path).suffix.lower()
    if suffix not in _CODECS:
        raise DataError(Path(path), f"unsupported video extension; expected one of {', '.join(_CODECS)}")
    codec = _CODECS[suffix][1]
    return "mpeg4" if codec == "libx264" and "libx264" not in av.codecs_available else codec


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    timestamps: Sequence[float] | None = None,
    *,
    threads: int = 0,
    x264_options: dict[str, str] | None = None,
) -> Path:
    """Encode RGB uint8 frames (+ optional mono float32 audio) to mp4/mkv (H.264/AAC) or webm (VP9/Opus).

    ``timestamps`` (seconds, increasing) gives a variable frame rate; otherwise frame i is at i / fps.
    ``threads=1`` makes the bytes deterministic (FFmpeg's default picks by core count); ``x264_options``
    (e.g. preset, crf) apply when the encoder is libx264. Written to a temporary name and renamed, so a failed
    write leaves nothing behind.
    """
    import av

    path = Path(path)
    container_format, _, audio_codec = _CODECS.get(path.suffix.lower(), (None, None, None))
    codec = video_codec(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    rate = Fraction(fps).limit_denominator(1001)
    try:
        with av.open(str(tmp), mode="w", format=container_format) as container:
            video = None
            audio_stream = None
            if audio is not None:
                audio_stream = container.add_stream(audio_codec, rate=sample_rate)
                audio_stream.layout = "mono"
            for i, rgb in enumerate(frames):
                if video is None:
                    options = dict(x264_options or {}) if codec == "libx264" else None
                    video = container.add_stream(codec, rate=rate, options=options)
                    video.height, video.width = (int(rgb.shape[0]) // 2 * 2, int(rgb.shape[1]) // 2 * 2)
                    video.pix_fmt = "yuv420p"
                    if threads:
                        video.thread_count = threads
                    video.time_base = Fraction(1, 1000) if timestamps is not None else 1 / rate
                    video.codec_context.time_base = video.time_base
                frame = av.VideoFrame.from_ndarray(
                    np.ascontiguousarray(rgb[: video.height, : video.width]), format="rgb24"
                )
                frame.pts = round(timestamps[i] * 1000) if timestamps is not None else i
                frame.time_base = video.codec_context.time_base
                container.mux(video.encode(frame))
            if video is None:
                raise DataError(path, "no frames to write")
            container.mux(video.encode(None))
            if audio_stream is not None:
                samples = np.asarray(audio, dtype=np.float32).reshape(1, -1)
                step = audio_stream.codec_context.frame_size or 1024
                for start in range(0, samples.shape[1], step):
                    chunk = av.AudioFrame.from_ndarray(
                        np.ascontiguousarray(samples[:, start : start + step]), format="fltp", layout="mono"
                    )
                    chunk.sample_rate = sample_rate
                    chunk.pts = start
                    chunk.time_base = Fraction(1, sample_rate)
                    container.mux(audio_stream.encode(chunk))
                container.mux(audio_stream.encode(None))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------- frame -> model input
# The one definition of how a frame of any size becomes the model's input image (issue 25 item 4), shared by
# the live preprocessing (engines.base.preprocess_frame, engines.preprocess), scripts/aspect_effect.py and
# the consumers that map a heatmap back onto the frame. The engine manifest's ``image.fit`` names the mode
# (``image.resize`` is the older free-text description); a manifest without it means ``stretch`` (every engine
# exported before the field existed).
RESIZE_MODES = ("stretch", "crop", "letterbox")
DEFAULT_RESIZE = "stretch"


@dataclass(frozen=True)
class FrameFit:
    """Where a frame's pixels go in the model input: the frame's ``source`` rectangle (frame pixels, x0, y0,
    x1, y1) is resized onto the input's ``target`` rectangle (input pixels); input pixels outside ``target``
    are padding (the normalisation mean). stretch: whole frame -> whole input; crop: the centred rectangle
    of the input's aspect -> whole input; letterbox: whole frame -> the centred rectangle of its aspect."""

    mode: str
    frame_size: tuple[int, int]  # (height, width) of the frame
    input_size: tuple[int, int]  # (height, width) of the model input
    source: tuple[int, int, int, int]
    target: tuple[int, int, int, int]

    def input_to_frame(self, x: float, y: float) -> tuple[float, float] | None:
        """Normalized input point (0..1 over the input) -> normalized frame point; None in the padding."""
        (h, w), (H, W) = self.frame_size, self.input_size
        sx0, sy0, sx1, sy1 = self.source
        tx0, ty0, tx1, ty1 = self.target
        px, py = x * W, y * H
        if not (tx0 <= px <= tx1 and ty0 <= py <= ty1):
            return None
        fx = sx0 + (px - tx0) * (sx1 - sx0) / (tx1 - tx0)
        fy = sy0 + (py - ty0) * (sy1 - sy0) / (ty1 - ty0)
        return fx / w, fy / h

    @property
    def map_box(self) -> tuple[float, float, float, float]:
        """The whole input's extent on the frame, normalized (x0, y0, x1, y1): where a heatmap over the input
        is drawn on the frame. stretch (0, 0, 1, 1); crop inside it; letterbox beyond it (the padding)."""
        (h, w), (H, W) = self.frame_size, self.input_size
        sx0, sy0, sx1, sy1 = self.source
        tx0, ty0, tx1, ty1 = self.target
        kx, ky = (sx1 - sx0) / (tx1 - tx0), (sy1 - sy0) / (ty1 - ty0)
        return ((sx0 - tx0 * kx) / w, (sy0 - ty0 * ky) / h, (sx0 + (W - tx0) * kx) / w, (sy0 + (H - ty0) * ky) / h)

    def frame_to_input(self, x: float, y: float) -> tuple[float, float]:
        """Normalized frame point -> normalized input point (outside 0..1 where crop cuts the frame off)."""
        (h, w), (H, W) = self.frame_size, self.input_size
        sx0, sy0, sx1, sy1 = self.source
        tx0, ty0, tx1, ty1 = self.target
        px = tx0 + (x * w - sx0) * (tx1 - tx0) / (sx1 - sx0)
        py = ty0 + (y * h - sy0) * (ty1 - ty0) / (sy1 - sy0)
        return px / W, py / H


def resize_mode(manifest_image: dict | None) -> str:
    """The resize mode a manifest's ``image`` section names in ``fit`` (``stretch`` when absent: older engines)."""
    mode = (manifest_image or {}).get("fit", DEFAULT_RESIZE)
    if mode not in RESIZE_MODES:
        raise UserError(f"engine manifest image.fit {mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    return str(mode)


def frame_fit(frame_size: tuple[int, int], input_size: tuple[int, int], mode: str = DEFAULT_RESIZE) -> FrameFit:
    """The :class:`FrameFit` of a ``frame_size`` (h, w) frame made into an ``input_size`` (H, W) input.

    Integer rectangles, so the CPU and device paths and the mapping back agree to the pixel: crop takes the
    centred ``round(h * W / H)``-wide (or -high) rectangle, letterbox scales the frame to the input's
    width (or height) and centres it, the other side rounded."""
    h, w = int(frame_size[0]), int(frame_size[1])
    H, W = int(input_size[0]), int(input_size[1])
    if mode not in RESIZE_MODES:
        raise UserError(f"resize mode {mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    full_frame, full_input = (0, 0, w, h), (0, 0, W, H)
    if mode == "stretch" or w * H == h * W:
        return FrameFit(mode, (h, w), (H, W), full_frame, full_input)
    wider = w * H > h * W  # the frame is wider than the input's aspect
    if mode == "crop":
        if wider:
            cw = max(1, round(h * W / H))
            x0 = (w - cw) // 2
            return FrameFit(mode, (h, w), (H, W), (x0, 0, x0 + cw, h), full_input)
        ch = max(1, round(w * H / W))
        y0 = (h - ch) // 2
        return FrameFit(mode, (h, w), (H, W), (0, y0, w, y0 + ch), full_input)
    if wider:
        ih = max(1, round(h * W / w))
        y0 = (H - ih) // 2
        return FrameFit(mode, (h, w), (H, W), full_frame, (0, y0, W, y0 + ih))
    iw = max(1, round(w * H / h))
    x0 = (W - iw) // 2
    return FrameFit(mode, (h, w), (H, W), full_frame, (x0, 0, x0 + iw, H))


def engine_frame_fit(manifest_image: dict | None, frame_shape: Sequence[int]) -> FrameFit | None:
    """The engine's ``image.fit`` for a frame of ``frame_shape`` (h, w, ...); None for ``stretch``, where the
    map covers the whole frame and needs no mapping (every engine without the field). What the inference
    worker, ``avloc.Localizer`` and the benches use to put a map and its peak back onto the frame."""
    mode = resize_mode(manifest_image)
    if mode == "stretch":
        return None
    size = (manifest_image or {})["size"]
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return frame_fit((int(frame_shape[0]), int(frame_shape[1])), hw, mode)


# A received map_box is drawn at frame size times its extent: a peer's [0, 0, 1e4, 1e4] would ask for a
# gigapixel map (a 640x480 display froze, 1e9 killed it with cv2.error at draw time). A real FrameFit.map_box
# lies within the frame (crop) or pads one axis of it (letterbox): its extent is the frame's aspect ratio
# over the input's, <= 8 for any frame up to 8:1 (32:9 is 3.6).
MAP_BOX_MAX_EXTENT = 8.0


def checked_map_box(value: object) -> tuple[float, float, float, float]:
    """A peer's meta ``map_box`` as (x0, y0, x1, y1) floats, or ValueError: four finite real numbers (not
    bools, not a string's characters) with x0 < x1, y0 < y1, each side and the area at most
    :data:`MAP_BOX_MAX_EXTENT` times the frame's, so drawing it costs at most that many frame-sized maps."""
    if not (
        isinstance(value, list | tuple)
        and len(value) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"map_box {value!r:.80}: expected [x0, y0, x1, y1] numbers")
    try:
        x0, y0, x1, y1 = (float(v) for v in value)
    except OverflowError:  # an int beyond float range
        raise ValueError(f"map_box {value!r:.80}: out of range") from None
    w, h = x1 - x0, y1 - y0
    if not (
        all(math.isfinite(v) for v in (x0, y0, x1, y1, w, h))
        and 0 < w <= MAP_BOX_MAX_EXTENT
        and 0 < h <= MAP_BOX_MAX_EXTENT
        and w * h <= MAP_BOX_MAX_EXTENT
        and x0 < 1
        and y0 < 1
        and x1 > 0
        and y1 > 0  # it overlaps the frame: a map somewhere else is no map
    ):
        raise ValueError(
            f"map_box {value!r:.80}: expected a finite box of extent <= {MAP_BOX_MAX_EXTENT:g} over the frame"
        )
    return x0, y0, x1, y1


def map_on_frame(
    values: np.ndarray, frame_hw: tuple[int, int], map_box: Sequence[float] | None = None
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A map over the model input -> the frame-sized map (bilinear) and the pixel rectangle of the frame it
    covers (x0, y0, x1, y1). ``map_box`` (:attr:`FrameFit.map_box`, None = the whole frame) may reach beyond
    the frame (letterbox); the frame outside it is 0 (crop: nothing there was seen)."""
    h, w = int(frame_hw[0]), int(frame_hw[1])
    values = np.asarray(values, np.float32)
    if map_box is None:
        return cv2.resize(values, (w, h), interpolation=cv2.INTER_LINEAR), (0, 0, w, h)
    x0, y0, x1, y1 = (round(float(v) * n) for v, n in zip(map_box, (w, h, w, h)))
    resized = cv2.resize(values, (max(x1 - x0, 1), max(y1 - y0, 1)), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((h, w), np.float32)
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if fx1 > fx0 and fy1 > fy0:
        out[fy0:fy1, fx0:fx1] = resized[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    return out, (fx0, fy0, max(fx1, fx0), max(fy1, fy0))


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The live resize: ``cv2.INTER_AREA`` when the image shrinks (no aliasing), ``INTER_LINEAR`` when it
    grows; unchanged when the size already matches."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    shrinking = h * w > height * width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def fit_region(image: np.ndarray, fit: FrameFit) -> np.ndarray:
    """The frame's ``fit.source`` pixels resized to the size of ``fit.target`` (uint8, channels kept)."""
    sx0, sy0, sx1, sy1 = fit.source
    tx0, ty0, tx1, ty1 = fit.target
    return resize_image(image[sy0:sy1, sx0:sx1], tx1 - tx0, ty1 - ty0)


def fit_frame(
    image: np.ndarray, input_size: tuple[int, int], mode: str = DEFAULT_RESIZE, fill: Sequence[int] | int = 0
) -> np.ndarray:
    """HxWxC uint8 frame -> the ``input_size`` (H, W) image the model sees under ``mode`` (padding ``fill``,
    e.g. the normalisation mean in uint8 levels). The one resize definition of the live path."""
    fit = frame_fit(image.shape[:2], input_size, mode)
    region = fit_region(image, fit)
    if fit.target == (0, 0, fit.input_size[1], fit.input_size[0]):
        return np.ascontiguousarray(region)
    out = np.empty((*fit.input_size, *image.shape[2:]), image.dtype)
    out[:] = fill
    tx0, ty0, tx1, ty1 = fit.target
    out[ty0:ty1, tx0:tx1] = region
    return out

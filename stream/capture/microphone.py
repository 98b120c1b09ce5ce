"""Microphone capture worker: PortAudio input → ring buffer → causal spectrogram windows → ``audio`` messages.

Three stages, each on its own thread:

1. The PortAudio callback (sounddevice ``InputStream``, PortAudio's thread) copies each block into a
   preallocated numpy ring (``SampleRing``) and records when the block's last sample was captured. It never
   blocks: no locks, no allocation, no logging, no I/O; a block that does not fit is dropped and counted.
2. The consumer (the worker's main thread) takes every new sample from the ring, resamples to the
   front-end's rate when the device cannot capture at it (PyAV's libswresample, stateful across blocks),
   and feeds ``avloc.core.audio.StreamingFrontEnd``, which yields one window every hop (100 ms by default)
   ending at the newest sample: causal, no look-ahead. As replay does, the window starts pre-filled with
   silence (``num_samples - hop`` zeros), so the first window comes one hop after capture starts, not one
   window length (10 s for ACL's front-end) later.
3. Each window is published with ``ts.window_end``: the host's monotonic time of the window's last sample.

Clock mapping: PortAudio reports ``inputBufferAdcTime`` (capture time of a block's first sample) on its
stream clock, which on Linux/ALSA is CLOCK_MONOTONIC; we still measure the offset between the stream clock
and ``time.monotonic()`` once at start and add it. Where a host API reports no ADC time (0) or an absurd
one, the callback's own ``time.monotonic()`` minus the block's duration is used. Each block end is an
anchor ``(ring position, time)``; a window ending at ring position p gets
``t = t_anchor - (anchor - p) / rate`` from the first anchor at or after p, so dropped blocks and
resampling never drift the clock.

Run as a process: ``python -m avloc.stream.capture.microphone --device default --endpoint tcp://127.0.0.1:5551``.
"""

from __future__ import annotations

import argparse
import glob
import logging
import threading
import time
from typing import Any

import numpy as np
import torch
import zmq

from avloc.core.audio import FrontEndConfig, StreamingFrontEnd
from avloc.core.errors import UserError
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
from avloc.stream.wire import protocol

log = logging.getLogger(__name__)

DEFAULT_HOP_SECONDS = 0.1
_ANCHORS = 1024  # block-end timestamps kept (about 10 s of 10 ms blocks)


class SampleRing:
    """Single-producer / single-consumer ring of audio frames with per-block capture-time anchors.

    ``write`` (the PortAudio callback) only does numpy slice assignments into preallocated arrays and bumps
    integer counters, whose assignment is atomic under the GIL; it publishes the new write position last,
    so the consumer never sees a half-written block. Positions count frames ever stored (dropped blocks are
    not stored), so they equal the sample indices the consumer feeds to the front-end.
    """

    def __init__(self, capacity: int, channels: int = 1, dtype: np.dtype | str = np.int16) -> None:
        if capacity <= 0:
            raise ValueError("ring capacity must be > 0")
        self.capacity = int(capacity)
        self.channels = int(channels)
        self._data = np.zeros((self.capacity, self.channels), dtype=dtype)
        self._anchor_pos = np.zeros(_ANCHORS, dtype=np.int64)
        self._anchor_time = np.zeros(_ANCHORS, dtype=np.float64)
        self._anchors = 0  # anchors ever written
        self.write_pos = 0  # frames ever stored (producer-owned)
        self.read_pos = 0  # frames ever consumed (consumer-owned)
        self.dropped_frames = 0  # frames lost because the ring was full
        self.dropped_blocks = 0
        self.blocks = 0

    def write(self, block: np.ndarray, end_time: float) -> bool:
        """Store a [frames, channels] block whose last sample was captured at ``end_time``. Never blocks."""
        n = block.shape[0]
        self.blocks += 1
        if n > self.capacity - (self.write_pos - self.read_pos):
            self.dropped_frames += n
            self.dropped_blocks += 1
            return False
        start = self.write_pos % self.capacity
        first = min(n, self.capacity - start)
        self._data[start : start + first] = block[:first]
        if first < n:
            self._data[: n - first] = block[first:]
        end = self.write_pos + n
        slot = self._anchors % _ANCHORS
        self._anchor_pos[slot] = end
        self._anchor_time[slot] = end_time
        self._anchors += 1
        self.write_pos = end  # publish last
        return True

    @property
    def available(self) -> int:
        return self.write_pos - self.read_pos

    def read(self, max_frames: int | None = None) -> np.ndarray:
        """Copy out (and consume) the frames stored since the last read, oldest first: [n, channels]."""
        end = self.write_pos
        n = end - self.read_pos if max_frames is None else min(end - self.read_pos, max_frames)
        start = self.read_pos % self.capacity
        first = min(n, self.capacity - start)
        out = np.empty((n, self.channels), dtype=self._data.dtype)
        out[:first] = self._data[start : start + first]
        out[first:] = self._data[: n - first]
        self.read_pos += n  # hand the space back only after copying
        return out

    def time_at(self, position: int, rate: float) -> float | None:
        """Capture time of the end of frame ``position - 1`` (i.e. of stored-frame index ``position``)."""
        count = min(self._anchors, _ANCHORS)
        if count == 0:
            return None
        pos = self._anchor_pos[:count] if self._anchors <= _ANCHORS else self._anchor_pos
        times = self._anchor_time[:count] if self._anchors <= _ANCHORS else self._anchor_time
        after = pos >= position
        if after.any():
            i = int(np.argmin(np.where(after, pos, np.iinfo(np.int64).max)))
        else:  # newer than every anchor (cannot happen for stored frames): extrapolate from the newest
            i = int(np.argmax(pos))
        return float(times[i] - (pos[i] - position) / rate)


class _Resampler:
    """Streaming mono float32 resampler (libswresample via PyAV); keeps its filter state between blocks."""

    def __init__(self, orig_rate: int, new_rate: int) -> None:
        import av  # why: PyAV's resampler, only when rates differ

        self.orig_rate = orig_rate
        self._av = av
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=new_rate)

    def __call__(self, mono: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(mono[None, :], dtype=np.float32)
        frame = self._av.AudioFrame.from_ndarray(data, format="flt", layout="mono")
        frame.sample_rate = self.orig_rate
        out = [f.to_ndarray()[0] for f in self._resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def flush(self) -> np.ndarray:
        """The samples still held in the filter (the end of a finite signal)."""
        out = [f.to_ndarray()[0] for f in self._resampler.resample(None)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def _to_float_mono(block: np.ndarray) -> np.ndarray:
    data = block.astype(np.float32)
    if np.issubdtype(block.dtype, np.unsignedinteger):  # offset binary (8-bit PCM): silence is the mid value
        half = float(np.iinfo(block.dtype).max // 2 + 1)
        data = (data - half) / half
    elif np.issubdtype(block.dtype, np.integer):
        data /= float(-np.iinfo(block.dtype).min)
    return data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]


def as_captured(block: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """A whole ``[frames, channels]`` signal (int or float) as capture hands it to the front-end: float in
    [-1, 1] (ints scaled by their full range), channels averaged, resampled to ``target_rate`` with the same
    libswresample filter (flushed at the end)."""
    mono = _to_float_mono(np.asarray(block).reshape(len(block), -1))
    if int(rate) == int(target_rate):
        return mono.astype(np.float32, copy=False)
    resampler = _Resampler(int(rate), int(target_rate))
    return np.concatenate([resampler(mono), resampler.flush()]).astype(np.float32, copy=False)


class AudioWindower:
    """Consumer side: ring frames → (resample) → StreamingFrontEnd → windows with capture times.

    ``max_lag_s``: when the consumer finds more than this much audio waiting beyond one window (after a
    stall), it skips ahead to the newest audio instead of computing stale windows; None never skips.
    ``prefill``: start with ``num_samples - hop`` samples of silence, as replay does (the worker's setting):
    the first window ends one hop into the capture. ``end_sample`` still counts captured samples only (a
    pre-filled window has ``end_sample < num_samples``). A skip-ahead keeps a whole window of real audio and
    so needs no silence.
    """

    def __init__(
        self,
        ring: SampleRing,
        config: FrontEndConfig,
        *,
        device_rate: int,
        hop_samples: int,
        max_lag_s: float | None = 1.0,
        prefill: bool = False,
    ) -> None:
        self.ring = ring
        self.config = config
        self.device_rate = int(device_rate)
        self.hop_samples = int(hop_samples)
        self.max_lag_s = max_lag_s
        self.frontend = StreamingFrontEnd(config, self.hop_samples)
        # front-end-rate samples of silence ahead of the current run's audio (replay's prefill)
        self._prefill = max(config.num_samples - self.hop_samples, 0) if prefill else 0
        self.frontend.push(np.zeros(self._prefill, np.float32))
        needs_resampling = self.device_rate != config.sample_rate
        self._resample = _Resampler(self.device_rate, config.sample_rate) if needs_resampling else None
        self._base = 0  # ring position (device frames) where the current front-end run started
        self.skipped_frames = 0

    def poll(self) -> list[tuple[int, float | None, np.ndarray]]:
        """Process everything in the ring; returns ``[(end_sample, window_end_time, spec[1,F,T])]``.

        ``end_sample``: front-end-rate samples since capture started, the window covering
        ``[end_sample - num_samples, end_sample)``.
        """
        lag_limit = None
        if self.max_lag_s is not None:
            lag_limit = int((self.config.window_seconds + self.max_lag_s) * self.device_rate)
        if lag_limit is not None and self.ring.available > lag_limit:
            keep = int(self.config.window_seconds * self.device_rate) + self.hop_samples
            skip = self.ring.available - keep
            self.ring.read(skip)
            self.skipped_frames += skip
            self.frontend.reset()
            self._prefill = 0  # the kept audio fills a whole window
            self._resample = (
                _Resampler(self.device_rate, self.config.sample_rate) if self._resample is not None else None
            )
            self._base = self.ring.read_pos
        block = self.ring.read()
        if block.shape[0] == 0:
            return []
        mono = _to_float_mono(block)
        if self._resample is not None:
            mono = self._resample(mono)
        out = []
        ratio = self.device_rate / self.config.sample_rate
        base_samples = round(self._base / ratio)
        for end, spec in self.frontend.push(mono):
            # end counts front-end-rate samples since _base (after the silence); map back to ring (device)
            # frames for the time.
            end -= self._prefill
            ring_pos = self._base + round(end * ratio)
            out.append((base_samples + end, self.ring.time_at(ring_pos, self.device_rate), spec))
        return out


def resolve_input_device(spec: str | int | None) -> int | None:
    """``None`` or ``"default"``: PortAudio's default input; an int (digits): that index; else a name part."""
    import sounddevice as sd  # why: PortAudio may be missing: only live capture needs it

    if spec is None or spec == "default":
        return None
    if isinstance(spec, int) or str(spec).isdigit():
        index = int(spec)
        try:
            info = sd.query_devices(index)
        except (ValueError, sd.PortAudioError):
            raise UserError(f"--mic {spec}: no audio device with that index (see `avloc devices`)") from None
        if info["max_input_channels"] < 1:
            raise UserError(f"--mic {spec}: device {info['name']!r} has no input channels")
        return index
    matches = [
        i
        for i, d in enumerate(sd.query_devices())
        if d["max_input_channels"] > 0 and str(spec).lower() in d["name"].lower()
    ]
    if not matches:
        raise UserError(f"--mic {spec!r}: no input device name contains it (see `avloc devices`)")
    return matches[0]


def _pick_rate_and_channels(device: int | None, wanted_rate: int) -> tuple[int, int]:
    """Capture at the front-end rate in mono when the device allows it; else its default rate (resampled)."""
    import sounddevice as sd  # why: PortAudio may be missing: only live capture needs it

    info = sd.query_devices(device, "input")
    channels_options = [1] + ([int(info["max_input_channels"])] if info["max_input_channels"] > 1 else [])
    for rate in (wanted_rate, int(info["default_samplerate"])):
        for channels in channels_options:
            try:
                sd.check_input_settings(device=device, samplerate=rate, channels=channels, dtype="int16")
                return rate, channels
            except (ValueError, sd.PortAudioError):
                continue
    raise UserError(f"--mic {device}: {info['name']!r} accepts neither {wanted_rate} Hz nor its default rate")


class MicrophoneCapture:
    """Owns the sounddevice InputStream and the ring its callback writes into."""

    def __init__(self, device: int | None, rate: int, channels: int, ring_seconds: float, block_frames: int) -> None:
        import sounddevice as sd  # why: PortAudio may be missing: only live capture needs it

        self.rate = rate
        self.ring = SampleRing(int(ring_seconds * rate), channels, np.int16)
        self.status_flags = 0
        self.last_callback = protocol.now()
        self._clock_offset = 0.0
        self._stream = sd.InputStream(
            device=device,
            samplerate=rate,
            channels=channels,
            dtype="int16",
            blocksize=block_frames,
            callback=self._callback,
        )
        # PortAudio's stream clock vs. ours (equal on Linux, but never assumed).
        self._clock_offset = protocol.now() - self._stream.time

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        # Runs on PortAudio's thread: copy into the ring and return; nothing here may block or allocate much.
        now = protocol.now()
        self.last_callback = now
        if status:
            self.status_flags += 1
        adc = time_info.inputBufferAdcTime
        start = adc + self._clock_offset if adc > 0 else now - frames / self.rate
        if abs(start - now) > 1.0:  # host API reported nonsense
            start = now - frames / self.rate
        self.ring.write(indata, start + frames / self.rate)

    def start(self) -> None:
        self._stream.start()

    @property
    def active(self) -> bool:
        return bool(self._stream.active)

    def close(self) -> None:
        try:
            self._stream.abort(ignore_errors=True)
        finally:
            self._stream.close(ignore_errors=True)


def run_microphone(
    device: str | int | None = None,
    endpoint: str = protocol.DEFAULT_ENDPOINTS["audio"],
    stream_id: str = "mic0",
    *,
    frontend: FrontEndConfig | None = None,
    hop_seconds: float = DEFAULT_HOP_SECONDS,
    heartbeat_endpoint: str | None = None,
    stop: threading.Event | None = None,
    ring_seconds: float = 10.0,
    max_lag_s: float | None = 1.0,
    block_frames: int = 0,
    max_windows: int | None = None,
    wait_subscribers: int = 0,
    ctx: zmq.Context | None = None,
) -> dict[str, Any]:
    """Publish causal front-end windows of a microphone every hop until ``stop``; returns the counters.

    A device that stops calling back for 2 s (unplugged) is closed and reopened with exponential back-off.
    """
    config = frontend or FrontEndConfig()
    stop = stop or threading.Event()
    ctx = ctx or zmq.Context.instance()
    device_index = resolve_input_device(device)
    sock = make_publisher(ctx, endpoint)
    heartbeat = Heartbeat(ctx, heartbeat_endpoint, role="microphone", stream=stream_id)
    wait_for_subscribers([sock], wait_subscribers, 10.0, stop, heartbeat)
    warn = RateLimitedLog(log, 5.0)
    # ``published``: windows handed to libzmq (a PUB send never fails for a slow subscriber: consumers count
    # the sequence gaps instead)
    published = reopens = 0
    capture: MicrophoneCapture | None = None
    windower: AudioWindower | None = None
    backoff = 0.5
    # "loading" (not ready, for the launcher) until the first window went out; ``problem`` says why nothing
    # comes (on the console, through the launcher) and is worded without counters so it is said once
    stats: dict[str, Any] = {"windows": 0, "reopens": 0, "state": "loading", "problem": None}
    try:
        while not stop.is_set() and (max_windows is None or published < max_windows):
            if capture is None:
                try:
                    rate, channels = _pick_rate_and_channels(device_index, config.sample_rate)
                    capture = MicrophoneCapture(device_index, rate, channels, ring_seconds, block_frames)
                    capture.start()
                except Exception as err:  # PortAudio errors while the device is gone
                    if isinstance(err, UserError) and reopens == 0 and published == 0:
                        raise
                    log.warning("cannot open microphone %r (%s); retrying in %.1f s", device, err, backoff)
                    if capture is not None:
                        capture.close()
                    capture = None
                    if not (stats["problem"] or "").startswith("cannot open"):
                        stats["problem"] = why_mic_not_open(device, err)
                    heartbeat.maybe_send(stats, force=True)
                    retry_at = time.monotonic() + backoff
                    while not stop.wait(min(0.1, max(0.0, retry_at - time.monotonic()))):
                        heartbeat.maybe_send(stats)  # keep beating (the problem, not ready) while waiting
                        if time.monotonic() >= retry_at:
                            break
                    backoff = min(2 * backoff, 10.0)
                    continue
                hop = round(hop_seconds * config.sample_rate)
                windower = AudioWindower(
                    capture.ring, config, device_rate=rate, hop_samples=hop, max_lag_s=max_lag_s, prefill=True
                )
                log.info(
                    "microphone %r open: %d Hz, %d channel(s), hop %d samples%s",
                    device,
                    rate,
                    channels,
                    hop,
                    "" if rate == config.sample_rate else f", resampled to {config.sample_rate} Hz",
                )
            assert windower is not None
            for end, window_end, spec in windower.poll():
                protocol.send(
                    sock,
                    "audio",
                    stream=stream_id,
                    seq=published,
                    ts={"window_end": window_end if window_end is not None else protocol.now(), "send": protocol.now()},
                    arrays={"spec": spec},
                    meta={
                        "end_sample": end,
                        "sample_rate": config.sample_rate,
                        "frontend": config.to_dict(),
                        "hop_samples": windower.hop_samples,
                    },
                )
                published += 1
                if max_windows is not None and published >= max_windows:
                    break
            ring = capture.ring
            delivering = capture.active and protocol.now() - capture.last_callback <= 2.0
            problem = stats["problem"] if published == stats["windows"] else None  # windows flow again: solved
            stats = {
                "windows": published,
                "ring_dropped_frames": ring.dropped_frames,
                "ring_dropped_blocks": ring.dropped_blocks,
                "skipped_frames": windower.skipped_frames,
                "status_flags": capture.status_flags,
                "reopens": reopens,
                "state": "ok" if published else "loading",
                "problem": problem
                if delivering
                else f"stopped delivering: {_mic_name(device)} sent no samples "
                f"for 2 s; reopening, {MIC_RETRY}; {DEVICES_HINT_MICS}",
            }
            if ring.dropped_blocks:
                warn("overflow", logging.WARNING, "ring overflow: %d frames dropped", ring.dropped_frames)
            heartbeat.maybe_send(stats, force=stats["problem"] != problem)
            if not delivering:
                log.warning("microphone %r stopped delivering; reopening", device)
                capture.close()
                capture, windower = None, None
                reopens += 1
                continue
            backoff = 0.5
            stop.wait(0.01)
    finally:
        if capture is not None:
            capture.close()
        heartbeat.maybe_send(stats, force=True)
        heartbeat.close()
        sock.close()
    log.info("microphone %s stopped: %s", stream_id, stats)
    return stats


MIC_RETRY = "retrying after 0.5 s, doubling up to every 10 s"
DEVICES_HINT_MICS = "`avloc devices` lists the microphones of this machine"


def _mic_name(device: str | int | None) -> str:
    return "the default microphone" if device in (None, "default") else f"microphone {device!r}"


def why_mic_not_open(device: str | int | None, err: BaseException) -> str:
    """Why a microphone does not open and what was tried, in one line for the console."""
    import sounddevice as sd  # why: PortAudio may be missing: only live capture needs it

    try:
        inputs = [d for d in sd.query_devices() if d["max_input_channels"] > 0]
    except Exception:  # noqa: BLE001 - PortAudio itself failing is the answer
        inputs = []
    detail = " ".join(str(err).split()) or type(err).__name__
    if not inputs:
        why = "PortAudio finds no input device at all (no sound card, or no ALSA/PulseAudio capture device)"
    else:
        why = f"PortAudio refused it ({detail})"
    return (
        f"cannot open {_mic_name(device)}: {why}; tried PortAudio "
        f"{'default input' if device in (None, 'default') else f'device {device!r}'} at the front-end rate, "
        f"then at the device's own rate; {MIC_RETRY}; {DEVICES_HINT_MICS}"
    )


def list_microphones() -> list[dict[str, Any]]:
    """Input devices PortAudio sees: index, name, host API, channels, default rate, whether default."""
    import sounddevice as sd  # why: PortAudio may be missing: only live capture needs it

    try:
        devices = sd.query_devices()
        default_in = sd.default.device[0]
        hostapis = sd.query_hostapis()
    except sd.PortAudioError as err:
        log.warning("PortAudio cannot list devices: %s", err)
        return []
    return [
        {
            "index": i,
            "name": d["name"],
            "hostapi": hostapis[d["hostapi"]]["name"],
            "channels": int(d["max_input_channels"]),
            "default_samplerate": float(d["default_samplerate"]),
            "default": i == default_in,
        }
        for i, d in enumerate(devices)
        if d["max_input_channels"] > 0
    ]


def list_cameras(max_devices: int = 16) -> list[dict[str, Any]]:
    """Cameras found by probing ``/dev/video*`` with OpenCV (V4L2): index, path, resolution, fps."""
    import cv2  # why: OpenCV only to list cameras

    found = []
    paths = sorted(glob.glob("/dev/video*"), key=lambda p: int(p[len("/dev/video") :] or 0))
    for path in paths[:max_devices]:
        suffix = path[len("/dev/video") :]
        if not suffix.isdigit():
            continue
        cap = cv2.VideoCapture(int(suffix), cv2.CAP_V4L2)
        try:
            if cap.isOpened() and cap.read()[0]:
                found.append(
                    {
                        "index": int(suffix),
                        "path": path,
                        "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                        "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                        "fps": float(cap.get(cv2.CAP_PROP_FPS)),
                    }
                )
        finally:
            cap.release()
    return found


def list_devices() -> dict[str, list[dict[str, Any]]]:
    """Everything ``avloc devices`` shows: ``{"cameras": [...], "microphones": [...]}``."""
    return {"cameras": list_cameras(), "microphones": list_microphones()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m avloc.stream.capture.microphone", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", default="default", help="input device: index, name part or 'default'")
    parser.add_argument(
        "--endpoint", "--audio", default=protocol.DEFAULT_ENDPOINTS["audio"], help="PUB endpoint (bind)"
    )
    parser.add_argument(
        "--frontend",
        default=None,
        metavar="JSON|FILE|ENGINE_DIR",
        help="front-end config: JSON text, a JSON file or an engine dir (its manifest's "
        '"frontend"); default: linear 3 s',
    )
    parser.add_argument("--hop", type=float, default=DEFAULT_HOP_SECONDS, help="seconds between windows")
    parser.add_argument("--ring-seconds", type=float, default=10.0, help="capture ring buffer length")
    parser.add_argument(
        "--max-lag",
        type=float,
        default=1.0,
        help="skip ahead when this many seconds are waiting beyond a window (<0: never skip)",
    )
    parser.add_argument("--max-windows", type=int, default=None, help="exit after this many windows")
    parser.add_argument(
        "--wait-subscribers", type=int, default=0, help="before capturing, wait up to 10 s for this many subscribers"
    )
    add_common_arguments(parser, role="microphone")
    parser.set_defaults(stream_id="mic0")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(f"microphone:{args.stream_id}", args.log_file, args.verbose)
    torch.set_num_threads(1)  # one window per hop is cheap; leave the cores to the inference worker
    stop = install_stop_handlers()
    started = time.monotonic()
    try:
        config = load_frontend(args.frontend)
        stats = run_microphone(
            args.device,
            args.endpoint,
            args.stream_id,
            frontend=config,
            hop_seconds=args.hop,
            heartbeat_endpoint=args.heartbeat,
            stop=stop,
            ring_seconds=args.ring_seconds,
            max_lag_s=None if args.max_lag < 0 else args.max_lag,
            max_windows=args.max_windows,
            wait_subscribers=args.wait_subscribers,
        )
    except UserError as err:  # a device that does not exist: one line, no restart loop
        log.error("%s", err)
        return USER_ERROR_EXIT
    log.info("ran %.1f s: %s", time.monotonic() - started, stats)
    return 0


if __name__ == "__main__":
    run_worker_main(main)

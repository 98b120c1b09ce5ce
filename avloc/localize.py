"""``avloc localize``: offline, batched localization of files in this process (no pipeline, no sockets).

- ``avloc localize IMAGE AUDIO --engine E --out overlay.png``: one image heard with a sound (wav/ogg/flac,
  or a video's audio track); the window is the sound's centre, as a dataset's still frame is paired.
- ``avloc localize VIDEO --engine E --out overlay.mp4``: every frame with the window the live pipeline pairs
  with it (ending at the frame, see :mod:`avloc.api`); the original audio track is copied into the output
  unchanged (re-encoded to AAC only when the container cannot hold its codec).
- ``avloc localize FOLDER --engine E --out OUT_DIR``: every video in the folder, ``OUT_DIR/<name>.mp4``.
- ``--json peaks.jsonl`` (a folder for FOLDER input: ``<name>.jsonl``): one line per frame with the peak
  (0..1 and pixels), the confidence and the notice (``not_visible`` below the engine's gate).

Frames go through the engine in batches (``--batch``, default the engine's own maximum or 16) and each audio
window is embedded once. Resumable: an output that exists is skipped (``--force`` redoes it); everything is
written under a temporary name and renamed when complete, so an interrupted call leaves no half file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avloc.core.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
OUT_VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")
X264 = {"preset": "veryfast", "crf": "23"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="an image (with AUDIO), a video, or a folder of videos")
    parser.add_argument("audio", type=Path, nargs="?", default=None, help="the sound of an IMAGE (or a video's)")
    parser.add_argument("--engine", type=Path, required=True, help="engine folder (avloc export) or checkpoint")
    parser.add_argument("--out", type=Path, default=None, help="overlay: .png/.jpg, .mp4/.mkv/.webm, or a folder")
    parser.add_argument("--json", type=Path, default=None, help="per-frame peaks as JSON lines (a folder for FOLDER)")
    parser.add_argument("--batch", type=int, default=None, help="frames per engine call (default: the engine's)")
    parser.add_argument("--backend", default="onnxruntime", help="engine backend (avloc doctor lists them)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--alpha", type=float, default=0.45, help="heatmap opacity 0..1")
    parser.add_argument("--colormap", choices=("jet", "inferno"), default="jet")
    parser.add_argument("--no-gate", action="store_true", help="ignore the engine's silence gate")
    parser.add_argument("--force", action="store_true", help="redo outputs that already exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    jobs = plan(args.input, args.audio, args.out, args.json)
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch {args.batch}: expected a positive number of frames")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha {args.alpha}: expected a value between 0 and 1")
    todo = [job for job in jobs if args.force or not job.done()]
    if len(todo) < len(jobs):
        print(f"avloc localize: {len(jobs) - len(todo)} of {len(jobs)} output(s) exist already, skipped (--force)")
    if not todo:
        return 0
    from avloc.api import Localizer
    from avloc.stream.clients.display import COLORMAPS

    loc = Localizer(args.engine, backend=args.backend, device=args.device, threads=args.threads, gate=not args.no_gate)
    style = {"alpha": args.alpha, "colormap": COLORMAPS[args.colormap]}
    failed: list[str] = []
    frames = 0
    started = time.monotonic()
    # SIGTERM (kill, timeout, a batch scheduler) ends like Ctrl-C: the jobs' cleanup removes their partial files
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for job in todo:
            try:
                frames += job.run(loc, style, args.batch, progress=not args.no_progress)
            except UserError as err:
                if len(jobs) == 1:
                    raise
                failed.append(str(err))
                log.error("%s", err)
    finally:
        signal.signal(signal.SIGTERM, previous)
    seconds = time.monotonic() - started
    print(
        f"avloc localize: {len(todo) - len(failed)} file(s), {frames} frame(s) in {seconds:.1f} s "
        f"({frames / max(seconds, 1e-9):.1f} frames/s)" + "".join(f"; {o}" for o in _outputs(todo))
    )
    if failed:
        print(f"avloc localize: {len(failed)} file(s) failed:\n  " + "\n  ".join(failed))
        return 1
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _outputs(jobs: list[Job]) -> list[str]:
    return [str(p) for p in (jobs[0].out, jobs[0].json) if p is not None] if len(jobs) == 1 else []


# ---------------------------------------------------------------------------------------------- planning


class Job:
    """One input file and where its overlay / JSON lines go."""

    def __init__(self, source: Path, audio: Path | None, out: Path | None, json_path: Path | None) -> None:
        self.source, self.audio, self.out, self.json = source, audio, out, json_path

    def done(self) -> bool:
        return all(p.is_file() for p in (self.out, self.json) if p is not None)

    def run(self, loc: Any, style: dict[str, Any], batch: int | None, progress: bool) -> int:
        if self.source.suffix.lower() in IMAGE_SUFFIXES:
            return self._image(loc, style)
        return self._video(loc, style, batch, progress)

    def _image(self, loc: Any, style: dict[str, Any]) -> int:
        from avloc.api import _read_frame

        bgr = _read_frame(self.source, bgr=False)
        r = loc([bgr], self.audio, bgr=True)[0]
        if self.out is not None:
            image = draw(bgr, r, style)
            with _atomic(self.out) as tmp:
                ok, data = cv2.imencode(self.out.suffix.lower(), image)
                if not ok:
                    raise UserError(f"--out {self.out}: OpenCV cannot write {self.out.suffix} images")
                tmp.write_bytes(data.tobytes())
        if self.json is not None:
            with _atomic(self.json) as tmp:
                tmp.write_text(json.dumps(record(r, {"image": str(self.source), "audio": str(self.audio)})) + "\n")
        return 1

    def _video(self, loc: Any, style: dict[str, Any], batch: int | None, progress: bool) -> int:
        from avloc.core.errors import DataError
        from avloc.core.media import probe_video, write_video

        try:
            info = probe_video(self.source)
        except DataError as err:
            raise UserError(str(err)) from None
        if not info.has_audio and self.audio is None:
            raise UserError(f"{self.source}: no audio track (pass the sound as AUDIO)")
        total = round(info.duration * info.fps) if info.fps else None
        bar = _progress(total, self.source.name, progress)
        timestamps: list[float] = []
        count = 0
        json_file = None
        json_tmp = _temp(self.json) if self.json is not None else None
        video_tmp = self.out.with_name(f".{self.out.stem}.video{self.out.suffix}") if self.out is not None else None
        try:
            if json_tmp is not None:
                json_file = open(json_tmp, "w")  # noqa: SIM115 - closed in finally

            def frames() -> Iterator[np.ndarray]:
                nonlocal count
                for t, bgr, r in loc.video(self.source, audio=self.audio, batch=batch):
                    if json_file is not None:
                        extra = {"frame": count, "t": round(t, 6)}
                        json_file.write(json.dumps(record(r, extra)) + "\n")
                    count += 1
                    bar.update(1)
                    if video_tmp is not None:
                        timestamps.append(t)  # read by write_video when it encodes this frame
                        yield cv2.cvtColor(draw(bgr, r, style), cv2.COLOR_BGR2RGB)

            if video_tmp is not None:
                # the live recorder's encoder settings (stream/clients/recording.py): x264's default preset is ~3x
                # slower
                write_video(video_tmp, frames(), info.fps or 30.0, timestamps=timestamps, x264_options=X264)
                with _atomic(self.out) as tmp:
                    mux_audio(video_tmp, self.audio or self.source, tmp)
            else:
                for _ in frames():
                    pass
            if json_file is not None:
                json_file.close()
                os.replace(json_tmp, self.json)  # type: ignore[arg-type]
        finally:
            bar.close()
            if json_file is not None and not json_file.closed:
                json_file.close()
            for leftover in (json_tmp, video_tmp):
                if leftover is not None:
                    leftover.unlink(missing_ok=True)
        return count


def plan(source: Path, audio: Path | None, out: Path | None, json_path: Path | None) -> list[Job]:
    """The jobs of one call, every argument problem as a one-line UserError before any work starts."""
    jobs = _plan(source, audio, out, json_path)
    inputs = {p.resolve() for job in jobs for p in (job.source, job.audio) if p is not None}
    for job in jobs:
        for flag, path in (("--out", job.out), ("--json", job.json)):
            # an output named like an input was "done" (skipped) and, with --force, replaced the input itself
            if path is not None and path.resolve() in inputs:
                raise UserError(f"{flag} {path}: is an input of this call; write the output under another name")
        if job.out is not None and job.json is not None and job.out.resolve() == job.json.resolve():
            raise UserError(f"--out and --json are the same file {job.out}")
    return jobs


def _plan(source: Path, audio: Path | None, out: Path | None, json_path: Path | None) -> list[Job]:
    if out is None and json_path is None:
        raise UserError("nothing to write: pass --out and/or --json")
    if source.is_dir():
        if audio is not None:
            raise UserError(f"{audio}: AUDIO goes with an IMAGE, not with a folder of videos")
        clips = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        if not clips:
            raise UserError(f"{source}: no videos ({', '.join(VIDEO_SUFFIXES)}) in this folder")
        for folder, flag in ((out, "--out"), (json_path, "--json")):
            if folder is not None and folder.exists() and not folder.is_dir():
                raise UserError(f"{flag} {folder}: expected a folder for a folder of videos")
        stems = [clip.stem for clip in clips]
        # a.mp4 and a.mkv would both write a.mp4: such clips keep their extension in the name (a.mkv.mp4)
        names = [clip.name if stems.count(clip.stem) > 1 else clip.stem for clip in clips]
        return [
            Job(
                clip,
                None,
                None if out is None else out / f"{name}.mp4",
                None if json_path is None else json_path / f"{name}.jsonl",
            )
            for clip, name in zip(clips, names)
        ]
    if not source.is_file():
        raise UserError(f"{source}: no such file or folder")
    suffix = source.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        if audio is None:
            raise UserError(f"{source}: an image needs its sound: avloc localize IMAGE AUDIO --engine E --out OUT.png")
        if out is not None and out.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"--out {out}: expected an image file name ({', '.join(IMAGE_SUFFIXES)})")
    elif suffix in VIDEO_SUFFIXES:
        if out is not None and out.suffix.lower() not in OUT_VIDEO_SUFFIXES:
            raise UserError(f"--out {out}: expected a video file name ({', '.join(OUT_VIDEO_SUFFIXES)})")
    else:
        raise UserError(
            f"{source}: expected an image ({', '.join(IMAGE_SUFFIXES)}), a video ({', '.join(VIDEO_SUFFIXES)}) "
            "or a folder of videos"
        )
    if audio is not None and not audio.is_file():
        raise UserError(f"{audio}: audio file not found")
    return [Job(source, audio, out, json_path)]


# ---------------------------------------------------------------------------------------------- output


def record(r: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """One JSON line: where the sound is (0..1 and pixels), how sure, and the gate's notice."""
    return {
        **extra,
        "peak": None if r.peak is None else [round(r.peak[0], 5), round(r.peak[1], 5)],
        "peak_px": None if r.peak_px is None else list(r.peak_px),
        "confidence": round(r.confidence, 6),
        "visible": r.visible,
        "notice": r.notice,
    }


def draw(bgr: np.ndarray, r: Any, style: dict[str, Any]) -> np.ndarray:
    """The display's own overlay (heatmap stretched to its range, peak marker, gate notice)."""
    from avloc.stream.clients.display import draw_hud, overlay

    image = overlay(bgr, r.feature_map.astype(np.float32), style["alpha"], style["colormap"], r.peak, r.map_box)
    if r.notice:
        draw_hud(image, [], r.notice)
    return image


# Audio codecs copied as they are into each output container; anything else is re-encoded (the recorder's AAC,
# Opus for webm). MP4 could technically hold PCM or Vorbis, but browsers and most players do not play them there.
COPY_AUDIO = {
    ".mp4": {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"},
    ".mkv": None,  # Matroska holds (and players play) any of them
    ".webm": {"opus", "vorbis"},
}
TAIL_S = 0.1  # audio kept past the last frame (the recorder's join keeps the same)


def mux_audio(video: Path, audio_source: Path, out: Path) -> Path:
    """``video``'s stream plus ``audio_source``'s first audio track, cut to the video's length, into ``out``:
    audio packets copied (PyAV remux, no re-encode) when the container plays that codec (:data:`COPY_AUDIO`),
    else re-encoded by the recorder's join (``avloc.stream.clients.recording.join_segments``). An output without the
    audio it was asked to keep is an error, not a silent video-only file."""
    import av

    try:
        with av.open(str(video)) as vin, av.open(str(audio_source)) as ain:
            if not ain.streams.audio:
                raise UserError(f"{audio_source}: no audio track to keep")
            vsrc, asrc = vin.streams.video[0], ain.streams.audio[0]
            allowed = COPY_AUDIO.get(out.suffix.lower(), set())
            if allowed is not None and asrc.codec_context.name not in allowed:
                raise ValueError(f"{asrc.codec_context.name} audio is not played from {out.suffix} files")
            video_packets = [p for p in vin.demux(vsrc) if p.dts is not None]  # skip the demuxer's flush packet
            end = max((float((p.pts + (p.duration or 0)) * p.time_base) for p in video_packets), default=0.0)
            with av.open(str(out), "w") as dst:
                vdst, adst = dst.add_stream_from_template(vsrc), dst.add_stream_from_template(asrc)
                for packet in video_packets:
                    packet.stream = vdst
                    dst.mux(packet)
                for packet in ain.demux(asrc):
                    if packet.dts is None:
                        continue
                    if packet.pts is not None and float(packet.pts * packet.time_base) >= end + TAIL_S:
                        break  # a longer sound than the clip: the overlay ends with its last frame
                    packet.stream = adst
                    dst.mux(packet)
        return out
    except (av.error.FFmpegError, ValueError) as err:
        log.info("audio of %s cannot be copied into %s (%s): re-encoding it", audio_source, out.suffix, err)
    from avloc.stream.clients.recording import join_segments

    join_segments([video], out, audio_source=audio_source)
    with av.open(str(out)) as check:
        if not check.streams.audio:
            raise UserError(f"--out {out}: the audio of {audio_source} could not be written into a {out.suffix} file")
    return out


class _atomic:
    """``with _atomic(path) as tmp``: write ``tmp``; renamed to ``path`` on success, removed on failure."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = _temp(path)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type: Any, *_: object) -> None:
        if exc_type is None and self.tmp.is_file():
            os.replace(self.tmp, self.path)
        self.tmp.unlink(missing_ok=True)


def _temp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _progress(total: int | None, name: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="frame", disable=not enabled, leave=False, dynamic_ncols=True)

"""``avloc data prepare VIDEO_DIR --out ROOT``: a folder of raw videos (VGGSound-style ``<id>.mp4`` clips with an
audio track) -> the dataset ROOT layout (docs/architecture.md) that training, ``avloc eval`` and ``scan`` read.

Per video ``<id>``: ``ROOT/frames/<id>.jpg`` = the frame nearest the clip's middle (VGG-SS / the SSL-Align loaders
take the middle frame, ``image_050.jpg`` of a 10 s clip, with the audio window centred on it) and
``ROOT/audio/<id>.wav`` = the whole audio track, 16 kHz mono PCM16 (the one decoder,
:func:`avloc.core.media.read_video_audio`). The ids go into ``ROOT/<split>.txt``; ``--labels`` (``id,class`` csv,
e.g. from the VGGSound csv) writes ``labels.csv`` / ``classes.txt``.

Videos are converted in parallel worker processes; each output is written under a temporary name and renamed,
so an interrupted run leaves only whole files and the next run skips what is done (resumable). Videos that fail
(no audio track, undecodable) are listed in ``ROOT/prepare_errors.txt`` and left out of the split. At the end the
dataset is checked with :func:`avloc.core.data.scan.scan_dataset` and its report printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from avloc.core.datasets import SPLITS, read_labels
from avloc.core.errors import DataError, UserError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
JPEG_QUALITY = 95
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
ERRORS_FILE = "prepare_errors.txt"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    import io

    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, wave, sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def convert_video(video: Path, root: Path, sample_rate: int = SAMPLE_RATE) -> tuple[str, str | None]:
    """One video -> frames/<id>.jpg + audio/<id>.wav; returns (id, None) or (id, one-line problem). Skips a video
    whose two outputs exist (resume)."""
    from avloc.core.media import probe_video, read_video_audio, read_video_frame

    sid = video.stem
    image, audio = root / "frames" / f"{sid}.jpg", root / "audio" / f"{sid}.wav"
    if image.is_file() and audio.is_file():
        return sid, None
    try:
        info = probe_video(video)
        if not info.has_audio:
            raise DataError(video, "no audio track")
        wave = read_video_audio(video, sample_rate)
        rgb = read_video_frame(video, info.duration / 2.0 if info.duration > 0 else 0.0)
    except DataError as err:
        return sid, str(err)
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        return sid, f"{video}: JPEG encoding of the middle frame failed"
    # the audio last: a pair counts as done only when both exist, and the jpg is the cheaper one to redo
    _write_atomic(image, jpg.tobytes())
    _write_atomic(audio, _wav_bytes(wave, sample_rate))
    return sid, None


def list_source_videos(video_dir: Path) -> list[Path]:
    if not video_dir.is_dir():
        raise UserError(f"{video_dir}: not a folder of videos")
    videos = sorted(p for p in video_dir.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise UserError(f"{video_dir}: no videos ({', '.join(VIDEO_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for p in videos:
        if p.stem in stems:
            raise UserError(f"{video_dir}: {stems[p.stem].name} and {p.name} would both become id {p.stem!r}")
        stems[p.stem] = p
    return videos


def prepare(
    video_dir: str | Path,
    root: str | Path,
    split: str = "train",
    workers: int = 0,
    labels: str | Path | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Convert every video of ``video_dir`` into ``root`` (see the module doc); returns a summary with the ids
    written, the failures and the scan report."""
    from avloc.core.data.scan import scan_dataset

    if split not in SPLITS:
        raise UserError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    video_dir, root = Path(video_dir), Path(root)
    videos = list_source_videos(video_dir)
    label_map = read_labels(Path(labels)) if labels is not None else None  # id,class csv
    for sub in ("frames", "audio"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, min(len(videos), os.cpu_count() or 1))
    done: list[str] = []
    failed: dict[str, str] = {}
    bar = tqdm(total=len(videos), desc="prepare", unit="video", disable=not progress)
    if workers == 1:
        results = map(convert_video, videos, [root] * len(videos))
    else:
        # spawn, not fork: the parent may hold torch / OpenMP threads that a forked child would deadlock on
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        results = (f.result() for f in as_completed([pool.submit(convert_video, v, root) for v in videos]))
    try:
        for sid, problem in results:
            if problem:
                failed[sid] = problem
            else:
                done.append(sid)
            bar.update()
    finally:
        if workers != 1:
            pool.shutdown(cancel_futures=True)
    bar.close()

    ids = sorted(done)
    if not ids:
        raise UserError(
            f"{video_dir}: none of the {len(videos)} videos could be converted; first: {next(iter(failed.values()))}"
        )
    _write_atomic(root / f"{split}.txt", ("\n".join(ids) + "\n").encode())
    errors_path = root / ERRORS_FILE
    if failed:
        _write_atomic(errors_path, "".join(f"{p}\n" for _, p in sorted(failed.items())).encode())
    else:
        errors_path.unlink(missing_ok=True)
    if label_map is not None:
        missing = [i for i in ids if i not in label_map]
        if missing:
            raise UserError(f"--labels {labels}: no class for {len(missing)} id(s), e.g. {missing[0]!r}")
        rows = "".join(f"{i},{label_map[i]}\n" for i in ids)
        _write_atomic(root / "labels.csv", ("id,class\n" + rows).encode())
        _write_atomic(root / "classes.txt", ("\n".join(sorted({label_map[i] for i in ids})) + "\n").encode())
    meta = {
        "generator": "avloc data prepare",
        "source": str(video_dir),
        "sample_rate": SAMPLE_RATE,
        "frame": "nearest the clip's middle",
        "split": split,
        "n": len(ids),
        "n_failed": len(failed),
    }
    _write_atomic(root / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    problems = scan_dataset(root, splits=(split,), progress=False)
    return {"ids": ids, "failed": failed, "scan": problems}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video_dir", type=Path, help="folder of raw videos with audio (<id>.mp4, VGGSound style)")
    parser.add_argument("--out", type=Path, required=True, help="dataset ROOT to write (resumable)")
    parser.add_argument("--split", default="train", help="split list the ids go into (default train)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core)")
    parser.add_argument("--labels", type=Path, help="id,class csv -> labels.csv + classes.txt")


def main(args: argparse.Namespace) -> int:
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: expected >= 0")
    summary = prepare(args.video_dir, args.out, args.split, args.workers, args.labels, progress=sys.stderr.isatty())
    failed, problems = summary["failed"], summary["scan"]
    print(
        f"{len(summary['ids'])} videos -> {args.out} ({args.split}.txt); {len(failed)} failed"
        + (f", listed in {args.out / ERRORS_FILE}" if failed else "")
    )
    for line in problems:
        print(line)
    print(f"scan: {len(problems)} problem{'s' if len(problems) != 1 else ''} found in {args.out}")
    return 1 if problems or failed else 0

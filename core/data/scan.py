"""``avloc data scan ROOT``: check every file of a dataset and list all problems at once, one line each.

Training readers stop at the first bad file; this command reads everything (split lists, images, audio,
videos, annotations, the silent list, labels) and reports ``<file>: <problem>`` for each, then a count.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from tqdm import tqdm

from avloc.core.audio import FrontEndConfig, read_audio_file
from avloc.core.datasets import (
    SPLITS,
    VideoBoxes,
    find_video,
    list_videos,
    load_silent_csv,
    load_vggss_json,
    load_video_boxes,
    read_classes,
    read_labels,
    read_split,
)
from avloc.core.errors import DataError
from avloc.core.media import iter_video, probe_video, read_image, read_video_audio

log = logging.getLogger(__name__)


class _Problems:
    """Collects one line per problem; a check that raises becomes a line instead of stopping the scan."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: Path | str, problem: str) -> None:
        self.lines.append(f"{path}: {problem}")

    def check(self, path: Path, fn: Callable[[], object]) -> object | None:
        try:
            return fn()
        except DataError as err:
            self.lines.append(str(err))
        except Exception as err:  # a decoder failing in an unforeseen way is still one line about one file
            self.add(path, f"unexpected error ({err.__class__.__name__}: {' '.join(str(err).split())})")
        return None


def _check_wav(path: Path, sample_rate: int) -> None:
    wave, sr = read_audio_file(path)
    if sr != sample_rate:
        raise DataError(path, f"sample rate {sr} Hz, expected {sample_rate} Hz")


def _check_video(path: Path, problems: _Problems) -> None:
    info = probe_video(path)
    if not info.has_audio:
        raise DataError(path, "no audio track")
    read_video_audio(path)
    frames = sum(1 for _ in iter_video(path))  # decodes every frame: catches truncation mid-file
    boxes_path = path.with_suffix(".json")
    if boxes_path.is_file():
        boxes = problems.check(boxes_path, lambda: load_video_boxes(boxes_path))
        if isinstance(boxes, VideoBoxes) and len(boxes.boxes) != frames:
            problems.add(boxes_path, f"{len(boxes.boxes)} boxes for the {frames} frames of {path.name}")


def _meta_sample_rate(root: Path, problems: _Problems) -> int:
    path = root / "meta.json"
    if not path.is_file():
        return FrontEndConfig().sample_rate
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        rate = meta.get("sample_rate", 16000) if isinstance(meta, dict) else 16000
        return int(rate)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as err:
        problems.add(path, f"not valid JSON metadata ({err})")
        return FrontEndConfig().sample_rate


def _check_sample(
    root: Path, id: str, sample_rate: int, problems: _Problems, seen_videos: set[Path], image_too: bool = True
) -> None:
    image = root / "frames" / f"{id}.jpg"
    audio = root / "audio" / f"{id}.wav"
    video = find_video(root, id)
    if image.is_file():
        if image_too:
            problems.check(image, lambda: read_image(image))
    elif video is None and image_too:
        problems.add(image, "image file not found (and no video/<id>.mp4|mkv|webm)")
    if audio.is_file():
        problems.check(audio, lambda: _check_wav(audio, sample_rate))
    elif video is None:
        problems.add(audio, "audio file not found (and no video/<id>.mp4|mkv|webm)")
    if video is not None and video not in seen_videos and not (image.is_file() and audio.is_file()):
        seen_videos.add(video)
        problems.check(video, lambda: _check_video(video, problems))


def _check_annotations(path: Path, ids: list[str], sample_rate: int, problems: _Problems) -> None:
    annotations = problems.check(path, lambda: load_vggss_json(path))
    if not isinstance(annotations, dict):
        return
    wanted = set(ids)
    for id in ids:
        if id not in annotations:
            problems.add(path, f"no annotation for id {id!r} of {path.stem}.txt")
    for id, annotation in annotations.items():
        if id not in wanted:
            problems.add(path, f"annotation for id {id!r} that is not in {path.stem}.txt")
        for box in annotation.boxes.tolist():
            if box[2] < box[0] or box[3] < box[1]:
                problems.add(path, f"id {id!r}: box {[round(v, 6) for v in box]} has x2 < x1 or y2 < y1")
        # Recordings of the scene's other objects (audio-swap evaluation), relative to ROOT.
        for obj in annotation.objects:
            wav = path.parent / obj.audio if obj.audio else None
            if wav is not None and wav.parent.name != "audio":  # audio/<id>.wav is checked with its sample
                problems.check(wav, lambda wav=wav: _check_wav(wav, sample_rate))


def scan_dataset(root: str | Path, splits: Iterable[str] = SPLITS, progress: bool = False) -> list[str]:
    """Every problem of the dataset at ``root``, one ``"<file>: <problem>"`` line each (empty when clean)."""
    root = Path(root)
    problems = _Problems()
    if not root.is_dir():
        return [f"{root}: dataset root is not a directory"]
    sample_rate = _meta_sample_rate(root, problems)
    split_ids: dict[str, list[str]] = {}
    for split in splits:
        ids = problems.check(root / f"{split}.txt", lambda split=split: read_split(root, split))
        if isinstance(ids, list):
            split_ids[split] = ids

    owner: dict[str, str] = {}
    for split, ids in split_ids.items():
        for id in ids:
            if id in owner:
                problems.add(root / f"{split}.txt", f"id {id!r} is also in {owner[id]}.txt")
            else:
                owner[id] = split

    # id -> whether its image is needed too (a silent row's heard audio may come from an id of another split)
    samples = {id: True for id in owner}
    silent_path = root / "test_plus_silent.csv"
    if "test" in split_ids and silent_path.is_file():
        rows = problems.check(silent_path, lambda: load_silent_csv(silent_path))
        for row in rows if isinstance(rows, list) else []:
            if row.video not in owner:
                owner[row.video] = "test_plus_silent"
                samples[row.video] = True
            samples.setdefault(row.audio, False)

    checked_videos: set[Path] = set()
    for id, image_too in tqdm(samples.items(), desc="scan", unit="sample", disable=not progress):
        _check_sample(root, id, sample_rate, problems, checked_videos, image_too)
    # Videos not tied to a split id (e.g. replay clips) must decode too.
    for path in list_videos(root):
        if path not in checked_videos:
            checked_videos.add(path)
            problems.check(path, lambda path=path: _check_video(path, problems))

    for split in ("val", "test"):
        path = root / f"{split}.json"
        if split in split_ids and path.is_file():
            _check_annotations(path, split_ids[split], sample_rate, problems)
        elif split == "test" and split in split_ids and (root / "frames").is_dir():
            problems.add(path, "test annotations not found (VGG-SS json expected)")

    labels_path = root / "labels.csv"
    if labels_path.is_file():
        labels = problems.check(labels_path, lambda: read_labels(labels_path))
        if isinstance(labels, dict):
            for id in owner:
                if id not in labels:
                    problems.add(labels_path, f"no class for id {id!r}")
            if (root / "classes.txt").is_file():
                known = problems.check(root / "classes.txt", lambda: read_classes(root))
                for name in sorted(set(labels.values()) - set(known or [])):
                    problems.add(labels_path, f"class {name!r} is not in classes.txt")
    return problems.lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=Path, help="dataset root (frames/, audio/, video/, split lists, json)")
    parser.add_argument(
        "--split", choices=("all", *SPLITS), default="all", help="which split lists to check (default: all)"
    )


def main(args: argparse.Namespace) -> int:
    splits = SPLITS if args.split == "all" else (args.split,)
    lines = scan_dataset(args.root, splits, progress=sys.stderr.isatty())
    for line in lines:
        print(line)
    print(f"{len(lines)} problem{'s' if len(lines) != 1 else ''} found in {args.root}")
    return 1 if lines else 0

"""Readers of the field's data formats and of avloc's dataset layout (see docs/architecture.md).

- split lists ``ROOT/{train,val,test}.txt``; labels ``ROOT/labels.csv`` (``id,class``), ``ROOT/classes.txt``
- VGG-SS json: ``[{"file": id, "class": name, "bbox": [[x1, y1, x2, y2], ...]}]``, normalized 0..1,
  optional ``"objects"`` (every object of the scene)
- the Extended protocol's silent list ``test_plus_silent.csv``: ``video,audio,non-sounding``
- Flickr-SoundNet per-image XML annotations (boxes of 3 annotators in 256-px coordinates)
- ``AVDataset``: frames/audio layout, or raw videos ``ROOT/video/<id>.mp4|mkv|webm`` decoded on the fly.

Every problem with a file is a ``DataError`` naming the file and the problem in one line.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avloc.core.audio import FrontEnd, FrontEndConfig, frame_window, read_audio_file
from avloc.core.errors import DataError
from avloc.core.media import probe_video, read_image, read_video_audio, read_video_frame

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm")
SILENT_CSV_HEADER = ["video", "audio", "non-sounding"]
SLAVC_CSV_HEADER = ["video", "audio", "label"]  # the released vggss/flickr_test_plus_silent.csv


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene (the optional "objects" list of the layout's json)."""

    cls: str
    bbox: np.ndarray  # [4] normalized x1, y1, x2, y2
    sounding: bool
    audio: str | None = None  # path of its recording, relative to ROOT


@dataclass(frozen=True)
class Annotation:
    file: str
    cls: str
    boxes: np.ndarray  # [N, 4] float64 as in the json (int(v*224) then matches the references), normalized x1y1x2y2
    objects: tuple[SceneObject, ...] = field(default=())


@dataclass(frozen=True)
class SilentRow:
    video: str  # id of the image
    audio: str  # id of the audio heard with it
    non_sounding: bool  # True: the audio's source is absent from the image


# ---------------------------------------------------------------------------------------------- text formats


def read_split(root: str | Path, split: str) -> list[str]:
    """Ids of ``ROOT/<split>.txt``, one per line (blank lines skipped); duplicates are an error."""
    path = Path(root) / f"{split}.txt"
    if not path.is_file():
        raise DataError(path, f"split list not found (expected one id per line for split {split!r})")
    ids: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        item = line.strip()
        if not item:
            continue
        if item in seen:
            raise DataError(path, f"line {lineno}: id {item!r} repeats line {seen[item]}")
        seen[item] = lineno
        ids.append(item)
    return ids


def read_classes(root: str | Path) -> list[str]:
    """``ROOT/classes.txt``: class names, one per line."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        raise DataError(path, "class list not found")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_labels(root_or_path: str | Path) -> dict[str, str]:
    """``ROOT/labels.csv`` (``id,class`` per line, optional header) -> {id: class}."""
    path = Path(root_or_path)
    if path.is_dir():
        path = path / "labels.csv"
    if not path.is_file():
        raise DataError(path, "labels file not found (expected lines id,class)")
    labels: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or (lineno == 1 and [c.strip() for c in row] == ["id", "class"]):
                continue
            if len(row) != 2 or not row[0].strip():
                raise DataError(path, f"line {lineno}: expected 'id,class', got {','.join(row)!r}")
            labels[row[0].strip()] = row[1].strip()
    return labels


def _box(value: Any, path: Path, where: str) -> list[float]:
    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(is_number(v) for v in value):
        raise DataError(path, f"{where}: expected a box [x1, y1, x2, y2] of 4 numbers, got {value!r}")
    # An inverted box (x2 < x1) is kept as written: the reference rasterizers fill nothing for it, and the
    # released VGG-SS file must load as it is. ``avloc data scan`` reports such boxes.
    return [float(v) for v in value]


def load_vggss_json(path: str | Path) -> dict[str, Annotation]:
    """VGG-SS annotations by file id: ``[{"file", "class", "bbox": [[x1,y1,x2,y2], ...], "objects"?}]``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "annotation file not found")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"not valid JSON ({err})") from None
    if not isinstance(entries, list):
        raise DataError(path, f"expected a JSON list of annotations, got {type(entries).__name__}")
    out: dict[str, Annotation] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(path, f"entry {i}: expected an object, got {type(entry).__name__}")
        file_id = entry.get("file")
        if not isinstance(file_id, str) or not file_id:
            raise DataError(path, f"entry {i}: 'file' must be a non-empty string, got {file_id!r}")
        where = f"entry {i} ({file_id})"
        if file_id in out:
            raise DataError(path, f"{where}: file id appears twice")
        cls = entry.get("class", "")
        if not isinstance(cls, str):
            raise DataError(path, f"{where}: 'class' must be a string, got {cls!r}")
        raw_boxes = entry.get("bbox")
        if not isinstance(raw_boxes, list):
            raise DataError(path, f"{where}: 'bbox' must be a list of [x1, y1, x2, y2], got {raw_boxes!r}")
        boxes = [_box(b, path, f"{where} bbox[{j}]") for j, b in enumerate(raw_boxes)]
        raw_objects = entry.get("objects") or []
        if not isinstance(raw_objects, list):
            raise DataError(path, f"{where}: 'objects' must be a list, got {raw_objects!r}")
        objects = tuple(_scene_object(o, path, f"{where} objects[{j}]") for j, o in enumerate(raw_objects))
        out[file_id] = Annotation(
            file=file_id,
            cls=cls,
            boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            objects=objects,
        )
    return out


def _scene_object(value: Any, path: Path, where: str) -> SceneObject:
    if not isinstance(value, dict) or not isinstance(value.get("class"), str):
        expected = "{'class': str, 'bbox': [x1, y1, x2, y2], 'sounding': bool}"
        raise DataError(path, f"{where}: expected {expected}, got {value!r}")
    sounding = value.get("sounding", False)
    audio = value.get("audio")
    if not isinstance(sounding, bool) or not (audio is None or isinstance(audio, str)):
        raise DataError(path, f"{where}: 'sounding' must be true/false and 'audio' a path string")
    box = np.asarray(_box(value.get("bbox"), path, f"{where} bbox"), dtype=np.float64)
    return SceneObject(cls=value["class"], bbox=box, sounding=sounding, audio=audio)


def load_silent_csv(path: str | Path) -> list[SilentRow]:
    """The Extended protocol's list of (image, audio) pairs.

    avloc's layout: header ``video,audio,non-sounding`` with 0/1 flags, one row per test sample. The
    released SLAVC / SSL-Align files (``vggss_test_plus_silent.csv``) are read too: header
    ``video,audio,label``, where a row is silent when its label is ``non-sounding`` (as their loaders test).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "silent list not found")
    rows: list[SilentRow] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        if header not in (SILENT_CSV_HEADER, SLAVC_CSV_HEADER):
            raise DataError(
                path,
                f"header {','.join(header)!r}: expected {','.join(SILENT_CSV_HEADER)!r} "
                f"(or SLAVC's {','.join(SLAVC_CSV_HEADER)!r})",
            )
        flags = header == SILENT_CSV_HEADER
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            cells = [c.strip() for c in row]
            if len(cells) != 3 or not cells[0] or not cells[1] or (flags and cells[2] not in ("0", "1")):
                expected = "video,audio,0|1" if flags else "video,audio,label"
                raise DataError(path, f"line {lineno}: expected '{expected}', got {','.join(row)!r}")
            silent = cells[2] == "1" if flags else cells[2] == "non-sounding"
            rows.append(SilentRow(video=cells[0], audio=cells[1], non_sounding=silent))
    return rows


@dataclass(frozen=True)
class VideoBoxes:
    """``ROOT/video/<id>.json``: the sounding object's box in every frame of the clip."""

    fps: float
    boxes: np.ndarray  # [frames, 4] normalized x1, y1, x2, y2
    cls: str = ""


def load_video_boxes(path: str | Path) -> VideoBoxes:
    """Per-frame boxes of a generated clip: ``{"fps", "boxes": [[x1, y1, x2, y2] per frame], "class"?}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "per-frame box file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("boxes"), list):
        raise DataError(path, "expected an object with 'fps' and 'boxes': [[x1, y1, x2, y2] per frame]")
    fps = data.get("fps")
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0:
        raise DataError(path, f"'fps' must be a positive number, got {fps!r}")
    boxes = [_box(b, path, f"boxes[{i}]") for i, b in enumerate(data["boxes"])]
    cls = data.get("class", "")
    return VideoBoxes(fps=float(fps), boxes=np.asarray(boxes, np.float32).reshape(-1, 4), cls=str(cls))


_BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


def load_flickr_xml(path: str | Path) -> list[np.ndarray]:
    """Flickr-SoundNet annotation of one image: per annotator, boxes [N, 4] x1, y1, x2, y2 in 256-px units.

    The files nest ``<annotation><object><bbox>`` with a leading child before ``xmin ymin xmax ymax`` (the
    reference readers skip child 0 of each ``bbox``). Boxes are grouped by their parent element, one per
    annotator; the evaluation protocol sums all of them (``gt_map_flickr``) as the reference does.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(path, f"not valid XML ({err})") from None
    groups: list[list[list[float]]] = []
    for parent in root.iter():
        boxes = [_flickr_box(b, path, len(groups)) for b in parent if b.tag == "bbox"]
        if boxes:
            groups.append(boxes)
    if not groups:
        raise DataError(path, "no <bbox> elements (expected xmin/ymin/xmax/ymax per annotator)")
    return [np.asarray(g, dtype=np.float64).reshape(-1, 4) for g in groups]


def _flickr_box(elem: ET.Element, path: Path, group: int) -> list[float]:
    children = list(elem)
    by_tag = {c.tag: c.text for c in children}
    named = all(t in by_tag for t in _BOX_TAGS)
    texts = [by_tag[t] for t in _BOX_TAGS] if named else [c.text for c in children[-4:]]
    try:
        values = [float((t or "").strip()) for t in texts]
        if len(values) != 4:
            raise ValueError
    except ValueError:
        problem = f"annotator {group}: <bbox> needs numeric xmin, ymin, xmax, ymax, got {texts!r}"
        raise DataError(path, problem) from None
    return _box(values, path, f"annotator {group}")


# ---------------------------------------------------------------------------------------------- dataset


def find_video(root: str | Path, id: str) -> Path | None:
    """``ROOT/video/<id>.mp4|mkv|webm`` if one exists."""
    for ext in VIDEO_EXTENSIONS:
        path = Path(root) / "video" / f"{id}{ext}"
        if path.is_file():
            return path
    return None


def list_videos(root: str | Path) -> list[Path]:
    """Every ``ROOT/video/*.mp4|mkv|webm``, sorted."""
    return sorted(p for ext in VIDEO_EXTENSIONS for p in (Path(root) / "video").glob(f"*{ext}"))


class AVDataset:
    """Images, audio and annotations of one split.

    Per id, the layout files ``frames/<id>.jpg`` + ``audio/<id>.wav`` are used when present, else the raw
    video ``video/<id>.mp4|mkv|webm`` (frame at the clip centre, its audio track). A root holding only
    videos and no split list uses every video. Files are read lazily; problems raise ``DataError``.
    """

    def __init__(self, root: str | Path, split: str, frontend: FrontEndConfig | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.frontend = frontend or FrontEndConfig()
        if not self.root.is_dir():
            raise DataError(self.root, "dataset root is not a directory")
        if (self.root / f"{split}.txt").is_file() or (self.root / "frames").is_dir():
            self.ids: list[str] = read_split(self.root, split)
        else:
            self.ids = sorted({p.stem for p in list_videos(self.root)})
            if not self.ids:
                raise DataError(self.root / f"{split}.txt", "split list not found and no videos under video/")
            log.info("%s: no %s.txt, using all %d videos under video/", self.root, split, len(self.ids))
        self._annotations: dict[str, Annotation] | None = None
        self._labels: dict[str, str] | None = None
        self._frontend_module: FrontEnd | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def video_path(self, id: str) -> Path | None:
        return find_video(self.root, id)

    def _video_or_error(self, id: str, layout_path: Path) -> Path:
        video = self.video_path(id)
        if video is None:
            raise DataError(layout_path, f"not found (and no video/{id}.mp4|mkv|webm)")
        return video

    def image(self, id: str) -> np.ndarray:
        """RGB uint8 frame: ``frames/<id>.jpg``, else the video frame at the clip centre."""
        path = self.root / "frames" / f"{id}.jpg"
        if path.is_file():
            return read_image(path)
        video = self._video_or_error(id, path)
        return read_video_frame(video, probe_video(video).duration / 2)

    def audio(self, id: str) -> np.ndarray:
        """The whole clip, float32 mono at the front-end's rate (layout WAVs must already be at that rate)."""
        path = self.root / "audio" / f"{id}.wav"
        if path.is_file():
            wave, sr = read_audio_file(path)
            if sr != self.frontend.sample_rate:
                raise DataError(path, f"sample rate {sr} Hz, expected {self.frontend.sample_rate} Hz")
            return np.clip(wave, -1.0, 1.0)
        return read_video_audio(self._video_or_error(id, path), self.frontend.sample_rate)

    def audio_window(self, id: str) -> np.ndarray:
        """The front-end's window for the clip's centre frame (the image), per ``frontend.anchor``; tiled/padded."""
        return frame_window(self.audio(id), self.frontend)

    def spectrogram(self, id: str) -> np.ndarray:
        """[1, F, T] float32 of :meth:`audio_window`."""
        if self._frontend_module is None:
            self._frontend_module = FrontEnd(self.frontend).eval()
        return self._frontend_module.compute(self.audio_window(id))

    def annotation(self, id: str) -> Annotation | None:
        """Boxes from ``ROOT/<split>.json`` (VGG-SS form) when the split has one."""
        if self._annotations is None:
            path = self.root / f"{self.split}.json"
            self._annotations = load_vggss_json(path) if path.is_file() else {}
        return self._annotations.get(id)

    def label(self, id: str) -> str | None:
        """Class of ``id`` from ``ROOT/labels.csv`` (None without that file)."""
        if self._labels is None:
            path = self.root / "labels.csv"
            self._labels = read_labels(path) if path.is_file() else {}
        return self._labels.get(id)


def scan_dataset(root: str | Path) -> list[str]:
    """Every problem of the dataset at ``root``, one ``"<file>: <problem>"`` line each (avloc.core.data.scan)."""
    from avloc.core.data.scan import scan_dataset as scan  # scan imports this module

    return scan(root)

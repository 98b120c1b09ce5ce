"""Format readers (VGG-SS json, Extended silent csv, Flickr-SoundNet xml, split lists) and AVDataset."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile

from avloc.core.audio import FrontEndConfig
from avloc.core.datasets import (
    AVDataset,
    load_flickr_xml,
    load_silent_csv,
    load_vggss_json,
    load_video_boxes,
    read_labels,
    read_split,
)
from avloc.core.errors import DataError
from avloc.core.media import write_video

SR = 16000


def write_jpg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def write_wav(path: Path, wave: np.ndarray, sr: int = SR) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, sr, subtype="PCM_16")


def make_layout(root: Path) -> None:
    """Two train ids, one test id, a silent sample, with a ramp waveform so crops are recognisable."""
    for i, id in enumerate(["a", "b", "c", "s"]):
        write_jpg(root / "frames" / f"{id}.jpg", np.full((32, 40, 3), (50 * i, 100, 200 - 40 * i), np.uint8))
        write_wav(root / "audio" / f"{id}.wav", np.linspace(-0.5, 0.5, 2 * SR).astype(np.float32))
    (root / "train.txt").write_text("a\nb\n\n")
    (root / "test.txt").write_text("c\n")
    (root / "test.json").write_text(
        json.dumps([{"file": "c", "class": "dog", "bbox": [[0.1, 0.2, 0.5, 0.6], [0.6, 0.6, 0.9, 1.0]]}])
    )
    (root / "test_plus_silent.csv").write_text("video,audio,non-sounding\nc,c,0\ns,a,1\n")
    (root / "labels.csv").write_text("id,class\na,cat\nb,dog\nc,dog\ns,bird\n")


def test_read_split_and_labels(tmp_path: Path) -> None:
    make_layout(tmp_path)
    assert read_split(tmp_path, "train") == ["a", "b"]
    assert read_labels(tmp_path) == {"a": "cat", "b": "dog", "c": "dog", "s": "bird"}
    with pytest.raises(DataError, match=r"val.txt: split list not found"):
        read_split(tmp_path, "val")
    (tmp_path / "val.txt").write_text("x\ny\nx\n")
    with pytest.raises(DataError, match=r"val.txt: line 3: id 'x' repeats line 1"):
        read_split(tmp_path, "val")


def test_vggss_json_boxes_and_objects(tmp_path: Path) -> None:
    path = tmp_path / "test.json"
    objects = [
        {"class": "dog", "bbox": [0.1, 0.1, 0.4, 0.5], "sounding": True, "audio": "audio/x.wav"},
        {"class": "car", "bbox": [0.5, 0.5, 0.9, 0.9], "sounding": False},
    ]
    path.write_text(
        json.dumps(
            [
                {"file": "x", "class": "dog", "bbox": [[0.1, 0.1, 0.4, 0.5]], "objects": objects},
                {"file": "y", "class": "cat", "bbox": [[0, 0, 1, 1], [0.2, 0.3, 0.4, 0.5]]},
            ]
        )
    )
    annotations = load_vggss_json(path)
    assert set(annotations) == {"x", "y"}
    y = annotations["y"]
    assert y.cls == "cat" and y.boxes.shape == (2, 4) and y.boxes.dtype == np.float64
    np.testing.assert_allclose(y.boxes[1], [0.2, 0.3, 0.4, 0.5])
    assert y.objects == ()
    x = annotations["x"]
    assert [(o.cls, o.sounding, o.audio) for o in x.objects] == [
        ("dog", True, "audio/x.wav"),
        ("car", False, None),
    ]
    np.testing.assert_allclose(x.objects[1].bbox, [0.5, 0.5, 0.9, 0.9])


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"file": "x"}', "expected a JSON list"),
        ("[{oops", "not valid JSON"),
        ('[{"class": "dog", "bbox": []}]', "entry 0: 'file' must be a non-empty string"),
        ('[{"file": "x", "bbox": [[0.1, 0.2, 0.3]]}]', r"entry 0 \(x\) bbox\[0\]: expected a box"),
        ('[{"file": "x", "bbox": "0 0 1 1"}]', r"entry 0 \(x\): 'bbox' must be a list"),
        ('[{"file": "x", "bbox": []}, {"file": "x", "bbox": []}]', r"entry 1 \(x\): file id appears twice"),
        ('[{"file": "x", "bbox": [], "objects": [{"bbox": [0, 0, 1, 1]}]}]', r"entry 0 \(x\) objects\[0\]"),
    ],
)
def test_vggss_json_bad_fields(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=f"bad.json: {message}"):
        load_vggss_json(path)


def test_silent_csv(tmp_path: Path) -> None:
    make_layout(tmp_path)
    rows = load_silent_csv(tmp_path / "test_plus_silent.csv")
    assert [(r.video, r.audio, r.non_sounding) for r in rows] == [("c", "c", False), ("s", "a", True)]
    bad = tmp_path / "bad.csv"
    bad.write_text("image,audio,flag\nc,c,0\n")
    expected = "bad.csv: header 'image,audio,flag': expected 'video,audio,non-sounding'"
    with pytest.raises(DataError, match=expected):
        load_silent_csv(bad)
    slavc = tmp_path / "vggss_test_plus_silent.csv"  # the released files' form
    slavc.write_text("video,audio,label\nx_000010,x_000010,dog\ny_000020,z_000030,non-sounding\n")
    rows = load_silent_csv(slavc)
    assert [(r.video, r.audio, r.non_sounding) for r in rows] == [
        ("x_000010", "x_000010", False),
        ("y_000020", "z_000030", True),
    ]
    bad.write_text("video,audio,non-sounding\nc,c,yes\n")
    with pytest.raises(DataError, match="bad.csv: line 2"):
        load_silent_csv(bad)


FLICKR_XML = """<?xml version="1.0"?>
<annotation>
  <filename>{name}</filename>
  <object><bbox><dif>0</dif><xmin>10</xmin><ymin>20</ymin><xmax>100</xmax><ymax>200</ymax></bbox></object>
  <object><bbox><dif>0</dif><xmin>12</xmin><ymin>25</ymin><xmax>110</xmax><ymax>190</ymax></bbox>
          <bbox><dif>0</dif><xmin>150</xmin><ymin>30</ymin><xmax>250</xmax><ymax>120</ymax></bbox></object>
  <object><bbox><dif>0</dif><xmin>8</xmin><ymin>18</ymin><xmax>96</xmax><ymax>210</ymax></bbox></object>
</annotation>
"""


def reference_flickr_boxes(path: Path) -> list[list[int]]:
    """The LVS / EZ-VSL reader: every <bbox> child except the first, scaled from 256 to 224 px."""
    boxes = []
    for child in ET.parse(path).getroot():
        for childs in child:
            if childs.tag == "bbox":
                boxes.append([int(224 * int(ch.text) / 256) for i, ch in enumerate(childs) if i > 0])
    return boxes


def test_flickr_xml_matches_reference_reader(tmp_path: Path) -> None:
    path = tmp_path / "1234.xml"
    path.write_text(FLICKR_XML.format(name="1234.jpg"))
    annotators = load_flickr_xml(path)
    assert [a.shape for a in annotators] == [(1, 4), (2, 4), (1, 4)]
    np.testing.assert_array_equal(annotators[1][1], [150, 30, 250, 120])
    ours = [[int(224 * v / 256) for v in box] for a in annotators for box in a.tolist()]
    assert ours == reference_flickr_boxes(path)


def test_flickr_xml_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.xml"
    path.write_text("<annotation><object>")
    with pytest.raises(DataError, match="bad.xml: not valid XML"):
        load_flickr_xml(path)
    path.write_text("<annotation><object></object></annotation>")
    with pytest.raises(DataError, match="bad.xml: no <bbox> elements"):
        load_flickr_xml(path)
    path.write_text(
        "<annotation><object><bbox><dif>0</dif><xmin>a</xmin><ymin>1</ymin>"
        "<xmax>2</xmax><ymax>3</ymax></bbox></object></annotation>"
    )
    with pytest.raises(DataError, match="bad.xml: annotator 0: <bbox> needs numeric"):
        load_flickr_xml(path)


def test_avdataset_layout(tmp_path: Path) -> None:
    make_layout(tmp_path)
    frontend = FrontEndConfig(window_seconds=1.0)
    train = AVDataset(tmp_path, "train", frontend)
    assert train.ids == ["a", "b"] and len(train) == 2
    assert train.image("b").shape == (32, 40, 3)
    assert train.image("b")[0, 0, 0] == pytest.approx(50, abs=3)  # RGB order kept through JPEG
    wave = train.audio("a")
    assert wave.shape == (2 * SR,) and wave.dtype == np.float32
    window = train.audio_window("a")  # frontend.anchor end: the 1 s ending at the centre of the 2 s ramp
    np.testing.assert_allclose(window, wave[:SR])
    assert train.spectrogram("a").shape == frontend.output_shape()
    assert train.annotation("a") is None and train.label("a") == "cat"
    test = AVDataset(tmp_path, "test", frontend)
    np.testing.assert_allclose(test.annotation("c").boxes, [[0.1, 0.2, 0.5, 0.6], [0.6, 0.6, 0.9, 1.0]])


def test_avdataset_bad_files(tmp_path: Path) -> None:
    make_layout(tmp_path)
    data = AVDataset(tmp_path, "train")
    write_wav(tmp_path / "audio" / "a.wav", np.zeros(44100, np.float32), sr=44100)
    with pytest.raises(DataError, match=r"a.wav: sample rate 44100 Hz, expected 16000 Hz"):
        data.audio("a")
    (tmp_path / "frames" / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"b.jpg: unreadable image"):
        data.image("b")
    (tmp_path / "audio" / "b.wav").unlink()
    with pytest.raises(DataError, match=r"b.wav: not found \(and no video/b.mp4\|mkv\|webm\)"):
        data.audio("b")
    full = (tmp_path / "audio" / "c.wav").read_bytes()
    (tmp_path / "audio" / "c.wav").write_bytes(full[: len(full) // 3])
    with pytest.raises(DataError, match=r"c.wav: truncated"):
        AVDataset(tmp_path, "test").audio("c")


def test_avdataset_raw_videos(tmp_path: Path) -> None:
    frames = [np.full((48, 64, 3), 20 * i, np.uint8) for i in range(10)]  # 1 s at 10 fps
    t = np.arange(SR) / SR
    hum = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    write_video(tmp_path / "video" / "v1.mp4", frames, 10, hum)
    write_video(tmp_path / "video" / "v2.webm", frames, 10, np.zeros(SR, np.float32))
    write_video(tmp_path / "video" / "mute.mkv", frames, 10)
    frontend = FrontEndConfig(window_seconds=0.5)
    data = AVDataset(tmp_path, "test", frontend)  # no test.txt: every video
    assert data.ids == ["mute", "v1", "v2"]
    centre = data.image("v1")  # frame nearest t = duration / 2 = 0.5 s
    assert centre.shape == (48, 64, 3) and abs(float(centre.mean()) - 100) < 4
    assert abs(len(data.audio("v1")) - SR) < 0.1 * SR
    assert data.audio_window("v2").shape == (frontend.num_samples,)
    assert data.spectrogram("v1").shape == frontend.output_shape()
    with pytest.raises(DataError, match="mute.mkv: no audio track"):
        data.audio("mute")


def test_video_boxes(tmp_path: Path) -> None:
    path = tmp_path / "clip.json"
    per_frame = [[0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.4, 0.4]]
    path.write_text(json.dumps({"fps": 30, "class": "dog", "boxes": per_frame}))
    boxes = load_video_boxes(path)
    assert boxes.fps == 30 and boxes.cls == "dog" and boxes.boxes.shape == (2, 4)
    path.write_text(json.dumps({"fps": 0, "boxes": []}))
    with pytest.raises(DataError, match="clip.json: 'fps' must be a positive number"):
        load_video_boxes(path)


def test_vggss_json_keeps_degenerate_boxes_as_written(tmp_path: Path) -> None:
    # Boxes as they occur in the released vggss.json: zero height, zero area, an inverted one.
    path = tmp_path / "vggss.json"
    boxes = [[0.26875, 1.0, 0.753125, 1.0], [0.00625, 0.015625, 0.00625, 0.015625], [0.5, 0.2, 0.3, 0.4]]
    path.write_text(json.dumps([{"file": "M1P1xla8rg0_000000", "class": "tambourine", "bbox": boxes}]))
    np.testing.assert_allclose(load_vggss_json(path)["M1P1xla8rg0_000000"].boxes, boxes)

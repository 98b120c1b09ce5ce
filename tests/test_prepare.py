"""``avloc data prepare``: raw videos -> ROOT layout, in parallel, resumable, failures listed, scan clean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avloc.cli import main as cli_main
from avloc.core.audio import read_audio_file
from avloc.core.data.prepare import ERRORS_FILE, prepare
from avloc.core.datasets import read_labels, read_split
from avloc.core.media import read_image, read_video_audio, write_video

FPS, SECONDS, RATE = 10, 2.0, 16000


def _clip(path: Path, level_step: int, audio: bool = True) -> Path:
    """Solid grey frames whose level tells the frame index (frame i = i * level_step) + a tone."""
    n = int(FPS * SECONDS)
    frames = [np.full((48, 64, 3), i * level_step, np.uint8) for i in range(n)]
    t = np.arange(int(RATE * SECONDS)) / RATE
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32) if audio else None
    return write_video(path, frames, FPS, audio=wave, sample_rate=RATE, threads=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("raw")
    _clip(folder / "abc_000010.mp4", 10)
    _clip(folder / "def_000020.mp4", 12)
    _clip(folder / "mute_000030.mp4", 10, audio=False)
    (folder / "broken_000040.mp4").write_bytes(b"not a video at all")
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_prepare_writes_the_layout_lists_failures_and_scans_clean(videos, tmp_path):
    root = tmp_path / "root"
    labels = tmp_path / "labels.csv"
    labels.write_text("id,class\nabc_000010,dog\ndef_000020,piano\n")
    summary = prepare(videos, root, split="train", workers=2, labels=labels, progress=False)
    assert summary["ids"] == ["abc_000010", "def_000020"] == read_split(root, "train")
    assert sorted(summary["failed"]) == ["broken_000040", "mute_000030"]
    assert "no audio track" in summary["failed"]["mute_000030"]
    errors = (root / ERRORS_FILE).read_text().splitlines()
    assert len(errors) == 2 and any("broken_000040.mp4" in line for line in errors)
    assert summary["scan"] == []  # the written dataset passes `avloc data scan`
    assert read_labels(root) == {"abc_000010": "dog", "def_000020": "piano"}
    for sid, step in (("abc_000010", 10), ("def_000020", 12)):
        image = read_image(root / "frames" / f"{sid}.jpg")
        # the middle frame (t = 1.0 s -> frame 10), not the first or the last
        assert abs(float(image.mean()) - 10 * step) < 4, (sid, image.mean())
        wave, rate = read_audio_file(root / "audio" / f"{sid}.wav")
        assert rate == RATE
        ref = read_video_audio(videos / f"{sid}.mp4", RATE)
        assert wave.shape == ref.shape and np.abs(wave - ref).max() <= 1.0 / 32767 + 1e-6


def test_prepare_resumes_and_the_cli_reports(videos, tmp_path, capsys):
    root = tmp_path / "root"
    prepare(videos, root, workers=1, progress=False)
    kept = root / "frames" / "abc_000010.jpg"
    stamp = kept.stat().st_mtime_ns
    (root / "audio" / "def_000020.wav").unlink()  # as if interrupted before this one finished
    assert cli_main(["data", "prepare", str(videos), "--out", str(root), "--workers", "1"]) == 1  # 2 failures
    out = capsys.readouterr().out
    assert "2 videos ->" in out and "2 failed" in out and "scan: 0 problems" in out
    assert kept.stat().st_mtime_ns == stamp  # done outputs are not redone
    assert (root / "audio" / "def_000020.wav").is_file()
    assert not list(root.rglob(".*.partial"))
    assert cli_main(["data", "prepare", str(tmp_path / "nowhere"), "--out", str(root)]) == 2

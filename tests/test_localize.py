"""``avloc localize``: video overlays keep the original audio bit for bit, per-frame JSON equals the Python API
on each frame, images with a sound, folders in one call, resumable, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import avloc
from avloc import cli
from avloc.stream.capture.replay import iter_bgr_frames


def _packets(path: Path, kind: str) -> list[bytes]:
    with av.open(str(path)) as container:
        stream = getattr(container.streams, kind)[0]
        return [bytes(p) for p in container.demux(stream) if p.size]


def _localize(*args: str | Path) -> int:
    return cli.main(["localize", *map(str, args), "--threads", "1", "--no-progress"])


def test_video_overlay_keeps_audio_and_json_matches_the_api(
    engine_and_video: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, clip = engine_and_video
    out, peaks = tmp_path / "o" / "overlay.mp4", tmp_path / "o" / "peaks.jsonl"
    assert _localize(clip, "--engine", engine, "--out", out, "--json", peaks, "--batch", "4") == 0
    assert "30 frame(s)" in capsys.readouterr().out
    assert _packets(out, "audio") == _packets(clip, "audio")  # remuxed, not re-encoded
    assert len(_packets(out, "video")) == 30
    lines = [json.loads(line) for line in peaks.read_text().splitlines()]
    assert [r["frame"] for r in lines] == list(range(30))
    loc = avloc.Localizer(engine, threads=1)
    frames = list(iter_bgr_frames(clip))
    for i in (0, 13, 29):  # the single-frame API, same frame, same time in the same audio
        t, bgr = frames[i]
        r = loc(bgr, clip, at=t, bgr=True)
        assert lines[i]["t"] == pytest.approx(t, abs=1e-6)
        assert lines[i]["peak"] == pytest.approx(list(r.peak), abs=1e-5)
        assert lines[i]["confidence"] == pytest.approx(r.confidence, abs=1e-5)
        assert lines[i]["peak_px"] == list(r.peak_px) and lines[i]["notice"] is None
    # resumable: done outputs are skipped, --force redoes them; no temporary file is left
    stamp = out.stat().st_mtime_ns
    assert _localize(clip, "--engine", engine, "--out", out, "--json", peaks) == 0
    assert "1 of 1 output(s) exist already" in capsys.readouterr().out and out.stat().st_mtime_ns == stamp
    peaks.unlink()  # half done: only the missing one counts as not done
    assert _localize(clip, "--engine", engine, "--out", out, "--json", peaks) == 0
    assert peaks.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["overlay.mp4", "peaks.jsonl"]


def test_audio_is_kept_playable_and_cut_to_the_video(
    engine_and_video: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """webm cannot hold AAC (the audio was dropped with only a log line), MP4 gets no PCM (players do not play
    it), and a sound longer than the clip ends with its last frame."""
    import soundfile

    engine, clip = engine_and_video
    assert _localize(clip, "--engine", engine, "--out", tmp_path / "o.webm") == 0
    with av.open(str(tmp_path / "o.webm")) as out:
        assert [s.codec_context.name for s in out.streams.audio] == ["opus"]
    t = np.arange(10 * 16000) / 16000
    soundfile.write(tmp_path / "long.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)  # 10 s, the clip is 2 s
    assert _localize(clip, tmp_path / "long.wav", "--engine", engine, "--out", tmp_path / "o.mp4") == 0
    with av.open(str(tmp_path / "o.mp4")) as out:
        (audio,) = out.streams.audio
        assert audio.codec_context.name == "aac"
        assert float(audio.duration * audio.time_base) < 2.5
    assert _localize(clip, tmp_path / "long.wav", "--engine", engine, "--out", tmp_path / "o.mkv") == 0
    with av.open(str(tmp_path / "o.mkv")) as out:  # Matroska plays PCM: copied, but only the clip's length
        (audio,) = out.streams.audio
        samples = sum(f.samples for f in out.decode(audio))
    assert audio.codec_context.name == "pcm_s16le" and 2.0 * 16000 <= samples <= 2.2 * 16000
    capsys.readouterr()


def test_sigterm_leaves_no_partial_files(
    engine_and_video: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill / timeout / a scheduler's SIGTERM mid-clip ends like Ctrl-C: no hidden partial outputs left behind
    (SIGTERM's default action skipped every cleanup), and the handler is restored afterwards."""
    import signal

    engine, clip = engine_and_video
    calls = []
    original = avloc.Localizer.localize

    def terminated_mid_clip(self, frames, embeddings):  # noqa: ANN001, ANN202
        calls.append(len(frames))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, frames, embeddings)

    class Killed(Exception):
        pass

    def killed(signum: int, frame: object) -> None:
        raise Killed  # what SIGTERM does to this test if localize does not handle it

    monkeypatch.setattr(avloc.Localizer, "localize", terminated_mid_clip)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        out = tmp_path / "o"
        assert (
            _localize(clip, "--engine", engine, "--out", out / "x.mp4", "--json", out / "x.jsonl", "--batch", "4")
            == 130
        )
        assert signal.getsignal(signal.SIGTERM) is killed
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(calls) == 2 and list(out.iterdir()) == []


def test_image_with_a_sound(engine_and_video: tuple[Path, Path], tmp_path: Path) -> None:
    engine, clip = engine_and_video
    _, bgr = next(iter(iter_bgr_frames(clip)))
    cv2.imwrite(str(tmp_path / "still.png"), bgr)
    out, peaks = tmp_path / "overlay.jpg", tmp_path / "peak.jsonl"
    assert _localize(tmp_path / "still.png", clip, "--engine", engine, "--out", out, "--json", peaks) == 0
    image = cv2.imread(str(out))
    assert image.shape == bgr.shape and not np.array_equal(image, bgr)
    (line,) = [json.loads(x) for x in peaks.read_text().splitlines()]
    r = avloc.Localizer(engine, threads=1)(tmp_path / "still.png", clip)
    assert line["peak"] == pytest.approx(list(r.peak), abs=1e-5) and line["image"].endswith("still.png")


def test_folder_in_one_call_with_a_bad_clip(
    engine_and_video: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, clip = engine_and_video
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(clip, clips / "a.mp4")
    shutil.copy(clip, clips / "b.mkv")
    shutil.copy(clip, clips / "b.mp4")  # same stem as b.mkv: both keep their extension
    (clips / "broken.mp4").write_bytes(b"not a video")
    (clips / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    assert _localize(clips, "--engine", engine, "--json", out) == 1  # the good ones are done, the bad one named
    text = capsys.readouterr().out
    assert "1 file(s) failed" in text and "broken.mp4" in text
    assert sorted(p.name for p in out.iterdir()) == ["a.jsonl", "b.mkv.jsonl", "b.mp4.jsonl"]
    assert out.joinpath("a.jsonl").read_text() == out.joinpath("b.mkv.jsonl").read_text()
    os.remove(clips / "broken.mp4")
    assert _localize(clips, "--engine", engine, "--json", out) == 0
    assert "3 of 3 output(s) exist already" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{clip}"], "nothing to write: pass --out and/or --json"),
        (["{clip}", "--out", "x.png"], "--out x.png: expected a video file name"),
        (["{img}", "--out", "x.png"], "an image needs its sound"),
        (["{img}", "{clip}", "--out", "x.mp4"], "--out x.mp4: expected an image file name"),
        (["{dir}/missing.mp4", "--out", "x.mp4"], "missing.mp4: no such file or folder"),
        (["{dir}", "--out", "x"], "no videos"),
        (["{clip}", "--out", "x.mp4", "--batch", "0"], "--batch 0: expected a positive"),
        (["{clip}", "--out", "{clip}", "--force"], "is an input of this call"),  # --force replaced the input
        (["{img}", "{dir}/s.wav", "--json", "{dir}/s.wav"], "is an input of this call"),
        (["{dir}/c", "--out", "{dir}/c"], "c/a.mp4: is an input of this call"),
        (["{clip}", "--out", "o.mkv", "--json", "o.mkv"], "--out and --json are the same file"),
    ],
)
def test_argument_errors_are_one_line(
    engine_and_video: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    engine, clip = engine_and_video
    (tmp_path / "still.png").write_bytes(b"")
    (tmp_path / "s.wav").write_bytes(b"")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.mp4").write_bytes(b"")
    values = {"clip": clip, "img": tmp_path / "still.png", "dir": tmp_path}
    assert _localize(*[a.format(**values) for a in args], "--engine", engine) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1

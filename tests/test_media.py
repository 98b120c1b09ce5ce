"""Images and video containers: frames, audio tracks, variable frame rate, and clear errors on bad files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from avloc.core.audio import load_audio
from avloc.core.errors import DataError
from avloc.core.media import (
    iter_video,
    probe_video,
    read_image,
    read_video_audio,
    read_video_frame,
    write_video,
)

FPS = 10


def grey_frames(n: int, height: int = 48, width: int = 64) -> list[np.ndarray]:
    """Frame i is a flat grey of level 20 * i, so a decoded frame tells which one it is."""
    return [np.full((height, width, 3), 20 * i % 256, np.uint8) for i in range(n)]


def frame_index(rgb: np.ndarray) -> int:
    return int(round(float(rgb.mean()) / 20))


def tone(seconds: float, freq: float = 440.0, amplitude: float = 0.5, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_read_image_rgb_order_and_errors(tmp_path: Path) -> None:
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = 200  # red
    cv2.imwrite(str(tmp_path / "red.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = read_image(tmp_path / "red.png")
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [200, 0, 0]
    grey = np.full((4, 4), 90, np.uint8)
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    assert read_image(tmp_path / "grey.png").shape == (4, 4, 3)
    with pytest.raises(DataError, match="nope.jpg: image file not found"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="bad.jpg: unreadable image"):
        read_image(tmp_path / "bad.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="empty.jpg: unreadable image"):
        read_image(tmp_path / "empty.jpg")


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm"])
def test_video_round_trip(tmp_path: Path, suffix: str) -> None:
    path = write_video(tmp_path / f"clip{suffix}", grey_frames(12), FPS, tone(1.2))
    info = probe_video(path)
    assert (info.width, info.height, info.has_audio, info.audio_channels) == (64, 48, True, 1)
    assert info.fps == pytest.approx(FPS)
    assert info.duration == pytest.approx(1.2, abs=0.1)

    decoded = list(iter_video(path))
    assert [round(t, 3) for t, _ in decoded] == [round(i / FPS, 3) for i in range(12)]
    assert [frame_index(f) for _, f in decoded] == list(range(12))

    for t, expected in [(0.0, 0), (0.52, 5), (0.58, 6), (1.1, 11), (9.0, 11)]:
        assert frame_index(read_video_frame(path, t)) == expected

    audio = read_video_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / 16000 - 1.2) < 0.1  # codec priming/padding only
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 5
    assert np.abs(audio).max() == pytest.approx(0.5, abs=0.05)
    np.testing.assert_array_equal(load_audio(path), audio)  # load_audio dispatches containers to PyAV


def test_variable_frame_rate_timestamps(tmp_path: Path) -> None:
    times = [0.0, 0.05, 0.3, 0.35, 0.9, 1.0]
    path = write_video(tmp_path / "vfr.mp4", grey_frames(6), FPS, timestamps=times)
    decoded = list(iter_video(path))
    assert [round(t, 3) for t, _ in decoded] == times
    # Nearest frame by timestamp, not by index * 1/fps.
    for t, expected in [(0.04, 1), (0.32, 2), (0.6, 3), (0.8, 4)]:
        assert frame_index(read_video_frame(path, t)) == expected


def test_stereo_track_is_averaged_like_soundfile(tmp_path: Path) -> None:
    import av

    path = tmp_path / "stereo.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("aac", rate=44100)
        audio.layout = "stereo"
        for frame in grey_frames(5):
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode(None))
        left, right = tone(0.5, amplitude=0.6, sr=44100), tone(0.5, amplitude=0.2, sr=44100)
        planar = np.stack([left, right])
        for start in range(0, planar.shape[1], 1024):
            chunk = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planar[:, start : start + 1024]), format="fltp", layout="stereo"
            )
            chunk.sample_rate, chunk.pts = 44100, start
            container.mux(audio.encode(chunk))
        container.mux(audio.encode(None))
    wave = read_video_audio(path)
    # mean of the channels: a 0.4 sine (FFmpeg's own downmix would give (0.6 + 0.2) / sqrt(2) = 0.57)
    middle = wave[len(wave) // 4 : -len(wave) // 4]  # away from the codec's onset/offset transients
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.4 / np.sqrt(2), abs=0.02)


def test_no_audio_track(tmp_path: Path) -> None:
    path = write_video(tmp_path / "silent.mp4", grey_frames(5), FPS)
    assert not probe_video(path).has_audio
    with pytest.raises(DataError, match="silent.mp4: no audio track"):
        read_video_audio(path)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm"])
def test_truncated_video_is_a_clear_error(tmp_path: Path, suffix: str) -> None:
    full = write_video(tmp_path / f"full{suffix}", grey_frames(20), FPS, tone(2.0))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    for read in (read_video_audio, lambda p: list(iter_video(p)), lambda p: read_video_frame(p, 1.8)):
        with pytest.raises(DataError, match=rf"cut{suffix}: (truncated|unreadable video container)"):
            read(cut)


def test_missing_and_garbage_video(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="gone.mp4: video file not found"):
        probe_video(tmp_path / "gone.mp4")
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"\x00" * 256)
    with pytest.raises(DataError, match="junk.mkv: unreadable video container"):
        read_video_audio(junk)


def test_write_video_leaves_nothing_on_failure(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no frames"):
        write_video(tmp_path / "none.mp4", [], FPS)
    assert list(tmp_path.iterdir()) == []

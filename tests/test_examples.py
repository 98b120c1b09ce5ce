"""The examples run as a user runs them: a fresh interpreter, outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_localize_stamps_example(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "localize_stamps.py"), "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "peak (" in done.stdout and "confidence" in done.stdout and "heatmap (160, 160)" in done.stdout
    overlay = cv2.imread(str(out / "overlay.png"))
    scene = cv2.imread(str(next((out / "scene" / "frames").glob("test_*.jpg"))))
    assert overlay.shape == scene.shape == (160, 160, 3)
    assert (abs(overlay.astype(int) - scene.astype(int)).mean()) > 10  # the heatmap is drawn over the scene

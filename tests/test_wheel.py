"""The built wheel is a complete install: built from a copy of the sources, installed with ``--target`` into a
folder outside the checkout (the dependencies are the ones already installed) and used from a working
directory outside the checkout: ``avloc --help``, ``avloc demo --help``, configs by name, a tiny export and a
replay through the multi-process pipeline, every process importing avloc from the installed copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "avloc", "core", "train", "engines", "stream", "configs")

# Runs inside the installed copy: which avloc it imports, configs by name, a tiny checkpoint + synth clip, and
# `avloc export` of it through the CLI's own main (in this process: one torch start-up fewer than a process of its
# own; the console script itself runs in `avloc --help`).
PREPARE = r"""
import json, sys
from pathlib import Path
import avloc
from avloc.cli import main as avloc_main
from avloc.core.audio import FrontEndConfig
from avloc.core.checkpoint import ImageConfig, save_checkpoint
from avloc.core.config import config_names, load_config
from avloc.core.data.synth import write_synth_video
from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
from avloc.stream.run.launcher import CONFIG_PATH, load_stream_config

out = Path(sys.argv[1])
save_checkpoint(
    out / "ckpt.pt", SSLAlign(SSLAlignConfig(width=8)), method="ssl_align", model_config={"width": 8},
    frontend=FrontEndConfig(kind="linear", window_seconds=1.0), image=ImageConfig(size=64),
)
write_synth_video(out / "clip.mp4", seconds=1.0, fps=10, size=(96, 64), seed=3)
exported = avloc_main(["export", "--checkpoint", str(out / "ckpt.pt"), "--out", str(out / "engine")])
print(json.dumps({"exported": exported,
    "avloc": avloc.__file__, "configs": str(avloc.CONFIGS_DIR),
    "assets": sorted(p.name for p in avloc.ASSETS_DIR.iterdir()),
    "names": config_names(), "cpu_lr": load_config("cpu")["optim"]["lr"],
    "ablation_model": load_config("ablations/align_only")["model"] == load_config("ssl_align")["model"],
    "stream": str(CONFIG_PATH), "hop": load_stream_config("stream").audio_hop_s,
}))
"""


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.timeout(300)
def test_wheel_is_a_complete_install(tmp_path: Path) -> None:
    src, wheels, target, work = (tmp_path / n for n in ("src", "wheels", "site", "work"))
    # a copy, so the build's own build/ and egg-info never land in (or race on) the checkout
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src), cwd=tmp_path)
    (wheel,) = wheels.glob("avloc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("avloc/configs/demo.yaml", "avloc/configs/stream.yaml", "avloc/configs/ablations/align_only.yaml"):
        assert data in names
    assert "avloc/assets/viewer.html" in names
    _pip("install", "--no-deps", "--no-compile", "-q", "--target", str(target), str(wheel), cwd=tmp_path)

    work.mkdir()
    # PYTHONPATH puts the installed copy ahead of site-packages (and of the checkout's editable finder, which
    # only answers what the path does not have); every worker process the launcher starts inherits it
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONSAFEPATH", None)

    def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-3000:])
        return done

    avloc_bin = [sys.executable, str(target / "bin" / "avloc")]
    commands = run(*avloc_bin, "--help").stdout
    assert all(c in commands for c in ("localize", "info", "replay", "demo"))
    assert "--minutes-budget" in run(*avloc_bin, "demo", "--help").stdout

    info = json.loads(run(sys.executable, "-c", PREPARE, str(work)).stdout.splitlines()[-1])
    assert Path(info["avloc"]).is_relative_to(target), info  # not the checkout
    assert Path(info["configs"]) == target / "avloc" / "configs" and Path(info["stream"]).is_file()
    assert {"cpu", "demo", "ssl_align", "stream", "ablations/align_only"} <= set(info["names"])
    assert info["cpu_lr"] == 5.0e-4 and info["ablation_model"] and info["hop"] > 0
    assert "viewer.html" in info["assets"]
    assert info["exported"] == 0 and (work / "engine" / "manifest.json").is_file()
    run(
        *avloc_bin,
        "replay",
        "clip.mp4",
        "--engine",
        "engine",
        "--speed",
        "max",
        "--headless",
        "--auto-ports",
        "--threads",
        "1",
        "--config",
        "stream",
        "--run-dir",
        "run",
        "--record",
        "out.mp4",
        timeout=180,
    )
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["reason"] == "ended", summary
    assert (work / "out.mp4").stat().st_size > 0

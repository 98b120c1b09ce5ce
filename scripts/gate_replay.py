"""The silence gate in a live replay: how many heatmaps of a no-sound stretch the inference worker marks
``not_visible``, and how many of a sounding stretch it lets through.

Builds one clip from a dataset clip (its frames looped): the object's own sound for ``--stretch`` seconds,
then digital silence for ``--stretch`` seconds, then its sound again. Replays it through the real pipeline
(replay → inference worker with the engine's gate → display's latency log) at real time, and counts, per
stretch, the heatmaps whose whole audio window (the ``window_seconds`` ending at the frame, as live) lies
inside that stretch. Prints one JSON object:

  .venv/bin/python scripts/gate_replay.py --engine engines_out/cpu --clip data/stamps10k/video/clip_0000.mp4 \\
      --out runs/gate_replay
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from avloc.core.errors import UserError
from avloc.core.media import iter_video, probe_video, read_video_audio, write_video
from avloc.engines.base import read_manifest
from avloc.engines.gate import gate_threshold

SAMPLE_RATE = 16000


def build_clip(clip: Path, out: Path, stretch_s: float) -> dict[str, tuple[float, float]]:
    """sound / silence / sound, ``stretch_s`` each; frames loop the source clip. Returns the stretches."""
    info = probe_video(clip)
    fps = info.fps or 30.0
    frames = [rgb for _, rgb in iter_video(clip)]
    audio = read_video_audio(clip, SAMPLE_RATE)
    n = round(stretch_s * SAMPLE_RATE)
    sound = np.tile(audio, -(-n // len(audio)))[:n]
    track = np.concatenate([sound, np.zeros(n, np.float32), sound])
    n_frames = round(3 * stretch_s * fps)
    write_video(out, (frames[i % len(frames)] for i in range(n_frames)), fps, track, SAMPLE_RATE)
    return {
        "sound": (0.0, stretch_s),
        "silence": (stretch_s, 2 * stretch_s),
        "sound_again": (2 * stretch_s, 3 * stretch_s),
    }


def count_gated(records: list[dict[str, Any]], stretches: dict[str, tuple[float, float]], window_s: float) -> dict:
    """Per stretch: heatmaps whose audio window [pts - window_s, pts] lies inside it, and the gated fraction."""
    out: dict[str, Any] = {}
    for name, (start, end) in stretches.items():
        inside = [r for r in records if r.get("pts") is not None and start <= r["pts"] - window_s and r["pts"] <= end]
        gated = sum(r.get("notice") == "not_visible" for r in inside)
        out[name] = {"heatmaps": len(inside), "gated": gated, "gated_frac": gated / len(inside) if inside else None}
    return out


def measure(engine: Path, clip: Path, run_dir: Path, stretch_s: float, speed: str) -> dict[str, Any]:
    from avloc.stream.run.replay_cli import run_replay
    from avloc.stream.run.report import read_latency_log

    manifest = read_manifest(engine)
    threshold = gate_threshold(manifest)
    if threshold is None:
        raise UserError(f"{engine}: the engine has no gate; export it with --gate-data DATA")
    window_s = float(manifest["frontend"]["window_seconds"])
    if stretch_s <= window_s:
        raise UserError(f"--stretch {stretch_s}: must exceed the engine's audio window ({window_s} s)")
    run_dir.mkdir(parents=True, exist_ok=True)
    made = run_dir / "gate_clip.mp4"
    stretches = build_clip(clip, made, stretch_s)
    summary = run_replay(made, engine, run_dir=run_dir, headless=True, speed=speed, auto_ports=True)
    records = read_latency_log(Path(summary["latency_log"]))
    return {
        "engine": str(engine),
        "clip": str(clip),
        "threshold": threshold,
        "window_seconds": window_s,
        "stretch_seconds": stretch_s,
        "speed": speed,
        "heatmaps": len(records),
        "stretches": count_gated(records, stretches, window_s),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, type=Path, help="engine directory exported with --gate-data")
    parser.add_argument("--clip", required=True, type=Path, help="a dataset clip (mp4 with the object's sound)")
    parser.add_argument("--out", required=True, type=Path, help="run directory (clip, logs, latency log)")
    parser.add_argument("--stretch", type=float, default=6.0, help="seconds of each stretch (default 6)")
    parser.add_argument("--speed", default="1.0", help="replay speed (default real time)")
    args = parser.parse_args(argv)
    try:
        result = measure(args.engine, args.clip, args.out, args.stretch, args.speed)
    except UserError as err:
        print(f"gate_replay: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``avloc demo``: the whole chain on a fresh machine, with no camera and no dataset.

1. make a small procedural dataset (``avloc.core.synth.make_synth``),
2. train the tiny demo model on it (``configs/demo.yaml``, a few minutes on 2 CPU cores),
3. export it to ONNX engines (``avloc.engines.export.export_engine``),
4. render a scene video with a moving sounding object (640x480, 30 fps, with its sound),
5. replay it headless through the real multi-process pipeline (replay -> inference -> display), recording
   ``out.mp4`` with the heatmap overlaid and the audio muxed back,
6. write the latency report (JSON + histogram PNG) and score the heatmaps: the fraction of frames whose
   heatmap peak lies inside the sounding object's box.

Every step's output stays in ``--out`` (default ``demo_out``); a step whose output already exists is reused,
so a second run only replays (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from avloc.core.errors import UserError

log = logging.getLogger(__name__)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
VIDEO_SIZE = (640, 480)
VIDEO_FPS = 30
DEMO_TRAIN = 800  # training clips of the generated dataset (what configs/demo.yaml is tuned for)
PROBE_STEPS = 3
MIN_BUDGET_MINUTES = 3.0
MIN_TRAIN_STEPS = 20
# seconds kept for what follows training: export, scene video, replay (+ start-up), report
AFTER_TRAIN_S = 75.0


def peak_hits(records: list[dict[str, Any]], boxes: list[list[float]], fps: float) -> dict[str, Any]:
    """How many computed heatmaps have their peak inside the box of the frame they were computed on."""
    hits = total = 0
    for rec in records:
        if rec.get("notice") or rec.get("peak") is None or rec.get("pts") is None:
            continue
        index = min(max(int(round(float(rec["pts"]) * fps)), 0), len(boxes) - 1)
        x1, y1, x2, y2 = boxes[index]
        x, y = rec["peak"]
        total += 1
        hits += int(x1 <= x <= x2 and y1 <= y <= y2)
    return {"frames_scored": total, "peak_in_box": hits, "fraction": round(hits / total, 4) if total else 0.0}


def box_area_fraction(boxes: list[list[float]]) -> float:
    """Mean area of the boxes as a fraction of the frame: the hit rate of a peak placed at random."""
    areas = [max(0.0, x2 - x1) * max(0.0, y2 - y1) for x1, y1, x2, y2 in boxes]
    return sum(areas) / len(areas) if areas else 0.0


def _step(name: str, started: float) -> None:
    print(f"[demo {time.monotonic() - started:6.1f} s] {name}", flush=True)


def _metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def train_within_budget(
    config: dict[str, Any], data: Path, run: Path, seconds_left: float
) -> tuple[Path, int]:
    """Train the demo model with as many steps of its schedule as fit in ``seconds_left`` on this machine.

    A short probe run (a few steps, which also builds the decoded-data cache) measures the seconds per step
    and the fixed cost (start-up, validation, checkpoints) here and now, so the budget holds on a slow or
    busy machine too; the real run then gets the steps that fit (at most the config's full schedule) and
    validates once, at its end.
    """
    from avloc.train.trainer import train

    train_cfg = config["train"]
    full_steps = int(train_cfg["epochs"]) * max(1, DEMO_TRAIN // int(train_cfg["batch_size"]))
    probe_cfg = copy.deepcopy(config)
    probe_cfg["train"].update(max_steps=PROBE_STEPS, epochs=1)
    probe_dir = run.with_name(run.name + "_probe")
    shutil.rmtree(probe_dir, ignore_errors=True)
    t0 = time.monotonic()
    train(probe_cfg, data, probe_dir)
    probe_s = time.monotonic() - t0
    record = _metrics(probe_dir)[-1]
    per_step = float(record["train_seconds"]) / max(1, int(record["steps"]))
    fixed = max(0.0, probe_s - float(record["train_seconds"]))
    shutil.rmtree(probe_dir, ignore_errors=True)
    steps = int(min(full_steps, (seconds_left - probe_s - fixed) / per_step))
    if steps < MIN_TRAIN_STEPS:
        log.warning(
            "only %d training steps fit the budget (%.1f s/step here); training %d anyway",
            steps,
            per_step,
            MIN_TRAIN_STEPS,
        )
        steps = MIN_TRAIN_STEPS
    cfg = copy.deepcopy(config)
    cfg["train"].update(max_steps=steps, val_every=int(train_cfg["epochs"]))
    print(f"  {per_step:.2f} s per step here: training {steps} of {full_steps} steps", flush=True)
    return train(cfg, data, run), steps


def run_demo(
    out: Path,
    *,
    minutes_budget: float = 10.0,
    seconds: float = 8.0,
    seed: int = 0,
    fresh: bool = False,
    backend: str = "onnxruntime",
) -> dict[str, Any]:
    """Run every step into ``out``; returns the report (also written to ``out/demo_report.json``)."""
    import torch

    from avloc.core.config import load_config
    from avloc.core.synth import make_synth, write_synth_video
    from avloc.engines.export import export_engine
    from avloc.stream.bench import plot_histograms, read_latency_log, summarize_records
    from avloc.stream.replay_cli import run_replay

    if minutes_budget < MIN_BUDGET_MINUTES:
        raise UserError(
            f"--minutes-budget {minutes_budget}: too small; the demo needs at least {MIN_BUDGET_MINUTES:g}"
            " minutes"
        )
    started = time.monotonic()
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    phases: dict[str, float] = {}

    def timed(name: str, t0: float) -> None:
        phases[name] = round(time.monotonic() - t0, 1)

    data = out / "data"
    t0 = time.monotonic()
    if not (data / "meta.json").is_file():
        _step("1/6 making the synthetic dataset", started)
        make_synth(data, seed=seed, n_train=DEMO_TRAIN, n_val=100, n_test=40, overwrite=True)
    timed("data", t0)

    config = load_config(CONFIG)
    config["train"]["device"] = "cpu"
    run = out / "train"
    best = run / "best.pt"
    steps: int | None = None
    t0 = time.monotonic()
    if not best.is_file():
        _step("2/6 training the tiny demo model (configs/demo.yaml)", started)
        shutil.rmtree(run, ignore_errors=True)
        seconds_left = minutes_budget * 60 - (time.monotonic() - started) - AFTER_TRAIN_S - seconds
        best, steps = train_within_budget(config, data, run, seconds_left)
    timed("train", t0)

    engine = out / "engine"
    t0 = time.monotonic()
    if not (engine / "manifest.json").is_file():
        _step("3/6 exporting ONNX engines", started)
        export_engine(best, engine, force=True)
    timed("export", t0)

    video = out / "scene.mp4"
    boxes_path = out / "scene_boxes.json"
    t0 = time.monotonic()
    if not (video.is_file() and boxes_path.is_file()):
        _step(
            f"4/6 rendering a {seconds:.0f} s {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]} scene, moving sounding object",
            started,
        )
        boxes = write_synth_video(video, seconds=seconds, fps=VIDEO_FPS, size=VIDEO_SIZE, seed=seed + 1)
        boxes_path.write_text(json.dumps({"fps": VIDEO_FPS, "boxes": boxes}))
    boxes = json.loads(boxes_path.read_text())["boxes"]
    timed("video", t0)

    _step("5/6 replaying it through the multi-process pipeline (replay -> inference -> display)", started)
    t0 = time.monotonic()
    record = out / "out.mp4"
    record.unlink(missing_ok=True)
    summary = run_replay(
        video,
        engine,
        backend=backend,
        run_dir=out / "pipeline",
        record=record,
        headless=True,
        speed="1.0",
        auto_ports=True,
    )
    timed("replay", t0)
    if summary["reason"] != "ended":
        raise UserError(
            f"demo: the pipeline stopped early ({summary['reason']}); see logs in {out / 'pipeline'}"
        )

    _step("6/6 latency report and localization score", started)
    records = read_latency_log(Path(summary["latency_log"]))
    latency = summarize_records(records)
    png = plot_histograms({"_records": records}, None, out / "latency_histograms.png")
    score = peak_hits(records, boxes, VIDEO_FPS)
    report = {
        "video": str(video),
        "recording": summary.get("record"),
        "latency": latency,
        "latency_histograms": str(png),
        "localization": {**score, "chance": round(box_area_fraction(boxes), 4)},
        "restarts": {n: p["restarts"] for n, p in summary["processes"].items()},
        "phases_s": phases,
        "total_s": round(time.monotonic() - started, 1),
        "minutes_budget": minutes_budget,
        "train_steps": steps,
        "pipeline_logs": summary["run_dir"],
    }
    path = out / "demo_report.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    report["report"] = str(path)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    parser.add_argument(
        "--minutes-budget",
        type=float,
        default=10.0,
        help="whole-demo time budget on 2 cores; below ~7 minutes training is shortened",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the generated scene video")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    parser.add_argument(
        "--fresh", action="store_true", help="delete --out first instead of reusing its steps"
    )


def main(args: argparse.Namespace) -> int:
    if args.seconds < 2:
        raise UserError(f"--seconds {args.seconds}: expected at least 2 seconds")
    report = run_demo(
        args.out,
        minutes_budget=args.minutes_budget,
        seconds=args.seconds,
        seed=args.seed,
        fresh=args.fresh,
        backend=args.backend,
    )
    lat, loc = report["latency"], report["localization"]
    print()
    print(f"output video (heatmap overlaid, original audio): {report['recording']}")
    print(f"latency report: {report['report']}  (histograms: {report['latency_histograms']})")
    print(
        f"heatmaps: {lat['heatmaps']} at {lat['heatmap_fps']:.1f} fps; e2e capture->display "
        f"p50 {lat['e2e_ms']['p50']:.1f} ms, p99 {lat['e2e_ms']['p99']:.1f} ms; drops {lat['drops']}"
    )
    print(
        f"heatmap peak inside the sounding object's box: {loc['peak_in_box']}/{loc['frames_scored']} frames "
        f"= {loc['fraction']:.1%} (a random point: {loc['chance']:.1%})"
    )
    print(f"total {report['total_s']:.0f} s  {report['phases_s']}")
    return 0

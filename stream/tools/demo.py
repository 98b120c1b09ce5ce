"""``avloc demo``: the whole chain on a fresh machine, with no camera and no dataset.

1. make a small real-asset dataset (``avloc.core.data.stamps.make_stamps``: tuxpaint photo cut-outs with their
   real recordings, restricted to ``DEMO_CATEGORIES``) and one 640x480 clip of a sounding object moving
   past two silent distractors,
2. train the demo model on it (``configs/demo.yaml``: the open-set recipe ``configs/cpu_pretrained.yaml``,
   frozen ImageNet EfficientNet-Lite0 + AudioSet YAMNet with learned heads and the fixed label-space and
   objectness terms) with ``train.budget_minutes`` set to what is left of the demo's budget after the reserve
   for what follows (the frozen trunks' features are computed once, then the heads train the epochs that fit),
3. export it to ONNX engines (``avloc.engines.export.export_engine``),
4. replay the clip headless through the real multi-process pipeline (replay -> inference -> display),
   recording ``out.mp4`` with the heatmap overlaid and the audio muxed back,
5. write the latency report (JSON + histogram PNG) and score the heatmaps: the fraction of frames whose
   heatmap peak lies inside the sounding object's box (the clip's ``boxes``).

Every step's output stays in ``--out`` (default ``demo_out``); a step whose output already exists is reused,
so a second run only replays (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from avloc.core.config import load_config, packaged_config
from avloc.core.errors import UserError

log = logging.getLogger(__name__)

CONFIG = packaged_config("demo")
VIDEO_SIZE = (640, 480)
VIDEO_FPS = 30
# The demo's categories (of tuxpaint-stamps-default): sources whose recordings a listener tells apart at once
# (and whose cut-outs look nothing alike), so a model trained for a few minutes can learn which object
# sounds. One per kind of sound - buzz, siren, drums, bowed string, moo, bark, quack, trumpeting, croak,
# crowing - so no second string, wind or percussion instrument (cello, bassoon, cymbal_crash) and none of
# the near-twins of the package: on 40-band log-mel statistics of the recordings (mean + std over time,
# standardized) hen ~ drake (a duck) 4.0, tiger ~ dog 5.4, horse ~ duck 6.0, lion ~ dog 7.5, while the
# closest pairs kept are 8.2 apart (violin ~ drake, cow_white ~ dog).
DEMO_CATEGORIES = (
    "bee",
    "cow",
    "dog",
    "drumkit",
    "duck",
    "elephant",
    "firetruck",
    "frog",
    "rooster",
    "violin",
)
# scenes: ~60 per category to train the heads on (the trunks are pretrained; their features of each scene cost
# ~0.2 s on 2 cores, the demo's largest step); val picks the epoch; no test split (the clip is the test)
DEMO_TRAIN, DEMO_VAL, DEMO_TEST = 600, 100, 0
DEMO_DISTRACTORS = 2  # silent objects of other categories in every scene and in the clip
MIN_BUDGET_MINUTES = 4.0
# seconds kept for what follows training: export, replay start-up (+ the clip's length), report
AFTER_TRAIN_S = 75.0
MIN_TRAIN_S = 60.0  # training gets at least this much, even when the budget is already spent


def _step(name: str, started: float) -> None:
    print(f"[demo {time.monotonic() - started:6.1f} s] {name}", flush=True)


def train_budget_s(minutes_budget: float, elapsed_s: float, seconds: float) -> float:
    """Training's share of the budget: what is left after ``elapsed_s``, minus the reserve for the steps that
    follow (export, the replay of a ``seconds`` clip, the report); at least MIN_TRAIN_S."""
    return max(MIN_TRAIN_S, minutes_budget * 60.0 - elapsed_s - AFTER_TRAIN_S - seconds)


def _data_matches(data: Path, seconds: float, seed: int, train_scenes: int) -> bool:
    """``data`` is a finished demo dataset of this seed, ``train_scenes`` training scenes and a ``seconds`` clip
    (else it is made again)."""
    try:
        meta = json.loads((data / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    video = meta.get("video") or {}
    return (
        meta.get("categories") == sorted(DEMO_CATEGORIES)
        and meta.get("seed") == seed
        and meta.get("counts", {}).get("train") == train_scenes
        and abs(float(video.get("seconds", -1)) - seconds) < 1e-6
        and (data / "video" / "clip_0000.json").is_file()
    )


def _trained_steps(run: Path) -> int | None:
    path = run / "metrics.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return int(records[-1]["step"]) if records else None


def run_demo(
    out: Path,
    *,
    minutes_budget: float = 10.0,
    seconds: float = 8.0,
    seed: int = 0,
    fresh: bool = False,
    backend: str = "onnxruntime",
    train_epochs: int | None = None,
    train_scenes: int = DEMO_TRAIN,
) -> dict[str, Any]:
    """Run every step into ``out``; returns the report (also written to ``out/demo_report.json``).

    ``train_epochs`` trains exactly that many epochs of the heads instead of what fits the budget: the same model
    whatever the machine's load (tests; the budget's epoch count depends on how busy the cores are). ``train_scenes``:
    the training split's size (tests: fewer scenes, decoded faster)."""
    import torch  # why: torch, the trainer, the export and the pipeline only when the demo runs (--help fast)

    from avloc.core.data.stamps import make_stamps
    from avloc.engines.export import export_engine
    from avloc.stream.run.replay_cli import run_replay
    from avloc.stream.run.report import box_area_fraction, peak_hits, read_latency_log, summarize_records
    from avloc.stream.tools.bench import plot_histograms
    from avloc.train.trainer import train

    if minutes_budget < MIN_BUDGET_MINUTES:
        raise UserError(
            f"--minutes-budget {minutes_budget}: too small; the demo needs at least {MIN_BUDGET_MINUTES:g} minutes"
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

    config = load_config(CONFIG)
    config["train"]["device"] = "cpu"
    data = out / "data"
    run = out / "train"
    best = run / "best.pt"
    t0 = time.monotonic()
    if not _data_matches(data, seconds, seed, train_scenes):
        _step(
            f"1/5 making the stamps dataset ({len(DEMO_CATEGORIES)} categories, {train_scenes} training scenes)"
            f" and a {seconds:g} s {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]} clip of a moving sounding object",
            started,
        )
        shutil.rmtree(run, ignore_errors=True)  # a model (and its engine) of other data is not reused
        size = int(config["image"]["size"])
        make_stamps(
            data,
            seed=seed,
            n_train=train_scenes,
            n_val=DEMO_VAL,
            n_test=DEMO_TEST,
            distractors=DEMO_DISTRACTORS,
            silent_frac=0.0,  # the demo runs no Extended evaluation
            videos=1,
            image_size=size,  # rendered at the size the frozen trunk sees
            video_size=VIDEO_SIZE,
            video_seconds=seconds,
            video_fps=VIDEO_FPS,
            workers=max(1, min(2, os.cpu_count() or 1)),
            overwrite=True,
            categories=DEMO_CATEGORIES,
        )
    timed("data", t0)

    steps: int | None = None
    t0 = time.monotonic()
    if not best.is_file():
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(out / "engine", ignore_errors=True)  # exported from an older model
        what = "the demo model (configs/demo.yaml: frozen Lite0 + YAMNet features once, then the heads)"
        if train_epochs is None:
            budget_s = train_budget_s(minutes_budget, time.monotonic() - started, seconds)
            config["train"]["budget_minutes"] = round(budget_s / 60.0, 3)
            _step(f"2/5 training {what} within {budget_s:.0f} s", started)
        else:
            config["train"].update(budget_minutes=None, epochs=train_epochs)
            _step(f"2/5 training {what}, {train_epochs} epochs", started)
        best = train(config, data, run)
        steps = _trained_steps(run)
        print(f"  trained {steps} steps", flush=True)
    timed("train", t0)

    engine = out / "engine"
    t0 = time.monotonic()
    if not (engine / "manifest.json").is_file():
        _step("3/5 exporting ONNX engines", started)
        export_engine(best, engine, force=True)
    timed("export", t0)

    video = data / "video" / "clip_0000.mp4"
    clip = json.loads((data / "video" / "clip_0000.json").read_text())
    boxes, fps = clip["boxes"], float(clip["fps"])

    _step("4/5 replaying the clip through the multi-process pipeline (replay -> inference -> display)", started)
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
        raise UserError(f"demo: the pipeline stopped early ({summary['reason']}); see logs in {out / 'pipeline'}")

    _step("5/5 latency report and localization score", started)
    records = read_latency_log(Path(summary["latency_log"]))
    latency = summarize_records(records)
    png = plot_histograms({"_records": records}, None, out / "latency_histograms.png")
    score = peak_hits(records, boxes, fps)
    report = {
        "video": str(video),
        "recording": summary.get("record"),
        "latency": latency,
        "latency_histograms": str(png),
        "localization": {**score, "chance": round(box_area_fraction(boxes), 4)},
        "sounding_class": clip.get("class"),
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
        help="whole-demo time budget (default 10; training gets what is left after the dataset, minus a "
        f"reserve for export and replay; at least {MIN_BUDGET_MINUTES:g})",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the generated clip (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing its steps")


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

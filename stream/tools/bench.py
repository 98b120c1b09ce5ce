"""``avloc bench pipeline``: per-stage latency of the streaming pipeline against an eager baseline, one run.

1. The real pipeline (launcher + replay worker(s) looping the video at real time + inference worker +
   headless display writing the latency log) runs for ``--duration`` seconds after a warm-up. From each
   heatmap's timestamps: capture→send, transport, queue wait, audio embedding, preprocess, visual engine,
   publish, publish→display, and end to end (capture → heatmap at the display) p50/p90/p99/max; heatmap
   fps, drops, and CPU use of every process (psutil).
2. Then, with the pipeline stopped, the BASELINE: what the papers' inference scripts do — one process,
   eager PyTorch, frame by frame: decode a frame, compute the spectrogram of the audio window ending at
   it, run the full model (both encoders) — on the same video for the same duration.
The speed-up (heatmap fps and latency) is a ratio of the two. Writes ``--out bench.json`` and a PNG of
latency histograms next to it.

Many streams: ``--streams N [--inference-workers K]`` replays the clip as N cameras; the report has each
stream's heatmap rate, the share of its frames that became heatmaps (``served``: heatmaps / (clip fps x
measured seconds)), its e2e p50/p99, and the fairness ratio (slowest / fastest stream's rate).
``--sweep`` finds, for each K of ``--sweep-workers``, the largest N where every stream is served
>= ``SERVED_TARGET`` of its frames with e2e p99 <= ``P99_TARGET_MS`` (N doubles until a run fails, then
bisects); it writes every run and the answer to ``--out`` and a plot next to it. ``--overload 1.5,2,4`` then runs
each worker count at those multiples of its capacity: past capacity the total heatmaps/s should stay within
``GOODPUT_TARGET`` of the peak, shared fairly (``FAIRNESS_TARGET``), with p99 bounded by the worker's frame
deadline. Every run records the machine's load average (``os.getloadavg``) before and after it, each
process's CPU share and, when the clip has its sidecar ``.json`` with per-frame boxes (``avloc data stamps
--videos``), how often the heatmap's peak falls in the sounding object's box (``peak_in_box``).
``--no-flow-control`` turns the captures' flow control off (``avloc.stream.wire.flow``), ``--capture-nice N``
lowers the captures' scheduling priority: both for comparisons.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from avloc.core.errors import UserError
from avloc.engines.base import known_backends
from avloc.stream.run.args import add_engine_arguments, add_worker_arguments, inference_args
from avloc.stream.run.report import (
    machine_info,
    peak_hits,
    percentiles,
    read_latency_log,
    stage_samples,
    summarize_records,
)

log = logging.getLogger(__name__)


BASELINE_WARMUP = 3
SERVED_TARGET = 0.95  # share of each stream's frames that must become heatmaps (the sweep's criterion)
P99_TARGET_MS = 100.0  # e2e p99 the sweep allows
GOODPUT_TARGET = 0.95  # past capacity: total heatmaps/s at least this share of the peak
FAIRNESS_TARGET = 0.9  # past capacity: slowest / fastest stream's heatmap rate


# ---------------------------------------------------------------------------------------------- pipeline


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            continue
    return out


def cpu_cost(cpu_percent: dict[str, float], heatmaps: int, measured_s: float, streams: int, fps: float | None) -> dict:
    """CPU time per unit of work over a measured window (robust to other load on the machine, unlike the rates):
    ms of CPU per served heatmap (every process, the inference workers', the display's) and per source frame of
    each capture (its decoding whether or not the frame is sent). ``cpu_percent``: per process, % of one core."""
    cpu_ms = {name: pct * 10.0 * measured_s for name, pct in cpu_percent.items()}  # % of a core over the window
    captures = [ms for name, ms in cpu_ms.items() if name.startswith(("replay", "camera"))]
    inference = sum(ms for name, ms in cpu_ms.items() if name.startswith("inference"))
    per_heatmap = (lambda ms: round(ms / heatmaps, 2)) if heatmaps else (lambda ms: None)
    frames = (fps or 0.0) * measured_s * streams
    return {
        "all_per_heatmap": per_heatmap(sum(cpu_ms.values())),
        "inference_per_heatmap": per_heatmap(inference),
        "captures_per_heatmap": per_heatmap(sum(captures)),
        "display_per_heatmap": per_heatmap(cpu_ms.get("display", 0.0)),
        "capture_per_source_frame": round(sum(captures) / frames, 3) if captures and frames else None,
    }


def bench_pipeline(
    video: Path,
    engine: Path,
    backend: str,
    *,
    streams: int,
    duration_s: float,
    warmup_s: float,
    run_dir: Path,
    threads: int | None = None,
    extra_inference_args: list[str] | None = None,
    config_path: Path | None = None,
    record: Path | None = None,
    inference_workers: int | None = None,
    max_batch: int | None = None,
    fps: float | None = None,
    flow_control: bool = True,
    capture_nice: int = 0,
) -> dict[str, Any]:
    """Run the real pipeline; measure ``duration_s`` seconds after the first heatmap + ``warmup_s``.
    ``fps``: the clip's frame rate, for the share of each stream's frames served. ``flow_control``: the
    replays follow the worker's heatmaps (avloc.stream.wire.flow); ``capture_nice``: niceness added to them."""
    from avloc.stream.run import launcher as L  # why: keeps `avloc bench pipeline --help` fast
    from avloc.stream.run import pipeline as P

    config = L.load_stream_config(config_path)
    endpoints = P.Endpoints.auto(streams)
    latency_log = run_dir / "latency.jsonl"
    latency_log.unlink(missing_ok=True)
    inference, shards = P.inference_specs(
        engine,
        backend,
        endpoints,
        config,
        workers=inference_workers,
        threads=threads,
        extra=extra_inference_args,
        max_batch=max_batch,
    )
    after = (*(s.name for s in inference), "display")
    specs = [
        *P.replay_specs(
            video, engine, endpoints, config, speed="1.0", loop=True, after=after, flow_control=flow_control
        ),
        *inference,
        P.display_spec(endpoints, config, headless=True, record=record, latency_log=latency_log),
    ]
    launcher = L.Launcher(specs, run_dir, config=config, heartbeat_endpoint=endpoints.heartbeats, shards=shards)
    window: tuple[float, float] | None = None
    cpu: dict[str, float] = {}
    system_cpu = math.nan
    reason = "error"
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        launcher.start()
        deadline = time.monotonic() + config.startup_grace_s
        while not latency_log.is_file() or latency_log.stat().st_size == 0:
            launcher.poll()
            if time.monotonic() > deadline or launcher.finished():
                raise UserError(f"bench: no heatmap within {config.startup_grace_s:.0f} s; see logs in {run_dir}")
            time.sleep(0.05)
        if capture_nice:
            _renice(launcher.pids(), capture_nice)
        _wait(launcher, warmup_s)
        pids = launcher.pids()
        pids["launcher"] = os.getpid()
        cpu0, t0 = _cpu_seconds(pids), time.monotonic()
        psutil.cpu_percent(None)
        _wait(launcher, duration_s)
        cpu1, t1 = _cpu_seconds(pids), time.monotonic()
        system_cpu = psutil.cpu_percent(None)
        cpu = {n: round(100.0 * (cpu1[n] - cpu0[n]) / (t1 - t0), 1) for n in cpu1 if n in cpu0}
        window = (t0, t1)
        reason = "done"
    finally:
        summary = launcher.shutdown(reason)
    records = [
        r
        for r in read_latency_log(latency_log)
        if window is not None and window[0] <= r.get("ts", {}).get("display", -1.0) <= window[1]
    ]
    result = summarize_records(records, window[1] - window[0] if window else None, fps)
    workers = [s.name for s in inference]
    result.update(
        {
            "backend": backend,
            "streams": streams,
            "inference_workers": len(workers),
            "max_batch": max_batch or config.max_batch,
            "measured_s": round(window[1] - window[0], 3) if window else 0.0,
            "cpu_percent": cpu,
            "cpu_percent_total_processes": round(sum(cpu.values()), 1),
            "cpu_ms": cpu_cost(cpu, len(records), window[1] - window[0] if window else 0.0, streams, fps),
            "system_cpu_percent": system_cpu,
            "restarts": {n: p["restarts"] for n, p in summary["processes"].items()},
            "inference_stats": (
                summary["processes"]["inference"]["stats"]
                if workers == ["inference"]
                else {w: summary["processes"][w]["stats"] for w in workers}
            ),
            "worker_streams": summary.get("streams", {}),
            "worker_drops": {
                kind: sum(int(st.get(kind) or 0) for st in summary.get("streams", {}).values())
                for kind in ("replaced", "late")
            },
            "flow_control": flow_control,
            "capture_nice": capture_nice,
            "flow_skipped": {
                n: int((p.get("stats") or {}).get("flow_skipped") or 0)
                for n, p in summary["processes"].items()
                if n.startswith("replay")
            },
            "load_avg_before": load_before,
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "run_dir": str(run_dir),
        }
    )
    boxes = _clip_boxes(video)
    if boxes is not None and fps:
        result["peak_in_box"] = peak_hits(records, boxes, fps)
    result["_records"] = records
    return result


def _renice(pids: dict[str, int], increment: int) -> None:
    """Lower the replay (capture) processes' priority by ``increment`` (a comparison knob of the bench)."""
    for name, pid in pids.items():
        if name.startswith("replay"):
            try:
                proc = psutil.Process(pid)
                proc.nice(proc.nice() + increment)
            except psutil.Error:
                continue


def _clip_boxes(video: Path) -> list[list[float]] | None:
    """Per-frame normalized boxes of the sounding object from the clip's sidecar JSON (avloc data stamps
    --videos writes VIDEO.json), or None."""
    sidecar = Path(video).with_suffix(".json")
    try:
        boxes = json.loads(sidecar.read_text(encoding="utf-8")).get("boxes")
    except (OSError, ValueError, AttributeError):
        return None
    return boxes if isinstance(boxes, list) and boxes else None


def _wait(launcher: Any, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        launcher.poll()
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- baseline


def bench_baseline(
    video: Path, engine: Path, *, duration_s: float, threads: int | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Eager PyTorch, one process, frame by frame (decode, spectrogram, full model) for ``duration_s``, on the
    pipeline's device (a GPU pipeline compared with a CPU baseline would credit the pipeline with the GPU)."""
    import torch  # why: the eager baseline only (--help fast)
    import torch.nn.functional as F

    from avloc.core.audio import FrontEnd, frame_window  # why: torch, for the eager baseline only
    from avloc.core.checkpoint import load_model
    from avloc.core.media import iter_video, read_video_audio
    from avloc.engines.base import read_manifest

    manifest = read_manifest(engine)
    ckpt = engine / manifest.get("torch_checkpoint", {}).get("file", "model.pt")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        from avloc.engines.torch_backend import set_tf32  # why: torch, for the eager baseline only

        set_tf32(False)  # fp32 as the pipeline's torch engine runs it
    loaded = load_model(ckpt, device=dev)
    model, frontend_cfg = loaded.model, loaded.frontend
    frontend = FrontEnd(frontend_cfg).eval().to(dev)
    size = int(manifest["image"]["size"])
    mean = torch.tensor(loaded.image.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(loaded.image.std, device=dev).view(1, 3, 1, 1)
    try:
        wave = read_video_audio(video, frontend_cfg.sample_rate)
    except UserError:
        wave = np.zeros(frontend_cfg.num_samples, np.float32)
    rate = frontend_cfg.sample_rate
    per_frame: list[float] = []
    stage: dict[str, list[float]] = {"decode": [], "spectrogram": [], "model": []}
    with torch.inference_mode():  # warm-up: first calls pay for lazy kernel/allocator set-up
        for _ in range(BASELINE_WARMUP):
            model.heatmap(
                torch.zeros(1, 3, size, size, device=dev),
                frontend(torch.zeros(1, frontend_cfg.num_samples, device=dev)),
            )
    start = time.monotonic()
    frames = 0
    with torch.inference_mode():
        while time.monotonic() - start < duration_s:
            it = iter_video(video)
            t_decode = time.monotonic()
            for pts, rgb in it:
                t_frame = time.monotonic()
                stage["decode"].append(t_frame - t_decode)
                window = frame_window(wave, frontend_cfg, int(round(pts * rate)))
                spec = frontend(torch.from_numpy(window)[None].to(dev))
                t_spec = time.monotonic()
                image = torch.from_numpy(rgb).to(dev).permute(2, 0, 1)[None].float().div_(255.0)
                image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
                heat = model.heatmap((image - mean) / std, spec)
                float(heat.max())  # the result is used (no lazy work left behind; on a GPU: a sync)
                t_done = time.monotonic()
                stage["spectrogram"].append(t_spec - t_frame)
                stage["model"].append(t_done - t_spec)
                per_frame.append(t_done - t_decode)
                frames += 1
                t_decode = time.monotonic()
                if t_decode - start >= duration_s:
                    break
            it.close()
    elapsed = time.monotonic() - start
    return {
        "what": f"one process, eager PyTorch on {device}, frame by frame: decode, spectrogram, full model",
        "device": device,
        "frames": frames,
        "fps": round(frames / elapsed, 2) if elapsed > 0 else 0.0,
        "per_frame_ms": percentiles(per_frame),
        "stages_ms": {k: percentiles(v) for k, v in stage.items()},
        "torch_threads": torch.get_num_threads(),
        "_per_frame": per_frame,
    }


# ---------------------------------------------------------------------------------------------- report


def plot_histograms(pipeline: dict[str, Any], baseline: dict[str, Any] | None, path: Path) -> Path:
    import matplotlib  # why: slow import, only to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = stage_samples(pipeline.get("_records", []))
    names = [
        n
        for n in (
            "e2e",
            "capture_to_send",
            "transport",
            "queue_wait",
            "audio_and_preprocess",
            "visual_engine",
            "publish",
            "publish_to_display",
        )
        if samples.get(n)
    ]
    panels = len(names) + (1 if baseline else 0)
    cols = 3
    rows = max(1, math.ceil(panels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ms = np.asarray(samples[name]) * 1000
        ax.hist(ms, bins=40, color="tab:blue")
        ax.set_title(f"{name}: p50 {np.median(ms):.1f} ms, p99 {np.percentile(ms, 99):.1f}")
        ax.set_xlabel("ms")
    if baseline:
        ax = axes.flat[len(names)]
        ms = np.asarray(baseline["_per_frame"]) * 1000
        ax.hist(ms, bins=40, color="tab:red")
        ax.set_title(f"baseline per frame: p50 {np.median(ms):.1f} ms")
        ax.set_xlabel("ms")
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", required=True, type=Path, help="video to replay (looped at real time)")
    parser.add_argument("--engine", required=True, type=Path, help="engine directory (avloc export)")
    parser.add_argument("--backend", default="onnxruntime", choices=known_backends())
    parser.add_argument("--streams", type=int, default=1, help="camera streams replayed at once")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds (each part)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds ignored after the first heatmap")
    parser.add_argument("--threads", type=int, default=None, help="inference intra-op threads")
    add_engine_arguments(parser)
    add_worker_arguments(parser)
    parser.add_argument("--config", type=Path, default=None, help="stream config (configs/stream.yaml)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the eager baseline")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help=f"find the most streams served >= {SERVED_TARGET * 100:.0f} %% with e2e p99 <= {P99_TARGET_MS:.0f} ms "
        "(per --sweep-workers; no baseline)",
    )
    parser.add_argument(
        "--sweep-workers", default="1,2", metavar="K,K", help="inference worker counts the sweep tries (1,2)"
    )
    parser.add_argument("--sweep-max-streams", type=int, default=32, metavar="N", help="the sweep's upper bound")
    parser.add_argument(
        "--overload",
        default="",
        metavar="F,F",
        help="with --sweep: also run at these multiples of the capacity found (e.g. 1.5,2,4): goodput, fairness, p99",
    )
    parser.add_argument(
        "--no-flow-control",
        action="store_true",
        help="replays send every frame whatever the worker serves (to compare with flow control)",
    )
    parser.add_argument(
        "--capture-nice", type=int, default=0, metavar="N", help="add N to the replays' niceness (to compare)"
    )
    parser.add_argument("--out", required=True, type=Path, help="bench.json (histogram PNG written next to it)")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from avloc.core.media import probe_video  # why: keeps `avloc bench pipeline --help` fast

    if args.streams < 1 or args.duration <= 0:
        raise UserError(f"--streams {args.streams} / --duration {args.duration}: expected >= 1 and > 0")
    if args.sweep:
        return run_sweep(args)
    info = probe_video(args.video)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_dir = out.with_name(out.stem + "_run")
    machine = machine_info()
    pipeline = bench_pipeline(
        args.video,
        args.engine,
        args.backend,
        streams=args.streams,
        duration_s=args.duration,
        warmup_s=args.warmup,
        run_dir=run_dir,
        threads=args.threads,
        extra_inference_args=inference_args(args),
        config_path=args.config,
        inference_workers=args.inference_workers,
        max_batch=args.max_batch,
        fps=info.fps,
        flow_control=not args.no_flow_control,
        capture_nice=args.capture_nice,
    )
    baseline = (
        None
        if args.no_baseline
        else bench_baseline(
            args.video,
            args.engine,
            duration_s=args.duration,
            threads=args.threads,
            device=getattr(args, "device", "cpu"),
        )
    )
    png = plot_histograms(pipeline, baseline, out.with_suffix(".png"))
    result: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": "avloc bench pipeline "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in (
                ("video", args.video),
                ("engine", args.engine),
                ("backend", args.backend),
                ("streams", args.streams),
                ("inference_workers", args.inference_workers),
                ("max_batch", args.max_batch),
                ("threads", args.threads),
                ("duration", args.duration),
                ("out", args.out),
            )
            if v is not None
        ),
        "machine": machine,
        "video": {
            "path": str(args.video),
            "width": info.width,
            "height": info.height,
            "fps": info.fps,
            "has_audio": info.has_audio,
        },
        "pipeline": {k: v for k, v in pipeline.items() if not k.startswith("_")},
        "baseline": {k: v for k, v in baseline.items() if not k.startswith("_")} if baseline else None,
        "histograms_png": str(png),
    }
    if baseline and baseline["fps"] > 0:
        e2e = pipeline["e2e_ms"]["p50"]
        result["speedup"] = {
            "heatmap_fps_ratio": round(pipeline["heatmap_fps"] / baseline["fps"], 2),
            "latency_p50_ratio": round(baseline["per_frame_ms"]["p50"] / e2e, 2) if e2e and e2e > 0 else None,
        }
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    return result


def _sweep_point(args: argparse.Namespace, fps: float, streams: int, workers: int, root: Path) -> dict[str, Any]:
    run = bench_pipeline(
        args.video,
        args.engine,
        args.backend,
        streams=streams,
        duration_s=args.duration,
        warmup_s=args.warmup,
        run_dir=root / f"w{workers}_n{streams}",
        threads=args.threads,
        extra_inference_args=inference_args(args),
        config_path=args.config,
        inference_workers=workers,
        max_batch=args.max_batch,
        fps=fps,
        flow_control=not args.no_flow_control,
        capture_nice=args.capture_nice,
    )
    p99 = run["e2e_ms"]["p99"]
    served = run["served_min"] or 0.0
    point = {
        "streams": streams,
        "inference_workers": workers,
        "served_min": served,
        "fairness": run["fairness"],
        # heatmaps computed in the measured window / its length: the span between the first and last heatmap
        # (summarize_records' heatmap_fps) is meaningless when an overloaded run computes only a handful
        "heatmap_fps": round(run["heatmaps"] / run["measured_s"], 2) if run["measured_s"] else 0.0,
        "e2e_p50_ms": run["e2e_ms"]["p50"],
        "e2e_p99_ms": p99,
        "worker_drops": run["worker_drops"],
        "system_cpu_percent": run["system_cpu_percent"],
        "cpu_percent": run["cpu_percent"],
        "frame_deadline_ms": _deadline_ms(run["inference_stats"]),
        "cpu_ms": run.get("cpu_ms"),
        "audio": {
            k: _stat_sum(run["inference_stats"], s)
            for k, s in (("windows", "audio"), ("audio_embeds", "audio_embeds"), ("audio_reused", "audio_reused"))
        },
        "flow_skipped": sum(run["flow_skipped"].values()),
        "peak_in_box": run.get("peak_in_box"),
        "load_avg_before": run["load_avg_before"],
        "load_avg_after": run["load_avg_after"],
        "per_stream": run["per_stream"],
        "passed": bool(served >= SERVED_TARGET and math.isfinite(p99) and p99 <= P99_TARGET_MS),
    }
    log.info("sweep: %d worker(s), %d stream(s): %s", workers, streams, {k: point[k] for k in list(point)[2:8]})
    print(
        f"  {workers} worker(s), {streams:2d} stream(s): served >= {served:.1%}, fairness {run['fairness']}, "
        f"e2e p50 {run['e2e_ms']['p50']:.1f} ms p99 {p99:.1f} ms -> {'pass' if point['passed'] else 'fail'}",
        flush=True,
    )
    return point


def _stat_sum(stats: dict[str, Any], key: str) -> int:
    """``key`` of one worker's heartbeat stats, or summed over several workers' (``{name: stats}``)."""
    if key in stats:
        return int(stats.get(key) or 0)
    return sum(int((v or {}).get(key) or 0) for v in stats.values() if isinstance(v, dict))


def _deadline_ms(stats: dict[str, Any]) -> float | None:
    """The worker's frame deadline (max_frame_age; the largest of several workers'), the p99 bound past capacity."""
    values = [stats.get("frame_deadline_ms")] + [
        v.get("frame_deadline_ms") for v in stats.values() if isinstance(v, dict)
    ]
    values = [float(v) for v in values if isinstance(v, int | float)]
    return max(values) if values else None


def overload_points(
    args: argparse.Namespace, fps: float, workers: int, capacity: int, points: list[dict[str, Any]], root: Path
) -> dict[str, Any]:
    """Runs at ``--overload`` multiples of ``capacity`` streams and how they hold up against the peak total
    heatmaps/s of every run so far: goodput (total heatmaps/s / peak), fairness, and e2e p99 against the
    bound a worker keeps past capacity (its frame deadline + the capture-to-worker and display legs, taken
    as the criterion's ``P99_TARGET_MS`` at the least)."""
    done = {p["streams"]: p for p in points}
    runs = []
    for factor in args.overload_factors:
        n = max(capacity + 1, math.ceil(factor * max(capacity, 1)))
        if n not in done:
            done[n] = _sweep_point(args, fps, n, workers, root)
        runs.append((factor, done[n]))
    peak = max(p["heatmap_fps"] for p in done.values())
    out = []
    for factor, p in runs:
        bound = max(P99_TARGET_MS, 2.0 * (p.get("frame_deadline_ms") or 0.0))
        goodput = p["heatmap_fps"] / peak if peak > 0 else 0.0
        out.append(
            {
                "factor": factor,
                "streams": p["streams"],
                "heatmap_fps": p["heatmap_fps"],
                "goodput": round(goodput, 3),
                "fairness": p["fairness"],
                "e2e_p99_ms": p["e2e_p99_ms"],
                "p99_bound_ms": round(bound, 1),
                "passed": bool(
                    goodput >= GOODPUT_TARGET
                    and (p["fairness"] or 0.0) >= FAIRNESS_TARGET
                    and math.isfinite(p["e2e_p99_ms"])
                    and p["e2e_p99_ms"] <= bound
                ),
            }
        )
        print(
            f"  overload {factor}x ({p['streams']} streams): {p['heatmap_fps']:.1f} heatmaps/s = {goodput:.0%} of the "
            f"peak {peak:.1f}, fairness {p['fairness']}, p99 {p['e2e_p99_ms']:.0f} ms (bound {bound:.0f})",
            flush=True,
        )
    return {"peak_heatmap_fps": peak, "runs": out, "points": [done[k] for k in sorted(done)]}


def sweep_streams(run: Any, upper: int) -> tuple[int, list[dict[str, Any]]]:
    """The largest N in 1..upper with ``run(N)["passed"]`` (assumed monotonic): N doubles until a run fails,
    then bisects between the last pass and the first failure. Returns (N or 0, every run made)."""
    points: dict[int, dict[str, Any]] = {}

    def passed(n: int) -> bool:
        if n not in points:
            points[n] = run(n)
        return bool(points[n]["passed"])

    good, bad = 0, upper + 1
    n = 1
    while n <= upper:
        if not passed(n):
            bad = n
            break
        good = n
        n *= 2
    else:
        if good < upper and passed(upper):
            good = upper
        elif good < upper:
            bad = upper
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if passed(mid) else (good, mid)
    return good, [points[k] for k in sorted(points)]


def plot_sweep(results: dict[str, Any], path: Path) -> Path:
    import matplotlib  # why: slow import, only to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_served, ax_p99, ax_good) = plt.subplots(1, 3, figsize=(15, 3.6))
    for workers, entry in results.items():
        pts = entry["points"]
        n = [p["streams"] for p in pts]
        label = f"{workers} worker(s): max N = {entry['max_streams']}"
        ax_served.plot(n, [100 * p["served_min"] for p in pts], "o-", label=label)
        ax_p99.plot(n, [p["e2e_p99_ms"] for p in pts], "o-", label=label)
        ax_good.plot(n, [p["heatmap_fps"] for p in pts], "o-", label=label)
        if entry.get("overload"):
            peak = entry["overload"]["peak_heatmap_fps"]
            ax_good.axhline(GOODPUT_TARGET * peak, color="gray", ls=":")
    ax_served.axhline(100 * SERVED_TARGET, color="gray", ls="--")
    ax_p99.axhline(P99_TARGET_MS, color="gray", ls="--")
    ax_served.set(xlabel="streams", ylabel="% of frames served (worst stream)", title="frames served")
    ax_p99.set(xlabel="streams", ylabel="ms", title="e2e p99 (capture -> display)")
    ax_good.set(
        xlabel="streams", ylabel="heatmaps/s (all streams)", title=f"goodput (dotted: {GOODPUT_TARGET:.0%} of the peak)"
    )
    ax_good.set_ylim(bottom=0)  # a collapse reads as one
    for ax in (ax_served, ax_p99, ax_good):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from avloc.core.media import probe_video  # why: keeps `avloc bench pipeline --help` fast

    try:
        counts = [int(x) for x in str(args.sweep_workers).split(",") if x.strip()]
    except ValueError:
        counts = []
    try:
        args.overload_factors = [float(x) for x in str(args.overload or "").split(",") if x.strip()]
    except ValueError:
        args.overload_factors = [0.0]
    if any(not f > 1.0 for f in args.overload_factors):
        raise UserError(f"--overload {args.overload!r}: expected factors above 1 like 1.5,2,4")
    if not counts or min(counts) < 1 or args.sweep_max_streams < 1:
        raise UserError(
            f"--sweep-workers {args.sweep_workers!r} / --sweep-max-streams {args.sweep_max_streams}: "
            "expected positive integers like 1,2 and >= 1"
        )
    info = probe_video(args.video)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = out.with_name(out.stem + "_runs")
    machine = machine_info()
    results: dict[str, Any] = {}
    for workers in counts:
        best, points = sweep_streams(
            lambda n, w=workers: _sweep_point(args, info.fps, n, w, root), args.sweep_max_streams
        )
        results[str(workers)] = {"max_streams": best, "points": points}
        if args.overload_factors:
            overload = overload_points(args, info.fps, workers, best, points, root)
            results[str(workers)] = {"max_streams": best, "points": overload.pop("points"), "overload": overload}
    png = plot_sweep(results, out.with_suffix(".png"))
    command = (
        f"avloc bench pipeline --sweep --video {args.video} --engine {args.engine} --backend {args.backend} "
        f"--sweep-workers {args.sweep_workers} --sweep-max-streams {args.sweep_max_streams} "
        f"--duration {args.duration} --warmup {args.warmup}"
        + (f" --overload {args.overload}" if args.overload_factors else "")
        + (" --no-flow-control" if args.no_flow_control else "")
        + (f" --capture-nice {args.capture_nice}" if args.capture_nice else "")
        + (f" --max-batch {args.max_batch}" if args.max_batch else "")
        + "".join(f" --engine-option {o}" for o in getattr(args, "engine_option", []) or [])
        + f" --out {args.out}"
    )
    result = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "criterion": {
            "served_min": SERVED_TARGET,
            "e2e_p99_ms": P99_TARGET_MS,
            "overload": {
                "goodput_of_peak": GOODPUT_TARGET,
                "fairness": FAIRNESS_TARGET,
                "e2e_p99_ms": f"<= max({P99_TARGET_MS:.0f}, 2 x the worker's frame deadline)",
            },
        },
        "flow_control": not args.no_flow_control,
        "capture_nice": args.capture_nice,
        "machine": {**machine, "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "video": {"path": str(args.video), "width": info.width, "height": info.height, "fps": info.fps},
        "sweep": results,
        "plot_png": str(png),
    }
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    return result


def main(args: argparse.Namespace) -> int:
    result = run_bench(args)
    if "sweep" in result:
        for workers, entry in result["sweep"].items():
            print(f"{workers} inference worker(s): at most {entry['max_streams']} stream(s) meet the criterion")
        print(f"wrote {args.out} and {result['plot_png']}")
        return 0
    p = result["pipeline"]
    print(
        f"pipeline ({p['backend']}, {p['streams']} stream(s)): {p['heatmap_fps']:.1f} heatmaps/s, "
        f"e2e p50 {p['e2e_ms']['p50']:.1f} ms p99 {p['e2e_ms']['p99']:.1f} ms "
        f"max {p['e2e_ms']['max']:.1f} ms, "
        f"drops {p['drops']}, CPU {p['cpu_percent']}"
    )
    if p["streams"] > 1:
        for stream, info in p["per_stream"].items():
            print(
                f"  {stream}: {info['fps']:.1f} heatmaps/s (served {info.get('served', float('nan')):.1%}), "
                f"e2e p50 {info['e2e_ms']['p50']:.1f} ms p99 {info['e2e_ms']['p99']:.1f} ms"
            )
        print(f"  fairness (slowest/fastest stream): {p['fairness']}, worker drops {p['worker_drops']}")
    if result.get("baseline"):
        b = result["baseline"]
        print(
            f"baseline (eager torch on {b.get('device', 'cpu')}, frame by frame): {b['fps']:.1f} fps, "
            f"per frame p50 {b['per_frame_ms']['p50']:.1f} ms"
        )
        print(f"speed-up: {result['speedup']}")
    print(f"wrote {args.out} and {result['histograms_png']}")
    return 0

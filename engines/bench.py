"""``avloc bench engine``: time the audio and visual engines alone, per backend and batch size.

Each backend spec is ``name[:option+option]``, e.g. ``onnxruntime``, ``onnxruntime:int8``,
``onnxruntime:spin``, ``torch``, ``torch:channels_last``, ``torch:cuda_graphs+fp16``, ``torch:compile``,
``tensorrt:fp16``. Eager torch on the same device is always measured in the same run and is the baseline of
the ``speedup_vs_eager_torch`` ratios. Times are wall-clock per call, NumPy in -> NumPy out (so on a GPU
they include the host<->device copies a streaming worker pays), warm-up calls excluded. Each engine is loaded
with ``max_batch`` = the largest batch size and :meth:`Engine.warmup` runs for the measured batch sizes (CUDA
graph capture, compilation, TensorRT set-up) before timing; load and warm-up seconds are reported per backend
under ``startup``. An engine exported with ``--ogl`` also gets its objectness graph timed (graph
``objectness``: what ``--ogl`` adds per frame batch in the inference worker, before the host-side blend).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from avloc.core.errors import UserError
from avloc.engines.base import load_engine, read_manifest, to_host

log = logging.getLogger(__name__)
BASELINE = "torch"  # eager PyTorch, what the papers' inference scripts run

_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "onnxruntime": {"int8": {"precision": "int8"}, "spin": {"spinning": True}},
    "torch": {
        "cuda_graphs": {"mode": "cuda_graphs"},
        "compile": {"mode": "compile"},
        "fp16": {"fp16": True},
        "bf16": {"bf16": True},
        "channels_last": {"channels_last": True},
        "eager": {"mode": "eager"},
        "tf32": {"tf32": True},
    },
    "tensorrt": {"fp16": {"fp16": True}, "fp32": {"fp16": False}, "tf32": {"fp16": False, "tf32": True}},
}


def parse_backend_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"torch:cuda_graphs+fp16"`` -> ("torch", {"mode": "cuda_graphs", "fp16": True})."""
    name, _, opts = spec.strip().partition(":")
    if name not in _OPTIONS:
        raise UserError(f"--backends: unknown backend {name!r} in {spec!r}; known: {', '.join(sorted(_OPTIONS))}")
    options: dict[str, Any] = {}
    given: dict[str, str] = {}  # keyword -> the option that set it
    for opt in filter(None, opts.split("+")):
        if opt not in _OPTIONS[name]:
            raise UserError(
                f"--backends: unknown option {opt!r} for {name}; known: {', '.join(sorted(_OPTIONS[name]))}"
            )
        for key, value in _OPTIONS[name][opt].items():
            # e.g. tensorrt:fp16+tf32 ({fp16: True} then {fp16: False, tf32: True}) would silently be a tf32 run
            if key in options and options[key] != value:
                raise UserError(f"--backends: {spec!r}: options {given[key]!r} and {opt!r} conflict; choose one")
            options[key], given[key] = value, opt
    return name, options


def _percentiles(ms: np.ndarray) -> dict[str, float]:
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
    }


def time_calls(fn: Callable[[], Any], iters: int, warmup: int) -> tuple[np.ndarray, np.ndarray]:
    """Wall-clock and process-CPU milliseconds of ``iters`` calls after ``warmup`` untimed ones.

    CPU time (all threads of this process) is what a call costs the machine; on a shared, busy machine it
    is also a steadier estimate of the uncontended time than the wall clock.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = np.empty(iters), np.empty(iters)
    for i in range(iters):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall[i] = (time.perf_counter() - start) * 1e3
        cpu[i] = (time.process_time() - start_cpu) * 1e3
    return wall, cpu


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("avloc", "torch", "onnxruntime", "onnx", "tensorrt", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def bench_engine(
    engine_dir: str | Path,
    backends: list[str],
    batch_sizes: list[int],
    *,
    threads: int | None = None,
    iters: int = 50,
    warmup: int = 5,
    device: str = "cpu",
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time every backend spec; the eager baseline first, so that a run cut short still has its ratios.

    ``on_progress`` gets the report so far after each backend (``avloc bench engine --out`` writes it to the
    JSON file each time: a benchmark killed by a time limit keeps every row measured before)."""
    manifest = read_manifest(engine_dir)
    specs = [BASELINE, *(s for s in dict.fromkeys(backends) if s != BASELINE)]  # always measured, first
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    startup: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, options = parse_backend_spec(spec)
        if name in ("torch", "tensorrt"):
            options.setdefault("max_batch", max(batch_sizes))  # capture/profile exactly what is measured
        try:
            start = time.perf_counter()
            engine = load_engine(engine_dir, name, device=device, threads=threads, **options)
            loaded = time.perf_counter()
            try:
                engine.warmup(batch_sizes)
            except BaseException:
                engine.close()
                raise
            startup[spec] = {
                "load_s": loaded - start,
                "warmup_s": time.perf_counter() - loaded,
                "precision": precision_of(engine),
            }
            if hasattr(engine, "providers"):  # ONNX Runtime: what its sessions really run on
                startup[spec]["providers"] = list(engine.providers)
        except (UserError, ImportError, RuntimeError) as err:
            # A backend this machine cannot run (no TensorRT, no CUDA provider, failed build) is reported and
            # skipped; the eager baseline must run.
            if spec == BASELINE:
                raise
            log.warning("skipping %s: %s", spec, err)
            errors[spec] = f"{type(err).__name__}: {err}" if not isinstance(err, UserError) else str(err)
            if on_progress is not None:
                on_progress(
                    _report(engine_dir, manifest, device, threads, iters, warmup, batch_sizes, results, startup, errors)
                )
            continue
        with engine:
            for batch in batch_sizes:
                spec_in = rng.standard_normal((batch, *engine.spec_shape), dtype=np.float32)
                image = rng.standard_normal((batch, *engine.image_shape), dtype=np.float32)
                emb = to_host(engine.embed_audio(spec_in)).astype(np.float32, copy=False)
                calls = {
                    "audio": lambda e=engine, s=spec_in: e.embed_audio(s),
                    "visual": lambda e=engine, i=image, a=emb: e.localize(i, a),
                }
                if _runs_objectness(engine, image, spec, errors):
                    calls["objectness"] = lambda e=engine, i=image: e.objectness(i)
                for graph, call in calls.items():
                    wall, cpu = time_calls(call, iters, warmup)
                    stats = _percentiles(wall)
                    results.append(
                        {
                            "backend": spec,
                            "precision": startup[spec]["precision"],
                            "graph": graph,
                            "batch": batch,
                            **stats,
                            "per_item_ms": stats["median_ms"] / batch,
                            "throughput_per_s": 1e3 * batch / stats["median_ms"],
                            "cpu_median_ms": float(np.median(cpu)),
                            "cpu_per_item_ms": float(np.median(cpu)) / batch,
                        }
                    )
                    log.info(
                        "%-28s %-6s batch %2d: median %.2f ms (%.2f ms/item)",
                        spec,
                        graph,
                        batch,
                        stats["median_ms"],
                        stats["median_ms"] / batch,
                    )
        if on_progress is not None:
            on_progress(
                _report(engine_dir, manifest, device, threads, iters, warmup, batch_sizes, results, startup, errors)
            )
    return _report(engine_dir, manifest, device, threads, iters, warmup, batch_sizes, results, startup, errors)


def precision_of(engine: Any) -> str:
    """What the engine's float math is: "fp32" (IEEE), "tf32", "fp16", "bf16" or "int8" (the backend's own
    ``precision`` attribute; a host backend without one computes in fp32)."""
    return str(getattr(engine, "precision", "fp32"))


def _report(
    engine_dir: str | Path,
    manifest: dict[str, Any],
    device: str,
    threads: int | None,
    iters: int,
    warmup: int,
    batch_sizes: list[int],
    results: list[dict[str, Any]],
    startup: dict[str, dict[str, Any]],
    errors: dict[str, str],
) -> dict[str, Any]:
    import torch

    baseline = {(r["graph"], r["batch"]): r["median_ms"] for r in results if r["backend"] == BASELINE}
    for r in results:
        base = baseline.get((r["graph"], r["batch"]))  # None: eager torch could not run this graph (objectness)
        r["speedup_vs_eager_torch"] = base / r["median_ms"] if base is not None else None
    return {
        "engine": str(engine_dir),
        "method": manifest["method"],
        "image_size": manifest["image"]["size"],
        "spectrogram_shape": list(manifest["graphs"]["audio"]["inputs"][0]["shape"][1:]),
        "heatmap_shape": manifest["outputs"]["heatmap"].get("feature_size"),
        "device": {"kind": device, "name": device_name(device), "cpu_count": os.cpu_count()},
        "threads": threads if threads is not None else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "iters": iters,
        "warmup": warmup,
        "batch_sizes": batch_sizes,
        "baseline": f"{BASELINE} (eager PyTorch, same device, same run, measured first)",
        "timing": "wall clock per call, numpy in -> numpy out, warm-up excluded; cpu_* = process CPU time",
        "precision": "per row: fp32 = IEEE float32 (TF32 off), tf32, fp16, bf16 (autocast) or int8",
        "load_average": list(os.getloadavg()),
        "results": list(results),
        "startup": dict(startup),
        "errors": dict(errors),
        "versions": _versions(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _runs_objectness(engine: Any, image: np.ndarray, spec: str, errors: dict[str, str]) -> bool:
    """Whether to time the OGL objectness graph: the engine has one and this backend runs it (a backend that
    cannot, e.g. torch without the ResNet18 file it was exported from, is reported under ``errors``)."""
    if not engine.has_objectness:
        return False
    key = f"{spec} objectness"
    if key in errors:
        return False
    try:
        engine.objectness(image)
    except UserError as err:
        log.warning("not timing the objectness graph on %s: %s", spec, err)
        errors[key] = str(err)
        return False
    return True


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Atomically (unique temp file + rename): a reader, or a kill mid-write, never sees half a report."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(report, indent=2))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = list(dict.fromkeys(r["graph"] for r in report["results"]))
    fig, axes = plt.subplots(1, len(graphs), figsize=(5 * len(graphs), 4), constrained_layout=True, squeeze=False)
    for ax, graph in zip(axes[0], graphs):
        for backend in dict.fromkeys(r["backend"] for r in report["results"]):
            rows = [r for r in report["results"] if r["backend"] == backend and r["graph"] == graph]
            ax.plot([r["batch"] for r in rows], [r["per_item_ms"] for r in rows], marker="o", label=backend)
        ax.set_title(f"{graph} engine")
        ax.set_xlabel("batch size")
        ax.set_ylabel("median ms per item")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{report['method']} {report['image_size']} px on {report['device']['name']} ({report['threads']} threads)",
        fontsize=9,
    )
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", required=True, type=Path, help="engine directory (avloc export)")
    parser.add_argument(
        "--backends",
        default="onnxruntime,torch",
        help="comma-separated backend specs, name[:opt+opt] (default %(default)s)",
    )
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4], help="e.g. 1,2,4 (default)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per point (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON report; a PNG is written next to it")


def main(args: argparse.Namespace) -> int:
    if args.iters < 1 or args.warmup < 0:
        raise UserError(f"--iters {args.iters} / --warmup {args.warmup}: expected iters >= 1 and warmup >= 0")
    backends = [b for b in args.backends.split(",") if b.strip()]
    for spec in backends:
        parse_backend_spec(spec)  # fail fast, before minutes of timing
    out = Path(args.out)
    if out.is_dir():  # found before minutes of timing, not by the first write after the baseline
        raise UserError(f"--out {out}: is a directory; give the JSON file to write, e.g. {out / 'bench.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create its folder ({err.strerror or err})") from None
    report = bench_engine(
        args.engine,
        backends,
        args.batch_sizes,
        threads=args.threads,
        iters=args.iters,
        warmup=args.warmup,
        device=args.device,
        on_progress=lambda partial: write_json(out, partial),
    )
    write_json(out, report)
    png = out.with_suffix(".png")
    plot(report, png)
    header = ("backend", "precision", "graph", "batch", "median", "min", "p99", "ms/item", "cpu/item", "vs eager")
    print("{:28s} {:9s} {:10s} {:>5s} {:>8s} {:>8s} {:>8s} {:>8s} {:>8s} {:>8s}".format(*header))
    for r in report["results"]:
        speedup = r["speedup_vs_eager_torch"]
        print(
            f"{r['backend']:28s} {r['precision']:9s} {r['graph']:10s} {r['batch']:5d} {r['median_ms']:8.2f} "
            f"{r['min_ms']:8.2f} "
            f"{r['p99_ms']:8.2f} {r['per_item_ms']:8.2f} {r['cpu_per_item_ms']:8.2f} "
            + (f"{speedup:7.2f}x" if speedup is not None else "      -")
        )
    print(f"load average during the run: {report['load_average']}")
    for spec, err in report["errors"].items():
        print(f"{spec}: skipped ({err})")
    print(f"wrote {out} and {png}")
    return 0

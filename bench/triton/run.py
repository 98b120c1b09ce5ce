"""N streams -> one Triton server (dynamic batching) vs in-process ONNX Runtime, in the same run (CPU).

Each of N streams sends single frames through ``Engine.localize`` in a closed loop (the next frame when the
previous heatmap is back), as avloc's inference worker does per frame. Modes:

- ``ort_per_stream``: every stream has its own in-process ONNX Runtime session (1 intra-op thread each);
- ``ort_batched``: one in-process session runs the N frames as one batch (what one avloc worker serving N
  cameras does);
- ``triton``: every stream is a ``--backend triton`` client of one server (PyTriton's bundled tritonserver,
  python backend running the same ONNX graph with ONNX Runtime, 1 instance, dynamic batching up to 16).

Usage (after bench/triton/setup.sh)::

    .venv/bin/python bench/triton/run.py --streams 1,4,8 --frames 60 --out bench/triton/cpu-tiny.json

Without ``--engine`` it exports the tests' tiny SSL-Align (width 8, 64 px) into a temporary folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from avloc.engines.base import load_engine, read_manifest
from avloc.engines.triton_export import TritonOptions, export_triton, local_tritonserver


def tiny_engine(root: Path, width: int, size: int) -> Path:
    from avloc.core.audio import FrontEndConfig
    from avloc.core.checkpoint import ImageConfig, save_checkpoint
    from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
    from avloc.engines.export import export_engine

    save_checkpoint(
        root / "ckpt.pt",
        SSLAlign(SSLAlignConfig(width=width)),
        method="ssl_align",
        model_config={"width": width},
        frontend=FrontEndConfig(kind="linear", window_seconds=1.0),
        image=ImageConfig(size=size),
    )
    return export_engine(root / "ckpt.pt", root / "engine")


def _summary(latencies: list[float], frames: int, wall: float) -> dict[str, Any]:
    ms = np.asarray(latencies) * 1000.0
    return {
        "frames": frames,
        "wall_s": round(wall, 3),
        "frames_per_s": round(frames / wall, 1),
        "latency_ms": {q: round(float(np.percentile(ms, p)), 2) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))},
    }


def run_streams(make_engine: Any, n: int, frames: int, image: np.ndarray, emb: np.ndarray) -> dict[str, Any]:
    """N threads, each with its own engine, ``frames`` single-frame localize calls each (2 warm-up calls)."""
    engines = [make_engine() for _ in range(n)]
    latencies: list[list[float]] = [[] for _ in range(n)]
    barrier = threading.Barrier(n + 1)

    def stream(k: int) -> None:
        engine = engines[k]
        for _ in range(2):
            engine.localize(image[k : k + 1], emb[k : k + 1])
        barrier.wait()
        for _ in range(frames):
            t0 = time.perf_counter()
            engine.localize(image[k : k + 1], emb[k : k + 1])
            latencies[k].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for engine in engines:
        engine.close()
    return _summary([x for lat in latencies for x in lat], n * frames, wall)


def run_batched(engine_dir: Path, n: int, frames: int, image: np.ndarray, emb: np.ndarray) -> dict[str, Any]:
    with load_engine(engine_dir, "onnxruntime", threads=os.cpu_count()) as engine:
        for _ in range(2):
            engine.localize(image[:n], emb[:n])
        latencies = []
        start = time.perf_counter()
        for _ in range(frames):
            t0 = time.perf_counter()
            engine.localize(image[:n], emb[:n])
            latencies.append(time.perf_counter() - t0)
        return _summary(latencies, n * frames, time.perf_counter() - start)


def server_batches(url: str, model: str) -> tuple[int, int]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    client.close()
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", type=Path, default=None, help="engine directory (default: a tiny one)")
    parser.add_argument("--width", type=int, default=8, help="tiny engine width (without --engine)")
    parser.add_argument("--image-size", type=int, default=64, help="tiny engine image size (without --engine)")
    parser.add_argument("--streams", default="1,4,8", help="comma-separated stream counts")
    parser.add_argument("--frames", type=int, default=60, help="frames per stream per mode")
    parser.add_argument("--queue-delay-us", type=int, default=1000, help="Triton dynamic batching queue delay")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    training = subprocess.run(["pgrep", "-f", "avloc train"], capture_output=True, text=True).stdout.split()
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="avloc-triton-bench-") as tmp:
        engine_dir = args.engine or tiny_engine(Path(tmp), args.width, args.image_size)
        manifest = read_manifest(engine_dir)
        cores = os.cpu_count() or 1
        options = TritonOptions(
            backend="python", kind="cpu", max_batch=16, threads=cores, queue_delay_us=args.queue_delay_us
        )
        repo = export_triton(engine_dir, Path(tmp) / "repo", options)
        rng = np.random.default_rng(0)
        image = rng.standard_normal((max(streams), *manifest["graphs"]["visual"]["inputs"][0]["shape"][1:]), np.float32)
        spec = rng.standard_normal((max(streams), *manifest["graphs"]["audio"]["inputs"][0]["shape"][1:]), np.float32)
        with load_engine(engine_dir, "onnxruntime", threads=1) as ref:
            emb = ref.embed_audio(spec)
        results = []
        with local_tritonserver(repo, log_path=Path(tmp) / "server.log") as url:
            for n in streams:
                row: dict[str, Any] = {"streams": n}
                row["ort_per_stream"] = run_streams(
                    lambda: load_engine(engine_dir, "onnxruntime", threads=1), n, args.frames, image, emb
                )
                row["ort_batched"] = run_batched(engine_dir, n, args.frames, image, emb)
                before = server_batches(url, "avloc_visual")
                row["triton"] = run_streams(
                    lambda: load_engine(engine_dir, "triton", url=url), n, args.frames, image, emb
                )
                after = server_batches(url, "avloc_visual")
                inferences, executions = after[0] - before[0], after[1] - before[1]
                row["triton"]["server_mean_batch"] = round(inferences / max(1, executions), 2)
                results.append(row)
                print(json.dumps(row), flush=True)
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": ".venv/bin/python " + " ".join(sys.argv),
        "machine": {
            "cpu_cores": cores,
            "platform": platform.platform(),
            "load_avg_at_start": [round(x, 2) for x in load_at_start],
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        # The 1-minute load average above the core count says other work shared the CPU with this run.
        "contention": f"{len(training)} 'avloc train' process(es) running" if training else "no 'avloc train' running",
        "engine": {"dir": str(args.engine) if args.engine else f"tiny: width {args.width}, {args.image_size} px"}
        | {"image": manifest["image"]["size"], "embed_dim": manifest["embed_dim"]},
        "server": {
            "tritonserver": "2.51.0 bundled by nvidia-pytriton " + version("nvidia-pytriton"),
            "backend": "python backend, ONNX Runtime CPU session, 1 instance, intra-op threads = cores",
            "max_batch_size": options.max_batch,
            "max_queue_delay_us": options.queue_delay_us,
            "client": "tritonclient " + version("tritonclient") + " gRPC, one client per stream",
        },
        "onnxruntime": version("onnxruntime"),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

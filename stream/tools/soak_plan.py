"""What the soak (``avloc bench soak``, avloc.stream.tools.soak) runs on and what it does to it: its inputs (an
untrained engine of the CPU recipe at half width, the replayed clip and the camera's file) and its fault plan
(``Fault``, one planned fault and what was seen of it; ``fault_schedule``, the faults interleaved over the run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avloc.core.config import from_dict, load_config, packaged_config

# The soak's engine: configs/cpu.yaml at half width (3 s mel front-end, 128 px; the size of the demo's model
# until 2026-12-07): small enough that a 2-core soak measures the pipeline, not the engine.
CONFIG = packaged_config("cpu")
WIDTH = 32

SCHEDULE_SPAN = (0.1, 0.7)  # faults planned over this part of the run: the last 30 % shows settled memory


def build_demo_engine(root: Path) -> Path:
    """An untrained engine of configs/cpu.yaml at width 32 (3 s mel front-end, 128 px): the soak measures the
    pipeline, and its cost per frame is a trained model's of that size."""
    from avloc.core.audio import FrontEndConfig  # why: torch, only to build the engine (--help fast)
    from avloc.core.checkpoint import ImageConfig, save_checkpoint
    from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
    from avloc.engines.export import export_engine

    if (root / "engine" / "manifest.json").is_file():
        return root / "engine"
    config = load_config(CONFIG)
    config["model"]["width"] = WIDTH
    model_config = from_dict(SSLAlignConfig, config.get("model"), f"{CONFIG}: model")
    save_checkpoint(
        root / "ckpt.pt",
        SSLAlign(model_config),
        method="ssl_align",
        model_config=dataclasses.asdict(model_config),
        frontend=from_dict(FrontEndConfig, config.get("frontend"), f"{CONFIG}: frontend"),
        image=from_dict(ImageConfig, config.get("image"), f"{CONFIG}: image"),
    )
    return export_engine(root / "ckpt.pt", root / "engine")


def make_clips(root: Path, seed: int = 0, *, replay: bool = True) -> tuple[Path | None, Path]:
    """The replayed clip (640x480, 30 fps, 10 s, with its sound; only when ``replay``) and the camera's file
    (320x240, 30 fps, 2 s: short, so the camera reaches its end, and notices the file is gone, within 2 s)."""
    from avloc.core.data.synth import write_synth_video  # why: keeps `avloc bench soak --help` fast

    clip, camera = root / "clip.mp4", root / "camera.mp4"
    if replay and not clip.is_file():
        write_synth_video(clip, seconds=10.0, fps=30, size=(640, 480), seed=seed)
    if not camera.is_file():
        write_synth_video(camera, seconds=2.0, fps=30, size=(320, 240), seed=seed + 1)
    return (clip if replay else None), camera


@dataclass
class Fault:
    """One planned fault and what was seen of it (times in seconds from the soak's start)."""

    kind: str  # "kill9" | "sigstop" | "fuzz" | "source_gone"
    target: str  # a process name, or for fuzz the socket ("inference+display.frames", "launcher.heartbeats", ...)
    processes: tuple[str, ...]  # processes it touches: it waits until they are ready and free of other faults
    planned_s: float
    injected_s: float | None = None
    detected_s: float | None = None
    restarted_s: float | None = None
    ready_s: float | None = None  # the restarted process ready again / the source reopened / the fuzz absorbed
    resumed_s: float | None = None  # first heatmap delivered after ready_s (filled from the latency log)
    done: bool = False
    ok: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    # runtime state, not reported
    _pid: int | None = None
    _proc: Any = None
    _events_from: int = 0
    _socket: Any = None
    _queue: list[Any] = field(default_factory=list)
    _baseline: dict[str, Any] = field(default_factory=dict)
    _send_after: float = 0.0

    def report(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        if self.injected_s is not None:
            for name in ("detected", "restarted", "ready", "resumed"):
                t = getattr(self, f"{name}_s")
                out[f"{name}_after_s"] = round(t - self.injected_s, 3) if t is not None else None
        return out


def fault_schedule(duration_s: float, fuzz_targets: dict[str, tuple[str, ...]]) -> list[Fault]:
    """kill -9 and SIGSTOP of each worker, a fuzz of each socket and a source that goes away, interleaved so that
    consecutive faults touch different processes, planned evenly over ``SCHEDULE_SPAN`` of the run."""
    workers = ("replay", "camera", "display", "inference")
    process_faults = [(kind, w, (w,)) for kind in ("kill9", "sigstop") for w in workers]
    process_faults.insert(4, ("source_gone", "camera", ("camera",)))
    # SIGSTOP of the display while another process floods the launcher's heartbeat socket: the hang must still be
    # seen within the normal deadline (the launcher reads a bounded number of messages per supervision step)
    process_faults.append(("flood", "display", ("display",)))
    fuzz = [("fuzz", target, procs) for target, procs in fuzz_targets.items()]
    plan: list[tuple[str, str, tuple[str, ...]]] = []
    while process_faults or fuzz:
        for source in (fuzz, process_faults):
            if source:
                plan.append(source.pop(0))
    lo, hi = SCHEDULE_SPAN
    step = (hi - lo) * duration_s / max(1, len(plan) - 1)
    return [
        Fault(kind, target, procs, round(lo * duration_s + i * step, 3)) for i, (kind, target, procs) in enumerate(plan)
    ]

"""``avloc devices``: the cameras (OpenCV/V4L2) and microphones (PortAudio) this machine offers; and what a live
run says about them: :func:`report_problem` (the launcher's console line when a capture worker's heartbeat
carries a new ``problem``) and :func:`why_no_heatmaps` (the closing line of a run that produced none)."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args: argparse.Namespace) -> int:
    from avloc.stream.capture.microphone import list_devices  # why: torch (the front-end); the launcher imports us

    devices = list_devices()
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    print("cameras (use the index with `avloc run --camera N`; files and rtsp:// URLs work too):")
    for cam in devices["cameras"] or []:
        print(f"  {cam['index']:>3}  {cam['path']}  {cam['width']}x{cam['height']} @ {cam['fps']:.0f} fps")
    if not devices["cameras"]:
        print("  (none found)")
    print("microphones (use the index or a part of the name with `avloc run --mic ...`):")
    for mic in devices["microphones"]:
        star = "*" if mic["default"] else " "
        print(
            f"  {mic['index']:>3}{star} {mic['name']}  [{mic['hostapi']}], {mic['channels']} ch, "
            f"{mic['default_samplerate']:.0f} Hz"
        )
    if not devices["microphones"]:
        print("  (none found)")
    return 0


# ---------------------------------------------------------------------------------------------- live runs


def report_problem(logger: logging.Logger, name: str, before: str | None, stats: dict[str, Any]) -> None:
    """Say on the console (the launcher's log) when worker ``name``'s heartbeat brings a new ``problem`` (a
    device that cannot open or stopped delivering: which, what was tried, the retry schedule), and when it is
    solved. The workers word problems without counters, so each is said once, not every heartbeat."""
    problem = stats.get("problem")
    if problem == before:
        return
    if problem:
        logger.warning("%s: %s", name, problem)
    elif before:
        logger.info("%s: delivering again", name)


def why_no_heatmaps(summary: dict[str, Any]) -> str | None:
    """For a run that published no heatmap: why, from the workers' last heartbeats (the closing line of
    ``avloc run``/``avloc replay``); None when there were heatmaps or nothing explains it."""
    latency = summary.get("latency") or {}
    if latency.get("heatmaps", 0):
        return None
    processes: dict[str, Any] = summary.get("processes") or {}
    reasons = []
    for name, proc in processes.items():
        stats = proc.get("stats") or {}
        role = name.rstrip("0123456789")
        if proc.get("exit_code") == 2:  # USER_ERROR_EXIT: its one-line error is in the run's reason above
            reasons.append(f"{name} could not start (see its error above)")
        elif role == "camera" and not stats.get("grabbed"):
            reasons.append(f"{name} never delivered a frame ({stats.get('problem') or 'no problem reported'})")
        elif role == "microphone" and not stats.get("windows"):
            reasons.append(f"{name} never delivered audio ({stats.get('problem') or 'no problem reported'})")
        elif stats.get("problem"):
            reasons.append(f"{name}: {stats['problem']}")
    non_finite = sum(
        ((p.get("stats") or {}).get("rejects") or {}).get("audio", {}).get("non_finite", 0)
        for n, p in processes.items()
        if n.startswith("inference")
    )
    if not reasons and latency.get("suppressed") and non_finite:  # e.g. a pcm_f32le track holding NaN/inf
        reasons.append(
            f"all {latency['suppressed']} frame(s) had no audio to pair with: the inference worker refused "
            f"{non_finite} audio window(s) holding NaN or infinite samples (a damaged or float audio track)"
        )
    if not reasons and latency.get("suppressed"):
        reasons.append(
            f"all {latency['suppressed']} frame(s) had no audio to pair with (--mic none, a file without an "
            "audio track, or audio windows older than max_audio_age_s)"
        )
    if not reasons:
        inference = [p for n, p in processes.items() if n.startswith("inference")]
        if inference and not any((p.get("stats") or {}).get("frames") for p in inference):
            reasons.append("the inference worker received no frames")
    if not reasons:
        return None
    return "no heatmaps because " + "; ".join(reasons)

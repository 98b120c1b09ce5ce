"""``avloc devices``: the cameras (OpenCV/V4L2) and microphones (PortAudio) this machine offers."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args: argparse.Namespace) -> int:
    from avloc.stream.microphone import list_devices

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

"""``avloc doctor``: what this machine has for inference (CUDA, GPUs, TensorRT, ONNX Runtime providers, faiss)
and which engine backends will run on it. Each probe catches its own failure, so one broken package shows as
a line in the report instead of stopping it."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import platform
import shutil
import subprocess
import warnings
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__


def probe_torch() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "version": torch.__version__,
        "built_for_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": [],
    }
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    try:  # torch.compile's GPU code generator
        info["triton"] = importlib.import_module("triton").__version__
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable"
        info["triton"] = None
        info["triton_error"] = _error(err)
    return info


def probe_driver() -> dict[str, Any]:
    if shutil.which("nvidia-smi") is None:
        return {"nvidia_smi": None}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as err:
        return {"nvidia_smi": "failed", "error": _error(err)}
    return {"nvidia_smi": [line.strip() for line in out.splitlines() if line.strip()]}


def _session_providers(ort: Any) -> list[str]:
    """The providers a real session gets when CUDA is asked for (a one-node graph built in memory): what
    ``--backend onnxruntime --device cuda`` will run on. ``get_available_providers()`` alone lists CUDA
    whenever it is compiled in, even when its libraries fail to load and sessions fall back to the CPU."""
    from onnx import TensorProto, helper

    from avloc.engines.onnxruntime_backend import preload_cuda_libraries

    preload_cuda_libraries(ort)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)  # readable by every onnxruntime avloc supports
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with warnings.catch_warnings():  # "Specified provider ... is not in available provider names"
        warnings.simplefilter("ignore")
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    return list(session.get_providers())


def probe_onnxruntime() -> dict[str, Any]:
    from avloc.engines.onnxruntime_backend import BOTH_WHEELS_HINT, both_wheels_installed

    info: dict[str, Any] = {"dists": {d: _version(d) for d in ("onnxruntime", "onnxruntime-gpu")}}
    try:
        import onnxruntime as ort

        info["version"] = ort.__version__
        info["providers"] = ort.get_available_providers()
        info["session_providers"] = _session_providers(ort)
    except Exception as err:  # noqa: BLE001
        info["error"] = _error(err)
        info.setdefault("providers", [])
        info.setdefault("session_providers", [])
    if both_wheels_installed():
        info["warning"] = BOTH_WHEELS_HINT
    return info


def probe_tensorrt() -> dict[str, Any]:
    try:
        import tensorrt as trt
    except Exception as err:  # noqa: BLE001 - the stub wheels raise at import without their libraries
        return {"version": None, "error": _error(err)}
    return {"version": str(trt.__version__)}


def probe_faiss() -> dict[str, Any]:
    try:
        import faiss
    except Exception as err:  # noqa: BLE001
        return {"version": None, "error": _error(err)}
    num_gpus = getattr(faiss, "get_num_gpus", None)
    return {
        "version": getattr(faiss, "__version__", "?"),
        "dists": {d: _version(d) for d in ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu13-cuvs")},
        "gpus": int(num_gpus()) if num_gpus is not None else 0,
    }


def backends(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Which ``--backend``/``--device`` combinations will run here, each with the reason when not."""
    cuda = report["torch"]["cuda_available"]
    no_cuda = "no CUDA GPU visible to torch"
    ort_cuda = "CUDAExecutionProvider" in report["onnxruntime"].get("session_providers", [])
    ort_built = "CUDAExecutionProvider" in report["onnxruntime"].get("providers", [])
    ort_note = (
        "a session asked for CUDA got only "
        + ", ".join(report["onnxruntime"].get("session_providers", []) or ["nothing"])
        + " (CUDA/cuDNN libraries not loadable)"
        if ort_built
        else "no CUDAExecutionProvider (install onnxruntime-gpu)"
    )
    trt = report["tensorrt"]
    rows = [
        ("onnxruntime", "cpu", True, ""),
        (
            "onnxruntime",
            "cuda",
            cuda and ort_cuda,
            no_cuda if not cuda else "" if ort_cuda else ort_note,
        ),
        ("torch", "cpu", True, ""),
        ("torch eager / cuda_graphs", "cuda", cuda, "" if cuda else no_cuda),
        (
            "torch compile",
            "cuda",
            cuda and bool(report["torch"].get("triton")),
            no_cuda if not cuda else "" if report["torch"].get("triton") else "triton is not importable",
        ),
    ]
    if trt.get("version") is None:
        rows.append(("tensorrt", "cuda", False, f"not importable ({trt.get('error')})"))
    elif int(trt["version"].split(".")[0]) < 10:
        rows.append(("tensorrt", "cuda", False, f"TensorRT {trt['version']} < 10"))
    else:
        rows.append(("tensorrt", "cuda", cuda, "" if cuda else no_cuda))
    return [{"backend": b, "device": d, "runs": ok, "note": note} for b, d, ok, note in rows]


def collect() -> dict[str, Any]:
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "avloc": _version("avloc"),
        "cuda_python": _version("cuda-python"),
    }
    for name, probe in (
        ("torch", probe_torch),
        ("driver", probe_driver),
        ("onnxruntime", probe_onnxruntime),
        ("tensorrt", probe_tensorrt),
        ("faiss", probe_faiss),
    ):
        try:
            report[name] = probe()
        except Exception as err:  # noqa: BLE001 - a broken probe is reported, not fatal
            report[name] = {"error": _error(err)}
    report["torch"].setdefault("cuda_available", False)
    report["backends"] = backends(report)
    return report


def format_report(report: dict[str, Any]) -> str:
    t, ort, trt, faiss = report["torch"], report["onnxruntime"], report["tensorrt"], report["faiss"]
    lines = [
        f"python      {report['python']} on {report['platform']}",
        f"torch       {t.get('version')} (built for CUDA {t.get('built_for_cuda')}, cuDNN {t.get('cudnn')}, "
        f"triton {t.get('triton')})",
        f"CUDA        {'available' if t.get('cuda_available') else 'not available'}",
    ]
    for gpu in t.get("gpus", []):
        lines.append(f"GPU {gpu['index']}       {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB)")
    smi = report["driver"].get("nvidia_smi")
    lines.append(f"driver      {', '.join(smi) if isinstance(smi, list) else smi or 'nvidia-smi not found'}")
    lines.append(f"onnxrt      {ort.get('version', ort.get('error'))}; providers: {', '.join(ort['providers'])}")
    lines.append(f"            a session asked for CUDA got: {', '.join(ort.get('session_providers', [])) or '?'}")
    if "warning" in ort:
        lines.append(f"            warning: {ort['warning']}")
    if trt.get("version"):
        lines.append(f"tensorrt    {trt['version']}")
    else:
        lines.append(f"tensorrt    not available ({trt.get('error')})")
    if faiss.get("version"):
        lines.append(f"faiss       {faiss['version']}, GPUs visible to faiss: {faiss['gpus']}")
    else:
        lines.append(f"faiss       not available ({faiss.get('error')})")
    lines.append(f"cuda-python {report['cuda_python'] or 'not installed'}")
    lines.append("backends:")
    for row in report["backends"]:
        status = "yes" if row["runs"] else "no "
        note = f"  ({row['note']})" if row["note"] else ""
        lines.append(f"  {status} {row['backend']:26s} --device {row['device']}{note}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def main(args: argparse.Namespace) -> int:
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0

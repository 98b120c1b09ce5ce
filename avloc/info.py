"""``avloc info PATH``: what a checkpoint, an engine folder or a Triton model repository is.

Method and architecture, preprocessing (front-end window, image size and normalization), the training run
(config, epoch/step, val metrics; for an engine, read from the checkpoint it was exported from when that file
is still there), the silence gate, graph checksums (recomputed and compared with the manifest) and which
``--backend``/``--device`` combinations can run it on this machine (``avloc doctor``'s probes). ``--json``
prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from avloc.core.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="checkpoint (.pt), engine folder (avloc export) or Triton repository")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")


def main(args: argparse.Namespace) -> int:
    info = describe(args.path)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0 if intact(info) else 1


def intact(info: dict[str, Any]) -> bool:
    """Whether what ``info`` describes can run as it is: no graph file missing or changed since the export, a
    Triton repository that validates and holds every model its manifest names (else ``avloc info`` exits 1)."""
    broken = {"MISMATCH", "missing"}
    return info.get("valid", True) and all(g.get("checksum") not in broken for g in info.get("graphs", {}).values())


# ---------------------------------------------------------------------------------------------- describe


def describe(path: str | Path) -> dict[str, Any]:
    """Everything ``avloc info`` says about ``path``, as a dict; a path that is none of the three is a UserError."""
    path = Path(path)
    if path.is_file():
        return _checkpoint(path)
    if (path / "manifest.json").is_file():
        return _engine(path)
    from avloc.engines.triton_export import REPO_MANIFEST

    if (path / REPO_MANIFEST).is_file():
        return _triton(path)
    if not path.exists():
        raise UserError(f"{path}: not found")
    raise UserError(
        f"{path}: not a checkpoint (.pt file), an engine folder (manifest.json) or a Triton repository "
        f"({REPO_MANIFEST})"
    )


def _common(method: str, model_config: dict[str, Any], frontend: dict[str, Any], image: dict[str, Any]) -> dict:
    from avloc.core.audio import FrontEndConfig

    fe = FrontEndConfig.from_dict(frontend)
    return {
        "method": method,
        "architecture": model_config,
        "preprocessing": {
            "audio": {
                **fe.to_dict(),
                "window_samples": fe.num_samples,
                "spectrogram_shape": list(fe.output_shape()),
            },
            "image": image,
        },
    }


def _training(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The training run's record in a checkpoint: config, progress, val metrics (what the trainer saves)."""
    keys = ("config", "epoch", "step", "val")
    found = {k: payload[k] for k in keys if k in payload}
    if "source" in payload:  # imported weights (avloc import ...)
        found["imported_from"] = payload["source"]
    return found or None


def _checkpoint(path: Path) -> dict[str, Any]:
    from avloc.core.checkpoint import read_checkpoint
    from avloc.engines.base import sha256_file

    payload = read_checkpoint(path)  # not a checkpoint: one-line UserError
    state = payload["state_dict"]
    info = {
        "kind": "checkpoint",
        "path": str(path),
        **_common(payload["method"], payload["model_config"], payload["frontend"], payload["image"]),
        "parameters": int(sum(v.numel() for v in state.values() if hasattr(v, "numel"))),
        "training": _training(payload),
        "gate": None,
        "sha256": sha256_file(path),
        "backends": [
            {"backend": "torch (avloc.Localizer, avloc localize)", "device": "cpu", "runs": True, "note": ""},
            {"backend": "onnxruntime / tensorrt / triton", "device": "-", "runs": False, "note": "avloc export first"},
        ],
    }
    return info


def _engine(path: Path) -> dict[str, Any]:
    from avloc.engines.base import read_manifest

    manifest = read_manifest(path)
    info = {
        "kind": "engine",
        "path": str(path),
        **_common(manifest["method"], manifest.get("model_config", {}), manifest["frontend"], manifest["image"]),
        "outputs": manifest.get("outputs"),
        "training": _source_training(path, manifest),
        "gate": manifest.get("gate"),
        "graphs": _graphs(path, manifest),
        "ogl": manifest.get("ogl") is not None,
        "parity_max_abs_diff": manifest.get("parity_max_abs_diff"),
        "versions": manifest.get("versions"),
        "created": manifest.get("created"),
        "backends": _backends(manifest),
    }
    return info


def _source_training(path: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The training record of the checkpoint the engine came from (its slim ``model.pt`` names it)."""
    from avloc.core.checkpoint import read_checkpoint

    entry = manifest.get("torch_checkpoint")
    if not isinstance(entry, dict) or not (path / entry.get("file", "")).is_file():
        return None
    try:
        slim = read_checkpoint(path / entry["file"])
    except UserError:
        return None
    source = slim.get("source_checkpoint")
    if not source:
        return None
    out: dict[str, Any] = {"source_checkpoint": source}
    try:
        out.update(_training(read_checkpoint(source)) or {})
    except UserError as err:
        out["note"] = f"source checkpoint not readable here ({err})"
    return out


def _graphs(path: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each graph file with its manifest checksum, recomputed here: ok, MISMATCH or missing."""
    from avloc.engines.base import sha256_file

    entries: dict[str, dict[str, Any]] = {}
    for name, entry in manifest.get("graphs", {}).items():
        candidates = {name: entry, **{f"{name}.{v}": e for v, e in (entry.get("variants") or {}).items()}}
        for label, item in candidates.items():
            file = path / item["file"]
            expected = item.get("sha256")
            if not file.is_file():
                state = "missing"
            elif expected is None:
                state = "unchecked (no sha256 in the manifest)"
            else:
                state = "ok" if sha256_file(file) == expected else "MISMATCH"
            entries[label] = {"file": item["file"], "sha256": expected, "checksum": state}
    torch_ckpt = manifest.get("torch_checkpoint")
    if isinstance(torch_ckpt, dict):
        file = path / torch_ckpt["file"]
        ok = file.is_file() and sha256_file(file) == torch_ckpt.get("sha256")
        entries["torch"] = {
            "file": torch_ckpt["file"],
            "sha256": torch_ckpt.get("sha256"),
            "checksum": "ok" if ok else "missing" if not file.is_file() else "MISMATCH",
        }
    return entries


def _backends(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """``avloc doctor``'s backend rows for this machine, plus what this engine itself adds or lacks."""
    from avloc.engines.doctor import backends, probe_onnxruntime, probe_tensorrt, probe_torch

    report = {"torch": probe_torch(), "onnxruntime": probe_onnxruntime(), "tensorrt": probe_tensorrt()}
    rows = backends(report)
    if not manifest.get("torch_checkpoint"):
        for row in rows:
            if row["backend"].startswith("torch"):
                row.update(runs=False, note="engine has no model.pt")
    try:
        import tritonclient.grpc  # noqa: F401

        rows.append({"backend": "triton", "device": "server", "runs": True, "note": "needs a running tritonserver"})
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        rows.append({"backend": "triton", "device": "server", "runs": False, "note": "pip install avloc[triton]"})
    return rows


def _triton(path: Path) -> dict[str, Any]:
    from avloc.engines.triton_export import REPO_MANIFEST, validate_repository

    manifest_path = path / REPO_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        triton = manifest.get("triton", {})
        for key in ("method", "frontend", "image"):
            manifest[key]  # noqa: B018 - a KeyError here is a corrupt manifest
    except (ValueError, KeyError, AttributeError) as err:
        raise UserError(f"{manifest_path}: corrupt Triton repository manifest ({type(err).__name__}: {err})") from None
    try:
        models, problem = validate_repository(path), None
    except UserError as err:
        models, problem = [], str(err)
    expected = sorted(str(v.get("model")) for v in models_of(triton).values())
    if problem is None and (absent := [m for m in expected if m not in models]):
        problem = f"{path}: model(s) {', '.join(absent)} named in {REPO_MANIFEST} have no model directory"
    return {
        "kind": "triton repository",
        "path": str(path),
        **_common(manifest["method"], manifest.get("model_config", {}), manifest["frontend"], manifest["image"]),
        "gate": manifest.get("gate"),
        "models": models,
        "valid": problem is None,
        "problem": problem,
        "source_engine": triton.get("source_engine"),
        "client": triton.get("client"),
        "graphs": {m: {"model": v.get("model"), "backend": v.get("backend")} for m, v in models_of(triton).items()},
        "backends": _backends(manifest)[-1:],
    }


def models_of(triton: dict[str, Any]) -> dict[str, dict[str, Any]]:
    models = triton.get("models")
    return models if isinstance(models, dict) else {}


# ---------------------------------------------------------------------------------------------- text


def format_info(info: dict[str, Any]) -> str:
    pre = info["preprocessing"]
    audio, image = pre["audio"], pre["image"]
    arch = ", ".join(f"{k}={v}" for k, v in info["architecture"].items()) or "-"
    lines = [
        f"{info['path']}: {info['kind']}",
        f"method        {info['method']} ({arch})",
        f"audio         {audio['kind']} front-end, {audio['window_seconds']:g} s at {audio['sample_rate']} Hz "
        f"(anchor {audio['anchor']}) -> spectrogram {'x'.join(map(str, audio['spectrogram_shape']))}",
        f"image         {_size(image.get('size'))} px, mean {image.get('mean')}, std {image.get('std')}",
    ]
    if "parameters" in info:
        lines.append(f"parameters    {info['parameters']:,}")
    training = info.get("training")
    if training:
        if "source_checkpoint" in training:
            lines.append(f"exported from {training['source_checkpoint']}")
        if "epoch" in training or "step" in training:
            lines.append(f"training      epoch {training.get('epoch')}, step {training.get('step')}")
        if training.get("val"):
            lines.append("val           " + ", ".join(f"{k} {_num(v)}" for k, v in training["val"].items()))
        config = training.get("config")
        if isinstance(config, dict):
            for section, value in config.items():
                text = json.dumps(value, default=str) if isinstance(value, dict) else str(value)
                lines.append(f"config        {section}: {text[:160]}{'...' if len(text) > 160 else ''}")
        if "imported_from" in training:
            lines.append(f"imported from {training['imported_from']}")
        if "note" in training:
            lines.append(f"training      {training['note']}")
    else:
        lines.append("training      no training record")
    gate = info.get("gate")
    if gate:
        val = gate.get("val") or {}
        lines.append(
            f"gate          not_visible when {gate.get('statistic', 'confidence')} < {_num(gate.get('threshold'))}"
            + (f" (val: {', '.join(f'{k} {_num(v)}' for k, v in val.items())})" if val else "")
        )
    else:
        lines.append("gate          none (export with --gate-data to calibrate one)")
    if "sha256" in info:
        lines.append(f"sha256        {info['sha256']}")
    for name, graph in info.get("graphs", {}).items():
        if "checksum" in graph:
            lines.append(f"graph {name:8s}{graph['file']}: sha256 {str(graph['sha256'])[:16]}... {graph['checksum']}")
        else:
            lines.append(f"model {name:8s}{graph['model']} ({graph['backend']})")
    if info["kind"] == "triton repository":
        state = "valid" if info["valid"] else f"INVALID: {info['problem']}"
        lines.append(f"repository    {state}; models: {', '.join(info['models']) or '-'}")
        lines.append(f"client        {info.get('client')}")
    lines.append("runs here:")
    for row in info["backends"]:
        note = f"  ({row['note']})" if row["note"] else ""
        lines.append(f"  {'yes' if row['runs'] else 'no '} {row['backend']:26s} --device {row['device']}{note}")
    return "\n".join(lines)


def _size(size: Any) -> str:
    return f"{size}x{size}" if isinstance(size, int) else "x".join(map(str, size or []))


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

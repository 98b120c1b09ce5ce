"""Helpers of bench/gpu/run.sh (not part of the library): make the benchmark's models and video, and write the
markdown + PNG summary of a run folder.

    python bench/gpu/helpers.py clip OUT [--quick]     # OUT/models/clip.mp4, a 30 fps synth video (first)
    python bench/gpu/helpers.py models OUT [--quick]   # random-init engines under OUT/models
    python bench/gpu/helpers.py summary OUT            # OUT/summary.md + OUT/summary.png from OUT/*.json
    python bench/gpu/helpers.py steps OUT              # what ran / failed / was skipped, and why
    python bench/gpu/helpers.py requirements           # avloc's dependencies + the gpu extra (pip download -r)

Random weights are enough: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("bench.gpu")


def _checkpoint(path: Path, config_name: str, overrides: dict[str, Any]) -> Path:
    """Random-init checkpoint of ``configs/<config_name>.yaml``'s model, front-end and image size."""
    import torch

    from avloc.core.audio import FrontEndConfig
    from avloc.core.checkpoint import ImageConfig, build_model, save_checkpoint
    from avloc.core.config import from_dict, load_config

    config = load_config(ROOT / "configs" / f"{config_name}.yaml")
    for section, values in overrides.items():
        config[section] = {**config.get(section, {}), **values}
    torch.manual_seed(0)
    model = build_model(config["method"], config["model"])
    return save_checkpoint(
        path,
        model,
        method=config["method"],
        model_config=config["model"],
        frontend=FrontEndConfig.from_dict(config["frontend"]),
        image=from_dict(ImageConfig, config["image"], "image"),
    )


def write_clip(out: Path, quick: bool) -> Path:
    """OUT/models/clip.mp4 (640x480, 30 fps): written before the engines, so that a failed export does not
    leave the pipeline steps without input."""
    from avloc.core.data.synth import write_synth_video

    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    path = models / "clip.mp4"
    write_synth_video(path, seconds=4.0 if quick else 10.0, fps=30, size=(640, 480), seed=0)
    return path


def make_models(out: Path, quick: bool, acl: bool = True) -> dict[str, Any]:
    """SSL-Align (full size, or width 8 at 64 px with --quick) and ACL (full or tiny, if transformers is
    installed and ``acl``) engines under OUT/models; ``models.json`` says what was made and why ACL was not."""
    from avloc.engines.export import export_engine

    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    made: dict[str, Any] = {}
    models_json = models / "models.json"
    start = time.perf_counter()
    ssl_overrides = {"model": {"width": 8}, "frontend": {"window_seconds": 1.0}, "image": {"size": 64}} if quick else {}
    ckpt = _checkpoint(models / "ssl_align.pt", "ssl_align", ssl_overrides)
    export_engine(ckpt, models / "ssl_align", force=True)
    made["ssl_align"] = {"engine": str(models / "ssl_align"), "export_s": round(time.perf_counter() - start, 1)}
    models_json.write_text(json.dumps(made, indent=2))  # before ACL: its export may run out of time
    try:
        if not acl:
            raise ImportError("not asked for: run.sh --steps without engine_acl")
        import transformers  # noqa: F401 - ACL's CLIPSeg half

        start = time.perf_counter()
        from avloc.engines.acl_export import export_acl

        ckpt = _checkpoint(models / "acl.pt", "acl_tiny" if quick else "acl", {})
        export_acl(ckpt, models / "acl", force=True)
        made["acl"] = {"engine": str(models / "acl"), "export_s": round(time.perf_counter() - start, 1)}
    except ImportError as err:
        why = str(err) if not acl else f"transformers is not installed ({err})"
        made["acl"] = {"skipped": why}
    models_json.write_text(json.dumps(made, indent=2))
    return made


# ---------------------------------------------------------------------------------------------- summary


def _engine_rows(report: dict[str, Any]) -> list[str]:
    rows = []
    for r in report["results"]:
        startup = report.get("startup", {}).get(r["backend"], {})
        speedup = r.get("speedup_vs_eager_torch")  # None where eager torch cannot run the graph (objectness)
        speedup_text = "-" if speedup is None else f"{speedup:.2f}x"
        precision = r.get("precision") or startup.get("precision", "?")
        rows.append(
            f"| {report['method']} | {r['backend']} | {precision} | {r['graph']} | {r['batch']} | "
            f"{r['median_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['per_item_ms']:.3f} | {speedup_text} | "
            f"{startup.get('warmup_s', float('nan')):.1f} |"
        )
    return rows


def _pipeline_rows(name: str, report: dict[str, Any]) -> list[str]:
    pipe = report.get("pipeline", {})
    e2e, visual = pipe.get("e2e_ms", {}), pipe.get("stages_ms", {}).get("visual_engine", {})
    return [
        f"| {name} | {pipe.get('backend', '?')} | {pipe.get('streams', '?')} | {pipe.get('heatmap_fps', '?')} | "
        f"{e2e.get('p50', '?')} | {e2e.get('p99', '?')} | {visual.get('p50', '?')} | {visual.get('p99', '?')} | "
        f"{pipe.get('drops', '?')} |"
    ]


def summarize(out: Path) -> Path:
    """OUT/summary.md (tables of every engine/pipeline JSON in OUT, date, device, doctor) + summary.png."""
    engine_reports = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("engine_*.json"))}
    pipeline_reports = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("pipeline_*.json"))}
    steps = read_steps(out)
    args = (out / "args.txt").read_text().strip() if (out / "args.txt").is_file() else ""
    device = next(iter(engine_reports.values()), {}).get("device", {})
    lines = [
        f"# avloc GPU benchmark, {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"Device: {device.get('name', '?')} ({device.get('kind', '?')}). Re-create: "
        f"`{' '.join(['bench/gpu/run.sh', args]).strip()}`. Random-init weights (speed does not depend on them).",
        "",
    ]
    if (out / "doctor.txt").is_file():
        lines += ["## avloc doctor", "", "```", (out / "doctor.txt").read_text().rstrip(), "```", ""]
    if engine_reports:
        lines += [
            "## Engines alone (`avloc bench engine`, NumPy in -> NumPy out, median of timed calls)",
            "",
            "Precision: fp32 = IEEE float32 (TF32 off), tf32, fp16 (TensorRT: float16 graph with float32 norms; "
            "torch: autocast), int8.",
            "",
            "| model | backend | precision | graph | batch | median ms | p99 ms | ms/item | vs eager | warm-up s |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for report in engine_reports.values():
            lines += _engine_rows(report)
        for name, report in engine_reports.items():
            for spec, err in report.get("errors", {}).items():
                lines.append(f"\n{name}: `{spec}` skipped: {err}")
        lines.append("")
    if pipeline_reports:
        lines += [
            "## Streaming pipeline (`avloc bench pipeline`, replay at 30 fps)",
            "",
            "| run | backend | streams | heatmaps/s | e2e p50 ms | e2e p99 ms | visual p50 | visual p99 | drops |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, report in pipeline_reports.items():
            lines += _pipeline_rows(name, report)
        lines.append("")
    failed = {k: v for k, v in steps.items() if v[0] not in ("0", "skipped")}
    if failed:
        lines += ["## Steps that failed (exit status; see the step's .log)", ""]
        lines += [f"- {step}: {rc}{' (' + why + ')' if why else ''}" for step, (rc, why) in failed.items()]
        lines.append("")
    skipped = {k: v for k, v in steps.items() if v[0] == "skipped"}
    if skipped:
        lines += ["## Skipped", ""] + [f"- {step}: {why}" for step, (_, why) in skipped.items()] + [""]
    md = out / "summary.md"
    md.write_text("\n".join(lines))
    if engine_reports:
        _plot(engine_reports, out / "summary.png")
    return md


def requirements() -> list[str]:
    """pyproject.toml's dependencies and its ``gpu`` extra: what `pip install -e '.[gpu]'` resolves from."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["gpu"]]


def read_steps(out: Path) -> dict[str, tuple[str, str]]:
    """OUT/steps.txt, written by run.sh: "name status [reason]" lines, status an exit code or "skipped"."""
    steps: dict[str, tuple[str, str]] = {}
    path = out / "steps.txt"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, _, rest = line.partition(" ")
        status, _, why = rest.partition(" ")
        if name and status:
            steps[name] = (status, why.strip())
    return steps


def steps_table(out: Path) -> str:
    """What ran, what failed and what was skipped, and why: the last thing run.sh prints."""
    rows = []
    for name, (status, why) in read_steps(out).items():
        verdict = (
            "ran"
            if status == "0"
            else "skipped"
            if status == "skipped"
            else "TIMED OUT"
            if status
            in (
                "124",
                "137",
            )
            else f"FAILED (exit {status})"
        )
        rows.append(f"  {name:20s} {verdict:18s} {why}".rstrip())
    return "\n".join(["steps:", *rows])


def _plot(reports: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(11, 4 * len(reports)), squeeze=False, constrained_layout=True)
    for row, (name, report) in zip(axes, reports.items()):
        for ax, graph in zip(row, ("audio", "visual")):
            for backend in dict.fromkeys(r["backend"] for r in report["results"]):
                pts = [r for r in report["results"] if r["backend"] == backend and r["graph"] == graph]
                if not pts:
                    continue
                ax.plot([r["batch"] for r in pts], [r["per_item_ms"] for r in pts], marker="o", label=backend)
            ax.set_title(f"{name}: {graph}")
            if not ax.lines:  # this graph was not measured (every backend skipped)
                continue
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel("median ms per item")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("clip")
    p.add_argument("out", type=Path)
    p.add_argument("--quick", action="store_true")
    p = sub.add_parser("models")
    p.add_argument("out", type=Path)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-acl", action="store_true", help="SSL-Align only (the ACL export takes minutes)")
    p = sub.add_parser("summary")
    p.add_argument("out", type=Path)
    p = sub.add_parser("steps")
    p.add_argument("out", type=Path)
    sub.add_parser("requirements")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "clip":
        print(f"wrote {write_clip(args.out, args.quick)}")
    elif args.command == "models":
        print(json.dumps(make_models(args.out, args.quick, acl=not args.no_acl), indent=2))
    elif args.command == "steps":
        print(steps_table(args.out))
    elif args.command == "requirements":
        print("\n".join(requirements()))
    else:
        print(f"wrote {summarize(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Regenerate docs/results.md: the CPU recipe and SSL-Align's parts on the stamps benchmarks.

Steps (each reused with --reuse when its output already exists):
  1. the benchmarks (``avloc data stamps``): BENCH (closed set; val/test = the README benchmark's) and
     OPEN (``--unheard-frac 0.2``: a fifth of the categories only in test) -> DATA folders
  2. their nearest-neighbour indexes (EfficientNet-Lite0 images, YAMNet audio) -> DATA/nn.npz
  3. ``avloc train`` for each run of RUNS (a config + overrides, on one of the benchmarks) -> OUT/<run>/
  4. ``avloc eval`` (test split, audio-swap, bootstrap intervals) -> OUT/<run>/metrics_test.json
  5. baselines on the same test splits (random, centre prior, audio-blind objectness), the training
     curves (PNG) and the markdown -> docs/results.md

Runs in pieces, e.g. two trainings at once (one core each), then the report:
  .venv/bin/python scripts/make_results.py --runs pair_full --reuse &
  .venv/bin/python scripts/make_results.py --runs pair_single_positive --reuse
  .venv/bin/python scripts/make_results.py --reuse --report-only
tests/test_make_results.py runs it end to end on a tiny synthetic benchmark with a tiny run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("make_results")

FINDINGS = "## Findings"  # hand-written section (from --notes) kept across regenerations
BENCHMARKS = {  # name -> `avloc data stamps` arguments (after --out)
    "bench": [
        "--n-train",
        "10000",
        "--n-val",
        "200",
        "--n-test",
        "300",
        "--distractors",
        "2",
        "--silent-frac",
        "0.2",
        "--seed",
        "1",
        "--videos",
        "2",
    ],
    "open": [
        "--n-train",
        "6000",
        "--n-val",
        "200",
        "--n-test",
        "300",
        "--distractors",
        "2",
        "--silent-frac",
        "0.2",
        "--unheard-frac",
        "0.2",
        "--seed",
        "1",
    ],
}
INDEX_K = 200
# Equal wall-clock comparisons: each run alone on the machine (2 threads) for the same number of minutes.
PAIR = ["train.budget_minutes=8"]
# Equal epochs (the paper's way): every run takes the same 78 steps of 64 scenes (half an epoch of the 10000),
# whatever they cost; `full` does 3 image and 3 audio forwards a sample, so it gets ~3x the compute.
EPOCH = ["train.budget_minutes=null", "train.max_steps=78"]


@dataclass(frozen=True)
class Run:
    config: str
    overrides: list[str] = field(default_factory=list)
    data: str = "bench"  # which benchmark it trains and is tested on
    description: str = ""
    group: str = "recipe"  # report section: recipe | pair | open


FULL = ["loss.positives=[orig,aug,nn]"]
RUNS = {
    "cpu": Run(
        "configs/cpu.yaml",
        [],
        "bench",
        "configs/cpu.yaml: s_L + s_A, original pair, same-sound negatives masked, cosine lr, 28 min budget",
    ),
    "cpu_2h": Run("configs/cpu_2h.yaml", [], "bench", "configs/cpu_2h.yaml: the same recipe with a 118 min budget"),
    "pair_cpu": Run("configs/cpu.yaml", PAIR, "bench", "the CPU recipe (= `align_only` + masking + cosine)", "pair"),
    "pair_full": Run(
        "configs/cpu.yaml",
        [*PAIR, *FULL],
        "bench",
        "SSL-Align: positives {orig, aug, NN}^2 (9 pairs), NN visual from audio neighbours",
        "pair",
    ),
    "pair_single_positive": Run(
        "configs/cpu.yaml", [*PAIR, "loss.use_sa=false"], "bench", "EZ-VSL-like: s_L only, original pair", "pair"
    ),
    "pair_cpu_no_mask": Run(
        "configs/cpu.yaml",
        [*PAIR, "train.false_negative_k=0"],
        "bench",
        "`pair_cpu` without same-sound masking",
        "pair",
    ),
    "epoch_align_only": Run(
        "configs/cpu.yaml", EPOCH, "bench", "s_L + s_A, original pair (the CPU recipe's loss)", "epoch"
    ),
    "epoch_single_positive": Run(
        "configs/cpu.yaml", [*EPOCH, "loss.use_sa=false"], "bench", "EZ-VSL-like: s_L only, original pair", "epoch"
    ),
    "epoch_full": Run(
        "configs/cpu.yaml",
        [*EPOCH, *FULL],
        "bench",
        "SSL-Align: positives {orig, aug, NN}^2 (9 pairs), NN visual from audio neighbours",
        "epoch",
    ),
    "epoch_full_nn_image": Run(
        "configs/cpu.yaml",
        [*EPOCH, *FULL, "train.nn_visual=image"],
        "bench",
        "`epoch_full` with the NN visual positive from image neighbours (the paper's)",
        "epoch",
    ),
    "open_cpu": Run("configs/cpu.yaml", PAIR, "open", "the CPU recipe, 8 min, on the open-set benchmark", "open"),
}
GROUPS = {  # report section -> (title, columns)
    "recipe": "The CPU recipes (closed set, 2 cores, ≤ 30 min and ≤ 2 h)",
    "pair": "Equal wall-clock: SSL-Align's parts (closed set, 8 min each on 2 cores, one run at a time)",
    "epoch": "Equal epochs: SSL-Align's parts (closed set, 78 steps × 64 each = half an epoch, whatever it costs)",
    "open": "Heard and unheard categories (open set)",
}
MAIN_COLUMNS = [  # (metrics key, header, with interval)
    ("adaptive/ciou_ap50", "adp cIoU@50", True),
    ("adaptive/auc", "adp AUC", True),
    ("median/ciou_ap50", "med cIoU@50", False),
    ("audio_swap_acc", "audio-swap", True),
    ("audio_swap_scene_acc", "all objects found", True),
    ("adaptive/ext_ap", "Ext AP", False),
    ("map/a2i_r1", "R@1 A→I", False),
]
OPEN_COLUMNS = [
    ("heard/adaptive/ciou_ap50", "heard adp cIoU@50", False),
    ("unheard/adaptive/ciou_ap50", "unheard adp cIoU@50", False),
    ("heard/audio_swap_acc", "heard audio-swap", False),
    ("unheard/audio_swap_acc", "unheard audio-swap", False),
    ("adaptive/ciou_ap50", "all adp cIoU@50", True),
    ("audio_swap_acc", "all audio-swap", True),
]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _py() -> str:
    return ".venv/bin/python"


# --- steps ------------------------------------------------------------------------------------------


def data_command(name: str, root: Path) -> list[str]:
    return [_py(), "-m", "avloc", "data", "stamps", "--out", str(root), *BENCHMARKS[name]]


def index_command(root: Path) -> list[str]:
    return [
        _py(),
        "-m",
        "avloc",
        "index",
        "build",
        "--data",
        str(root),
        "--k",
        str(INDEX_K),
        "--out",
        str(root / "nn.npz"),
    ]


def ensure_data(name: str, root: Path, reuse: bool) -> Path:
    if not ((root / "meta.json").is_file() and reuse):
        cmd = data_command(name, root) + ([] if reuse else ["--overwrite"])
        log.info("%s", shlex.join(cmd))
        subprocess.run(cmd, cwd=REPO, check=True)
    if not ((root / "nn.npz").is_file() and reuse):
        log.info("%s", shlex.join(index_command(root)))
        subprocess.run(index_command(root), cwd=REPO, check=True)
    return root


def train_command(run: str, data: Path, out: Path) -> list[str]:
    spec = RUNS[run]
    return [
        _py(),
        "-m",
        "avloc",
        "train",
        "--config",
        spec.config,
        "--data",
        str(data),
        "--out",
        str(out),
        *spec.overrides,
    ]


def ensure_trained(run: str, data: Path, out_dir: Path, reuse: bool) -> Path:
    out = out_dir / run
    best, done = out / "best.pt", out / "train_done.json"
    if reuse and done.is_file() and best.is_file():
        log.info("reusing trained run %s", out)
        return best
    cmd = train_command(run, data, out)
    if (out / "last.pt").is_file():
        cmd.insert(cmd.index("--out") + 2, "--resume")  # continue an interrupted run exactly
    log.info("training %s: %s", run, shlex.join(cmd))
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    _atomic_write(
        done,
        json.dumps(
            {
                "command": shlex.join(cmd),
                "wall_seconds": time.perf_counter() - started,
                "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
        ),
    )
    return best


def ensure_evaluated(run_dir: Path, data: Path, reuse: bool) -> dict[str, Any]:
    from avloc.train.evaluate import evaluate_checkpoint, write_json_atomic

    best, path = run_dir / "best.pt", run_dir / "metrics_test.json"
    if reuse and path.is_file() and path.stat().st_mtime >= best.stat().st_mtime:
        return json.loads(path.read_text())
    metrics = evaluate_checkpoint(
        best,
        data,
        "test",
        audio_swap=True,
        batch_size=32,
        grid=run_dir / "grid_test.png",
        swap_examples=run_dir / "audio_swap_examples",
        device="cpu",
    )
    write_json_atomic(path, metrics)
    return metrics


# --- baselines --------------------------------------------------------------------------------------


def baseline_metrics(data: Path, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Reference rows on the same test set with the same protocol and the same bootstrap: a random heatmap,
    a centre prior (a Gaussian bump in the middle), and an audio-blind objectness map (EfficientNet-Lite0
    ImageNet feature norm: finds objects, cannot know which one sounds)."""
    from avloc.core.datasets import AVDataset, load_silent_csv, load_vggss_json, read_labels, read_split
    from avloc.core.metrics import auc_of, bootstrap_interval, ciou_ap50_of, evaluate_maps, swap_hits
    from avloc.train.encoders import load_effnet_lite0, objectness_maps
    from avloc.train.evaluate import BINARIZE_MODES, swap_intervals, swap_scenes

    ids = read_split(data, "test")
    annotations = {i: a for i, a in load_vggss_json(data / "test.json").items() if i in set(ids)}
    silent_csv = data / "test_plus_silent.csv"
    silent = [r.video for r in load_silent_csv(silent_csv) if r.non_sounding] if silent_csv.is_file() else []
    rng = np.random.default_rng(seed)
    size = 56
    yy, xx = np.mgrid[0:size, 0:size]
    centre = np.exp(-(((xx + 0.5) / size - 0.5) ** 2 + ((yy + 0.5) / size - 0.5) ** 2) / (2 * 0.2**2))
    dataset = AVDataset(data, "test")
    effnet = load_effnet_lite0()
    objectness: dict[str, np.ndarray] = {}
    keys = [*annotations, *silent]
    for start in range(0, len(keys), 32):
        chunk = keys[start : start + 32]
        for k, m in zip(chunk, objectness_maps([dataset.image(k) for k in chunk], effnet)):
            objectness[k] = m
    random_maps = {k: rng.random((size, size)) for k in keys}
    scenes = swap_scenes(annotations, ids)
    labels = read_labels(data)
    test_labels = [labels[i] for i in ids]
    # a random ranking's top-1 has the query's class with probability (class count / N)
    chance_r1 = float(np.mean([test_labels.count(c) / len(ids) for c in test_labels]))
    groups = {g: set(read_split(data, f"test_{g}")) for g in ("heard", "unheard") if (data / f"test_{g}.txt").is_file()}
    out: dict[str, dict[str, Any]] = {}
    makers = (
        ("random heatmap", random_maps.__getitem__),
        ("centre prior", lambda _k: centre),
        ("objectness (audio-blind)", objectness.__getitem__),
    )
    for name, make in makers:
        maps = {k: make(k) for k in keys}
        row: dict[str, Any] = {}
        for mode in BINARIZE_MODES:
            res = evaluate_maps(maps, annotations, silent=silent or None, binarize=mode, per_sample=True)
            per = res.pop("per_sample")
            row.update({f"{mode}/{k}": v for k, v in res.items()})
            cious = np.array([v["ciou"] for v in per.values() if v["sounding"]])
            row[f"{mode}/ciou_ap50_ci"] = list(bootstrap_interval(cious, ciou_ap50_of))
            row[f"{mode}/auc_ci"] = list(bootstrap_interval(cious, auc_of))
            for group, members in groups.items():
                subset = {i: annotations[i] for i in annotations if i in members}
                if subset:
                    g = evaluate_maps({i: maps[i] for i in subset}, subset, binarize=mode)
                    row[f"{group}/{mode}/ciou_ap50"] = g["ciou_ap50"]
        # the same map whatever is heard: a pair is right when that map's peak is in the heard object's box and
        # no other (the audio-swap rule, avloc.core.metrics.swap_hits): at most one object per scene
        per_scene = {
            sid: swap_hits([np.asarray(make(sid))] * len(objs), [o.bbox for o in objs]) for sid, objs in scenes.items()
        }
        if per_scene:
            pairs = [h for v in per_scene.values() for h in v]
            row["audio_swap_acc"] = float(np.mean(pairs))
            row["audio_swap_scene_acc"] = float(np.mean([all(v) for v in per_scene.values()]))
            row.update(swap_intervals(per_scene))
            for group, members in groups.items():
                rows = [v for sid, v in per_scene.items() if sid in members]
                if rows:
                    row[f"{group}/audio_swap_acc"] = float(np.mean([h for v in rows for h in v]))
        out[name] = row
    for key in ("map/a2i_r1", "map/i2a_r1"):
        out["random heatmap"][key] = chance_r1
    return out


# --- the report -------------------------------------------------------------------------------------


def training_stats(run_dir: Path) -> dict[str, Any]:
    """Steps, epochs, samples/s, minutes (training + validation) and the selected epoch from the run's files."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    stats: dict[str, Any] = {"records": records}
    if records:
        stats["steps"] = records[-1]["step"]
        stats["samples_per_s"] = float(np.mean([r["samples_per_s"] for r in records]))
        stats["minutes"] = records[-1].get("elapsed_s", sum(r["train_seconds"] for r in records)) / 60
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        import yaml

        cfg = yaml.safe_load(config_path.read_text())
        stats["batch_size"] = cfg["train"]["batch_size"]
    best = run_dir / "best.pt"
    if best.is_file():
        from avloc.core.checkpoint import read_checkpoint

        stats["best_epoch"] = read_checkpoint(best)["epoch"]
    done = run_dir / "train_done.json"
    if done.is_file():
        stats.update(json.loads(done.read_text()))
    return stats


def index_quality(data: Path, ks: tuple[int, ...] = (1, 10, 100)) -> str:
    """How often the NN visual positive shares the sample's class (labels.csv), per source."""
    from avloc.core.datasets import read_labels
    from avloc.train.data import visual_positive_candidates
    from avloc.train.nn_index import load_index

    index = load_index(data / "nn.npz")
    labels = read_labels(data)
    y = np.array([labels[i] for i in index.ids])
    chance = float(np.mean([np.mean(y == c) for c in y]))
    lines = ["| NN visual positive from | " + " | ".join(f"top-{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for source in ("image", "audio", "intersection"):
        cells = []
        for k in ks:
            rows = visual_positive_candidates((index.image_nn[:, :k], index.audio_nn[:, :k]), source)
            cells.append(f"{np.mean([np.mean(y[r] == y[i]) for i, r in enumerate(rows)]):.3f}")
        lines.append(f"| {source} neighbours | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n(same-class rate; chance {chance:.3f}; {len(y)} train clips)"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "–" if value is None else str(value)


def _cell(metrics: dict[str, Any], key: str, interval: bool) -> str:
    value = metrics.get(key)
    ci = metrics.get(f"{key}_ci")
    if interval and value is not None and ci:
        return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    return _fmt(value)


def table(rows: list[tuple[str, dict[str, Any], dict[str, Any] | None]], columns: list[tuple[str, str, bool]]) -> str:
    headers = [h for _, h, _ in columns] + ["train min", "steps × batch", "samples/s", "selected epoch"]
    lines = ["| run | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    for name, m, t in rows:
        cells = [_cell(m, k, ci) for k, _, ci in columns]
        if t is None:
            cells += ["", "", "", ""]
        else:
            cells += [
                f"{t.get('minutes', 0):.1f}",
                f"{t.get('steps')} × {t.get('batch_size')}",
                _fmt(t.get("samples_per_s")),
                _fmt(t.get("best_epoch")),
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(path: Path, runs: dict[str, dict[str, Any]]) -> None:
    """Val adaptive cIoU@50 and val audio-swap against training minutes, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in runs.items():
        records = [r for r in result["train"].get("records", []) if "val/ciou_ap50" in r]
        minutes = [r.get("elapsed_s", 0) / 60 for r in records]
        axes[0].plot(minutes, [r["val/ciou_ap50"] for r in records], marker="o", label=name)
        axes[1].plot(minutes, [r.get("val/audio_swap_acc", np.nan) for r in records], marker="o", label=name)
    for ax, title in zip(axes, ("val adaptive cIoU@50", "val audio-swap accuracy")):
        ax.set_xlabel("training minutes (validation included)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def area_table(meta: dict[str, Any]) -> str:
    areas = meta.get("sounding_box_area_fraction", {})
    keys = sorted({k for v in areas.values() for k in v})
    lines = ["| split | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for split, stats in areas.items():
        lines.append(f"| {split} | " + " | ".join(_fmt(stats.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def write_report(
    path: Path,
    datas: dict[str, Path],
    results: dict[str, dict[str, Any]],
    baselines: dict[str, dict[str, dict[str, Any]]],
    out_dir: Path,
    argv: list[str],
) -> None:
    device = "CPU, no GPU" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    this_call = shlex.join([_py(), "scripts/make_results.py", *argv])
    figures = path.parent / "results"
    sections = []
    for group, title in GROUPS.items():
        runs = {r: res for r, res in results.items() if RUNS[r].group == group}
        bench = "open" if group == "open" else "bench"
        columns = OPEN_COLUMNS if group == "open" else MAIN_COLUMNS
        if bench not in datas or not runs:
            continue
        meta = json.loads((datas[bench] / "meta.json").read_text())
        rows = [(f"*{name}*", m, None) for name, m in baselines.get(bench, {}).items()]
        rows += [(f"`{r}`", res["metrics"], res["train"]) for r, res in runs.items()]
        curve = figures / f"curves_{group}.png"
        if runs:
            plot_curves(curve, runs)
        commands = "\n".join(shlex.join(train_command(r, datas[bench], out_dir / r)) for r in runs)
        counts = meta.get("counts", {})
        sections.append(f"""## {title}

Benchmark `{datas[bench]}`: `{shlex.join(data_command(bench, datas[bench]))}` — {counts.get("train")} train /
{counts.get("val")} val / {counts.get("test")} test scenes + {counts.get("silent", 0)} silent (Extended),
{len(meta.get("categories", []))} categories{
            f", unheard in train/val: {len(meta.get('unheard', []))}" if meta.get("unheard") else ""
        }. NN index: `{shlex.join(index_command(datas[bench]))}`.
Sounding-box area as a fraction of the image:

{area_table(meta)}

{index_quality(datas[bench]) if (datas[bench] / "nn.npz").is_file() else ""}

Test split (bootstrap 95 % intervals over test scenes, 2000 resamples, in brackets):

{table(rows, columns)}

{chr(10).join(f"- `{r}`: {RUNS[r].description}" for r in runs)}

Training curves (val, every epoch): ![curves]({curve.relative_to(path.parent)})

```
{commands}
```
""")
    text = f"""# Results: localization on the stamps benchmarks

Regenerated by `{this_call}` on {dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
({device}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}).
Columns: `adp` = adaptive binarization (the top-|G| pixels; `median` caps cIoU at 2 × the box's area
fraction, see docs/evaluation.md), audio-swap = fraction of (image, one object's recording) pairs whose
heatmap peak lies in that object's box, "all objects found" = scenes where that holds for every object,
Ext AP = Extended protocol with the silent scenes, R@1 A→I = retrieval by class.
Model selection on val (`train.select` of the config), never on test.

{chr(10).join(sections)}"""
    if path.is_file() and FINDINGS in path.read_text():  # keep the hand-written findings when regenerating
        old = path.read_text()
        text += "\n" + old[old.index(FINDINGS) :]
    _atomic_write(path, text)
    log.info("wrote %s", path)


# --- CLI --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default="data/stamps10k", help="closed-set benchmark folder (made when missing)")
    p.add_argument("--open", default="data/stamps_open", help="open-set benchmark folder (made when missing)")
    p.add_argument("--out-dir", default="runs/results", help="run directories")
    p.add_argument("--results", default="docs/results.md")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    p.add_argument("--reuse", action="store_true", help="reuse data, indexes, finished runs, evaluations")
    p.add_argument("--report-only", action="store_true", help="evaluate finished runs + write the report")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not sys.stderr.isatty():  # progress bars would flood a log file
        os.environ.setdefault("TQDM_DISABLE", "1")
    os.chdir(REPO)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"make_results: unknown run(s) {', '.join(unknown)}; known: {', '.join(RUNS)}")
    roots = {"bench": Path(args.bench), "open": Path(args.open)}
    needed = {RUNS[r].data for r in runs}
    datas: dict[str, Path] = {}
    for name, root in roots.items():
        if args.report_only:
            if (root / "meta.json").is_file():
                datas[name] = root
        elif name in needed:
            datas[name] = ensure_data(name, root, args.reuse)
    out_dir = Path(args.out_dir)
    results: dict[str, dict[str, Any]] = {}
    for run in runs:
        if RUNS[run].data not in datas:
            continue
        if not args.report_only:
            ensure_trained(run, datas[RUNS[run].data], out_dir, args.reuse)
        run_dir = out_dir / run
        if not (run_dir / "best.pt").is_file():
            log.warning("%s: no best.pt yet; left out of the report", run_dir)
            continue
        results[run] = {
            "metrics": ensure_evaluated(run_dir, datas[RUNS[run].data], args.reuse),
            "train": training_stats(run_dir),
        }
    if args.report_only:
        baselines = {name: baseline_metrics(root) for name, root in datas.items()}
        write_report(Path(args.results), datas, results, baselines, out_dir, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

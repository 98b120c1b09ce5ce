"""bench/gpu/run.sh: the summary it writes, and its CPU dry run (``--device cpu --quick``) end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "gpu" / "run.sh"


def _helpers():
    spec = importlib.util.spec_from_file_location("gpu_bench_helpers", ROOT / "bench" / "gpu" / "helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _engine_row(backend: str, graph: str, batch: int, median: float) -> dict:
    return {
        "backend": backend,
        "precision": "fp16" if "fp16" in backend else "fp32",
        "graph": graph,
        "batch": batch,
        "median_ms": median,
        "p99_ms": median * 1.5,
        "per_item_ms": median / batch,
        "speedup_vs_eager_torch": 2.0 / median,
    }


def test_summary_tables_from_reports(tmp_path):
    engine = {
        "method": "ssl_align",
        "device": {"kind": "cuda", "name": "NVIDIA H200"},
        "results": [_engine_row("torch", "visual", 4, 2.0), _engine_row("tensorrt:fp16", "visual", 4, 0.5)],
        "startup": {"torch": {"load_s": 1.0, "warmup_s": 0.25}},
        "errors": {"torch:compile": "triton missing"},
    }
    (tmp_path / "engine_ssl_align.json").write_text(json.dumps(engine))
    pipeline = {
        "pipeline": {
            "backend": "torch",
            "streams": 16,
            "heatmap_fps": 479.5,
            "e2e_ms": {"p50": 4.1, "p99": 9.7},
            "stages_ms": {"visual_engine": {"p50": 1.2, "p99": 2.5}},
            "drops": 3,
        }
    }
    (tmp_path / "pipeline_16.json").write_text(json.dumps(pipeline))
    (tmp_path / "doctor.txt").write_text("CUDA        available\n")
    (tmp_path / "steps.txt").write_text("doctor 0\nengine_acl 124\n")
    (tmp_path / "args.txt").write_text("--quick\n")
    md = _helpers().summarize(tmp_path).read_text()
    assert "Device: NVIDIA H200 (cuda). Re-create: `bench/gpu/run.sh --quick`" in md
    assert "| ssl_align | torch | fp32 | visual | 4 | 2.000 | 3.000 | 0.500 | 1.00x | 0.2 |" in md
    assert "| ssl_align | tensorrt:fp16 | fp16 | visual | 4 | 0.500 | 0.750 | 0.125 | 4.00x | nan |" in md
    assert "| pipeline_16 | torch | 16 | 479.5 | 4.1 | 9.7 | 1.2 | 2.5 | 3 |" in md
    assert "`torch:compile` skipped: triton missing" in md
    assert "- engine_acl: 124" in md and "- doctor" not in md
    assert "CUDA        available" in md
    assert (tmp_path / "summary.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "python", "message"),
    [
        (["--device"], None, "--device needs a value"),
        (["--budget", "abc"], None, "--budget abc: expected a whole number of seconds > 0"),
        (["--device", "gpu"], None, "--device gpu: expected cpu, cuda or cuda:N"),
        (["--steps", "engine_ssl_align,pipline_1"], None, "--steps: unknown step 'pipline_1'; known: install,"),
        (["--steps", "*"], None, "--steps: unknown step '*'"),
        (["--quick", "--steps", "pipeline_16"], None, "unknown step 'pipeline_16'; known: .*pipeline_2"),
        (["--steps", ","], None, "--steps: no step named"),
        (["--frobnicate"], None, "unknown argument --frobnicate"),
        ([], "/nonexistent/python", "PYTHON=/nonexistent/python: not an executable interpreter"),
    ],
)
def test_run_sh_refuses_bad_arguments_before_doing_anything(tmp_path, args, python, message):
    """A typo must not cost a GPU session: one line, exit 2, nothing created (a misspelt --steps used to run
    nothing and exit 0; --budget abc and --device gpu ran every step to its failure)."""
    import re

    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": python or sys.executable}
    proc = subprocess.run(
        ["bash", str(RUN), *args, "--out", str(out)], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_run_sh_cpu_dry_run(tmp_path):
    """The whole script on CPU with a tiny model: every step but ACL's runs and lands in one folder.

    Covers: argument handling, $PYTHON (install skipped), doctor beside clip, the SSL-Align export, `bench engine`
    on both CPU backends at the batched size, both pipeline steps (1 and 2 replayed streams, with the eager
    baseline), the summary, and the final table. Not ACL: its export, both backends and a replay through the
    pipeline are tests/test_acl_export.py's, and its ~minute of CPU here added nothing run.sh-specific (`--steps`
    without engine_acl: the models step skips the ACL export, which this also checks). The offline install and
    the checkout shim: test_run_sh_on_an_offline_box_whose_python3_is_a_venv."""
    out = tmp_path / "gpu-bench"
    env = {**os.environ, "PYTHON": sys.executable, "AVLOC_BENCH_BUDGET": "1300"}
    steps_asked = "install,doctor,clip,models,engine_ssl_align,pipeline_1,pipeline_2"
    proc = subprocess.run(
        [str(RUN), "--device", "cpu", "--quick", "--steps", steps_asked, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1450,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = _helpers().read_steps(out)
    ran = {"doctor", "clip", "models", "engine_ssl_align", "pipeline_1", "pipeline_2"}
    assert {name for name, (status, _) in steps.items() if status == "0"} >= ran
    assert steps["install"] == ("skipped", f"PYTHON={sys.executable} given: no venv, nothing installed")
    assert "engine_acl" not in steps
    assert "not asked for" in json.loads((out / "models" / "models.json").read_text())["acl"]["skipped"]
    assert all(status in ("0", "skipped") for status, _ in steps.values()), steps
    # the last thing printed: what ran, what was skipped and why
    assert "steps:" in proc.stdout and "install              skipped" in proc.stdout
    assert "backends:" in (out / "doctor.txt").read_text()
    report = json.loads((out / "engine_ssl_align.json").read_text())
    # --quick measures one batch size (2: the batched path), both graphs, on both CPU backends
    assert {(r["backend"], r["graph"], r["batch"]) for r in report["results"]} == {
        (b, g, 2) for b in ("onnxruntime", "torch") for g in ("audio", "visual")
    }
    assert set(report["startup"]) == {"onnxruntime", "torch"}
    for streams in (1, 2):
        pipe = json.loads((out / f"pipeline_{streams}.json").read_text())["pipeline"]
        assert pipe["streams"] == streams and pipe["heatmap_fps"] > 0
    md = (out / "summary.md").read_text()
    assert "| ssl_align | onnxruntime | fp32 | visual | 2 |" in md and "| pipeline_2 | torch | 2 |" in md
    assert (out / "summary.png").is_file() and (out / "engine_ssl_align.png").is_file()


def test_bench_engine_writes_each_backend_as_it_finishes(tiny_engine, tmp_path, monkeypatch):
    """A step killed by its time limit keeps what was measured: the JSON holds the baseline (measured first)
    before the next backend even loads, and every row names its precision."""
    from avloc.engines import bench
    from avloc.engines.base import register_backend

    out = tmp_path / "engine.json"
    seen: list[set[str]] = []

    def killed(*args, **kwargs):  # what a timeout during the next backend's build looks like to the file
        seen.append({r["backend"] for r in json.loads(out.read_text())["results"]})
        raise SystemExit(124)

    register_backend("killed", killed)
    monkeypatch.setitem(bench._OPTIONS, "killed", {})
    args = bench.argparse.Namespace(
        engine=tiny_engine,
        backends="onnxruntime,killed",
        batch_sizes=[1],
        threads=1,
        iters=2,
        warmup=1,
        device="cpu",
        out=out,
    )
    with pytest.raises(SystemExit):
        bench.main(args)
    assert seen == [{"torch", "onnxruntime"}]  # baseline and onnxruntime rows were on disk before the kill
    report = json.loads(out.read_text())
    assert {r["precision"] for r in report["results"]} == {"fp32"}
    assert report["startup"]["onnxruntime"]["providers"] == ["CPUExecutionProvider"]
    assert [r["backend"] for r in report["results"]][0] == "torch"  # the baseline first
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("spec", "first", "second"),
    [
        ("tensorrt:fp16+tf32", "fp16", "tf32"),
        ("tensorrt:fp32+fp16", "fp32", "fp16"),
        ("torch:eager+compile", "eager", "compile"),
    ],
)
def test_backend_specs_with_conflicting_options_are_refused(spec, first, second):
    """tensorrt:fp16+tf32 used to merge into {fp16: False, tf32: True}: a tf32 run reported under an fp16 name."""
    import re

    from avloc.core.errors import UserError
    from avloc.engines.bench import parse_backend_spec

    with pytest.raises(UserError, match=re.escape(f"{spec!r}: options {first!r} and {second!r} conflict; choose one")):
        parse_backend_spec(spec)
    assert parse_backend_spec("tensorrt:tf32") == ("tensorrt", {"fp16": False, "tf32": True})
    assert parse_backend_spec("torch:cuda_graphs+fp16") == ("torch", {"mode": "cuda_graphs", "fp16": True})


def test_bench_engine_out_as_a_directory_is_refused_before_timing(tiny_engine, tmp_path, monkeypatch):
    """--out DIR used to fail in the first write after the baseline (minutes in, on a GPU): an IsADirectoryError
    traceback and a temp file left behind."""
    from avloc.core.errors import UserError
    from avloc.engines import bench

    monkeypatch.setattr(bench, "bench_engine", lambda *a, **k: pytest.fail("timed before checking --out"))
    args = bench.argparse.Namespace(
        engine=tiny_engine, backends="onnxruntime", batch_sizes=[1], threads=1, iters=2, warmup=1, device="cpu"
    )
    with pytest.raises(UserError, match="is a directory; give the JSON file to write"):
        bench.main(bench.argparse.Namespace(**vars(args), out=tmp_path))
    target = tmp_path / "out.json"
    target.mkdir()
    with pytest.raises(OSError):  # a failed write (here: onto a directory) leaves no temp file
        bench.write_json(target, {"results": []})
    assert not list(tmp_path.glob(".out.json.*.tmp"))


def _venv_python_without_avloc(where: Path) -> Path:
    """An interpreter like the GPU image's python3 (/opt/torch/.venv/bin/python3): itself a venv, whose
    site-packages hold torch and the rest, but neither avloc nor setuptools (so avloc cannot be installed
    offline and run.sh must run it from the checkout). Its site-packages are links to this one's."""
    import sysconfig
    import venv

    venv.create(where, with_pip=False)
    mine = Path(sysconfig.get_path("purelib"))
    theirs = Path(
        subprocess.check_output(
            [str(where / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    missing = (
        "avloc",
        "__editable__",
        "_avloc",
        "setuptools",
        "_distutils_hack",
        "distutils-precedence",
        "pkg_resources",
    )
    for sp in dict.fromkeys(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()):
        for entry in Path(sp).iterdir():
            if not entry.name.startswith(missing) and not entry.name.endswith(".pth") and entry.name != "__pycache__":
                target = theirs / entry.name
                if not target.exists():
                    target.symlink_to(entry)
    assert mine.is_dir()
    return where / "bin" / "python"


def test_run_sh_on_an_offline_box_whose_python3_is_a_venv(tmp_path):
    """The lent GPU machine's first run: no index, python3 is a venv holding torch, avloc not installed and not
    installable. install.sh used to make .venv-gpu with --system-site-packages, which reaches the *base*
    interpreter's packages, not the venv's: no torch, and every step failed. Now the venv sees its parent's
    packages, the unreachable index is noticed at once, and the steps run avloc from the checkout (the shim)."""
    parent = _venv_python_without_avloc(tmp_path / "parent")
    probe = subprocess.run([str(parent), "-c", "import avloc.engines"], capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode != 0  # really without avloc
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH", "VIRTUAL_ENV", "AVLOC_WHEELS")} | {
        "AVLOC_BASE_PYTHON": str(parent),
        "AVLOC_BENCH_VENV": str(tmp_path / "venv-gpu"),
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple/",  # nothing listens on the discard port: offline
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_FIND_LINKS": "",
    }
    proc = subprocess.run(
        [
            "bash",
            str(RUN),
            "--device",
            "cpu",
            "--quick",
            "--steps",
            "install,doctor",
            "--out",
            str(out),
            "--archive",
            str(tmp_path / "bench.tgz"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = _helpers().read_steps(out)
    assert steps["install"][0] == "0" and steps["doctor"][0] == "0", steps
    assert steps["doctor"][1].endswith("s")  # how long the step took: "12s"
    install = (out / "install.log").read_text()
    assert "the package index is unreachable" in install and "(python3 is a venv)" in install
    assert "run.sh runs it from the checkout" in install and "install: torch 2." in install
    assert (out / ".avloc-shim" / "avloc" / "engines").resolve() == ROOT / "engines"
    assert "backends:" in (out / "doctor.txt").read_text()
    import tarfile

    with tarfile.open(tmp_path / "bench.tgz") as tar:
        names = set(tar.getnames())
    assert {"bench/steps.txt", "bench/doctor.txt", "bench/install.log"} <= names
    assert not any(".avloc-shim" in n for n in names)

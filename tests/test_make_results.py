"""scripts/make_results.py end to end on a tiny synthetic benchmark: train, evaluate, baselines, report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from avloc.core.config import load_config, merge
from avloc.core.datasets import read_split

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("make_results", REPO / "scripts" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_results"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_make_results_trains_evaluates_and_reports(tmp_path, monkeypatch):
    from avloc.core.data.synth import make_synth

    data = make_synth(
        tmp_path / "bench", seed=2, n_train=24, n_val=8, n_test=10, silent_frac=0.2, image_size=48, clip_seconds=0.5
    )
    ids = read_split(data, "train")
    nn = np.stack([(np.arange(len(ids)) + d) % len(ids) for d in (1, 2)], axis=1)
    np.savez(data / "nn.npz", ids=np.array(ids), image_nn=nn, audio_nn=nn, meta=np.array("{}"))
    config = merge(
        load_config(REPO / "configs" / "cpu.yaml"),
        {
            "model": {"width": 4},
            "image": {"size": 32},
            "frontend": {"window_seconds": 0.2},
            "train": {"epochs": 1, "batch_size": 8, "budget_minutes": None, "false_negative_k": 2, "nn_k": 2},
        },
    )
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    mr = _script()
    monkeypatch.setattr(mr, "RUNS", {"tiny": mr.Run(str(tmp_path / "tiny.yaml"), ["train.seed=1"], "bench", "tiny")})
    common = [
        "--bench",
        str(data),
        "--open",
        str(tmp_path / "absent"),
        "--out-dir",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "docs" / "results.md"),
        "--reuse",
    ]
    assert mr.main([*common, "--runs", "tiny"]) == 0
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics_test.json").read_text())
    lo, hi = metrics["adaptive/ciou_ap50_ci"]
    assert lo <= metrics["adaptive/ciou_ap50"] <= hi
    assert mr.main([*common, "--report-only"]) == 0
    report = (tmp_path / "docs" / "results.md").read_text()
    for row in ("*random heatmap*", "*centre prior*", "*objectness (audio-blind)*", "`tiny`"):
        assert row in report
    assert f"{metrics['adaptive/ciou_ap50']:.3f} [{lo:.2f}, {hi:.2f}]" in report
    assert (tmp_path / "docs" / "results" / "curves_recipe.png").stat().st_size > 1000

"""``avloc info``: checkpoints (training record), engines (checksums recomputed, gate, source run), Triton
repositories, and one-line errors for anything else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from avloc import cli
from avloc.core.audio import FrontEndConfig
from avloc.core.checkpoint import ImageConfig, save_checkpoint
from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
from avloc.engines.export import export_engine

TRAINING = {"epoch": 3, "step": 120, "config": {"optim": {"lr": 0.0005}}, "val": {"ciou_ap50": 0.3125, "auc": 0.41}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("info")
    ckpt = save_checkpoint(
        root / "best.pt",
        SSLAlign(SSLAlignConfig(width=8)),
        method="ssl_align",
        model_config={"width": 8},
        frontend=FrontEndConfig(kind="linear", window_seconds=1.0),
        image=ImageConfig(size=64),
        extra=TRAINING,
    )
    return ckpt, export_engine(ckpt, root / "engine")


def _info(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    status = cli.main(["info", str(path), *extra])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_checkpoint_and_engine(trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, engine = trained
    status, out = _info(ckpt, capsys)
    assert status == 0
    assert "method        ssl_align (width=8)" in out
    assert "linear front-end, 1 s at 16000 Hz (anchor end) -> spectrogram 1x257x98" in out
    assert "training      epoch 3, step 120" in out and "val           ciou_ap50 0.3125, auc 0.41" in out
    assert 'config        optim: {"lr": 0.0005}' in out and "gate          none" in out

    status, out = _info(engine, capsys)
    assert status == 0 and f"exported from {ckpt}" in out and "ciou_ap50 0.3125" in out
    assert "graph audio   audio.onnx" in out and out.count(" ok\n") == 3
    assert "yes onnxruntime                --device cpu" in out

    # a gate and a corrupted graph (checksums are recomputed, not read back): exit 1
    bad = tmp_path / "engine"
    shutil.copytree(engine, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["gate"] = {"threshold": 0.25, "statistic": "confidence", "val": {"f1": 0.8}}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with open(bad / "visual.onnx", "ab") as f:
        f.write(b"\0")
    status, out = _info(bad, capsys)
    assert status == 1 and "visual.onnx: sha256" in out and "MISMATCH" in out
    assert "not_visible when confidence < 0.25 (val: f1 0.8)" in out
    status, out = _info(bad, capsys, "--json")
    data = json.loads(out)
    assert data["graphs"]["visual"]["checksum"] == "MISMATCH" and data["graphs"]["audio"]["checksum"] == "ok"
    assert data["preprocessing"]["audio"]["window_samples"] == 16000 and data["training"]["step"] == 120
    shutil.copy(engine / "visual.onnx", bad / "visual.onnx")
    (bad / "audio.onnx").unlink()  # a graph gone is as broken as a changed one
    status, out = _info(bad, capsys)
    assert status == 1 and "audio.onnx: sha256" in out and "missing" in out


def test_triton_repository(trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from avloc.engines.triton_export import export_triton

    repo = export_triton(trained[1], tmp_path / "repo")
    status, out = _info(repo, capsys)
    assert status == 0 and "triton repository" in out
    assert "repository    valid; models: avloc_audio, avloc_visual" in out and "--backend triton" in out
    # a model directory deleted: what is left validates, but the repository cannot serve the engine
    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    shutil.rmtree(broken / "avloc_audio")
    status, out = _info(broken, capsys)
    assert status == 1 and "INVALID: " in out and "avloc_audio named in avloc_engine.json have no model" in out
    (broken / "avloc_engine.json").write_text("{garbage")
    status, out = _info(broken, capsys)
    assert status == 2 and "avloc_engine.json: corrupt Triton repository manifest" in out
    assert len(out.strip().splitlines()) == 1


def test_other_paths_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.pt").write_bytes(b"junk")
    for path, message in [
        (tmp_path / "missing", "missing: not found"),
        (tmp_path, "not a checkpoint (.pt file), an engine folder (manifest.json) or a Triton repository"),
        (tmp_path / "x.pt", "x.pt: not a readable checkpoint"),
    ]:
        status, out = _info(path, capsys)
        assert status == 2 and message in out and len(out.strip().splitlines()) == 1

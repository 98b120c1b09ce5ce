"""int8 where it pays (issue 24): export makes the int8 graphs when given calibration data, and the CPU
worker uses the ones it kept unless told ``--engine-option precision=fp32`` (docs/performance.md, int8)."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from avloc.engines import export as export_mod
from avloc.stream.serve.inference import default_precision


def test_worker_default_precision_follows_the_engine(tiny_engine, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    assert default_precision(engine) == "fp32"  # no int8 variant: fp32
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["graphs"]["audio"]["variants"] = {"int8": {"file": "audio.int8.onnx"}}  # kept for audio only
    (engine / "manifest.json").write_text(json.dumps(manifest))
    assert default_precision(engine) == "int8"
    assert default_precision(tmp_path / "missing") == "fp32"  # the loader reports a bad engine itself


@pytest.mark.parametrize(
    ("argv", "int8"),
    [
        (["--calibration", "DATA"], True),
        (["--calibration", "DATA", "--no-int8"], False),
        ([], False),
        (["--int8"], True),  # export_engine then asks for --calibration, as before
    ],
)
def test_export_makes_int8_when_given_calibration_data(monkeypatch, tmp_path, argv, int8):
    seen: dict = {}

    def fake_export(checkpoint, out, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)  # stop before the report (no engine written)

    monkeypatch.setattr(export_mod, "export_engine", fake_export)
    parser = argparse.ArgumentParser()
    export_mod.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", "ckpt.pt", "--out", str(tmp_path / "e"), *argv])
    with pytest.raises(SystemExit):
        export_mod.main(args)
    assert seen["int8"] is int8

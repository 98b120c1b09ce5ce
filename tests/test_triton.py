"""Triton: the model-repository export (configs parse, shapes match the ONNX graphs) and the ``triton`` backend
against a real ``tritonserver`` (PyTriton's bundled one; skipped without bench/triton/setup.sh)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from avloc.cli import main as cli_main
from avloc.core.errors import UserError
from avloc.core.media import iter_video
from avloc.engines.base import known_backends, load_engine, read_manifest
from avloc.engines.triton_export import (
    REPO_MANIFEST,
    STUB_SITE,
    TritonOptions,
    bundled_tritonserver,
    export_triton,
    free_port,
    local_tritonserver,
    parse_config,
    parse_pbtxt,
    validate_repository,
)
from avloc.stream.run.replay_cli import run_replay
from avloc.stream.run.report import read_latency_log

HAVE_CLIENT = importlib.util.find_spec("tritonclient") is not None and importlib.util.find_spec("rapidjson") is not None


@pytest.fixture()
def engine(engine_and_video: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the session's tiny engine (tests add plans / change the manifest)."""
    return Path(shutil.copytree(engine_and_video[0], tmp_path / "engine"))


def test_repository_configs_parse_and_match_the_onnx_graphs(engine: Path, tmp_path: Path) -> None:
    # A plan as the tensorrt backend names it (profile 1-4-8): it becomes a tensorrt_plan model capped at batch 8.
    (engine / "visual.nvidia-h200.trt10.13.0.35.fp16.b1-4-8.0123456789abcdef.plan").write_bytes(b"plan")
    repo = export_triton(engine, tmp_path / "repo", TritonOptions(max_batch=16, instances=2, kind="cpu"))
    assert validate_repository(repo) == ["avloc_audio", "avloc_visual", "avloc_visual_trt"]
    manifest = read_manifest(engine)
    visual = parse_config(repo / "avloc_visual" / "config.pbtxt")
    assert visual["backend"] == "onnxruntime" and int(visual["max_batch_size"]) == 16
    assert visual["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert int(visual["dynamic_batching"]["max_queue_delay_microseconds"]) == 1000
    assert visual["parameters"]["avloc_sha256"]["string_value"] == manifest["graphs"]["visual"]["sha256"]
    image = visual["input"][0]
    assert image["name"] == "image" and [int(d) for d in image["dims"]] == list(
        manifest["graphs"]["visual"]["inputs"][0]["shape"][1:]
    )
    plan = parse_config(repo / "avloc_visual_trt" / "config.pbtxt")
    assert plan["platform"] == "tensorrt_plan" and int(plan["max_batch_size"]) == 8
    assert (repo / "avloc_visual_trt" / "1" / "model.plan").read_bytes() == b"plan"
    # The manifest travels with the repository: preprocessing, shapes, and which models serve what.
    copied = json.loads((repo / REPO_MANIFEST).read_text())
    assert copied["image"] == manifest["image"] and copied["frontend"] == manifest["frontend"]
    assert copied["triton"]["models"]["visual_trt"]["tensorrt"] == "10.13.0.35"
    # The strict fallback parser reads every written config like Triton's own ModelConfig does.
    for config in repo.glob("*/config.pbtxt"):
        ours = parse_pbtxt(config.read_text())
        assert (
            ours["name"] == config.parent.name and ours["input"][0]["name"] == parse_config(config)["input"][0]["name"]
        )


def test_validation_rejects_configs_that_do_not_match(engine: Path, tmp_path: Path) -> None:
    repo = export_triton(engine, tmp_path / "repo", TritonOptions(max_batch=4))
    config = repo / "avloc_visual" / "config.pbtxt"
    text = config.read_text()
    config.write_text(text.replace("dims: [ 4, 4 ]", "dims: [ 5, 4 ]"))
    with pytest.raises(UserError, match="heatmap dims \\[5, 4\\]"):
        validate_repository(repo)
    config.write_text(text.replace("TYPE_FP32", "TYPE_FP16", 1))
    with pytest.raises(UserError, match="image is TYPE_FP16"):
        validate_repository(repo)
    config.write_text(text.replace("max_batch_size: 4", "max_batch_size: 4\nmax_batch_sise: 4"))
    with pytest.raises(UserError, match="not a valid Triton model config"):
        validate_repository(repo)
    with pytest.raises(ValueError, match="unknown field 'max_batch_sise'"):
        parse_pbtxt(config.read_text())
    with pytest.raises(ValueError, match="more than once"):
        parse_pbtxt('name: "a" name: "b"')
    with pytest.raises(UserError, match="already exists"):
        export_triton(engine, repo)


def test_cli_writes_a_repository_from_an_engine(engine: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    repo = tmp_path / "repo"
    assert cli_main(["export", "--engine", str(engine), "--triton", str(repo), "--triton-backend", "python"]) == 0
    assert "avloc_audio, avloc_visual" in capsys.readouterr().out
    assert (repo / "avloc_visual" / "1" / "model.py").is_file() and (
        repo / "avloc_visual" / "1" / "model.onnx"
    ).is_file()
    assert parse_config(repo / "avloc_audio" / "config.pbtxt")["backend"] == "python"
    assert cli_main(["export", "--engine", str(engine)]) == 2
    assert "needs --triton REPO" in capsys.readouterr().err
    assert (
        cli_main(["export", "--engine", str(engine), "--triton", str(tmp_path / "r2"), "--triton-max-batch", "0"]) == 2
    )


@pytest.mark.skipif(not HAVE_CLIENT, reason="needs tritonclient[grpc] (bench/triton/setup.sh)")
def test_backend_is_registered_and_says_when_no_server_listens(engine: Path) -> None:
    assert "triton" in known_backends()
    with pytest.raises(UserError, match="no server at 127.0.0.1"):
        load_engine(engine, "triton", url=f"127.0.0.1:{free_port()}", timeout=2.0)


@pytest.mark.skipif(
    not HAVE_CLIENT or bundled_tritonserver() is None or not (STUB_SITE / "numpy").is_dir(),
    reason="needs tritonclient and PyTriton's tritonserver (bench/triton/setup.sh)",
)
def test_engine_through_a_real_tritonserver_matches_onnxruntime(
    engine: Path, engine_and_video: tuple[Path, Path], tmp_path: Path
) -> None:
    repo = export_triton(engine, tmp_path / "repo", TritonOptions(backend="python", kind="cpu", max_batch=4, threads=1))
    rng = np.random.default_rng(3)
    manifest = read_manifest(engine)
    spec = rng.standard_normal((6, *manifest["graphs"]["audio"]["inputs"][0]["shape"][1:]), dtype=np.float32)
    image = rng.standard_normal((6, *manifest["graphs"]["visual"]["inputs"][0]["shape"][1:]), dtype=np.float32)
    with load_engine(engine, "onnxruntime", threads=1) as ref:
        emb0 = ref.embed_audio(spec)
        heat0, conf0 = ref.localize(image, emb0)
    with local_tritonserver(repo, log_path=tmp_path / "server.log") as url:
        for shared_memory in (False, True):
            with load_engine(engine, "triton", url=url, shared_memory=shared_memory) as remote:
                assert remote.max_batch == 4
                emb = remote.embed_audio(spec)  # 6 > max_batch 4: split in two requests
                heat, conf = remote.localize(image, emb)
                np.testing.assert_allclose(emb, emb0, atol=1e-5)
                np.testing.assert_allclose(heat, heat0, atol=1e-5)
                assert conf.shape == conf0.shape == (6,)
                np.testing.assert_allclose(conf, conf0, atol=1e-5)
                one_heat, one_conf = remote.localize(image[2:3], emb0[2:3])
                np.testing.assert_allclose(one_heat[0], heat0[2], atol=1e-5)

        # Concurrent single-frame clients: the server's dynamic batcher runs fewer batches than requests.
        import tritonclient.grpc as grpcclient

        def stream(k: int, out: list) -> None:
            with load_engine(engine, "triton", url=url) as remote:
                out.extend(remote.localize(image[k : k + 1], emb0[k : k + 1])[0][0] for _ in range(6))

        results: list[list] = [[] for _ in range(4)]
        threads = [threading.Thread(target=stream, args=(k, results[k])) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for k in range(4):
            assert len(results[k]) == 6 and np.allclose(results[k][-1], heat0[k], atol=1e-5)
        client = grpcclient.InferenceServerClient(url)
        stats = client.get_inference_statistics("avloc_visual", as_json=True)["model_stats"][0]
        client.close()
        assert int(stats["inference_count"]) >= 24 + 6 + 1
        # While one batch runs the others queue, so executions < inferences (a batch of several requests).
        assert int(stats["execution_count"]) < int(stats["inference_count"])

        # The streaming pipeline with the engine served by Triton: replay -> inference (triton) -> display.
        video = engine_and_video[1]
        summary = run_replay(
            video,
            engine,
            backend="triton",
            run_dir=tmp_path / "run",
            extra_inference_args=["--triton-url", url],
            timeout_s=60,
        )
        assert summary["reason"] == "ended", summary
        computed = [r for r in read_latency_log(Path(summary["latency_log"])) if not r["notice"]]
        assert len(computed) >= 0.5 * sum(1 for _ in iter_video(video)), len(computed)

        # A manifest whose graph checksum differs from the served one is refused.
        manifest["graphs"]["visual"]["sha256"] = "0" * 64
        (engine / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(UserError, match="serves graph sha256"):
            load_engine(engine, "triton", url=url)

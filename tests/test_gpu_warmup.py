"""Warm-up covers what a GPU worker will run, before it reports ready (no GPU needed).

:class:`CudagraphTreesStandIn` replaces the compiled functions of a CPU torch engine and follows CUDA graph
trees' rule for ``torch.compile(mode="reduce-overhead")``: per input shape, the first call runs eagerly
(warm-up), the second records the graph, later calls replay it. A recording after ``ready`` is a tens-of-ms
latency spike mid-stream on a real GPU."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from avloc.core.errors import UserError
from avloc.engines.base import load_engine
from avloc.engines.torch_backend import COMPILE_CALLS
from avloc.stream.serve.inference_worker import InferenceWorker

RECORDED_ON_CALL = 2  # CUDA graph trees: warm-up on the 1st call of a shape, record on the 2nd


class CudagraphTreesStandIn:
    def __init__(self, module) -> None:
        self.module = module
        self.calls: Counter[int] = Counter()

    def __call__(self, *inputs):
        self.calls[int(inputs[0].shape[0])] += 1
        return self.module(*inputs)

    def recorded(self) -> set[int]:
        return {batch for batch, n in self.calls.items() if n >= RECORDED_ON_CALL}


def _compile_mode_on_device(engine) -> tuple[CudagraphTreesStandIn, CudagraphTreesStandIn]:
    """The CPU torch engine, set up as compile mode on a device: stand-ins instead of torch.compile (a CPU
    inductor compile per size would take minutes here), ``device`` as the worker sees a GPU engine."""
    engine.mode = "compile"
    engine.device = "cuda:0"
    engine._run_audio = audio = CudagraphTreesStandIn(engine._audio)
    engine._run_visual = visual = CudagraphTreesStandIn(engine._visual)
    return audio, visual


def test_worker_warm_up_records_every_batch_size_before_ready(tiny_engine):
    engine = load_engine(tiny_engine, "torch", threads=1, max_batch=3)
    audio, visual = _compile_mode_on_device(engine)
    worker = InferenceWorker(
        engine,
        frame_endpoints=[],
        audio_endpoints=[],
        heatmap_endpoint="inproc://warm",
        heartbeat_endpoint=None,
        max_batch=3,
    )
    worker.warm_up()
    assert visual.recorded() == {1, 2, 3}  # every batch the worker may form, recorded before ready
    assert set(visual.calls) == {1, 2, 3} and min(visual.calls.values()) == COMPILE_CALLS
    # the worker embeds one audio window at a time: only batch 1 is warmed (and recorded)
    assert audio.recorded() == {1} and set(audio.calls) == {1}
    assert engine.warmed_batches == [1, 2, 3] and engine.warmed_audio_batches == [1]
    # the first real frames replay: no new recording
    before = dict(visual.calls)
    spec = np.zeros((1, *engine.spec_shape), np.float32)
    emb = engine.embed_audio(spec)
    engine.localize(np.zeros((2, *engine.image_shape), np.float32), np.repeat(emb, 2, axis=0))
    assert visual.calls[2] == before[2] + 1 > RECORDED_ON_CALL


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_engine_warmup_calls_per_mode(tiny_engine, mode):
    """bench engine warms both graphs at every measured size; only compile needs repeated calls."""
    engine = load_engine(tiny_engine, "torch", threads=1, max_batch=2)
    audio, visual = _compile_mode_on_device(engine)
    engine.mode = mode
    engine.warmup([1, 2])
    expected = COMPILE_CALLS if mode == "compile" else 1
    assert dict(visual.calls) == dict(audio.calls) == {1: expected, 2: expected}


def test_fp32_means_ieee_fp32(tiny_engine):
    """cuDNN allows TF32 by default: an "fp32" CUDA engine must switch it off, and "tf32" is named as such."""
    import torch

    from avloc.core.errors import UserError
    from avloc.engines.torch_backend import set_tf32

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = True  # torch's default
        set_tf32(False)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        set_tf32(True)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert load_engine(tiny_engine, "torch", threads=1).precision == "fp32"
    with pytest.raises(UserError, match="tf32 needs --device cuda"):
        load_engine(tiny_engine, "torch", tf32=True)


@pytest.mark.parametrize("device", ["gpu", "cuda0", "CUDA"])
def test_torch_engine_refuses_a_bad_device_in_one_line(tiny_engine, device):
    """`avloc bench engine --device gpu` used to end in torch.device's RuntimeError traceback (the eager baseline
    always runs, so every bench with a typo'd device crashed)."""
    with pytest.raises(UserError, match=f"device '{device}': expected cpu, cuda or cuda:N"):
        load_engine(tiny_engine, "torch", device=device)

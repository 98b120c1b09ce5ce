"""CPU stand-ins for GPU-only lines that no other CPU test executes, each failing the way the device would.

- CUDA graphs (:class:`avloc.engines.torch_backend.CudaGraphRunner`): :class:`FakeCUDAGraph` records the aten ops
  run under ``torch.cuda.graph`` and replays them on the SAME tensors, as a real graph replays its kernels on the
  same addresses: static inputs that are not refilled, or outputs handed out without a copy, give wrong or
  overwritten results here as on the GPU.
- Pinned uploads (:func:`avloc.engines.preprocess.upload`, :class:`~avloc.engines.preprocess.DevicePreprocessor`):
  every host-to-"device" copy is logged with whether its source is pinned and whether it is asynchronous, and an
  asynchronous copy stays pending (its source still being read by the copy engine) until an event recorded after
  it is synchronized. A pageable asynchronous copy (a hidden host sync on CUDA) or a pinned staging buffer handed
  out for refilling while its copy is pending (a data race on CUDA) fails the test.
- TensorRT inputs made on the caller's stream: recorded as used on the engine's stream (tests/fake_cuda.py's
  tensor, which reports ``cuda:0``).
- The torch backend's fp16 autocast, on the CPU's autocast with the real graph modules.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from avloc.engines import preprocess
from avloc.engines.base import load_engine, preprocess_frames
from avloc.engines.torch_backend import CudaGraphRunner

# ---------------------------------------------------------------------------------------------- CUDA graphs


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class FakeCUDAGraph:
    """``torch.cuda.CUDAGraph`` on the CPU: replay re-runs the captured ops on the captured tensors and writes each
    result into the tensor the capture produced (fixed addresses, as a graph's kernels)."""

    def __init__(self) -> None:
        self.ops: list[tuple[Any, tuple, dict, Any]] = []
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        with torch.inference_mode():
            for func, args, kwargs, out in self.ops:
                new = func(*args, **kwargs)
                for old, fresh in zip(tree_leaves(out), tree_leaves(new), strict=True):
                    if isinstance(old, torch.Tensor) and old is not fresh:
                        old.copy_(fresh)


class _Stream:
    cuda_stream = 0

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.fixture()
def fake_cuda_graphs(monkeypatch):
    captured: list[FakeCUDAGraph] = []

    @contextlib.contextmanager
    def graph(g: FakeCUDAGraph, pool: Any = None, stream: Any = None):
        with _Recorder() as rec:
            yield
        g.ops = rec.ops
        captured.append(g)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    return captured


def _cuda_graphs_engine(tiny_engine):
    """The CPU torch engine in cuda_graphs mode: the real runner over the fake graph API."""
    engine = load_engine(tiny_engine, "torch", threads=1, max_batch=3)
    engine.mode = "cuda_graphs"
    engine._run_audio = CudaGraphRunner(engine._audio, engine.torch_device, engine._autocast, warmup=1)
    engine._run_visual = CudaGraphRunner(engine._visual, engine.torch_device, engine._autocast, warmup=1)
    return engine


def test_cuda_graph_replays_give_each_call_its_own_results(tiny_engine, fake_cuda_graphs, caplog):
    eager = load_engine(tiny_engine, "torch", threads=1)
    engine = _cuda_graphs_engine(tiny_engine)
    engine.warmup([1, 2], audio_batch_sizes=[1])
    assert len(fake_cuda_graphs) == 3  # visual 1 and 2, audio 1: all captured before the first frame
    rng = np.random.default_rng(0)
    spec = rng.standard_normal((1, *engine.spec_shape), dtype=np.float32)
    np.testing.assert_allclose(engine.embed_audio(spec), eager.embed_audio(spec), rtol=1e-5, atol=1e-5)
    images = [torch.from_numpy(rng.standard_normal((2, *engine.image_shape), dtype=np.float32)) for _ in range(2)]
    emb = torch.from_numpy(np.repeat(eager.embed_audio(spec), 2, axis=0))
    # device tensors in -> device tensors out; the second replay must not change what the first returned
    first = engine.localize(images[0], emb)
    kept = [t.clone() for t in first]
    second = engine.localize(images[1], emb)
    for got, ref in zip(first, kept, strict=True):
        torch.testing.assert_close(got, ref)
    for got, image in zip((first, second), images, strict=True):
        want = eager.localize(image.numpy(), emb.numpy())
        np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1].numpy(), want[1], rtol=1e-5, atol=1e-5)
    replays = sum(g.replays for g in fake_cuda_graphs)
    assert replays == 3  # audio once, visual twice: replayed, not re-run eagerly
    # a size warmup() did not cover is captured mid-stream, with a warning, and is still right
    image3 = rng.standard_normal((3, *engine.image_shape), dtype=np.float32)
    emb3 = np.repeat(emb.numpy()[:1], 3, axis=0)
    with caplog.at_level("WARNING"):
        heat3, _ = engine.localize(image3, emb3)
    assert "capturing a CUDA graph for batch 3 mid-stream" in caplog.text
    np.testing.assert_allclose(heat3, eager.localize(image3, emb3)[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------- pinned uploads


class _CopyEngine:
    """Host-to-device copies of the stand-in: logged, and asynchronous ones pending until an event after them is
    synchronized."""

    def __init__(self) -> None:
        self.pinned: set[int] = set()  # data_ptr of pinned host allocations
        self.copies: list[dict[str, Any]] = []

    def pending_from(self, t: torch.Tensor) -> list[dict[str, Any]]:
        lo, hi = t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()
        return [c for c in self.copies if not c["done"] and lo <= c["src"] < hi]


class _Event:
    def __init__(self, engine: _CopyEngine) -> None:
        self.engine, self.covers = engine, []

    def record(self, stream: Any = None) -> None:
        self.covers = [c for c in self.engine.copies if not c["done"]]

    def synchronize(self) -> None:
        for c in self.covers:
            c["done"] = True


@pytest.fixture()
def copy_engine(monkeypatch):
    eng = _CopyEngine()
    real_empty, real_to = torch.empty, torch.Tensor.to

    def empty(*args, pin_memory=False, **kwargs):
        t = real_empty(*args, **kwargs)
        if pin_memory:
            eng.pinned.add(t.untyped_storage().data_ptr())
        return t

    def pin_memory(self):
        t = self.clone()
        eng.pinned.add(t.untyped_storage().data_ptr())
        return t

    def to(self, *args, **kwargs):
        device = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
        pinned = self.untyped_storage().data_ptr() in eng.pinned
        # a copy to "cuda", or (DevicePreprocessor on the CPU set up as on CUDA) an asynchronous one from pinned
        to_device = device is not None and torch.device(device).type == "cuda"
        if not (to_device or (device is not None and pinned and kwargs.get("non_blocking"))):
            return real_to(self, *args, **kwargs)
        rest = [a for a in args if not isinstance(a, (str, torch.device))]
        out = real_to(self, "cpu", *rest, **{k: v for k, v in kwargs.items() if k != "device"}).clone()
        eng.copies.append(
            {"src": self.data_ptr(), "pinned": pinned, "async": bool(kwargs.get("non_blocking")), "done": False}
        )
        return out

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: _Event(eng))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    return eng


def test_upload_to_cuda_is_one_asynchronous_copy_from_pinned_memory(copy_engine):
    """A pageable source makes CUDA copy synchronously (the host waits for the device), non_blocking or not."""
    array = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    out = preprocess.upload(array, torch.device("cuda"))
    assert out.dtype == torch.float32 and np.array_equal(out.numpy(), array.astype(np.float32))
    assert [(c["pinned"], c["async"]) for c in copy_engine.copies] == [(True, True)]


class _CheckedStaging(preprocess._Staging):
    """A staging buffer is handed out for refilling only once no copy from it is pending."""

    engine: _CopyEngine

    def next(self):
        buffer, slot = super().next()
        assert not self.engine.pending_from(buffer), f"staging buffer {slot} refilled while its upload is pending"
        return buffer, slot


def test_pinned_staging_buffers_are_refilled_only_after_their_upload(copy_engine, monkeypatch):
    """DevicePreprocessor on CUDA: frames copied into one of two pinned buffers, uploaded asynchronously, the buffer
    reused two batches later only after the event recorded behind its upload. Without the event (or with one
    buffer) the host overwrites frames the copy engine has not read yet."""
    manifest = {"image": {"size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}
    monkeypatch.setattr(_CheckedStaging, "engine", copy_engine, raising=False)
    monkeypatch.setattr(preprocess, "_Staging", _CheckedStaging)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pre = preprocess.DevicePreprocessor(manifest, device="cpu", max_batch=2)
    pre._pin = True  # what the constructor sets for a CUDA device; the tensors stay on the CPU here
    rng = np.random.default_rng(0)
    for _ in range(4):
        frames = [rng.integers(0, 256, (40, 48, 3), np.uint8) for _ in range(2)]
        out = pre(frames)
        np.testing.assert_allclose(out.numpy(), preprocess_frames(frames, manifest), atol=1.01 / (255 * 0.2))
    assert len(copy_engine.copies) == 4
    assert all(c["pinned"] and c["async"] for c in copy_engine.copies)


# ---------------------------------------------------------------------------------------------- TensorRT inputs


def test_tensorrt_device_inputs_are_recorded_on_the_engine_stream(tiny_engine, tmp_path, monkeypatch):
    """An image made on the caller's stream (DevicePreprocessor) and read by TensorRT on the engine's stream: once
    the worker drops it, the caching allocator may hand its memory to the next batch's preprocessing on the
    caller's stream while the engine still reads it, unless it was recorded on the engine's stream."""
    import test_tensorrt_fake as ttf
    from fake_cuda import FakeCudaTensor
    from tensorrt_fakes import calls

    from avloc.engines import tensorrt_backend as tb

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: ttf.GPU)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    engine, trt = ttf._fake_engine(11, tiny_engine, tmp_path, monkeypatch)
    caller = ttf._FakeStream(trt, "caller")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    recorded: list[tuple[int, str]] = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: recorded.append((self.data_ptr(), s.name)))
    size, dim = engine.image_shape[-1], engine.embed_dim
    # 256-byte aligned, as fresh CUDA allocations are (an unaligned one would be copied on its device first)
    image = tb._aligned_empty((2, 3, size, size), torch.float32, "cpu").fill_(0.5).as_subclass(FakeCudaTensor)
    emb = tb._aligned_empty((2, dim), torch.float32, "cpu").fill_(1.0).as_subclass(FakeCudaTensor)
    heatmap, confidence = engine.localize(image, emb)
    assert (image.data_ptr(), "engine") in recorded and (emb.data_ptr(), "engine") in recorded
    assert torch.all(heatmap.as_subclass(torch.Tensor) == 0.5)
    # the worker's warm-up of a TensorRT engine: every visual size of the profile, audio at batch 1, then a sync
    trt.calls.clear()
    engine.warmup(range(1, engine.max_batch + 1), audio_batch_sizes=(1,))
    shapes = [(name, shape[0]) for name, shape in calls(trt, "set_input_shape")]
    assert sorted(set(shapes)) == [
        ("audio_embedding", 1),
        ("audio_embedding", 2),
        ("image", 1),
        ("image", 2),
        ("spectrogram", 1),
    ]
    assert [name for name, _ in trt.calls][-1] == "stream_synchronize"
    engine.close()


# ---------------------------------------------------------------------------------------------- fp16 autocast


def test_torch_fp16_engine_on_the_cpu_autocast_gives_finite_maps(tiny_engine):
    """The torch backend's fp16 path (autocast around the real graph modules) on the CPU's float16 autocast: a
    zero audio embedding (silence) must give a zero map, not 0/0 = NaN, and others the fp32 map to fp16 precision."""
    engine = load_engine(tiny_engine, "torch", threads=1)
    ref = load_engine(tiny_engine, "torch", threads=1)
    engine.fp16 = True  # construction refuses fp16 on a CPU device; the autocast follows the engine's device
    assert isinstance(engine._autocast(), torch.autocast)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, *engine.image_shape), dtype=np.float32)
    emb = ref.embed_audio(rng.standard_normal((2, *engine.spec_shape), dtype=np.float32))
    emb[1] = 0.0
    heat, conf = engine.localize(image, emb)
    want, _ = ref.localize(image, emb)
    assert heat.dtype == np.float32 and np.isfinite(heat).all() and np.isfinite(conf).all()
    assert np.all(heat[1] == 0)
    assert np.abs(heat - want).max() < 1e-2


# ---------------------------------------------------------------------------------------------- a whole CUDA engine


class CudaOnCpu(TorchFunctionMode):
    """Every torch call asking for a CUDA device gets the CPU, pinned memory is plain memory: code written for a
    CUDA device (``torch_device`` stays ``cuda``, so every CUDA branch is taken) runs its tensors on the CPU."""

    @staticmethod
    def _cpu(value: Any) -> Any:
        if isinstance(value, torch.device) and value.type == "cuda":
            return torch.device("cpu")
        if isinstance(value, str) and value.startswith("cuda"):
            return "cpu"
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.device:  # the engine's own device stays cuda
            return func(*args, **kwargs)
        if func is torch.Tensor.pin_memory:
            return args[0].clone()
        kwargs.pop("pin_memory", None)
        args = tuple(self._cpu(a) for a in args)
        return func(*args, **{k: self._cpu(v) for k, v in kwargs.items()})


@pytest.fixture()
def cuda_on_cpu(monkeypatch, fake_cuda_graphs):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(
        torch.cuda, "Event", lambda *a, **k: types.SimpleNamespace(record=lambda s=None: None, synchronize=lambda: None)
    )
    with CudaOnCpu():
        yield fake_cuda_graphs


def test_a_cuda_graphs_torch_engine_serves_device_preprocessed_frames(tiny_engine, cuda_on_cpu):
    """The worker's GPU path end to end with the engine built as on CUDA (TF32 off, cuDNN benchmark, CUDA-graph
    runners from the constructor, warm-up capturing every size, the device preprocessor, pinned NumPy uploads,
    close()): the maps of uint8 frames match the CPU engine's on host-preprocessed frames."""
    from avloc.engines.base import to_host

    engine = load_engine(tiny_engine, "torch", device="cuda", mode="cuda_graphs", max_batch=2)
    assert engine.torch_device.type == "cuda" and not torch.backends.cudnn.allow_tf32
    engine.warmup()
    assert len(cuda_on_cpu) == 4 and engine.warmed_batches == [1, 2]  # audio and visual at 1 and 2
    ref = load_engine(tiny_engine, "torch", threads=1)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), np.uint8) for _ in range(2)]
    spec = rng.standard_normal((1, *engine.spec_shape), dtype=np.float32)
    emb = np.repeat(engine.embed_audio(spec), 2, axis=0)  # NumPy in (pinned upload) -> NumPy out
    images = engine.device_preprocessor(2)(frames)
    heat, conf = engine.localize(images, emb)
    assert isinstance(heat, torch.Tensor)  # device outputs: the worker's to_host() brings them back
    want_heat, want_conf = ref.localize(preprocess_frames(frames, engine.manifest), ref.embed_audio(spec).repeat(2, 0))
    np.testing.assert_allclose(to_host(heat), want_heat, atol=0.02)
    np.testing.assert_allclose(to_host(conf), want_conf, atol=0.02)
    engine.close()

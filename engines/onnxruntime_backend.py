"""ONNX Runtime backend: the default, CPU first (CUDA execution provider when asked for and available).

Thread policy for a streaming worker: ``intra_op_num_threads`` = ``threads`` (default: all cores),
``inter_op_num_threads`` = 1 with sequential execution (these graphs are chains of convolutions; parallel
branches buy nothing), full graph optimization, and intra-op spinning off by default so idle pool threads
do not burn the cores the capture and display processes need (see docs/engines.md for the measurement).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from avloc.core.errors import UserError
from avloc.engines.base import Engine, as_float32, graph_file, verified_file

log = logging.getLogger(__name__)


def session_options(threads: int | None, spinning: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers etc.
    return options


def both_wheels_installed() -> bool:
    """Whether onnxruntime and onnxruntime-gpu are both installed: they write the same ``onnxruntime`` package
    directory, so whichever was installed last owns the shared files (the CPU one hides CUDA)."""
    import importlib.metadata as md

    found = 0
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            md.version(dist)
            found += 1
        except md.PackageNotFoundError:
            pass
    return found == 2


BOTH_WHEELS_HINT = (
    "onnxruntime and onnxruntime-gpu are both installed and share one package directory: "
    "pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu"
)
_preloaded: list[bool] = []


def preload_cuda_libraries(ort: Any) -> None:
    """``onnxruntime.preload_dlls()`` once per process: ONNX Runtime's documented way (onnxruntime-gpu >= 1.21)
    to load the CUDA/cuDNN libraries of the nvidia-* pip wheels, which are not on the loader path; without it
    the CUDA provider may fail to load and the session silently falls back to the CPU."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or _preloaded:
        return
    _preloaded.append(True)
    try:
        preload()
    except Exception as err:  # noqa: BLE001 - the session check below reports what did not load
        log.warning("onnxruntime.preload_dlls() failed: %s", str(err).splitlines()[0][:200] if str(err) else err)


def _providers(device: str) -> list[Any]:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        preload_cuda_libraries(ort)
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            hint = BOTH_WHEELS_HINT if both_wheels_installed() else "install onnxruntime-gpu or use --device cpu"
            raise UserError(
                f"device {device!r}: this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); {hint}"
            )
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        # use_tf32=0: the CUDA provider's TF32 math mode would make "fp32" convolutions TF32 on Ampere and later
        return [("CUDAExecutionProvider", {"device_id": index, "use_tf32": 0}), "CPUExecutionProvider"]
    raise UserError(f"device {device!r}: expected cpu, cuda or cuda:N")


def check_session_providers(session: Any, device: str, what: str | Path) -> list[str]:
    """The providers ``session`` really got; a UserError when CUDA was asked for and is not among them.

    ``get_available_providers()`` lists CUDA whenever it is compiled in, even when its libraries (CUDA, cuDNN)
    fail to load; the session then runs on the CPU with only a log line, and a benchmark would report CPU
    timings as GPU ones."""
    got = list(session.get_providers())
    if device.startswith("cuda") and "CUDAExecutionProvider" not in got:
        hint = BOTH_WHEELS_HINT if both_wheels_installed() else "see `avloc doctor`"
        raise UserError(
            f"{what}: --device {device} asked for ONNX Runtime's CUDAExecutionProvider but the session got only "
            f"{', '.join(got)} (CUDA/cuDNN libraries not loadable?); {hint}"
        )
    return got


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(
        self,
        engine_dir: str | Path,
        manifest: dict[str, Any],
        device: str = "cpu",
        threads: int | None = None,
        precision: str = "fp32",
        spinning: bool = False,
    ) -> None:
        import onnxruntime as ort

        super().__init__(engine_dir, manifest, device)
        self.threads = int(threads or os.cpu_count() or 1)
        self.precision = precision
        options = session_options(self.threads, spinning)
        providers = _providers(device)
        self._sessions: dict[str, Any] = {}
        self.precisions = self._precisions(precision)
        paths = {graph: graph_file(engine_dir, manifest, graph, variant) for graph, variant in self.precisions.items()}
        if self.has_objectness:  # OGL's third graph (avloc export --ogl): fp32 only
            entry = manifest["ogl"]
            paths["objectness"] = verified_file(engine_dir, entry["file"], entry.get("sha256"))
        for graph, path in paths.items():
            try:
                self._sessions[graph] = session = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as err:  # noqa: BLE001 - ORT raises its own types for unreadable/invalid models
                raise UserError(
                    f"{path}: ONNX Runtime cannot load this graph ({str(err).splitlines()[0][:200]})"
                ) from None
            check_session_providers(session, device, path)
        audio = self._sessions["audio"]
        self.providers: list[str] = list(audio.get_providers())  # what the sessions really run on
        self._audio_in = audio.get_inputs()[0].name
        self._visual_in = [i.name for i in self._sessions["visual"].get_inputs()]
        # avloc export writes a dynamic batch axis (None: any batch); a graph exported with a fixed one takes
        # exactly that many frames, and a worker must not batch more
        batch_dim = self._sessions["visual"].get_inputs()[0].shape[0]
        self.max_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None

    def _precisions(self, precision: str) -> dict[str, str]:
        """Variant per graph: "int8" takes the int8 variant of each graph the export kept one for."""
        if precision == "fp32":
            return {"audio": "fp32", "visual": "fp32"}
        graphs = self.manifest["graphs"]
        chosen = {g: precision if precision in graphs[g].get("variants", {}) else "fp32" for g in ("audio", "visual")}
        if set(chosen.values()) == {"fp32"}:
            raise UserError(
                f"{self.engine_dir}: no graph has a {precision!r} variant (export with --{precision} "
                "--calibration DATA; a variant whose heatmaps disagreed with fp32 is not kept)"
            )
        return chosen

    def embed_audio(self, spec: np.ndarray) -> np.ndarray:
        self._check_spec(spec)
        return self._sessions["audio"].run(None, {self._audio_in: as_float32(spec)})[0]

    def localize(self, image: np.ndarray, audio_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._check_visual(image, audio_emb)
        feeds = dict(zip(self._visual_in, (as_float32(image), as_float32(audio_emb))))
        heatmap, confidence = self._sessions["visual"].run(None, feeds)
        return heatmap, confidence

    def objectness(self, image: np.ndarray) -> np.ndarray:
        session = self._sessions.get("objectness")
        if session is None:
            return super().objectness(image)  # raises: no OGL graph in this engine
        self._check_image(image, "objectness")
        return session.run(None, {session.get_inputs()[0].name: as_float32(image)})[0]

    def close(self) -> None:
        self._sessions.clear()

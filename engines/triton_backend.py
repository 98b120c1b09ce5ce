"""Triton backend: the :class:`Engine` interface run by an NVIDIA Triton Inference Server over gRPC.

The server holds the models of a repository written by ``avloc export --triton REPO`` (see
:mod:`avloc.engines.triton_export`); the client keeps the engine directory for what the manifest says
(preprocessing, shapes, gate). Loading checks that the server is live, that each model is ready, and that
its ``avloc_sha256`` parameter equals this engine's graph checksum, so a client never silently talks to a
server serving other weights. Batches larger than the model's ``max_batch_size`` are split; batching across
clients happens on the server (dynamic batching), which is the point of serving from Triton.

Options (``load_engine(..., url=..., ...)`` or ``--engine-option KEY=VALUE``):

- ``url``: the server's gRPC ``HOST:PORT`` (default ``127.0.0.1:8001``);
- ``model_prefix``: the repository's model-name prefix (``avloc``);
- ``plan``: use the TensorRT plan models (``PREFIX_visual_trt``...) instead of the ONNX ones;
- ``shared_memory``: pass tensors through POSIX shared memory instead of the gRPC message (client and server
  on one host only): one input and one output region per model, sized for ``max_batch_size``;
- ``timeout``: seconds a request may take before it fails (default 10).

``device`` and ``threads`` are the server's business (instance groups in ``config.pbtxt``) and are ignored.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from avloc.core.errors import UserError
from avloc.engines.base import Engine, as_float32
from avloc.engines.triton_export import model_name


class TritonError(RuntimeError):
    """A request the server failed (or did not answer in time)."""


class TritonEngine(Engine):
    backend = "triton"

    def __init__(
        self,
        engine_dir: str | Path,
        manifest: dict[str, Any],
        device: str = "cpu",
        threads: int | None = None,
        url: str = "127.0.0.1:8001",
        model_prefix: str = "avloc",
        plan: bool = False,
        shared_memory: bool = False,
        timeout: float = 10.0,
    ) -> None:
        try:
            import tritonclient.grpc as grpcclient
        except (ImportError, RuntimeError) as err:  # tritonclient raises RuntimeError without its grpc extra
            raise UserError(f"backend 'triton' needs tritonclient[grpc] (pip install 'avloc[triton]'): {err}") from None
        super().__init__(engine_dir, manifest, device)
        self.url, self.timeout = str(url), float(timeout)
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(self.url)
        self._lock = threading.Lock()  # shared-memory regions are per engine: one request at a time uses them
        self._regions: list[tuple[str, Any]] = []
        self._closed = False
        try:
            live = self._client.is_server_live(client_timeout=self.timeout)
        except Exception as err:  # noqa: BLE001 - grpc/tritonclient raise several types for "cannot connect"
            self._client.close()
            raise UserError(f"triton: no server at {self.url} ({str(err).splitlines()[0][:160]})") from None
        if not live:
            self._client.close()
            raise UserError(f"triton: server at {self.url} is not live")
        graphs = {"audio": manifest["graphs"]["audio"], "visual": manifest["graphs"]["visual"]}
        if isinstance(manifest.get("ogl"), dict):
            graphs["objectness"] = manifest["ogl"]
        self._models: dict[str, dict[str, Any]] = {}
        try:
            for graph, entry in graphs.items():
                name = model_name(model_prefix, graph, plan)
                if graph == "objectness" and not self._client.is_model_ready(name):
                    continue  # an OGL engine served without its objectness model: objectness() explains
                self._models[graph] = self._check_model(name, entry)
            self.max_batch = min(m["max_batch"] for m in self._models.values())
            if shared_memory:
                self._setup_shared_memory()
        except BaseException:
            self.close()
            raise

    def _check_model(self, name: str, entry: dict[str, Any]) -> dict[str, Any]:
        if not self._client.is_model_ready(name):
            index = self._client.get_model_repository_index(as_json=True).get("models", [])
            served = ", ".join(f"{m['name']} ({m.get('state', '?')})" for m in index) or "none"
            raise UserError(f"triton {self.url}: model {name!r} is not ready; models: {served}")
        config = self._client.get_model_config(name, as_json=True)["config"]
        served_sha = config.get("parameters", {}).get("avloc_sha256", {}).get("string_value")
        if served_sha != entry.get("sha256"):
            raise UserError(
                f"triton {self.url}: model {name!r} serves graph sha256 {served_sha}, but {self.engine_dir} has "
                f"{entry.get('sha256')}; export the repository from this engine (avloc export --triton)"
            )
        inputs = [t["name"] for t in entry["inputs"]]
        if [t["name"] for t in config.get("input", [])] != inputs:
            raise UserError(f"triton {self.url}: model {name!r} inputs differ from the manifest's {inputs}")
        return {
            "name": name,
            "max_batch": int(config.get("max_batch_size", 0)) or 1,
            "inputs": [(t["name"], tuple(t["shape"][1:])) for t in entry["inputs"]],
            "outputs": [(t["name"], tuple(t["shape"][1:])) for t in entry["outputs"]],
        }

    # ------------------------------------------------------------------------------------------ shared memory

    def _setup_shared_memory(self) -> None:
        import tritonclient.utils.shared_memory as shm

        tag = f"avloc_{os.getpid()}_{id(self):x}"
        for graph, model in self._models.items():
            for direction in ("inputs", "outputs"):
                size = model["max_batch"] * sum(4 * int(np.prod(shape)) for _, shape in model[direction])
                name = f"{tag}_{graph}_{direction}"
                handle = shm.create_shared_memory_region(name, "/" + name, size)
                self._regions.append((name, handle))
                try:
                    self._client.register_system_shared_memory(name, "/" + name, size)
                except Exception as err:  # noqa: BLE001 - e.g. a server on another host cannot open the region
                    raise UserError(
                        f"triton {self.url}: cannot register system shared memory ({str(err)[:160]}); "
                        "shared_memory needs the server on this host"
                    ) from None
                model[direction + "_region"] = (name, handle)

    # ------------------------------------------------------------------------------------------ requests

    def _run(self, graph: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        model = self._models[graph]
        batch = arrays[0].shape[0]
        step = model["max_batch"]
        if batch <= step:
            return self._request(model, arrays)
        parts = [self._request(model, [a[i : i + step] for a in arrays]) for i in range(0, batch, step)]
        return [np.concatenate(chunks) for chunks in zip(*parts)]

    def _request(self, model: dict[str, Any], arrays: list[np.ndarray]) -> list[np.ndarray]:
        grpc = self._grpc
        batch = arrays[0].shape[0]
        inputs = []
        for (name, _), array in zip(model["inputs"], arrays):
            tensor = grpc.InferInput(name, list(array.shape), "FP32")
            inputs.append(tensor)
        outputs = [grpc.InferRequestedOutput(name) for name, _ in model["outputs"]]
        shared = "inputs_region" in model
        with self._lock if shared else contextlib.nullcontext():
            if shared:
                self._place_in_shared_memory(model, inputs, outputs, arrays, batch)
            else:
                for tensor, array in zip(inputs, arrays):
                    tensor.set_data_from_numpy(array)
            try:
                result = self._client.infer(model["name"], inputs, outputs=outputs, client_timeout=self.timeout)
            except Exception as err:  # noqa: BLE001 - InferenceServerException and grpc errors alike
                raise TritonError(f"triton {self.url} {model['name']}: {str(err).splitlines()[0][:300]}") from None
            if shared:
                return self._read_shared_memory(model, batch)
            return [result.as_numpy(name).reshape(batch, *shape) for name, shape in model["outputs"]]

    def _place_in_shared_memory(
        self, model: dict[str, Any], inputs: list[Any], outputs: list[Any], arrays: list[np.ndarray], batch: int
    ) -> None:
        import tritonclient.utils.shared_memory as shm

        region, handle = model["inputs_region"]
        offset = 0
        for tensor, array in zip(inputs, arrays):
            shm.set_shared_memory_region(handle, [array], offset=offset)
            tensor.set_shared_memory(region, array.nbytes, offset)
            offset += array.nbytes
        region, _ = model["outputs_region"]
        offset = 0
        for tensor, (_, shape) in zip(outputs, model["outputs"]):
            nbytes = 4 * batch * int(np.prod(shape))
            tensor.set_shared_memory(region, nbytes, offset)
            offset += nbytes

    def _read_shared_memory(self, model: dict[str, Any], batch: int) -> list[np.ndarray]:
        import tritonclient.utils.shared_memory as shm

        _, handle = model["outputs_region"]
        out, offset = [], 0
        for _, shape in model["outputs"]:
            full = (batch, *shape)
            # A copy: the region is overwritten by the next request.
            out.append(np.array(shm.get_contents_as_numpy(handle, np.float32, full, offset=offset)))
            offset += 4 * int(np.prod(full))
        return out

    # ------------------------------------------------------------------------------------------ Engine

    def embed_audio(self, spec: np.ndarray) -> np.ndarray:
        self._check_spec(spec)
        return self._run("audio", [as_float32(spec)])[0]

    def localize(self, image: np.ndarray, audio_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._check_visual(image, audio_emb)
        heatmap, confidence = self._run("visual", [as_float32(image), as_float32(audio_emb)])
        return heatmap, confidence

    def objectness(self, image: Any) -> Any:
        if "objectness" not in self._models:
            return super().objectness(image)
        self._check_image(image, "objectness")
        return self._run("objectness", [as_float32(image)])[0]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._regions:
            import tritonclient.utils.shared_memory as shm

            for name, handle in self._regions:
                try:
                    self._client.unregister_system_shared_memory(name)
                except Exception:  # noqa: BLE001, S110 - the server may be gone already; the region is ours to free
                    pass
                shm.destroy_shared_memory_region(handle)
            self._regions.clear()
        self._client.close()

"""avloc: real-time audio-visual sound source localization.

The installed package has one namespace: ``avloc.core`` (models, front-end, data formats,
metrics), ``avloc.train`` (training, evaluation), ``avloc.engines`` (export and inference
backends), ``avloc.stream`` (capture, transport, inference and display processes) and
``avloc.configs`` (the shipped YAML configs, package data).

The Python API: ``avloc.Localizer(ENGINE_DIR or CHECKPOINT)(frame, audio, sample_rate)``
(see :mod:`avloc.api`); imported on first use, so ``import avloc`` stays light.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# The package's own data, wherever it is installed (a checkout, a wheel in site-packages or --target).
ASSETS_DIR = Path(str(files("avloc") / "assets"))

_LAZY = {"Localizer": "avloc.api", "Localization": "avloc.api"}
__all__ = ["ASSETS_DIR", "CONFIGS_DIR", "Localization", "Localizer", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "CONFIGS_DIR":  # lazy: an install older than avloc.configs still imports (and says what to do)
        from avloc.core.config import packaged_config_dir

        return packaged_config_dir()
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'avloc' has no attribute {name!r}")

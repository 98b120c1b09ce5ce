"""avloc: real-time audio-visual sound source localization.

The installed package has one namespace: ``avloc.core`` (models, front-end, data formats,
metrics), ``avloc.train`` (training, evaluation), ``avloc.engines`` (export and inference
backends) and ``avloc.stream`` (capture, transport, inference and display processes).
"""

from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

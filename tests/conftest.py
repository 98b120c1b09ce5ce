import os
from pathlib import Path

import pytest
import torch

# Two cores are shared by the whole suite: keep each test to one intra-op thread.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords also hold folder names (a checkout in .../gpu/)
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def engine_and_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny engine and 2 s clip of ``proc_helpers.tiny_engine_and_clip``, built once for the whole session
    (an export costs ~2 s). Read-only: a test that changes either copies it first. A module defining its own
    ``engine_and_video`` fixture keeps using its own."""
    from proc_helpers import tiny_engine_and_clip

    return tiny_engine_and_clip(tmp_path_factory.mktemp("shared_engine"), seed=5)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-8, 64 px SSL-Align engine with a 1 s linear front-end (random weights), exported once."""
    from avloc.core.audio import FrontEndConfig
    from avloc.core.checkpoint import ImageConfig, save_checkpoint
    from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
    from avloc.engines.export import export_engine

    root = tmp_path_factory.mktemp("engine")
    save_checkpoint(
        root / "ckpt.pt",
        SSLAlign(SSLAlignConfig(width=8)),
        method="ssl_align",
        model_config={"width": 8},
        frontend=FrontEndConfig(kind="linear", window_seconds=1.0),
        image=ImageConfig(size=64),
    )
    return export_engine(root / "ckpt.pt", root / "engine")

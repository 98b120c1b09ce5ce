"""Every shipped stream config loads with the launcher's checks (a misspelt key or a bad value is an error)."""

from __future__ import annotations

from pathlib import Path

import pytest

from avloc.core.errors import UserError
from avloc.stream.launcher import StreamConfig, load_stream_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("stream*.yaml")), ids=lambda p: p.name)
def test_stream_configs_load(path: Path) -> None:
    assert isinstance(load_stream_config(path), StreamConfig)


def test_acl_stream_config_is_stream_yaml_with_a_slower_audio_schedule(tmp_path: Path) -> None:
    base, acl = load_stream_config(CONFIGS / "stream.yaml"), load_stream_config(CONFIGS / "stream_acl.yaml")
    assert acl.frames_endpoint == base.frames_endpoint  # inherited through _base
    assert acl.audio_hop_s > base.audio_hop_s and acl.audio_reuse_s >= acl.audio_hop_s
    bad = tmp_path / "stream_bad.yaml"
    bad.write_text(f"_base: {CONFIGS / 'stream_acl.yaml'}\naudio_hop: 1.0\n")
    with pytest.raises(UserError, match="audio_hop"):
        load_stream_config(bad)

"""Every shipped config loads (stream configs with the launcher's checks: a misspelt key or a bad value is an error);
packaged configs are found by name and ``_base:`` resolves next to the file, else inside the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from avloc.core.config import config_names, load_config, load_yaml, packaged_config, packaged_config_dir
from avloc.core.errors import UserError
from avloc.stream.run.launcher import StreamConfig, load_stream_config

CONFIGS = packaged_config_dir()


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


def test_packaged_configs_are_found_by_name_and_path() -> None:
    names = config_names()
    assert {"cpu", "ssl_align", "demo", "stream", "acl", "ablations/align_only"} <= set(names)
    # every packaged config loads by name (its _base chain resolves inside the package) and equals its path
    for name in names:
        assert load_yaml(name) == load_yaml(packaged_config(name)), name
    assert load_config("cpu.yaml") == load_config(CONFIGS / "cpu.yaml")
    assert load_stream_config("stream_acl") == load_stream_config(CONFIGS / "stream_acl.yaml")
    # ablations/align_only.yaml has `_base: ../ssl_align.yaml`: its model section comes from there
    assert load_yaml("ablations/align_only")["model"] == load_yaml("ssl_align")["model"]


def test_user_config_bases_on_a_packaged_config_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("_base: cpu.yaml\noptim:\n  lr: 0.5\n")
    monkeypatch.chdir(tmp_path)
    merged = load_config(mine, ["train.seed=3"])
    assert merged["optim"]["lr"] == 0.5 and merged["train"]["seed"] == 3
    assert merged["model"] == load_yaml("cpu")["model"]
    # a file next to it wins over the packaged one of the same name
    (tmp_path / "cpu.yaml").write_text("model: {width: 3}\n")
    assert load_config(mine)["model"] == {"width": 3}
    # one's own stream.yaml on top of the packaged stream.yaml; a real loop is an error
    (tmp_path / "stream.yaml").write_text("_base: stream.yaml\nstartup_grace_s: 99.0\n")
    assert load_stream_config(tmp_path / "stream.yaml").startup_grace_s == 99.0
    assert load_stream_config(tmp_path / "stream.yaml").audio_hop_s == load_stream_config().audio_hop_s
    (tmp_path / "a.yaml").write_text("_base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base: a.yaml\n")
    with pytest.raises(UserError, match=r"_base chain loops \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        load_yaml(tmp_path / "a.yaml")


def test_unknown_config_names_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"config nope: no such file, nor a packaged config \(packaged: .*cpu"):
        load_yaml("nope")
    with pytest.raises(UserError, match="no such file"):
        load_yaml(tmp_path / "missing.yaml")  # a path never falls back to a packaged name
    with pytest.raises(UserError, match="no such file"):
        load_yaml("../configs/cpu")
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base: nothere.yaml\n")
    with pytest.raises(UserError, match="_base: nothere.yaml: not found next to it nor among the packaged configs"):
        load_yaml(bad)
    (tmp_path / "self.yaml").write_text("_base: self.yaml\n")  # not a packaged name either: itself, said so
    with pytest.raises(UserError, match="_base: self.yaml: is this file itself"):
        load_yaml(tmp_path / "self.yaml")
    with pytest.raises(UserError, match="is a folder, expected a YAML file"):
        load_yaml(tmp_path)
    with pytest.raises(UserError, match="no such file, nor a packaged config"):
        load_yaml("ablations/../cpu")  # a packaged name never climbs out of its folder

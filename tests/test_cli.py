"""Every command's --help renders: argparse formats help strings with %, so a stray % in one breaks only
that command's --help, at the moment a user asks for it."""

from __future__ import annotations

import pytest

from avloc import cli
from avloc.stream.run import worker_cli


def _command_paths() -> list[list[str]]:
    paths: list[list[str]] = []
    for name, (_, target) in cli.COMMANDS.items():
        if isinstance(target, str):
            paths.append([name])
        else:
            paths += [[name, sub] for sub in target]
    return paths + [["worker", role] for role in worker_cli.ROLES]


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_help_renders(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = cli.main([*path, "--help"])
    except SystemExit as stop:  # argparse's own --help
        status = stop.code
    assert status == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and len(out.splitlines()) > 2


def test_one_spelling_per_command(capsys: pytest.CaptureFixture[str]) -> None:
    modules: dict[str, list[str]] = {}
    for name, (_, target) in cli.COMMANDS.items():
        for sub, module in [("", target)] if isinstance(target, str) else [(s, m) for s, (_, m) in target.items()]:
            modules.setdefault(module, []).append(f"{name} {sub}".strip())
    assert {m: p for m, p in modules.items() if len(p) > 1} == {}
    with pytest.raises(SystemExit):
        cli.main(["acl-import", "--help"])  # the old spelling is gone; `avloc import acl` stays
    assert "invalid choice: 'acl-import'" in capsys.readouterr().err

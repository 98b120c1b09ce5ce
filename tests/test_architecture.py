"""The import contracts (pyproject.toml ``[tool.importlinter]``, docs/architecture.md) hold, and would catch a break."""

from __future__ import annotations

import ast
import importlib.util
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lint_imports", ROOT / "scripts" / "lint_imports.py")
lint_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lint_imports)


def test_import_contracts_hold(tmp_path):
    result = lint_imports.lint(lint_imports.stage(tmp_path))
    if result.returncode != 0:
        pytest.fail(f"import contracts broken (python scripts/lint_imports.py):\n{result.stdout}{result.stderr}")


def test_every_source_file_is_checked(tmp_path):
    """A module import-linter never sees can break no contract: every .py under the package folders of
    package-dir (a subpackage folder missing from it included) is in the staged copy."""
    staged = {p.relative_to(tmp_path) for p in lint_imports.stage(tmp_path).rglob("*.py")}
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    folders = {Path(folder): package for package, folder in package_dir.items()}
    missing = []
    for folder, package in folders.items():
        for source in (ROOT / folder).rglob("*.py"):
            installed = Path(*package.split("."), source.relative_to(ROOT / folder))
            owner = max((f for f in folders if source.is_relative_to(ROOT / f)), key=lambda f: len(f.parts))
            if owner == folder and installed not in staged:
                missing.append(str(source.relative_to(ROOT)))
    assert not missing, f"not in [tool.setuptools] package-dir, so neither checked nor installed: {missing}"


def test_a_forbidden_import_breaks_the_contracts(tmp_path):
    staged = lint_imports.stage(tmp_path)
    injected = {
        "avloc/stream/wire/protocol.py": "from avloc.stream.run import launcher",  # the wire imports upward
        "avloc/core/errors.py": "import avloc.stream.wire.protocol",  # core imports the stream
        "avloc/stream/serve/batching.py": "from avloc.stream.clients import display",  # one process, another
        "avloc/stream/capture/devices.py": "import avloc.train.data",  # a capture trains
    }
    for name, line in injected.items():
        path = staged / name
        path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    (staged / "avloc" / "stream" / "loose.py").write_text('"""In no room."""\n')
    result = lint_imports.lint(staged)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "avloc.stream.wire.protocol -> avloc.stream.run.launcher" in out
    assert "avloc.core is not allowed to import avloc.stream" in out
    assert "avloc.stream.serve.batching -> avloc.stream.clients.display" in out
    assert "avloc.stream.capture.devices -> avloc.train.data" in out
    assert "avloc.stream.loose" in out  # exhaustive: a module outside every room is reported


def test_every_room_says_what_lives_there():
    stream = ROOT / "stream"
    rooms = sorted(p.parent.name for p in stream.glob("*/__init__.py"))
    assert rooms == ["capture", "clients", "run", "runtime", "serve", "tools", "wire"]
    assert sorted(p.name for p in stream.glob("*.py")) == ["__init__.py"]  # every module is in a room
    # avloc.stream itself is in no layer, so import-linter lets its __init__ import any room; but it runs before
    # every stream module (the wire included), so an import there would pull that room into all of them.
    top = ast.parse((stream / "__init__.py").read_text())
    assert not [n for n in ast.walk(top) if isinstance(n, ast.Import | ast.ImportFrom)], "stream/__init__.py imports"
    for room in rooms:
        doc = ast.get_docstring(ast.parse((stream / room / "__init__.py").read_text()))
        assert doc and len(doc) > 100, room

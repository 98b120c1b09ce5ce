"""Check the import contracts of pyproject.toml ``[tool.importlinter]`` (docs/architecture.md) with import-linter.

import-linter finds a package's modules by walking its folder, but in a checkout ``avloc.core`` lives in
``core/``, ``avloc.stream`` in ``stream/``... (``[tool.setuptools] package-dir``), which it cannot follow. So the
sources are first copied into the installed layout (``avloc/core/``, ``avloc/stream/``...) in a temporary folder,
and import-linter runs on that copy with the repository's contracts.

    python scripts/lint_imports.py            # exit 0 when every contract holds, else 1 with the broken imports

tests/test_architecture.py runs it in CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage(dest: Path, root: Path = ROOT) -> Path:
    """Copy the Python sources of every package in ``root``'s package-dir into ``dest`` as installed; returns
    ``dest``. Data folders (assets, configs' YAML) are not copied: import-linter reads only imports."""
    with open(root / "pyproject.toml", "rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in (root / folder).glob("*.py"):  # not recursive: subpackages are entries of their own
            shutil.copy2(source, target / source.name)
    return dest


def lint(staged: Path, config: Path = ROOT / "pyproject.toml") -> subprocess.CompletedProcess[str]:
    """import-linter with ``config``'s contracts on the staged copy (first on the module path, so the copy and
    not the editable install's mapping is what import-linter walks); the completed process, output captured."""
    env = {**os.environ, "PYTHONPATH": str(staged)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", code, str(config), "--no-cache", "--no-logo"],
        cwd=staged,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="avloc-imports-") as tmp:
        result = lint(stage(Path(tmp)))
    print(result.stdout + result.stderr, end="")
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Draw docs/img/architecture.png: the layers of pyproject.toml's import contracts and the real imports between them.

Each box is a room (a layer of the ``packages`` and ``stream-layers`` contracts, top to bottom) with its modules;
boxes side by side on one row are independent (they may not import each other). A box's "imports:" line lists the
rooms its modules import today, read from the code by grimp (import-linter's graph) on the installed layout that
scripts/lint_imports.py stages.

    python scripts/architecture_diagram.py [--out docs/img/architecture.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import tomllib
from collections import Counter
from pathlib import Path

import grimp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lint_imports import ROOT, stage  # noqa: E402

COLORS = {"entry": "#dbe9f6", "stream": "#fde2c8", "model": "#e2f0d9", "core": "#ececec"}


def rows_from_contracts() -> list[list[str]]:
    """The rooms, one list per layer top to bottom, from the contracts: the stream's layers replace
    ``avloc.stream`` in the package layers."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        contracts = {c["id"]: c for c in tomllib.load(f)["tool"]["importlinter"]["contracts"]}
    stream_rows = [
        [f"avloc.stream.{name.strip()}" for name in layer.split("|")] for layer in contracts["stream-layers"]["layers"]
    ]
    rows: list[list[str]] = []
    for layer in contracts["packages"]["layers"]:
        if ":" in layer:  # non-independent siblings (they may import each other): one box
            rows.append([ENTRY])
            GROUPS[ENTRY] = [name.strip() for name in layer.split(":")]
            continue
        names = [name.strip() for name in layer.split("|")]
        rows.extend(stream_rows if names == ["avloc.stream"] else [names])
    return rows


ENTRY = "avloc entry points"
GROUPS: dict[str, list[str]] = {}  # a box of several modules -> those modules


def room_of(module: str, rooms: list[str]) -> tuple[str, str] | None:
    """The box of ``module`` and the name it is listed under there."""
    matches = [(len(p), r, p) for r in rooms for p in GROUPS.get(r, [r]) if module == p or module.startswith(p + ".")]
    if not matches:
        return None
    _, room, prefix = max(matches)
    return room, module.removeprefix("avloc.") if room in GROUPS else module[len(prefix) + 1 :]


def draw(out: Path) -> Path:
    rows = rows_from_contracts()
    rooms = [room for row in rows for room in row]
    with tempfile.TemporaryDirectory(prefix="avloc-graph-") as tmp:
        sys.path.insert(0, str(stage(Path(tmp))))
        graph = grimp.build_graph("avloc", cache_dir=None)
        sys.path.pop(0)
    members: dict[str, list[str]] = {room: [] for room in rooms}
    edges: Counter[tuple[str, str]] = Counter()
    for module in graph.modules:
        found = room_of(module, rooms)
        if found is None:
            continue
        room, name = found
        if name:
            members[room].append(name)
        for imported in graph.find_modules_directly_imported_by(module):
            target = room_of(imported, rooms)
            if target is not None and target[0] != room:
                edges[(room, target[0])] += 1

    short = {room: room.removeprefix("avloc.stream.").removeprefix("avloc.") for room in rooms}
    width, row_h, box_h, left = 13.0, 1.4, 1.2, 0.9
    fig, ax = plt.subplots(figsize=(width, row_h * len(rows) + 0.3))
    ax.set_xlim(0, width)
    ax.set_ylim(-0.1, row_h * len(rows) + 0.1)
    ax.axis("off")
    for i, row in enumerate(rows):
        y = row_h * (len(rows) - 1 - i) + 0.1
        slot = (width - left - 0.1) / len(row)
        for j, room in enumerate(row):
            x, w = left + j * slot + 0.08, slot - 0.16
            kind = (
                "stream"
                if room.startswith("avloc.stream")
                else "core"
                if room == "avloc.core"
                else ("model" if room in ("avloc.train", "avloc.engines") else "entry")
            )
            ax.add_patch(FancyBboxPatch((x, y), w, box_h, boxstyle="round,pad=0.02", fc=COLORS[kind], ec="#555555"))
            ax.text(x + 0.1, y + box_h - 0.17, room, fontsize=10, fontweight="bold", va="center")
            chars = max(24, int(w * 15))
            body = textwrap.wrap(", ".join(sorted(members[room])), chars)[:3]
            ax.text(x + 0.1, y + box_h - 0.34, "\n".join(body), fontsize=7, va="top", color="#333333")
            level = {r: k for k, rw in enumerate(rows) for r in rw}
            down = [short[t] for t in rooms if (room, t) in edges and level[t] > level[room]]
            up = [short[t] for t in rooms if (room, t) in edges and level[t] <= level[room]]
            if down:
                line = "\n".join(textwrap.wrap("imports: " + ", ".join(down), chars)[:2])
                ax.text(x + 0.1, y + 0.08, line, fontsize=7.5, va="bottom", color="#1f4e8c", fontstyle="italic")
            if up:  # only an import a contract ignores can point up or sideways (see its ignore_imports)
                ax.text(
                    x + w - 0.1,
                    y + 0.08,
                    "ignored: " + ", ".join(up),
                    fontsize=7.5,
                    ha="right",
                    va="bottom",
                    color="#b00020",
                    fontstyle="italic",
                )
    ax.add_patch(
        FancyArrowPatch(
            (0.4, row_h * len(rows)), (0.4, 0.1), arrowstyle="-|>", mutation_scale=25, lw=3, color="#1f4e8c"
        )
    )
    ax.text(0.2, row_h * len(rows) / 2, "imports go down only", rotation=90, va="center", ha="center", fontsize=9)
    ax.set_title(
        "avloc: the layers of the import contracts (pyproject.toml); side by side = independent; "
        "'imports:' = what the code imports today",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "architecture.png")
    args = parser.parse_args(argv)
    print(draw(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Qt binary resource bundles (.rcc): bytes made by Qt's own rcc, a writer's round trip, and broken files."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from avloc.core.data.qt_resources import FLAG_DIRECTORY, FLAG_ZLIB, QtResourceBundle, qt_hash
from avloc.core.errors import DataError

# Made by Qt 5.15.8's rcc (Debian qtbase5-dev-tools) from this .qrc, with a.txt = "hello " x 8 + "\n",
# sub/tiny.bin = "x" and sub/deeper/zeros.dat = 300 zero bytes + "end":
#   <qresource prefix="/pre"><file>a.txt</file><file>sub/tiny.bin</file><file>sub/deeper/zeros.dat</file>
#   </qresource><qresource prefix="/pre" lang="fr"><file alias="a.txt">sub/tiny.bin</file></qresource>
# rcc --binary --format-version {1,3} --threshold 0 --compress 9 t.qrc -o v{1,3}.rcc (zlib), and
# rcc --binary --compress-algo zstd t.qrc -o z.rcc (zstd; a.txt stays raw: too short to gain).
QT_RCC_V1 = bytes.fromhex(
    "7172657300000001000000b800000014000000500000000178000000160000003078dacb48cdc9c957c82096e40200b52111"
    "8b0000000178000000140000012f78da63601805c482d4bc1400039e0138000300007785007000720065000300007ab20073"
    "00750062000500645bf40061002e0074007800740008005c479e00740069006e0079002e00620069006e000606abc6c20064"
    "00650065007000650072000909674b04007a00650072006f0073002e00640061007400000000000200000001000000010000"
    "0000000200000003000000020000000c00020000000200000005000000180000000000250000000000000018000100000001"
    "00000005000000280000000000010000001f0000003e000200000001000000070000005000010000000100000024"
)
QT_RCC_V3 = bytes.fromhex(
    "7172657300000003000000bc0000001800000054000000010000000178000000160000003078dacb48cdc9c957c82096e402"
    "00b521118b0000000178000000140000012f78da63601805c482d4bc1400039e013800030000778500700072006500030000"
    "7ab2007300750062000500645bf40061002e0074007800740008005c479e00740069006e0079002e00620069006e000606ab"
    "c6c2006400650065007000650072000909674b04007a00650072006f0073002e006400610074000000000002000000010000"
    "00010000000000000000000000000002000000030000000200000000000000000000000c0002000000020000000500000000"
    "000000000000001800000000002500000000000001a24fe10ce40000001800010000000100000005000001a24fe10ce40000"
    "00280000000000010000001f000001a24fe10ce40000003e0002000000010000000700000000000000000000005000010000"
    "000100000024000001a24fe10e83"
)
QT_RCC_ZSTD = bytes.fromhex(
    "7172657300000003000000d7000000180000006f0000000400000001780000003068656c6c6f2068656c6c6f2068656c6c6f"
    "2068656c6c6f2068656c6c6f2068656c6c6f2068656c6c6f2068656c6c6f0a00000001780000001528b52ffd602f005d0000"
    "2000656e640100282a1002000300007785007000720065000300007ab2007300750062000500645bf40061002e0074007800"
    "740008005c479e00740069006e0079002e00620069006e000606abc6c2006400650065007000650072000909674b04007a00"
    "650072006f0073002e0064006100740000000000020000000100000001000000000000000000000000000200000003000000"
    "0200000000000000000000000c0002000000020000000500000000000000000000001800000000002500000000000001a24f"
    "e10ce40000001800000000000100000005000001a24fe10ce40000002800000000000100000039000001a24fe10ce4000000"
    "3e000200000001000000070000000000000000000000500004000000010000003e000001a24fe10e83"
)
HELLO = b"hello " * 7 + b"hello\n"
ZEROS = b"\0" * 300 + b"end"


def write_rcc(files: dict[str, bytes], version: int = 3, compress: frozenset[str] | set[str] = frozenset()) -> bytes:
    """A binary .rcc laid out as Qt's rcc writes it: header, data, names, then the tree in breadth-first order
    (a directory's children are consecutive nodes sorted by name hash). ``compress``: paths stored zlib'd."""
    root: dict = {}
    for path, data in files.items():
        *dirs, name = path.split("/")
        node = root
        for d in dirs:
            node = node.setdefault(d, {})
        node[name] = (path, data)
    data_section = bytearray()
    names = bytearray()
    name_at: dict[str, int] = {}

    def name_offset(name: str) -> int:
        if name not in name_at:
            name_at[name] = len(names)
            names.extend(struct.pack(">HI", len(name), qt_hash(name)) + name.encode("utf-16-be"))
        return name_at[name]

    # Breadth-first numbering: node 0 is the root; each directory's children get consecutive indices.
    nodes: list[tuple[str, object]] = [("", root)]
    tree = bytearray()
    queue = [0]
    first_child: dict[int, int] = {}
    while queue:
        index = queue.pop(0)
        children = sorted(nodes[index][1].items(), key=lambda kv: qt_hash(kv[0]))  # type: ignore[union-attr]
        first_child[index] = len(nodes)
        for name, value in children:
            nodes.append((name, value))
            if isinstance(value, dict):
                queue.append(len(nodes) - 1)
    stamp = struct.pack(">Q", 1_700_000_000_000) if version >= 2 else b""
    for index, (name, value) in enumerate(nodes):
        if isinstance(value, dict):
            tree += struct.pack(
                ">IHII", name_offset(name) if index else 0, FLAG_DIRECTORY, len(value), first_child[index]
            )
        else:
            path, data = value
            payload = struct.pack(">I", len(data)) + zlib.compress(data, 9) if path in compress else data
            flags = FLAG_ZLIB if path in compress else 0
            tree += struct.pack(">IHHHI", name_offset(name), flags, 0, 1, len(data_section))
            data_section += struct.pack(">I", len(payload)) + payload
        tree += stamp
    header = 20 + (4 if version >= 3 else 0)
    data_off, names_off = header, header + len(data_section)
    tree_off = names_off + len(names)
    head = b"qres" + struct.pack(">4I", version, tree_off, data_off, names_off)
    if version >= 3:
        head += struct.pack(">I", FLAG_ZLIB if compress else 0)
    return head + bytes(data_section) + bytes(names) + bytes(tree)


@pytest.mark.parametrize("blob", [QT_RCC_V1, QT_RCC_V3], ids=["v1", "v3"])
def test_reads_bundles_made_by_qt_rcc(blob: bytes, tmp_path: Path) -> None:
    bundle = QtResourceBundle(blob, "t.rcc")
    assert bundle.paths() == ["pre/a.txt", "pre/sub/deeper/zeros.dat", "pre/sub/tiny.bin"]
    assert bundle.read("pre/a.txt") == HELLO  # the default variant, not the lang="fr" one listed before it
    assert bundle.read(":/pre/sub/deeper/zeros.dat") == ZEROS
    assert bundle.read("pre/sub/tiny.bin") == b"x"
    variants = [e for e in bundle.entries() if e.path == "pre/a.txt"]
    assert sorted(bundle.read(e) for e in variants) == sorted([HELLO, b"x"])  # both locale variants listed
    assert {e.path: e.compression for e in bundle.entries() if e.language == 1} == {
        "pre/a.txt": "zlib",
        "pre/sub/deeper/zeros.dat": "zlib",
        "pre/sub/tiny.bin": "none",
    }
    assert all((e.modified_ms > 0) == (bundle.version >= 2) for e in bundle.entries())
    # Our qt_hash is Qt's: it reproduces every hash Qt stored in the names table.
    at = bundle._names
    while at < bundle._tree:
        length, stored = struct.unpack_from(">HI", blob, at)
        assert qt_hash(blob[at + 6 : at + 6 + 2 * length].decode("utf-16-be")) == stored
        at += 6 + 2 * length
    written = bundle.extract(tmp_path / "x", prefix="pre/sub/")
    assert sorted(p.relative_to(tmp_path / "x").as_posix() for p in written) == [
        "pre/sub/deeper/zeros.dat",
        "pre/sub/tiny.bin",
    ]
    assert (tmp_path / "x/pre/sub/deeper/zeros.dat").read_bytes() == ZEROS


def test_zstd_entry_without_the_decoder_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = QtResourceBundle(QT_RCC_ZSTD, "z.rcc")
    assert bundle.overall_flags == 4
    assert {e.path: e.compression for e in bundle.entries() if e.language == 1}["pre/sub/deeper/zeros.dat"] == "zstd"
    assert bundle.read("pre/a.txt") == HELLO  # raw entries of a zstd bundle need no decoder
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as when the optional package is not installed
    with pytest.raises(DataError, match=r"z\.rcc: pre/sub/deeper/zeros\.dat: zstd-compressed; install .*zstandard"):
        bundle.read("pre/sub/deeper/zeros.dat")


def test_zstd_entry_decodes() -> None:
    pytest.importorskip("zstandard")  # optional: Debian's Qt 5 bundles (gcompris-qt-data) are zlib
    assert QtResourceBundle(QT_RCC_ZSTD, "z.rcc").read("pre/sub/deeper/zeros.dat") == ZEROS


@pytest.mark.parametrize("version", [1, 2, 3])
def test_writer_round_trip_many_files(version: int) -> None:
    rng = np.random.default_rng(version)
    files = {
        f"d{i % 3}/{'sub/' if i % 2 else ''}f_{i}_é.bin": rng.integers(0, 256, int(rng.integers(0, 400)))
        .astype(np.uint8)
        .tobytes()
        for i in range(40)
    }
    files["top.txt"] = b"top"
    compressed = {p for i, p in enumerate(files) if i % 2}
    bundle = QtResourceBundle(write_rcc(files, version, compressed))
    assert bundle.paths() == sorted(files)
    assert all(bundle.read(p) == data for p, data in files.items())
    assert {e.path for e in bundle.entries() if e.compression == "zlib"} == compressed


def _broken(blob: bytes, offset: int, new: bytes) -> bytes:
    return blob[:offset] + new + blob[offset + len(new) :]


def test_broken_bundles_are_one_line_errors(tmp_path: Path) -> None:
    good = write_rcc({"a/b.txt": b"hello" * 20, "c.txt": b"c"}, 3, {"a/b.txt"})
    bundle = QtResourceBundle(good)
    entry = next(e for e in bundle.entries() if e.path == "a/b.txt")
    data_at = bundle._data + entry.data_offset
    cases = {
        "magic": (b"qrez" + good[4:], "not a Qt binary resource bundle"),
        "version": (_broken(good, 4, struct.pack(">I", 9)), "format version 9: expected 1..3"),
        "truncated": (good[: len(good) - 10], "past the end of the file"),
        "zlib": (_broken(good, data_at + 8 + 2, b"\xff\xff\xff"), "zlib data is corrupt"),
        "length": (_broken(good, data_at + 4, struct.pack(">I", 7)), "zlib data gives 100 bytes, its header says 7"),
    }
    for name, (blob, message) in cases.items():
        (tmp_path / f"{name}.rcc").write_bytes(blob)
        with pytest.raises(DataError, match=message) as err:
            QtResourceBundle.open(tmp_path / f"{name}.rcc").read("a/b.txt")
        assert str(err.value).startswith(str(tmp_path / f"{name}.rcc")) and "\n" not in str(err.value), name
    # A child node with unknown flag bits, and a directory pointing back at the root (a loop).
    node_size = 22
    flags_at = bundle._tree + 1 * node_size + 4
    with pytest.raises(DataError, match="unknown flags 0x10"):
        QtResourceBundle(_broken(good, flags_at, struct.pack(">H", 0x10)))
    looped = _broken(good, bundle._tree + 10, struct.pack(">I", 0))  # root's first child = root itself
    with pytest.raises(DataError, match="directory loop"):
        QtResourceBundle(looped)
    with pytest.raises(DataError, match="no resource 'nope'"):
        bundle.read("nope")
    for hostile in ("../escape.txt", "/abs.txt"):  # names are free text: extract() must stay inside ``out``
        with pytest.raises(DataError, match="leaves the output folder"):
            QtResourceBundle(write_rcc({hostile: b"x"})).extract(tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(DataError, match="cannot read the resource bundle"):
        QtResourceBundle.open(tmp_path / "missing.rcc")


GCOMPRIS_FARM = Path("/usr/share/gcompris-qt/rcc/explore_farm_animals.rcc")


@pytest.mark.skipif(not GCOMPRIS_FARM.is_file(), reason="gcompris-qt-data is not installed")
def test_real_gcompris_bundle() -> None:
    bundle = QtResourceBundle.open(GCOMPRIS_FARM)
    animals = [p.rsplit("/", 1)[-1] for p in bundle.paths() if "/resource/animals/" in p]
    assert sum(a.endswith(".webp") for a in animals) == 9 and sum(a.endswith(".ogg") for a in animals) == 9
    zlib_qml = [e for e in bundle.entries() if e.compression == "zlib" and e.path.endswith(".qml")]
    assert zlib_qml and bundle.read(zlib_qml[0]).startswith(b"/* GCompris")
    assert bundle.read(next(p for p in bundle.paths() if p.endswith("animals/cow.ogg")))[:4] == b"OggS"
    assert bundle.read(next(p for p in bundle.paths() if p.endswith("animals/cow.webp")))[8:12] == b"WEBP"

"""A pure-Python reader of Qt's binary resource bundles (``.rcc`` files made by ``rcc --binary``).

The layout (Qt's ``src/tools/rcc/rcc.cpp`` writes it, ``src/corelib/io/qresource.cpp`` reads it), all
integers big-endian:

- header: ``b"qres"``, then uint32 format version (1, 2 or 3), tree offset, data offset, names offset; from
  version 3 a uint32 of overall flags (which compression the bundle uses anywhere).
- tree: fixed-size nodes, 14 bytes (+ 8 from version 2 for the modification time in ms), node 0 is the
  root directory. Each node: uint32 name offset, uint16 flags (1 zlib-compressed, 2 directory, 4
  zstd-compressed); a directory then holds uint32 child count and uint32 index of its first child node
  (children are consecutive nodes, sorted by name hash); a file holds uint16 territory, uint16 language and
  uint32 offset of its data; from version 2 a uint64 modification time follows either.
- names: uint16 length in UTF-16 code units, uint32 ``qt_hash`` of the name, then the name in UTF-16BE.
- data: uint32 length, then that many bytes. A zlib-compressed entry is ``qCompress`` output: a uint32
  uncompressed length followed by a zlib stream. A zstd-compressed entry is one zstd frame (decoded with
  the optional ``zstandard`` package; Debian's Qt 5 bundles use zlib).

A directory may hold several files of the same name with different language/territory qualifiers (the
locale variants of one resource, e.g. ``<qresource lang="fr">``); :meth:`QtResourceBundle.read` by path takes
the one without a language (QLocale::C or AnyLanguage), as Qt does under the C locale, and
:meth:`QtResourceBundle.entries` lists them all.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from avloc.core.errors import DataError

MAGIC = b"qres"
FLAG_ZLIB = 0x01
FLAG_DIRECTORY = 0x02
FLAG_ZSTD = 0x04
KNOWN_FLAGS = FLAG_ZLIB | FLAG_DIRECTORY | FLAG_ZSTD
MAX_VERSION = 3
# QLocale::AnyLanguage and QLocale::C: the variant a locale-less reader (and Qt under the C locale) gets.
DEFAULT_LANGUAGES = (0, 1)


def qt_hash(name: str) -> int:
    """Qt's name hash as stored in the names table (``qt_hash`` over UTF-16 code units)."""
    h = 0
    for unit in struct.unpack(f">{len(name.encode('utf-16-be')) // 2}H", name.encode("utf-16-be")):
        h = ((h << 4) + unit) & 0xFFFFFFFF
        h ^= (h & 0xF0000000) >> 23
        h &= 0x0FFFFFFF
    return h


@dataclass(frozen=True)
class ResourceEntry:
    """A file of the bundle. ``path`` uses "/" and has no leading slash (``:/a/b.png`` is ``a/b.png``)."""

    path: str
    flags: int
    territory: int
    language: int
    data_offset: int  # relative to the bundle's data section
    modified_ms: int  # 0 before format version 2

    @property
    def compression(self) -> str:
        return "zlib" if self.flags & FLAG_ZLIB else "zstd" if self.flags & FLAG_ZSTD else "none"


class QtResourceBundle:
    """The files of one ``.rcc`` bundle, read from memory. Every problem is a one-line :class:`DataError`."""

    def __init__(self, data: bytes, source: str | Path = "<bytes>") -> None:
        self.source = str(source)
        self._buf = memoryview(data)
        if len(data) < 20 or bytes(data[:4]) != MAGIC:
            raise self._error(f"not a Qt binary resource bundle (expected magic {MAGIC!r}, got {bytes(data[:4])!r})")
        self.version, self._tree, self._data, self._names = struct.unpack_from(">4I", data, 4)
        if not 1 <= self.version <= MAX_VERSION:
            raise self._error(f"format version {self.version}: expected 1..{MAX_VERSION}")
        self.overall_flags = self._u32(20) if self.version >= 3 else 0
        self._node_size = 14 + (8 if self.version >= 2 else 0)
        for name, offset in (("tree", self._tree), ("data", self._data), ("names", self._names)):
            if offset > len(data):
                raise self._error(f"{name} offset {offset} is past the end of the file ({len(data)} bytes)")
        self._entries: list[ResourceEntry] = []
        self._by_path: dict[str, ResourceEntry] = {}
        root_flags = self._u16(self._tree + 4)
        if not root_flags & FLAG_DIRECTORY:
            raise self._error(f"tree node 0 has flags {root_flags:#x}: expected the root directory")
        self._walk(0, "", depth=0, seen=set())

    @classmethod
    def open(cls, path: str | Path) -> QtResourceBundle:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DataError(path, f"cannot read the resource bundle ({err.strerror or err})") from None
        return cls(data, path)

    # ------------------------------------------------------------------------------------------ parsing

    def _error(self, problem: str) -> DataError:
        return DataError(self.source, problem)

    def _check(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or offset + size > len(self._buf):
            raise self._error(f"{what} at byte {offset} (+{size}) is past the end of the file ({len(self._buf)} bytes)")

    def _u16(self, offset: int) -> int:
        self._check(offset, 2, "a 16-bit field")
        return struct.unpack_from(">H", self._buf, offset)[0]

    def _u32(self, offset: int) -> int:
        self._check(offset, 4, "a 32-bit field")
        return struct.unpack_from(">I", self._buf, offset)[0]

    def _name(self, name_offset: int) -> str:
        at = self._names + name_offset
        length = self._u16(at)
        self._check(at + 6, 2 * length, "a name")
        try:
            return bytes(self._buf[at + 6 : at + 6 + 2 * length]).decode("utf-16-be")
        except UnicodeDecodeError:
            raise self._error(f"name at names offset {name_offset} is not valid UTF-16") from None

    def _walk(self, index: int, prefix: str, depth: int, seen: set[int]) -> None:
        # A malformed tree could point a directory back at an ancestor: refuse loops instead of recursing forever.
        if index in seen or depth > 64:
            raise self._error(f"tree node {index}: directory loop or nesting deeper than 64")
        seen.add(index)
        node = self._tree + index * self._node_size
        count, first = self._u32(node + 6), self._u32(node + 10)
        for child in range(first, first + count):
            at = self._tree + child * self._node_size
            self._check(at, self._node_size, f"tree node {child}")
            name = self._name(self._u32(at))
            child_flags = self._u16(at + 4)
            if child_flags & ~KNOWN_FLAGS or (child_flags & FLAG_ZLIB and child_flags & FLAG_ZSTD):
                raise self._error(f"tree node {child} ({prefix}{name}): unknown flags {child_flags:#x}")
            if child_flags & FLAG_DIRECTORY:
                self._walk(child, f"{prefix}{name}/", depth + 1, seen)
                continue
            territory, language = struct.unpack_from(">HH", self._buf, at + 6)
            modified = struct.unpack_from(">Q", self._buf, at + 14)[0] if self.version >= 2 else 0
            entry = ResourceEntry(f"{prefix}{name}", child_flags, territory, language, self._u32(at + 10), modified)
            self._entries.append(entry)
            known = self._by_path.get(entry.path)
            if known is None or (known.language not in DEFAULT_LANGUAGES and language in DEFAULT_LANGUAGES):
                self._by_path[entry.path] = entry

    # ------------------------------------------------------------------------------------------ access

    def entries(self) -> list[ResourceEntry]:
        """Every file (locale variants included), in tree order."""
        return list(self._entries)

    def paths(self) -> list[str]:
        """Distinct file paths, sorted."""
        return sorted(self._by_path)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and path.lstrip(":/") in self._by_path

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths())

    def read(self, entry: str | ResourceEntry) -> bytes:
        """The uncompressed bytes of a file, by path (``a/b.png`` or ``:/a/b.png``) or entry."""
        if isinstance(entry, str):
            key = entry.lstrip(":/")
            if key not in self._by_path:
                raise self._error(f"no resource {entry!r} in the bundle ({len(self._by_path)} files)")
            entry = self._by_path[key]
        at = self._data + entry.data_offset
        size = self._u32(at)
        self._check(at + 4, size, f"data of {entry.path}")
        raw = bytes(self._buf[at + 4 : at + 4 + size])
        if entry.flags & FLAG_ZLIB:
            if size < 4:
                raise self._error(f"{entry.path}: compressed entry of {size} bytes, shorter than its length prefix")
            expected = struct.unpack_from(">I", raw)[0]
            try:
                out = zlib.decompress(raw[4:])
            except zlib.error as err:
                raise self._error(f"{entry.path}: zlib data is corrupt ({err})") from None
            if len(out) != expected:
                raise self._error(f"{entry.path}: zlib data gives {len(out)} bytes, its header says {expected}")
            return out
        if entry.flags & FLAG_ZSTD:
            return self._unzstd(entry.path, raw)
        return raw

    def _unzstd(self, path: str, raw: bytes) -> bytes:
        try:
            import zstandard  # optional: only Qt >= 5.13 bundles built with zstd need it
        except ImportError:
            raise self._error(f"{path}: zstd-compressed; install the Python package `zstandard` to read it") from None
        try:
            return zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 30)
        except zstandard.ZstdError as err:
            raise self._error(f"{path}: zstd data is corrupt ({err})") from None

    def extract(self, out: str | Path, prefix: str = "") -> list[Path]:
        """Write every file whose path starts with ``prefix`` under ``out``; returns the written paths."""
        written = []
        for path in self.paths():
            if not path.startswith(prefix):
                continue
            if ".." in Path(path).parts or Path(path).is_absolute():  # a bundle cannot write outside ``out``
                raise self._error(f"resource path {path!r} leaves the output folder")
            target = Path(out) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read(path))
            written.append(target)
        return written

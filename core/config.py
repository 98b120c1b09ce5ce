"""YAML configs with ``key=value`` command-line overrides, loaded into frozen dataclasses."""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from avloc.core.errors import UserError

T = TypeVar("T")


CONFIG_SUFFIXES = (".yaml", ".yml")


def packaged_config_dir() -> Path:
    """The folder of the configs shipped with avloc (``configs/`` of the checkout, ``avloc/configs`` of an
    install), found through importlib.resources so a wheel installed anywhere finds its own."""
    try:
        return Path(str(importlib.resources.files("avloc.configs")))
    except ModuleNotFoundError:  # an editable install made before configs/ became the package avloc.configs
        raise UserError(
            "avloc.configs is not importable: this avloc install predates the packaged configs; "
            "reinstall it (bash scripts/setup.sh, or pip install -e .)"
        ) from None


def config_names() -> list[str]:
    """Names ``--config`` accepts for the packaged configs: ``cpu``, ``demo``, ``ablations/align_only`` ..."""
    root = packaged_config_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def packaged_config(name: str) -> Path:
    """Path of the packaged config ``name`` (``stream``, ``ablations/align_only``; ``.yaml`` optional)."""
    rel = name[: -len(Path(name).suffix)] if Path(name).suffix in CONFIG_SUFFIXES else name
    path = packaged_config_dir() / f"{rel}.yaml"
    if rel.startswith(("/", ".")) or ".." in Path(rel).parts or not path.is_file():
        raise UserError(f"config {name!r}: no such packaged config; packaged: {', '.join(config_names())}")
    return path


def resolve_config(value: str | Path) -> Path:
    """``--config`` value -> a YAML file: an existing path, else the packaged config of that name."""
    path = Path(value)
    if path.is_file():
        return path
    text = str(value)
    # a name is what a packaged config is called; anything that looks like a path stays a (missing) path
    looks_like_name = not path.is_absolute() and not text.startswith(".") and path.suffix in ("", *CONFIG_SUFFIXES)
    if looks_like_name:
        try:
            return packaged_config(text)
        except UserError:
            pass
    if path.is_dir():  # after the names: `--config stream` in a checkout is the config, not the stream/ folder
        raise UserError(f"config {value}: is a folder, expected a YAML file or a packaged config's name")
    raise UserError(f"config {value}: no such file, nor a packaged config (packaged: {', '.join(config_names())})")


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping (a path, or a packaged config's name: see :func:`resolve_config`).

    ``_base: other.yaml`` is merged underneath: relative to this file, else a packaged config of that name
    (so a user's config can build on ``_base: cpu.yaml`` wherever it lives; a ``stream.yaml`` of one's own
    with ``_base: stream.yaml`` builds on the packaged one).
    """
    path = resolve_config(path)
    if path.resolve() in _chain:
        raise UserError(f"{path}: _base chain loops ({' -> '.join(str(p) for p in (*_chain, path.resolve()))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("_base", None)
    if base is not None:
        if not isinstance(base, str):
            raise UserError(f"{path}: _base: {base!r}, expected a file name (e.g. cpu.yaml)")
        local = path.parent / base
        itself = local.is_file() and local.resolve() == path.resolve()
        try:
            base_path = local if local.is_file() and not itself else packaged_config(base)
        except UserError:
            why = "is this file itself" if itself else "not found next to it nor among the packaged configs"
            raise UserError(f"{path}: _base: {base}: {why}") from None
        data = merge(load_yaml(base_path, (*_chain, path.resolve())), data)
    return data


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML scalars (``1e-4``, ``true``, ``[1,2]``)."""
    out = merge({}, config)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise UserError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    return apply_overrides(load_yaml(path), overrides or [])


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are a UserError naming the field."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(
            f"config{' ' + where if where else ''}: unknown key(s) {', '.join(unknown)}; "
            f"expected some of {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except UserError:
                continue
        raise UserError(f"config {where}: value {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"config {where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config {where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp in (int, float, bool, str):
        raise UserError(f"config {where}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain dict (tuples become lists) for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(obj)

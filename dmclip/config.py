"""Dataclass configs filled from YAML recipes, ``--set a.b=c`` overrides and CLI shortcuts.

Every config field is declared with :func:`field` (default, help text, optional range/choices), so
errors can name the key path, the value and what is allowed:

    @dataclass
    class OptimConfig:
        lr: float = field(5e-4, "peak learning rate", min=0.0)

``load_config(DistillConfig, recipe, sets=["train.lr=1e-3"], shortcuts={"loss.alpha": 0.75})``
resolves recipe -> overrides -> shortcuts, in that order, and validates the result. Reading the YAML is
``dmclip.recipe``'s job; converting and range-checking each value is ``dmclip.coerce``'s.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import types
import typing
from pathlib import Path, PurePath
from typing import Any, get_args, get_origin

import yaml

from dmclip.coerce import check_range, coerce, type_name
from dmclip.errors import DmclipError
from dmclip.recipe import parse_yaml, read_recipe

_MISSING = dataclasses.MISSING
log = logging.getLogger(__name__)


def field(default: Any = _MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
          choices: typing.Sequence | None = None, factory: typing.Callable | None = None):
    """A config field with its meaning (and unit) in ``help`` and an optional range or choice list."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    if dataclasses.is_dataclass(default):  # each config gets its own copy, with the values given here
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def renamed(cls, key: str, path: str = "") -> str:
    """``key``, or the field it was renamed to: a dataclass lists its old field names in ``RENAMED`` (old -> new),
    so older recipes and resolved.yaml files still read, with a one-line deprecation warning."""
    new = getattr(cls, "RENAMED", {}).get(key)
    if new is None:
        return key
    prefix = f"{path}." if path else ""
    log.warning("config key %s%s is now %s%s (the old name still reads)", prefix, key, prefix, new)
    return new


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass ``cls`` from a mapping, naming the key path of any problem."""
    if not isinstance(data, dict):
        raise DmclipError(f"{path or 'config'} must be a mapping of keys to values, got {type(data).__name__}",
                          f"write {path or 'it'} as indented `key: value` lines")
    data = {renamed(cls, key, path): value for key, value in data.items()}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        full = f"{path}.{key}" if path else str(key)
        close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
        prefix = f"{path}." if path else ""
        hint = (f"did you mean {prefix}{close[0]}?" if close
                else f"valid keys here: {', '.join(prefix + k for k in fields)}")
        raise DmclipError(f"unknown config key {full!r}", hint)
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        full = f"{path}.{name}" if path else name
        if isinstance(value, dict) and f.default_factory is not _MISSING and dataclasses.is_dataclass(hints[name]):
            # a section given in part keeps the field's own defaults for the rest (capfilt's finetune.train is
            # TrainConfig(steps=100, batch_size=32, ...), not TrainConfig()'s defaults)
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                value = _merged(to_dict(default), value)
        converted = coerce(value, hints[name], full, from_dict)
        check_range(f, converted, full)
        kwargs[name] = converted
    prefix = f"{path}." if path else ""
    missing = [n for n, f in fields.items() if n not in kwargs and f.init
               and f.default is _MISSING and f.default_factory is _MISSING]
    if missing:
        raise DmclipError(f"config key {prefix + missing[0]!r} is required and has no default",
                          f"set it in the recipe or with --set {prefix + missing[0]}=...")
    try:
        return cls(**kwargs)
    except DmclipError:
        raise
    except (TypeError, ValueError) as exc:  # a __post_init__ check
        raise DmclipError(f"{path or 'config'}: {exc}", "fix the values named above") from None


def _merged(base: dict, given: dict) -> dict:
    """``given`` over ``base``, section by section."""
    out = dict(base)
    for key, value in given.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _plain(obj: Any) -> Any:
    """Tuples -> lists, paths -> strings: what YAML and JSON can hold (``from_dict`` converts back)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def to_dict(cfg) -> dict:
    """The config as plain nested dicts/lists/scalars (what resolved.yaml holds)."""
    return _plain(dataclasses.asdict(cfg))


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def config_hash(cfg) -> str:
    """6 hex digits naming a resolved config (part of the run directory name)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:6]


# -------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", 0.001)``; the value is read as YAML."""
    if "=" not in text:
        raise DmclipError(f"--set {text!r} has no '='", "write it as --set key.path=value, e.g. --set train.lr=1e-3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise DmclipError(f"--set {text!r} has no key", "write it as --set key.path=value")
    value = parse_yaml(raw, where=f"--set {key}") if raw.strip() else ""
    if isinstance(value, str) and value.strip() != value:
        value = value.strip()
    return key, value


def _dataclass_of(tp) -> Any:
    """``tp`` itself, or the dataclass inside ``Optional[...]``; None for a leaf type."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def set_path(data: dict, key: str, value: Any, cls=None) -> None:
    """Set ``a.b.c`` in a nested mapping, checking each part against dataclass ``cls`` if given."""
    parts = key.split(".")
    if any(not p for p in parts):
        raise DmclipError(f"--set {key}: {key!r} is not a key path", "write it as a.b.c=value, e.g. train.lr=1e-3")
    node, node_cls, walked, leaf = data, cls, [], None
    for i, part in enumerate(parts):
        walked.append(part)
        if leaf is not None:  # a.b.c where a.b is a number, string, ...
            raise DmclipError(f"--set {key}: {leaf[0]} is a {type_name(leaf[1])} value, not a section",
                              f"set {leaf[0]} itself, e.g. --set {leaf[0]}=...")
        if node_cls is not None:
            part = walked[-1] = renamed(node_cls, part, ".".join(walked[:-1]))
            names = {f.name: f for f in dataclasses.fields(node_cls)}
            if part not in names:
                prefix = ".".join(walked[:-1])
                close = difflib.get_close_matches(part, list(names), n=1, cutoff=0.5)
                hint = (f"did you mean {(prefix + '.') if prefix else ''}{close[0]}?" if close
                        else f"valid keys here: {', '.join((prefix + '.' if prefix else '') + n for n in names)}")
                raise DmclipError(f"--set {key}: unknown config key {'.'.join(walked)!r}", hint)
            tp = _hints(node_cls)[part]
            node_cls = _dataclass_of(tp)
            if node_cls is None and get_origin(tp) is not dict and tp is not dict and tp is not Any:
                leaf = (".".join(walked), tp)
        if i == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


def load_config(cls, recipe: str | Path | None = None, sets: typing.Sequence[str] = (),
                shortcuts: dict[str, Any] | None = None):
    """Resolve recipe -> ``--set`` overrides -> CLI shortcuts (None = not given) into a ``cls``.

    Returns ``(config, recipe_text)``; ``recipe_text`` is the recipe as given ("" without one).
    Top-level keys named in ``cls.RECIPE_BLOCKS`` are left out: the command reads them itself (a ``sweep:``).
    """
    data, text = read_recipe(recipe) if recipe else ({}, "")
    for key in getattr(cls, "RECIPE_BLOCKS", ()):
        data.pop(key, None)
    return build_config(cls, data, sets, shortcuts), text


def build_config(cls, data: dict, sets: typing.Sequence[str] = (), shortcuts: dict[str, Any] | None = None):
    """A ``cls`` from a recipe's mapping (changed in place) with ``--set`` overrides, then shortcuts, on top."""
    data.pop("command", None)  # a resolved.yaml may say which command wrote it
    for item in sets:
        key, value = parse_override(item)
        set_path(data, key, value, cls)
    for key, value in (shortcuts or {}).items():
        if value is not None:
            set_path(data, key, value, cls)
    return from_dict(cls, data)


def save_config(cfg, path: Path) -> None:
    from dmclip.io import atomic_write_text

    atomic_write_text(path, to_yaml(cfg))


def describe(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, help) for every field, for docs and `--help`."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        default = f.default if f.default is not _MISSING else (f.default_factory() if f.default_factory is not _MISSING else "")
        rows.append((key, type_name(tp), repr(default), f.metadata.get("help", "")))
    return rows

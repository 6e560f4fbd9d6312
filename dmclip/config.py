"""Dataclass configs filled from YAML recipes, ``--set a.b=c`` overrides and CLI shortcuts.

Every config field is declared with :func:`field` (default, help text, optional range/choices), so
errors can name the key path, the value and what is allowed:

    @dataclass
    class OptimConfig:
        lr: float = field(5e-4, "peak learning rate", min=0.0)

``load_config(DistillConfig, recipe, sets=["train.lr=1e-3"], shortcuts={"loss.alpha": 0.75})``
resolves recipe -> overrides -> shortcuts, in that order, and validates the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Literal, get_args, get_origin

import yaml

from dmclip.errors import DmclipError

_MISSING = dataclasses.MISSING


def field(default: Any = _MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
          choices: typing.Sequence | None = None, factory: typing.Callable | None = None):
    """A config field with its meaning (and unit) in ``help`` and an optional range or choice list."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    if dataclasses.is_dataclass(default):
        cls = type(default)
        return dataclasses.field(default_factory=cls, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """safe_load that also refuses duplicated keys (a common silent recipe bug)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        where = f"line {key_node.start_mark.line + 1}, column {key_node.start_mark.column + 1}"
        try:
            duplicate = key in seen
        except TypeError:  # a list or mapping used as a key (`? [a, b]`)
            raise DmclipError(f"a key at {where} is a {type(key).__name__}, not a plain name",
                              "write keys as plain words: `key: value`") from None
        if duplicate:
            raise DmclipError(f"duplicated key {key!r} at {where} (first at line {seen[key]})",
                              "keep one of the two entries: YAML would silently use the last one")
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_MAX_DEPTH = 64


def _check_plain(data: Any, where: str, depth: int = 0, parents: tuple = ()) -> None:
    """Refuse self-referencing anchors (``&x [*x]``) and absurd nesting before anything walks them."""
    if not isinstance(data, (dict, list)):
        return
    if id(data) in parents:
        raise DmclipError(f"{where} refers to itself through a YAML anchor/alias",
                          "replace the recursive *alias with a plain value")
    if depth > _MAX_DEPTH:
        raise DmclipError(f"{where} is nested more than {_MAX_DEPTH} levels deep", "flatten the recipe")
    children = data.values() if isinstance(data, dict) else data
    for child in children:
        _check_plain(child, where, depth + 1, parents + (id(data),))


def parse_yaml(text: str, where: str = "recipe") -> Any:
    """Parse YAML with ``safe_load`` semantics (no code tags, no duplicated keys) and one-line errors."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except DmclipError as exc:
        raise DmclipError(f"{where}: {exc.message}", exc.hint) from None
    except RecursionError:
        raise DmclipError(f"{where} is nested too deeply to read", "flatten the recipe") from None
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(exc.problem or exc)
        tag = problem.split("tag '", 1)[1].rstrip("'") if "tag '" in problem else None
        if tag is not None:
            tag = tag.replace("tag:yaml.org,2002:", "!!")
            raise DmclipError(f"{where}: refused tag {tag}{line}",
                              "recipes are plain data (yaml.safe_load): remove the tag and write the value") from None
        raise DmclipError(f"{where} cannot be read{line}: {problem}", "check the YAML near that line") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        hint = ("indent with spaces, not tabs" if "\t" in text
                else "check the YAML syntax near that line" if mark else "remove the control characters")
        raise DmclipError(f"{where} is not valid YAML{line}: {problem}", hint) from None
    _check_plain(data, where)
    return data


def read_recipe(path: str | Path) -> tuple[dict, str]:
    """Read a recipe file -> (mapping, text as given)."""
    path = Path(path)
    if path.is_dir():
        raise DmclipError(f"recipe {str(path)!r} is a directory", "pass a YAML file inside it")
    if not path.is_file():
        raise DmclipError(f"recipe {str(path)!r} does not exist",
                          "pass a YAML file, e.g. recipes/distill-demo.yaml (ls recipes/ shows the built-in ones)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DmclipError(f"recipe {str(path)!r} is not UTF-8 text", "save it as UTF-8 YAML") from None
    except OSError as exc:
        raise DmclipError(f"recipe {str(path)!r} cannot be read ({exc.strerror or exc})",
                          "check its permissions") from None
    data = parse_yaml(text, where=f"recipe {path.name}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DmclipError(f"recipe {path.name} must be a mapping of keys to values, not a {type(data).__name__}",
                          "write it as `key: value` lines")
    return data, text


# ------------------------------------------------------------------------------------- conversion


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except DmclipError:
                continue
        raise _type_error(path, value, tp)
    if origin is Literal:
        allowed = get_args(tp)
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        raise DmclipError(f"{path} = {value!r} is not allowed",
                          f"use one of {', '.join(repr(a) for a in allowed)}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _type_error(path, value, tp)
        return from_dict(tp, value, path)
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, value, tp)
        args = get_args(tp)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise DmclipError(f"{path} = {value!r} has {len(value)} items, expected {len(args)}",
                              f"set {path} to a list of {len(args)} values")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list or tp is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, value, tp)
        args = get_args(tp)
        item = args[0] if args else Any
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(path, value, tp)
        args = get_args(tp)
        if len(args) == 2:
            return {_convert(k, args[0], path): _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise _type_error(path, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(path, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(path, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _type_error(path, value, tp)
    return value


def _type_error(path: str, value: Any, tp: Any) -> DmclipError:
    return DmclipError(f"{path} = {value!r} has the wrong type: expected {_type_name(tp)}",
                       f"set {path} to a value of type {_type_name(tp)}")


def _check_range(f: dataclasses.Field, value: Any, path: str) -> None:
    lo, hi, choices = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None:
            continue
        if choices and v not in choices:
            close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
            raise DmclipError(f"{path} = {v!r} is not allowed",
                              f"use one of {', '.join(map(str, choices))}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if (lo is not None or hi is not None) and math.isnan(v):
                raise DmclipError(f"{path} = nan is not a number", f"set {path} to a number")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                bounds = (f"between {lo} and {hi}" if lo is not None and hi is not None
                          else f">= {lo}" if lo is not None else f"<= {hi}")
                raise DmclipError(f"{path} = {v!r} is out of range", f"{path} must be {bounds}")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass ``cls`` from a mapping, naming the key path of any problem."""
    if not isinstance(data, dict):
        raise DmclipError(f"{path or 'config'} must be a mapping of keys to values, got {type(data).__name__}",
                          f"write {path or 'it'} as indented `key: value` lines")
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
        converted = _convert(value, hints[name], full)
        _check_range(f, converted, full)
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


def validate(cfg) -> None:
    """Re-check every field of a built config (after in-place edits)."""
    from_dict(type(cfg), to_dict(cfg))


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
            raise DmclipError(f"--set {key}: {leaf[0]} is a {_type_name(leaf[1])} value, not a section",
                              f"set {leaf[0]} itself, e.g. --set {leaf[0]}=...")
        if node_cls is not None:
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


def parse_sweep_values(text: Any, type: typing.Callable = float, option: str = "value") -> list:
    """``"0,0.25,0.75,1"`` -> ``[0.0, 0.25, 0.75, 1.0]``: the values of a shortcut option that sweeps.

    A single value gives a one-item list; a number or a list is accepted as already parsed.
    ``option`` names the option in errors (e.g. ``"--alpha"``).
    """
    if isinstance(text, (list, tuple)):
        items = list(text)
    elif isinstance(text, (int, float)) and not isinstance(text, bool):
        items = [text]
    else:
        items = [part.strip() for part in str(text).split(",")]
    if not items or any(isinstance(i, str) and not i for i in items):
        raise DmclipError(f"{option} {text!r} has an empty value",
                          f"separate values with commas and no empty items, e.g. {option} 0,0.25,0.75,1")
    values = []
    for item in items:
        try:
            value = type(item)
        except (TypeError, ValueError):
            name = getattr(type, "__name__", "value")
            raise DmclipError(f"{option} {item!r} is not a {name}",
                              f"pass one {name} or a comma-separated list, e.g. {option} 0,0.25,0.75,1") from None
        if isinstance(value, float) and math.isnan(value):
            raise DmclipError(f"{option} {item!r} is not a number", f"pass numbers, e.g. {option} 0,0.25")
        values.append(value)
    if len(set(values)) != len(values):
        raise DmclipError(f"{option} {text!r} repeats a value", "list each sweep point once")
    return values


def load_config(cls, recipe: str | Path | None = None, sets: typing.Sequence[str] = (),
                shortcuts: dict[str, Any] | None = None):
    """Resolve recipe -> ``--set`` overrides -> CLI shortcuts (None = not given) into a ``cls``.

    Returns ``(config, recipe_text)``; ``recipe_text`` is the recipe as given ("" without one).
    Top-level keys named in ``cls.RECIPE_BLOCKS`` are left out: the command reads them itself (distill's
    ``sweep:``).
    """
    data, text = read_recipe(recipe) if recipe else ({}, "")
    data.pop("command", None)  # a resolved.yaml may say which command wrote it
    for key in getattr(cls, "RECIPE_BLOCKS", ()):
        data.pop(key, None)
    for item in sets:
        key, value = parse_override(item)
        set_path(data, key, value, cls)
    for key, value in (shortcuts or {}).items():
        if value is not None:
            set_path(data, key, value, cls)
    return from_dict(cls, data), text


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
        rows.append((key, _type_name(tp), repr(default), f.metadata.get("help", "")))
    return rows

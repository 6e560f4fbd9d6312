"""Config values against their annotations: a value from YAML or ``--set`` converted to the field's type
(``int | None``, ``Literal[...]``, ``tuple[float, float]``, paths, ...) and checked against its range and
choices, every error one line naming the key path and what is allowed."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from pathlib import PurePath
from typing import Any, Literal, get_args, get_origin

from dmclip.errors import DmclipError


def type_name(tp) -> str:
    """How a type reads in an error: ``float | null``, ``list of int``, ``mapping``."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, path: str, build: Callable[[type, dict, str], Any]) -> Any:
    """``value`` (from YAML or ``--set``) as annotated type ``tp``, or a ``DmclipError`` naming ``path``.

    A nested dataclass is built by ``build(cls, mapping, path)`` (the config's ``from_dict``, which calls back
    here for each of its fields).
    """
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
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return build(arg, value, path)  # an optional section: its own error names the key inside it
            try:
                return coerce(value, arg, path, build)
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
        return build(tp, value, path)
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, value, tp)
        args = get_args(tp)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(coerce(v, item, f"{path}[{i}]", build) for i, v in enumerate(value))
        if len(value) != len(args):
            raise DmclipError(f"{path} = {value!r} has {len(value)} items, expected {len(args)}",
                              f"set {path} to a list of {len(args)} values")
        return tuple(coerce(v, a, f"{path}[{i}]", build) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list or tp is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, value, tp)
        args = get_args(tp)
        item = args[0] if args else Any
        return [coerce(v, item, f"{path}[{i}]", build) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(path, value, tp)
        args = get_args(tp)
        if len(args) == 2:
            return {coerce(k, args[0], path, build): coerce(v, args[1], f"{path}.{k}", build) for k, v in value.items()}
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
    return DmclipError(f"{path} = {value!r} has the wrong type: expected {type_name(tp)}",
                       f"set {path} to a value of type {type_name(tp)}")


def check_range(f: dataclasses.Field, value: Any, path: str) -> None:
    """The ``min``, ``max`` and ``choices`` of a ``field()`` (each item of a list value is checked)."""
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

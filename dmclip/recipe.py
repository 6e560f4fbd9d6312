"""Recipes as plain data: YAML read with ``safe_load`` semantics, refusing code tags, duplicated keys and
recursive anchors, with one-line errors that name the line (``--set`` values are read the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dmclip.errors import DmclipError


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

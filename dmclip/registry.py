"""One generic name -> factory registry per pluggable kind (timm-style).

    from dmclip.registry import students

    @students.register("mamba-ti", description="Vision-Mamba tiny", tiny={"depth": 2, "width": 32})
    def mamba_ti(**kw): ...

    students.get("mamba-ti", embed_dim=64)      # builds it
    students.names("mamba*")                    # -> ["mamba-b", "mamba-s", "mamba-ti", ...]

``references`` holds the schemes of model references (``run:<dir>``, ``builtin:<name>``, ...), the text before
the first colon of a ``--model``/``--teacher`` value. Built-in entries live in the packages listed in ``_BUILTIN_PACKAGES`` (each package imports its
modules in ``__init__``); ``families`` maps the ``"family"`` of a saved model.json to the builder that
rebuilds it. Third-party plugins are modules named in the ``dmclip.plugins``
entry-point group, imported once. A duplicate name is an error, never a silent overwrite.

A plugin package declares, in its pyproject.toml::

    [project.entry-points."dmclip.plugins"]
    my_models = "my_package.dmclip_plugin"            # a module: importing it registers entries
    my_losses = "my_package.plugin:register"          # or a function, called once with no arguments
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from dmclip.errors import DmclipError, did_you_mean

log = logging.getLogger(__name__)
T = TypeVar("T")

# Packages whose import registers the built-in entries.
_BUILTIN_PACKAGES = ["dmclip.data", "dmclip.models", "dmclip.losses", "dmclip.compress"]
PLUGIN_GROUP = "dmclip.plugins"
_loaded = False
_failure: DmclipError | None = None  # a broken plugin: every later lookup reports it again
_SINGULAR = {"references": "reference scheme", "students": "student", "losses": "loss", "datasets": "dataset",
             "selectors": "selector", "families": "model family"}


@dataclass
class Entry(Generic[T]):
    name: str
    factory: Callable[..., T]
    description: str = ""
    tiny: dict[str, Any] = field(default_factory=dict)  # kwargs for a variant that builds on CPU in < 1 s
    source: str = "dmclip"  # "dmclip" or the plugin's entry-point name


class Registry(Generic[T]):
    """Name -> factory for one kind of thing (students, losses, datasets, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, description: str | None = None, tiny: dict | None = None):
        """Decorator: register ``factory`` under ``name``. The description defaults to the docstring."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            self.add(name, factory, description=description, tiny=tiny)
            return factory

        return decorator

    def add(self, name: str, factory: Callable[..., T], *, description: str | None = None,
            tiny: dict | None = None, source: str | None = None) -> None:
        if not isinstance(name, str) or not name.strip():
            raise DmclipError(f"{self.kind} entry name {name!r} is not a non-empty string", "register a plain name")
        if name in self._entries:
            old = self._entries[name]
            raise DmclipError(
                f"{self.kind} name {name!r} is registered twice ({old.source} and {source or _current_source()})",
                "rename one of them: a name must be unique, dmclip never overwrites an entry",
            )
        lines = (factory.__doc__ or "").strip().splitlines()
        doc = description or (lines[0].strip() if lines else "")
        self._entries[name] = Entry(name, factory, doc, dict(tiny or {}), source or _current_source())

    def entry(self, name: str) -> Entry[T]:
        load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise DmclipError(f"no {_SINGULAR.get(self.kind, self.kind)} named {name!r}",
                              did_you_mean(name, self._entries) + f" (`dmclip list {self.kind}` shows all)") from None

    def get(self, name: str, **kwargs) -> T:
        """Build the entry ``name`` with ``kwargs``."""
        return self.entry(name).factory(**kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        load_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def entries(self, pattern: str = "*") -> list[Entry[T]]:
        return [self._entries[n] for n in self.names(pattern)]

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._entries

    def __len__(self) -> int:
        load_plugins()
        return len(self._entries)

    def _remove(self, name: str) -> None:  # tests only
        self._entries.pop(name, None)


_source_stack: list[str] = []


def _current_source() -> str:
    return _source_stack[-1] if _source_stack else "dmclip"


references: Registry = Registry("references")  # model reference schemes: run:, builtin:, open_clip:, store: ...
students: Registry = Registry("students")
losses: Registry = Registry("losses")
datasets: Registry = Registry("datasets")
selectors: Registry = Registry("selectors")
families: Registry = Registry("families")  # model.json's "family" -> fn(**arch) -> nn.Module
REGISTRIES: dict[str, Registry] = {r.kind: r for r in (references, students, losses, datasets, selectors, families)}
RENAMED = {"teachers": "references"}  # old registry names, still readable with a one-line warning


def __getattr__(name: str):
    """``from dmclip.registry import teachers`` (the old name of ``references``) still works, with a warning."""
    if name in RENAMED:
        log.warning("dmclip.registry.%s is now dmclip.registry.%s", name, RENAMED[name])
        return REGISTRIES[RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_plugins(force: bool = False) -> None:
    """Import the built-in packages, then every module named in the ``dmclip.plugins`` entry points.

    Runs once per process (``force=True`` re-scans, e.g. after installing a plugin). A plugin that
    fails to import raises a :class:`DmclipError` naming it, now and on every later call.
    """
    global _loaded, _failure
    if _loaded and not force:
        if _failure is not None:
            raise _failure
        return
    _loaded, _failure = True, None
    for package in _BUILTIN_PACKAGES:
        importlib.import_module(package)
    seen: set[str] = set()
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        if ep.value in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(ep.value)
        _source_stack.append(f"plugin {ep.name}")
        try:
            loaded = ep.load()
            if callable(loaded) and not isinstance(loaded, type):
                loaded()
        except DmclipError as exc:
            _failure = DmclipError(f"plugin {ep.name!r} ({ep.value}): {exc.message}", exc.hint)
            raise _failure from exc
        except Exception as exc:  # a broken plugin must not take the CLI down with a traceback
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            _failure = DmclipError(f"plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {first}",
                                   f"fix or uninstall the package that provides it (pip uninstall "
                                   f"{ep.dist.name if ep.dist else '<package>'})")
            raise _failure from exc
        finally:
            _source_stack.pop()

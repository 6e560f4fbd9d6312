"""`dmclip list`: what the registries hold."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from dmclip.cli.common import console
from dmclip.errors import DmclipError, did_you_mean


def _param_count(entry) -> str:
    """Parameters of the entry's default build, where that is cheap (models only).

    Built on the meta device: shapes without memory or init time, and nothing is downloaded.
    """
    import torch
    from torch import nn

    from dmclip.models.base import count_parameters

    try:
        with torch.device("meta"):
            obj = entry.factory()
    except Exception:  # noqa: BLE001 - a factory that needs arguments or real data just shows '-'
        return "-"
    if not isinstance(obj, nn.Module):
        return "-"
    n = count_parameters(obj)
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def register(app: typer.Typer) -> None:
    @app.command("list")
    def list_registry(
        kind: Annotated[str | None, typer.Argument(
            help="references | students | losses | datasets | selectors | families (all when omitted).")] = None,
        pattern: Annotated[str, typer.Option("--pattern", "-p", help="Glob on names, e.g. 'mamba*'.")] = "*",
    ) -> None:
        """List registered reference schemes, students, losses, datasets, selectors, families.

        Example: dmclip list students --pattern 'mamba*'
        """
        import logging

        from dmclip.registry import REGISTRIES, RENAMED, load_plugins

        load_plugins()
        if kind in RENAMED:
            logging.getLogger("dmclip").warning("`dmclip list %s` is now `dmclip list %s`", kind, RENAMED[kind])
            kind = RENAMED[kind]
        if kind is not None and kind not in REGISTRIES:
            raise DmclipError(f"no registry named {kind!r}", did_you_mean(kind, REGISTRIES))
        kinds = [kind] if kind else list(REGISTRIES)
        for k in kinds:
            registry = REGISTRIES[k]
            table = Table(title=k, title_justify="left")
            table.add_column("name", style="bold")
            table.add_column("description")
            models = k == "students"  # references are schemes, families need an arch: no default build
            if models:
                table.add_column("params", justify="right")
            table.add_column("source")
            for entry in registry.entries(pattern):
                row = [Text(entry.name), Text(entry.description)]
                if models:
                    row.append(_param_count(entry))
                table.add_row(*row, Text(entry.source))
            if not registry.names(pattern):
                table.add_row("(none)", "", *([""] if models else []), "")
            console.print(table)

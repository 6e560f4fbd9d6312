"""`dmclip data`: export splits to real formats, draw sample grids."""

from __future__ import annotations

import typer

from dmclip.cli.common import not_built

data_app = typer.Typer(help="Export datasets and draw sample grids.\n\nExample: dmclip data show world-train -o grid.png",
                       no_args_is_help=True)


def _placeholder(name: str):
    def command(ctx: typer.Context) -> None:
        not_built(name)

    return command


def register(app: typer.Typer) -> None:
    for sub in ("export", "show"):
        command = _placeholder(f"data {sub}")
        command.__doc__ = f"(not built yet) Example: dmclip data {sub} --help"
        data_app.command(sub, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(command)
    app.add_typer(data_app, name="data")

"""`dmclip compress`."""

from __future__ import annotations

import typer

from dmclip.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("compress", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def compress(ctx: typer.Context) -> None:
        """(not built yet) Example: dmclip compress --help"""
        not_built("compress")

"""`dmclip distill`."""

from __future__ import annotations

import typer

from dmclip.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("distill", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def distill(ctx: typer.Context) -> None:
        """(not built yet) Example: dmclip distill --help"""
        not_built("distill")

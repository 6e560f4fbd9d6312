"""`dmclip pretrain`."""

from __future__ import annotations

import typer

from dmclip.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("pretrain", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def pretrain(ctx: typer.Context) -> None:
        """(not built yet) Example: dmclip pretrain --help"""
        not_built("pretrain")

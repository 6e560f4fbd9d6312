"""`dmclip capfilt`."""

from __future__ import annotations

import typer

from dmclip.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("capfilt", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def capfilt(ctx: typer.Context) -> None:
        """(not built yet) Example: dmclip capfilt --help"""
        not_built("capfilt")

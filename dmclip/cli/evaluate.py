"""`dmclip eval`: zero-shot, retrieval, caption, latency, suite."""

from __future__ import annotations

import typer

from dmclip.cli.common import not_built

eval_app = typer.Typer(help="Evaluate models: zero-shot, retrieval, caption, latency, suite.\n\n"
                            "Example: dmclip eval zero-shot --model run:runs/distill/<run>", no_args_is_help=True)


def _placeholder(name: str):
    def command(ctx: typer.Context) -> None:
        not_built(name)

    return command


def register(app: typer.Typer) -> None:
    for sub in ("zero-shot", "retrieval", "caption", "latency", "suite"):
        command = _placeholder(f"eval {sub}")
        command.__doc__ = f"(not built yet) Example: dmclip eval {sub} --help"
        eval_app.command(sub, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(command)
    app.add_typer(eval_app, name="eval")

"""`dmclip pretrain`."""

from __future__ import annotations

from typing import Annotated

import typer

from dmclip.cli.common import RecipeArg, RunOptions, console, eval_cells, metrics_table


def register(app: typer.Typer) -> None:
    @app.command("pretrain")
    @RunOptions.add
    def pretrain(
        recipe: RecipeArg = None,
        objective: Annotated[str | None, typer.Option("--objective", "-o", help="clip | blip")] = None,
        data: Annotated[str | None, typer.Option("--data", "-d", help="Training set spec \\[default: world-train].")] = None,
        steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
        batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Global batch size.")] = None,
        lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
        seeds: Annotated[str | None, typer.Option(
            "--seeds", help="Comma list of seeds (0,1,2): one run per seed in a sweep directory, and a summary "
                            "with mean ± std and a 95 % interval over the seeds. Overrides the recipe's "
                            "sweep.seeds.")] = None,
        *,
        options: RunOptions,
    ) -> None:
        """Train a CLIP or BLIP image-text model from scratch.

        Examples:

          dmclip pretrain recipes/pretrain-clip-teacher.yaml

          dmclip pretrain --objective blip --steps 2000 --set model.vision_width=192

          dmclip pretrain --resume runs/pretrain/<run>

          dmclip pretrain --seeds 0,1,2 --steps 400   (three runs; zero-shot mean ± std, 95 % CI)

          dmclip pretrain --report-to tensorboard   (then: tensorboard --logdir runs/pretrain)
        """
        from dmclip.pretrain import COMMAND
        from dmclip.runner import Run

        shortcuts = {"objective": objective, "data.train": data, "train.steps": steps,
                     "train.batch_size": batch_size, "train.lr": lr, **options.shortcuts()}
        outcome = options.launch(COMMAND, recipe=recipe, shortcuts=shortcuts, sweep={"seeds": seeds})
        if not outcome.reports:  # a torchrun rank other than 0: rank 0 reports
            return
        if isinstance(outcome, Run):
            console.print(metrics_table("pretrain", [_row(outcome.run_dir, outcome.result)]))
            console.print(f"model: run:{outcome.run_dir.path}", soft_wrap=True)
            return
        rows = [{"seed": m.config.seed, **_row(m.run_dir, m.result)} for m in outcome.members]
        console.print(metrics_table(f"pretrain over seeds ({outcome.sweep_dir.name})", rows))
        console.print(metrics_table("mean ± std [95 % CI] over seeds", [
            _interval_row(column, s) for column, s in outcome.summary["seeds"].items()], fmt="{:.4g}"))
        console.print(f"summary: {outcome.sweep_dir / 'summary.md'}", soft_wrap=True)


def _row(run_dir, result) -> dict:
    row = {"run": run_dir.path.name, "objective": result["objective"],
           "params (M)": result["parameters"] / 1e6, "steps": result["train"].get("steps"),
           "final loss": result["train"].get("loss")}
    zs = result.get("zeroshot")
    return {**row, **eval_cells(result), **({"acc@5 %": 100 * zs["acc5"]} if zs else {})}


def _interval_row(column: str, stats: dict) -> dict:
    """One summary column over seeds; accuracies in percent (the loss as it is)."""
    scale, name = (1, column) if column == "final loss" else (100, f"{column} %")
    return {"column": name, **{key: scale * stats[key] for key in ("mean", "std")},
            "CI low": scale * stats["low"], "CI high": scale * stats["high"]}

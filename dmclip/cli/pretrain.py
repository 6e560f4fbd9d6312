"""`dmclip pretrain`."""

from __future__ import annotations

from typing import Annotated

import typer

from dmclip.cli.common import (
    NameOpt,
    RecipeArg,
    ReportToOpt,
    ResumeOpt,
    RunsDirOpt,
    SeedOpt,
    SetOpt,
    console,
    execute,
    metrics_table,
    report_to_names,
)


def register(app: typer.Typer) -> None:
    @app.command("pretrain")
    def pretrain(
        recipe: RecipeArg = None,
        objective: Annotated[str | None, typer.Option("--objective", "-o", help="clip | blip")] = None,
        data: Annotated[str | None, typer.Option("--data", "-d", help="Training set spec [default: world-train].")] = None,
        steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
        batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Global batch size.")] = None,
        lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
        seed: SeedOpt = None,
        report_to: ReportToOpt = None,
        set_: SetOpt = None,
        name: NameOpt = None,
        runs_dir: RunsDirOpt = None,
        resume: ResumeOpt = None,
    ) -> None:
        """Train a CLIP or BLIP image-text model from scratch.

        Examples:

          dmclip pretrain recipes/pretrain-clip-teacher.yaml

          dmclip pretrain --objective blip --steps 2000 --set model.vision_width=192

          dmclip pretrain --resume runs/pretrain/<run>

          dmclip pretrain --report-to tensorboard   (then: tensorboard --logdir runs/pretrain)
        """
        from dmclip import pretrain as lib

        shortcuts = {"objective": objective, "data.train": data, "train.steps": steps,
                     "train.batch_size": batch_size, "train.lr": lr, "seed": seed,
                     "train.report_to": report_to_names(report_to)}
        run, result = execute("pretrain", lib.PretrainConfig, lib.run, recipe=recipe, sets=set_, shortcuts=shortcuts,
                              name=name, runs_dir=runs_dir, resume=resume)
        if set(result) == {"train"}:  # a non-zero torchrun rank: rank 0 reports
            return
        row = {"run": run.path.name, "objective": result["objective"],
               "params (M)": result["parameters"] / 1e6, "steps": result["train"].get("steps"),
               "final loss": result["train"].get("loss")}
        zs = result.get("zeroshot")
        if zs:
            row.update({"zero-shot acc@1 %": 100 * zs["acc1"], "acc@5 %": 100 * zs["acc5"]})
        console.print(metrics_table("pretrain", [row]))
        console.print(f"model: run:{run.path}")

"""`dmclip pretrain`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from dmclip.cli.common import RecipeArg, RunOptions, console, err_console, metrics_table, parse_seeds
from dmclip.errors import DmclipError


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
                            "with mean ± std and a 95 % interval over the seeds.")] = None,
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
        from dmclip import pretrain as lib

        shortcuts = {"objective": objective, "data.train": data, "train.steps": steps,
                     "train.batch_size": batch_size, "train.lr": lr, **options.shortcuts()}
        seed_list = parse_seeds(seeds) if seeds is not None else None
        if seed_list is not None and len(seed_list) > 1:
            if options.seed is not None:
                raise DmclipError("--seed and --seeds both given", "use --seed N for one run, --seeds 0,1,2 for several")
            if options.resume is not None:
                raise DmclipError("--resume continues one run, not a set of seeds",
                                  "resume the member run that was interrupted")
            _seeds(lib, seed_list, recipe, shortcuts, options)
            return
        if seed_list is not None:
            shortcuts["seed"] = seed_list[0]
        run, result = options.execute("pretrain", lib.PretrainConfig, lib.run, recipe=recipe, shortcuts=shortcuts)
        if set(result) == {"train"}:  # a non-zero torchrun rank: rank 0 reports
            return
        console.print(metrics_table("pretrain", [_row(run, result)]))
        console.print(f"model: run:{run.path}")


def _row(run, result) -> dict:
    row = {"run": run.path.name, "objective": result["objective"],
           "params (M)": result["parameters"] / 1e6, "steps": result["train"].get("steps"),
           "final loss": result["train"].get("loss")}
    zs = result.get("zeroshot")
    if zs:
        row.update({"zero-shot acc@1 %": 100 * zs["acc1"], "acc@5 %": 100 * zs["acc5"]})
    return row


def _seeds(lib, seeds, recipe, shortcuts, options: RunOptions) -> None:
    """One pretrain run per seed inside a sweep directory, then the summary over seeds."""
    import copy
    import datetime as dt

    from dmclip.cli import common
    from dmclip.config import load_config
    from dmclip.runs import RunDir, default_runs_root

    base, recipe_text = load_config(lib.PretrainConfig, recipe, options.sets or [], shortcuts)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    label = options.name or (recipe.stem if recipe else "pretrain")
    sweep_dir = (options.runs_dir or default_runs_root()) / "pretrain" / f"{stamp}-seeds-{label}"
    sweep_dir.mkdir(parents=True, exist_ok=False)
    err_console.print(f"[dim]sweep directory:[/dim] {sweep_dir}")
    rows, members = [], []
    for seed in seeds:
        cfg = copy.deepcopy(base)
        cfg.seed = seed
        run = RunDir.create("pretrain", f"{label}-seed{seed}", cfg, parent=sweep_dir, recipe_text=recipe_text,
                            overrides=list(options.sets or []), argv=common.CURRENT_ARGV or ["dmclip", *sys.argv[1:]],
                            seed=seed)
        err_console.print(f"[bold]seed {seed}[/bold] -> {run.path}")
        with run.active():
            result = lib.run(cfg, run)
        rows.append({"seed": seed, **_row(run, result)})
        members.append((seed, run.path.name, result))
    summary = lib.seeds_report(sweep_dir, members)
    console.print(metrics_table(f"pretrain over seeds ({sweep_dir.name})", rows))
    console.print(metrics_table("mean ± std [95 % CI] over seeds", [
        {"column": column, "mean": s["mean"], "std": s["std"], "CI low": s["low"], "CI high": s["high"]}
        for column, s in summary["seeds"].items()], fmt="{:.4f}"))
    console.print(f"summary: {sweep_dir / 'summary.md'}")

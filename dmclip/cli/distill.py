"""`dmclip distill`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from dmclip.cli.common import RecipeArg, RunOptions, console, err_console, metrics_table, parse_seeds
from dmclip.errors import DmclipError


def parse_alphas(text: str | None) -> list[float] | None:
    """'0.75' -> [0.75]; '0,0.25,0.75,1' -> a sweep. Each in [0, 1]."""
    if text is None:
        return None
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise DmclipError(f"--alpha {text!r}: {part!r} is not a number",
                              "give one value or a comma list, e.g. --alpha 0.75 or --alpha 0,0.25,0.75,1") from None
        if not 0.0 <= value <= 1.0:
            raise DmclipError(f"--alpha {value} is out of range", "alpha weighs KD against contrastive: 0 <= alpha <= 1")
        if value in values:
            raise DmclipError(f"--alpha {text!r} repeats {value:g}", "list each sweep point once")
        values.append(value)
    return values


def sweep_alphas(recipe, alpha: str | None) -> list[float] | None:
    """The alphas to run: --alpha's, else the recipe's ``sweep: {alpha: [...]}``, else None (one run at the
    config's loss.alpha). The command line overrides the recipe, as it does for every other field."""
    from rich.markup import escape

    from dmclip.distill import recipe_sweep

    alphas = parse_alphas(alpha)
    in_recipe = recipe_sweep(recipe).get("alpha")  # checked even when overridden: a broken recipe is an error
    if alphas is None:
        return in_recipe
    if in_recipe is not None:
        err_console.print(f"[dim]--alpha {escape(alpha)} overrides the recipe's sweep.alpha[/dim]", highlight=False)
    return alphas


def sweep_seeds(recipe, seeds: str | None) -> list[int] | None:
    """The seeds to run every alpha at: --seeds's, else the recipe's ``sweep: {seeds: [...]}``, else None."""
    from rich.markup import escape

    from dmclip.distill import recipe_sweep

    in_recipe = recipe_sweep(recipe).get("seeds")
    if seeds is None:
        return in_recipe
    values = parse_seeds(seeds)
    if in_recipe is not None:
        err_console.print(f"[dim]--seeds {escape(seeds)} overrides the recipe's sweep.seeds[/dim]", highlight=False)
    return values


def sweep_members(alphas: list[float] | None, recipe=None, sets=None, shortcuts=None, runs_dir=None,
                  seeds: list[int] | None = None):
    """(shared config, recipe text, one config per (alpha, seed)): what a sweep runs, resolved but not run."""
    from dmclip import distill as lib
    from dmclip.config import load_config

    base, recipe_text = load_config(lib.DistillConfig, recipe, sets or [], shortcuts)
    base.teacher = lib.resolve_teacher_ref(base.teacher, runs_dir)  # all members share one teacher
    return base, recipe_text, lib.sweep_configs(base, alphas, seeds)


def _row(run, result) -> dict:
    zs = result.get("zeroshot") or {}
    return {"run": run.path.name, "alpha": result["alpha"], "student": result["student"],
            "image params (M)": result["image_parameters"] / 1e6, "final loss": result["train"].get("loss"),
            "zero-shot acc@1 %": 100 * zs["acc1"] if zs else None, "acc@5 %": 100 * zs["acc5"] if zs else None}


def register(app: typer.Typer) -> None:
    @app.command("distill")
    @RunOptions.add
    def distill(
        recipe: RecipeArg = None,
        alpha: Annotated[str | None, typer.Option(
            "--alpha", "-a", help="KD weight in [0,1]; a comma list runs a sweep (0,0.25,0.75,1). "
                                  "Overrides the recipe's loss.alpha and its sweep: {alpha: [...]}.")] = None,
        teacher: Annotated[str | None, typer.Option(
            "--teacher", "-t", help="builtin:world-vit, run:<dir>, open_clip:<arch>:<weights>, ensemble:<ref>+<ref>, or 'latest' CLIP pretrain run.")] = None,
        student: Annotated[str | None, typer.Option("--student", help="Registered student (dmclip list students).")] = None,
        data: Annotated[str | None, typer.Option("--data", "-d", help="Training set spec.")] = None,
        steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
        batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Global batch size.")] = None,
        seeds: Annotated[str | None, typer.Option(
            "--seeds", help="Comma list of seeds (0,1,2): every alpha runs at every seed, and the summary gives "
                            "mean ± std, 95 % intervals and paired differences. Overrides the recipe's sweep.seeds.")] = None,
        out: Annotated[Path | None, typer.Option("--out", help="distill cache: the store directory.")] = None,
        augmentations: Annotated[int, typer.Option(
            "--augmentations", help="distill cache: teacher views per image (the first is the full image).")] = 4,
        *,
        options: RunOptions,
    ) -> None:
        """Distil a CLIP teacher into a small student image encoder (Vision-Mamba by default).

        loss = alpha * KD + (1 - alpha) * contrastive.

        Examples:

          dmclip distill --alpha 0.75

          dmclip distill recipes/distill-demo.yaml --teacher run:runs/pretrain/<run> --student mamba-nano

          dmclip distill --alpha 0,0.25,0.75,1        (one student per alpha + a comparison table)

          dmclip distill --alpha 0,0.75 --seeds 0,1,2   (every alpha at 3 seeds: intervals, paired differences)

          dmclip distill recipes/distill-alpha-sweep.yaml    (the same, from the recipe's sweep: block)

          dmclip distill runs/distill/<stamp>-sweep-alpha/resolved.yaml   (run a sweep again)

          dmclip distill cache --teacher run:runs/pretrain/<run> --data world-train --out stores/teacher-k4

          dmclip distill --teacher embeddings:stores/teacher-k4   (train from cached teacher outputs)
        """
        from dmclip import distill as lib

        if recipe is not None and str(recipe) == "cache":
            _cache(teacher, data, out, augmentations, options.seed)
            return
        alphas = sweep_alphas(recipe, alpha)
        seed_list = sweep_seeds(recipe, seeds)
        if seed_list is not None and options.seed is not None:
            raise DmclipError("--seed and --seeds both given", "use --seed N for one run, --seeds 0,1,2 for a sweep")
        shortcuts = {"teacher": teacher, "student.name": student, "data.train": data, "train.steps": steps,
                     "train.batch_size": batch_size, **options.shortcuts()}
        if seed_list is not None and len(seed_list) == 1:
            shortcuts["seed"], seed_list = seed_list[0], None
        if (alphas is None or len(alphas) == 1) and seed_list is None:
            shortcuts["loss.alpha"] = alphas[0] if alphas else None
            run, result = options.execute("distill", lib.DistillConfig, lib.run, recipe=recipe, shortcuts=shortcuts)
            if set(result) == {"train"}:  # a non-zero torchrun rank: rank 0 reports
                return
            console.print(metrics_table("distill", [_row(run, result)]))
            console.print(f"student: run:{run.path}")
            return
        if options.resume is not None:
            raise DmclipError("--resume continues one run, not a sweep", "resume the member run that was interrupted")
        _sweep(lib, alphas, seed_list, recipe, shortcuts, options)


def _cache(teacher, data, out, augmentations, seed) -> None:
    """`dmclip distill cache`: write a reinforced store of teacher embeddings."""
    import time

    from dmclip.distill.cache import build_store
    from dmclip.models.teachers import resolve_teacher_ref

    if out is None:
        raise DmclipError("distill cache needs --out DIR", "e.g. --out stores/teacher-k4")
    if augmentations < 1:
        raise DmclipError(f"--augmentations {augmentations} must be at least 1", "use e.g. --augmentations 4")
    start = time.perf_counter()
    meta = build_store(resolve_teacher_ref(teacher or "latest"), data or "world-train", out,
                       augmentations=augmentations, seed=seed or 0)
    console.print(metrics_table("reinforced store", [{
        "store": str(out), "teacher": meta["teacher"], "images": meta["count"],
        "augmentations": meta["augmentations"], "captions/image": meta["captions_per_image"],
        "seconds": time.perf_counter() - start}]))
    console.print(f"use it: dmclip distill --teacher embeddings:{out}")


def _sweep(lib, alphas, seeds, recipe, shortcuts, options: RunOptions) -> None:
    """One run per (alpha, seed) inside a sweep directory, then the summary tables."""
    import datetime as dt

    from dmclip.cli import common
    from dmclip.distill.sweep import sweep_report
    from dmclip.io import atomic_write_text
    from dmclip.runs import RunDir, default_runs_root

    name = options.name
    base, recipe_text, configs = sweep_members(alphas, recipe, options.sets, shortcuts, options.runs_dir, seeds)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    sweep_dir = (options.runs_dir or default_runs_root()) / "distill" / f"{stamp}-sweep-{name or 'alpha'}"
    sweep_dir.mkdir(parents=True, exist_ok=False)
    alphas = list(dict.fromkeys(cfg.loss.alpha for cfg in configs))  # --seeds alone: the config's alpha
    block = {"alpha": alphas, **({"seeds": seeds} if seeds else {})}
    atomic_write_text(sweep_dir / "resolved.yaml", lib.sweep_yaml(base, block))
    err_console.print(f"[dim]sweep directory:[/dim] {sweep_dir}")
    rows, members = [], []
    for cfg in configs:
        alpha = cfg.loss.alpha
        label = f"{name or 'distill'}-alpha{alpha:g}" + (f"-seed{cfg.seed}" if seeds else "")
        run = RunDir.create("distill", label, cfg, parent=sweep_dir, recipe_text=recipe_text,
                            overrides=list(options.sets or []), argv=common.CURRENT_ARGV or ["dmclip", *sys.argv[1:]],
                            seed=cfg.seed)
        err_console.print(f"[bold]alpha {alpha:g}, seed {cfg.seed}[/bold] -> {run.path}")
        with run.active():
            result = lib.run(cfg, run)
        rows.append({**_row(run, result), "seed": cfg.seed})
        members.append((alpha, cfg.seed, f"run:{run.path}"))
    console.print(metrics_table(f"distill sweep ({sweep_dir.name})", rows))
    err_console.print("scoring every student and the teacher (eval suite, latency) ...")
    report = sweep_report(sweep_dir, members, base.teacher)
    console.print(metrics_table("RQ1: eval suite (fractions)", report["rq1"]["rows"], fmt="{:.3f}"))
    if report["seeds"]["differences"]:
        console.print(metrics_table(f"paired difference vs {report['seeds']['baseline']} (points, 95 % CI)",
                                    difference_rows(report["seeds"])))
    console.print(metrics_table("RQ2: image encoder cost", report["rq2"], fmt="{:.3g}"))
    console.print(f"summary: {sweep_dir / 'summary.md'} (+ summary.csv, summary-seeds.csv, summary.png)")


def difference_rows(stats: dict) -> list[dict]:
    """Avg Perf difference of each alpha against the baseline, as rows for the terminal table."""
    rows = []
    for arm, per_column in stats["differences"].items():
        d = per_column["Avg Perf"]
        rows.append({"alpha": arm, "seeds": d["seeds"], "Δ Avg Perf": 100 * d["diff"], "CI low": 100 * d["low"],
                     "CI high": 100 * d["high"], "significant": "yes" if d["significant"] else "no"})
    return rows

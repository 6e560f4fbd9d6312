"""`dmclip distill`."""

from __future__ import annotations

from typing import Annotated

import typer

from dmclip.cli.common import RecipeArg, RunOptions, console, eval_cells, metrics_table


def register(app: typer.Typer) -> None:
    @app.command("distill")
    @RunOptions.add
    def distill(
        recipe: RecipeArg = None,
        alpha: Annotated[str | None, typer.Option(
            "--alpha", "-a", help="KD weight in [0,1]; a comma list runs a sweep (0,0.25,0.75,1). "
                                  "Overrides the recipe's loss.alpha and its sweep: {alpha: [...]}.")] = None,
        teacher: Annotated[str | None, typer.Option(
            "--teacher", "-t", help="builtin:world-vit (default), run:<dir>, open_clip:<arch>:<weights>, "
                                    "store:<dir>, ensemble:<ref>+<ref>, or 'latest' CLIP pretrain run.")] = None,
        student: Annotated[str | None, typer.Option("--student", help="Registered student (dmclip list students).")] = None,
        data: Annotated[str | None, typer.Option("--data", "-d", help="Training set spec.")] = None,
        steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
        batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Global batch size.")] = None,
        seeds: Annotated[str | None, typer.Option(
            "--seeds", help="Comma list of seeds (0,1,2): every alpha runs at every seed, and the summary gives "
                            "mean ± std, 95 % intervals and paired differences. Overrides the recipe's sweep.seeds.")] = None,
        *,
        options: RunOptions,
    ) -> None:
        """Distil a CLIP teacher into a small student image encoder (Vision-Mamba by default).

        loss = alpha * KD + (1 - alpha) * contrastive.

        Examples:

          dmclip distill --alpha 0.75                 (the shipped teacher builtin:world-vit)

          dmclip distill recipes/distill-demo.yaml --teacher run:runs/pretrain/<run> --student mamba-nano

          dmclip distill --alpha 0,0.25,0.75,1        (one student per alpha + a comparison table)

          dmclip distill --alpha 0,0.75 --seeds 0,1,2   (every alpha at 3 seeds: intervals, paired differences)

          dmclip distill recipes/distill-alpha-sweep.yaml    (the same, from the recipe's sweep: block)

          dmclip distill runs/distill/<stamp>-sweep-alpha/resolved.yaml   (run a sweep again)

          dmclip distill --data csv:mine.csv --set eval.zeroshot=[imagefolder:zs]   (score your own set)

          dmclip distill --teacher store:stores/teacher-k4   (train from cached teacher outputs: dmclip reinforce)
        """
        from dmclip.distill import COMMAND
        from dmclip.runner import Run

        shortcuts = {"teacher": teacher, "student.name": student, "data.train": data, "train.steps": steps,
                     "train.batch_size": batch_size, **options.shortcuts()}
        outcome = options.launch(COMMAND, recipe=recipe, shortcuts=shortcuts, sweep={"alpha": alpha, "seeds": seeds})
        if not outcome.reports:  # a torchrun rank other than 0: rank 0 reports
            return
        if isinstance(outcome, Run):
            console.print(metrics_table("distill", [_row(outcome.run_dir, outcome.result)]))
            console.print(f"student: run:{outcome.run_dir.path}", soft_wrap=True)
            return
        _print_sweep(outcome)


def _row(run_dir, result) -> dict:
    return {"run": run_dir.path.name, "alpha": result["alpha"], "student": result["student"],
            "image params (M)": result["image_parameters"] / 1e6, "final loss": result["train"].get("loss"),
            **eval_cells(result)}


def _print_sweep(sweep) -> None:
    """The members, RQ1 (the suite, in percent), the paired differences and RQ2 of a distill sweep."""
    seeded = "seeds" in sweep.members[0].point
    rows = [{**_row(m.run_dir, m.result), **({"seed": m.config.seed} if seeded else {})} for m in sweep.members]
    console.print(metrics_table(f"distill sweep ({sweep.sweep_dir.name})", rows))
    report = sweep.summary
    rq1 = report["rq1"]
    console.print(metrics_table("RQ1: eval suite", [
        {"model": row["model"], **{f"{column} %": 100 * row[column] for column in rq1["columns"]}}
        for row in rq1["rows"]]))
    if report["seeds"]["differences"]:
        console.print(metrics_table(f"paired difference vs {report['seeds']['baseline']} (points, 95 % CI)",
                                    _difference_rows(report["seeds"])))
    if report["rq2"]:
        console.print(metrics_table("RQ2: image encoder cost", report["rq2"], fmt="{:.3g}"))
    console.print(f"summary: {sweep.sweep_dir / 'summary.md'} (+ summary.csv, summary-seeds.csv, summary.png)",
                  soft_wrap=True)


def _difference_rows(stats: dict) -> list[dict]:
    """Avg Perf difference of each alpha against the baseline, as rows for the terminal table."""
    rows = []
    for arm, per_column in stats["differences"].items():
        d = per_column["Avg Perf"]
        rows.append({"alpha": arm, "seeds": d["seeds"], "Δ Avg Perf (points)": 100 * d["diff"], "CI low": 100 * d["low"],
                     "CI high": 100 * d["high"], "significant": "yes" if d["significant"] else "no"})
    return rows

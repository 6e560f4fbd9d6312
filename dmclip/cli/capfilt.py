"""`dmclip capfilt`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmclip.cli.common import RecipeArg, RunOptions, console, metrics_table
from dmclip.errors import DmclipError


def register(app: typer.Typer) -> None:
    @app.command("capfilt")
    @RunOptions.add
    def capfilt(
        recipe: RecipeArg = None,
        model: Annotated[str | None, typer.Option("--model", "-m", help="BLIP model: run:<pretrain --objective "
                                                                         "blip run>.")] = None,
        data: Annotated[str | None, typer.Option("--data", "-d", help="Image-text set to bootstrap "
                                                                      "\\[default: world-noisy].")] = None,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="New dataset directory (a rerun with the same "
                                                                     "one continues it).")] = None,
        num_captions: Annotated[int | None, typer.Option("--num-captions", help="Synthetic captions per image "
                                                                                "(0 = filter only).")] = None,
        method: Annotated[str | None, typer.Option("--method", help="nucleus (default) or beam.")] = None,
        top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass \\[default: 0.9].")] = None,
        min_length: Annotated[int | None, typer.Option("--min-length", help="Fewest tokens per caption.")] = None,
        max_length: Annotated[int | None, typer.Option("--max-length", help="Most tokens per caption.")] = None,
        threshold: Annotated[float | None, typer.Option("--threshold", help="Keep pairs with ITM score >= this "
                                                                            "\\[default: 0.5].")] = None,
        keep_fraction: Annotated[float | None, typer.Option("--keep-fraction", help="Keep this fraction of pairs, "
                                                                                    "the best ITM scores.")] = None,
        score: Annotated[str | None, typer.Option("--score", help="Filter score: itm (BLIP's, default), itc, "
                                                                  "or itm+itc.")] = None,
        calibrate_on: Annotated[str | None, typer.Option("--calibrate-on", help="Clean set whose own pairs set the "
                                                                                "threshold (see --clean-keep).")] = None,
        clean_keep: Annotated[float | None, typer.Option("--clean-keep", help="With --calibrate-on: fraction of its "
                                                                              "pairs kept \\[default: 0.95].")] = None,
        finetune_on: Annotated[str | None, typer.Option("--finetune-on", help="Fine-tune captioner + filter on this "
                                                                              "clean set first.")] = None,
        steps: Annotated[int | None, typer.Option("--steps", help="Fine-tuning steps (with --finetune-on).")] = None,
        fmt: Annotated[str | None, typer.Option("--format", help="csv (default) or wds.")] = None,
        shard_size: Annotated[int | None, typer.Option("--shard-size", help="Images per resumable shard.")] = None,
        batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per model call.")] = None,
        limit: Annotated[int | None, typer.Option("--limit", help="Only the first N images.")] = None,
        *,
        options: RunOptions,
    ) -> None:
        """Bootstrap a noisy image-text set: synthetic captions, an ITM filter (BLIP's CapFilt).

        Writes csv:<out>/captions.csv for pretrain/distill, a manifest, and a report in the run directory.

        Examples:

          dmclip capfilt --model run:runs/pretrain/<blip run> --data world-noisy --out data/bootstrapped

          dmclip capfilt recipes/capfilt-bootstrap.yaml --model run:runs/pretrain/<blip run> --out data/boot

          dmclip capfilt --model run:<blip> --out data/boot --finetune-on world-train-clean --steps 200

          dmclip capfilt --model run:<blip> --out data/boot --keep-fraction 0.7   # re-filters stored scores

          dmclip capfilt --model run:<blip> --out data/boot --calibrate-on world-train:size=1000 --clean-keep 0.95
        """
        from dmclip.capfilt.pipeline import COMMAND

        if threshold is not None and keep_fraction is not None:
            raise DmclipError("--threshold and --keep-fraction both choose what the filter keeps",
                              "give one of them")
        if calibrate_on is not None and (threshold is not None or keep_fraction is not None):
            raise DmclipError("--calibrate-on sets the threshold; --threshold/--keep-fraction set it too",
                              "give --calibrate-on (with --clean-keep) or one of the others")
        if clean_keep is not None and calibrate_on is None and recipe is None and options.resume is None:
            raise DmclipError("--clean-keep needs a clean set to calibrate on",
                              "add --calibrate-on <clean set>, e.g. --calibrate-on world-train:size=1000")
        if steps is not None and finetune_on is None and recipe is None and options.resume is None:
            raise DmclipError("--steps sets the fine-tuning steps, but nothing is fine-tuned",
                              "add --finetune-on <clean set>, e.g. --finetune-on world-train-clean")
        shortcuts = {"model": model, "data": data, "output.out": str(out) if out is not None else None,
                     "captioner.num_captions": num_captions, "captioner.method": method, "captioner.top_p": top_p,
                     "captioner.min_length": min_length, "captioner.max_length": max_length,
                     "filter.threshold": threshold, "filter.keep_fraction": keep_fraction,
                     "filter.calibrate_on": calibrate_on if calibrate_on is not None else (
                         "" if threshold is not None or keep_fraction is not None else None),  # CLI beats recipe
                     "filter.clean_keep": clean_keep, "filter.score": score,
                     "finetune.data": finetune_on, "finetune.train.steps": steps, "output.format": fmt,
                     "output.shard_size": shard_size, "batch_size": batch_size, "limit": limit,
                     **options.shortcuts(report_to="finetune.train.report_to")}
        outcome = options.launch(COMMAND, recipe=recipe, shortcuts=shortcuts)
        result = outcome.result
        rows = [{"source": source, "pairs": row["total"], "kept": row["kept"], "removed": row["removed"]}
                for source, row in result["counts"].items()]
        console.print(metrics_table("capfilt: pairs by source", rows))
        noise = result.get("noise_removal")
        if noise:
            ap = (result.get("pr_curve") or {}).get("average_precision")
            console.print(metrics_table("noise removal (positive = noisy web caption)", [{
                "precision %": None if noise["precision"] is None else 100 * noise["precision"],
                "recall %": None if noise["recall"] is None else 100 * noise["recall"],
                "F1 %": None if noise["f1"] is None else 100 * noise["f1"],
                "AP %": None if ap is None else 100 * ap, "threshold": result["filter"]["threshold"]}]))
        console.print(f"dataset: {result['dataset']}  ({result['images']['with_kept_captions']} images)", soft_wrap=True)
        console.print(f"report: {outcome.run_dir.path / 'report.md'}", soft_wrap=True)

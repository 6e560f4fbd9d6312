"""`dmclip eval`: zero-shot, retrieval, caption, latency, suite (the library part is dmclip.evaluation)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated

import typer

from dmclip.cli.common import NameOpt, RunsDirOpt, SharedOptions, console, err_console, launch, metrics_table
from dmclip.errors import DmclipError
from dmclip.report import percent

eval_app = typer.Typer(help="Evaluate models: zero-shot, retrieval, caption, latency, suite.\n\n"
                            "Example: dmclip eval zero-shot --model run:runs/distill/<run>", no_args_is_help=True)

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="Model: run:<run dir>, open_clip:<arch>:<checkpoint, tag or random>, "
                          "open_clip:local-dir:<dir>, or a registered name.",
    show_default=False)]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Images per encoder call.", min=1)]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or auto (cuda when visible).")]


@dataclasses.dataclass
class EvalOptions(SharedOptions):
    """The options zero-shot, retrieval, caption and suite end with (latency times on the CPU unless told)."""

    device: DeviceOpt = "auto"
    runs_dir: RunsDirOpt = None
    name: NameOpt = None


def _slug(ref: str) -> str:
    return ref.rstrip("/").replace("open_clip:", "").split("/")[-1].replace(":", "-")[:40] or "model"


def _run(config_class, run, **kwargs) -> dict:
    """One eval run directory: ``run(config, run_dir)`` through the runner; returns the result."""
    from dmclip.runner import Command

    return launch(Command("eval", config_class, run), **kwargs).result


def _notes(result: dict) -> None:
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)


def register(app: typer.Typer) -> None:
    @eval_app.command("zero-shot")
    @EvalOptions.add
    def zero_shot_command(
        model: ModelOpt,
        data: Annotated[str, typer.Option("--data", "-d", help="Classification dataset spec.")] = "world-zeroshot",
        classnames: Annotated[Path | None, typer.Option(
            "--classnames", help="File with one class name per line, in label order (replaces the dataset's).",
            show_default=False)] = None,
        templates: Annotated[Path | None, typer.Option(
            "--templates", help="File with one prompt template per line; '{}' marks the class name.",
            show_default=False)] = None,
        batch_size: BatchOpt = 64,
        *,
        options: EvalOptions,
    ) -> None:
        """Zero-shot classification: acc@1, acc@5 and mean per-class recall (CLIP_benchmark's definitions).

        Example: dmclip eval zero-shot --model run:runs/pretrain/<run> --data world-shift
        """
        from dmclip.evaluate import ZeroShotConfig, run_zero_shot
        from dmclip.evaluation.loading import check_eval_model, load_model

        loaded = load_model(model, options.device)  # a bad reference fails before a run directory exists
        check_eval_model(loaded, "zero-shot")
        result = _run(ZeroShotConfig, lambda c, r: run_zero_shot(c, r, progress=True, model=loaded),
                      shortcuts={"model": model, "data": data, "batch_size": batch_size, "device": options.device,
                                 "classnames": str(classnames) if classnames else None,
                                 "templates": str(templates) if templates else None},
                      name=options.name or f"zero-shot-{_slug(model)}", runs_dir=options.runs_dir)
        m = result["metrics"]
        console.print(metrics_table(f"zero-shot · {model} · {result['dataset']}", [
            {"acc@1": m["acc1"], "acc@5": m["acc5"],
             "mean per-class recall": m["mean_per_class_recall"],
             "samples": result["details"]["num_samples"], "classes": result["details"]["num_classes"]}],
            percent=True))
        _notes(result)

    @eval_app.command("retrieval")
    @EvalOptions.add
    def retrieval_command(
        model: ModelOpt,
        data: Annotated[str, typer.Option("--data", "-d", help="Image-text dataset spec.")] = "world-retrieval-a",
        rerank_k: Annotated[int, typer.Option(
            "--rerank-k", help="Re-rank the top-k ITC candidates by ITM match probability (BLIP models; 0 = off).",
            min=0)] = 0,
        batch_size: BatchOpt = 64,
        *,
        options: EvalOptions,
    ) -> None:
        """Image-text retrieval both ways: R@1/5/10, mean and median rank (any caption of an image is a hit).

        Example: dmclip eval retrieval --model run:runs/pretrain/<run> --data world-retrieval-b --rerank-k 16
        """
        from dmclip.evaluate import RetrievalConfig, run_retrieval
        from dmclip.evaluation.loading import check_eval_model, load_model

        loaded = load_model(model, options.device)
        check_eval_model(loaded, "retrieval", rerank_k)
        result = _run(RetrievalConfig, lambda c, r: run_retrieval(c, r, progress=True, model=loaded),
                      shortcuts={"model": model, "data": data, "rerank_k": rerank_k, "batch_size": batch_size,
                                 "device": options.device},
                      name=options.name or f"retrieval-{_slug(model)}", runs_dir=options.runs_dir)
        m = result["metrics"]
        rows = [{"direction": label, **{f"R@{k}": m[f"{prefix}_recall@{k}"] for k in (1, 5, 10)},
                 "mean rank": m[f"{prefix}_mean_rank"], "median rank": m[f"{prefix}_median_rank"]}
                for label, prefix in (("text → image", "image_retrieval"), ("image → text", "text_retrieval"))]
        details = result["details"]
        console.print(metrics_table(f"retrieval · {model} · {result['dataset']} "
                                    f"({details['num_images']} images, {details['num_texts']} captions)", rows,
                                    percent=True))
        _notes(result)

    @eval_app.command("caption")
    @EvalOptions.add
    def caption_command(
        model: Annotated[str | None, typer.Option(
            "--model", "-m", help="Captioner: run:<BLIP run> (with --predictions: only the name results.json records).",
            show_default=False)] = None,
        predictions: Annotated[Path | None, typer.Option(
            "--predictions", help='Score these captions instead of generating them: a COCO results file '
                                  '[{"image_id": <dataset index>, "caption": "..."}] with one caption per image.',
            show_default=False)] = None,
        data: Annotated[str, typer.Option("--data", "-d", help="Image-text dataset spec (its captions are the references).")] = "world-retrieval-a",
        method: Annotated[str, typer.Option("--method", help="beam or nucleus.")] = "beam",
        num_beams: Annotated[int, typer.Option("--num-beams", help="Beams for beam search.", min=1)] = 3,
        top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling probability mass.", min=0.0, max=1.0)] = 0.9,
        max_length: Annotated[int, typer.Option("--max-length", help="Most tokens per caption.", min=1)] = 30,
        min_length: Annotated[int, typer.Option("--min-length", help="Fewest tokens per caption.", min=0)] = 5,
        limit: Annotated[int, typer.Option("--limit", help="Caption at most this many images (0 = all).", min=0)] = 0,
        meteor: Annotated[bool, typer.Option("--meteor/--no-meteor", help="Compute METEOR (a JVM, a few seconds).")] = True,
        seed: Annotated[int, typer.Option("--seed", help="Seed for nucleus sampling.")] = 0,
        batch_size: BatchOpt = 32,
        *,
        options: EvalOptions,
    ) -> None:
        """Caption images and score BLEU-1..4, METEOR, ROUGE-L, CIDEr as the COCO caption evaluation.

        Example: dmclip eval caption --model run:runs/pretrain/<blip run> --method nucleus --limit 200

        Scoring captions written elsewhere: dmclip eval caption --predictions captions.json --data world-retrieval-a
        """
        from dmclip.evaluate import CaptionConfig, run_caption
        from dmclip.evaluation.captioning import read_predictions
        from dmclip.evaluation.loading import check_eval_model, load_model

        if predictions is not None:  # a bad file fails before a run directory exists
            read_predictions(predictions, data, limit or None)
            loaded = None
        elif not model:
            raise DmclipError("eval caption needs a captioner or captions to score",
                              "pass --model run:<BLIP run>, or --predictions FILE (COCO results format)")
        else:
            loaded = load_model(model, options.device)
            check_eval_model(loaded, "caption")
        result = _run(CaptionConfig, lambda c, r: run_caption(c, r, progress=True, model=loaded),
                      shortcuts={"model": model, "data": data, "method": method, "num_beams": num_beams,
                                 "top_p": top_p, "max_length": max_length, "min_length": min_length,
                                 "limit": limit, "meteor": meteor, "seed": seed, "batch_size": batch_size,
                                 "device": options.device, "predictions": str(predictions) if predictions else None},
                      name=options.name or f"caption-{_slug(model or predictions.stem)}", runs_dir=options.runs_dir)
        m = result["metrics"]
        how = f"predictions {predictions}" if predictions is not None else method
        console.print(metrics_table(
            f"captioning · {model or predictions.name} · {result['dataset']} ({result['details']['num_images']} "
            f"images, {how})",
            [{"BLEU-1": m["bleu1"], "BLEU-2": m["bleu2"], "BLEU-3": m["bleu3"], "BLEU-4": m["bleu4"],
              "METEOR": m["meteor"], "ROUGE-L": m["rouge_l"], "CIDEr": m["cider"]}], percent=True))
        for index, text in list(result["captions"].items())[:3]:
            console.print(f"[dim]image {index}:[/dim] {text}", highlight=False)
        _notes(result)

    @eval_app.command("latency")
    def latency_command(
        model: ModelOpt,
        vs: Annotated[str | None, typer.Option("--vs", help="A second model, timed in the same process; "
                                                  "the table adds model / vs ratios.", show_default=False)] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size timed besides batch 1.", min=1)] = 32,
        warmup: Annotated[int, typer.Option("--warmup", help="Untimed calls first.", min=0)] = 5,
        runs: Annotated[int, typer.Option("--runs", help="Timed calls per encoder and batch size.", min=1)] = 30,
        threads: Annotated[int, typer.Option("--threads", help="torch threads (0 = as set, e.g. by OMP_NUM_THREADS).", min=0)] = 0,
        device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "cpu",
        runs_dir: RunsDirOpt = None,
        name: NameOpt = None,
    ) -> None:
        """Encoder latency (median, p90), parameters, FLOPs and peak activation memory.

        Example: dmclip eval latency --model run:runs/distill/<run> --vs run:runs/pretrain/<teacher run>
        """
        from dmclip.evaluate import LatencyConfig, run_latency
        from dmclip.evaluation.loading import load_model
        from dmclip.metrics.latency import latency_rows

        loaded = load_model(model, device)
        loaded_vs = load_model(vs, device) if vs else None
        result = _run(LatencyConfig,
                      lambda c, r: run_latency(c, r, progress=True, model=loaded, vs_model=loaded_vs),
                      shortcuts={"model": model, "vs": vs, "batch_size": batch_size, "warmup": warmup,
                                 "runs": runs, "threads": threads, "device": device},
                      name=name or f"latency-{_slug(model)}", runs_dir=runs_dir)
        details = result["details"]
        rows = latency_rows(result)
        console.print(metrics_table(f"latency · {details['threads']} threads · {details['device']} · "
                                    f"median/p90 of {details['runs']} runs", rows, fmt="{:.3g}"))
        console.print(f"model = {model}" + (f", vs = {vs}" if vs else ""), highlight=False)
        if "vs" in result:
            ratios = result["vs"]["ratios"]
            parts = [f"{key.replace('_', ' ')} ×{ratios[key]:.2f}" for key in ("params", "image_flops", "text_flops")
                     if ratios.get(key)]
            console.print(f"{model} / {vs}: " + ", ".join(parts), highlight=False)

    @eval_app.command("suite", context_settings={"allow_extra_args": True})
    @EvalOptions.add
    def suite_command(
        ctx: typer.Context,
        model: Annotated[str | None, typer.Option(
            "--model", "-m", help="One model reference (or use --models).", show_default=False)] = None,
        models: Annotated[list[str] | None, typer.Option(
            "--models", help="Several models for a comparison table: --models A B C.", show_default=False)] = None,
        zero_shot: Annotated[list[str] | None, typer.Option(
            "--zero-shot", help="Zero-shot sets (repeatable). Without --zero-shot and --retrieval: world-zeroshot, "
                                "world-shift and every other registered one.", show_default=False)] = None,
        retrieval: Annotated[list[str] | None, typer.Option(
            "--retrieval", help="Retrieval sets (repeatable). Without --zero-shot and --retrieval: world-retrieval-a, "
                                "world-retrieval-b.", show_default=False)] = None,
        arm: Annotated[list[str] | None, typer.Option(
            "--arm", help="An arm compared over seeds, NAME=REF,REF,... one model per seed (repeatable): each "
                          "arm's mean and interval, and its paired difference against --baseline.",
            show_default=False)] = None,
        baseline: Annotated[str | None, typer.Option(
            "--baseline", help="The --arm the others are compared with (default: the first).",
            show_default=False)] = None,
        latency: Annotated[bool, typer.Option(
            "--latency", help="With --arm: the accuracy-latency frontier against the reference model (the "
                              "first --models model): image-encoder latency at batch 1 and 64, interleaved.")] = False,
        reference: Annotated[str | None, typer.Option(
            "--reference", help="The model the frontier's latency ratios and kept Avg Perf are relative to.",
            show_default=False)] = None,
        latency_runs: Annotated[int, typer.Option(
            "--latency-runs", help="Timed calls per image encoder and batch size for the frontier.", min=1)] = 20,
        batch_size: BatchOpt = 64,
        *,
        options: EvalOptions,
    ) -> None:
        """The DM-CLIP table row: zero-shot, robustness and retrieval sets and their average (Avg Perf).

        Example: dmclip eval suite --models run:runs/pretrain/<teacher> run:runs/distill/<student>

        Over seeds: dmclip eval suite --arm noisy=run:<n0>,run:<n1>,run:<n2> --arm boot=run:<b0>,run:<b1>,run:<b2>

        Frontier: dmclip eval suite --models builtin:world-vit --arm mamba-64=<s0>,<s1>,<s2> --arm vit-64=... --latency
        """
        from dmclip.evaluate import SuiteConfig, run_suite, suite_arms
        from dmclip.evaluation.loading import check_eval_model, load_model

        refs = [model] if model else []
        if ctx.args and not models:
            raise DmclipError(f"unexpected arguments: {' '.join(ctx.args)}", "several models go after --models A B C")
        for item in [*(models or []), *ctx.args]:
            refs.extend(part for part in item.split(",") if part)
        arms = list(arm or [])
        refs += [ref for refs_ in suite_arms(SuiteConfig(arms=arms, baseline=baseline or "")).values()
                 for ref in refs_]
        if not refs:
            raise DmclipError("no model to evaluate", "pass --model REF, or --models A B C for a comparison")
        loaded = {ref: load_model(ref, options.device) for ref in dict.fromkeys(refs)}
        for ref_model in loaded.values():
            check_eval_model(ref_model, "retrieval")
        result = _run(SuiteConfig, lambda c, r: run_suite(c, r, progress=True, models=loaded),
                      shortcuts={"models": list(dict.fromkeys(refs)), "arms": arms, "baseline": baseline or "",
                                 "latency": latency, "reference": reference or "", "latency_runs": latency_runs,
                                 "zero_shot": list(zero_shot or []),
                                 "retrieval": list(retrieval or []), "batch_size": batch_size,
                                 "device": options.device},
                      name=options.name or f"suite-{_slug(refs[0])}" + (f"-and-{len(refs) - 1}" if len(refs) > 1 else ""),
                      runs_dir=options.runs_dir)
        # one row per column of the suite, one column per model: readable in an 80-column terminal
        labels = [f"#{i + 1}" for i in range(len(result["rows"]))] if len(result["rows"]) > 1 else ["value"]
        table_rows = []
        for column in result["columns"]:
            values = [row.get(column) for row in result["rows"]]
            finite = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
            best = max(finite) if len(values) > 1 and finite else None
            table_rows.append({"metric (%)": column, **{
                label: (f"[bold]{percent(v)}[/bold]" if v == best else percent(v)) for label, v in zip(labels, values)}})
        console.print(metrics_table("suite", table_rows, columns=["metric (%)", *labels]))
        if len(result["rows"]) > 1:
            for label, row in zip(labels, result["rows"]):
                console.print(f"[dim]{label}[/dim] = {row['model']}", highlight=False)
        err_console.print(f"[dim]embeddings cache: {result['cache']['hits']} hits, {result['cache']['misses']} "
                          "misses[/dim]")

    app.add_typer(eval_app, name="eval")

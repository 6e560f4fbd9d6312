"""`dmclip eval` as a command: one config per task and its ``run_*`` writer, which loads the model reference, runs
the task (:mod:`dmclip.evaluation`, the library) and writes results.json + report.md into the run directory."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from dmclip.config import field
from dmclip.errors import DmclipError
from dmclip.evaluation.benchmark import SUITE_RETRIEVAL, suite
from dmclip.evaluation.captioning import caption, score_captions
from dmclip.evaluation.loading import load_model, read_lines
from dmclip.evaluation.output import (
    CAPTION_ROWS,
    FOOTER,
    RETRIEVAL_ROWS,
    ZERO_SHOT_ROWS,
    latency_markdown,
    metrics_markdown,
    report_header,
    suite_csv,
    suite_markdown,
)
from dmclip.evaluation.timing import latency
from dmclip.evaluation.zeroshot_classification import zero_shot
from dmclip.evaluation.zeroshot_retrieval import retrieval
from dmclip.report import markdown_table

# help texts of fields that several eval configs declare
MODEL_HELP = "model reference: run:<dir>, builtin:<name>, open_clip:<arch>:<weights> or a registered name"
DEVICE_HELP = "cpu, cuda or auto (cuda when visible)"


@dataclass
class ZeroShotConfig:
    model: str = field("", MODEL_HELP)
    data: str = field("world-zeroshot", "classification dataset spec (registered name or real format)")
    classnames: str = field("", "file with one class name per line, in label order ('' = the dataset's)")
    templates: str = field("", "file with one prompt template per line, '{}' marks the class ('' = the dataset's)")
    batch_size: int = field(64, "images per encoder call", min=1)
    device: str = field("auto", DEVICE_HELP)


@dataclass
class RetrievalConfig:
    model: str = field("", MODEL_HELP)
    data: str = field("world-retrieval-a", "image-text dataset spec with one or more captions per image")
    rerank_k: int = field(0, "re-rank each query's top-k ITC candidates by ITM (BLIP models; 0 = off)", min=0)
    batch_size: int = field(64, "images per encoder call", min=1)
    device: str = field("auto", DEVICE_HELP)


@dataclass
class CaptionConfig:
    model: str = field("", "model reference of a captioner (a BLIP model)")
    data: str = field("world-retrieval-a", "image-text dataset spec whose captions are the references")
    method: str = field("beam", "decoding: beam search or nucleus sampling", choices=("beam", "nucleus"))
    num_beams: int = field(3, "beams for beam search", min=1)
    top_p: float = field(0.9, "nucleus sampling mass", min=0.0, max=1.0)
    max_length: int = field(30, "most tokens generated per caption", min=1)
    min_length: int = field(5, "fewest tokens before the caption may end", min=0)
    limit: int = field(0, "caption at most this many images (0 = all)", min=0)
    meteor: bool = field(True, "compute METEOR (starts a JVM, a few seconds)")
    seed: int = field(0, "seed for nucleus sampling")
    batch_size: int = field(32, "images per generate call", min=1)
    device: str = field("auto", DEVICE_HELP)
    predictions: str = field("", "COCO results file of captions to score instead of generating them "
                                 "('' = the model captions)")


@dataclass
class LatencyConfig:
    model: str = field("", "model reference to time")
    vs: str = field("", "a second model reference timed in the same process ('' = none)")
    batch_size: int = field(32, "the batch size timed besides batch 1", min=1)
    warmup: int = field(5, "untimed calls before timing", min=0)
    runs: int = field(30, "timed calls per encoder and batch size", min=1)
    threads: int = field(0, "torch intra-op threads (0 = leave as is)", min=0)
    device: str = field("cpu", "cpu, cuda or auto")


@dataclass
class SuiteConfig:
    models: list[str] = field([], "model references, one table row each")
    zero_shot: list[str] = field([], "zero-shot sets (with retrieval also []: world-zeroshot, world-shift and every "
                                     "other registered one)")
    retrieval: list[str] = field([], "retrieval sets, T→I and I→T R@1 each (with zero_shot also []: "
                                     "world-retrieval-a, world-retrieval-b)")
    batch_size: int = field(64, "images per encoder call", min=1)
    device: str = field("auto", DEVICE_HELP)
    arms: list[str] = field([], "groups of models compared over seeds, NAME=REF,REF,... (one model per seed, the "
                                "seeds in the same order in every arm); each arm's mean over seeds with its "
                                "interval and its paired difference against the baseline arm")
    baseline: str = field("", "the arm the others are compared with (default: the first)")
    latency: bool = field(False, "with arms: the accuracy-latency frontier, each arm's image encoder timed at "
                                 "batch 1 and 64 against the reference's, interleaved in one process")
    reference: str = field("", "the model latencies and kept Avg Perf are relative to, e.g. the teacher "
                               "(default: the first model that is in no arm)")
    latency_runs: int = field(20, "timed calls per encoder and batch size for the frontier", min=1)


def suite_arms(config: SuiteConfig) -> dict[str, list[str]]:
    """``arms`` as ``{name: [ref per seed]}``, refused when an arm is malformed or the arms differ in seeds."""
    arms: dict[str, list[str]] = {}
    for spec in config.arms:
        name, _, refs = spec.partition("=")
        models = [ref for ref in refs.split(",") if ref]
        if not name or not models or name in arms:
            raise DmclipError(f"arm {spec!r} is not NAME=REF,REF,... with a new name",
                              "e.g. --arm noisy=run:runs/pretrain/a,run:runs/pretrain/b")
        arms[name] = models
    counts = {name: len(models) for name, models in arms.items()}
    if len(set(counts.values())) > 1:
        raise DmclipError(f"the arms have different numbers of seeds: {counts}",
                          "give every arm one model per seed, the same seeds in the same order")
    if config.baseline and arms and config.baseline not in arms:
        raise DmclipError(f"baseline arm {config.baseline!r} is not one of the arms {sorted(arms)}",
                          "name one of the --arm names, or leave --baseline out for the first")
    return arms


def run_zero_shot(config: ZeroShotConfig, run_dir, progress: bool = False, model: nn.Module | None = None) -> dict:
    model = model if model is not None else load_model(config.model, config.device)
    result = zero_shot(model, config.data, batch_size=config.batch_size, model_name=config.model, progress=progress,
                       classnames=read_lines(config.classnames, "classnames") if config.classnames else None,
                       templates=read_lines(config.templates, "templates") if config.templates else None)
    run_dir.write_results(result)
    run_dir.write_text("report.md", report_header("Zero-shot classification", config.model, result)
                      + metrics_markdown(result, ZERO_SHOT_ROWS) + FOOTER)
    return result


def run_retrieval(config: RetrievalConfig, run_dir, progress: bool = False, model: nn.Module | None = None) -> dict:
    model = model if model is not None else load_model(config.model, config.device)
    result = retrieval(model, config.data, batch_size=config.batch_size, rerank_k=config.rerank_k,
                       model_name=config.model, progress=progress)
    run_dir.write_results(result)
    run_dir.write_text("report.md", report_header("Image-text retrieval", config.model, result)
                      + metrics_markdown(result, RETRIEVAL_ROWS) + FOOTER)
    return result


def run_caption(config: CaptionConfig, run_dir, progress: bool = False, model: nn.Module | None = None) -> dict:
    if config.predictions:
        result = score_captions(config.predictions, config.data, limit=config.limit or None, meteor=config.meteor,
                                model_name=config.model)
    else:
        model = model if model is not None else load_model(config.model, config.device)
        result = caption(model, config.data, method=config.method, num_beams=config.num_beams, top_p=config.top_p,
                         max_length=config.max_length, min_length=config.min_length, limit=config.limit or None,
                         batch_size=config.batch_size, meteor=config.meteor, seed=config.seed,
                         model_name=config.model, progress=progress)
    captions = result.pop("captions")
    # COCO results format, so the captions can be re-scored by any COCO tool
    run_dir.write_text("captions.json", json.dumps([{"image_id": k, "caption": v} for k, v in captions.items()],
                                                  indent=1))
    run_dir.write_results(result)
    samples = markdown_table(["image", "caption"], list(captions.items())[:10])
    run_dir.write_text("report.md", report_header("Captioning", config.model or f"predictions {config.predictions}",
                                                 result)
                      + metrics_markdown(result, CAPTION_ROWS)
                      + "\nCIDEr is shown ×100 like the other scores (results.json keeps the raw value).\n"
                      + f"\n## First captions\n\n{samples}" + FOOTER)
    result["captions"] = captions
    return result


def run_latency(config: LatencyConfig, run_dir, progress: bool = False, model: nn.Module | None = None,
                vs_model: nn.Module | None = None) -> dict:
    model = model if model is not None else load_model(config.model, config.device)
    vs = vs_model if vs_model is not None else (load_model(config.vs, config.device) if config.vs else None)
    result = latency(model, batch_size=config.batch_size, warmup=config.warmup, runs=config.runs,
                     threads=config.threads or None, vs=vs, model_name=config.model, vs_name=config.vs)
    run_dir.write_results(result)
    details = result["details"]
    legend = f"model = `{config.model}`" + (f", vs = `{config.vs}`" if config.vs else "") + "\n\n"
    run_dir.write_text("report.md", report_header("Latency", config.model, result) + legend + latency_markdown(result)
                      + "\n"
                      + f"threads: {details['threads']}, device: {details['device']}, warmup {details['warmup']}, "
                        f"{details['runs']} timed runs per row; total parameters {result['metrics']['params']:,}\n"
                      + FOOTER)
    return result


def run_suite(config: SuiteConfig, run_dir, progress: bool = False,
              models: Mapping[str, nn.Module] | None = None) -> dict:
    if not config.models and not config.arms:
        raise DmclipError("the suite needs at least one model", "pass --model REF, --models A B C or --arm NAME=A,B")
    tasks_dir = run_dir.path / "tasks"

    def save_task(result: dict) -> None:  # one CLIP_benchmark file per (model, dataset, task)
        from dmclip.io import atomic_write_json
        from dmclip.runs import slug

        name = f"{slug(result['model'] + '_' + result['pretrained'])}__{slug(result['dataset'])}__{result['task']}.json"
        atomic_write_json(tasks_dir / name, result)

    arms = suite_arms(config)
    in_arms = list(dict.fromkeys(ref for refs in arms.values() for ref in refs))
    reference = config.reference or next((ref for ref in config.models if ref not in in_arms), "")
    if config.latency and not arms:
        raise DmclipError("the frontier (--latency) places arms of seeds", "name them with --arm NAME=A,B,C")
    if config.latency and not reference:
        raise DmclipError("the frontier needs a reference model outside the arms",
                          "pass the teacher with --models REF (or --reference REF)")
    given = models or {}
    loaded = {ref: given.get(ref) or load_model(ref, config.device)
              for ref in dict.fromkeys([*config.models, *in_arms])}
    found_items: dict = {}
    named = bool(config.zero_shot or config.retrieval)  # naming one kind scores only what is named
    result = suite(loaded, zero_shot_specs=config.zero_shot if named else None,
                   retrieval_specs=config.retrieval if named else SUITE_RETRIEVAL,
                   batch_size=config.batch_size, progress=progress, device=config.device, on_task=save_task,
                   items=found_items)
    items = {ref: {column: hits.numpy() for column, hits in columns.items()} for ref, columns in found_items.items()}
    markdown = suite_markdown(result)
    if arms:
        markdown += _compare_arms(result, arms, config.baseline or next(iter(arms)), items, run_dir)
    if config.latency:
        from dmclip.evaluation.frontier import frontier, frontier_markdown, plot_frontier

        found = frontier(result, result["seeds"], arms, reference, loaded, items, runs=config.latency_runs)
        result["frontier"] = found
        plot_frontier(found, run_dir.path / "frontier.png")
        markdown += frontier_markdown(found) + "\n![accuracy against latency](frontier.png)\n"
    run_dir.write_results(result)
    run_dir.write_text("summary.md", markdown)
    run_dir.write_text("summary.csv", suite_csv(result))
    notes = sorted({f"{t['dataset']}: {n}" for t in result["tasks"] for n in t["notes"]})
    run_dir.write_text("report.md", "# Evaluation suite\n\nAll numbers in %; best per column in bold.\n\n" + markdown
                      + ("\n" + "".join(f"> note: {n}\n" for n in notes) if notes else "") + FOOTER)
    return result


def _compare_arms(result: dict, arms: dict[str, list[str]], baseline: str, items: dict, run_dir) -> str:
    """The arms over seeds: result["seeds"], summary-seeds.csv, items.npz and the two tables (markdown)."""
    from dmclip.evaluation.output import difference_table, seed_csv, seed_table, write_hits
    from dmclip.metrics.stats import compare_arms

    stats = compare_arms({name: [items[ref] for ref in refs] for name, refs in arms.items()}, baseline,
                         weights=result["avg_perf_weights"])
    result["seeds"] = {"arms": arms, **stats}
    run_dir.write_text("summary-seeds.csv", seed_csv(stats))
    write_hits(run_dir.path / "items.npz", items)
    columns = result["columns"]
    return ("\n## Over seeds: mean ± std [95 % t-interval] (percent)\n\n" + seed_table(stats, columns)
            + f"\n## Paired difference against {baseline} (points; 95 % bootstrap interval over seeds and "
              "evaluation items; * = the interval excludes 0)\n\n" + difference_table(stats, columns))


RUNNERS: dict[type, Callable] = {ZeroShotConfig: run_zero_shot, RetrievalConfig: run_retrieval,
                                 CaptionConfig: run_caption, LatencyConfig: run_latency, SuiteConfig: run_suite}


def run(config, run_dir, progress: bool = False) -> dict:
    """Run the eval task the config's type names inside ``run_dir`` (a RunDir); returns the result."""
    for cls, fn in RUNNERS.items():
        if isinstance(config, cls):
            return fn(config, run_dir, progress=progress)
    raise TypeError(f"not an eval config: {type(config).__name__}")

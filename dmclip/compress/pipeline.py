"""`dmclip compress eval` and `sweep`: the test split through the edge encoder once, then the uncompressed
baseline and each selector measured on those tokens (:mod:`dmclip.compress.measure`); results, tables and the
plot written into the run directory (:mod:`dmclip.compress.summary`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from dmclip.compress.config import CompressConfig, selector_from_config
from dmclip.compress.finetune import finetune_server
from dmclip.compress.measure import (
    add_ratios,
    edge_tokens,
    evaluate_selector,
    load_test_samples,
    score_captions,
)
from dmclip.compress.model import check_compress_model, load_compress_model
from dmclip.compress.selectors import Selector
from dmclip.compress.summary import csv_text, eval_report, plot_sweep, rows_markdown, seed_claims

log = logging.getLogger(__name__)


def run_eval(cfg: CompressConfig, run, *, model=None, dataset=None, train_dataset=None,
             score_fn: Callable[[dict, dict], dict] = score_captions) -> dict:
    """`dmclip compress eval`: the selector against the uncompressed baseline on the test split."""
    model = model if model is not None else load_compress_model(cfg.model)
    check_compress_model(model)
    images, references = load_test_samples(cfg, model.image_size, dataset)
    tokens, encoder_seconds = edge_tokens(model, images, cfg.batch_size)
    selector = selector_from_config(cfg)
    common = {"decode_cfg": cfg.decode, "batch_size": cfg.batch_size, "encoder_seconds": encoder_seconds,
              "score_fn": score_fn}
    baseline = evaluate_selector(model, tokens, references, selector_from_config(cfg, "none"), **common)
    row = add_ratios(evaluate_selector(model, tokens, references, selector, **common), baseline)
    add_ratios(baseline, baseline)
    result = {"selector": selector.describe(), "baseline": baseline, "compressed": row}
    if cfg.finetune.enabled:
        result["finetune"] = finetune_server(model, cfg, run, train_dataset)
        tuned = add_ratios(evaluate_selector(model, tokens, references, selector_from_config(cfg), **common),
                           baseline)
        result["compressed_finetuned"] = tuned
    run.write_results(result)
    run.write_text("report.md", eval_report(result))
    return result


def sweep_points(cfg: CompressConfig) -> list[Selector]:
    points: list[Selector] = []
    for name in cfg.sweep.selectors:
        if name == "kmeans":
            points += [selector_from_config(cfg, "kmeans", k=k) for k in cfg.sweep.k]
        elif name in ("random", "topk-norm"):
            points += [selector_from_config(cfg, name, fraction=f) for f in cfg.sweep.fractions]
        elif name == "pool":
            points += [selector_from_config(cfg, "pool", size=s) for s in cfg.sweep.pool_sizes]
        elif name == "tome":
            points += [selector_from_config(cfg, "tome", fraction=f) for f in cfg.sweep.tome_fractions]
        else:
            points.append(selector_from_config(cfg, name))
    return points


def run_sweep(cfg: CompressConfig, run, *, model=None, dataset=None,
              score_fn: Callable[[dict, dict], dict] = score_captions) -> dict:
    """`dmclip compress sweep`: every point of cfg.sweep -> summary.md, summary.csv, compress-sweep.png."""
    model = model if model is not None else load_compress_model(cfg.model)
    check_compress_model(model)
    points = sweep_points(cfg)
    images, references = load_test_samples(cfg, model.image_size, dataset)
    tokens, encoder_seconds = edge_tokens(model, images, cfg.batch_size)
    common = {"decode_cfg": cfg.decode, "batch_size": cfg.batch_size, "encoder_seconds": encoder_seconds,
              "score_fn": score_fn}
    baseline = evaluate_selector(model, tokens, references, selector_from_config(cfg, "none"), **common)
    add_ratios(baseline, baseline)
    rows = [baseline]
    for i, selector in enumerate(points):
        log.info("sweep point %d/%d: %s", i + 1, len(points), selector.describe())
        row = add_ratios(evaluate_selector(model, tokens, references, selector, **common), baseline)
        rows.append(row)
        run.log_metrics({"point": i, **{k: v for k, v in row.items() if k != "examples"}})
    table = rows_markdown(rows)
    run.write_text("summary.md", table)
    run.write_text("summary.csv", csv_text(rows))
    plot_path = plot_sweep(rows, Path(run.path) / "compress-sweep.png", cfg.sweep.metric)
    result = {"rows": rows, "metric": cfg.sweep.metric, "plot": str(plot_path), "claims": seed_claims(rows)}
    run.write_results(result)
    claims = "".join(f"- {c}\n" for c in result["claims"])
    run.write_text("report.md", f"# compress sweep\n\n{table}\n![sweep](compress-sweep.png)\n\n## seed claims\n{claims}")
    return result

"""`dmclip compress eval` and `sweep`: the test split through the edge encoder once, then the uncompressed
baseline and each selector measured on those tokens (:mod:`dmclip.compress.measure`); results, tables and the
plot written into the run directory (:mod:`dmclip.compress.summary`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import numpy as np

from dmclip.compress.codec import encode
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
from dmclip.compress.summary import (
    csv_text,
    eval_report,
    interval_markdown,
    plot_sweep,
    rows_markdown,
    seed_claims,
)
from dmclip.errors import DmclipError
from dmclip.io import atomic_write_npz
from dmclip.metrics.caption_intervals import bleu, caption_intervals
from dmclip.runs import RunDir

log = logging.getLogger(__name__)


def run_eval(cfg: CompressConfig, run, *, model=None, dataset=None, train_dataset=None,
             score_fn: Callable[[dict, dict], dict] = score_captions) -> dict:
    """`dmclip compress eval`: the selector against the uncompressed baseline on the test split; with
    ``--finetune-server`` the decoder trained on the selector's tokens at every fine-tuning seed, and with
    ``finetune.control`` a decoder trained the same steps on all tokens, read with both."""
    selector = selector_from_config(cfg)
    if cfg.finetune.enabled and cfg.finetune.control and selector.name == "none":
        raise DmclipError("finetune.control trains a decoder on all tokens, which --selector none already does",
                          "pick a selector to compare with, e.g. --selector kmeans --k 8")
    model = model if model is not None else load_compress_model(cfg.model)
    check_compress_model(model)
    images, references = load_test_samples(cfg, model.image_size, dataset)
    tokens, encoder_seconds = edge_tokens(model, images, cfg.batch_size)
    common = {"decode_cfg": cfg.decode, "batch_size": cfg.batch_size, "encoder_seconds": encoder_seconds,
              "score_fn": score_fn}
    baseline = evaluate_selector(model, tokens, references, selector_from_config(cfg, "none"), **common)
    row = add_ratios(evaluate_selector(model, tokens, references, selector, **common), baseline)
    add_ratios(baseline, baseline)
    label = selector.describe()
    by_label: dict[str, list[dict]] = {"none": [baseline], label: [row]}
    pairs: list[tuple[str, str]] = []
    result: dict = {"selector": label}
    if cfg.finetune.enabled:
        tuned, control, control_full = (f"{label}, server tuned on it", f"{label}, server tuned on all tokens",
                                        "none, server tuned on all tokens")
        result["finetune"] = []
        for seed in cfg.finetune.seeds or [cfg.seed]:
            seeded = replace(cfg, seed=seed)
            arms = [(tuned, seeded.selector, [(tuned, seeded.selector)])]
            if cfg.finetune.control:
                arms.append((control, "none", [(control, seeded.selector), (control_full, "none")]))
            for arm, trained_on, reads in arms:
                copy = deepcopy(model)
                child = RunDir.create("finetune", f"seed{seed}-{trained_on}", parent=Path(run.path) / "finetune")
                summary = finetune_server(copy, seeded, child, train_dataset, selector=trained_on)
                result["finetune"].append({"arm": arm, "seed": seed, "run": str(child.path), **summary})
                for read_label, read_with in reads:
                    measured = evaluate_selector(copy, tokens, references, selector_from_config(seeded, read_with),
                                                 **common)
                    by_label.setdefault(read_label, []).append({**add_ratios(measured, baseline), "seed": seed,
                                                                "label": read_label})
        pairs = [(label, tuned)] + ([(control, tuned), (control_full, tuned)] if cfg.finetune.control else [])
    rows, intervals, items = pool_seeds(by_label, pairs)
    by_name = {r["label"]: r for r in rows}
    result.update(rows=rows, intervals=intervals, baseline=rows[0], compressed=by_name[label])
    if cfg.finetune.enabled:
        result["compressed_finetuned"] = by_name[f"{label}, server tuned on it"]
    if items:  # per-image statistics of every point: intervals recomputed or other pairs compared later
        atomic_write_npz(Path(run.path) / "items.npz", items)
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
    """`dmclip compress sweep`: every point of cfg.sweep at every seed -> summary.md (with intervals over seeds
    and images), summary.csv, items.npz (per-image statistics), compress-sweep.png."""
    model = model if model is not None else load_compress_model(cfg.model)
    check_compress_model(model)
    images, references = load_test_samples(cfg, model.image_size, dataset)
    tokens, encoder_seconds = edge_tokens(model, images, cfg.batch_size)
    common = {"decode_cfg": cfg.decode, "batch_size": cfg.batch_size, "encoder_seconds": encoder_seconds,
              "score_fn": score_fn}
    baseline = evaluate_selector(model, tokens, references, selector_from_config(cfg, "none"), **common)
    add_ratios(baseline, baseline)
    seeds = list(cfg.sweep.seeds) or [cfg.seed]
    by_label: dict[str, list[dict]] = {"none": [baseline]}

    def measure(selector: Selector, seed: int, label: str | None = None) -> None:
        log.info("sweep seed %d: %s", seed, label or selector.describe())
        row = add_ratios(evaluate_selector(model, tokens, references, selector, **common), baseline)
        row = {**row, "label": label or row["label"], "seed": seed}
        by_label.setdefault(row["label"], []).append(row)
        run.log_metrics({k: v for k, v in row.items() if k not in ("examples", "items")})

    patches = tokens.shape[1] - (1 if cfg.class_token else 0)
    matched: list[tuple[int, int]] = []  # (k, random tokens at its bytes), from the first seed's k-means rows
    for s, seed in enumerate(seeds):
        seeded = replace(cfg, seed=seed)
        for selector in sweep_points(seeded):
            if selector.seeded or s == 0:
                measure(selector, seed)
        if s == 0 and cfg.sweep.matched_random:
            matched = [(rows[0]["setting"], _matched_count(seeded, tokens, patches, rows[0]["bytes_per_image"]))
                       for rows in by_label.values() if rows[0]["selector"] == "kmeans"]
        for k, count in matched:
            measure(selector_from_config(seeded, "random", fraction=count / patches), seed, _matched_label(count, k))
    pairs = [(_matched_label(count, k), f"kmeans k={k}") for k, count in matched]
    rows, intervals, items = pool_seeds(by_label, pairs)
    table = rows_markdown(rows) + (f"\n{interval_markdown(rows, intervals)}" if intervals else "")
    run.write_text("summary.md", table)
    run.write_text("summary.csv", csv_text([r for seed_rows in by_label.values() for r in seed_rows]))
    if items:  # per-image statistics of every point, so intervals can be recomputed or other pairs compared
        atomic_write_npz(Path(run.path) / "items.npz", items)
    plot_path = plot_sweep(rows, Path(run.path) / "compress-sweep.png", cfg.sweep.metric)
    result = {"rows": rows, "seeds": seeds, "intervals": intervals, "metric": cfg.sweep.metric,
              "plot": str(plot_path), "claims": seed_claims(rows, intervals)}
    run.write_results(result)
    claims = "".join(f"- {c}\n" for c in result["claims"])
    run.write_text("report.md", f"# compress sweep\n\n{table}\n![sweep](compress-sweep.png)\n\n## seed claims\n{claims}")
    return result


def _matched_label(count: int, k: int) -> str:
    return f"random {count} token{'' if count == 1 else 's'} (kmeans k={k} bytes)"


def _matched_count(cfg: CompressConfig, tokens, patches: int, target_bytes: float) -> int:
    """The fewest patch tokens random selection keeps whose codec frame is at least ``target_bytes``."""
    for count in range(1, patches + 1):
        selector = selector_from_config(cfg, "random", fraction=count / patches)
        if len(encode(selector.compress(tokens[:1]))) >= target_bytes:
            return count
    return patches


def pool_seeds(by_label: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> tuple[list[dict], dict, dict]:
    """One table row per point from its rows at every seed, the intervals and the arrays for items.npz.

    BLEU and CIDEr of a point pool its seeds' captions into one corpus (with one seed: the corpus scores);
    the other numbers are means over seeds. Without per-image statistics (a custom score function), the
    rows are the means and there are no intervals.
    """
    rows = []
    for seed_rows in by_label.values():
        row = {k: v for k, v in seed_rows[0].items() if k not in ("items", "seed")}
        for key, value in row.items():
            if isinstance(value, float):
                row[key] = float(np.mean([r[key] for r in seed_rows]))
        row["seeds"] = len(seed_rows)
        rows.append(row)
    if not all("items" in r for seed_rows in by_label.values() for r in seed_rows):
        return rows, {}, {}
    points = {label: {part: np.stack([r["items"][part] for r in seed_rows]) for part in ("bleu", "cider")}
              for label, seed_rows in by_label.items()}
    intervals = caption_intervals(points, "none", pairs)
    for row in rows:
        pooled = points[row["label"]]
        stats = pooled["bleu"].sum((0, 1))
        for order in range(1, 5):
            row[f"bleu{order}"] = float(bleu(stats, order))
        row["cider"] = float(pooled["cider"].mean())
    for row in rows:
        add_ratios(row, rows[0])
        for metric, values in intervals["points"][row["label"]].items():  # one value per quantity in all tables
            row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = values["value"], values["low"], values["high"]
    items = {f"{label}|{part}": values for label, parts in points.items() for part, values in parts.items()}
    return rows, intervals, items

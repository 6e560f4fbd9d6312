"""`dmclip capfilt` end to end: load (and optionally fine-tune) the BLIP model, caption and score every work
shard not yet committed, filter the stored scores, write the dataset, report into the run directory."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from dmclip.capfilt.config import CapfiltConfig
from dmclip.capfilt.scoring import calibrated_threshold, check_capfilt_model, score_clean_pairs, select_kept
from dmclip.capfilt.shards import (
    STATE_VERSION,
    out_path,
    prepare_out,
    process_shard,
    read_shard,
    shard_name,
    write_dataset,
)
from dmclip.capfilt.summary import plot_pr_curve, report_markdown, summarize
from dmclip.device import resolve_device
from dmclip.errors import DmclipError
from dmclip.progress import progress_bar
from dmclip.runner import Command

log = logging.getLogger(__name__)


def finetune(model, cfg: CapfiltConfig, run_dir) -> dict:
    """Fine-tune captioner + filter (all BLIP losses) on ``cfg.finetune.data`` with the engine, in the run
    directory ``run_dir``."""
    from dmclip.data import build_dataset
    from dmclip.train import fit
    from dmclip.train.tasks import BlipTask

    dataset = build_dataset(cfg.finetune.data, image_size=model.image_size)
    if getattr(dataset, "kind", "image-text") != "image-text":
        raise DmclipError(f"{cfg.finetune.data} is a classification set; fine-tuning needs captions",
                          "use an image-text set, e.g. --finetune-on world-train-clean")
    train = cfg.finetune.train
    task = BlipTask(model, cfg.seed, max(1, len(dataset) // train.batch_size))
    summary = fit(task, dataset, train, run_dir, seed=cfg.seed, resume=run_dir.checkpoint_path("last.pt").exists())
    model.eval()
    return summary



def run(cfg: CapfiltConfig, run_dir, progress: bool | None = None) -> dict:
    """Caption, filter and write the new dataset into ``cfg.output.out``; report into the run directory
    ``run_dir`` (a RunDir)."""
    from dmclip.data import build_dataset
    from dmclip.evaluation.loading import model_fingerprint
    from dmclip.models.base import load_saved_model, save_model
    from dmclip.models.refs import load_model_ref

    progress = cfg.progress if progress is None else progress
    if not cfg.model:
        raise DmclipError("capfilt needs a BLIP model", "pass --model run:runs/pretrain/<blip run>")
    if cfg.filter.calibrate_on and cfg.filter.keep_fraction > 0:  # refused before any work is done
        raise DmclipError("filter.calibrate_on and filter.keep_fraction both choose what the filter keeps",
                          "set one of them (keep_fraction: 0 to use the calibrated threshold)")
    out_path(cfg.output.out)  # a bad --out fails before any model is loaded
    if cfg.finetune.train.report_to:  # the fine-tuning rows and the results (filter counts, noise removal)
        from dmclip.train import distributed, report_to

        if distributed.is_main():
            report_to.attach(run_dir, cfg.finetune.train.report_to)
    model = load_model_ref(cfg.model)
    check_capfilt_model(model, cfg.model)
    torch.manual_seed(cfg.seed)
    # what the shards depend on; not the filter (a rerun may re-filter), nor limit (shards are keyed by their
    # sample range, so a larger limit continues the same dataset)
    finetune_state = None
    if cfg.finetune.data:
        finetune_state = dataclasses.asdict(cfg.finetune)
        for key in ("progress", "log_every", "checkpoint_every", "num_workers", "device", "report_to"):
            finetune_state["train"].pop(key, None)
    state = {"version": STATE_VERSION, "model_fingerprint": model_fingerprint(model),  # weights, not the path
             "data": cfg.data, "seed": cfg.seed, "captioner": dataclasses.asdict(cfg.captioner),
             "finetune": finetune_state, "shard_size": cfg.output.shard_size}
    out = prepare_out(cfg.output.out, state)

    finetune_summary = None
    if cfg.finetune.data:  # the fine-tuned model is kept beside the shards, so a rerun reuses it
        if (out / "finetuned-model" / "model.json").is_file():
            model = load_saved_model(out / "finetuned-model")
            log.info("using the fine-tuned captioner/filter in %s", out / "finetuned-model")
        else:
            finetune_summary = finetune(model, cfg, run_dir)
            save_model(model, run_dir.path / "model")
            save_model(model, out / "finetuned-model")
    device = resolve_device(cfg.device, hint="use device=cpu (or auto)")
    model = model.to(device).eval()

    dataset = build_dataset(cfg.data, image_size=model.image_size)
    if getattr(dataset, "kind", "image-text") != "image-text":
        raise DmclipError(f"{cfg.data} is a classification set; capfilt needs images with captions",
                          "use an image-text set, e.g. --data world-noisy or csv:PATH")
    total = len(dataset) if not cfg.limit else min(cfg.limit, len(dataset))
    size = cfg.output.shard_size
    bounds = [(k, begin, min(begin + size, total)) for k, begin in enumerate(range(0, total, size))]
    shards: list[dict | None] = [read_shard(out / "shards" / shard_name(k), a, b) for k, a, b in bounds]
    if any(cfg.filter.score not in c for s in shards if s is not None for x in s["samples"] for c in x["captions"]):
        raise DmclipError(f"{out} holds shards written without the {cfg.filter.score!r} score (an older dmclip)",
                          "capfilt into a new --out (or use filter.score=itm to re-filter these)")
    resumed = sum(s is not None for s in shards)
    done = sum(s["stop"] - s["start"] for s in shards if s is not None)
    if resumed:
        log.info("%s: %d of %d shards already written; continuing", out, resumed, len(bounds))
    began, processed_images = time.perf_counter(), 0
    with progress_bar(progress, "capfilt", total, completed=done, unit="images") as advance:
        for (k, a, b), shard in zip(bounds, shards):
            if shard is None:
                shards[k] = process_shard(model, dataset, k, a, b, cfg, out, device, advance)
                processed_images += b - a
    seconds = time.perf_counter() - began

    samples = [sample for shard in shards for sample in shard["samples"]]
    filter_cfg, calibration = cfg.filter, None
    scores = [c[filter_cfg.score] for s in samples for c in s["captions"]]
    if filter_cfg.calibrate_on:
        clean = score_clean_pairs(model, filter_cfg.calibrate_on, filter_cfg.calibrate_limit, cfg.batch_size, device,
                                  filter_cfg.score)
        calibration = {"data": filter_cfg.calibrate_on, "clean_keep": filter_cfg.clean_keep, "pairs": len(clean),
                       "threshold": calibrated_threshold(clean, filter_cfg.clean_keep),
                       "clean_score_quantiles": {str(q): float(np.quantile(clean, q)) for q in (0.05, 0.5, 0.95)}}
        log.info("threshold %.4f keeps %.0f %% of %d clean pairs of %s", calibration["threshold"],
                 100 * filter_cfg.clean_keep, len(clean), filter_cfg.calibrate_on)
    kept, threshold = select_kept(scores, calibration["threshold"] if calibration else filter_cfg.threshold,
                                  filter_cfg.keep_fraction)
    flags = iter(kept.tolist())
    for sample in samples:
        for caption in sample["captions"]:
            caption["kept"] = next(flags)
    warnings = []
    if scores and not kept.any():  # e.g. an under-trained ITM head whose scores never leave its prior (~1/3)
        warnings.append(f"the filter kept no pair: every {filter_cfg.score} score is under the threshold {threshold:g} (the highest "
                        f"is {max(scores):.3f}); re-filter the stored scores with --keep-fraction or a lower "
                        "--threshold (a rerun with the same --out only re-filters)")
        log.warning(warnings[-1])
    spec, written = write_dataset(out, samples, cfg.output.format, size)
    result = {"model": cfg.model, "data": cfg.data, "out": str(out), "dataset": spec, "format": cfg.output.format,
              "filter": {"score": filter_cfg.score, "threshold": threshold, "keep_fraction": cfg.filter.keep_fraction,
                         "calibration": calibration},
              "captioner": dataclasses.asdict(cfg.captioner),
              "finetune": finetune_summary, "skipped": sum(s["skipped"] for s in shards), "warnings": warnings,
              "shards": {"total": len(bounds), "resumed": resumed, "processed": len(bounds) - resumed},
              "images_per_s": processed_images / seconds if processed_images and seconds > 0 else 0.0,
              **summarize(samples, cfg.output.examples, filter_cfg.score)}
    if result["pr_curve"] and result["pr_curve"]["thresholds"]:
        plot_pr_curve(result["pr_curve"], result["noise_removal"], run_dir.path / "pr_curve.png",
                      title=f"noise removal on {cfg.data} by {filter_cfg.score}", score=filter_cfg.score)
    run_dir.write_text("report.md", report_markdown(result))
    run_dir.write_results(result)
    log.info("capfilt: %d images -> %s (%d with captions)", total, spec, written)
    return result


COMMAND = Command("capfilt", CapfiltConfig, run)  # what dmclip.runner.launch runs for `dmclip capfilt`

"""The configuration of `dmclip capfilt`: captioner, filter, optional fine-tuning, the output dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dmclip.config import field
from dmclip.train import TrainConfig


@dataclass
class CaptionerConfig:
    method: Literal["nucleus", "beam"] = field("nucleus", "decoding: nucleus sampling (BLIP's choice for CapFilt) "
                                                          "or beam search")
    num_captions: int = field(1, "synthetic captions written per image (0 = filter the web captions only)",
                              min=0, max=64)
    top_p: float = field(0.9, "nucleus sampling: smallest token set with this probability mass", min=0.0, max=1.0)
    num_beams: int = field(3, "beam search: beams (raised to num_captions when smaller)", min=1)
    min_length: int = field(5, "fewest tokens per synthetic caption (after the prompt, end token included)", min=0)
    max_length: int = field(20, "most tokens per synthetic caption (capped by the model's context length)", min=1)


SCORES = ("itm", "itc", "itm+itc")


@dataclass
class FilterConfig:
    score: Literal["itm", "itc", "itm+itc"] = field(
        "itm", "what the filter ranks pairs by: itm = BLIP's ITM match probability; itc = cosine of the unimodal "
               "image and text embeddings; itm+itc = logit(itm) + itc / temperature (all three are stored)")
    threshold: float = field(0.5, "keep a pair whose score is >= this (itm: a probability)", min=-1e9, max=1e9)
    keep_fraction: float = field(0.0, "when > 0: keep exactly round(fraction x pairs) pairs, those with the highest "
                                      "ITM scores (web and synthetic together), instead of the threshold",
                                 min=0.0, max=1.0)
    calibrate_on: str = field("", "clean image-text set whose own pairs set the threshold ('' = use threshold): "
                                  "the score that keeps clean_keep of them, e.g. world-train:size=1000")
    clean_keep: float = field(0.95, "with calibrate_on: fraction of the clean set's pairs the threshold keeps",
                              min=0.0, max=1.0)
    calibrate_limit: int = field(1000, "with calibrate_on: images of the clean set scored (0 = all)", min=0)


def _finetune_train() -> TrainConfig:
    return TrainConfig(steps=100, batch_size=32, lr=1e-4, warmup_steps=10, checkpoint_every=50)


@dataclass
class FinetuneConfig:
    data: str = field("", "clean image-text set to fine-tune captioner + filter on first ('' = none), "
                          "e.g. world-train-clean (BLIP uses COCO)")
    train: TrainConfig = field(factory=_finetune_train, help="fine-tuning optimisation (steps, lr, ...)")


@dataclass
class OutputConfig:
    out: str = field("", "output dataset directory; a rerun with the same directory continues it")
    format: Literal["csv", "wds"] = field("csv", "dataset files: csv (captions.csv + images/) or wds "
                                                 "(webdataset tar shards in wds/); the manifest is always written")
    shard_size: int = field(256, "images per work shard: the unit of resume", min=1)
    examples: int = field(8, "removed / added captions shown in report.md", min=0)


@dataclass
class CapfiltConfig:
    model: str = field("", "BLIP model reference, e.g. run:runs/pretrain/<blip run> (needs an ITM head and a "
                           "caption decoder)")
    data: str = field("world-noisy", "image-text set to bootstrap (registered name, csv:PATH, wds:PATH ...)")
    seed: int = field(0, "seed for caption sampling (per shard, so a resumed shard writes the same captions) "
                         "and fine-tuning")
    batch_size: int = field(64, "images per captioner / filter call", min=1)
    limit: int = field(0, "process only the first N images (0 = all)", min=0)
    device: str = field("auto", "auto (CUDA when available) | cpu | cuda", choices=("auto", "cpu", "cuda"))
    progress: bool = field(True, "Rich progress bar with images/s on stderr")
    captioner: CaptionerConfig = field(factory=CaptionerConfig, help="synthetic captions")
    filter: FilterConfig = field(factory=FilterConfig, help="ITM filter")
    finetune: FinetuneConfig = field(factory=FinetuneConfig, help="optional fine-tuning on a clean set first")
    output: OutputConfig = field(factory=OutputConfig, help="the new dataset")


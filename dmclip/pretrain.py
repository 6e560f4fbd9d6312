"""`dmclip pretrain`: train an image-text model from scratch — CLIP (ITC) or BLIP (ITC + ITM + LM).

Library entry points: ``run(config, run_dir) -> results`` for one run and ``COMMAND``, what
:func:`dmclip.runner.launch` runs (one run, or one per seed with ``seeds_report`` over them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from dmclip.config import field
from dmclip.errors import DmclipError
from dmclip.runner import Command, Member, score_and_write
from dmclip.train import TrainConfig
from dmclip.train.config import DataConfig, EvalAfterConfig
from dmclip.train.tasks import BlipTask, ClipTask

log = logging.getLogger(__name__)

STREAM_VOCAB_SAMPLES = 10_000  # a streamed training set's compact vocabulary comes from its first samples


@dataclass
class ModelConfig:
    image_size: int = field(32, "input image side in pixels", min=8, max=1024)
    patch_size: int = field(4, "ViT patch side in pixels", min=1)
    vision_width: int = field(128, "image tower width (channels)", min=8)
    vision_depth: int = field(4, "image tower blocks", min=1)
    vision_heads: int = field(4, "image tower attention heads", min=1)
    vision_stem: Literal["patch", "conv"] = field(
        "patch", "image tower stem: patch (linear patch embedding, as ViT) or conv (stride-2 3x3 convolutions to "
                 "the same token grid, Xiao et al. 2021)")
    text_width: int = field(128, "text tower width", min=8)
    text_depth: int = field(4, "text tower blocks", min=1)
    text_heads: int = field(4, "text tower attention heads", min=1)
    embed_dim: int = field(128, "joint embedding size", min=2)
    context_length: int = field(32, "text tokens per caption (captions are cut to fit)", min=4)
    compact_vocab: bool = field(True, "keep only the BPE tokens seen in the training captions (+ eval prompts) "
                                      "instead of open_clip's 49k table: a smaller, faster text tower")
    # BLIP only
    queue_size: int = field(1024, "BLIP: ITC feature queue length", min=0)
    momentum: float = field(0.995, "BLIP: momentum-encoder EMA factor", min=0.0, max=1.0)
    momentum_distill_weight: float = field(0.4, "BLIP: weight of the momentum encoder's soft targets in ITC "
                                                "(BLIP's momentum distillation)", min=0.0, max=1.0)
    label_smoothing: float = field(0.1, "BLIP: LM label smoothing", min=0.0, max=1.0)

    RENAMED: ClassVar[dict[str, str]] = {"distill_alpha": "momentum_distill_weight"}


@dataclass
class PretrainConfig:
    objective: Literal["clip", "blip"] = field("clip", "clip: InfoNCE only; blip: ITC + ITM + LM (captioning)")
    seed: int = field(0, "seed for init, data order and caption choice", min=0)
    model: ModelConfig = field(factory=ModelConfig, help="architecture")
    data: DataConfig = field(factory=DataConfig, help="data")
    train: TrainConfig = field(factory=TrainConfig, help="optimisation")
    eval: EvalAfterConfig = field(factory=EvalAfterConfig, help="evaluation at the end of training")

    # a recipe's `sweep: {seeds: [...]}` is read by dmclip.runner (each seed one run), not a field
    RECIPE_BLOCKS: ClassVar[tuple[str, ...]] = ("sweep",)


def fit_tokenizer(dataset, cfg: PretrainConfig) -> dict:
    """The tokenizer description for the new model (compact vocabulary over train captions + eval prompts)."""
    from dmclip.data import build_dataset
    from dmclip.data.tokenizer import Tokenizer

    if not cfg.model.compact_vocab:
        return {"context_length": cfg.model.context_length, "vocab": None}
    if hasattr(dataset, "first_captions"):  # a stream is not read whole: the vocabulary of its first samples
        first = dataset.first_captions(STREAM_VOCAB_SAMPLES)
        texts = [c for captions in first for c in captions]
        log.info("compact vocabulary from the captions of the first %d samples of %s (words first seen later read "
                 "as unknown; model.compact_vocab=false keeps open_clip's whole vocabulary)", len(first), dataset.name)
    else:
        texts = [c for i in range(len(dataset)) for c in dataset.captions(i)]
    for spec in cfg.eval.run_sets()[0] if cfg.eval.each_run else []:
        # prompt words only (no labels): so "a photo of a {}" is not unknown at eval
        zs = build_dataset(spec, image_size=cfg.model.image_size)
        texts += [t.format(c) for c in zs.classnames for t in zs.templates]
    return Tokenizer.fit(texts, cfg.model.context_length).to_dict()


def load_or_fit_tokenizer(run_dir, fit_fn) -> dict:
    """The run's tokenizer.json (a resumed run keeps the vocabulary it started with), else a new one."""
    import json

    from dmclip.io import atomic_write_json

    path = run_dir.path / "tokenizer.json"
    if path.exists():
        return json.loads(path.read_text())
    tokenizer = fit_fn()
    atomic_write_json(path, tokenizer)
    return tokenizer


def build_new_model(cfg: PretrainConfig, tokenizer: dict):
    from dmclip.models.base import build_model
    from dmclip.models.clip import clip_arch

    m = cfg.model
    if cfg.objective == "clip":
        return build_model(clip_arch(m.image_size, m.patch_size, m.vision_width, m.vision_depth, m.vision_heads,
                                     m.text_width, m.text_depth, m.text_heads, m.embed_dim, tokenizer,
                                     vision_stem=m.vision_stem))
    from dmclip.models.blip import BlipModel

    return BlipModel(image_size=m.image_size, patch_size=m.patch_size, vision_width=m.vision_width,
                     vision_depth=m.vision_depth, vision_heads=m.vision_heads, text_width=m.text_width,
                     text_depth=m.text_depth, text_heads=m.text_heads, embed_dim=m.embed_dim,
                     context_length=m.context_length, tokenizer=tokenizer, queue_size=m.queue_size,
                     momentum=m.momentum, alpha=m.momentum_distill_weight, label_smoothing=m.label_smoothing)


def run(cfg: PretrainConfig, run_dir) -> dict:
    """Train, save the model (safetensors + model.json) into ``run_dir/model`` (``run_dir``: the RunDir), score
    it, return results."""
    from dmclip.data import build_dataset
    from dmclip.models.base import count_parameters, save_model
    from dmclip.train import distributed, fit
    from dmclip.train.data import is_stream

    torch.manual_seed(cfg.seed)
    dataset = build_dataset(cfg.data.train, image_size=cfg.model.image_size,
                            max_skip_fraction=cfg.data.max_skip_fraction, allow_stream=True)
    if getattr(dataset, "kind", "image-text") != "image-text":
        raise DmclipError(f"{cfg.data.train} is a classification set; pretraining needs image-caption pairs",
                          "use an image-text set, e.g. world-train, csv:PATH or coco:JSON")
    resume = run_dir.checkpoint_path("last.pt").exists()
    tokenizer = load_or_fit_tokenizer(run_dir, lambda: fit_tokenizer(dataset, cfg))
    model = build_new_model(cfg, tokenizer)
    log.info("%s model: %.2f M parameters (image %.2f M), %s training pairs", cfg.objective,
             count_parameters(model) / 1e6, count_parameters(getattr(model, "visual", None)) / 1e6,
             (dataset.size or "streamed") if is_stream(dataset) else len(dataset))
    if cfg.objective == "clip":
        task = ClipTask(model, cfg.seed)
    else:
        size = dataset.size if is_stream(dataset) else len(dataset)
        if size is None:
            raise DmclipError(f"blip's ITC ramp needs the size of {cfg.data.train}, which is streamed",
                              "write sizes.json beside the shards, add samples=N to the spec, or stream=false")
        steps_per_epoch = max(1, size // cfg.train.batch_size)
        task = BlipTask(model, cfg.seed, steps_per_epoch)
    summary = fit(task, dataset, cfg.train, run_dir, seed=cfg.seed, resume=resume)
    if not distributed.is_main():  # rank 0 saves and scores; the other ranks are done
        return {"train": summary}
    save_model(model, run_dir.path / "model")
    results = {"objective": cfg.objective, "parameters": count_parameters(model),
               "image_parameters": count_parameters(model.visual), "train": summary}
    return score_and_write(run_dir, results, cfg.eval, cfg.data.train)


# the per-seed numbers a `pretrain --seeds` summary reports: (results key path, column name); then every other
# column of the run's eval suite (each set named in eval.zeroshot / eval.retrieval, and Avg Perf)
SEED_COLUMNS = ((("zeroshot", "acc1"), "zero-shot acc@1"), (("zeroshot", "acc5"), "zero-shot acc@5"),
                (("train", "loss"), "final loss"))


def seeds_report(sweep_dir, members: list[Member]) -> dict:
    """`pretrain --seeds`: one row per member (its seed, run directory name, results) and, per column, mean ± std with a 95 %
    t-interval over the seeds. Writes summary.md and summary.json into ``sweep_dir``; returns the summary."""
    from dmclip.io import atomic_write_json, atomic_write_text
    from dmclip.metrics.stats import seed_interval

    def value(results: dict, path: tuple[str, ...]):
        for key in path:
            results = results.get(key) if isinstance(results, dict) else None
        return results

    suite = list(members[0].result.get("eval", {}))
    first_set = next((c for c in suite if c.endswith(" acc@1")), None) if "zeroshot" in members[0].result else None
    columns = [(path, label) for path, label in SEED_COLUMNS + tuple((("eval", c), c) for c in suite if c != first_set)
               if all(value(m.result, path) is not None for m in members)]
    rows = [{"seed": m.config.seed, "run": m.run_dir.path.name, **{label: value(m.result, path) for path, label in columns}}
            for m in members]
    stats = {label: seed_interval([row[label] for row in rows]) for _, label in columns}
    percent = {label: path[0] != "train" for path, label in columns}

    def cell(x: float, label: str) -> str:
        return f"{100 * x:.2f}" if percent[label] else f"{x:.4f}"

    def interval(s: dict, label: str) -> str:
        if s["n"] < 2:
            return cell(s["mean"], label) + " (1 seed)"
        return f"{cell(s['mean'], label)} ± {cell(s['std'], label)} [{cell(s['low'], label)}, {cell(s['high'], label)}]"

    labels = [label + (" %" if percent[label] else "") for _, label in columns]
    zero_shot = f"; zero-shot: {first_set.removesuffix(' acc@1')}" if first_set else ""
    lines = [f"# pretrain over seeds\n\nseeds: {', '.join(str(row['seed']) for row in rows)}{zero_shot}\n",
             "| seed | run | " + " | ".join(labels) + " |", "|---:|---|" + "---:|" * len(labels)]
    lines += [f"| {row['seed']} | {row['run']} | " + " | ".join(cell(row[label], label) for _, label in columns) + " |"
              for row in rows]
    lines += ["", "mean ± std [95 % t-interval over seeds]:", "",
              "| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels),
              f"| {len(rows)} seeds | " + " | ".join(interval(stats[label], label) for _, label in columns) + " |"]
    atomic_write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    summary = {"rows": rows, "seeds": stats}
    atomic_write_json(sweep_dir / "summary.json", summary)
    return summary


def _label(name: str | None, recipe) -> str:
    return name or (recipe.stem if recipe else "pretrain")


COMMAND = Command("pretrain", PretrainConfig, run, sweep_fields={"seeds": "seed"},
                  summarize=lambda sweep_dir, members, base: seeds_report(sweep_dir, members),
                  sweep_name=lambda name, recipe: f"seeds-{_label(name, recipe)}",
                  member_name=lambda name, recipe, cfg, point: f"{_label(name, recipe)}-seed{cfg.seed}")

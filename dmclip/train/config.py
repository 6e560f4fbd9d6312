"""The configs the trainers share: the engine's (``train``, nested by pretrain, distill and capfilt), the training
data (``data``) and what is scored when training ends (``eval``, pretrain and distill)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from dmclip.config import field
from dmclip.errors import DmclipError

log = logging.getLogger(__name__)
WORLD_RUN_SETS = ("world-zeroshot",)  # what a run scores when its config names no set


@dataclass
class TrainConfig:
    steps: int = field(1000, "optimizer steps in the whole run (resume continues to this number)", min=1)
    batch_size: int = field(128, "GLOBAL samples per optimizer step (all ranks x accumulation micro-batches)", min=1)
    grad_accum: int = field(1, "micro-batches accumulated per optimizer step on each rank", min=1)
    lr: float = field(5e-4, "peak learning rate (reached at the end of warmup)", min=0.0)
    weight_decay: float = field(0.1, "AdamW decoupled weight decay on >=2-D weights (not norms, biases, "
                                     "embeddings, logit scale)", min=0.0)
    betas: list[float] = field([0.9, 0.98], "AdamW (beta1, beta2)", min=0.0, max=0.999999)
    eps: float = field(1e-6, "AdamW epsilon", min=0.0)
    warmup_steps: int = field(50, "linear warmup from lr/warmup_steps to lr over this many steps", min=0)
    min_lr_ratio: float = field(0.0, "cosine decays to min_lr_ratio * lr at the last step", min=0.0, max=1.0)
    grad_clip: float = field(1.0, "max global gradient L2 norm; 0 = no clipping", min=0.0)
    amp: str = field("off", "mixed precision: off | bf16 (CPU or CUDA) | fp16 (CUDA only, with a GradScaler)",
                     choices=("off", "bf16", "fp16"))
    compile: bool = field(False, "wrap the model in torch.compile (slow first steps, faster later ones)")
    log_every: int = field(10, "write a metrics.jsonl row every N steps (and at the last step)", min=1)
    checkpoint_every: int = field(200, "write checkpoints/last.pt every N steps (and at the end); 0 = only at "
                                       "the end", min=0)
    num_workers: int = field(0, "DataLoader worker processes per rank; 0 = load in the training process", min=0)
    progress: bool = field(True, "Rich progress bar on stderr (only shown on a terminal, on rank 0)")
    device: str = field("auto", "auto (CUDA when available, one GPU per rank) | cpu | cuda",
                        choices=("auto", "cpu", "cuda"))
    report_to: list[str] = field([], "dashboards that also get every metrics row and the results: tensorboard "
                                     "(<run>/tensorboard/), wandb (offline, <run>/wandb/); [] = metrics.jsonl only")

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise DmclipError(f"train.betas = {self.betas!r} must hold two numbers", "e.g. betas: [0.9, 0.98]")
        from dmclip.train.report_to import parse

        self.report_to = parse(self.report_to)  # "tensorboard,wandb" -> ["tensorboard", "wandb"], checked


@dataclass
class DataConfig:
    train: str = field("world-train", "training set spec (`dmclip list datasets`, csv:PATH, wds:PATH, coco:JSON ...)")
    max_skip_fraction: float = field(0.01, "fail once more than this fraction of samples is unreadable",
                                     min=0.0, max=1.0)


@dataclass
class EvalAfterConfig:
    zeroshot: list[str] = field([], "zero-shot sets scored after training, e.g. [world-shift, imagefolder:DIR]; with "
                                    "retrieval also [] the built-in world's: world-zeroshot after a run, the world "
                                    "suite in a sweep's summary")
    retrieval: list[str] = field([], "retrieval sets scored after training, e.g. [csv:test.csv] (T→I and I→T R@1)")
    each_run: bool = field(True, "score every trained model on the sets when its run ends (false: results.json holds "
                                 "no scores; a sweep's summary still scores every member)")
    latency: bool = field(True, "a distill sweep's RQ2 table (image encoder latency, parameters, FLOPs); false "
                                "skips it")
    batch_size: int = field(256, "evaluation batch size", min=1)

    def __post_init__(self) -> None:
        if self.zeroshot == [""]:  # older recipes and resolved.yaml files: `zeroshot: ''` scored nothing
            log.warning("eval.zeroshot: '' is read as eval.each_run: false (write that instead)")
            self.zeroshot, self.each_run = [], False
        for key in ("zeroshot", "retrieval"):
            for i, spec in enumerate(getattr(self, key)):
                where = f"eval.{key}[{i}]"
                if not spec.strip():
                    raise DmclipError(f"{where} is empty", f"name a set, e.g. --set eval.{key}=[world-shift]")
                if ":" not in spec and "=" in spec:  # `[world-zeroshot:size=9,seed=1]` read as a list of two
                    raise DmclipError(f"{where} = {spec!r} is a dataset option, not a set",
                                      "quote a spec that holds a comma, e.g. "
                                      f"--set 'eval.{key}=[\"world-zeroshot:size=200,seed=1\"]'")

    @property
    def named(self) -> bool:
        """Whether the config names its own sets (else the built-in world's are scored)."""
        return bool(self.zeroshot or self.retrieval)

    def run_sets(self) -> tuple[list[str], list[str]]:
        """(zero-shot sets, retrieval sets) a run scores when it ends: the named ones, else world-zeroshot."""
        if self.named:
            return list(self.zeroshot), list(self.retrieval)
        return list(WORLD_RUN_SETS), []

    def note_world_sets(self, data_spec: str) -> None:
        """One log line (once per process and training set) when the world's sets score a model trained on
        other data."""
        if not self.named and not data_spec.startswith("world-"):
            _note_world_sets(data_spec)


@functools.cache
def _note_world_sets(data_spec: str) -> None:
    log.info("scoring the built-in world's sets, not sets like %s: name yours with "
             "--set eval.zeroshot=[imagefolder:DIR] or --set eval.retrieval=[csv:FILE]", data_spec)

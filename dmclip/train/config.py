"""The training-engine config: one dataclass every trainer (pretrain, distill, capfilt) nests as ``train``."""

from __future__ import annotations

from dataclasses import dataclass

from dmclip.config import field


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
            from dmclip.errors import DmclipError

            raise DmclipError(f"train.betas = {self.betas!r} must hold two numbers", "e.g. betas: [0.9, 0.98]")
        from dmclip.train.report_to import parse

        self.report_to = parse(self.report_to)  # "tensorboard,wandb" -> ["tensorboard", "wandb"], checked

"""What the training loop advances and a checkpoint holds: :class:`TrainState`.

``checkpoint()`` and ``restore()`` are each other's inverse: the step, the data position, the model,
optimizer, schedule, scaler, RNG states and ``task.state_dict()``, all loadable with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmclip.config import to_dict
from dmclip.errors import DmclipError
from dmclip.train.config import TrainConfig
from dmclip.train.data import DataOrder, DataPosition, data_order
from dmclip.train.rng import rng_state, set_rng_state
from dmclip.train.schedule import WarmupCosine

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on >=2-D weights; none on biases, norms, embeddings and the logit scale/bias
    (as CLIP/open_clip train)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (*_NORM_TYPES, nn.Embedding)) or "norm" in type(module).__name__.lower():
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        if (param.ndim < 2 or id(param) in no_decay_ids or lowered.endswith("bias") or "logit_scale" in lowered
                or "embed" in lowered.rsplit(".", 1)[-1]):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class TrainState:
    """The model and its optimizer, schedule and scaler, the data order and the step they have reached.

    ``step`` counts completed optimizer steps; ``last_checkpoint_step`` is the step of the newest checkpoint
    written (None: none yet).
    """

    task: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    scaler: Any  # torch.amp.GradScaler, or None without fp16
    order: DataOrder  # or a StreamOrder (train.data.data_order)
    seed: int
    world: int
    step: int = 0
    last_checkpoint_step: int | None = None
    parameters: list[nn.Parameter] = field(default_factory=list)  # the trainable ones (gradient clipping)

    @classmethod
    def create(cls, task, model: nn.Module, dataset, cfg: TrainConfig, *, seed: int, world: int,
               rank: int) -> TrainState:
        groups = task.param_groups(model) if hasattr(task, "param_groups") else None
        if groups is None:
            groups = default_param_groups(model, cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps,
                                      weight_decay=cfg.weight_decay)
        schedule = WarmupCosine(optimizer, peak=cfg.lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                                min_lr_ratio=cfg.min_lr_ratio)
        scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        order = data_order(dataset, cfg.batch_size, seed=seed, grad_accum=cfg.grad_accum, world_size=world,
                           rank=rank, num_workers=cfg.num_workers)
        return cls(task, model, optimizer, schedule, scaler, order, seed, world,
                   parameters=[p for p in model.parameters() if p.requires_grad])

    # ------------------------------------------------------------------------------ checkpoint

    def checkpoint(self, cfg: TrainConfig) -> dict:
        """Everything :meth:`restore` needs to continue exactly where this step ends."""
        return {
            "format": CHECKPOINT_FORMAT, "step": self.step, "seed": self.seed, "world_size": self.world,
            "position": self.order.position.state_dict(), "dataset_size": self.order.n,
            "batch_size": cfg.batch_size, "model": self._changing(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {}, "rng": rng_state(),
            "task": self.task.state_dict() if hasattr(self.task, "state_dict") else {}, "config": to_dict(cfg),
        }

    def _changing(self, tensors: dict) -> dict:
        """The model's state without the tensors the task keeps constant and rebuilds the same way
        (``task.constant_prefixes``: a frozen copy of the teacher's text tower), which a checkpoint need not hold."""
        prefixes = tuple(getattr(self.task, "constant_prefixes", ()))
        if not prefixes:
            return tensors
        return {k: v for k, v in tensors.items() if not k.startswith(prefixes)}

    def save(self, run, cfg: TrainConfig, main: bool) -> Path | None:
        """Write last.pt for this step (rank 0); refuses non-finite weights so the last good one stays."""
        if main:
            bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise diverged(self.step, f"weights {', '.join(bad[:4])}", cfg, run, self.last_checkpoint_step)
        path = run.save_checkpoint(self.checkpoint(cfg)) if main else None
        self.last_checkpoint_step = self.step
        return path

    def resume(self, run, cfg: TrainConfig, main: bool) -> int | None:
        """Continue from the run's checkpoints/last.pt, if there is one; returns its step (None: none).
        Rank 0 drops the metrics rows logged after that step (they are logged again)."""
        resumed_from = None
        checkpoint_path = run.checkpoint_path()
        if checkpoint_path.is_file():
            self.restore(run.load_checkpoint(), cfg, main)
            resumed_from = self.last_checkpoint_step = self.step
            log.info("resuming from step %d (%s)", self.step, checkpoint_path)
        else:
            log.warning("no checkpoint in %s: starting from step 0", checkpoint_path.parent)
        if main:
            run.truncate_metrics(self.step)
        return resumed_from

    def restore(self, state: dict, cfg: TrainConfig, main: bool) -> None:
        """Load a :meth:`checkpoint` dict, each mismatch with this run a one-line error."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
            raise DmclipError("checkpoints/last.pt is not a dmclip training checkpoint",
                              "resume a run that dmclip trained, or start a new run")
        step = int(state["step"])
        if step > cfg.steps:
            raise DmclipError(f"the checkpoint is at step {step}, past train.steps = {cfg.steps}",
                              "resume with the run's own config (--resume reuses it)")
        if state.get("batch_size") != cfg.batch_size or state.get("dataset_size") != self.order.n:
            data = [f"{n} samples" if isinstance(n, int) else n for n in (state.get("dataset_size"), self.order.n)]
            raise DmclipError(
                f"the checkpoint was trained with batch_size {state.get('batch_size')} on {data[0]}, "
                f"this run has batch_size {cfg.batch_size} on {data[1]}",
                "resume with the same data and batch size (the data order depends on both"
                + (", and for a stream on the ranks and train.num_workers)" if isinstance(self.order.n, str) else ")"))
        current = self.model.state_dict()
        expected = self._changing(current)
        saved = state["model"]
        mismatch = ([f"{k} missing" for k in expected if k not in saved]
                    + [f"{k} unexpected" for k in saved if k not in current]  # a constant one saved: fine
                    + [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in current.items()
                       if k in saved and hasattr(saved[k], "shape") and saved[k].shape != v.shape])
        if mismatch:
            raise DmclipError(f"the checkpoint does not fit this model ({len(mismatch)} tensors differ, "
                              f"e.g. {mismatch[0]})", "resume with the same model config the run was started with")
        try:
            self.model.load_state_dict({**current, **saved})  # the constant tensors as the task rebuilt them
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DmclipError(f"the checkpoint does not fit this model: {str(exc).splitlines()[0][:200]}",
                              "resume with the same model config the run was started with") from None
        self.schedule.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if hasattr(self.task, "load_state_dict"):
            self.task.load_state_dict(state["task"])
        self.order.position = DataPosition(**state["position"])
        if main:  # the per-step reseed makes training exact anyway; this restores the rest
            set_rng_state(state["rng"])
        self.step = step


def diverged(step: int, detail: str, cfg: TrainConfig, run, last_checkpoint_step: int | None) -> DmclipError:
    """The error for a non-finite loss, gradient norm or weight at ``step``: what to change, what is kept."""
    kept = (f"the last good checkpoint (step {last_checkpoint_step}) is kept in {run.checkpoint_path()}"
            if last_checkpoint_step is not None else "no checkpoint was written before it")
    amp = f" or set train.amp=off (now {cfg.amp})" if cfg.amp != "off" else ""
    return DmclipError(f"training diverged at step {step}: non-finite {detail}",
                       f"lower train.lr (now {cfg.lr:g}){amp}, or lower train.grad_clip; {kept}")

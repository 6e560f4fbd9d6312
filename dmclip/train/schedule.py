"""Learning-rate schedule: linear warmup then cosine decay (open_clip's ``cosine_lr``, with a floor).

For the optimizer step ``s`` (0-based; the update that turns step s into step s+1):

    s < W:   lr(s) = peak * (s + 1) / W
    s >= W:  lr(s) = floor + (peak - floor) * (1 + cos(pi * (s - W) / max(1, S - W))) / 2,  floor = r * peak

with ``W`` warmup steps, ``S`` total steps and ``r`` = ``min_lr_ratio`` (SGDR, Loshchilov & Hutter 2017).
The schedule holds no state besides the step, so a resumed run recomputes it exactly.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, *, peak: float, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The learning rate of 0-based optimizer step ``step`` (see the module docstring)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    floor = min_lr_ratio * peak
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_outlasts_run(*, peak: float, steps: int, warmup_steps: int) -> str | None:
    """The warning for a warmup longer than the run (its lr never reaches ``peak``), naming the fix; None when
    the warmup ends within the run."""
    if warmup_steps <= steps:
        return None
    reached = lr_at(steps - 1, peak=peak, steps=steps, warmup_steps=warmup_steps, min_lr_ratio=0.0)  # in the warmup
    return (f"train.warmup_steps = {warmup_steps} is longer than the run (train.steps = {steps}): the learning rate "
            f"ends at {reached:.3g}, never reaching train.lr = {peak:.3g}; set --set train.warmup_steps=N with N "
            f"at most {steps}, e.g. --set train.warmup_steps={steps // 10}")


class WarmupCosine:
    """Sets each param group's lr to ``group["peak_lr"] * lr_at(step) / peak`` before each optimizer step.

    Param groups may carry their own ``lr`` (e.g. a smaller one for a pretrained tower); it is kept as the
    group's peak and follows the same shape.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, peak: float, steps: int, warmup_steps: int,
                 min_lr_ratio: float):
        self.optimizer = optimizer
        self.peak, self.steps, self.warmup_steps, self.min_lr_ratio = peak, steps, warmup_steps, min_lr_ratio
        for group in optimizer.param_groups:
            group.setdefault("peak_lr", group["lr"])
        self.last_lr = 0.0

    def lr(self, step: int) -> float:
        return lr_at(step, peak=self.peak, steps=self.steps, warmup_steps=self.warmup_steps,
                     min_lr_ratio=self.min_lr_ratio)

    def apply(self, step: int) -> float:
        """Set the lrs for optimizer step ``step``; returns the base-group lr."""
        lr = self.lr(step)
        scale = lr / self.peak if self.peak > 0 else 0.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * scale
        self.last_lr = lr
        return lr

    def state_dict(self) -> dict:
        """The lr of the last step (what a resumed run reports before its first step); the shape itself comes
        from the run's config."""
        return {"last_lr": self.last_lr}

    def load_state_dict(self, state: dict) -> None:
        self.last_lr = float(state.get("last_lr", 0.0))

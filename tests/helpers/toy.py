"""A tiny CLIP-like task for the training engine's tests (and a torchrun smoke run).

Two small MLP towers map paired random vectors to normalised features; the loss is CLIP's InfoNCE over
features gathered across ranks (``mode="clip"``) or a per-sample regression (``mode="mse"``, whose gradient
does not depend on how the batch is split, the oracle for gradient accumulation).

    torchrun --nproc_per_node 2 tests/helpers/toy.py --runs-dir /tmp/runs --steps 6 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.losses.gather import gather_features
from dmclip.train import distributed
from dmclip.train.config import TrainConfig


class PairDataset(torch.utils.data.Dataset):
    """``n`` (image, text) vector pairs; the text is a fixed linear map of the image plus noise.

    ``augment`` > 0 adds fresh Gaussian noise to each image on every read, drawn from the global torch RNG
    (like a random crop would be), so tests see whether the engine's RNG handling is exact.
    """

    def __init__(self, n: int = 256, image_dim: int = 16, text_dim: int = 12, seed: int = 0, augment: float = 0.0):
        self.augment = augment
        generator = torch.Generator().manual_seed(seed)
        self.image = torch.randn(n, image_dim, generator=generator)
        mixing = torch.randn(image_dim, text_dim, generator=generator) / math.sqrt(image_dim)
        self.text = self.image @ mixing + 0.1 * torch.randn(n, text_dim, generator=generator)

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, index: int) -> dict:
        image = self.image[index]
        if self.augment:
            image = image + self.augment * torch.randn(image.shape)
        return {"image": image, "text": self.text[index], "index": index}


class ToyClip(nn.Module):
    def __init__(self, image_dim: int = 16, text_dim: int = 12, width: int = 32, embed_dim: int = 8,
                 dropout: float = 0.0):
        super().__init__()
        self.image_tower = nn.Sequential(nn.Linear(image_dim, width), nn.LayerNorm(width), nn.GELU(),
                                         nn.Dropout(dropout), nn.Linear(width, embed_dim))
        self.text_tower = nn.Sequential(nn.Linear(text_dim, width), nn.LayerNorm(width), nn.GELU(),
                                        nn.Dropout(dropout), nn.Linear(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict:
        return {"image_features": F.normalize(self.image_tower(image), dim=-1),  # (B, E)
                "text_features": F.normalize(self.text_tower(text), dim=-1),  # (B, E)
                "logit_scale": self.logit_scale.exp().clamp(max=100)}


class ToyTask:
    """The ``TrainTask`` of the tests. ``nan_at`` / ``interrupt_at`` inject a failure at a 0-based step."""

    def __init__(self, mode: str = "clip", seed: int = 0, nan_at: int | None = None,
                 interrupt_at: int | None = None, width: int = 32, dropout: float = 0.0):
        torch.manual_seed(seed)
        self.model = ToyClip(width=width, dropout=dropout)
        self.mode = mode
        self.nan_at, self.interrupt_at = nan_at, interrupt_at
        self.steps_ended = 0  # task state that must survive a resume

    def collate(self, samples: list[dict]) -> dict:
        return {"image": torch.stack([s["image"] for s in samples]),
                "text": torch.stack([s["text"] for s in samples])}

    def loss(self, model, batch: dict, step: int) -> dict:
        if self.interrupt_at is not None and step == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt
        out = model(batch["image"], batch["text"])
        if self.mode == "mse":
            image, text = out["image_features"], out["text_features"]
            align = (image - text).pow(2).sum(-1).mean()
            parts = {"align": align, "scale": (out["logit_scale"] - 10.0).pow(2) * 1e-3}
        elif self.mode == "clip-local":  # open_clip local_loss=True: this rank's rows against all columns
            image, text = out["image_features"], out["text_features"]
            all_image, all_text = gather_features(image, text, local_loss=True)
            labels = torch.arange(len(image), device=image.device) + distributed.rank() * len(image)
            parts = {"image_to_text": F.cross_entropy(out["logit_scale"] * image @ all_text.T, labels),
                     "text_to_image": F.cross_entropy(out["logit_scale"] * text @ all_image.T, labels)}
        else:  # local_loss=False: every rank computes the loss of the whole gathered batch
            image, text = gather_features(out["image_features"], out["text_features"])
            logits = out["logit_scale"] * image @ text.T  # (B, B) over all ranks
            labels = torch.arange(len(logits), device=logits.device)
            parts = {"image_to_text": F.cross_entropy(logits, labels), "text_to_image": F.cross_entropy(logits.T, labels)}
        total = sum(parts.values()) / (1 if self.mode == "mse" else 2)
        if self.nan_at is not None and step >= self.nan_at:
            parts["align" if self.mode == "mse" else "image_to_text"] = total * float("nan")
            total = total * float("nan")
        return {"loss": total, **parts}

    def state_dict(self) -> dict:
        return {"steps_ended": self.steps_ended}

    def load_state_dict(self, state: dict) -> None:
        self.steps_ended = int(state["steps_ended"])

    def on_step_end(self, step: int) -> None:
        self.steps_ended += 1


def toy_config(**overrides) -> TrainConfig:
    """The TrainConfig of the toy runs (the torchrun tests rebuild it in-process to compare)."""
    base = dict(steps=6, batch_size=16, lr=1e-2, warmup_steps=2, log_every=1, checkpoint_every=2, progress=False,
                device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def main(argv: list[str] | None = None) -> int:
    """A toy training run, wired the way a dmclip command wires the engine (works under torchrun)."""
    from dmclip.runs import RunDir
    from dmclip.train.loop import fit

    parser = argparse.ArgumentParser(prog="tests/helpers/toy.py")
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--resume", default=None, help="a run directory to continue")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--mode", default="clip", choices=("clip", "clip-local", "mse"))
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--die-at", type=int, default=None, help="rank 1 exits hard at this 0-based step")
    parser.add_argument("--summary", default=None, help="write fit()'s summary (and the run path) here as JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    distributed.setup()
    cfg = toy_config(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                     checkpoint_every=args.checkpoint_every)
    task = ToyTask(args.mode, seed=args.seed)
    if args.die_at is not None and distributed.rank() == 1:
        die_at, real_loss = args.die_at, task.loss

        def dying_loss(model, batch, step):
            if step == die_at:
                import os

                os._exit(3)
            return real_loss(model, batch, step)

        task.loss = dying_loss
    if args.resume:
        run = RunDir.open(args.resume)
    else:
        run = distributed.shared_run(lambda: RunDir.create("toy", "toy", cfg, root=args.runs_dir, seed=args.seed))
    with distributed.active(run):
        summary = fit(task, PairDataset(seed=1), cfg, run, seed=args.seed, resume=bool(args.resume))
    if distributed.is_main() and args.summary:
        with open(args.summary, "w", encoding="utf-8") as fh:
            json.dump({"run": str(run.path), **summary}, fh)
    distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Seeded data order: which samples each rank and micro-batch sees at each optimizer step.

Epoch ``e`` visits the dataset in the order ``torch.randperm(N)`` drawn from its own ``torch.Generator``
seeded with ``(seed, e)``, so the order depends on nothing else (not on the global RNG, the number of
workers, or when the run was resumed). Each optimizer step takes the next ``batch_size`` (global) positions;
an epoch ends when fewer than ``batch_size`` remain (the tail is dropped, so every step has the same size).
The global batch is cut into ``grad_accum`` micro-batches and each micro-batch into ``world_size`` contiguous
slices, one per rank: rank r's slice of micro-batch m is positions ``m*B/A + r*B/(A*W) ...`` of the step.
Gathering features across ranks in rank order therefore rebuilds exactly the micro-batch a single process
would see, which is why 2 ranks reproduce 1 rank at the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmclip.errors import DmclipError


def epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * int(epoch) + 1) % (2**63 - 1)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The visiting order of epoch ``epoch`` over ``n`` samples (int64, (n,))."""
    generator = torch.Generator()
    generator.manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=generator)


@dataclass
class DataPosition:
    """Where the next optimizer step starts: ``epoch`` and the sample ``offset`` inside its permutation."""

    epoch: int = 0
    offset: int = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


class DataOrder:
    """Hands out the sample indices of every step; ``position`` is saved in checkpoints."""

    def __init__(self, n: int, batch_size: int, *, seed: int, grad_accum: int = 1, world_size: int = 1,
                 rank: int = 0, position: DataPosition | None = None):
        if batch_size % (grad_accum * world_size):
            raise DmclipError(
                f"train.batch_size = {batch_size} cannot be split into {grad_accum} micro-batches on "
                f"{world_size} rank(s)",
                f"use a batch_size divisible by grad_accum x ranks = {grad_accum * world_size}")
        if n < batch_size:
            raise DmclipError(f"the dataset has {n} samples, fewer than one batch of {batch_size}",
                              "lower train.batch_size or use a larger dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.grad_accum, self.world_size, self.rank = grad_accum, world_size, rank
        self.micro = batch_size // grad_accum  # samples per micro-batch over all ranks
        self.local = self.micro // world_size  # samples per micro-batch on this rank
        self.position = position or DataPosition()
        self._perm_epoch, self._perm = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.seed, epoch, self.n), epoch
        return self._perm

    def next_step(self) -> tuple[list[list[int]], DataPosition]:
        """This rank's micro-batches (lists of dataset indices) for the next step, and the position after it.

        The position is not advanced here: the caller commits it once the step has completed.
        """
        epoch, offset = self.position.epoch, self.position.offset
        if offset + self.batch_size > self.n:
            epoch, offset = epoch + 1, 0
        step_indices = self._permutation(epoch)[offset: offset + self.batch_size]
        micro_batches = []
        for m in range(self.grad_accum):
            start = m * self.micro + self.rank * self.local
            micro_batches.append(step_indices[start: start + self.local].tolist())
        after = DataPosition(epoch, offset + self.batch_size)
        if after.offset + self.batch_size > self.n:
            after = DataPosition(epoch + 1, 0)
        return micro_batches, after

    def epoch_progress(self, position: DataPosition | None = None) -> float:
        """Epochs done as a float (``epoch + offset / N``), for metrics rows."""
        position = position or self.position
        return position.epoch + position.offset / self.n


def caption_choice(count: int, seed: int, step: int, index: int) -> int:
    """Which of an image's ``count`` captions step ``step`` trains on: a hash of (seed, step, index), so a
    resumed run (or another rank) picks the same caption without any saved state."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count

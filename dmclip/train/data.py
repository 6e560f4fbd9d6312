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

import functools
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


# ------------------------------------------------------------------------------------------ streams


def is_stream(dataset) -> bool:
    """A dataset that orders itself (``dmclip.data.stream.WdsStream``): read by :class:`StreamOrder`."""
    return isinstance(dataset, torch.utils.data.IterableDataset)


class _Failure:
    """A ``DmclipError`` raised in a DataLoader worker, carried to the training process whole (message + hint)."""

    def __init__(self, error: DmclipError):
        self.message, self.hint = error.message, error.hint


def _reseed_batch(seed: int, slot: int, number: int) -> None:
    from dmclip.train.rng import reseed

    reseed(seed, number, slot, salt=2, cuda=False)


class _ReaderBatches(torch.utils.data.IterableDataset):
    """Rank ``rank``'s readers: DataLoader worker ``i`` is reader ``rank * workers + (i + first) % workers`` of the
    stream (a new DataLoader asks worker 0 first; ``first`` is the reader whose turn it is)."""

    def __init__(self, stream, batch_size: int, collate, seed: int, rank: int, world_size: int, workers: int,
                 starts: list[int], first: int):
        self.stream, self.batch_size, self.collate, self.seed = stream, batch_size, collate, seed
        self.rank, self.world_size, self.workers, self.starts, self.first = rank, world_size, workers, starts, first

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        reader = ((info.id if info is not None else 0) + self.first) % self.workers
        slot = self.rank * self.workers + reader
        try:
            yield from self.stream.slot_batches(
                slot, self.world_size * self.workers, self.batch_size, self.collate, seed=self.seed,
                start=self.starts[reader], before_batch=functools.partial(_reseed_batch, self.seed, slot))
        except DmclipError as exc:
            yield _Failure(exc)


def _identity(item):
    return item


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: SIGTERM / SIGINT are for the training process, which saves the last
    completed step and then shuts its workers down. (torchrun signals a rank's whole process group; a worker
    killed first would make the DataLoader raise before the training process could save.)"""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class StreamOrder:
    """:class:`DataOrder`'s counterpart for a stream: the stream picks the samples, this counts them.

    Each rank reads through ``max(1, num_workers)`` readers (its DataLoader workers), and every reader yields
    micro-batches of ``batch_size / (grad_accum * world_size)`` samples forever (see
    ``WdsStream.slot_batches``). The DataLoader takes them from its workers in turn, so after ``k``
    micro-batches reader ``w`` has given ``ceil((k - w) / workers)`` and reader ``k % workers`` is next: the
    position is the step alone (``offset`` = samples consumed by all ranks), and a resumed run skips each
    reader to exactly where it was (counting tar headers, not reading samples) — the same batches as an
    uninterrupted run, given the same ranks, workers and shards (checked on resume).
    """

    def __init__(self, stream, batch_size: int, *, seed: int, grad_accum: int = 1, world_size: int = 1,
                 rank: int = 0, num_workers: int = 0, position: DataPosition | None = None):
        if batch_size % (grad_accum * world_size):
            raise DmclipError(
                f"train.batch_size = {batch_size} cannot be split into {grad_accum} micro-batches on "
                f"{world_size} rank(s)",
                f"use a batch_size divisible by grad_accum x ranks = {grad_accum * world_size}")
        self.stream, self.batch_size, self.seed = stream, batch_size, seed
        self.grad_accum, self.world_size, self.rank = grad_accum, world_size, rank
        self.num_workers, self.workers = num_workers, max(1, num_workers)
        self.local = batch_size // (grad_accum * world_size)
        stream.check_readers(world_size * self.workers, f" ({world_size} rank(s) x {self.workers} DataLoader "
                                                        f"reader(s) each)")
        # what a checkpoint must match to resume exactly (saved as its "dataset_size")
        self.n = (f"{len(stream.shards)} shards{' resampled' if stream.resampled else ''} read by {world_size} "
                  f"rank(s) x {self.workers} reader(s)")
        self.position = position or DataPosition()

    def next_step(self) -> tuple[list[None], DataPosition]:
        """One placeholder per micro-batch (the batches come from :meth:`batches`) and the position after."""
        return [None] * self.grad_accum, DataPosition(0, self.position.offset + self.batch_size)

    def epoch_progress(self, position: DataPosition | None = None) -> float:
        """Samples consumed / samples per epoch when the stream knows its size, else 0."""
        position = position or self.position
        return position.offset / self.stream.size if self.stream.size else 0.0

    def batches(self, collate, *, pin_memory: bool = False):
        """This rank's micro-batches from the current position on, forever."""
        consumed = self.position.offset // (self.local * self.world_size)  # micro-batches this rank has used
        starts = [max(0, -(-(consumed - w) // self.workers)) * self.local for w in range(self.workers)]
        readers = _ReaderBatches(self.stream, self.local, collate, self.seed, self.rank, self.world_size,
                                 self.workers, starts, consumed % self.workers)
        loader = torch.utils.data.DataLoader(readers, batch_size=None, num_workers=self.num_workers,
                                             collate_fn=_identity, pin_memory=pin_memory,
                                             worker_init_fn=ignore_stop_signals)
        for item in loader:
            if isinstance(item, _Failure):
                raise DmclipError(item.message, item.hint)
            yield item


def data_order(dataset, batch_size: int, *, seed: int, grad_accum: int, world_size: int, rank: int,
               num_workers: int) -> DataOrder | StreamOrder:
    """The order :func:`dmclip.train.fit` reads ``dataset`` in: seeded permutations, or the stream's own."""
    if is_stream(dataset):
        return StreamOrder(dataset, batch_size, seed=seed, grad_accum=grad_accum, world_size=world_size, rank=rank,
                           num_workers=num_workers)
    return DataOrder(len(dataset), batch_size, seed=seed, grad_accum=grad_accum, world_size=world_size, rank=rank)

"""``WdsStream``: webdataset shards streamed through webdataset's own pipeline, split over ranks and DataLoader
workers, resumable by position (see ``dmclip.data.wds`` for the layout and the map-style index).

Epoch ``e`` shuffles the shard list with a seed drawn from ``(seed, e)`` and reader ``slot`` of ``slots`` (rank x
DataLoader worker) takes every ``slots``-th shard, then shuffles samples in a seeded buffer: every sample is read
once per epoch across all readers. ``resampled=True`` draws shards with replacement instead (webdataset's
``ResampledShards``), each reader on its own. The training engine reads fixed-size batches per reader, forever
(``slot_batches``), and finds where a reader was from its batch count alone (``locate``: tar headers, no samples).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import tarfile
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import torch

from dmclip.data.base import DEFAULT_IMAGE_SIZE, BadSample, SkipCounter, decode_image, to_chw
from dmclip.data.wds_members import META_MEMBER, captions_of, image_member
from dmclip.errors import DmclipError

# a reader checks max_skip_fraction once it has read this many samples: a fraction of fewer is noise
MIN_SAMPLES_FOR_SKIP_CHECK = 1000


@functools.lru_cache(maxsize=65536)
def _count(path: str, mtime_ns: int, size: int) -> int:
    from webdataset.tariterators import base_plus_ext  # the key split the stream's tar reader uses

    n, current = 0, None
    try:
        with tarfile.open(path, "r:") as tar:  # reads headers and seeks over the member data
            for member in tar:
                if not member.isreg() or META_MEMBER.match(member.name):
                    continue
                key = base_plus_ext(member.name)[0]
                if key is not None and key != current:
                    n, current = n + 1, key
    except (tarfile.TarError, OSError, EOFError):
        pass  # as the stream: the samples before the damage count
    return n


def count_samples(shard: str | Path) -> int:
    """Samples (member groups with one key) in a shard, from its headers only; cached per file version."""
    stat = os.stat(shard)
    return _count(str(shard), stat.st_mtime_ns, stat.st_size)


def sample_index(url: str, key: str) -> int:
    """A stable 63-bit id of a sample (shard file name + key): the ``index`` of a streamed sample."""
    digest = hashlib.blake2b(f"{Path(url).name}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _mix(*values: int) -> int:
    digest = hashlib.blake2b(":".join(str(int(v)) for v in values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class WdsStream(torch.utils.data.IterableDataset):
    """Image-text samples streamed from shards; ``for sample in stream`` is one epoch (``set_epoch``), split
    across DataLoader workers and ranks (``split``, default: torch.distributed's); bad samples are skipped.

    Samples are ``{"image": uint8 (3, S, S), "captions": [...], "index": stable id, "key": "<shard>/<key>"}``.
    """

    kind = "image-text"

    def __init__(self, name: str, shards: list[Path], *, image_size: int | None = None, seed: int = 0,
                 shuffle_buffer: int = 1000, resampled: bool = False, size: int | None = None,
                 max_skip_fraction: float = 0.01):
        super().__init__()
        if int(shuffle_buffer) < 0:
            raise DmclipError(f"wds: shuffle_buffer={shuffle_buffer} is negative", "use 0 (off) or a sample count")
        self.name = name
        self.shards = [str(s) for s in shards]
        self.image_size = int(image_size or DEFAULT_IMAGE_SIZE)
        self.seed = int(seed or 0)
        self.shuffle_buffer = int(shuffle_buffer)
        self.resampled = bool(resampled)
        self.size = size  # samples per epoch when known (sizes.json, samples=N); None otherwise
        self.skips = SkipCounter(name, max_skip_fraction)
        self.epoch = 0
        self.rank: int | None = None
        self.world_size: int | None = None

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.skips.counts)

    def set_epoch(self, epoch: int) -> None:
        """Which epoch ``iter(stream)`` reads (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def split(self, rank: int, world_size: int) -> WdsStream:
        """Read only rank ``rank``'s share of ``world_size`` (default: torch.distributed's rank and size)."""
        self.rank, self.world_size = int(rank), int(world_size)
        return self

    def check_readers(self, readers: int, what: str) -> None:
        """Every one of ``readers`` readers needs a shard of its own (unless shards are resampled)."""
        if not self.resampled and len(self.shards) < readers:
            raise DmclipError(f"{self.name}: {len(self.shards)} shard(s) cannot feed {readers} readers{what}",
                              "use fewer DataLoader workers (train.num_workers) or ranks, split the data into more "
                              "shards, add resampled=true to the spec, or stream=false to index it")

    # ---- the pipeline
    def epoch_shards(self, epoch: int, slot: int, slots: int, seed: int) -> list[str]:
        """The shards reader ``slot`` of ``slots`` reads in ``epoch``, in order."""
        import webdataset as wds

        if self.resampled:  # one epoch = as many draws as a share of the shards
            source = wds.ResampledShards(self.shards, nshards=math.ceil(len(self.shards) / slots),
                                         seed=_mix(seed, epoch), worker_seed=functools.partial(int, slot),
                                         deterministic=True)
            return [item["url"] for item in source]
        order = [item["url"] for item in wds.SimpleShardList(self.shards, seed=_mix(seed, epoch))]
        return order[slot::slots]  # what split_by_node + split_by_worker do, for an explicit reader number

    def _shard_error(self, exc: Exception) -> bool:
        reason = "missing-shard" if isinstance(exc, FileNotFoundError) else (
            "truncated-shard" if isinstance(exc, (tarfile.TarError, EOFError, OSError)) else "bad-shard")
        self.skips.add(reason, str(exc)[:300])
        self.skips.total += 1  # a lost shard is one bad item of the total the check divides by, not zero
        return True  # skip it and go on

    def raw(self, epoch: int, slot: int, slots: int, seed: int) -> Iterator[dict]:
        """One epoch of undecoded samples (suffix -> bytes) for one reader: shard list, tar reader, shuffle."""
        import webdataset as wds

        shards = self.epoch_shards(epoch, slot, slots, seed)
        if not shards:
            return iter(())
        stages = [wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=self._shard_error)]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer),
                                      seed=_mix(seed, epoch, slot)))
        return iter(wds.DataPipeline(*stages))

    def decode(self, raw: dict) -> dict:
        """One raw sample -> a dataset sample; ``BadSample`` names why not."""
        url, key = raw["__url__"], raw["__key__"]  # webdataset's tar reader sets both
        where = f"{Path(url).name} key {key}"
        suffix = image_member(raw)
        if suffix is None:
            raise BadSample("missing-file", f"{where}: no image member")
        captions = captions_of(raw.get("txt"), raw.get("json"))
        image = decode_image(raw[suffix], self.image_size, where)
        return {"image": to_chw(image), "captions": captions, "index": sample_index(url, key),
                "key": f"{Path(url).name}/{key}"}

    def _reader(self) -> tuple[int, int]:
        rank, world = self.rank, self.world_size
        if rank is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[dict]:
        slot, slots = self._reader()
        self.check_readers(slots, " (ranks x DataLoader workers)")
        read = 0
        for raw in self.raw(self.epoch, slot, slots, self.seed):
            read += 1
            try:
                yield self.decode(raw)
            except BadSample as exc:
                self.skips.add(exc.reason, exc.detail)
        self.skips.total += read
        self.skips.check()

    def first_captions(self, limit: int) -> list[list[str]]:
        """Captions of the first ``limit`` samples in shard order (no image decoded): e.g. to fit a vocabulary."""
        import webdataset as wds

        out = []
        pipeline = wds.DataPipeline(wds.SimpleShardList(self.shards), wds.tarfile_to_samples(handler=self._shard_error))
        for raw in pipeline:
            try:
                out.append(captions_of(raw.get("txt"), raw.get("json")))
            except BadSample:
                continue
            if len(out) >= limit:
                break
        return out

    # ---- fixed-size batches for the training engine, resumable by position
    def locate(self, start: int, slot: int, slots: int, seed: int) -> tuple[int, int]:
        """(epoch, samples into it) of reader ``slot`` after ``start`` samples: counted from tar headers of the
        shards of earlier epochs (each counted once per process), never by reading samples."""
        epoch = 0
        while start > 0:
            size = sum(count_samples(s) for s in self.epoch_shards(epoch, slot, slots, seed))
            if size == 0:
                raise DmclipError(f"{self.name}: reader {slot} found no samples in its shards of epoch {epoch}",
                                  "check that the shards hold samples")
            if start < size:
                break
            start, epoch = start - size, epoch + 1
        return epoch, start

    def _forever(self, epoch: int, offset: int, slot: int, slots: int, seed: int) -> Iterator[dict]:
        while True:
            read = 0
            for raw in self.raw(epoch, slot, slots, seed):
                read += 1
                if read > offset:
                    yield raw
            if read == 0:
                raise DmclipError(f"{self.name}: reader {slot} of {slots} read no sample in epoch {epoch}",
                                  "check that the shards hold samples (a truncated or empty shard reads as none)")
            epoch, offset = epoch + 1, 0

    def slot_batches(self, slot: int, slots: int, batch_size: int, collate: Callable[[list[dict]], object], *,
                     seed: int, start: int = 0, before_batch: Callable[[int], None] | None = None) -> Iterator:
        """Collated batches of exactly ``batch_size`` samples for reader ``slot`` of ``slots``, epoch after
        epoch, forever, beginning after the first ``start`` samples it would have read.

        Every batch uses ``batch_size`` raw samples, so a reader's position is its batch count times the batch
        size whatever was skipped: a bad sample's place is taken by a good one of the same batch (or, in a batch
        with none, the last good one before it), and counted in ``skipped``. ``before_batch(n)`` runs before the
        n-th batch of this reader is collated (e.g. to seed augmentations).
        """
        epoch, offset = self.locate(start, slot, slots, seed)
        raws = self._forever(epoch, offset, slot, slots, seed)
        number, last_good = start // batch_size, None
        while True:
            good = []
            for raw in islice(raws, batch_size):
                try:
                    good.append(self.decode(raw))
                except BadSample as exc:
                    self.skips.add(exc.reason, exc.detail)
            self.skips.total += batch_size
            if self.skips.total >= MIN_SAMPLES_FOR_SKIP_CHECK:
                self.skips.check()
            if not good and last_good is None:
                raise DmclipError(f"{self.name}: reader {slot} found no readable sample in its first batch",
                                  "check the shards (dmclip data show wds:... shows what can be read)")
            good = good or [last_good]
            last_good = good[-1]
            samples = good + [good[i % len(good)] for i in range(batch_size - len(good))]
            if before_batch is not None:
                before_batch(number)
            yield collate(samples)
            number += 1

    def __repr__(self) -> str:
        size = f"{self.size} samples" if self.size else "size unknown"
        return f"<WdsStream {self.name!r}: {len(self.shards)} shards, {size}, {self.image_size} px>"

"""Running under ``torchrun``: process group, rank helpers, one writer of the run dir.

Contrastive losses gather features across ranks with :func:`dmclip.losses.gather.gather_features`.

A command that trains does this (and works unchanged with and without torchrun)::

    from dmclip.train import distributed

    distributed.setup()                                   # no-op without torchrun's env vars
    run = distributed.shared_run(lambda: RunDir.create(...))   # rank 0 creates it, the others get its path
    with distributed.active(run):                         # rank 0 records the status; SIGTERM -> KeyboardInterrupt
        summary = fit(task, dataset, cfg, run, seed=seed)
    distributed.teardown()

Only rank 0 writes the run directory (run.json, metrics.jsonl, checkpoints); every rank reads
``checkpoints/last.pt`` on resume (single node, or a shared file system).

When a rank dies, the others fail at their next collective: gloo notices the closed connection at once
(NCCL within ``DMCLIP_DIST_TIMEOUT`` seconds, default 600); :func:`dmclip.train.fit` turns that into a
``DmclipError`` naming the step, rank 0 keeps the checkpoint of the last completed step, and torchrun stops
the remaining workers and exits non-zero, printing which rank failed first.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dmclip.errors import DmclipError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def setup(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...).

    Idempotent; without torchrun (``WORLD_SIZE`` unset or 1) it does nothing. The backend is NCCL when
    CUDA is available and gloo otherwise; each rank takes GPU ``LOCAL_RANK``. Returns whether distributed.
    """
    if is_distributed():
        return True
    if _env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise DmclipError("torchrun started several processes but this torch has no torch.distributed",
                          "run without torchrun, or install a torch build with distributed support")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if timeout_s is None:
        timeout_s = float(os.environ.get("DMCLIP_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    try:
        dist.init_process_group(backend=backend, timeout=dt.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise DmclipError(f"could not join the torchrun process group ({backend}): {str(exc).splitlines()[0]}",
                          "start the command with `torchrun --nproc_per_node N -m dmclip.cli.main ...` and check "
                          "MASTER_ADDR/MASTER_PORT") from None
    log.info("distributed: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def teardown() -> None:
    """Leave the process group (at the end of a command)."""
    if is_distributed():
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the process that writes outputs (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (small picklable values only: paths, dicts of numbers)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shared_run(create: Callable[[], Any]):
    """Rank 0 calls ``create()`` (e.g. ``RunDir.create(...)``); the others get a RunDir at the same path.

    Errors on rank 0 (a bad recipe...) reach every rank as a ``DmclipError`` instead of a hang.
    """
    from dmclip.runs import RunDir

    if not is_distributed():
        return create()
    run, failure = None, None
    if is_main():
        try:
            run = create()
        except DmclipError as exc:
            failure = exc
    payload = broadcast_object((str(run.path) if run is not None else None,
                                (failure.message, failure.hint) if failure is not None else None))
    path, error = payload
    if failure is not None:
        raise failure
    if error is not None:
        raise DmclipError(f"rank 0 could not create the run directory: {error[0]}", error[1])
    return run if is_main() else RunDir(Path(path))


@contextlib.contextmanager
def active(run):
    """``run.active()`` on rank 0 (status running -> completed/failed/interrupted); elsewhere only turns
    SIGTERM into KeyboardInterrupt so every rank stops the same way."""
    if is_main():
        with run.active():
            yield run
        return
    from dmclip.runs import install_sigterm, restore_sigterm

    old = install_sigterm()
    try:
        yield run
    finally:
        restore_sigterm(old)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (no-op on one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size()
    return tensor


def all_gather_object(obj: Any) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a lost peer / timed-out collective (another rank died or hung)."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe"))

"""The one training loop of dmclip: ``fit(task, dataset, cfg, run, seed=...)``.

One optimizer step = ``grad_accum`` micro-batches on each of ``world_size`` ranks (``batch_size`` samples in
all), then AdamW with linear warmup + cosine (:mod:`dmclip.train.schedule`), global-norm clipping, optional
AMP (bf16 autocast; fp16 with a GradScaler on CUDA) and ``torch.compile``.

The order of things, as open_clip's train.py keeps the step apart from the loop around it: ``fit`` builds a
:class:`~dmclip.train.state.TrainState` (model, optimizer, schedule, scaler, data order, step) and restores
it from the run's checkpoint; ``_train_step`` advances it by one optimizer step; ``TrainState.save`` writes
the checkpoint; an :class:`~dmclip.train.interrupt.InterruptGuard` around the loop turns Ctrl-C / SIGTERM
into a checkpoint of the last completed step.

Exact resume. A checkpoint holds the model, optimizer, schedule, scaler, the step, the data position
(epoch, offset), RNG states and ``task.state_dict()``; everything loads with ``weights_only=True``. The RNGs
are also re-seeded from ``(seed, step, rank, micro-batch)``: torch, python ``random`` and numpy before each
micro-batch is loaded (in the training process or a DataLoader worker alike), torch again before its forward
pass, so random ops (augmentation, dropout, negative sampling) draw the same numbers whether or not the run
was stopped, however many workers load data. On CPU a resumed run
therefore ends with bitwise the same weights as an uninterrupted one (tested).

Failure modes. Ctrl-C / SIGTERM (``KeyboardInterrupt``) -> rank 0 writes the checkpoint of the last
completed step and the interrupt is re-raised; an interrupt that arrives while the optimizer is updating the
weights waits until the update is complete. A non-finite loss (or gradient norm, or weights at checkpoint
time) -> ``DmclipError`` naming the step and the parts, before the optimizer applies it, with the last good
checkpoint untouched. A lost peer rank -> ``DmclipError`` after rank 0 saved the last completed step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from dmclip.device import resolve_device
from dmclip.errors import DmclipError
from dmclip.progress import ProgressBar
from dmclip.train import distributed
from dmclip.train.config import TrainConfig
from dmclip.train.data import DataOrder, DataPosition, ignore_stop_signals, is_stream
from dmclip.train.interrupt import InterruptGuard
from dmclip.train.rng import reseed
from dmclip.train.schedule import warmup_outlasts_run
from dmclip.train.state import TrainState, default_param_groups, diverged

log = logging.getLogger(__name__)
__all__ = ["TrainTask", "fit", "default_param_groups"]  # the last one is state's


@runtime_checkable
class TrainTask(Protocol):
    """What a trainer gives :func:`fit`. Only ``model``, ``collate`` and ``loss`` are required.

    - ``model``: every trainable parameter lives here; fit moves it to the device and, under torchrun, wraps
      it in DDP. ``loss`` must call the wrapper it is given (``model(...)``), not ``model.module.<method>``,
      or DDP does not synchronise the gradients.
    - ``collate(samples)``: a list of dataset items -> a batch (a dict of tensors; fit moves them to the device).
    - ``loss(model, batch, step)`` -> ``{"loss": total, **parts}`` (scalar tensors; the same keys on every
      rank). ``step`` is the 0-based index of the optimizer step being computed.
    - optional ``state_dict()`` / ``load_state_dict(state)``: extra state to checkpoint (queues, counters);
      tensors, numbers, strings, lists and dicts only (it is loaded with ``weights_only=True``).
    - optional ``param_groups(model)`` -> AdamW param groups or None (default: :func:`default_param_groups`).
    - optional ``on_step_end(step)``: after the optimizer update of 0-based step ``step`` (e.g. a momentum
      encoder update); an interrupt waits until it returns.
    - optional attribute ``find_unused_parameters = True`` when some parameters get no gradient on some steps.
    - optional attribute ``constant_prefixes``: state-dict key prefixes of tensors that never change in training
      and that the task builds the same way again (a frozen copy of a teacher's text tower); checkpoints leave
      them out and a resume keeps the rebuilt ones.
    """

    model: nn.Module

    def collate(self, samples: list[dict]) -> dict: ...

    def loss(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]: ...


# ------------------------------------------------------------------------------------------ pieces


def _stack_parts(out: dict, names: list[str], device: torch.device) -> torch.Tensor:
    """The loss parts as one float32 vector (detached), in ``names`` order."""
    try:
        return torch.stack([out[k].detach().reshape(()) for k in names]).float()
    except (AttributeError, RuntimeError):  # python numbers, tensors on other devices
        return torch.stack([torch.as_tensor(out[k]).detach().float().to(device).reshape(()) for k in names])


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# ------------------------------------------------------------------------------------------ batches


class _BatchFetcher(torch.utils.data.Dataset):
    """Turns a key ``(step, micro, indices)`` into a collated batch, with the data RNGs seeded from the key
    (identical in the training process and in DataLoader workers)."""

    def __init__(self, dataset, collate: Callable, seed: int, rank: int):
        self.dataset, self.collate, self.seed, self.rank = dataset, collate, seed, rank

    def __len__(self) -> int:  # not used for sampling
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, list[int]]) -> Any:
        step, micro, indices = key
        reseed(self.seed, step, self.rank, micro, salt=1, cuda=False)
        many = getattr(self.dataset, "__getitems__", None)  # array sets read (or render) a batch's images in one call
        return self.collate(many(indices) if many is not None else [self.dataset[i] for i in indices])


def _save_holding_signals(state: TrainState, run, cfg: TrainConfig, main: bool) -> None:
    """The checkpoint written after the loop stopped (Ctrl-C, a lost rank): a signal that arrives meanwhile
    (torchrun's SIGTERM to the ranks left when one died) waits until the file is written, then acts."""
    with InterruptGuard() as guard, guard.deferred():
        state.save(run, cfg, main)


def _identity(batch):
    return batch


def _keys(order: DataOrder, start_step: int) -> Iterator[tuple[int, int, list[int]]]:
    step = start_step
    while True:
        micro_batches, after = order.next_step()
        order.position = after
        for micro, indices in enumerate(micro_batches):
            yield step, micro, indices
        step += 1


class _Batches:
    """The micro-batches of each step, on the device: collated in this process, or by ``cfg.num_workers``
    DataLoader workers walking their own copy of the data order from the state's position."""

    def __init__(self, dataset, collate: Callable, cfg: TrainConfig, state: TrainState, rank: int,
                 device: torch.device):
        self.fetcher = _BatchFetcher(dataset, collate, state.seed, rank)
        self.device = device
        self.loader: Iterator | None = None
        if is_stream(dataset):  # the stream's readers hand out whole micro-batches from the restored position
            self.loader = state.order.batches(collate, pin_memory=device.type == "cuda")
        elif cfg.num_workers > 0:
            key_order = DataOrder(state.order.n, cfg.batch_size, seed=state.seed, grad_accum=cfg.grad_accum,
                                  world_size=state.world, rank=rank,
                                  position=DataPosition(**state.order.position.state_dict()))
            self.loader = iter(torch.utils.data.DataLoader(
                self.fetcher, batch_size=None, sampler=_keys(key_order, state.step), num_workers=cfg.num_workers,
                collate_fn=_identity, pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
                generator=torch.Generator().manual_seed(state.seed)))  # its own: the global RNG is not touched

    def get(self, step: int, micro: int, indices: list[int]) -> Any:
        batch = self.fetcher[(step, micro, indices)] if self.loader is None else next(self.loader)
        return _to_device(batch, self.device) if self.device.type != "cpu" else batch


# ------------------------------------------------------------------------------------------ fit


def fit(task: TrainTask, dataset, cfg: TrainConfig, run, *, seed: int, resume: bool = False,
        eval_fn: Callable[[nn.Module, int], dict | None] | None = None, eval_every: int = 0) -> dict:
    """Train ``task.model`` on ``dataset`` (map-style: ``len`` and ``[i]``; or a stream, read as
    :class:`dmclip.train.data.StreamOrder` says) for ``cfg.steps`` optimizer steps.

    ``run`` is the RunDir; only rank 0 writes it (metrics.jsonl rows ``{"step", "loss", <parts>, "lr",
    "samples_per_s", "epoch", "grad_norm"}`` every ``log_every`` steps, ``checkpoints/last.pt`` every
    ``checkpoint_every`` steps and at the end). ``resume=True`` continues from ``checkpoints/last.pt``
    (metrics rows after its step are dropped, then written again); without a checkpoint it starts at step 0.
    ``eval_fn(model, step) -> dict`` runs on rank 0 every ``eval_every`` steps and at the end (model unwrapped,
    in eval mode, under no_grad); its numbers go to metrics.jsonl as ``eval/<name>``. ``cfg.report_to`` also
    sends the rows (and the results the caller writes) to TensorBoard / W&B (:mod:`dmclip.train.report_to`).

    Returns ``{"steps", "loss", "parts", "lr", "samples_per_s", "seconds", "epoch", "resumed_from", "eval",
    "checkpoint"}`` (``samples_per_s`` and ``seconds`` over the steps this call trained).
    """
    distributed.setup()
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    device = resolve_device(cfg.device, hint="set train.device=auto or cpu")
    if not is_stream(dataset) and (not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__")):
        raise DmclipError(f"the training data ({type(dataset).__name__}) has no length or indexing",
                          "fit needs a map-style dataset (len(dataset) and dataset[i]) or a stream")
    if cfg.amp == "fp16" and device.type != "cuda":
        raise DmclipError("train.amp = 'fp16' needs a GPU", "use train.amp=bf16 on CPU, or off")
    if eval_every and eval_fn is None:
        raise DmclipError(f"eval_every = {eval_every} but no eval_fn was given", "pass eval_fn, or eval_every=0")

    # restore
    model = task.model.to(device)
    model.train()
    state = TrainState.create(task, model, dataset, cfg, seed=seed, world=world, rank=rank)
    resumed_from = state.resume(run, cfg, main) if resume else None
    if main:
        _record_start(run, cfg, device)
    if main and cfg.report_to:
        from dmclip.train import report_to

        report_to.attach(run, cfg.report_to, start_step=state.step)
    train_model = _wrap(model, task, cfg, device)
    batches = _Batches(dataset, task.collate, cfg, state, rank, device)

    # train, checkpoint, stop on an interrupt
    last_values, last_eval, lr, steps_done = {}, None, state.schedule.last_lr, 0
    start_step = interval_step = state.step
    # rank 0 on a terminal: step 12/40, samples/s and lr, time left; the loss parts on the line under it
    progress = ProgressBar(cfg.progress and main, "step", cfg.steps, completed=state.step, unit="samples",
                           detail=True, keep=True)
    started = interval_start = time.perf_counter()
    checkpoint_file: Path | None = run.checkpoint_path() if state.last_checkpoint_step is not None else None
    try:
        with InterruptGuard() as guard:
            while state.step < cfg.steps:
                last_values, lr = _train_step(state, train_model, batches, cfg, run, guard, device)
                steps_done += 1
                step, now = state.step, time.perf_counter()
                if main and (step % cfg.log_every == 0 or step == cfg.steps):
                    samples_per_s = (step - interval_step) * cfg.batch_size / max(now - interval_start, 1e-9)
                    interval_start, interval_step = now, step
                    run.log_metrics({"step": step, **last_values, "lr": lr, "samples_per_s": round(samples_per_s, 2),
                                     "epoch": round(state.order.epoch_progress(), 4)})
                if progress.shown:
                    since_start = steps_done * cfg.batch_size / max(now - started, 1e-9)  # samples/s
                    progress.update(step, rate=f"{since_start:,.0f} samples/s  lr {lr:.3g}",
                                    detail="  ".join(f"{k} {v:.4g}" for k, v in last_values.items()))
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    with guard.deferred():
                        checkpoint_file = state.save(run, cfg, main) or checkpoint_file
                if eval_fn is not None and eval_every and step % eval_every == 0 and step < cfg.steps:
                    last_eval = _evaluate(eval_fn, model, step, run, main)
            seconds = time.perf_counter() - started
            with guard.deferred():
                if state.step > (state.last_checkpoint_step if state.last_checkpoint_step is not None else -1):
                    checkpoint_file = state.save(run, cfg, main) or checkpoint_file
            if eval_fn is not None and eval_every:
                last_eval = _evaluate(eval_fn, model, state.step, run, main)
    except KeyboardInterrupt:
        progress.close()
        if main and state.step != state.last_checkpoint_step:
            log.warning("interrupted: saving step %d to %s", state.step, run.checkpoint_path())
            _save_holding_signals(state, run, cfg, main)
        raise
    except DmclipError:
        raise
    except Exception as exc:
        if distributed.is_distributed() and distributed.is_collective_failure(exc):
            progress.close()
            if main and state.step != state.last_checkpoint_step:
                with contextlib.suppress(DmclipError):
                    _save_holding_signals(state, run, cfg, main)
            raise DmclipError(
                f"rank {rank} lost contact with the other training processes at step {state.step + 1} "
                f"({str(exc).splitlines()[0][:160]})",
                "another rank probably died (see its error above); continue with --resume on the run directory"
            ) from exc
        raise
    finally:
        progress.close()

    if not last_values and main:  # resumed a run that had already reached its last step
        rows = [r for r in run.metrics() if "loss" in r]
        last_values = {k: v for k, v in (rows[-1] if rows else {}).items()
                       if k not in ("step", "lr", "samples_per_s", "epoch")}
    trained = state.step - start_step
    return {
        "steps": state.step,
        "loss": last_values.get("loss"),
        "parts": {k: v for k, v in last_values.items() if k != "grad_norm"},
        "lr": lr,
        "samples_per_s": trained * cfg.batch_size / seconds if trained and seconds > 0 else None,
        "seconds": seconds,
        "epoch": state.order.epoch_progress(),
        "resumed_from": resumed_from,
        "eval": last_eval,
        "checkpoint": str(checkpoint_file) if checkpoint_file is not None else None,
    }


def _record_start(run, cfg: TrainConfig, device: torch.device) -> None:
    """Rank 0 as training starts: run.json records the device trained on (under torchrun rank 0's own GPU), and
    a warmup longer than the run, whose learning rate never reaches train.lr, is a warning naming the fix."""
    run.update_info(device=str(device))
    warning = warmup_outlasts_run(peak=cfg.lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps)
    if warning:
        log.warning(warning)


def _wrap(model: nn.Module, task, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """What the task's loss calls: the model, in DDP under torchrun, compiled when ``cfg.compile``."""
    train_model = model
    if distributed.is_distributed():
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(task, "find_unused_parameters", False)))
    if cfg.compile:
        train_model = torch.compile(train_model)
    return train_model


def _train_step(state: TrainState, train_model: nn.Module, batches: _Batches, cfg: TrainConfig, run,
                guard: InterruptGuard, device: torch.device) -> tuple[dict[str, float], float]:
    """One optimizer step: ``grad_accum`` micro-batches forward and backward, clipping, the logged parts
    averaged over ranks and checked finite, then the update, which an interrupt waits for. Returns the
    logged values and the learning rate."""
    step, scaler, accum = state.step, state.scaler, cfg.grad_accum
    micro_batches, after = state.order.next_step()
    lr = state.schedule.apply(step)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    ddp = train_model if distributed.is_distributed() else None
    names: list[str] | None = None
    totals = None
    for micro, indices in enumerate(micro_batches):
        batch = batches.get(step, micro, indices)
        reseed(state.seed, step, distributed.rank(), micro, host=False, cuda=device.type == "cuda")
        sync = ddp.no_sync() if ddp is not None and micro < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                out = state.task.loss(train_model, batch, step)
            if "loss" not in out:
                raise TypeError(f"{type(state.task).__name__}.loss must return a dict with a 'loss' entry, "
                                f"got keys {sorted(out)}")
            loss = out["loss"] / accum if accum > 1 else out["loss"]
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if names is None:
            names = ["loss", *[k for k in out if k != "loss"]]
        parts = _stack_parts(out, names, device)
        totals = parts if totals is None else totals + parts
    stats = totals / accum if accum > 1 else totals
    if scaler is not None:
        scaler.unscale_(state.optimizer)
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(state.parameters, cfg.grad_clip)
        stats = torch.cat((stats, norm.detach().reshape(1).to(stats.dtype)))
    distributed.all_reduce_mean(stats)
    values = dict(zip([*names, "grad_norm"] if cfg.grad_clip > 0 else names, stats.tolist()))
    bad = [k for k, v in values.items() if not math.isfinite(v) and not (k == "grad_norm" and scaler)]
    if bad:
        detail = ", ".join(f"{k}={values[k]}" for k in bad)
        raise diverged(step + 1, detail, cfg, run, state.last_checkpoint_step)
    on_step_end = getattr(state.task, "on_step_end", None)
    with guard.deferred():  # the weight update completes, or it did not start
        if scaler is not None:
            scaler.step(state.optimizer)
            scaler.update()
        else:
            state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        if on_step_end is not None:
            on_step_end(step)
        state.order.position = after
        state.step = step + 1
    return values, lr


def _evaluate(eval_fn, model: nn.Module, step: int, run, main: bool) -> dict | None:
    result = None
    if main:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                result = eval_fn(model, step) or {}
        finally:
            model.train(was_training)
        run.log_metrics({"step": step, **{f"eval/{k}": v for k, v in result.items()}})
    distributed.barrier()
    return result

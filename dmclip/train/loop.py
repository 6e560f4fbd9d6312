"""The one training loop of dmclip: ``fit(task, dataset, cfg, run, seed=...)``.

One optimizer step = ``grad_accum`` micro-batches on each of ``world_size`` ranks (``batch_size`` samples in
all), then AdamW with linear warmup + cosine (:mod:`dmclip.train.schedule`), global-norm clipping, optional
AMP (bf16 autocast; fp16 with a GradScaler on CUDA) and ``torch.compile``.

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
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from dmclip.config import to_dict
from dmclip.errors import DmclipError
from dmclip.train import distributed
from dmclip.train.config import TrainConfig
from dmclip.train.data import DataOrder, DataPosition, data_order, is_stream
from dmclip.train.schedule import WarmupCosine

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


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
    """

    model: nn.Module

    def collate(self, samples: list[dict]) -> dict: ...

    def loss(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]: ...


# ------------------------------------------------------------------------------------------ pieces


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
                or "logit_bias" in lowered or "embed" in lowered.rsplit(".", 1)[-1] or "token_embedding" in lowered):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _mix_seed(seed: int, step: int, rank: int, micro: int, salt: int) -> int:
    # distinct, well-spread 63-bit seeds per (seed, step, rank, micro, salt); MT19937 decorrelates nearby seeds
    value = (int(seed) & 0xFFFFFFFF) * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9
    value += rank * 0x94D049BB133111EB + micro * 0x2545F4914F6CDD1D + salt * 0x632BE59BD9B4E019
    return value % (2**63 - 1)


def reseed(seed: int, step: int, rank: int = 0, micro: int = 0, salt: int = 0, *, host: bool = True,
           cuda: bool | None = None) -> None:
    """Seed torch (CPU, and the current GPU), python ``random`` and numpy for one micro-batch.

    ``host=False`` seeds torch only (the model side: dropout, sampling), which is all a forward pass draws
    from; the data side (augmentations) also gets python ``random`` and numpy.
    """
    value = _mix_seed(seed, step, rank, micro, salt)
    torch.default_generator.manual_seed(value)
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.manual_seed(value)
    if host:
        random.seed(value)
        np.random.seed(value % (2**32))


def rng_state() -> dict:
    """The RNG states as plain tensors / ints (loadable with ``weights_only=True``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    version, internal, gauss = random.getstate()
    state["python"] = {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state.get("python")
    if python is not None:
        random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy_state = state.get("numpy")
    if numpy_state is not None:
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype("uint32"), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # fewer GPUs than when it was saved
            torch.cuda.set_rng_state_all(state["cuda"])


class _InterruptGuard:
    """Routes SIGINT/SIGTERM: raises KeyboardInterrupt at once, except inside ``deferred()`` (the weight
    update), where the signal is held until the block ends, so a checkpoint never holds half an update."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.deferring = False
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                with contextlib.suppress(ValueError, OSError):
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.deferring:
            self.pending = signum
            return
        self._forward(signum, frame)

    def _forward(self, signum: int, frame) -> None:
        previous = self.previous.get(signum)
        if callable(previous):
            previous(signum, frame)  # Python's SIGINT handler / RunDir's SIGTERM handler raise KeyboardInterrupt
            if signum == signal.SIGTERM:  # a handler that did not raise: still stop like Ctrl-C
                raise KeyboardInterrupt
            return
        if previous == signal.SIG_IGN:
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            self._forward(signum, None)


class _Progress:
    """Rich progress on stderr (rank 0, a terminal, ``progress=True``); otherwise nothing.

    Two lines: ``step 12/40 ━━━━  0:00:31 1,883 samples/s lr 1.8e-05`` and the loss parts under it.
    """

    def __init__(self, enabled: bool, total: int, completed: int):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.text import Text

        class TwoLines(Progress):
            def get_renderables(self):
                yield self.make_tasks_table(self.tasks)
                for task in self.tasks:
                    yield Text(task.fields.get("info", ""), no_wrap=True, overflow="ellipsis")

        self.bar = TwoLines(TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=20), TimeRemainingColumn(),
                            TextColumn("{task.fields[speed]}"), console=console, transient=False)
        self.task = self.bar.add_task("train", total=total, completed=completed, info="", speed="")
        self.bar.start()

    def update(self, step: int, values: dict[str, float], lr: float, samples_per_s: float) -> None:
        if self.bar is None:
            return
        parts = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        self.bar.update(self.task, completed=step, info=parts, speed=f"{samples_per_s:,.0f} samples/s  lr {lr:.3g}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


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
        return self.collate([self.dataset[i] for i in indices])


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


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The device fit trains on for ``cfg.device`` (a task moves its frozen parts, e.g. a teacher, there too)."""
    if cfg.device == "cpu":
        return torch.device("cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DmclipError("train.device = 'cuda' but no GPU is available", "set train.device=auto or cpu")
    return distributed.default_device()


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
    device = resolve_device(cfg)
    if not is_stream(dataset) and (not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__")):
        raise DmclipError(f"the training data ({type(dataset).__name__}) has no length or indexing",
                          "fit needs a map-style dataset (len(dataset) and dataset[i]) or a stream")
    if cfg.amp == "fp16" and device.type != "cuda":
        raise DmclipError("train.amp = 'fp16' needs a GPU", "use train.amp=bf16 on CPU, or off")
    if eval_every and eval_fn is None:
        raise DmclipError("eval_every is set but no eval_fn was given")

    model = task.model.to(device)
    model.train()
    groups = task.param_groups(model) if hasattr(task, "param_groups") else None
    if groups is None:
        groups = default_param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    schedule = WarmupCosine(optimizer, peak=cfg.lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                            min_lr_ratio=cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    order = data_order(dataset, cfg.batch_size, seed=seed, grad_accum=cfg.grad_accum, world_size=world, rank=rank,
                       num_workers=cfg.num_workers)

    step, resumed_from, last_checkpoint_step = 0, None, None
    if resume:
        checkpoint_path = run.checkpoint_path()
        if checkpoint_path.is_file():
            state = run.load_checkpoint()
            step = _restore(state, cfg, model, optimizer, schedule, scaler, task, order, main)
            resumed_from = last_checkpoint_step = step
            log.info("resuming from step %d (%s)", step, checkpoint_path)
        else:
            log.warning("no checkpoint in %s: starting from step 0", checkpoint_path.parent)
        if main:
            run.truncate_metrics(step)
    if main and cfg.report_to:
        from dmclip.train import report_to

        report_to.attach(run, cfg.report_to, start_step=step)

    train_model: nn.Module = model
    if distributed.is_distributed():
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(task, "find_unused_parameters", False)))
    if cfg.compile:
        train_model = torch.compile(train_model)

    fetcher = _BatchFetcher(dataset, task.collate, seed, rank)
    batches = None
    if is_stream(dataset):  # the stream's readers hand out whole micro-batches from the restored position
        batches = order.batches(task.collate, pin_memory=device.type == "cuda")
    elif cfg.num_workers > 0:
        key_order = DataOrder(len(dataset), cfg.batch_size, seed=seed, grad_accum=cfg.grad_accum, world_size=world,
                              rank=rank, position=DataPosition(**order.position.state_dict()))
        loader = torch.utils.data.DataLoader(
            fetcher, batch_size=None, sampler=_keys(key_order, step), num_workers=cfg.num_workers,
            collate_fn=_identity, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed))  # its own generator: the global RNG is not touched
        batches = iter(loader)

    def save(at_step: int) -> Path | None:
        """Write last.pt for ``at_step`` (rank 0); refuses non-finite weights so the last good one stays."""
        if not main:
            return None
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise _diverged(at_step, f"weights {', '.join(bad[:4])}", cfg, run, last_checkpoint_step)
        state = {
            "format": CHECKPOINT_FORMAT, "step": at_step, "seed": seed, "world_size": world,
            "position": order.position.state_dict(), "dataset_size": order.n, "batch_size": cfg.batch_size,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_state(),
            "task": task.state_dict() if hasattr(task, "state_dict") else {}, "config": to_dict(cfg),
        }
        return run.save_checkpoint(state)

    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
    log_rows, last_values, last_eval = main, {}, None
    start_step, lr, steps_done = step, schedule.last_lr, 0
    progress = _Progress(cfg.progress and main, cfg.steps, step)
    started = interval_start = time.perf_counter()
    interval_step = step
    checkpoint_file: Path | None = run.checkpoint_path() if last_checkpoint_step is not None else None
    on_step_end = getattr(task, "on_step_end", None)
    ddp = train_model if distributed.is_distributed() else None
    accum = cfg.grad_accum
    on_cuda = device.type == "cuda"
    parameters = [p for p in model.parameters() if p.requires_grad]
    try:
        with _InterruptGuard() as guard:
            while step < cfg.steps:
                micro_batches, after = order.next_step()
                lr = schedule.apply(step)
                names: list[str] | None = None
                totals = None
                for micro, indices in enumerate(micro_batches):
                    if batches is None:
                        batch = fetcher[(step, micro, indices)]
                    else:
                        batch = next(batches)
                    if device.type != "cpu":
                        batch = _to_device(batch, device)
                    reseed(seed, step, rank, micro, host=False, cuda=on_cuda)
                    sync = ddp.no_sync() if ddp is not None and micro < accum - 1 else contextlib.nullcontext()
                    with sync:
                        with autocast:
                            out = task.loss(train_model, batch, step)
                        if "loss" not in out:
                            raise TypeError(f"{type(task).__name__}.loss must return a dict with a 'loss' entry, "
                                            f"got keys {sorted(out)}")
                        loss = out["loss"]
                        if accum > 1:
                            loss = loss / accum
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    if names is None:
                        names = ["loss", *[k for k in out if k != "loss"]]
                    parts = _stack_parts(out, names, device)
                    totals = parts if totals is None else totals + parts
                stats = totals / accum if accum > 1 else totals
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
                    stats = torch.cat((stats, norm.detach().reshape(1).to(stats.dtype)))
                distributed.all_reduce_mean(stats)
                values = dict(zip([*names, "grad_norm"] if cfg.grad_clip > 0 else names, stats.tolist()))
                bad = [k for k, v in values.items() if not math.isfinite(v) and not (k == "grad_norm" and scaler)]
                if bad:
                    detail = ", ".join(f"{k}={values[k]}" for k in bad)
                    raise _diverged(step + 1, detail, cfg, run, last_checkpoint_step)
                with guard.deferred():  # the weight update completes, or it did not start
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if on_step_end is not None:
                        on_step_end(step)
                    order.position = after
                    step += 1
                steps_done += 1
                last_values = values
                now = time.perf_counter()
                if log_rows and (step % cfg.log_every == 0 or step == cfg.steps):
                    samples_per_s = (step - interval_step) * cfg.batch_size / max(now - interval_start, 1e-9)
                    interval_start, interval_step = now, step
                    run.log_metrics({"step": step, **values, "lr": lr, "samples_per_s": round(samples_per_s, 2),
                                     "epoch": round(order.epoch_progress(), 4)})
                if progress.bar is not None:
                    elapsed = max(now - started, 1e-9)
                    progress.update(step, values, lr, steps_done * cfg.batch_size / elapsed)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    with guard.deferred():
                        checkpoint_file = save(step) or checkpoint_file
                        last_checkpoint_step = step
                if eval_fn is not None and eval_every and step % eval_every == 0 and step < cfg.steps:
                    last_eval = _evaluate(eval_fn, model, step, run, main)
            seconds = time.perf_counter() - started
            with guard.deferred():
                if step > (last_checkpoint_step if last_checkpoint_step is not None else -1):
                    checkpoint_file = save(step) or checkpoint_file
                    last_checkpoint_step = step
            if eval_fn is not None and eval_every:
                last_eval = _evaluate(eval_fn, model, step, run, main)
    except KeyboardInterrupt:
        progress.close()
        if main and step != last_checkpoint_step:
            log.warning("interrupted: saving step %d to %s", step, run.checkpoint_path())
            save(step)
        raise
    except DmclipError:
        raise
    except Exception as exc:
        if distributed.is_distributed() and distributed.is_collective_failure(exc):
            progress.close()
            if main and step != last_checkpoint_step:
                with contextlib.suppress(DmclipError):
                    save(step)
            raise DmclipError(
                f"rank {rank} lost contact with the other training processes at step {step + 1} "
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
    trained = step - start_step
    return {
        "steps": step,
        "loss": last_values.get("loss"),
        "parts": {k: v for k, v in last_values.items() if k != "grad_norm"},
        "lr": lr,
        "samples_per_s": trained * cfg.batch_size / seconds if trained and seconds > 0 else None,
        "seconds": seconds,
        "epoch": order.epoch_progress(),
        "resumed_from": resumed_from,
        "eval": last_eval,
        "checkpoint": str(checkpoint_file) if checkpoint_file is not None else None,
    }


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


def _diverged(step: int, detail: str, cfg: TrainConfig, run, last_checkpoint_step: int | None) -> DmclipError:
    kept = (f"the last good checkpoint (step {last_checkpoint_step}) is kept in {run.checkpoint_path()}"
            if last_checkpoint_step is not None else "no checkpoint was written before it")
    amp = f" or set train.amp=off (now {cfg.amp})" if cfg.amp != "off" else ""
    return DmclipError(f"training diverged at step {step}: non-finite {detail}",
                       f"lower train.lr (now {cfg.lr:g}){amp}, or lower train.grad_clip; {kept}")


def _restore(state: dict, cfg: TrainConfig, model, optimizer, schedule, scaler, task, order,
             main: bool) -> int:
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise DmclipError("checkpoints/last.pt is not a dmclip training checkpoint",
                          "resume a run that dmclip trained, or start a new run")
    step = int(state["step"])
    if step > cfg.steps:
        raise DmclipError(f"the checkpoint is at step {step}, past train.steps = {cfg.steps}",
                          "resume with the run's own config (--resume reuses it)")
    if state.get("batch_size") != cfg.batch_size or state.get("dataset_size") != order.n:
        data = [f"{n} samples" if isinstance(n, int) else n for n in (state.get("dataset_size"), order.n)]
        raise DmclipError(
            f"the checkpoint was trained with batch_size {state.get('batch_size')} on {data[0]}, "
            f"this run has batch_size {cfg.batch_size} on {data[1]}",
            "resume with the same data and batch size (the data order depends on both"
            + (", and for a stream on the ranks and train.num_workers)" if isinstance(order.n, str) else ")"))
    expected = model.state_dict()
    saved = state["model"]
    mismatch = ([f"{k} missing" for k in expected if k not in saved]
                + [f"{k} unexpected" for k in saved if k not in expected]
                + [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in saved and hasattr(saved[k], "shape") and saved[k].shape != v.shape])
    if mismatch:
        raise DmclipError(f"the checkpoint does not fit this model ({len(mismatch)} tensors differ, e.g. {mismatch[0]})",
                          "resume with the same model config the run was started with")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise DmclipError(f"the checkpoint does not fit this model: {str(exc).splitlines()[0][:200]}",
                          "resume with the same model config the run was started with") from None
    schedule.load_state_dict(state.get("scheduler", {}))
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if hasattr(task, "load_state_dict") and state.get("task") is not None:
        task.load_state_dict(state["task"])
    order.position = DataPosition(**state["position"])
    if main and "rng" in state:  # the per-step reseed makes training exact anyway; this restores the rest
        set_rng_state(state["rng"])
    return step

"""Latency, FLOPs, parameters and peak memory of encoder calls: what `dmclip eval latency` measures.

    measure(model, batch_size=32, vs=other)    # every number of both models' encoders, timed interleaved
    latency_rows(measured)                     # one row per (model, encoder, batch) for a table
    times = time_calls({"image": lambda: model.encode_image(x)}, warmup=5, runs=30)
    summarize_times(times["image"])        # median / p90 / mean in ms
    count_flops(lambda: model.encode_image(x))
    peak_tensor_bytes(lambda: model.encode_image(x), exclude=[model, x])

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add) with
attention forced onto SDPA's math backend and ``nn.MultiheadAttention``'s fused fast path off, because
the counter cannot see fused CPU attention kernels; selective scans, which it cannot see at all, add
the analytic count of a counter registered with :func:`register_analytic_counter` (the models' scan
registers its own; this module imports nothing above it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from dmclip.device import model_device
from dmclip.errors import DmclipError

log = logging.getLogger(__name__)

LATENCY_TEXT = "a photo of a small red circle on the left"  # the text encoder's timed input


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(calls: Mapping[str, Callable[[], object]], *, warmup: int = 5, runs: int = 30,
               device: torch.device | str | None = None) -> dict[str, list[float]]:
    """Seconds per call for each named call: ``warmup`` untimed calls each, then ``runs`` timed rounds.

    Rounds interleave the calls (a, b, a, b, ...) so that drift in machine load hits all of them alike,
    which is what makes ``--vs`` ratios measured in one process fair.
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    with torch.inference_mode():
        for fn in calls.values():
            for _ in range(warmup):
                fn()
            _sync(device)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(runs):
            for name, fn in calls.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return times


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize_times(seconds: list[float]) -> dict:
    """Median, p90 and mean of per-call times, in milliseconds."""
    return {"median_ms": 1e3 * statistics.median(seconds), "p90_ms": 1e3 * percentile(seconds, 90),
            "mean_ms": 1e3 * statistics.fmean(seconds), "runs": len(seconds)}


# --------------------------------------------------------------------------------------------- FLOPs


# Ops FlopCounterMode cannot see (a fused kernel) are counted analytically by the module that owns them: it
# registers a context-manager factory here (dmclip.models.scan_flops does, for the selective scan), so this
# layer needs no import of the models.
_ANALYTIC_COUNTERS: list[Callable[[], contextlib.AbstractContextManager]] = []


def register_analytic_counter(factory: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Add ``factory`` (``with factory() as counter: ...`` -> FLOPs in ``counter``) to every ``count_flops``."""
    if factory not in _ANALYTIC_COUNTERS:
        _ANALYTIC_COUNTERS.append(factory)


def _counter_value(counter) -> int:
    if counter is None:
        return 0
    for attr in ("flops", "total", "count"):
        value = getattr(counter, attr, None)
        if value is not None:
            return int(value() if callable(value) else value)
    return int(counter)


@contextlib.contextmanager
def countable_attention():
    """Attention as plain matmuls: SDPA's math backend and no fused ``nn.MultiheadAttention`` path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def count_flops(fn: Callable[[], object]) -> dict:
    """FLOPs of one call: ``{"flops": total, "counted": by FlopCounterMode, "scan": analytic scan FLOPs}``."""
    # its import warns on a CUDA build without triton, which counts nothing dmclip runs
    quiet = logging.getLogger("torch.utils.flop_counter")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.flop_counter import FlopCounterMode
    finally:
        quiet.setLevel(level)

    counter_mode = FlopCounterMode(display=False)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(countable_attention())
        analytic = [stack.enter_context(factory()) for factory in _ANALYTIC_COUNTERS]
        with counter_mode:
            fn()
    counted = int(counter_mode.get_total_flops())
    scan_flops = sum(_counter_value(counter) for counter in analytic)
    return {"flops": counted + scan_flops, "counted": counted, "scan": scan_flops}


# -------------------------------------------------------------------------------------------- memory


class _LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the mode and still alive; keeps the peak."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._tracked or key in self.exclude:
                continue
            self._tracked.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_tensor_bytes(fn: Callable[[], object], exclude: Iterable[object] = ()) -> int:
    """Peak bytes of tensors allocated during one call and alive at the same time (activations).

    Weights, buffers and inputs (anything in ``exclude``: modules or tensors) are not counted, so the
    number is the call's own working memory, the same on every device and unaffected by what ran
    before in the process (unlike the process's peak RSS).
    """
    keys: set[int] = set()
    for item in exclude:
        tensors = list(item.parameters()) + list(item.buffers()) if isinstance(item, torch.nn.Module) else [item]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes():
                keys.add(tensor.untyped_storage().data_ptr())
    mode = _LiveTensorBytes(keys)
    with torch.inference_mode(), mode:
        result = fn()
    del result
    return mode.peak


def process_peak_rss_bytes() -> int | None:
    """The process's peak resident memory so far (Linux/macOS), or None where unknown."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return None


# ------------------------------------------------------------------------------------ whole encoders


def encoder_parameters(model: torch.nn.Module, fn: Callable[[], torch.Tensor]) -> int | None:
    """Parameters that one encoder call actually uses (those its output has a gradient path to)."""
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            out = fn()
            grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
        seen, total = set(), 0
        for p, g in zip(params, grads):
            if g is not None and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
    except RuntimeError as exc:  # an op without a backward: fall back to "unknown"
        log.warning("could not attribute parameters to an encoder (%s)", str(exc).splitlines()[0][:120])
        return None
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _measure_one(model: torch.nn.Module, batch_sizes: Sequence[int]) -> tuple[dict, dict[str, Callable[[], object]]]:
    """Static numbers (params, FLOPs, memory) of one model and the timed calls (name -> fn)."""
    device = model_device(model)
    size = int(model.image_size)
    numbers: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    calls: dict[str, Callable[[], object]] = {}
    generator = torch.Generator().manual_seed(0)
    encoders = [("image", model.encode_image)]
    if getattr(model, "encode_text", None) is not None:
        encoders.append(("text", model.encode_text))
    for encoder, fn in encoders:
        inputs = {}
        for b in batch_sizes:
            inputs[b] = (torch.rand(b, 3, size, size, generator=generator).to(device) if encoder == "image"
                         else model.tokenize([LATENCY_TEXT] * b).to(device))
        one = inputs[batch_sizes[0]][:1]
        numbers[f"{encoder}_params"] = encoder_parameters(model, lambda fn=fn, one=one: fn(one))
        numbers[f"{encoder}_flops"] = count_flops(lambda fn=fn, one=one: fn(one))["flops"]
        for b in batch_sizes:
            x = inputs[b]
            numbers[f"{encoder}_b{b}_peak_bytes"] = peak_tensor_bytes(lambda fn=fn, x=x: fn(x), exclude=[model, x])
            calls[f"{encoder}_b{b}"] = lambda fn=fn, x=x: fn(x)
    numbers["weights_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return numbers, calls


def measure(model: torch.nn.Module, *, batch_size: int = 32, warmup: int = 5, runs: int = 30,
            threads: int | None = None, vs: torch.nn.Module | None = None) -> dict:
    """Image/text encoder latency (median, p90 over ``runs`` timed calls after ``warmup``) at batch 1 and
    ``batch_size``, parameters, FLOPs per item, peak activation memory; with ``vs``, the same for a second
    model measured in the same process (timed calls interleaved) and the ratios model / vs.

    Returns ``{"metrics": {...}, "details": {...}}``, plus ``"vs": {"metrics", "ratios"}`` with ``vs``.
    """
    if batch_size < 1 or runs < 1 or warmup < 0:
        raise DmclipError("batch size and runs must be >= 1 and warmup >= 0", "e.g. --batch-size 32 --runs 30")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        batch_sizes = sorted({1, int(batch_size)})
        models = {"model": model} if vs is None else {"model": model, "vs": vs}
        numbers, calls = {}, {}
        for key, m in models.items():
            numbers[key], model_calls = _measure_one(m, batch_sizes)
            calls.update({f"{key}/{name}": fn for name, fn in model_calls.items()})
        times = time_calls(calls, warmup=warmup, runs=runs, device=model_device(model))
        for name, seconds in times.items():
            key, call = name.split("/", 1)
            stats = summarize_times(seconds)
            b = int(call.rsplit("_b", 1)[1])
            numbers[key][f"{call}_median_ms"] = stats["median_ms"]
            numbers[key][f"{call}_p90_ms"] = stats["p90_ms"]
            numbers[key][f"{call}_items_per_s"] = 1e3 * b / stats["median_ms"] if stats["median_ms"] > 0 else math.inf
        thread_count = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    details = {"batch_sizes": batch_sizes, "warmup": warmup, "runs": runs, "threads": thread_count,
               "interop_threads": torch.get_num_interop_threads(), "device": str(model_device(model)),
               "process_peak_rss_bytes": process_peak_rss_bytes()}
    measured = {"metrics": numbers["model"], "details": details}
    if vs is not None:
        ratios = {k: (v / numbers["vs"][k] if isinstance(v, (int, float)) and numbers["vs"].get(k) else None)
                  for k, v in numbers["model"].items()}
        measured["vs"] = {"metrics": numbers["vs"], "ratios": ratios}
    return measured


def image_latency(models: Mapping[str, torch.nn.Module], *, batch_sizes: Sequence[int] = (1, 64), warmup: int = 3,
                  runs: int = 20, threads: int | None = None) -> dict:
    """The image encoders of several models timed in one process, their calls interleaved (a, b, c, a, ...),
    so that their ratios see the same machine; with each encoder's parameters and FLOPs per image.

    Returns ``{"models": {name: {"image_params", "image_flops", "image_b<B>_median_ms", ...}}, "threads",
    "runs", "warmup", "batch_sizes"}``.
    """
    if runs < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise DmclipError("runs and batch sizes must be >= 1 and warmup >= 0", "e.g. runs=20, batch sizes 1 and 64")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        numbers: dict[str, dict] = {}
        calls: dict[str, Callable[[], object]] = {}
        generator = torch.Generator().manual_seed(0)
        for name, model in models.items():
            size, device = int(model.image_size), model_device(model)
            images = {b: torch.rand(b, 3, size, size, generator=generator).to(device) for b in batch_sizes}
            one = images[min(batch_sizes)][:1]
            numbers[name] = {"image_params": encoder_parameters(model, lambda m=model, x=one: m.encode_image(x)),
                             "image_flops": count_flops(lambda m=model, x=one: m.encode_image(x))["flops"]}
            for b, x in images.items():
                calls[f"{name}\0{b}"] = lambda m=model, x=x: m.encode_image(x)
        device = model_device(next(iter(models.values())))
        for key, seconds in time_calls(calls, warmup=warmup, runs=runs, device=device).items():
            name, b = key.split("\0")
            numbers[name][f"image_b{b}_median_ms"] = summarize_times(seconds)["median_ms"]
        thread_count = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    return {"models": numbers, "threads": thread_count, "runs": runs, "warmup": warmup,
            "batch_sizes": sorted(batch_sizes)}


def latency_rows(measured: dict) -> list[dict]:
    """(encoder, batch) rows of :func:`measure`'s numbers (or an eval latency result) for a table; "model" is
    "model" or "vs" (the legend names them)."""
    rows = []
    models = [("model", measured["metrics"])] + ([("vs", measured["vs"]["metrics"])] if "vs" in measured else [])
    for who, metrics in models:
        for encoder in ("image", "text"):
            for b in measured["details"]["batch_sizes"]:
                if f"{encoder}_b{b}_median_ms" not in metrics:
                    continue
                row = {"model": who, "encoder": encoder,
                       "batch": b, "median ms": metrics[f"{encoder}_b{b}_median_ms"],
                       "p90 ms": metrics[f"{encoder}_b{b}_p90_ms"],
                       "items/s": metrics[f"{encoder}_b{b}_items_per_s"],
                       "params M": (metrics.get(f"{encoder}_params") or float("nan")) / 1e6,
                       "GFLOPs/item": metrics[f"{encoder}_flops"] / 1e9,
                       "peak act. MiB": metrics[f"{encoder}_b{b}_peak_bytes"] / 2**20}
                if who == "model" and "vs" in measured:
                    ratio = measured["vs"]["ratios"].get(f"{encoder}_b{b}_median_ms")
                    row["× vs"] = ratio
                rows.append(row)
    return rows

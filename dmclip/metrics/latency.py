"""Latency, FLOPs, parameters and peak memory of encoder calls (pure measurement helpers).

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
import statistics
import time
import weakref
from collections.abc import Callable, Iterable, Mapping

import torch
from torch.utils._pytree import tree_flatten


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
# registers a context-manager factory here (dmclip.models.scan does, for the selective scan), so this layer
# needs no import of the models.
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
    from torch.utils.flop_counter import FlopCounterMode

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

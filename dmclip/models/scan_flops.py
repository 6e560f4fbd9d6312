"""FLOPs of the selective scan: counted analytically, once per scan, and hidden from ``FlopCounterMode``.

``with count_scan_flops() as counter: model(x)`` -> ``counter.total``. ``dmclip.metrics.latency.count_flops``
adds this count to ``FlopCounterMode``'s total (this module registers it there, so the metrics never import
the models). Every backend calls :func:`add_scan_flops` for its scans and runs inside
:func:`hidden_from_flop_counter_modes`, so a scan counts exactly once whatever runs it.
"""

from __future__ import annotations

import contextlib

import torch

from dmclip.metrics.latency import register_analytic_counter

_counters: list[FlopCount] = []


class FlopCount:
    """Accumulates analytic FLOPs of the scans run inside ``count_scan_flops()``."""

    def __init__(self):
        self.total = 0
        self.calls = 0

    def add(self, flops: int) -> None:
        self.total += int(flops)
        self.calls += 1


@contextlib.contextmanager
def count_scan_flops():
    """``with count_scan_flops() as counter: model(x)`` -> ``counter.total`` FLOPs of every scan (forward).

    Add this to ``FlopCounterMode``'s total: the scan counts to FlopCounterMode as nothing on every backend
    (it cannot see inside the fused kernels, and the ops inside the python backends are hidden from it,
    see :func:`hidden_from_flop_counter_modes`), so every scan is counted exactly once, analytically.
    """
    counter = FlopCount()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


register_analytic_counter(count_scan_flops)


def counting_scan_flops() -> bool:
    """Whether a ``count_scan_flops()`` block is open (callers skip working out FLOPs otherwise)."""
    return bool(_counters)


def add_scan_flops(flops: int) -> None:
    """Add ``flops`` (one call) to every open ``count_scan_flops()`` counter."""
    for counter in _counters:
        counter.add(flops)


def scan_flops(batch: int, dim: int, L: int, N: int, has_D: bool = True, has_z: bool = True) -> int:
    """Forward FLOPs of one scan, counting multiply and add separately (exp as one).

    Per (batch, channel, step, state): dt*A, exp, dt*u*B (1, dt*u shared), a*x + b (2), C*x + sum (2) = 7;
    per (batch, channel, step): dt*u (1), softplus (~3), D*u + y (2), silu(z) and gate (~5).
    """
    per_state = 7 * N
    per_step = 1 + 3 + (2 if has_D else 0) + (5 if has_z else 0)
    return batch * dim * L * (per_state + per_step)


def active_flop_counter_modes() -> list:
    """The ``torch.utils.flop_counter.FlopCounterMode`` objects counting on this thread right now."""
    if not torch._C._len_torch_dispatch_stack():  # the common case (training, timing): nothing to look at
        return []
    from torch.utils import flop_counter
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    inner = getattr(flop_counter, "_FlopCounterMode", None)  # torch >= 2.4: FlopCounterMode pushes this mode
    counters = []
    for mode in _get_current_dispatch_mode_stack():
        if inner is not None and isinstance(mode, inner):
            counters.append(mode.counter)
        elif isinstance(mode, flop_counter.FlopCounterMode):  # older torch: the counter is the mode itself
            counters.append(mode)
    return counters


@contextlib.contextmanager
def hidden_from_flop_counter_modes():
    """Leave every active FlopCounterMode's counts as they were before the block (per module and op).

    The python backends' inner einsums/matmuls would otherwise add to the analytic count of
    :func:`count_scan_flops`. Only the counts are restored: other dispatch modes (e.g. the peak-memory
    tracker in dmclip.metrics.latency) still see every op, and autograd is untouched.
    """
    counters = active_flop_counter_modes()
    if not counters:
        yield
        return
    saved = [(counter, {key: dict(ops) for key, ops in counter.flop_counts.items()}) for counter in counters]
    try:
        yield
    finally:
        for counter, counts in saved:
            counter.flop_counts.clear()  # a defaultdict of defaultdicts: keep the object, refill it
            for key, ops in counts.items():
                counter.flop_counts[key].update(ops)

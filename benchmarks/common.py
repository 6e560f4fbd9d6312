"""The benchmark contract and timing helpers.

A benchmark is a module ``benchmarks/bench_<name>.py`` with ``main() -> list[dict]``; each dict is one
row of the table that ``python -m benchmarks.run_all`` writes to docs/benchmarks.md:

    {
        "benchmark": "scan fwd+bwd (B=8,L=65,D=384,N=16)",  # what was measured, with the sizes (required)
        "value": "4.1 ms",         # the measured figure, with its unit (required)
        "threads": 1,              # torch threads the row ran at (None: the harness fills in the bench's)
        "baseline": "reference",   # what the ratio compares against ("" if none)
        "ratio": 12.3,             # baseline time / our time, same run: > 1 faster, < 1 slower (None if none)
        "goal": ">= 10x",          # the target, as a person would write it ("" if none)
        "met": True,               # whether the goal is met (None if there is no goal)
        "notes": "...",            # anything needed to read the figure ("" if nothing)
    }

Threads: the harness runs ``main()`` inside :func:`threads` with the module's ``THREADS`` (an int), or the
run's default count (``OMP_NUM_THREADS``, else torch's default) where the module has none, restores the
count afterwards and writes it in each row's ``threads`` column. A bench that times something at another
count does it inside ``with threads(n):`` and sets ``threads=n`` on those rows; one that calls
``torch.set_num_threads`` and leaves it changed fails (its rows would say the wrong count, and the
benches after it would run at it).

Ratios are only meaningful between timings taken in the same process at the same time: use
:func:`interleaved` to time the contenders in alternation so that a noisy neighbour slows all of them
alike. Set ``DMCLIP_BENCH_QUICK=1`` (``run_all --quick``) for a smoke run: :func:`repeats` then
shrinks every repeat count, and the figures are not worth recording.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

ROW_KEYS = ("benchmark", "value", "threads", "baseline", "ratio", "goal", "met", "notes")
REQUIRED_KEYS = ("benchmark", "value")


def quick() -> bool:
    """True for a smoke run (``--quick``): correctness of the harness, not figures."""
    return bool(os.environ.get("DMCLIP_BENCH_QUICK"))


def repeats(n: int) -> int:
    """``n`` for a real run, at most 2 for a quick one."""
    return min(n, 2) if quick() else n


@contextlib.contextmanager
def threads(n: int) -> Iterator[int]:
    """Run the block with ``n`` torch threads (and ``n`` faiss OpenMP threads when faiss is imported), then
    put back the counts that were there before, whatever the block did to them."""
    import torch

    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    faiss = sys.modules.get("faiss")
    saved_torch = torch.get_num_threads()
    saved_faiss = faiss.omp_get_max_threads() if faiss is not None else None
    torch.set_num_threads(n)
    if faiss is not None:
        faiss.omp_set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(saved_torch)
        if faiss is not None:
            faiss.omp_set_num_threads(saved_faiss)


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, number: int = 1) -> float:
    """Median seconds per call of ``fn()`` over ``repeats`` rounds of ``number`` calls, after ``warmup`` calls.

    Use ``number > 1`` for calls much shorter than a millisecond, so timer resolution does not dominate.
    """
    if repeats < 1 or number < 1:
        raise ValueError("repeats and number must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                number: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation (A B C, B C A, ...).

    Returns ``{name: median seconds}``; ratios of these are fair same-run comparisons.
    """
    if not fns:
        return {}
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:  # rotate so no contender always runs first
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times[name].append((time.perf_counter() - start) / number)
    return {name: statistics.median(values) for name, values in times.items()}


def format_seconds(seconds: float) -> str:
    """``0.0041`` -> ``"4.1 ms"``: a time with a unit a person reads at a glance."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def row(benchmark: str, value: str, *, baseline: str = "", ratio: float | None = None, goal: str = "",
        met: bool | None = None, notes: str = "", threads: int | None = None) -> dict:
    """A row in the contract's shape (keyword arguments make the meaning of each figure explicit).

    Leave ``threads`` None unless the row was timed inside a :func:`threads` block of its own."""
    return {"benchmark": benchmark, "value": value, "threads": threads, "baseline": baseline, "ratio": ratio,
            "goal": goal, "met": met, "notes": notes}


def check_row(item: object) -> dict:
    """Validate one row from a benchmark's ``main()``; fill optional keys; raise ValueError if malformed."""
    if not isinstance(item, dict):
        raise ValueError(f"a benchmark row must be a dict, got {type(item).__name__}")
    missing = [k for k in REQUIRED_KEYS if not item.get(k)]
    unknown = [k for k in item if k not in ROW_KEYS]
    if missing or unknown:
        raise ValueError(f"benchmark row {item!r}: missing {missing}, unknown {unknown} (keys: {', '.join(ROW_KEYS)})")
    if item.get("ratio") is not None and not isinstance(item["ratio"], (int, float)):
        raise ValueError(f"benchmark row {item['benchmark']!r}: ratio must be a number or None")
    if item.get("threads") is not None and (isinstance(item["threads"], bool) or not isinstance(item["threads"], int)
                                            or item["threads"] < 1):
        raise ValueError(f"benchmark row {item['benchmark']!r}: threads must be a positive int or None")
    if item.get("met") not in (True, False, None):
        raise ValueError(f"benchmark row {item['benchmark']!r}: met must be True, False or None")
    return {**row(item["benchmark"], str(item["value"])), **item}

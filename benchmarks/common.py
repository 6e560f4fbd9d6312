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


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                      number: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function in every round, timed in alternation (A B C, B C A, ...)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names) if names else 0
        for name in names[shift:] + names[:shift]:  # rotate so no contender always runs first
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times[name].append((time.perf_counter() - start) / number)
    return times


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                number: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation (A B C, B C A, ...).

    Returns ``{name: median seconds}``; ratios of these are fair same-run comparisons.
    """
    return {name: statistics.median(values) for name, values in interleaved_times(fns, repeats, warmup,
                                                                                  number).items()}


def spread(times: list[float]) -> float:
    """max / min of a row's repeats: 1.0 when every repeat took as long; what a best-of figure hides."""
    return max(times) / min(times)


def _thread_cpu_seconds() -> dict[int, float]:
    """CPU seconds of every thread of this process (Linux: each thread's CPU clock; elsewhere empty)."""
    seconds = {}
    try:
        tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return seconds
    for tid in tids:
        try:  # the kernel's per-thread CPU clock id of any thread of this process: ((~tid) << 3) | 6
            seconds[tid] = time.clock_gettime(((~tid) << 3) | 6)
        except OSError:  # the thread ended meanwhile
            pass
    return seconds


def reference_loop_seconds(iterations: int = 200_000) -> float:
    """CPU seconds of a fixed pure-Python loop (best of 3): a slower clock, or a core shared with another
    process's hyperthread, shows here as a larger figure; compare it within one run."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        total = 0
        for k in range(iterations):
            total += k & 7
        best = min(best, time.process_time() - start)
    return best


def _system_ticks() -> tuple[int, int, int] | None:
    """(busy, iowait + steal, total) clock ticks of all CPUs since boot, from /proc/stat (Linux; else None)."""
    try:
        with open("/proc/stat", encoding="utf-8") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle, iowait, steal = fields[3], fields[4], fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])
    return total - idle - iowait - steal, iowait + steal, total


def _machine_shares(before, after, own_cpu: float) -> tuple[float, float] | None:
    """(share of the machine's CPUs busy with other work than this process, share lost to iowait + steal)
    between two :func:`_system_ticks` samples, ``own_cpu`` seconds of them this process's."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total = after[2] - before[2]
    others = max(0.0, (after[0] - before[0]) - own_cpu * ticks) / total
    return others, (after[1] - before[1]) / total


def wait_until_quiet(max_seconds: float = 20.0, window: float = 0.5, busy_limit: float = 0.1) -> tuple[float, float]:
    """Wait until the machine's CPUs spend less than ``busy_limit`` on other work, iowait and steal over a
    ``window``, at most ``max_seconds``; returns (seconds waited, that share in the last window).

    A bench right after a heavy one otherwise times what the previous process left running for a while
    (the kernel writing back its files, a hypervisor's work on its I/O, exiting helpers)."""
    start = time.perf_counter()
    while True:
        own, before = time.process_time(), _system_ticks()
        time.sleep(window)
        shares = _machine_shares(before, _system_ticks(), time.process_time() - own)
        busy = sum(shares) if shares else 0.0
        waited = time.perf_counter() - start
        if busy < busy_limit or waited >= max_seconds:
            return waited, busy


def busy_threads(shares: list[float]) -> int:
    """How many threads did at least a tenth of the work (by CPU time)."""
    total = sum(shares)
    return sum(1 for share in shares if total and share >= 0.1 * total)


def observe_calls(fn: Callable[[], object], calls: int) -> dict:
    """What the process did while ``fn`` ran ``calls`` times, per call: wall and CPU seconds (CPU / wall near
    the thread count: every thread worked; near 1: one did), minor page faults (fresh memory faulted in),
    involuntary context switches (threads descheduled), the CPU seconds of each thread that worked (does
    each carry its share?), and the shares of the machine's CPUs that other processes used and that went to
    iowait and steal (a hypervisor's). The per-thread and machine figures are Linux-only (empty, None)."""
    import resource

    threads_before, usage_before = _thread_cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF)
    system_before = _system_ticks()
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    usage, threads_after = resource.getrusage(resource.RUSAGE_SELF), _thread_cpu_seconds()
    shares = _machine_shares(system_before, _system_ticks(), cpu)
    per_thread = sorted((threads_after[tid] - threads_before.get(tid, 0.0) for tid in threads_after), reverse=True)
    return {"wall": wall / calls, "cpu": cpu / calls,
            "page_faults": (usage.ru_minflt - usage_before.ru_minflt) / calls,
            "involuntary_switches": (usage.ru_nivcsw - usage_before.ru_nivcsw) / calls,
            "thread_cpu": [seconds / calls for seconds in per_thread if seconds > 0],
            "others_share": shares[0] if shares else None, "stolen_share": shares[1] if shares else None}


def machine_state() -> str:
    """What can change a timing between runs without changing the code: the CPUs this process may use,
    transparent huge pages, OpenMP's wait policy settings, the CPU clock where the OS reports it."""
    def read(path: str) -> str | None:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read().strip()
        except OSError:
            return None

    parts = []
    if hasattr(os, "sched_getaffinity"):
        parts.append(f"CPUs allowed {sorted(os.sched_getaffinity(0))}")
    thp = read("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp and "[" in thp:
        parts.append(f"THP {thp.split('[')[1].split(']')[0]}")
    waits = [f"{key}={os.environ[key]}" for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
             if key in os.environ]
    parts.append(", ".join(waits) if waits else "OpenMP wait policy: defaults")
    clock = read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    if clock:
        parts.append(f"cpu0 clock {int(clock) / 1e6:.2f} GHz")
    return "; ".join(parts)


def describe_calls(observed: dict) -> str:
    """One line from :func:`observe_calls`."""
    shares = observed["thread_cpu"]
    busy = busy_threads(shares)
    return (f"per call {format_seconds(observed['wall'])} wall, CPU/wall {observed['cpu'] / observed['wall']:.2f}, "
            f"{busy} thread(s) working ({' + '.join(format_seconds(s) for s in shares[:busy]) or '-'} CPU), "
            f"{observed['page_faults']:.0f} page faults, {observed['involuntary_switches']:.1f} involuntary "
            "context switches" + ("" if observed["others_share"] is None else
                                  f"; other processes used {observed['others_share']:.0%} of the CPUs, iowait + "
                                  f"steal {observed['stolen_share']:.0%}"))


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

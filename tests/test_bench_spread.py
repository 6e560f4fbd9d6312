"""The bench's spread reporting (benchmarks/common.py, bench_scan's spread row): what a reader of
docs/benchmarks.md relies on to tell a slow run from a slow kernel. Each test states what it would get wrong."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch

from benchmarks.common import (
    busy_threads,
    interleaved,
    interleaved_times,
    observe_calls,
    spread,
    wait_until_quiet,
)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread CPU clocks and /proc are Linux's")


def test_interleaved_times_keeps_every_round_and_interleaved_is_their_median():
    order = []
    times = interleaved_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert [len(v) for v in times.values()] == [3, 3]
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warmup, then rotated rounds
    medians = interleaved({"a": lambda: None}, repeats=5)
    assert set(medians) == {"a"} and medians["a"] >= 0


def test_spread_is_max_over_min():
    # a row whose repeats read 5, 5.5 and 10 ms has a spread of 2: a best-of figure would say 5 and hide it
    assert spread([5e-3, 5.5e-3, 10e-3]) == pytest.approx(2.0)
    assert spread([4e-3, 4e-3]) == 1.0


@linux
def test_observed_page_faults_are_per_call():
    pages = 64

    def touch_fresh_memory():
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as region:
            for page in range(pages):
                region[page * mmap.PAGESIZE] = 1

    faults = observe_calls(touch_fresh_memory, 4)["page_faults"]
    assert pages * 0.9 <= faults <= pages * 2, faults
    assert observe_calls(lambda: None, 4)["page_faults"] < 5


@linux
def test_both_threads_of_a_split_op_are_seen_working():
    # CPU / wall alone cannot tell "one thread worked" from "two threads shared one core"; each thread's CPU can
    x = torch.rand(4_000_000)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        observed = observe_calls(lambda: torch.exp(x).sum(), 20)
    finally:
        torch.set_num_threads(before)
    assert busy_threads(observed["thread_cpu"]) == 2, observed["thread_cpu"]
    assert 0 <= observed["others_share"] <= 1 and 0 <= observed["stolen_share"] <= 1


def test_busy_threads_counts_threads_with_a_tenth_of_the_work():
    assert busy_threads([5.0, 4.0, 0.01]) == 2
    assert busy_threads([5.0]) == 1
    assert busy_threads([]) == 0


@linux
def test_waiting_for_a_quiet_machine_gives_up_at_its_limit():
    waited, busy = wait_until_quiet(max_seconds=0, window=0.05)
    assert waited < 1 and 0 <= busy <= 1


def test_the_spread_row_meets_its_goal_only_within_it():
    from benchmarks.bench_scan import SPREAD_GOAL, _spread_row

    steady = _spread_row("x", [5e-3, 5.5e-3, 6e-3], lambda: None, 1e-3, (0.0, 0.0))
    assert steady["value"] == "1.20x (max / min)" and steady["met"] is True and steady["goal"] == f"<= {SPREAD_GOAL}x"
    assert "5 ms 5.5 ms 6 ms" in steady["notes"] and "page faults" in steady["notes"]
    assert _spread_row("x", [5e-3, 10e-3], lambda: None, 1e-3, (0.0, 0.0))["met"] is False

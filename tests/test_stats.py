"""Intervals for seeded sweeps. What a user would notice if this broke: a sweep calling a difference
significant that is noise (or missing a real one), or a confidence interval of the wrong width."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dmclip.errors import DmclipError
from dmclip.metrics.stats import compare_arms, paired_bootstrap, seed_interval


def test_seed_interval_by_hand():
    """values 0.10, 0.12, 0.17: mean 0.13, sample std 0.036056, t(0.975, 2) = 4.302653."""
    out = seed_interval([0.10, 0.12, 0.17])
    std = math.sqrt(((0.10 - 0.13) ** 2 + (0.12 - 0.13) ** 2 + (0.17 - 0.13) ** 2) / 2)
    half = 4.302653 * std / math.sqrt(3)
    assert out["n"] == 3
    assert out["mean"] == pytest.approx(0.13)
    assert out["std"] == pytest.approx(std)
    assert (out["low"], out["high"]) == pytest.approx((0.13 - half, 0.13 + half), rel=1e-6)


def test_one_seed_has_no_interval():
    out = seed_interval([0.4])
    assert sorted(out) == ["high", "low", "mean", "n", "std"] and out["mean"] == 0.4 and out["n"] == 1
    assert math.isnan(out["std"]) and math.isnan(out["low"]) and math.isnan(out["high"])


def test_two_seeds_have_a_wide_interval():
    """values 0.2, 0.4: mean 0.3, std 0.141421, t(0.975, 1) = 12.706205."""
    out = seed_interval([0.2, 0.4])
    half = 12.706205 * math.sqrt(0.02) / math.sqrt(2)
    assert out["n"] == 2 and (out["low"], out["high"]) == pytest.approx((0.3 - half, 0.3 + half), rel=1e-6)


def test_no_seeds_is_a_clear_error():
    with pytest.raises(DmclipError, match="no values"):
        seed_interval([])


def test_paired_bootstrap_of_a_constant_difference_is_that_difference():
    """Every item of every seed gains exactly 0.25: no resampling can move the interval."""
    rng = np.random.default_rng(0)
    base = {"acc": rng.random((3, 50))}
    treated = {"acc": base["acc"] + 0.25}
    out = paired_bootstrap(base, treated, replicates=200)["acc"]
    assert out["diff"] == pytest.approx(0.25)
    assert out["low"] == pytest.approx(0.25) and out["high"] == pytest.approx(0.25) and out["significant"]


def test_paired_bootstrap_matches_the_normal_interval_of_a_large_sample():
    """One seed, 4000 items whose paired difference is +1 with p=0.3 and -1 with p=0.2 (else 0): the
    interval is close to mean +- 1.96 sd / sqrt(n), sd of the differences, as the bootstrap's theory says."""
    rng = np.random.default_rng(1)
    u = rng.random(4000)
    diff = np.where(u < 0.3, 1.0, np.where(u < 0.5, -1.0, 0.0))
    base = {"acc": np.zeros((1, 4000)) + 0.5}
    treated = {"acc": base["acc"] + diff * 0.5}
    out = paired_bootstrap(base, treated, replicates=3000, seed=2)["acc"]
    d = diff * 0.5
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert out["diff"] == pytest.approx(d.mean())
    assert out["low"] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert out["high"] == pytest.approx(d.mean() + half, abs=0.15 * half)


def test_pairing_removes_noise_the_arms_share():
    """Both arms get the same large per-item noise and arm B +0.005: paired, the gain is significant; the
    same numbers unpaired (B's items shuffled) are not."""
    rng = np.random.default_rng(3)
    shared = rng.random((3, 2000))
    base, treated = {"acc": shared}, {"acc": shared + 0.005}
    assert paired_bootstrap(base, treated, replicates=500)["acc"]["significant"]
    shuffled = {"acc": rng.permuted(shared, axis=1) + 0.005}
    unpaired = paired_bootstrap(base, shuffled, replicates=500)["acc"]
    assert unpaired["low"] < 0 < unpaired["high"]


def test_seed_noise_widens_the_interval():
    """A seed effect (one seed +0.2, others -0.1 for both the difference): resampling seeds must show it."""
    items = np.zeros((3, 500))
    base = {"acc": items}
    treated = {"acc": items + np.array([[0.2], [-0.1], [-0.1]])}
    out = paired_bootstrap(base, treated, replicates=2000)["acc"]
    assert out["low"] == pytest.approx(-0.1) and out["high"] == pytest.approx(0.2)
    assert not out["significant"]


def test_derived_column_is_the_weighted_sum():
    rng = np.random.default_rng(4)
    base = {"a": rng.random((2, 100)), "b": rng.random((2, 300))}
    treated = {"a": base["a"] + 0.1, "b": base["b"] - 0.3}
    out = paired_bootstrap(base, treated, derived={"avg": {"a": 0.5, "b": 0.5}}, replicates=100)
    assert out["avg"]["diff"] == pytest.approx(-0.1)
    assert out["avg"]["low"] == pytest.approx(-0.1) and out["avg"]["high"] == pytest.approx(-0.1)
    assert (out["a"]["seeds"], out["a"]["items"], out["b"]["items"], out["avg"]["items"]) == (2, 100, 300, 400)


def test_a_derived_column_over_an_unknown_column_is_refused():
    base = {"a": np.zeros((2, 10))}
    with pytest.raises(DmclipError, match="unknown columns"):
        paired_bootstrap(base, base, derived={"avg": {"a": 0.5, "typo": 0.5}}, replicates=10)


def test_no_difference_is_not_significant():
    """Identical arms: the interval is [0, 0], which does not exclude 0."""
    base = {"acc": np.random.default_rng(10).random((2, 40))}
    out = paired_bootstrap(base, base, replicates=50)["acc"]
    assert out["low"] == out["high"] == 0.0 and not out["significant"]


def test_compare_arms_summarises_every_arm_and_differences_against_the_baseline():
    rng = np.random.default_rng(5)
    runs = lambda shift: [{"x": (rng.random(400) < 0.3 + shift).astype(float)} for _ in range(3)]
    arms = {"alpha=0": runs(0.0), "alpha=0.75": runs(0.2)}
    out = compare_arms(arms, "alpha=0", weights={"x": 1.0}, replicates=300)
    assert set(out["arms"]) == {"alpha=0", "alpha=0.75"} and set(out["differences"]) == {"alpha=0.75"}
    per_seed = [r["x"].mean() for r in arms["alpha=0.75"]]
    assert out["baseline"] == "alpha=0"  # summary.json names the arm the differences are against
    assert out["arms"]["alpha=0.75"]["x"]["mean"] == pytest.approx(np.mean(per_seed))
    assert out["arms"]["alpha=0.75"]["x"]["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert out["arms"]["alpha=0.75"]["x"]["n"] == 3
    assert out["arms"]["alpha=0.75"]["Avg Perf"]["mean"] == pytest.approx(np.mean(per_seed))
    assert out["differences"]["alpha=0.75"]["Avg Perf"]["significant"]


@pytest.mark.parametrize("treated, message", [
    ({"acc": np.zeros((2, 10))}, "shape"),
    ({"other": np.zeros((3, 10))}, "different columns"),
])
def test_mismatched_arms_are_refused(treated, message):
    with pytest.raises(DmclipError, match=message):
        paired_bootstrap({"acc": np.zeros((3, 10))}, treated)


def test_compare_arms_draws_are_reproducible_by_default():
    """A sweep summarised again prints the interval published for it: the default bootstrap is 2000
    replicates from seed 0 (`distill --seeds` and scripts/compare-sweeps.py leave the seed at its default)."""
    rng = np.random.default_rng(6)
    arms = {"a": [{"x": rng.random(50)} for _ in range(2)], "b": [{"x": rng.random(50)} for _ in range(2)]}
    default = compare_arms(arms, "a", weights={"x": 1.0})["differences"]["b"]["x"]
    assert default == compare_arms(arms, "a", weights={"x": 1.0}, replicates=2000, seed=0)["differences"]["b"]["x"]
    assert default != compare_arms(arms, "a", weights={"x": 1.0}, replicates=2000, seed=1)["differences"]["b"]["x"]


def test_compare_arms_of_one_seed_gives_means_without_spread():
    arms = {"a": [{"x": np.array([0.0, 1.0, 1.0, 1.0])}], "b": [{"x": np.array([1.0, 1.0, 1.0, 1.0])}]}
    out = compare_arms(arms, "a", weights={"x": 1.0}, replicates=50)
    assert out["arms"]["a"]["x"]["mean"] == 0.75 and math.isnan(out["arms"]["a"]["x"]["std"])
    assert out["differences"]["b"]["x"]["diff"] == pytest.approx(0.25)


def test_compare_arms_passes_its_confidence_and_bootstrap_settings_on():
    """An 80 % interval asked of the sweep is an 80 % interval in both tables, from the asked draws."""
    rng = np.random.default_rng(7)
    arms = {"a": [{"x": rng.random(30)} for _ in range(3)], "b": [{"x": rng.random(30)} for _ in range(3)]}
    out = compare_arms(arms, "a", weights={"x": 1.0}, replicates=60, confidence=0.8, seed=3)
    per_seed = [run["x"].mean() for run in arms["b"]]
    assert out["arms"]["b"]["x"] == seed_interval(per_seed, 0.8)
    stacked = {arm: {"x": np.stack([run["x"] for run in runs])} for arm, runs in arms.items()}
    direct = paired_bootstrap(stacked["a"], stacked["b"], replicates=60, confidence=0.8, seed=3)
    assert out["differences"]["b"]["x"] == direct["x"]


def test_the_interval_is_the_percentile_interval_of_the_replicates():
    """Two replicates: the 100 % interval runs from one to the other, and numpy's percentile interpolates
    linearly between them, so the 50 % interval is the middle half of it."""
    rng = np.random.default_rng(8)
    base, treated = {"acc": rng.random((2, 20))}, {"acc": rng.random((2, 20))}
    full = paired_bootstrap(base, treated, replicates=2, confidence=1.0)["acc"]
    half = paired_bootstrap(base, treated, replicates=2, confidence=0.5)["acc"]
    assert full["high"] > full["low"]
    assert half["high"] - half["low"] == pytest.approx(0.5 * (full["high"] - full["low"]), rel=1e-9)
    assert half["low"] + half["high"] == pytest.approx(full["low"] + full["high"], rel=1e-9)


def test_paired_bootstrap_draws_are_reproducible_by_default():
    rng = np.random.default_rng(9)
    base, treated = {"acc": rng.random((2, 30))}, {"acc": rng.random((2, 30))}
    assert paired_bootstrap(base, treated) == paired_bootstrap(base, treated, replicates=2000, seed=0)
    assert paired_bootstrap(base, treated) != paired_bootstrap(base, treated, replicates=2000, seed=1)

"""Intervals for experiments run over several seeds: is an effect larger than the noise?

Two questions, two tools:

- *How much does a column move from seed to seed?* ``seed_interval``: mean, sample standard deviation and a
  Student-t 95 % confidence interval over the per-seed values (n - 1 degrees of freedom).
- *Does arm B beat arm A?* ``paired_bootstrap``: a two-level (seeds, then evaluation items) bootstrap of the
  paired difference B - A. Arms are paired by seed (same seed = same initialisation and data order) and by
  evaluation item (both arms answer the same queries), so the noise both arms share cancels. Each replicate
  draws seeds with replacement and, independently per column, items with replacement; the interval is the
  percentile interval of the replicated mean difference (Efron & Tibshirani 1993, ch. 13; the two-level
  resampling as Davison & Hinkley 1997, sec. 3.8). A difference is *significant* when its interval excludes 0.

Inputs are per-item scores (e.g. 1.0 for a top-1 hit, 0.0 for a miss) as arrays of shape (seeds, items),
one per column; a derived column (Avg Perf) is a fixed weighted sum of column means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from dmclip.errors import DmclipError


def t_quantile(probability: float, df: int) -> float:
    """The Student-t quantile (scipy's ``t.ppf``)."""
    from scipy.stats import t

    return float(t.ppf(probability, df))


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """``{"mean", "std", "low", "high", "n"}`` of per-seed values: mean +- t_{(1+c)/2, n-1} * std / sqrt(n).

    One value has no spread: std, low and high are NaN (one run is one run).
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        raise DmclipError("no values to summarise", "run at least one seed")
    mean = float(values.mean())
    if n == 1:
        return {"mean": mean, "std": math.nan, "low": math.nan, "high": math.nan, "n": 1}
    std = float(values.std(ddof=1))
    half = t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": int(n)}


def _check_pairs(baseline: Mapping[str, np.ndarray], treatment: Mapping[str, np.ndarray]) -> int:
    if set(baseline) != set(treatment):
        raise DmclipError(f"the arms report different columns: {sorted(set(baseline) ^ set(treatment))}",
                          "compare runs scored on the same evaluation sets")
    seeds = None
    for column in baseline:
        a, b = np.asarray(baseline[column]), np.asarray(treatment[column])
        if a.ndim != 2 or a.shape != b.shape:
            raise DmclipError(f"column {column!r}: per-item scores of shape {a.shape} vs {b.shape}",
                              "both arms need (seeds, items) arrays of one shape: the same seeds, the same items")
        if seeds is not None and a.shape[0] != seeds:
            raise DmclipError(f"column {column!r} has {a.shape[0]} seeds, another column {seeds}",
                              "score every seed on every evaluation set")
        seeds = a.shape[0]
    if not seeds:
        raise DmclipError("no seeds to compare", "run at least one seed per arm")
    return seeds


def paired_bootstrap(baseline: Mapping[str, np.ndarray], treatment: Mapping[str, np.ndarray], *,
                     derived: Mapping[str, Mapping[str, float]] | None = None, replicates: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, dict]:
    """The difference treatment - baseline per column (and per derived column) with a bootstrap interval.

    ``baseline[column]`` and ``treatment[column]``: (seeds, items) per-item scores, row s of both from seed s.
    ``derived``: ``{"Avg Perf": {column: weight, ...}}``, a weighted sum of column means.
    Returns ``{column: {"diff", "low", "high", "significant", "seeds", "items"}}``; ``diff`` is the observed
    mean difference, ``low``/``high`` the percentile interval.
    """
    seeds = _check_pairs(baseline, treatment)
    rng = np.random.default_rng(seed)
    columns = list(baseline)
    differences = {c: np.asarray(treatment[c], np.float64) - np.asarray(baseline[c], np.float64) for c in columns}
    observed = {c: float(d.mean()) for c, d in differences.items()}
    draws = {c: np.empty(replicates) for c in columns}
    for r in range(replicates):
        chosen_seeds = rng.integers(0, seeds, size=seeds)
        for c in columns:
            per_item = differences[c][chosen_seeds].mean(axis=0)  # (items,)
            counts = rng.multinomial(per_item.size, np.full(per_item.size, 1.0 / per_item.size))
            draws[c][r] = counts @ per_item / per_item.size
    tail = 100 * (1 - confidence) / 2
    out = {}

    def summarise(name: str, value: float, replicated: np.ndarray, items: int) -> None:
        low, high = np.percentile(replicated, [tail, 100 - tail])
        out[name] = {"diff": value, "low": float(low), "high": float(high),
                     "significant": bool(low > 0 or high < 0), "seeds": seeds, "items": items}

    for c in columns:
        summarise(c, observed[c], draws[c], differences[c].shape[1])
    for name, weights in (derived or {}).items():
        unknown = set(weights) - set(columns)
        if unknown:
            raise DmclipError(f"derived column {name!r} uses unknown columns {sorted(unknown)}",
                              f"weights may name only {columns}")
        value = sum(w * observed[c] for c, w in weights.items())
        replicated = sum(w * draws[c] for c, w in weights.items())
        summarise(name, value, replicated, sum(differences[c].shape[1] for c in weights))
    return out


def compare_arms(arms: Mapping[str, Sequence[Mapping[str, np.ndarray]]], baseline: str, *,
                 weights: Mapping[str, float], derived_name: str = "Avg Perf", replicates: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> dict:
    """Arms of a seeded sweep, each a list (one entry per seed, in the same seed order for every arm) of
    ``{column: per-item scores (items,)}``.

    Returns ``{"arms": {arm: {column: seed_interval}}, "differences": {arm: paired_bootstrap vs baseline}}``;
    the derived column (``weights``: column -> weight of its mean) is summarised the same way.
    """
    if baseline not in arms:
        raise DmclipError(f"baseline arm {baseline!r} is not in the sweep ({sorted(arms)})",
                          "compare against an arm that was run")
    stacked = {arm: {column: np.stack([np.asarray(seed_scores[column], np.float64) for seed_scores in runs])
                     for column in runs[0]} for arm, runs in arms.items()}
    summary: dict = {"arms": {}, "differences": {}, "baseline": baseline}
    for arm, columns in stacked.items():
        per_seed = {column: scores.mean(axis=1) for column, scores in columns.items()}
        per_seed[derived_name] = sum(w * per_seed[c] for c, w in weights.items())
        summary["arms"][arm] = {column: seed_interval(values, confidence) for column, values in per_seed.items()}
        if arm != baseline:
            summary["differences"][arm] = paired_bootstrap(stacked[baseline], columns,
                                                           derived={derived_name: dict(weights)},
                                                           replicates=replicates, confidence=confidence, seed=seed)
    return summary

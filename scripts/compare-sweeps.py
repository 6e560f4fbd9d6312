#!/usr/bin/env python3
"""Paired comparison of one arm of two distill sweeps run at the same seeds (e.g. a loss option on and off):

    python scripts/compare-sweeps.py BASELINE_SWEEP:alpha=0.75 TREATMENT_SWEEP:alpha=0.75

Reads each sweep's items.npz (per-item hits of every run) and prints, per column and for Avg Perf, both arms'
mean ± std over seeds and the treatment's paired difference with the same seeds x items bootstrap interval
the sweeps use (dmclip.metrics.stats.compare_arms). Seeds present in both sweeps are paired.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np


def arm(spec: str) -> tuple[str, dict[int, dict[str, np.ndarray]], dict]:
    path, _, alpha = spec.rpartition(":")
    sweep = Path(path)
    items = np.load(sweep / "items.npz")
    summary = json.loads((sweep / "summary.json").read_text())
    import yaml

    default_seed = int(yaml.safe_load((sweep / "resolved.yaml").read_text()).get("seed", 0))
    runs: dict[int, dict[str, np.ndarray]] = {}
    for key in items.files:
        model, column = key.split("|", 1)
        match = re.fullmatch(rf"student {re.escape(alpha)}(?: seed=(\d+))?", model)
        if match:
            seed = int(match.group(1)) if match.group(1) else default_seed  # one-seed sweeps name none
            runs.setdefault(seed, {})[column] = items[key].astype(np.float64)
    if not runs:
        sys.exit(f"error: no runs of {alpha!r} in {sweep}")
    return f"{sweep.name}:{alpha}", runs, summary["rq1"]["avg_perf_weights"]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    from dmclip.metrics.stats import compare_arms
    from dmclip.report import markdown_table

    (name_a, runs_a, weights), (name_b, runs_b, _) = arm(argv[0]), arm(argv[1])
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        sys.exit("error: the sweeps share no seed")
    stats = compare_arms({name_a: [runs_a[s] for s in seeds], name_b: [runs_b[s] for s in seeds]}, name_a,
                         weights=weights)
    print(f"seeds: {seeds}")
    rows = []
    for column, d in stats["differences"][name_b].items():
        a, b = stats["arms"][name_a][column], stats["arms"][name_b][column]
        rows.append([column, f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f}", f"{100 * b['mean']:.2f} ± {100 * b['std']:.2f}",
                     f"{100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]{'*' if d['significant'] else ''}"])
    print(markdown_table(["column", name_a, name_b, "difference [95 % CI]"], rows, align="lrrr"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The frontier's pairing and findings on timings we choose: what a reader of the RQ2 table relies on."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

import dmclip.metrics.latency as latency
from dmclip.evaluation.frontier import frontier


class Tower(nn.Module):
    def __init__(self, family: str):
        super().__init__()
        self.arch = {"family": family}


class Model(nn.Module):
    def __init__(self, family: str):
        super().__init__()
        self.visual = Tower(family)


def test_each_mamba_arm_is_paired_with_the_vit_arm_nearest_in_latency_at_each_batch(monkeypatch):
    # ms at batch 1 and 64: mamba is nearest vit-small at batch 1 and vit-large at batch 64
    times = {"teacher": (4.0, 400.0), "mamba": (2.0, 100.0), "vit-small": (1.9, 60.0), "vit-large": (3.0, 110.0)}
    monkeypatch.setattr(latency, "image_latency", lambda models, **kw: {"threads": 2, "models": {
        name: {"image_params": 1, "image_flops": 1, "image_b1_median_ms": times[name][0],
               "image_b64_median_ms": times[name][1]} for name in models}})
    families = {"teacher": "vit", "mamba": "vision-mamba", "vit-small": "vit", "vit-large": "vit"}
    arms = {arm: [f"{arm}-s0", f"{arm}-s1"] for arm in ("mamba", "vit-small", "vit-large")}
    models = {"teacher": Model("vit"), **{ref: Model(families[arm]) for arm, refs in arms.items() for ref in refs}}
    rng = np.random.default_rng(0)
    hit_rate = {"mamba": 0.55, "vit-small": 0.35, "vit-large": 0.5}
    items = {ref: {"acc": (rng.random(400) < hit_rate[arm]).astype(float)} for arm, refs in arms.items() for ref in refs}
    means = {arm: np.mean([items[ref]["acc"].mean() for ref in refs]) for arm, refs in arms.items()}
    stats = {"arms": {arm: {"Avg Perf": {"mean": means[arm], "low": means[arm] - 0.05, "high": means[arm] + 0.05,
                                         "n": 2}} for arm in arms}}
    result = {"rows": [{"model": "teacher", "Avg Perf": 0.55}], "avg_perf_weights": {"acc": 1.0}}
    found = frontier(result, stats, arms, "teacher", models, items)
    assert [(p["against"], p["batch"]) for p in found["pairs"]] == [("vit-small", 1), ("vit-large", 64)]
    small, large = found["pairs"]
    assert small["latency_ratio"] == pytest.approx(2.0 / 1.9) and large["latency_ratio"] == pytest.approx(100 / 110)
    assert small["diff"] == pytest.approx(means["mamba"] - means["vit-small"]) and small["significant"]
    points = {p["name"]: p for p in found["points"]}
    assert points["mamba"]["b64_ratio"] == pytest.approx(0.25) and points["mamba"]["kept"]["mean"] == pytest.approx(
        means["mamba"] / 0.55)
    assert any("Mamba ahead" in f for f in found["findings"])
    assert means["mamba"] / 0.55 > 0.9 and found["findings"][0].startswith(
        "the fastest Vision-Mamba arm keeping ≥ 90 % of the reference's Avg Perf on average is mamba")
    assert "0.50× its latency at batch 1 and 0.25× at batch 64" in found["findings"][0]

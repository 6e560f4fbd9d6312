"""The accuracy-latency frontier of `dmclip eval suite --arm ... --latency`: each arm (one architecture, one
model per seed) placed by its image encoder's latency against a reference model (the teacher) and by its Avg
Perf over seeds; families compared at equal latency with paired intervals.

    frontier(result, stats, arms, reference, models)   # result: the suite's; stats: compare_arms' output
    frontier_markdown(found); plot_frontier(found, path)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch import nn

from dmclip.errors import DmclipError
from dmclip.report import markdown_table, pyplot, save_figure

KEEP = 0.9  # the share of the reference's Avg Perf a student is asked to keep


def family(model: nn.Module) -> str:
    """The image tower's family (``vit``, ``vision-mamba``, ...), or its class name."""
    visual = getattr(model, "visual", model)
    return str(getattr(visual, "arch", {}).get("family") or type(visual).__name__)


def frontier(result: dict, stats: dict, arms: Mapping[str, list[str]], reference: str,
             models: Mapping[str, nn.Module], items: Mapping[str, Mapping[str, np.ndarray]], *,
             runs: int = 20, warmup: int = 3, threads: int | None = None) -> dict:
    """Latency (batch 1 and 64, interleaved) and Avg Perf of every arm and of ``reference``.

    ``items``: per-model per-item hits (the suite's), for the paired comparisons at equal latency: each arm
    of one family against the arm of another family whose batch-1 latency is nearest.
    """
    from dmclip.metrics.latency import image_latency
    from dmclip.metrics.stats import paired_bootstrap

    rows = {row["model"]: row for row in result["rows"]}
    if reference not in rows:
        raise DmclipError(f"the reference model {reference!r} is not in the suite",
                          "pass it with --models (e.g. the teacher) or name one of them with --reference")
    timed = {reference: models[reference], **{name: models[refs[0]] for name, refs in arms.items()}}
    measured = image_latency(timed, runs=runs, warmup=warmup, threads=threads)
    ref_avg = rows[reference]["Avg Perf"]
    ref_time = measured["models"][reference]
    points = []
    for name in timed:
        numbers = measured["models"][name]
        if name == reference:
            perf = {"mean": ref_avg, "low": math.nan, "high": math.nan, "n": 1}
        else:
            perf = stats["arms"][name]["Avg Perf"]
        points.append({
            "name": name, "family": family(timed[name]), "reference": name == reference,
            "image_params": numbers["image_params"], "image_flops": numbers["image_flops"],
            **{f"b{b}_ms": numbers[f"image_b{b}_median_ms"] for b in (1, 64)},
            **{f"b{b}_ratio": numbers[f"image_b{b}_median_ms"] / ref_time[f"image_b{b}_median_ms"] for b in (1, 64)},
            "avg_perf": perf, "kept": {k: perf[k] / ref_avg if ref_avg else math.nan for k in ("mean", "low", "high")},
        })
    pairs = []
    arm_points = [p for p in points if not p["reference"]]
    weights = {"Avg Perf": dict(result["avg_perf_weights"])}
    for point in arm_points:
        others = [o for o in arm_points if o["family"] != point["family"]]
        if not others or point["family"] != "vision-mamba":
            continue
        for b in (1, 64):
            nearest = min(others, key=lambda o: abs(math.log(o[f"b{b}_ratio"] / point[f"b{b}_ratio"])))
            stacked = [{c: np.stack([np.asarray(items[ref][c], np.float64) for ref in arms[p["name"]]])
                        for c in items[arms[p["name"]][0]]} for p in (nearest, point)]
            difference = paired_bootstrap(stacked[0], stacked[1], derived=weights)["Avg Perf"]
            pairs.append({"arm": point["name"], "against": nearest["name"], "batch": b,
                          "latency_ratio": point[f"b{b}_ms"] / nearest[f"b{b}_ms"], **difference})
    return {"points": points, "pairs": pairs, "reference": reference, "threads": measured["threads"],
            "runs": runs, "findings": _findings(points, pairs)}


def _findings(points: list[dict], pairs: list[dict]) -> list[str]:
    """The smallest Mamba student that keeps >= 90 % of the reference's Avg Perf, and who is ahead at equal
    latency: stated from the intervals, never assumed."""
    out = []
    mamba = sorted((p for p in points if p["family"] == "vision-mamba" and not p["reference"]),
                   key=lambda p: p["b1_ms"])
    keeping = [p for p in mamba if p["kept"]["mean"] >= KEEP]
    if keeping:
        best = keeping[0]
        sure = "its whole interval too" if best["kept"]["low"] >= KEEP else \
            f"but its interval reaches down to {100 * best['kept']['low']:.1f} %"
        out.append(f"the fastest Vision-Mamba arm keeping ≥ {100 * KEEP:.0f} % of the reference's Avg Perf on "
                   f"average is {best['name']}: {100 * best['kept']['mean']:.1f} % ({sure}), at "
                   f"{best['b1_ratio']:.2f}× its latency at batch 1 and {best['b64_ratio']:.2f}× at batch 64")
    elif mamba:
        out.append(f"no Vision-Mamba arm keeps {100 * KEEP:.0f} % of the reference's Avg Perf on average "
                   f"(best: {max(100 * p['kept']['mean'] for p in mamba):.1f} %)")
    for pair in pairs:
        verdict = ("Mamba ahead" if pair["low"] > 0 else "ViT ahead" if pair["high"] < 0
                   else "no difference shown")
        out.append(f"{pair['arm']} − {pair['against']} (nearest in batch-{pair['batch']} latency, "
                   f"{pair['latency_ratio']:.2f}× its time): Avg Perf "
                   f"{100 * pair['diff']:+.2f} [{100 * pair['low']:+.2f}, {100 * pair['high']:+.2f}] points — {verdict}")
    return out


def frontier_markdown(found: dict) -> str:
    """The frontier table (one row per arm and the reference), the equal-latency pairs and the findings."""
    def interval(s: dict, scale: float = 100) -> str:
        if s.get("n", 2) < 2 or math.isnan(s["low"]):
            return f"{scale * s['mean']:.2f}"
        return f"{scale * s['mean']:.2f} [{scale * s['low']:.2f}, {scale * s['high']:.2f}]"

    rows = [[p["name"] + (" (reference)" if p["reference"] else ""), p["family"], f"{p['image_params'] / 1e6:.3f}",
             f"{p['image_flops'] / 1e6:.1f}", f"{p['b1_ms']:.2f}", f"{p['b64_ms']:.1f}", f"{p['b1_ratio']:.2f}",
             f"{p['b64_ratio']:.2f}", interval(p["avg_perf"]),
             interval({**p["avg_perf"], **p["kept"]}) if not p["reference"] else "100"] for p in found["points"]]
    lines = [f"\n## Accuracy against image-encoder latency ({found['threads']} thread{'s' * (found['threads'] > 1)}, timed calls interleaved, "
             f"median of {found['runs']})\n\n",
             markdown_table(["model", "family", "image params M", "image MFLOPs/img", "ms b=1", "ms b=64",
                             "× reference b=1", "× reference b=64", "Avg Perf % [95 % CI]",
                             "% of reference Avg Perf"], rows, align="ll" + "r" * 8)]
    if found["pairs"]:
        lines += ["\nAt equal latency (each Vision-Mamba arm against the arm of another family nearest in latency "
                  "at batch 1 and at batch 64; paired bootstrap over seeds and evaluation items; * = the interval "
                  "excludes 0):\n\n",
                  markdown_table(["arm − nearest", "batch", "its time × the other's",
                                  "Avg Perf difference, points [95 % CI]"],
                                 [[f"{p['arm']} − {p['against']}", p["batch"], f"{p['latency_ratio']:.2f}",
                                   f"{100 * p['diff']:+.2f} [{100 * p['low']:+.2f}, {100 * p['high']:+.2f}]"
                                   + ("*" if p["significant"] else "")] for p in found["pairs"]], align="lrrr")]
    lines += ["\n" + "".join(f"- {finding}\n" for finding in found["findings"])]
    return "".join(lines)


def plot_frontier(found: dict, path: Path) -> Path:
    """Avg Perf (95 % interval over seeds) against latency relative to the reference, batch 1 and 64, one
    marker per family; the reference at (1, its Avg Perf) and the 90 % line."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2), sharey=True)
    reference = next(p for p in found["points"] if p["reference"])
    families = sorted({p["family"] for p in found["points"] if not p["reference"]})
    markers = dict(zip(families, "osD^v"))
    for ax, b in zip(axes, (1, 64)):
        for fam in families:
            points = sorted((p for p in found["points"] if p["family"] == fam and not p["reference"]),
                            key=lambda p: p[f"b{b}_ratio"])
            means = [100 * p["avg_perf"]["mean"] for p in points]
            errors = [[0.0 if math.isnan(p["avg_perf"]["low"]) else 100 * (p["avg_perf"]["mean"] - p["avg_perf"]["low"])
                       for p in points],
                      [0.0 if math.isnan(p["avg_perf"]["high"]) else 100 * (p["avg_perf"]["high"] - p["avg_perf"]["mean"])
                       for p in points]]
            ax.errorbar([p[f"b{b}_ratio"] for p in points], means, yerr=errors, marker=markers[fam], capsize=3,
                        label=fam)
            for p, y in zip(points, means):
                ax.annotate(p["name"], (p[f"b{b}_ratio"], y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.scatter([1.0], [100 * reference["avg_perf"]["mean"]], marker="*", s=160, color="black",
                   label=f"reference ({reference['name']})", zorder=3)
        ax.axhline(100 * KEEP * reference["avg_perf"]["mean"], color="grey", linestyle=":",
                   label=f"{100 * KEEP:.0f} % of the reference")
        ratios = [p[f"b{b}_ratio"] for p in found["points"]]
        if max(ratios) / min(ratios) > 4:  # a wide range of speeds: equal ratios, equal distances
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}×"))
        ax.set_xlabel(f"image-encoder latency at batch {b}, × the reference")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("Avg Perf %")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)

"""What `dmclip compress eval` and `sweep` write for a person: the result table (report.md, summary.md and
summary.csv), the seed paper's two claims checked on the rows, and the quality-vs-bytes plot."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from dmclip.report import format_metric, markdown_table, metric_label, metric_unit, pyplot, save_figure

# result key -> column header of the tables a person reads (the unit follows the key: dmclip.report.metric_unit)
COLUMNS = {"label": "selector", "communication_efficiency": "comm. eff.", "bytes_per_image": "bytes/img",
           "bytes_per_image_without_indices": "bytes w/o idx", "bleu1": "BLEU-1", "bleu4": "BLEU-4",
           "cider": "CIDEr", "bleu4_ratio": "BLEU-4 / full", "cider_ratio": "CIDEr / full", "edge_ms": "edge ms",
           "server_ms": "server ms"}


def _fmt(key: str, value) -> str:
    if metric_unit(key):
        return format_metric(key, value)
    if value is None or isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def rows_markdown(rows: list[dict]) -> str:
    """Result rows as the table of report.md and summary.md (scores and shares in percent)."""
    return markdown_table([metric_label(key, label) for key, label in COLUMNS.items()],
                          [[_fmt(key, r.get(key)) for key in COLUMNS] for r in rows], align="l" + "r" * (len(COLUMNS) - 1))


def csv_text(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("examples", "items")))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def eval_report(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# compress eval: {result['selector']}\n", rows_markdown(rows),
             "\ncomm. eff. = vectors sent / tokens (class token counted); bytes are whole codec frames per image.\n"]
    if result.get("intervals"):
        lines.append(interval_markdown(rows, result["intervals"]))
    lines.append("\n## example captions\n")
    for ex in result["compressed"]["examples"]:
        lines.append(f"- {ex['caption']!r} (references: {'; '.join(ex['references'])})\n")
    return "".join(lines)


def _bracket(value: float, low: float, high: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "-"
    sign = "+" if signed else ""
    return f"{100 * value:{sign}.1f} [{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"


def interval_markdown(rows: list[dict], intervals: dict) -> str:
    """The quality each point keeps with its bootstrap interval, then the paired differences."""
    level = f"{100 * intervals['confidence']:g} %"
    over = f"{intervals['seeds']} seeds x {intervals['images']} images" if intervals["seeds"] > 1 \
        else f"{intervals['images']} images"
    points = intervals["points"]
    lines = [f"\nQuality kept, % of the uncompressed model's on all tokens [{level} bootstrap interval over {over}]:\n\n",
             markdown_table(["selector", "seeds", "comm. eff. %", "bytes/img", "BLEU-4 / full %", "CIDEr / full %"],
                            [[r["label"], r["seeds"], f"{100 * r['communication_efficiency']:.2f}",
                              f"{r['bytes_per_image']:.0f}",
                              _bracket(**points[r["label"]]["bleu4_ratio"]),
                              _bracket(**points[r["label"]]["cider_ratio"])] for r in rows], align="lrrrrr")]
    if intervals["pairs"]:
        lines += [f"\nPaired differences, points of the uncompressed quality [{level} interval, "
                  "the same seeds and images redrawn for both]:\n\n",
                  markdown_table(["difference", "BLEU-4 / full", "CIDEr / full"],
                                 [[name, *(_bracket(d["diff"], d["low"], d["high"], signed=True)
                                           for d in (pair["bleu4_ratio"], pair["cider_ratio"]))]
                                  for name, pair in intervals["pairs"].items()], align="lrr")]
    return "".join(lines)


def seed_claims(rows: list[dict], intervals: dict | None = None) -> list[str]:
    """The two claims of the seed paper, checked on these rows (stated, not assumed); with intervals, a claim
    holds only where the whole interval supports it."""
    out = []
    k8 = next((r for r in rows if r["selector"] == "kmeans" and r["setting"] == 8), None)
    if k8 and k8.get("bleu4_ratio") is not None:
        if intervals:
            kept = intervals["points"][k8["label"]]["bleu4_ratio"]
            verdict = ("holds" if kept["low"] >= 0.8 else "does not hold" if kept["high"] < 0.8
                       else "undecided (the interval spans 80 %)")
            out.append(f"kmeans k=8 keeps {_bracket(**kept)} % of full BLEU-4 at communication efficiency "
                       f"{100 * k8['communication_efficiency']:.1f} % — seed claim ≥ 80 %: {verdict} here")
        else:
            out.append(f"kmeans k=8 keeps {100 * k8['bleu4_ratio']:.0f} % of full BLEU-4 "
                       f"({100 * k8['bleu1_ratio']:.0f} % of BLEU-1) at communication efficiency "
                       f"{100 * k8['communication_efficiency']:.1f} % — seed claim ≥ 80 %: "
                       f"{'holds' if k8['bleu4_ratio'] >= 0.8 else 'does not hold'} here")
    for name, pair in (intervals or {}).get("pairs", {}).items():
        for metric, label in (("bleu4_ratio", "BLEU-4"), ("cider_ratio", "CIDEr")):
            d = pair[metric]
            verdict = ("k-means ahead" if d["low"] > 0 else "random ahead" if d["high"] < 0
                       else "no difference shown")
            out.append(f"{name}: {label} / full {_bracket(d['diff'], d['low'], d['high'], signed=True)} points — "
                       f"{verdict}")
    randoms = [r for r in rows if r["selector"] == "random"]
    kms = [r for r in rows if r["selector"] == "kmeans"]
    if randoms and kms:
        wins = 0
        for r in randoms:  # kmeans point with the most bytes not above this random point's bytes
            cheaper = [k for k in kms if k["bytes_per_image"] <= r["bytes_per_image"]]
            if cheaper and max(k["bleu4"] for k in cheaper) >= r["bleu4"]:
                wins += 1
        out.append(f"kmeans matches or beats random at equal-or-fewer bytes for {wins} of {len(randoms)} random points")
    return out


def plot_sweep(rows: list[dict], path: Path, metric: str = "bleu4") -> Path:
    """Quality vs communication efficiency and vs bytes per image, one line per selector.

    One row of panels per metric: ``metric`` and, when it is another one, CIDEr (BLEU-4 saturates on short
    template-like captions, CIDEr's tf-idf weighting still separates the selectors).
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    metrics = [metric] + (["cider"] if metric != "cider" and all("cider" in r for r in rows) else [])
    fig, grid = pyplot().subplots(len(metrics), 2, figsize=(11, 4.2 * len(metrics)), squeeze=False)
    baseline = next((r for r in rows if r["selector"] == "none"), None)
    by_selector: dict[str, list[dict]] = {}
    for r in rows:
        if r["selector"] != "none":
            by_selector.setdefault(r["selector"], []).append(r)
    axes_x = (("communication_efficiency", "communication efficiency (vectors sent / tokens)",
               FuncFormatter(lambda v, _: f"{100 * v:g} %")),
              ("bytes_per_image", "bytes per image on the wire", FuncFormatter(lambda v, _: f"{v:,.0f}")))
    for axes, name_y in zip(grid, metrics):
        for ax, (x_key, x_label, formatter) in zip(axes, axes_x):
            for name, points in by_selector.items():
                points = sorted(points, key=lambda r: r[x_key])
                xs, ys = [p[x_key] for p in points], [p[name_y] for p in points]
                if all(f"{name_y}_low" in p for p in points):  # bootstrap intervals over seeds and images
                    # a percentile interval of a skewed statistic (BLEU on few images) may miss its value
                    errors = [[max(0.0, y - p[f"{name_y}_low"]) for y, p in zip(ys, points)],
                              [max(0.0, p[f"{name_y}_high"] - y) for y, p in zip(ys, points)]]
                    ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
                else:
                    ax.plot(xs, ys, marker="o", label=name)
            if baseline:
                ax.axhline(baseline[name_y], color="grey", linestyle="--", label="none (all tokens)")
                ax.axhline(0.8 * baseline[name_y], color="grey", linestyle=":", label="80 % of none")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(formatter)
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels overlap
            ax.set_xlabel(x_label)
            ax.set_ylabel(name_y.upper() if name_y != "cider" else "CIDEr")
            ax.grid(True, alpha=0.3)
    grid[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)

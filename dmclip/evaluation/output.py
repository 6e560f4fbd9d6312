"""What eval writes for a person: report.md headers and metric tables, the suite's summary.md and summary.csv.

Metrics are fractions in [0, 1] in results.json and percentages in tables; docs/eval.md defines every number.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

from dmclip.metrics.latency import latency_rows
from dmclip.report import format_metric, markdown_table, metric_label, percent

# (result key, label) per row of report.md's table; the unit comes from the key (dmclip.report.metric_unit)
ZERO_SHOT_ROWS = [("acc1", "acc@1"), ("acc5", "acc@5"), ("mean_per_class_recall", "mean per-class recall")]
RETRIEVAL_ROWS = [*[(f"image_retrieval_recall@{k}", f"T→I R@{k}") for k in (1, 5, 10)],
                  ("image_retrieval_mean_rank", "T→I mean rank"), ("image_retrieval_median_rank", "T→I median rank"),
                  *[(f"text_retrieval_recall@{k}", f"I→T R@{k}") for k in (1, 5, 10)],
                  ("text_retrieval_mean_rank", "I→T mean rank"), ("text_retrieval_median_rank", "I→T median rank")]
CAPTION_ROWS = [("bleu1", "BLEU-1"), ("bleu2", "BLEU-2"), ("bleu3", "BLEU-3"), ("bleu4", "BLEU-4"),
                ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr")]
FOOTER = "\nDefinitions of every number: docs/eval.md.\n"


def report_header(title: str, ref: str, result: dict) -> str:
    """report.md's title, the model and dataset, and the result's notes."""
    text = f"# {title}\n\nmodel: `{ref}`"
    if result.get("dataset"):
        text += f"  \ndataset: `{result['dataset']}`"
    text += "\n\n"
    if result.get("notes"):
        text += "".join(f"> note: {n}\n" for n in result["notes"]) + "\n"
    return text


def metrics_markdown(result: dict, rows: Sequence[tuple[str, str]]) -> str:
    """A (metric, value) table of the result's metrics that ``rows`` names, each in its unit."""
    return markdown_table(["metric", "value"], [(metric_label(key, label), format_metric(key, result["metrics"][key],
                                                                                           other="{:.2f}"))
                                                for key, label in rows if key in result["metrics"]], align="lr")


def latency_markdown(result: dict) -> str:
    """One row per (model, encoder, batch) of a latency result; floats to 3 significant digits."""
    rows = latency_rows(result)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return markdown_table(columns, [[f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                                     for c in columns] for r in rows])


def _best(rows: Sequence[dict], column: str) -> float | None:
    values = [r.get(column) for r in rows if isinstance(r.get(column), (int, float)) and not math.isnan(r[column])]
    return max(values) if values else None


def suite_markdown(result: dict) -> str:
    """The comparison table in markdown, in percent (the unit in each header), the best value of each column
    in bold."""
    columns, rows = result["columns"], result["rows"]
    lines = []
    for row in rows:
        cells = []
        for column in columns:
            value, text = row.get(column), percent(row.get(column))
            cells.append(f"**{text}**" if text != "-" and len(rows) > 1 and value == _best(rows, column) else text)
        lines.append([row["model"], *cells])
    return markdown_table(["model", *[metric_label(c) for c in columns]], lines, align="l" + "r" * len(columns))


def suite_csv(result: dict) -> str:
    """The comparison table as CSV (fractions, full precision)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", *result["columns"]])
    for row in result["rows"]:
        writer.writerow([row["model"], *[("" if row.get(c) is None else repr(float(row[c]))) for c in result["columns"]]])
    return buffer.getvalue()


def _interval_cell(s: dict) -> str:
    if s["n"] < 2:
        return f"{100 * s['mean']:.2f} (1 seed)"
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} [{100 * s['low']:.2f}, {100 * s['high']:.2f}]"


def seed_table(stats: dict, columns: list[str], arm_header: str = "arm") -> str:
    """Per arm of :func:`dmclip.metrics.stats.compare_arms`: mean ± std [95 % t-interval] over seeds of every
    column, in percent."""
    rows = [[arm, next(iter(per_column.values()))["n"], *[_interval_cell(per_column[c]) for c in columns]]
            for arm, per_column in stats["arms"].items()]
    return markdown_table([arm_header, "seeds", *columns], rows, align="lr" + "r" * len(columns))


def difference_table(stats: dict, columns: list[str], arm_header: str = "arm") -> str:
    """Per arm: the paired difference against the baseline arm, in points, with its bootstrap interval."""
    rows = [[arm, *[f"{100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
                    + ("*" if d["significant"] else "") for d in (per_column[c] for c in columns)]]
            for arm, per_column in stats["differences"].items()]
    if not stats["differences"]:
        rows.append([f"(one {arm_header}: nothing to compare)", *[""] * len(columns)])
    return markdown_table([f"{arm_header} − {stats['baseline']}", *columns], rows, align="l" + "r" * len(columns))


def seed_csv(stats: dict, arm_header: str = "arm") -> str:
    """summary-seeds.csv: one row per (arm, column) with mean/std/CI over seeds and, for the arms other than
    the baseline, the paired difference against it with its bootstrap interval (fractions)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([arm_header, "column", "seeds", "mean", "std", "ci_low", "ci_high", "diff_vs_baseline",
                     "diff_low", "diff_high", "significant"])
    for arm, per_column in stats["arms"].items():
        for column, s in per_column.items():
            d = stats["differences"].get(arm, {}).get(column)
            writer.writerow([arm, column, s["n"], repr(s["mean"]), repr(s["std"]), repr(s["low"]), repr(s["high"]),
                             *((repr(d["diff"]), repr(d["low"]), repr(d["high"]), d["significant"]) if d else
                               ("", "", "", ""))])
    return buffer.getvalue()


def write_hits(path, items: dict) -> None:
    """items.npz: ``{model: {column: per-item 0/1 hits}}`` as uint8 arrays named ``model|column``, so the
    intervals over seeds and items can be recomputed from the run."""
    import numpy as np

    from dmclip.io import atomic_write_npz

    atomic_write_npz(path, {f"{model}|{column}": np.asarray(hits).astype(np.uint8)
                            for model, columns in items.items() for column, hits in columns.items()})

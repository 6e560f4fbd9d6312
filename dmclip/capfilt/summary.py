"""What capfilt reports: counts by source, noise removal against the data's ground truth, the precision-recall
curve as a plot, examples, and report.md."""

from __future__ import annotations

from pathlib import Path

from dmclip.metrics.filtering import noise_removal_metrics, precision_recall_curve, thin_curve
from dmclip.report import markdown_table, percent, pyplot, save_figure

SOURCES = ("web", "synthetic")


def summarize(samples: list[dict], examples: int = 8, score: str = "itm") -> dict:
    """Counts by source, noise-removal precision/recall and the curve (where ground truth exists), examples."""
    captions = [(s, c) for s in samples for c in s["captions"]]
    counts = {}
    for source in SOURCES:
        mine = [c for _, c in captions if c["source"] == source]
        kept = sum(c["kept"] for c in mine)
        counts[source] = {"total": len(mine), "kept": kept, "removed": len(mine) - kept}
    web = [c for _, c in captions if c["source"] == "web"]
    noise = curve = None
    by_kind: dict[str, dict] = {}
    if web and all("noisy" in c for c in web):
        noisy = [c["noisy"] for c in web]
        noise = noise_removal_metrics(noisy, [not c["kept"] for c in web])
        curve = precision_recall_curve([c[score] for c in web], noisy)
        for kind in sorted({c.get("noise_kind", "") for c in web if c["noisy"]} - {""}):
            of_kind = [c for c in web if c.get("noise_kind") == kind]
            by_kind[kind] = {"total": len(of_kind), "removed": sum(not c["kept"] for c in of_kind)}
        kept_web = [c for c in web if c["kept"]]
        noise["noisy_fraction_before"] = sum(noisy) / len(noisy)
        noise["noisy_fraction_after"] = (sum(c["noisy"] for c in kept_web) / len(kept_web)) if kept_web else None

    def pick(predicate) -> list[dict]:
        chosen = []
        for sample, caption in captions:
            if predicate(caption) and len(chosen) < examples:
                web_texts = [c["text"] for c in sample["captions"] if c["source"] == "web"]
                chosen.append({"image": sample["image"], "text": caption["text"], "score": caption[score],
                               **({"noisy": caption["noisy"]} if "noisy" in caption else {}),
                               **({"web": web_texts} if caption["source"] == "synthetic" else {})})
        return chosen

    return {
        "images": {"total": len(samples), "with_kept_captions": sum(any(c["kept"] for c in s["captions"])
                                                                    for s in samples)},
        "counts": counts,
        "noise_removal": noise,
        "noise_removal_by_kind": by_kind or None,
        "pr_curve": thin_curve(curve) if curve else None,
        "examples": {"removed_web": pick(lambda c: c["source"] == "web" and not c["kept"]),
                     "added_synthetic": pick(lambda c: c["source"] == "synthetic" and c["kept"]),
                     "removed_synthetic": pick(lambda c: c["source"] == "synthetic" and not c["kept"])},
    }


def plot_pr_curve(curve: dict, point: dict | None, path: Path, title: str = "", score: str = "itm") -> Path:
    """The noise-removal precision-recall curve as a PNG, the operating point marked."""
    figure, axes = pyplot().subplots(figsize=(4.8, 4.0), dpi=120)
    axes.plot(curve["recall"], curve["precision"], lw=1.6, label=f"{score} threshold sweep")
    if curve["precision"]:  # removing everything: precision = the noise rate, what a random filter gets
        axes.axhline(curve["precision"][-1], ls="--", lw=1, color="grey", label="chance (noise rate)")
    if point and point.get("precision") is not None and point.get("recall") is not None:
        axes.plot([point["recall"]], [point["precision"]], "o", color="C3", label="operating point")
    axes.set_xlabel("recall (noisy web captions removed)")
    axes.set_ylabel("precision (removed captions that were noisy)")
    axes.set_xlim(0, 1.01)
    axes.set_ylim(0, 1.01)
    axes.grid(alpha=0.3)
    ap = curve.get("average_precision")
    axes.set_title(title + (f" (AP {ap:.3f})" if ap is not None else ""), fontsize=9)
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def _filter_text(filter_result: dict) -> str:
    calibration = filter_result.get("calibration")
    if filter_result["keep_fraction"] > 0:
        return (f"keep fraction {filter_result['keep_fraction']:g} (threshold in effect "
                f"{filter_result['threshold']:.4f})")
    if calibration:
        return (f"{filter_result.get('score', 'itm')} score >= {filter_result['threshold']:.4f}, the threshold that keeps "
                f"{100 * calibration['clean_keep']:g} % of {calibration['pairs']} clean pairs of {calibration['data']}")
    return f"{filter_result.get('score', 'itm')} score >= {filter_result['threshold']:g}"


def report_markdown(result: dict) -> str:
    lines = [f"# capfilt: {result['data']} with {result['model']}", "",
             f"New dataset: `{result['dataset']}` ({result['images']['with_kept_captions']} of "
             f"{result['images']['total']} images keep at least one caption). Filter: "
             + _filter_text(result["filter"])
             + f"; captioner: {result['captioner']['method']}, {result['captioner']['num_captions']} per image.", "",
             *[f"**Warning:** {text}\n" for text in result.get("warnings", [])],
             *markdown_table(["source", "pairs", "kept", "removed"],
                             [(source, row["total"], row["kept"], row["removed"])
                              for source, row in result["counts"].items()], align="lrrr").splitlines()]
    noise = result.get("noise_removal")
    if noise:
        pct = {key: percent(noise[key], digits=1, suffix=" %")
               for key in ("precision", "recall", "f1", "noisy_fraction_before", "noisy_fraction_after")}
        lines += ["", "## Noise removal (positive = a noisy web caption, predicted = removed)", "",
                  f"precision {pct['precision']}, recall {pct['recall']}, F1 {pct['f1']}; "
                  f"noisy web captions {pct['noisy_fraction_before']} before, "
                  f"{pct['noisy_fraction_after']} of the kept ones after.", ""]
        if result.get("pr_curve") and result["pr_curve"].get("average_precision") is not None:
            lines += [f"Average precision over thresholds: "
                      f"{percent(result['pr_curve']['average_precision'], digits=1, suffix=' %')}; "
                      "the curve: ![precision-recall](pr_curve.png)", ""]
        if result.get("noise_removal_by_kind"):
            lines += markdown_table(["noise kind", "noisy captions", "removed"],
                                    [(kind, row["total"], row["removed"])
                                     for kind, row in result["noise_removal_by_kind"].items()],
                                    align="lrr").splitlines()
    for key, title in (("removed_web", "Removed web captions"), ("added_synthetic", "Added synthetic captions"),
                       ("removed_synthetic", "Removed synthetic captions")):
        rows = result["examples"][key]
        if not rows:
            continue
        score = result["filter"].get("score", "itm")
        last = "truly noisy" if key == "removed_web" else "web caption"
        cells = [(row["image"], row["text"], f"{row['score']:.3f}",
                  str(row.get("noisy", "-")) if key == "removed_web" else "; ".join(row.get("web", [])))
                 for row in rows]
        lines += ["", f"## {title}", "", *markdown_table(["image", "caption", score, last], cells,
                                                         align="llrl").splitlines()]
    lines += ["", f"Shards: {result['shards']['total']} ({result['shards']['resumed']} already written, "
                  f"{result['shards']['processed']} processed at {result['images_per_s']:.1f} images/s).", ""]
    return "\n".join(lines)


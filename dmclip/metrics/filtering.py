"""How well a data filter removes noise, where the data knows which captions are wrong: precision, recall and F1
of the removal, and the precision-recall curve over every threshold (positive = a noisy caption, predicted
positive = removed by the filter)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def noise_removal_metrics(is_noisy: Sequence[bool], removed: Sequence[bool]) -> dict:
    """Precision / recall / F1 of noise removal: positive = a noisy caption, predicted positive = removed.

    precision = noisy removed / removed, recall = noisy removed / noisy; None where the denominator is 0.
    """
    noisy = np.asarray(is_noisy, dtype=bool)
    removed = np.asarray(removed, dtype=bool)
    if noisy.shape != removed.shape:
        raise ValueError(f"{noisy.shape} noise labels for {removed.shape} filter decisions")
    tp = int((noisy & removed).sum())
    fp = int((~noisy & removed).sum())
    fn = int((noisy & ~removed).sum())
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (2 * precision * recall / (precision + recall) if precision is not None and recall is not None
          and precision + recall > 0 else None)
    return {"precision": precision, "recall": recall, "f1": f1, "true_positives": tp, "false_positives": fp,
            "false_negatives": fn, "true_negatives": int((~noisy & ~removed).sum()), "noisy": int(noisy.sum()),
            "removed": int(removed.sum()), "total": int(len(noisy))}


def precision_recall_curve(scores: Sequence[float], is_noisy: Sequence[bool]) -> dict:
    """Noise-removal precision and recall at every threshold that changes the decision.

    The filter removes a pair when ``score < threshold``; each point i removes exactly the pairs scored
    below ``thresholds[i]`` (thresholds ascending: recall rises, from the lowest-scored group up to all).
    Also returns the average precision (sum over points of precision x recall gained, as scikit-learn).
    """
    scores = np.asarray(scores, dtype=np.float64)
    noisy = np.asarray(is_noisy, dtype=bool)
    if not len(scores) or not noisy.any():
        return {"thresholds": [], "precision": [], "recall": [], "average_precision": None}
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_noisy = scores[order], noisy[order]
    distinct = np.unique(sorted_scores)  # ascending
    # a threshold just above each distinct score removes that score's group and every lower one
    thresholds = np.nextafter(distinct, np.inf)
    removed = np.searchsorted(sorted_scores, thresholds, side="left")  # pairs with score < threshold
    tp = np.cumsum(sorted_noisy)[removed - 1]  # every threshold removes at least its own group
    precision = tp / removed
    recall = tp / noisy.sum()
    gained = np.diff(np.concatenate([[0.0], recall]))
    return {"thresholds": thresholds.tolist(), "precision": precision.tolist(), "recall": recall.tolist(),
            "average_precision": float((gained * precision).sum())}


def thin_curve(curve: dict, points: int = 201) -> dict:
    """At most ``points`` evenly spaced points of a long curve (results.json stays small)."""
    n = len(curve["thresholds"])
    if n <= points:
        return curve
    keep = np.unique(np.linspace(0, n - 1, points).round().astype(int))
    return {**curve, **{k: [curve[k][i] for i in keep] for k in ("thresholds", "precision", "recall")}}


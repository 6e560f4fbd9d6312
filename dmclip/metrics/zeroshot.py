"""Zero-shot classification metrics, as CLIP_benchmark defines them (pure functions over tensors).

    classifier = class_embeddings(text_features)        # (C, T, D) -> (C, D)
    logits = zero_shot_logits(image_features, classifier)  # 100 · normalised image · class
    zero_shot_metrics(logits, labels)                    # acc1, acc5, mean_per_class_recall

Ties: classes are ranked by a *stable* descending sort, so equal logits rank the lower class index
first (deterministic; torch.topk leaves tie order unspecified).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dmclip.errors import DmclipError

# CLIP (Radford et al., 2021) and CLIP_benchmark score classes with a fixed 100 · cosine.
ZERO_SHOT_SCALE = 100.0


def class_embeddings(text_features: torch.Tensor) -> torch.Tensor:
    """(C, T, D) text features of C classes × T templates -> (C, D) class embeddings.

    Each template embedding is normalised, the T are averaged, the mean is renormalised
    (CLIP's prompt ensembling; CLIP_benchmark ``zero_shot_classifier``).
    """
    if text_features.dim() != 3:
        raise ValueError(f"text_features must be (classes, templates, dim), got {tuple(text_features.shape)}")
    mean = F.normalize(text_features.float(), dim=-1).mean(dim=1)  # (C, D)
    return F.normalize(mean, dim=-1)


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor,
                     scale: float = ZERO_SHOT_SCALE) -> torch.Tensor:
    """(N, D) image features (normalised here) · (C, D) class embeddings -> (N, C) logits."""
    return scale * F.normalize(image_features.float(), dim=-1) @ classifier.float().t()


def ranked_classes(logits: torch.Tensor) -> torch.Tensor:
    """(N, C) logits -> (N, C) class indices, best first; ties keep the lower index first."""
    return torch.sort(logits, dim=1, descending=True, stable=True).indices


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k best classes (NaN when there are fewer than k classes)."""
    if logits.shape[0] == 0:
        raise DmclipError("no samples to score", "the dataset is empty; check --data")
    if logits.shape[1] < k:
        return float("nan")
    top = ranked_classes(logits)[:, :k]
    return (top == labels.view(-1, 1)).any(dim=1).float().mean().item()


def mean_per_class_recall(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in ``labels`` of (correct predictions / samples of that class).

    The same as scikit-learn's ``balanced_accuracy_score`` (what CLIP_benchmark reports): a class that
    is only ever predicted, never a label, does not count.
    """
    labels = labels.long()
    present = torch.unique(labels)
    recalls = [(predictions[labels == c] == c).float().mean() for c in present]
    return torch.stack(recalls).mean().item()


def zero_shot_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """CLIP_benchmark's single-label metrics: ``acc1``, ``acc5`` (NaN under 5 classes), ``mean_per_class_recall``.

    Fractions in [0, 1]. ``notes`` lists anything a reader should know (e.g. why acc5 is NaN).
    """
    labels = torch.as_tensor(labels).long().view(-1)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    num_classes = logits.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DmclipError(f"labels run from {labels.min().item()} to {labels.max().item()} but there are "
                          f"{num_classes} class names", "give one class name per label (check --classnames)")
    predictions = ranked_classes(logits)[:, 0]
    metrics = {
        "acc1": topk_accuracy(logits, labels, 1),
        "acc5": topk_accuracy(logits, labels, 5),
        "mean_per_class_recall": mean_per_class_recall(predictions, labels),
    }
    notes = []
    if math.isnan(metrics["acc5"]):
        notes.append(f"acc5 is NaN: only {num_classes} classes (acc@5 needs at least 5)")
    return {**metrics, "notes": notes}

"""BLIP's three pre-training losses (Li et al., 2022, sec. 3.2) as plain functions over tensors.

``BlipModel.forward_losses`` computes the similarities/logits and calls these; they hold the math.

- ITC: image-text contrastive over [momentum batch features; feature queue], with soft targets mixed
  from the momentum model's own similarities (ALBEF's momentum distillation, weight ``alpha``).
- ITM: binary match / no-match over one positive and two hard negatives per pair, the negatives drawn
  from the in-batch similarity softmax with the positives masked out.
- LM: next-token cross-entropy with label smoothing, ``-100`` targets ignored (prompt and padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmclip.errors import DmclipError

IGNORE_INDEX = -100


def itc_soft_targets(momentum_similarity: torch.Tensor, positive_mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """ALBEF/BLIP targets: ``alpha * softmax(s_m) + (1 - alpha) * positives / #positives`` per row.

    momentum_similarity (B, N): momentum features against the bank, already divided by the temperature;
    positive_mask (B, N) bool: which bank entries show the same image (the diagonal at least).
    """
    positives = positive_mask.float()
    hard = positives / positives.sum(dim=1, keepdim=True).clamp(min=1.0)
    return alpha * F.softmax(momentum_similarity, dim=1) + (1.0 - alpha) * hard


def itc_loss(similarity_i2t: torch.Tensor, similarity_t2i: torch.Tensor, targets_i2t: torch.Tensor,
             targets_t2i: torch.Tensor) -> torch.Tensor:
    """Mean over both directions of the cross-entropy to soft targets: ``-sum_j t_ij log softmax(s_i)_j``."""
    loss_i2t = -(F.log_softmax(similarity_i2t, dim=1) * targets_i2t).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(similarity_t2i, dim=1) * targets_t2i).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def sample_hard_negatives(similarity: torch.Tensor, positive_mask: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row, one column drawn from ``softmax(similarity)`` over the non-positive columns: (B,) long.

    Masking before the softmax (not after, as BLIP writes it) draws from the same distribution but
    cannot underflow to an all-zero row at a low temperature. A row whose columns are all positive
    (the batch holds only that image) falls back to a uniform draw over the other columns.
    """
    B = similarity.shape[0]
    if B < 2:
        raise DmclipError("BLIP's image-text matching needs at least 2 pairs per batch (it mines negatives "
                          "inside the batch)", "use a batch size of 2 or more")
    logits = similarity.float().masked_fill(positive_mask, float("-inf"))
    all_positive = positive_mask.all(dim=1)
    if bool(all_positive.any()):
        off_diagonal = torch.ones_like(positive_mask).fill_diagonal_(False)  # on the mask's device
        logits[all_positive] = torch.where(off_diagonal[all_positive], 0.0, float("-inf"))
    weights = F.softmax(logits, dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over 2 classes: positives (B, 2) are class 1 (match), negatives (2B, 2) class 0."""
    logits = torch.cat([positive_logits, negative_logits], dim=0)
    labels = torch.cat([torch.ones(positive_logits.shape[0], dtype=torch.long),
                        torch.zeros(negative_logits.shape[0], dtype=torch.long)]).to(logits.device)
    return F.cross_entropy(logits, labels)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Next-token loss: logits (B, T, V) at position t predict ``targets[:, t + 1]``; -100 is ignored.

    The mean over the counted tokens of ``(1 - eps) * -log p_y + eps * mean_v -log p_v`` (BLIP's
    ``CrossEntropyLoss(label_smoothing=0.1)`` over shifted scores).
    """
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    labels = targets[:, 1:].reshape(-1)
    return F.cross_entropy(shifted.float(), labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)

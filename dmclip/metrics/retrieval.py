"""Image-text retrieval metrics with several captions per image (CLIP_benchmark / BLIP definitions).

``scores[i, t]`` is the similarity of image ``i`` and text ``t``; ``text_to_image[t]`` the image text
``t`` describes. For every query the *rank* is the 1-based position of its best-ranked positive:

    image -> text (I→T, "text retrieval"):   a query image has all its captions as positives
    text -> image (T→I, "image retrieval"):  a query text has its one image as positive

R@k = fraction of queries with rank <= k (a hit = any positive in the top k, as CLIP_benchmark's
``recall_at_k > 0`` and BLIP's ``ranks < k`` count it). Ties rank the lower index first (stable sort).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dmclip.errors import DmclipError

RECALL_KS = (1, 5, 10)


def positive_pairs(text_to_image: torch.Tensor, num_images: int) -> torch.Tensor:
    """(num_images, num_texts) bool: True where text t describes image i."""
    text_to_image = torch.as_tensor(text_to_image).long()
    positives = torch.zeros(num_images, text_to_image.numel(), dtype=torch.bool)
    positives[text_to_image, torch.arange(text_to_image.numel())] = True
    return positives


def best_positive_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """(Q, N) scores, (Q, N) bool positives -> (Q,) 1-based rank of each query's best-ranked positive."""
    if (~positives.any(dim=1)).any():
        missing = torch.nonzero(~positives.any(dim=1)).view(-1)[:5].tolist()
        raise DmclipError(f"{int((~positives.any(dim=1)).sum())} queries have no positive (e.g. {missing})",
                          "every image needs at least one caption: fix or drop the empty references")
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices  # (Q, N)
    hits = torch.gather(positives, 1, order)  # (Q, N): positive at each rank
    return hits.float().argmax(dim=1) + 1  # first True


def rank_metrics(ranks: torch.Tensor, prefix: str, ks: Sequence[int] = RECALL_KS) -> dict:
    """R@k for each k, mean and median rank, under ``<prefix>_recall@k`` / ``<prefix>_mean_rank`` ..."""
    ranks = ranks.float()
    out = {f"{prefix}_recall@{k}": (ranks <= k).float().mean().item() for k in ks}
    out[f"{prefix}_mean_rank"] = ranks.mean().item()
    out[f"{prefix}_median_rank"] = ranks.quantile(0.5).item()  # the middle value, or the mean of the two middle ones
    return out


def retrieval_ranks(scores: torch.Tensor, text_to_image: torch.Tensor,
                    text_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T→I ranks per text (texts,), I→T ranks per image (images,)), 1-based, from an (images, texts) score
    matrix. ``text_scores`` (texts, images) replaces ``scores.T`` for T→I when the two directions are scored
    differently (ITM re-ranking)."""
    num_images, num_texts = scores.shape
    if num_texts == 0 or num_images == 0:
        raise DmclipError("nothing to retrieve: no images or no captions", "check --data")
    positives = positive_pairs(text_to_image, num_images)
    i2t = best_positive_ranks(scores, positives)
    t2i = best_positive_ranks(scores.t() if text_scores is None else text_scores, positives.t())
    return t2i, i2t


def ranks_to_metrics(t2i: torch.Tensor, i2t: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict:
    """Both directions' rank metrics in CLIP_benchmark's key names:
    ``image_retrieval_*`` = text -> image (T→I), ``text_retrieval_*`` = image -> text (I→T)."""
    return {**rank_metrics(t2i, "image_retrieval", ks), **rank_metrics(i2t, "text_retrieval", ks)}


def retrieval_metrics(scores: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = RECALL_KS,
                      text_scores: torch.Tensor | None = None) -> dict:
    """Both directions from an (images, texts) score matrix (``retrieval_ranks``, then ``ranks_to_metrics``)."""
    return ranks_to_metrics(*retrieval_ranks(scores, text_to_image, text_scores), ks)


def similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (images, texts) of unnormalised features."""
    return F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).t()


def rerank(scores: torch.Tensor, k: int, score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           batch_queries: int = 16) -> torch.Tensor:
    """BLIP-style re-ranking of each query's top-``k`` ITC candidates by an image-text matching score.

    ``score_pairs(query_index (P,), candidate_index (P,)) -> (P,)`` scores pairs (an ITM match
    probability). The top-k move above every other candidate, ordered by that score with ties broken
    by ITC similarity; the others keep their similarity order below them, so ranks past k stay
    meaningful for the mean/median rank. (BLIP, Li et al. 2022, adds the ITM logit to the similarity;
    its logits dwarf a cosine, so the order is the ITM order there too. A probability does not dwarf a
    cosine, hence the explicit lexicographic order here.)
    Returns new (Q, N) scores: higher is better, only the order is meaningful.
    """
    num_queries, num_candidates = scores.shape
    k = min(int(k), num_candidates)
    out = scores.float() - 1e4  # below every re-ranked candidate, similarity order kept
    top = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :k]  # (Q, k), by ITC
    for start in range(0, num_queries, batch_queries):
        rows = torch.arange(start, min(start + batch_queries, num_queries))
        candidates = top[rows]  # (b, k)
        queries = rows.view(-1, 1).expand_as(candidates)
        match = score_pairs(queries.reshape(-1), candidates.reshape(-1)).float().view(candidates.shape).cpu()
        # stable sort by match keeps the ITC order among equal match scores
        order = torch.sort(match, dim=1, descending=True, stable=True).indices  # (b, k)
        ranked = torch.gather(candidates, 1, order)
        out[rows.view(-1, 1), ranked] = torch.arange(2 * k, k, -1, dtype=out.dtype).expand(len(rows), -1)
    return out

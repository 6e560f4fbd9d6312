"""Batched k-means in torch: greedy k-means++ init, Lloyd iterations, several restarts per image.

One call clusters the tokens of every image in a batch at once; every restart of every image is a
slice of the same tensors, so the work is a handful of batched matmuls per iteration:

    distances  (B, N, R*k) = |x|^2 - 2 x C^T + |C|^2          one bmm
    centroids  (B, R*k, W) = onehot(assign)^T x / counts        one bmm

Deterministic given ``seed`` (a CPU ``torch.Generator`` draws every random number), and an image gets
the same clusters alone as inside any batch: every image uses the same random numbers, drawn once for one
image, so ``compress send`` (one image) and ``compress eval`` (batches) compress an image identically.
The restart with the lowest inertia wins per image: a single start often lands in a poor minimum
(docs/compress.md, "k-means speed").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dmclip.errors import DmclipError


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (B, k, W) float32
    assignments: torch.Tensor  # (B, N) int64 in [0, k)
    inertia: torch.Tensor  # (B,) sum of squared distances of tokens to their centroid
    iterations: int  # Lloyd iterations actually run (stops early once no assignment changes)


def _sq_distances(x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x (B, N, W), x_sq (B, N, 1), centroids (B, C, W) -> squared distances (B, N, C), clamped at 0."""
    c_sq = (centroids * centroids).sum(-1).unsqueeze(1)  # (B, 1, C)
    d = torch.baddbmm(x_sq + c_sq, x, centroids.transpose(1, 2), alpha=-2.0)
    return d.clamp_min_(0.0)


def _sample(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Rows of ``weights`` (M, N) >= 0 and ``uniforms`` (M, T) in [0, 1) -> (M, T) indices drawn ∝ weight.

    Inverse-CDF sampling: the caller supplies the random numbers, so they can be the same for every image.
    """
    N = weights.shape[-1]
    weights = weights.to(torch.float64)  # a float32 running sum over N tokens would skew the tail
    total = weights.sum(-1, keepdim=True)
    # rows whose points all coincide with a centroid: draw uniformly (any choice has zero cost)
    weights = torch.where(total > 0, weights, torch.ones_like(weights))
    cdf = weights.cumsum(-1)
    # right=True: a point of weight 0 (cdf flat there) is never picked; the clamp catches u * total rounding up
    picks = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)
    return picks.clamp_max_(N - 1)


def kmeans_plus_plus(x: torch.Tensor, k: int, restarts: int, generator: torch.Generator,
                     local_trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007; greedy variant as in scikit-learn).

    x (B, N, W) -> initial centroids (B, restarts, k, W). Each new centre is the best of
    ``local_trials`` candidates drawn ∝ D^2, judged by the potential it leaves. The random numbers are
    drawn once, for one image, and shared by every image: image i's centres depend on its tokens and the
    generator only, never on the other images in the batch.
    """
    B, N, W = x.shape
    R = restarts
    T = local_trials if local_trials is not None else 2 + int(math.log(k))
    uniforms = torch.rand(R + (k - 1) * R * T, generator=generator, dtype=torch.float64)
    x_sq = (x * x).sum(-1)  # (B, N)
    batch = torch.arange(B).unsqueeze(1)  # (B, 1) for gathers
    first = (uniforms[:R] * N).long().clamp_max_(N - 1).expand(B, R)
    centres = [x[batch, first]]  # list of (B, R, W)
    d0 = x_sq.unsqueeze(1) + x_sq[batch, first].unsqueeze(2) - 2 * torch.bmm(centres[0], x.transpose(1, 2))
    closest = d0.clamp_min_(0.0)  # (B, R, N) distance to the nearest chosen centre
    for step in range(1, k):
        offset = R + (step - 1) * R * T
        draws = uniforms[offset:offset + R * T].view(1, R, T).expand(B, R, T).reshape(B * R, T)
        candidates = _sample(closest.reshape(B * R, N), draws).view(B, R * T)
        cand_vectors = x[batch, candidates]  # (B, RT, W)
        d = (x_sq.unsqueeze(1) + x_sq[batch, candidates].unsqueeze(2)
             - 2 * torch.bmm(cand_vectors, x.transpose(1, 2))).clamp_min_(0.0)  # (B, RT, N)
        potential = torch.minimum(d.view(B, R, T, N), closest.unsqueeze(2))  # (B, R, T, N)
        best = potential.sum(-1).argmin(-1)  # (B, R)
        closest = torch.gather(potential, 2, best.view(B, R, 1, 1).expand(B, R, 1, N)).squeeze(2)
        centres.append(torch.gather(cand_vectors.view(B, R, T, W), 2,
                                    best.view(B, R, 1, 1).expand(B, R, 1, W)).squeeze(2))
    return torch.stack(centres, 2)  # (B, R, k, W)


def kmeans(tokens: torch.Tensor, k: int, *, iterations: int = 20, restarts: int = 3, seed: int = 0) -> KMeansResult:
    """Cluster each image's tokens: tokens (B, N, W) -> k centroids and one assignment per token.

    ``k`` larger than N is clamped to N (every token its own centroid; the extra are not created).
    """
    if tokens.dim() != 3:
        raise DmclipError(f"k-means expects tokens shaped (B, N, W), got {tuple(tokens.shape)}",
                          "pass a batch of token sequences")
    if k < 1 or restarts < 1 or iterations < 0:
        raise DmclipError(f"k-means needs k >= 1, restarts >= 1, iterations >= 0 (got {k}, {restarts}, {iterations})",
                          "choose positive values")
    B, N, W = tokens.shape
    if N == 0:
        raise DmclipError("k-means got an empty token sequence", "the edge encoder must emit at least one token")
    k = min(k, N)
    R = restarts
    x = tokens.detach().to(torch.float32).contiguous()
    generator = torch.Generator().manual_seed(int(seed))
    centroids = kmeans_plus_plus(x, k, R, generator).reshape(B, R * k, W)  # (B, Rk, W)
    x_sq = (x * x).sum(-1, keepdim=True)  # (B, N, 1)
    assign = None
    done = 0
    for done in range(1, iterations + 1):
        d = _sq_distances(x, x_sq, centroids).view(B, N, R, k)
        new_assign = d.argmin(-1)  # (B, N, R)
        if assign is not None and torch.equal(new_assign, assign):
            done -= 1
            break
        assign = new_assign
        sums, counts = _cluster_sums(x, assign, k)  # (B, Rk, W), (B, Rk, 1)
        # an empty cluster keeps its previous centroid (it stays available, never NaN)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1.0), centroids)
    d = _sq_distances(x, x_sq, centroids).view(B, N, R, k)
    best_d, assign = d.min(-1)  # (B, N, R)
    inertia = best_d.sum(1)  # (B, R)
    winner = inertia.argmin(-1)  # (B,)
    batch = torch.arange(B)
    final_centroids = centroids.view(B, R, k, W)[batch, winner]  # (B, k, W)
    final_assign = assign[batch, :, winner]  # (B, N)
    # the expanded-norm distances lose digits to cancellation; report the inertia from direct differences
    nearest = torch.gather(final_centroids, 1, final_assign.unsqueeze(-1).expand(B, N, W))
    exact = ((x - nearest) ** 2).sum((1, 2))
    return KMeansResult(final_centroids, final_assign, exact, done)


def _cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, W), assign (B, N, R) in [0, k) -> per-cluster sums (B, R*k, W) and counts (B, R*k, 1).

    index_add_ touches each token once per restart (B*R*N*W adds), where a one-hot matmul costs k times more.
    """
    B, N, W = x.shape
    R = assign.shape[-1]
    base = (torch.arange(B) * (R * k)).unsqueeze(1)  # (B, 1) row offset of each image
    flat_x = x.reshape(B * N, W)
    sums = torch.zeros(B * R * k, W, dtype=x.dtype)
    counts = torch.zeros(B * R * k, dtype=x.dtype)
    ones = torch.ones(B * N, dtype=x.dtype)
    for r in range(R):
        index = (base + r * k + assign[:, :, r]).reshape(B * N)
        sums.index_add_(0, index, flat_x)
        counts.index_add_(0, index, ones)
    return sums.view(B, R * k, W), counts.view(B, R * k, 1)


def inertia_of(tokens: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of |x - c_assign|^2, per image: the oracle the tests and the bench use."""
    x = tokens.to(torch.float64)
    c = torch.gather(centroids.to(torch.float64), 1, assignments.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return ((x - c) ** 2).sum((1, 2))

"""Token selectors: what the edge sends instead of all N vision tokens (registry ``selectors``).

Every selector has ``compress(tokens (B, T, W)) -> Payload`` and ``restore(payload) -> (B, M, W)``, the
sequence the server decoder cross-attends to. Class token: with ``class_token=True`` (the default; BLIP's
image tower puts it first) token 0 is sent verbatim and comes first in the restored sequence; the
selector works on the N = T - 1 patch tokens only. With ``class_token=False`` every token is a patch token.

Restore is the same for every selector and needs nothing but the payload (the server does not know the
selector's settings): dequantise, replace each patch token by ``vectors[index]`` when indices were sent,
otherwise use the vectors as they are, and put the class token first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dmclip.compress.codec import Payload, dequantize, quantize
from dmclip.compress.kmeans import kmeans
from dmclip.errors import DmclipError
from dmclip.registry import selectors


def restore_payload(payload: Payload) -> torch.Tensor:
    """Payload -> restored tokens (B, M, W) float32: [class token,] then vectors (gathered by indices if sent)."""
    vectors = dequantize(payload.vectors, payload.scales)  # (B, K, W)
    if payload.indices is not None:
        index = payload.indices.long().unsqueeze(-1).expand(-1, -1, vectors.shape[-1])  # (B, N, W)
        vectors = torch.gather(vectors, 1, index)  # each patch token replaced by its centroid
    if payload.class_tokens is not None:
        cls = dequantize(payload.class_tokens, payload.class_scales).unsqueeze(1)  # (B, 1, W)
        vectors = torch.cat([cls, vectors], 1)
    return vectors


class Selector:
    """Base class: subclasses implement ``select(patches (B, N, W)) -> (vectors (B, K, W), indices or None)``."""

    name = "selector"
    seeded = False  # draws random numbers from ``seed`` (a sweep scores it at every seed)

    def __init__(self, *, dtype: str = "float16", class_token: bool = True, seed: int = 0):
        quantize(torch.zeros(1, 1), dtype)  # validates the dtype name early
        self.dtype = dtype
        self.class_token = class_token
        self.seed = seed

    def select(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def describe(self) -> str:
        """Short label for tables and plots, e.g. 'kmeans k=8'."""
        return self.name

    def compress(self, tokens: torch.Tensor) -> Payload:
        if tokens.dim() != 3:
            raise DmclipError(f"selector {self.name} expects tokens (B, T, W), got {tuple(tokens.shape)}",
                              "pass the image tower's token sequence, e.g. model.encode_image_tokens(images)")
        tokens = tokens.detach().float()
        if self.class_token:
            if tokens.shape[1] < 2:
                raise DmclipError(f"a class token plus patch tokens need T >= 2, got T={tokens.shape[1]}",
                                  "use class_token=False for encoders without a class token")
            cls, patches = tokens[:, 0], tokens[:, 1:]
        else:
            cls, patches = None, tokens
        vectors, indices = self.select(patches)
        vectors_q, scales = quantize(vectors, self.dtype)
        cls_q, cls_scales = quantize(cls, self.dtype) if cls is not None else (None, None)
        return Payload(self.name, patches.shape[1], vectors_q, scales, cls_q, cls_scales, indices)

    def restore(self, payload: Payload) -> torch.Tensor:
        return restore_payload(payload)

    def __repr__(self) -> str:
        return f"<selector {self.describe()} ({self.dtype})>"


def _count(fraction: float, n: int) -> int:
    """Tokens kept for a fraction of n: ceil, at least 1, at most n."""
    if not 0.0 < fraction <= 1.0:
        raise DmclipError(f"fraction {fraction} must lie in (0, 1]", "e.g. --fraction 0.25 keeps a quarter")
    return max(1, min(n, math.ceil(fraction * n - 1e-9)))


@selectors.register("none", description="send every token (uncompressed baseline)", tiny={})
class NoneSelector(Selector):
    """Send every token (the uncompressed baseline)."""

    name = "none"

    def select(self, patches):
        return patches, None


@selectors.register("kmeans", description="k centroids + a ceil(log2 k)-bit index per token",
                    tiny={"k": 2, "iterations": 3, "restarts": 1})
class KMeansSelector(Selector):
    """k-means vector quantisation: k centroids, plus one ceil(log2 k)-bit index per token ("expand")."""

    name = "kmeans"
    seeded = True

    def __init__(self, k: int = 8, *, iterations: int = 20, restarts: int = 2, restore: str = "expand", **kw):
        super().__init__(**kw)
        if k < 1:
            raise DmclipError(f"k = {k} must be at least 1", "e.g. --k 8")
        if restore not in ("expand", "centroids"):
            raise DmclipError(f"k-means restore {restore!r} is not known",
                              "use 'expand' (each token -> its centroid, indices sent) or 'centroids' (k tokens)")
        self.k, self.iterations, self.restarts, self.restore_mode = k, iterations, restarts, restore

    def describe(self):
        return f"kmeans k={self.k}" + ("" if self.restore_mode == "expand" else " (centroids only)")

    def select(self, patches):
        result = kmeans(patches, self.k, iterations=self.iterations, restarts=self.restarts, seed=self.seed)
        return result.centroids, (result.assignments if self.restore_mode == "expand" else None)


class FractionSelector(Selector):
    """Base class of the selectors that keep ``ceil(fraction * N)`` of the N patch tokens (at least one)."""

    def __init__(self, fraction: float = 0.4, **kw):
        super().__init__(**kw)
        _count(fraction, 1)  # refuses a fraction outside (0, 1] when the selector is built
        self.fraction = fraction

    def describe(self):
        return f"{self.name} {self.fraction:g}"


def _keep(patches: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """patches (B, N, W), token positions (B, keep) -> the kept tokens (B, keep, W)."""
    return torch.gather(patches, 1, order.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))


@selectors.register("random", description="keep a random fraction of the tokens", tiny={"fraction": 0.5})
class RandomSelector(FractionSelector):
    """Keep a random fraction of the patch tokens (original order), drawn from ``seed``."""

    name = "random"
    seeded = True

    def __init__(self, fraction: float = 0.4, **kw):
        super().__init__(fraction, **kw)
        self._generator = torch.Generator().manual_seed(self.seed)

    def select(self, patches):
        B, N = patches.shape[:2]
        keep = _count(self.fraction, N)
        order = torch.rand(B, N, generator=self._generator).argsort(-1)[:, :keep].sort(-1).values  # (B, keep)
        return _keep(patches, order), None


@selectors.register("topk-norm", description="keep the fraction of tokens with the largest L2 norm",
                    tiny={"fraction": 0.5})
class TopkNormSelector(FractionSelector):
    """Keep the fraction of patch tokens with the largest L2 norm (original order)."""

    name = "topk-norm"

    def select(self, patches):
        keep = _count(self.fraction, patches.shape[1])
        order = patches.norm(dim=-1).topk(keep, dim=-1).indices.sort(-1).values  # (B, keep)
        return _keep(patches, order), None


@selectors.register("pool", description="average-pool the patch grid in size x size windows", tiny={"size": 2})
class PoolSelector(Selector):
    """Average-pool the patch grid in size x size windows (the grid must be square, or given)."""

    name = "pool"

    def __init__(self, size: int = 2, grid: tuple[int, int] | None = None, **kw):
        super().__init__(**kw)
        if size < 1:
            raise DmclipError(f"pool size {size} must be at least 1", "e.g. --pool-size 2")
        self.size, self.grid = size, grid

    def describe(self):
        return f"pool {self.size}x{self.size}"

    def select(self, patches):
        B, N, W = patches.shape
        h, w = self.grid or (math.isqrt(N), math.isqrt(N))
        if h * w != N:
            raise DmclipError(f"pool needs the {N} patch tokens on a grid; {N} is not a square",
                              "pass grid=(rows, columns), or set class_token correctly")
        grid = patches.transpose(1, 2).reshape(B, W, h, w)
        # windows do not overlap; where size does not divide the grid, the last row and column of windows are
        # narrower and average only the tokens they cover
        pooled = F.avg_pool2d(grid, self.size, ceil_mode=True)  # (B, W, ceil(h / size), ceil(w / size))
        return pooled.flatten(2).transpose(1, 2).contiguous(), None


@selectors.register("tome", description="ToMe bipartite soft matching merge down to a fraction",
                    tiny={"fraction": 0.5})
class TomeSelector(FractionSelector):
    """Token merging (ToMe, Bolya et al. 2023): bipartite soft matching, size-weighted averages.

    Each round splits tokens alternately into sets A and B, matches every A token to its most similar
    (cosine) B token, and merges the r best-matched A tokens into their partners; rounds repeat (each can
    at most halve the count) until ``ceil(fraction * N)`` tokens remain.
    """

    name = "tome"

    def select(self, patches):
        B, N, W = patches.shape
        target = _count(self.fraction, N)
        x = patches
        size = torch.ones(B, N, 1)
        while x.shape[1] > target:
            x, size = _bipartite_merge(x, size, x.shape[1] - target)
        return x, None


def _bipartite_merge(x: torch.Tensor, size: torch.Tensor, remove: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One ToMe round: x (B, T, W) with T >= 2, size (B, T, 1) token sizes -> min(remove, |A|) tokens fewer."""
    W = x.shape[2]
    a, b = x[:, ::2], x[:, 1::2]  # (B, Ta, W), (B, Tb, W)
    size_a, size_b = size[:, ::2], size[:, 1::2]
    r = min(remove, a.shape[1])
    scores = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)  # (B, Ta, Tb) cosine
    best_score, best_b = scores.max(-1)  # (B, Ta)
    order = best_score.argsort(-1, descending=True)  # (B, Ta)
    merged, kept = order[:, :r], order[:, r:].sort(-1).values  # A tokens to merge / to keep
    dst = torch.gather(best_b, 1, merged)  # (B, r) their partners in B
    src_x = torch.gather(a * size_a, 1, merged.unsqueeze(-1).expand(-1, -1, W))
    src_size = torch.gather(size_a, 1, merged.unsqueeze(-1))
    b_sum = (b * size_b).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, W), src_x)
    b_size = size_b.scatter_add(1, dst.unsqueeze(-1), src_size)
    keep_x = torch.gather(a, 1, kept.unsqueeze(-1).expand(-1, -1, W))
    keep_size = torch.gather(size_a, 1, kept.unsqueeze(-1))
    return torch.cat([keep_x, b_sum / b_size], 1), torch.cat([keep_size, b_size], 1)


def build_selector(name: str, *, k: int | None = None, fraction: float | None = None, size: int | None = None,
                   **common) -> Selector:
    """Build a selector from the CLI-level knobs, passing each only to the selectors that take it."""
    kw = dict(common)
    if name == "kmeans" and k is not None:
        kw["k"] = k
    if name in ("random", "topk-norm", "tome") and fraction is not None:
        kw["fraction"] = fraction
    if name == "pool" and size is not None:
        kw["size"] = size
    if name != "kmeans":
        kw.pop("restore", None)
        kw.pop("iterations", None)
        kw.pop("restarts", None)
    return selectors.get(name, **kw)

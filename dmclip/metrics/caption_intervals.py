"""Caption scores per image, so that corpus BLEU and CIDEr get intervals over seeds and images.

BLEU is a corpus statistic: pycocoevalcap sums, over the images, the clipped n-gram matches, the n-grams
guessed, the candidate's length and its closest reference length, and only then takes the geometric mean
and the brevity penalty. ``caption_items`` keeps those sums' terms per image (and CIDEr-D per image, whose
mean is the corpus CIDEr), so a bootstrap can redraw images and seeds and recompute the corpus scores
exactly as pycocoevalcap would on the redrawn corpus::

    items = caption_items(references, candidates)       # tokenized, as caption_metrics(tokenize=False)
    bleu(items["bleu"].sum(0), 4)                        # == pycocoevalcap's corpus BLEU-4
    caption_intervals({"none": ..., "kmeans k=8": ...}, baseline="none")

CIDEr's document frequencies come from all the references and stay fixed under redraws (the references
are the test set, not a sample being redrawn).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dmclip.errors import DmclipError

ORDER = 4  # BLEU-1..4
# columns of the per-image BLEU statistics: matches per order, guesses per order, candidate length,
# closest reference length
BLEU_COLUMNS = 2 * ORDER + 2
# pycocoevalcap's guards: a zero count gives a score near 0, never a division by zero
_TINY, _SMALL = 1e-15, 1e-9


def caption_items(references: Mapping[object, Sequence[str]], candidates: Mapping[object, str]) -> dict[str, np.ndarray]:
    """Per-image statistics, in the order of ``references``' keys, of PTB-tokenized captions.

    Returns ``{"bleu": (images, 10) float64, "cider": (images,) float64}``.
    """
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test
    from pycocoevalcap.cider.cider import Cider

    missing = [k for k in references if k not in candidates]
    if missing:
        raise DmclipError(f"{len(missing)} images have references but no candidate caption (e.g. {missing[0]!r})",
                          "caption every image of the test split")
    stats = np.zeros((len(references), BLEU_COLUMNS))
    for row, (key, refs) in enumerate(references.items()):
        comps = cook_test(candidates[key], cook_refs(list(refs), n=ORDER), n=ORDER)
        test_length = comps["testlen"]
        stats[row, :ORDER] = comps["correct"]
        stats[row, ORDER:2 * ORDER] = comps["guess"]
        stats[row, -2] = test_length
        stats[row, -1] = min((abs(length - test_length), length) for length in comps["reflen"])[1]
    _, cider = Cider().compute_score({k: list(r) for k, r in references.items()},
                                     {k: [candidates[k]] for k in references})
    return {"bleu": stats, "cider": np.asarray(cider, np.float64)}


def bleu(stats: np.ndarray, order: int = ORDER) -> np.ndarray:
    """Corpus BLEU-``order`` from statistics summed over images: (..., 10) -> (...)."""
    correct, guess = stats[..., :order], stats[..., ORDER:ORDER + order]
    precision = np.prod((correct + _TINY) / (guess + _SMALL), axis=-1) ** (1.0 / order)
    ratio = (stats[..., -2] + _TINY) / (stats[..., -1] + _SMALL)
    with np.errstate(divide="ignore", over="ignore"):
        brevity = np.where(ratio < 1, np.exp(1 - 1 / np.maximum(ratio, _TINY)), 1.0)
    return precision * brevity


def _stack(point: str, items: Mapping[str, np.ndarray], seeds: int, images: int) -> tuple[np.ndarray, np.ndarray]:
    """A point's (seeds, images, 10) BLEU statistics and (seeds, images) CIDEr; one row stands for every seed
    (a selector that draws no random numbers gives the same captions at every seed)."""
    stats, cider = np.asarray(items["bleu"], np.float64), np.asarray(items["cider"], np.float64)
    if stats.ndim == 2:
        stats, cider = stats[None], cider[None]
    if stats.shape[1:] != (images, BLEU_COLUMNS) or cider.shape != stats.shape[:2]:
        raise DmclipError(f"point {point!r}: per-image statistics of shape {stats.shape} / {cider.shape}, expected "
                          f"({seeds}, {images}, {BLEU_COLUMNS}) / ({seeds}, {images})",
                          "score every point on the same test images")
    if stats.shape[0] == 1:
        return np.repeat(stats, seeds, 0), np.repeat(cider, seeds, 0)
    if stats.shape[0] != seeds:
        raise DmclipError(f"point {point!r} was scored at {stats.shape[0]} seeds, another at {seeds}",
                          "score the seeded selectors at every seed of the sweep")
    return stats, cider


def caption_intervals(points: Mapping[str, Mapping[str, np.ndarray]], baseline: str,
                      pairs: Sequence[tuple[str, str]] = (), *, replicates: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """BLEU-4 and CIDEr of every point, absolute and as a fraction of ``baseline``'s, with bootstrap intervals.

    ``points[name]``: ``caption_items`` output, stacked over seeds (``(seeds, images, 10)`` and
    ``(seeds, images)``; a point without a seed axis is the same at every seed). Each replicate redraws the
    seeds and the images with replacement, the same draw for every point, so ``pairs`` ``(a, b)`` get a
    paired interval of b's ratio minus a's. The value of a point pools all its seeds' captions into one corpus.
    Returns ``{"points": {name: {metric: {"value", "low", "high"}}}, "pairs": {"b - a": {metric: {"diff",
    "low", "high", "significant"}}}, "seeds", "images", "confidence"}`` with metrics bleu4, cider,
    bleu4_ratio, cider_ratio.
    """
    if baseline not in points:
        raise DmclipError(f"baseline point {baseline!r} was not scored", "include the uncompressed point ('none')")
    unknown = sorted({name for pair in pairs for name in pair} - set(points))
    if unknown:
        raise DmclipError(f"pairs name points that were not scored: {unknown}", f"pair among {sorted(points)}")
    images = np.shape(points[baseline]["bleu"])[-2]
    seeds = max(np.shape(p["bleu"])[0] if np.ndim(p["bleu"]) == 3 else 1 for p in points.values())
    if images == 0:
        raise DmclipError("no images were scored", "caption at least one test image")
    stacked = {name: _stack(name, items, seeds, images) for name, items in points.items()}
    rng = np.random.default_rng(seed)
    seed_weights = np.stack([np.bincount(rng.integers(0, seeds, seeds), minlength=seeds) for _ in range(replicates)])
    image_weights = rng.multinomial(images, np.full(images, 1.0 / images), size=replicates)
    observed_weights = (np.ones((1, seeds)), np.ones((1, images)))

    def scores(name: str, weights: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        stats, cider = stacked[name]
        by_seed, by_image = weights
        pooled = np.einsum("rs,rsc->rc", by_seed, np.einsum("ri,sic->rsc", by_image, stats, optimize=True))
        total = by_seed.sum(1) * by_image.sum(1)
        return {"bleu4": bleu(pooled), "cider": np.einsum("rs,rs->r", by_seed, by_image @ cider.T) / total}

    observed = {name: scores(name, observed_weights) for name in stacked}
    drawn = {name: scores(name, (seed_weights, image_weights)) for name in stacked}
    for table in (observed, drawn):
        for values in table.values():
            for metric in ("bleu4", "cider"):
                with np.errstate(divide="ignore", invalid="ignore"):  # a baseline scoring 0 has no ratios: NaN
                    values[f"{metric}_ratio"] = values[metric] / table[baseline][metric]
    tail = 100 * (1 - confidence) / 2

    def interval(draws: np.ndarray) -> tuple[float, float]:
        if np.isnan(draws).all():
            return float("nan"), float("nan")
        low, high = np.nanpercentile(draws, [tail, 100 - tail])
        return float(low), float(high)

    out: dict = {"points": {}, "pairs": {}, "seeds": seeds, "images": images, "confidence": confidence}
    for name in stacked:
        out["points"][name] = {metric: dict(zip(("value", "low", "high"), (float(observed[name][metric][0]),
                                                                          *interval(drawn[name][metric]))))
                               for metric in observed[name]}
    for a, b in pairs:
        entry = {}
        for metric in ("bleu4_ratio", "cider_ratio"):
            low, high = interval(drawn[b][metric] - drawn[a][metric])
            entry[metric] = {"diff": float(observed[b][metric][0] - observed[a][metric][0]), "low": low,
                             "high": high, "significant": bool(low > 0 or high < 0)}
        out["pairs"][f"{b} - {a}"] = entry
    return out

"""One selector measured on a test split: the edge encodes, the selector compresses, every image's payload
crosses the wire codec (so the bytes are counted, not estimated), the server restores and captions, and the
captions are scored against the references; quality is also given as a fraction of the uncompressed baseline."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from dmclip.compress.codec import decode, encode, payload_stats
from dmclip.compress.config import QUALITY_KEYS, CompressConfig, DecodeConfig
from dmclip.compress.model import caption_tokens
from dmclip.compress.selectors import Selector, restore_payload
from dmclip.data.base import float_images
from dmclip.errors import DmclipError


def score_captions(references: dict, candidates: dict, tokenize: bool = True) -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr as pycocoevalcap computes them (METEOR skipped: a JVM per call), and under
    ``"items"`` the per-image statistics that give them intervals (:mod:`dmclip.metrics.caption_intervals`)."""
    from dmclip.metrics.caption import caption_metrics, ptb_tokenize
    from dmclip.metrics.caption_intervals import caption_items

    references = {k: [r for r in refs if r and r.strip()] for k, refs in references.items()}
    candidates = {k: candidates.get(k) or "" for k in references}
    if tokenize:  # one tokenizer run (a JVM start) for both sides
        both = ptb_tokenize({**{("ref", k): refs for k, refs in references.items()},
                             **{("cand", k): [c] for k, c in candidates.items()}})
        references = {k: both[("ref", k)] for k in references}
        candidates = {k: both[("cand", k)][0] for k in candidates}
    scores = caption_metrics(references, candidates, tokenize=False, meteor=False)
    return {**{k: v for k, v in scores.items() if k != "meteor"}, "items": caption_items(references, candidates)}


def load_test_samples(cfg: CompressConfig, image_size: int, dataset=None) -> tuple[list[torch.Tensor], list[list[str]]]:
    """(images uint8 (3, S, S), reference captions) for the first ``limit`` images of the test split."""
    if dataset is None:
        from dmclip.data import build_dataset

        dataset = build_dataset(cfg.dataset, image_size=image_size)
    count = len(dataset) if cfg.limit == 0 else min(cfg.limit, len(dataset))
    if count == 0:
        raise DmclipError(f"{cfg.dataset} holds no images", "choose another --dataset")
    samples = [dataset[i] for i in range(count)]
    return [s["image"] for s in samples], [list(s["captions"]) for s in samples]


@torch.no_grad()
def edge_tokens(model, images: list[torch.Tensor], batch_size: int) -> tuple[torch.Tensor, float]:
    """Run the edge encoder over images -> tokens (n, T, W) and mean encoder seconds per image."""
    chunks, seconds = [], 0.0
    for start in range(0, len(images), batch_size):
        batch = float_images(torch.stack(images[start:start + batch_size]))
        t0 = time.perf_counter()
        chunks.append(model.encode_image_tokens(batch).float())
        seconds += time.perf_counter() - t0
    return torch.cat(chunks), seconds / len(images)


@torch.no_grad()
def evaluate_selector(model, tokens: torch.Tensor, references: list[list[str]], selector: Selector,
                      decode_cfg: DecodeConfig, batch_size: int, encoder_seconds: float = 0.0,
                      score_fn: Callable[[dict, dict], dict] = score_captions) -> dict:
    """Compress, send through the codec image by image, restore, caption, score. One result row."""
    captions, sizes, stats_rows = [], [], []
    edge, server = 0.0, 0.0
    restored_tokens = None
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size]
        t0 = time.perf_counter()
        payload = selector.compress(batch)
        frames = [encode(p) for p in payload.split()]
        edge += time.perf_counter() - t0
        stats_rows.append((payload_stats(payload), batch.shape[0]))
        sizes += [len(f) for f in frames]
        t0 = time.perf_counter()
        restored = torch.cat([restore_payload(decode(f)) for f in frames])
        captions += caption_tokens(model, restored, decode_cfg)
        server += time.perf_counter() - t0
        restored_tokens = restored.shape[1]
    n = tokens.shape[0]
    refs = {i: r for i, r in enumerate(references)}
    cands = {i: c for i, c in enumerate(captions)}
    scores = score_fn(refs, cands)
    items = scores.pop("items", None)

    def mean(key):
        return sum(s[key] * count for s, count in stats_rows) / n

    return {
        "selector": selector.name, "label": selector.describe(), "setting": _setting(selector),
        **scores,
        "communication_efficiency": mean("communication_efficiency"),
        "vectors_sent": mean("vectors_sent"), "tokens": mean("tokens"), "restored_tokens": restored_tokens,
        "bytes_per_image": sum(sizes) / n,
        "bytes_per_image_without_indices": mean("bytes_per_image_without_indices"),
        "index_bytes_per_image": mean("index_bytes_per_image"),
        "edge_ms": 1000 * (encoder_seconds + edge / n), "encoder_ms": 1000 * encoder_seconds,
        "server_ms": 1000 * server / n, "images": n, "examples": [
            {"caption": captions[i], "references": references[i][:2]} for i in range(min(3, n))],
        **({"items": items} if items is not None else {}),
    }


def _setting(selector: Selector) -> float | None:
    for attr in ("k", "fraction", "size"):
        if hasattr(selector, attr):
            return getattr(selector, attr)
    return None


def add_ratios(row: dict, baseline: dict) -> dict:
    """Quality as a fraction of the uncompressed baseline (the paper's 'keeps 80 % of BLEU')."""
    for key in QUALITY_KEYS:
        base = baseline.get(key)
        row[f"{key}_ratio"] = row[key] / base if base else None
    return row

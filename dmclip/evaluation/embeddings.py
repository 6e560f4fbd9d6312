"""Image and text embeddings in batches, cached per (model weights, dataset or texts) so a suite encodes
each split once."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.device import model_device
from dmclip.evaluation.loading import dataset_name, model_fingerprint
from dmclip.progress import progress_bar


class EmbeddingCache:
    """Normalised embeddings by key (model fingerprint + dataset or texts); in memory, optionally on disk."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def get(self, key: str) -> torch.Tensor | None:
        value = self._memory.get(key)
        if value is None and self.directory is not None and (self.directory / f"{key}.pt").is_file():
            value = torch.load(self.directory / f"{key}.pt", weights_only=True)
            self._memory[key] = value
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> torch.Tensor:
        self._memory[key] = value
        if self.directory is not None:
            from dmclip.io import atomic_torch_save

            atomic_torch_save(value, self.directory / f"{key}.pt")
        return value


def image_batch(dataset, indices: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """uint8 (B, 3, S, S) images and the sample indices actually returned (a bad image is replaced)."""
    fast = getattr(dataset, "images", None)
    if callable(fast):
        return fast(list(indices)), list(indices)
    samples = [dataset[i] for i in indices]
    return torch.stack([s["image"] for s in samples]), [int(s.get("index", i)) for s, i in zip(samples, indices)]


def as_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> the float input every encoder takes, on ``device``."""
    from dmclip.data import float_images

    return float_images(images.to(device))


@torch.inference_mode()
def encode_images(model: nn.Module, dataset, *, batch_size: int = 64, cache: EmbeddingCache | None = None,
                  fingerprint: str | None = None, progress: bool = False,
                  name: str | None = None) -> tuple[torch.Tensor, list[int]]:
    """Normalised image embeddings (N, D) of every sample (float32, CPU) and the sample indices used.

    ``name`` (the dataset spec, options included) is the dataset part of the cache key.
    """
    key = None
    name = name or dataset_name(dataset)
    if cache is not None:
        fingerprint = fingerprint or model_fingerprint(model)
        key = cache.key("image", fingerprint, name, len(dataset), getattr(dataset, "image_size", None))
        hit = cache.get(key)
        if hit is not None:
            return hit["features"], hit["indices"].tolist()
    device = model_device(model)
    features, used = [], []
    with progress_bar(progress, f"encoding images of {name}", len(dataset)) as advance:
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            images, returned = image_batch(dataset, indices)
            features.append(F.normalize(model.encode_image(as_float(images, device)).float(), dim=-1).cpu())
            used.extend(returned)
            advance(len(indices))
    out = torch.cat(features) if features else torch.zeros(0, 0)
    if cache is not None:
        cache.put(key, {"features": out, "indices": torch.tensor(used, dtype=torch.long)})
    return out, used


@torch.inference_mode()
def encode_texts(model: nn.Module, texts: Sequence[str], *, batch_size: int = 256,
                 cache: EmbeddingCache | None = None, fingerprint: str | None = None, progress: bool = False,
                 description: str = "encoding texts") -> torch.Tensor:
    """Normalised text embeddings (M, D), float32 on the CPU."""
    key = None
    if cache is not None:
        fingerprint = fingerprint or model_fingerprint(model)
        key = cache.key("text", fingerprint, hashlib.sha256("\n".join(texts).encode()).hexdigest(), len(texts))
        hit = cache.get(key)
        if hit is not None:
            return hit
    device = model_device(model)
    features = []
    with progress_bar(progress, description, len(texts)) as advance:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            tokens = model.tokenize(chunk).to(device)
            features.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
            advance(len(chunk))
    out = torch.cat(features) if features else torch.zeros(0, 0)
    return cache.put(key, out) if cache is not None else out

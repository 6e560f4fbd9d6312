"""Reinforced stores (DataCompDR-style): teacher embeddings computed once, read by `distill` many times.

For every image of a dataset the store keeps the teacher's image embeddings under K augmentations
(augmentation 0 is the identity; the crop boxes are stored so the student sees the exact same view) and
the teacher's text embeddings of every caption. `dmclip distill --teacher store:<store>` then
trains without running the teacher's image tower.

    <store>/meta.json                      format, teacher, data spec, K, sizes, shard list
    <store>/shard-00000.safetensors        image_embeddings (n, K, D) fp16, boxes (n, K, 4) fp32,
                                           text_embeddings (n, C, D) fp16, indices (n,) int64

Shards are written atomically and skipped when present, so an interrupted cache run continues.
Captions are stored per image up to ``captions_per_image``; shorter lists repeat their last caption.
The writer, which runs the teacher, is ``dmclip.distill.reinforce.build_store`` (behind `dmclip reinforce`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dmclip.errors import DmclipError

log = logging.getLogger(__name__)
STORE_FORMAT = "dmclip-reinforced"


def crop_boxes(count: int, augmentations: int, seed: int, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """(count, K, 4) crop boxes (x0, y0, x1, y1) as fractions of the image; box 0 is the whole image.

    Random-resized-crop boxes without flips: the world's captions say 'left' and 'right', a flip would
    make them wrong.
    """
    g = torch.Generator().manual_seed(seed)
    area = torch.empty(count, augmentations).uniform_(*scale, generator=g)
    log_ratio = torch.empty(count, augmentations).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)
    h = (area / aspect).sqrt().clamp(max=1.0)
    x0 = torch.rand(count, augmentations, generator=g) * (1 - w)
    y0 = torch.rand(count, augmentations, generator=g) * (1 - h)
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)
    boxes[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    return boxes


def apply_boxes(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crop each image (B, 3, S, S) to its box (B, 4) in fractions and resize back to S (bilinear)."""
    from torchvision.ops import roi_align

    B, _, S, _ = images.shape
    rois = torch.cat([torch.arange(B, dtype=images.dtype).unsqueeze(1), boxes.to(images.dtype) * S], dim=1)
    return roi_align(images, rois, output_size=(S, S), spatial_scale=1.0, sampling_ratio=1, aligned=True)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


class ReinforcedStore:
    """Reads a store into memory: teacher features by (image index, augmentation, caption)."""

    def __init__(self, path: str | Path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DmclipError(f"{self.path} is not a reinforced store (no meta.json)",
                              "write one with `dmclip reinforce --teacher T --data D --out DIR`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != STORE_FORMAT:
            raise DmclipError(f"{meta_path} is not a dmclip reinforced store", "point at a `dmclip reinforce` output")
        parts = {"image_embeddings": [], "text_embeddings": [], "boxes": []}
        for name in self.meta["shards"]:
            try:
                tensors = load_file(str(self.path / name))
            except (SafetensorError, OSError, FileNotFoundError) as exc:
                raise DmclipError(f"store shard {self.path / name} cannot be read ({str(exc)[:100]})",
                                  "rerun `dmclip reinforce` with the same --out to rewrite missing shards") from None
            for key in parts:
                parts[key].append(tensors[key])
        self.image_embeddings = torch.cat(parts["image_embeddings"])  # (n, K, D) fp16
        self.text_embeddings = torch.cat(parts["text_embeddings"])  # (n, C, D) fp16
        self.boxes = torch.cat(parts["boxes"])  # (n, K, 4)
        if self.image_embeddings.shape[0] != self.meta["count"]:
            raise DmclipError(f"{self.path} is incomplete ({self.image_embeddings.shape[0]} of {self.meta['count']} "
                              "images)", "rerun `dmclip reinforce` with the same --out to finish it")
        self.augmentations = self.meta["augmentations"]
        self.logit_scale = float(self.meta["teacher_logit_scale"])

    def choose(self, seed: int, step: int, index: int) -> tuple[int, int]:
        """(augmentation, caption) for this image at this step, deterministic (resumable)."""
        digest = hashlib.blake2b(f"{seed}:{step}:{index}:reinforced".encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        return value % self.augmentations, (value // self.augmentations) % self.text_embeddings.shape[1]

    def features(self, indices: list[int], augmentations: list[int], captions: list[int]) -> dict:
        idx = torch.tensor(indices)
        return {"image_features": _normalize(self.image_embeddings[idx, torch.tensor(augmentations)]),
                "text_features": _normalize(self.text_embeddings[idx, torch.tensor(captions)]),
                "logit_scale": torch.tensor(self.logit_scale)}

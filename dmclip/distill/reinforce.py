"""`dmclip reinforce`: run a teacher once over a dataset and write its outputs as a reinforced store
(:mod:`dmclip.data.reinforced` describes the format and reads it back)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dmclip.data import build_dataset
from dmclip.data.reinforced import STORE_FORMAT, apply_boxes, crop_boxes
from dmclip.errors import DmclipError
from dmclip.io import atomic_write_bytes, atomic_write_json
from dmclip.models.teachers import load_teacher

log = logging.getLogger(__name__)


def build_store(teacher_ref: str, data_spec: str, out: Path, *, augmentations: int = 4, captions_per_image: int = 5,
                batch_size: int = 256, shard_size: int = 4096, seed: int = 0, progress: bool = True) -> dict:
    """Write (or continue) a reinforced store; returns its meta."""
    from safetensors.torch import save as st_save

    out = Path(out)
    teacher = load_teacher(teacher_ref)
    if getattr(teacher, "distill_only", None):
        raise DmclipError(f"{teacher_ref!r} is {teacher.distill_only}; a reinforced store caches one teacher model",
                          "cache the model itself: run:<dir>, builtin:<name> or open_clip:<arch>:<weights>")
    dataset = build_dataset(data_spec, image_size=teacher.image_size)
    if getattr(dataset, "kind", "image-text") != "image-text":
        raise DmclipError(f"{data_spec} has no captions", "cache an image-text set, e.g. world-train")
    n = len(dataset)
    meta = {"format": STORE_FORMAT, "version": 1, "teacher": teacher_ref, "data": data_spec,
            "image_size": teacher.image_size, "augmentations": augmentations, "captions_per_image": captions_per_image,
            "embed_dim": teacher.embed_dim, "teacher_logit_scale": float(teacher.logit_scale.detach().exp().clamp(max=100)),
            "count": n, "seed": seed, "shard_size": shard_size, "shards": []}
    if (out / "meta.json").exists():
        old = json.loads((out / "meta.json").read_text())
        keys = ("teacher", "data", "augmentations", "captions_per_image", "seed", "shard_size", "image_size")
        if any(old.get(k) != meta[k] for k in keys):
            raise DmclipError(f"{out} holds a store made with other settings",
                              "choose a new --out, or repeat the same teacher/data/augmentations to continue it")
    out.mkdir(parents=True, exist_ok=True)
    boxes_all = crop_boxes(n, augmentations, seed)
    shards = []
    for shard, start in enumerate(range(0, n, shard_size)):
        name = f"shard-{shard:05d}.safetensors"
        shards.append(name)
        if (out / name).exists():
            continue
        stop = min(n, start + shard_size)
        image_emb, text_emb = [], []
        for b in range(start, stop, batch_size):
            idx = list(range(b, min(stop, b + batch_size)))
            samples = [dataset[i] for i in idx]
            images = torch.stack([s["image"] for s in samples]).float() / 255.0
            with torch.no_grad():
                views = [teacher.encode_image(apply_boxes(images, boxes_all[idx, k])) for k in range(augmentations)]
                image_emb.append(torch.stack(views, dim=1).half())  # (b, K, D)
                captions = []
                for s in samples:
                    caps = list(s["captions"])[:captions_per_image]
                    captions += caps + [caps[-1]] * (captions_per_image - len(caps))
                texts = teacher.encode_text(teacher.tokenize(captions))
                text_emb.append(texts.view(len(idx), captions_per_image, -1).half())
        tensors = {"image_embeddings": torch.cat(image_emb), "text_embeddings": torch.cat(text_emb),
                   "boxes": boxes_all[start:stop].contiguous(), "indices": torch.arange(start, stop)}
        atomic_write_bytes(out / name, st_save(tensors))
        log.info("reinforced store: wrote %s (%d/%d images)", name, stop, n)
    meta["shards"] = shards
    atomic_write_json(out / "meta.json", meta)
    return meta

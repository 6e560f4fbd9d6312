"""The registered splits and what each one is: its scenes (and class labels), its captions, its noise stream.

Every split is a pure function of (generator version, split, size, seed, options) and, for pixels, the image
size: scenes, labels and captions come from one PCG64 stream per (split, seed), the pixels' noise from
another (see :mod:`dmclip.data.world.render`).
"""

from __future__ import annotations

import zlib

import numpy as np

from dmclip.data.world.captions import write_captions
from dmclip.data.world.noise import corrupt_captions
from dmclip.data.world.render import chunk_layout, render
from dmclip.data.world.scenes import GENERATOR_VERSION, sample_scenes
from dmclip.data.world.shapes import CLASSNAMES, COLOURS, SHAPES


class WorldSplit:
    """One registered split: its scene mode, caption style and defaults."""

    def __init__(self, name: str, mode: str, kind: str, default_size: int, description: str, *,
                 style: str = "a", captions: int = 5, noise: float = 0.0):
        self.name, self.mode, self.kind, self.default_size = name, mode, kind, default_size
        self.description, self.style, self.captions, self.noise = description, style, captions, noise
        self.stream = zlib.crc32(name.encode())  # a fixed, platform-independent number per split

    def options(self) -> dict:
        base = {"size": self.default_size, "cache": True, "max_skip_fraction": 0.01}
        if self.kind == "image-text":
            base["captions"] = self.captions
        if self.name == "world-noisy":
            base["noise"] = self.noise
        return base


SPLITS = {s.name: s for s in [
    WorldSplit("world-train", "scene", "image-text", 20000,
               "training scenes: 1-3 shapes, 5 captions each (style a)"),
    WorldSplit("world-train-clean", "scene", "image-text", 2000,
               "a small clean training set (other images than world-train), e.g. for CapFilt fine-tuning"),
    WorldSplit("world-zeroshot", "single", "classification", 2000,
               "zero-shot classification: one large shape, 100 classes = colour x shape"),
    WorldSplit("world-shift", "shift", "classification", 2000,
               "the 100 zero-shot classes in other styles: outlines, textures, rotation, palettes, backgrounds"),
    WorldSplit("world-retrieval-a", "scene", "image-text", 1000,
               "retrieval test: 1k images x 5 captions in the training caption style"),
    WorldSplit("world-retrieval-b", "scene", "image-text", 1000,
               "retrieval test: 1k images x 5 captions in another caption style (full sentences)", style="b"),
    WorldSplit("world-noisy", "scene", "image-text", 10000,
               "web-like captions, a known fraction wrong (default 30 %), ground truth kept per caption",
               captions=1, noise=0.3),
]}


def split_scenes(split: str, size: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray | None,
                                                             np.random.Generator]:
    """The scenes of a split, its class labels (classification splits; else None) and its stream, positioned
    where the captions are drawn from."""
    info = SPLITS[split]
    rng = np.random.default_rng([GENERATOR_VERSION, info.stream, int(seed)])
    scenes = sample_scenes(rng, size, info.mode)
    labels = None
    if info.kind == "classification":  # balanced classes, shuffled
        labels = rng.permutation(np.arange(size) % len(CLASSNAMES))
        scenes["colour"][:, 0] = labels // len(SHAPES)
        scenes["shape"][:, 0] = labels % len(SHAPES)
        scenes["rgb"][:, 0] = (np.asarray(list(COLOURS.values()), dtype=np.float64)[labels // len(SHAPES)]
                               + rng.uniform(-12, 12, size=(size, 3)))
    return scenes, labels, rng


def split_text(split: str, scenes: dict[str, np.ndarray], rng: np.random.Generator, captions: int,
               noise: float = 0.0) -> dict:
    """An image-text split's captions: {"captions"} (world-noisy: the web captions, plus "clean_captions",
    "caption_is_noisy" and "noise_kind", the ground truth per caption)."""
    text, templates, uniforms = write_captions(scenes, rng, SPLITS[split].style, captions)
    if split != "world-noisy":
        return {"captions": text}
    web, wrong, kinds = corrupt_captions(scenes, text, templates, uniforms, rng, noise)
    return {"captions": web, "clean_captions": text, "caption_is_noisy": wrong.tolist(), "noise_kind": kinds}


def noise_seed(split: str, seed: int) -> list[int]:
    """The seed of the split's pixel-noise streams (one stream per chunk is drawn from it)."""
    return [GENERATOR_VERSION, SPLITS[split].stream, int(seed), 1]


def generate(split: str, *, size: int, image_size: int = 64, seed: int = 0, captions: int = 5,
             noise: float = 0.0) -> tuple[np.ndarray, dict]:
    """A whole split in memory, no cache -> (images (N, S, S, 3) uint8, meta with "captions" or "labels")."""
    scenes, labels, rng = split_scenes(split, size, seed)
    images = render(scenes, chunk_layout(scenes), np.arange(size), image_size, noise_seed(split, seed))
    meta: dict = {"split": split, "version": GENERATOR_VERSION, "size": size, "image_size": image_size,
                  "seed": int(seed)}
    if labels is not None:
        meta["labels"] = labels.tolist()
    else:
        meta.update(split_text(split, scenes, rng, captions, noise))
    return images, meta

"""The world's splits as datasets: ``build_world(split, **options)``, the factory every ``world-*`` name is
registered with. Scenes, labels and captions are made up front (captions cached); pixels on demand."""

from __future__ import annotations

import numpy as np

from dmclip.data.base import ArrayClassificationDataset, ArrayImageTextDataset
from dmclip.data.world.cache import ImageCache, cached_text, split_directory
from dmclip.data.world.images import WorldImages
from dmclip.data.world.scenes import GENERATOR_VERSION
from dmclip.data.world.shapes import BACKGROUNDS, CLASSNAMES, COLOUR_NAMES, SHAPES, ZEROSHOT_TEMPLATES
from dmclip.data.world.splits import SPLITS, noise_seed, split_scenes, split_text
from dmclip.errors import DmclipError, did_you_mean

_GROUND_TRUTH = ("caption_is_noisy", "clean_captions", "noise_kind")  # world-noisy's, per caption


class WorldImageText(ArrayImageTextDataset):
    """An image-text split of the world; ``scene(i)`` gives the objects behind sample ``i``."""

    def __init__(self, name: str, images: WorldImages, text: dict, meta: dict, max_skip_fraction: float):
        extras = {key: text[key] for key in _GROUND_TRUTH if key in text}
        super().__init__(name, images, text["captions"], extras, max_skip_fraction=max_skip_fraction)
        self.meta = meta

    def scene(self, i: int) -> dict:
        return describe_scene(self._images.scenes, self._index(i))


class WorldClassification(ArrayClassificationDataset):
    def __init__(self, name: str, images: WorldImages, labels: np.ndarray, meta: dict, max_skip_fraction: float):
        super().__init__(name, images, labels, CLASSNAMES, ZEROSHOT_TEMPLATES, max_skip_fraction=max_skip_fraction)
        self.meta = meta

    def scene(self, i: int) -> dict:
        return describe_scene(self._images.scenes, self._index(i))


def describe_scene(scenes: dict[str, np.ndarray], i: int) -> dict:
    """Image ``i``'s objects (shape, colour, size, grid cell, centre and radius as fractions of the side,
    rotation in radians, outline, texture), background and palette."""
    exact = ("row", "col", "outline", "texture")
    rounded = ("cx", "cy", "radius", "rotation")
    objects = [{"shape": SHAPES[scenes["shape"][i, j]], "colour": COLOUR_NAMES[scenes["colour"][i, j]],
                "size": "large" if scenes["big"][i, j] else "small",
                **{key: scenes[key][i, j].item() for key in exact},
                **{key: round(float(scenes[key][i, j]), 5) for key in rounded}}
               for j in range(int(scenes["n_obj"][i]))]
    return {"objects": objects, "count_scene": bool(scenes["count"][i]),
            "background": BACKGROUNDS[scenes["background"][i]],
            "palette": ("normal", "light", "dark")[scenes["palette"][i]]}


def build_world(split: str, *, image_size: int | None = None, seed: int | None = None, **options):
    """Build a world split with ``options`` (size=, captions=, noise=, cache=, max_skip_fraction=)."""
    info = SPLITS[split]
    allowed = info.options()
    for key in options:
        if key not in allowed:
            raise DmclipError(f"{split} has no option {key!r}",
                              did_you_mean(key, allowed) + f" ({split} takes: {', '.join(allowed)})")
    opts = {**allowed, **options}
    image_size = 64 if image_size is None else int(image_size)
    if not 16 <= image_size <= 512:
        raise DmclipError(f"image_size {image_size} is out of range for the world", "use 16-512 (32-224 is typical)")
    params = {"size": _int_option(split, "size", opts["size"], 1, 10_000_000), "seed": 0 if seed is None else int(seed)}
    if info.kind == "image-text":
        params["captions"] = _int_option(split, "captions", opts["captions"], 1, 10)
    if split == "world-noisy":
        params["noise"] = float(opts["noise"])
        if not 0.0 <= params["noise"] <= 1.0:
            raise DmclipError(f"{split}: noise={params['noise']} is out of range",
                              "use a fraction in [0, 1], e.g. noise=0.3")
    return _dataset(split, params, image_size, _bool_option(opts["cache"]), float(opts["max_skip_fraction"]))


def _dataset(split: str, params: dict, image_size: int, cache: bool, max_skip_fraction: float):
    size, seed = params["size"], params["seed"]
    scenes, labels, rng = split_scenes(split, size, seed)
    directory = split_directory(split, params)
    store = ImageCache(directory, (size, image_size, image_size, 3)) if cache else None
    images = WorldImages(scenes, image_size, noise_seed(split, seed), store)
    meta = {"split": split, "version": GENERATOR_VERSION, "size": size, "image_size": image_size, "seed": seed}
    if labels is not None:
        return WorldClassification(split, images, labels, meta, max_skip_fraction)

    def make_text() -> dict:
        return split_text(split, scenes, rng, params["captions"], params.get("noise", 0.0))

    text = cached_text(directory, make_text) if cache else make_text()
    return WorldImageText(split, images, text, meta, max_skip_fraction)


def _int_option(split: str, key: str, value, lo: int, hi: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise DmclipError(f"{split}: {key}={value!r} is not a whole number", f"write e.g. {key}=1000") from None
    if not lo <= number <= hi or (isinstance(value, float) and not value.is_integer()):
        raise DmclipError(f"{split}: {key}={value!r} is out of range", f"use {lo}..{hi}")
    return number


def _bool_option(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off")
    return bool(value)

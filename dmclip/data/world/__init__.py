"""The embedded world: a deterministic generator of shape scenes with captions (no download).

Scenes hold 1-3 objects: 10 shapes x 10 colours, small or large, placed on a grid (so positions and
relations such as "above" are true by construction), on plain, gradient, noisy or striped backgrounds.
Every split is a pure function of (generator version, split, size, image size, seed, options), the same
bytes on any machine. Scenes, class labels and captions are made when a split is built; pixels are
rendered on demand for the images read, so any image size costs only what is read.

    shapes    the vocabulary (shapes, colours, backgrounds, zero-shot classes) and each shape's outline
    scenes    scene parameters drawn from a split's stream
    render    pixels of any images of a split, byte-identical however they are batched
    captions  the caption grammar (two styles);  noise: world-noisy's wrong captions
    splits    the registered splits and ``generate`` (a whole split in memory)
    images    ``WorldImages``: a split's images as a lazily rendered array
    cache     captions and small splits' images on disk under ``$DMCLIP_CACHE/world``
    build     ``build_world``: the dataset every ``world-*`` name builds
"""

from __future__ import annotations

import functools

from dmclip.data.world.build import WorldClassification, WorldImageText, build_world
from dmclip.data.world.images import WorldImages
from dmclip.data.world.scenes import GENERATOR_VERSION
from dmclip.data.world.shapes import (
    BACKGROUNDS,
    CLASSNAMES,
    COLOUR_NAMES,
    COLOURS,
    SHAPES,
    ZEROSHOT_TEMPLATES,
)
from dmclip.data.world.splits import SPLITS, generate
from dmclip.registry import datasets

__all__ = ["BACKGROUNDS", "CLASSNAMES", "COLOURS", "COLOUR_NAMES", "GENERATOR_VERSION", "SHAPES", "SPLITS",
           "ZEROSHOT_TEMPLATES", "WorldClassification", "WorldImageText", "WorldImages", "build_world", "generate"]


def _register() -> None:
    for name, info in SPLITS.items():
        tiny = {"size": 24, "image_size": 32}
        factory = functools.partial(build_world, name)
        factory.kind = info.kind  # read by the eval suite without building the dataset
        datasets.add(name, factory, description=info.description, tiny=tiny)


_register()

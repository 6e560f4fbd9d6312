"""Datasets: the embedded world, real formats, and the one entry point ``build_dataset(spec)``.

Importing this package registers the built-in datasets (the world splits and fashion-mnist).
"""

from dmclip.data import fashion_mnist, world  # noqa: F401  (registers world-* and fashion-mnist)
from dmclip.data.base import (
    BadSample,
    ClassificationDataset,
    ImageTextDataset,
    collate,
    float_images,
    image_batch,
)
from dmclip.data.export import EXPORT_FORMATS, draw_grid, export
from dmclip.data.spec import FORMATS, build_dataset, parse_spec

__all__ = ["EXPORT_FORMATS", "FORMATS", "BadSample", "ClassificationDataset", "ImageTextDataset", "build_dataset",
           "collate", "draw_grid", "export", "float_images", "image_batch", "parse_spec"]

"""A split's images as a read-only (N, S, S, 3) uint8 array that renders what is read, when it is read.

``WorldImages`` is what the world's datasets index: ``images[i]``, ``images[a:b]`` and ``images[index_array]``
render only those images (one vectorised call per read), so any image size costs only the images read. A
split small enough to keep (:data:`~dmclip.data.world.cache.IMAGE_CACHE_BYTES`) is written whole to the cache
once this process has rendered ``len / 8`` of its images on demand (at least ``2 * CHUNK``; so drawing a few
never writes one, a training run does in its first epoch), and read from there, memory-mapped, from then on
(and from the start when another run left it). It pickles as its scenes, not its pixels, so DataLoader
workers render on their side.
"""

from __future__ import annotations

import logging

import numpy as np

from dmclip.data.world.cache import IMAGE_CACHE_BYTES, ImageCache
from dmclip.data.world.render import CHUNK, chunk_layout, render

log = logging.getLogger(__name__)


class WorldImages:
    """The images of one split at one size; ``rendered`` counts the images this object rendered."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, scenes: dict[str, np.ndarray], image_size: int, noise_seed: list[int],
                 cache: ImageCache | None = None):
        self.scenes, self.layout = scenes, chunk_layout(scenes)
        self.image_size, self.noise_seed = int(image_size), list(noise_seed)
        self.cache = cache if cache is not None and self.nbytes <= IMAGE_CACHE_BYTES else None
        self.rendered = 0
        self._stored = self.cache.open() if self.cache is not None else None
        self._write_after = max(2 * CHUNK, len(self) // 8)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.image_size, self.image_size, 3)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.scenes["n_obj"])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            if self._stored is not None:  # the training loop's read, item by item: a view of the file
                return self._stored[key]
            return self._read(self._checked(np.asarray([key])))[0]
        if isinstance(key, slice):
            return self._read(np.arange(len(self))[key])
        return self._read(self._checked(np.asarray(key)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self._read(np.arange(len(self)))
        return images if dtype is None else images.astype(dtype)

    def _checked(self, indices: np.ndarray) -> np.ndarray:
        if indices.dtype == bool:
            return np.nonzero(indices)[0]
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        return np.where(indices < 0, indices + len(self), indices).astype(np.int64)

    def _read(self, indices: np.ndarray) -> np.ndarray:
        if self._stored is None and self.cache is not None and self.rendered >= self._write_after:
            self._keep()
        if self._stored is not None:
            return self._stored[indices]
        self.rendered += indices.size
        return render(self.scenes, self.layout, indices.reshape(-1), self.image_size,
                      self.noise_seed).reshape(*indices.shape, *self.shape[1:])

    def _keep(self) -> None:
        """Open the cached split, or write it; a disk that refuses it is logged once and not asked again."""
        self._stored = self.cache.open()
        if self._stored is None:
            try:
                self._stored = self.cache.write(self._render_range, CHUNK)
            except OSError as exc:
                log.warning("could not cache %s (%s); rendering on demand", self.cache.path, exc)
                self.cache = None

    def _render_range(self, start: int, stop: int) -> np.ndarray:
        return render(self.scenes, self.layout, np.arange(start, stop), self.image_size, self.noise_seed)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stored": None}  # a worker opens the cached file itself

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.cache is not None:
            self._stored = self.cache.open()

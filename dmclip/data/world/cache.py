"""The world's disk cache, where it pays: ``$DMCLIP_CACHE/world`` (default ``~/.cache/dmclip/world``).

One directory per (generator version, split, size, seed, options)::

    world-train-20000-<hash>/captions.json      the captions (and world-noisy's ground truth): every image size
    world-train-20000-<hash>/images-32px.npy    the whole split at 32 px, only for splits of at most
                                                IMAGE_CACHE_BYTES, written once a reader has rendered enough
                                                of it on demand that rendering the rest pays

Every file is written to a temporary name and moved into place with one ``os.replace``, so an interrupted
write never leaves half a file; a damaged file is logged, removed and made again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dmclip.data.world.scenes import GENERATOR_VERSION
from dmclip.errors import DmclipError
from dmclip.io import atomic_write_text

log = logging.getLogger(__name__)

IMAGE_CACHE_BYTES = 256 * 2**20  # a split's images are kept on disk only up to this size (world-train: 64 px)


def cache_root() -> Path:
    return Path(os.environ.get("DMCLIP_CACHE") or "~/.cache/dmclip").expanduser() / "world"


def split_directory(split: str, params: dict) -> Path:
    """The cache directory of a split with ``params`` (size, seed, and its options; not the image size)."""
    blob = json.dumps({"version": GENERATOR_VERSION, "split": split, **params}, sort_keys=True).encode()
    return cache_root() / f"{split}-{params['size']}-{hashlib.sha256(blob).hexdigest()[:12]}"


def cached_text(directory: Path, make: Callable[[], dict]) -> dict:
    """A split's captions from ``directory``/captions.json, made (and cached) on a miss."""
    path = directory / "captions.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        pass
    except (OSError, ValueError) as exc:
        log.warning("could not read the world cache %s (%s); making the captions again", path, exc)
    text = make()
    try:
        atomic_write_text(path, json.dumps(text))
    except (OSError, DmclipError) as exc:  # a full or read-only disk: the captions are still good
        log.warning("could not cache the captions in %s (%s); using them from memory", path, exc)
    return text


class ImageCache:
    """The file that holds a split's images at one size, when the split is small enough to keep."""

    def __init__(self, directory: Path, shape: tuple[int, ...]):
        self.path = directory / f"images-{shape[1]}px.npy"
        self.shape = shape

    def open(self) -> np.memmap | None:
        """The cached images, memory-mapped, or None when there are none (a damaged file is removed)."""
        if not self.path.is_file():
            return None
        try:
            images = np.load(self.path, mmap_mode="r")
            if images.shape == self.shape and images.dtype == np.uint8:
                return images
            problem = f"shape {images.shape} {images.dtype}, expected {self.shape} uint8"
        except (OSError, ValueError) as exc:
            problem = str(exc)
        log.warning("world cache %s is damaged (%s); it will be made again", self.path, problem)
        with contextlib.suppress(OSError):
            self.path.unlink()
        return None

    def write(self, render_block: Callable[[int, int], np.ndarray], block: int) -> np.memmap | None:
        """Render the whole split into the cache, ``block`` images at a time, and open it; None when another
        process is writing it now (keep rendering on demand: the file appears when it is done). Raises
        ``OSError`` when the disk refuses it."""
        with _exclusive(self.path.with_name(self.path.name + ".lock")) as mine:
            if not mine:
                return None
            if not self.path.is_file():  # else another process finished it while we waited for the lock
                self._fill(render_block, block)
        return self.open()

    def _fill(self, render_block: Callable[[int, int], np.ndarray], block: int) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=self.shape)
            for start in range(0, self.shape[0], block):
                stop = min(self.shape[0], start + block)
                images[start:stop] = render_block(start, stop)
            images.flush()
            del images
            with open(tmp, "rb") as handle:  # on disk before its name is: a crash never leaves a file of zeros
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            log.info("cached %s", self.path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Yields True while this process holds ``lock`` (an advisory lock the OS drops if the process dies),
    False when another process holds it."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:  # a process that opens the old name after this finds the finished file under its own lock
            with contextlib.suppress(OSError):
                lock.unlink()
            fcntl.flock(handle, fcntl.LOCK_UN)

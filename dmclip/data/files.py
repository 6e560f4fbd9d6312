"""Datasets whose images are files or tar members, and the load-time checks every file format shares.

A loader (``captions``, ``imagefolder``, ``huggingface``, ``wds``) lists its samples as sources and returns
a ``FileImageTextDataset`` or ``FileClassificationDataset``: rows that are visibly bad at load time
(missing / zero-byte file, empty / non-UTF-8 caption) are dropped and counted; images that fail to
decode are replaced and counted when read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dmclip.data.base import (
    DEFAULT_IMAGE_SIZE,
    BadSample,
    ClassificationDataset,
    ImageTextDataset,
    SkipCounter,
    check_templates,
    decode_image,
)
from dmclip.errors import DmclipError, did_you_mean

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.",
                     "a cropped photo of a {}.", "a close-up photo of a {}."]

# Sources are plain tuples (picklable for DataLoader workers): ("file", path) or ("tar", path, offset, size);
# the Hugging Face datasets (``huggingface``) keep their table's rows there and read them their own way.


def read_source(source: tuple) -> bytes:
    try:
        if source[0] == "file":
            return Path(source[1]).read_bytes()
        _, path, offset, size = source
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) < size:
            raise BadSample("truncated-image", f"{path}: member at byte {offset} is cut short")
        return data
    except FileNotFoundError:
        raise BadSample("missing-file", str(source[1])) from None
    except OSError as exc:
        raise BadSample("unreadable-image", f"{source[1]}: {exc}") from None


def source_name(source: tuple) -> str:
    return str(source[1]) if source[0] == "file" else f"{source[1]}@{source[2]}"


class FileImageTextDataset(ImageTextDataset):
    """Images read from files or tar members, captions held in memory."""

    def __init__(self, name: str, sources: list[tuple], captions: list[list[str]], image_size: int | None,
                 skips: SkipCounter):
        super().__init__(name, image_size or DEFAULT_IMAGE_SIZE, skips=skips)
        self.sources = sources
        self._captions = captions

    def __len__(self) -> int:
        return len(self.sources)

    def load_image(self, i: int) -> np.ndarray:
        source = self.sources[i]
        return decode_image(read_source(source), self.image_size, source_name(source))

    def captions(self, i: int) -> list[str]:
        return self._captions[self._index(i)]


class FileClassificationDataset(ClassificationDataset):
    def __init__(self, name: str, sources: list[tuple], labels: list[int], classnames: list[str],
                 templates: list[str], image_size: int | None, skips: SkipCounter):
        super().__init__(name, image_size or DEFAULT_IMAGE_SIZE, skips=skips)
        self.sources = sources
        self._labels = labels
        self.classnames = list(classnames)
        self.templates = check_templates(templates, name)

    def __len__(self) -> int:
        return len(self.sources)

    def load_image(self, i: int) -> np.ndarray:
        source = self.sources[i]
        return decode_image(read_source(source), self.image_size, source_name(source))

    def label(self, i: int) -> int:
        return self._labels[i]

    def labels(self) -> list[int]:
        return list(self._labels)


# ------------------------------------------------------------------------------------- load-time checks


def check_options(fmt: str, options: dict, allowed: Sequence[str]) -> dict:
    """Refuse an option the format does not take, naming the closest one and the whole list."""
    for key in options:
        if key not in allowed:
            raise DmclipError(f"{fmt}: unknown option {key!r}", did_you_mean(key, allowed)
                              + f" ({fmt} takes: {', '.join(allowed)})")
    return options


def need_path(fmt: str, positional: list[str], what: str, example: str) -> Path:
    """The first positional part of a spec, which must be an existing path."""
    if not positional:
        raise DmclipError(f"{fmt}: no {what} given", f"write it after the format, e.g. {example}")
    path = Path(positional[0]).expanduser()
    if not path.exists():
        raise DmclipError(f"{fmt}: {what} {str(path)!r} does not exist",
                          f"check the path (relative paths start at {os.getcwd()}), e.g. {example}")
    return path


def usable_file(path: Path, skips: SkipCounter) -> bool:
    """Cheap checks at load: the file exists and is not empty."""
    try:
        size = path.stat().st_size
    except OSError:
        skips.add("missing-file", str(path))
        return False
    if size == 0:
        skips.add("empty-file", str(path))
        return False
    return True


def finish(ds, skips: SkipCounter):
    """Log what was dropped at load, fail past ``max_skip_fraction`` or when nothing is left."""
    if skips.skipped:
        log.info("%s: %d samples, %d rows dropped at load (%s)", ds.name, len(ds), skips.skipped,
                 ", ".join(f"{n} {r}" for r, n in sorted(skips.counts.items())))
    skips.check()
    if len(ds) == 0:
        raise DmclipError(f"{ds.name}: no usable samples", "check that the files hold images and captions")
    return ds

"""The two dataset kinds every command consumes, and the bad-input rules they share.

    ImageTextDataset:      ds[i] -> {"image": uint8 (3, S, S), "captions": [str, ...], "index": j, ...extras}
    ClassificationDataset: ds[i] -> {"image": uint8 (3, S, S), "label": int, "index": j}

Bad input. Problems that are cheap to see (a missing file, a zero-byte file, an empty or non-UTF-8
caption) are found when the dataset is built: those rows are dropped and counted. Problems that need
the image decoded (unreadable, truncated, degenerate shape) are found when ``ds[i]`` reads it: the
sample is replaced by the next good one (``"index"`` names the sample actually returned) and counted
once per index. Either way each reason is logged once, ``ds.skipped`` holds the counts, and once the
skips pass ``max_skip_fraction`` of the rows (default 1 %) a ``DmclipError`` names the counts.
``ds.validate()`` decodes every image up front when a run wants to know before it starts.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dmclip.errors import DmclipError

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 64
MIN_IMAGE_SIDE = 8  # smaller decoded images count as "wrong-shape"
MAX_ASPECT = 10.0  # so do slivers such as 1000 x 20
# Larger images count as "huge-image" and are never decoded (PIL's own bomb check starts at 89 M pixels, as a
# warning): 40 M pixels is a 7300 x 5500 photo, at most 160 MB decoded as RGBA.
MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_SKIP_FRACTION = 0.01


class BadSample(Exception):
    """One sample that cannot be used; ``reason`` is a short stable key such as 'unreadable-image'."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Counts skipped samples by reason, logs each reason once, fails past ``max_fraction`` of ``total``."""

    def __init__(self, name: str, max_fraction: float = DEFAULT_MAX_SKIP_FRACTION):
        if not 0.0 <= float(max_fraction) <= 1.0:
            raise DmclipError(f"max_skip_fraction = {max_fraction} is out of range", "use a fraction in [0, 1]")
        self.name = name
        self.max_fraction = float(max_fraction)
        self.counts: Counter[str] = Counter()
        self.total = 0  # rows seen in the source (good + bad)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, detail: str) -> None:
        if self.counts[reason] == 0:
            log.warning("%s: skipping samples with %s (first: %s); further ones are counted silently",
                        self.name, reason.replace("-", " "), detail or "-")
        self.counts[reason] += 1

    def check(self) -> None:
        """Raise once the skipped rows pass the allowed fraction of all rows."""
        if self.total and self.skipped > self.max_fraction * self.total:
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
            raise DmclipError(
                f"{self.name}: {self.skipped} of {self.total} samples are bad ({counts}), more than "
                f"max_skip_fraction={self.max_fraction:g}",
                "fix or remove those files, or allow more with the dataset option max_skip_fraction=<fraction> "
                "(e.g. 'csv:train.csv:max_skip_fraction=0.05', or --set data.max_skip_fraction=0.05)")


# ------------------------------------------------------------------------------------------ images


def to_square(image, size: int | None) -> np.ndarray:
    """A PIL image or (H, W[, C]) array -> (size, size, 3) uint8: resize the short side, centre crop.

    An image that is already ``size`` x ``size`` RGB is returned unchanged (exact pixels survive).
    """
    from PIL import Image

    size = int(size or DEFAULT_IMAGE_SIZE)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise BadSample("wrong-shape", f"array of shape {tuple(image.shape)}")
        if array.dtype != np.uint8:
            raise BadSample("wrong-shape", f"array of dtype {array.dtype}, expected uint8")
        image = Image.fromarray(array)
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE or max(width, height) > MAX_ASPECT * min(width, height):
        raise BadSample("wrong-shape", f"{width}x{height} pixels")
    if image.mode != "RGB":
        image = _to_rgb(image)
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image)  # an RGB image reads as uint8


def _to_rgb(image):
    """Any PIL mode -> RGB. 8-bit modes (L, LA, P, PA, 1, RGBA, CMYK, YCbCr, ...) convert as PIL does; 16/32-bit
    integer images (I;16*, I) are read as 16-bit (0..65535 -> 0..255) and float images (F) as 0..1, where a
    plain ``convert`` would clip them to white or black."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
        array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, size: int | None, what: str) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8, or ``BadSample`` naming why not."""
    from PIL import Image

    if not data:
        raise BadSample("empty-file", what)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header: refuse before decoding anything
            if width * height > MAX_IMAGE_PIXELS:
                raise BadSample("huge-image", f"{what}: {width}x{height} pixels, more than "
                                              f"{MAX_IMAGE_PIXELS // 1_000_000} M")
            image.load()
            return to_square(image, size)
    except BadSample:
        raise
    except Image.DecompressionBombError as exc:
        raise BadSample("huge-image", f"{what}: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = "truncated-image" if "truncated" in str(exc).lower() else "unreadable-image"
        raise BadSample(reason, f"{what}: {exc}") from None


def clean_caption(value) -> str:
    """A usable caption, or ``BadSample`` for empty / non-UTF-8 text."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample("non-utf8-caption", repr(value[:40])) from None
    if not isinstance(value, str):
        raise BadSample("empty-caption", f"caption is {type(value).__name__}")
    if any("\udc80" <= ch <= "\udcff" for ch in value):  # surrogateescape'd undecodable bytes
        raise BadSample("non-utf8-caption", repr(value[:40]))
    value = " ".join(value.split())
    if not value:
        raise BadSample("empty-caption", "")
    return value


def to_chw(image: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 array -> uint8 tensor (3, S, S) that owns its memory."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


def float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) -> float in [0, 1]; float images pass through as float32."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def image_batch(samples: Sequence[dict]) -> torch.Tensor:
    """Samples -> float tensor (B, 3, S, S) in [0, 1]."""
    return float_images(torch.stack([s["image"] for s in samples]))


def collate(samples: Sequence[dict]) -> dict:
    """A DataLoader ``collate_fn``: images stacked (uint8), labels/indices as tensors, other keys as lists."""
    batch: dict = {"image": torch.stack([s["image"] for s in samples])}
    for key in samples[0]:
        if key == "image":
            continue
        values = [s[key] for s in samples]
        batch[key] = torch.tensor(values) if key in ("label", "index") else values
    return batch


# ---------------------------------------------------------------------------------------- datasets


class _Base(Dataset):
    kind = ""

    def __init__(self, name: str, image_size: int, *, max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
                 skips: SkipCounter | None = None):
        self.name = name
        self.image_size = int(image_size)
        self.skips = skips or SkipCounter(name, max_skip_fraction)
        self._bad: set[int] = set()

    # subclasses implement these two
    def __len__(self) -> int:
        raise NotImplementedError

    def load_image(self, i: int) -> np.ndarray:
        """(S, S, 3) uint8; may raise ``BadSample``."""
        raise NotImplementedError

    def _fields(self, i: int) -> dict:
        raise NotImplementedError

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason (rows dropped at load + images that failed to decode)."""
        return dict(self.skips.counts)

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for {n} samples")
        return i % n

    def __getitem__(self, i: int) -> dict:
        i = self._index(int(i))
        n = len(self)
        for step in range(n):
            j = (i + step) % n
            if j in self._bad:
                continue
            try:
                image = self.load_image(j)
            except BadSample as exc:
                self._bad.add(j)
                self.skips.add(exc.reason, exc.detail)
                self.skips.check()
                continue
            return {"image": to_chw(image), **self._fields(j), "index": j}
        raise DmclipError(f"{self.name}: no sample can be read", "check the dataset files")

    def image(self, i: int) -> torch.Tensor:
        """The uint8 image (3, S, S) of sample ``i`` (no replacement: raises for a bad one)."""
        try:
            return to_chw(self.load_image(self._index(i)))
        except BadSample as exc:
            raise DmclipError(f"{self.name}: sample {i} is bad ({exc.reason}: {exc.detail})",
                              "use ds[i], which skips bad samples, or fix the file") from None

    def validate(self) -> dict[str, int]:
        """Decode every image now (slow for big sets): bad ones are counted; returns ``skipped``."""
        for j in range(len(self)):
            if j in self._bad:
                continue
            try:
                self.load_image(j)
            except BadSample as exc:
                self._bad.add(j)
                self.skips.add(exc.reason, exc.detail)
        self.skips.check()
        return self.skipped

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {len(self)} samples, {self.image_size} px>"


class ImageTextDataset(_Base):
    """Images with one or more captions each."""

    kind = "image-text"

    def captions(self, i: int) -> list[str]:
        """The captions of sample ``i`` without decoding its image."""
        raise NotImplementedError

    def extras(self, i: int) -> dict:
        """Extra per-sample keys (e.g. world-noisy's ground truth); none by default."""
        return {}

    def _fields(self, i: int) -> dict:
        return {"captions": list(self.captions(i)), **self.extras(i)}


class ClassificationDataset(_Base):
    """Images with one class label each, plus class names and CLIP-style prompt templates."""

    kind = "classification"
    classnames: list[str]
    templates: list[str]

    def label(self, i: int) -> int:
        raise NotImplementedError

    def labels(self) -> list[int]:
        """Every sample's label, without decoding images."""
        return [self.label(i) for i in range(len(self))]

    def _fields(self, i: int) -> dict:
        return {"label": int(self.label(i))}

    def prompts(self, label: int) -> list[str]:
        """The templates filled with one class name."""
        return [t.format(self.classnames[label]) for t in self.templates]


def check_templates(templates: Sequence[str], where: str) -> list[str]:
    """Templates with exactly one '{}' placeholder ('{c}' as CLIP_benchmark writes it is accepted)."""
    out = []
    for t in templates:
        t = t.strip().replace("{c}", "{}")
        if not t:
            continue
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise DmclipError(f"{where}: template {t!r} must contain exactly one '{{}}' placeholder",
                              "write templates like 'a photo of a {}.'")
        out.append(t)
    if not out:
        raise DmclipError(f"{where}: no templates", "write one template per line, e.g. 'a photo of a {}.'")
    return out


class _ImageArray:
    """Images held in ``self._images``: an (N, S, S, 3) uint8 array in memory, memory-mapped, or any object that
    indexes like one (``len``, ``shape``, ``[i]``, ``[index array]``; the world's render on demand)."""

    _images: np.ndarray

    def __len__(self) -> int:
        return len(self._images)

    def load_image(self, i: int) -> np.ndarray:
        return self._images[i]

    def images(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 (B, 3, S, S) for ``indices`` (all when None), in one read of the array."""
        array = self._images if indices is None else self._images[np.asarray(indices)]
        return torch.from_numpy(np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2)))

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """``[ds[i] for i in indices]`` with the images read in one call (a DataLoader reads batches so)."""
        positions = [self._index(int(i)) for i in indices]
        images = self._images[np.asarray(positions, dtype=np.int64)]
        return [{"image": to_chw(image), **self._fields(i), "index": i} for i, image in zip(positions, images)]

    def __getstate__(self):
        """A memory-mapped array pickles as its file name (DataLoader workers under spawn/forkserver would
        otherwise copy every image into each worker)."""
        state = dict(self.__dict__)
        images = state.get("_images")
        if isinstance(images, np.memmap) and images.filename:
            state["_images"] = ("memmap", str(images.filename))
        return state

    def __setstate__(self, state):
        images = state.get("_images")
        if isinstance(images, tuple) and images[0] == "memmap":
            state["_images"] = np.load(images[1], mmap_mode="r")
        self.__dict__.update(state)


class ArrayImageTextDataset(_ImageArray, ImageTextDataset):
    """Images held in an (N, S, S, 3) uint8 array (in memory, memory-mapped or rendered on demand) with their
    captions."""

    def __init__(self, name: str, images: np.ndarray, captions: list[list[str]],
                 extras: dict[str, list] | None = None, **kwargs):
        super().__init__(name, images.shape[1], **kwargs)
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
        self._images = images
        self._captions = captions
        self._extras = extras or {}
        self.skips.total = len(images)

    def captions(self, i: int) -> list[str]:
        return self._captions[self._index(i)]

    def extras(self, i: int) -> dict:
        return {key: values[i] for key, values in self._extras.items()}


class ArrayClassificationDataset(_ImageArray, ClassificationDataset):
    """Images in an (N, S, S, 3) uint8 array with integer labels."""

    def __init__(self, name: str, images: np.ndarray, labels: Sequence[int], classnames: list[str],
                 templates: list[str], **kwargs):
        super().__init__(name, images.shape[1], **kwargs)
        self._images = images
        self._labels = np.asarray(labels, dtype=np.int64)
        self.classnames = list(classnames)
        self.templates = check_templates(templates, name)
        self.skips.total = len(images)

    def label(self, i: int) -> int:
        return int(self._labels[i])

    def labels(self) -> list[int]:
        return self._labels.tolist()

"""Fashion-MNIST from Debian's dataset-fashion-mnist IDX files: a real-image zero-shot set (registered as
``fashion-mnist``)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from dmclip.data.base import DEFAULT_IMAGE_SIZE, ClassificationDataset, SkipCounter, to_square
from dmclip.data.files import check_options
from dmclip.errors import DmclipError

OPTIONS = ("split", "size", "max_skip_fraction")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot"]
FASHION_MNIST_TEMPLATES = ["a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
                           "a photo of the {}.", "a product photo of a {}.", "a grayscale photo of a {}."]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or not) -> uint8 array with its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DmclipError(f"{path} cannot be read ({exc})", "reinstall it: apt-get install --reinstall "
                          "dataset-fashion-mnist") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DmclipError(f"{path} is not a uint8 IDX file", "use the files of the dataset-fashion-mnist package")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DmclipError(f"{path} holds {body.size} values, its header says {dims}",
                          "the file is truncated: reinstall dataset-fashion-mnist")
    return body.reshape(dims)


def fashion_mnist_files(directory: str | Path, split: str) -> tuple[Path, Path] | None:
    prefix = {"test": "t10k", "train": "train"}[split]
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [Path(directory) / f"{prefix}-{kind}{ext}" for ext in (".gz", "")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


class FashionMNIST(ClassificationDataset):
    """28 x 28 grey images, resized to ``image_size`` (default 64) when read."""

    def __init__(self, name, images: np.ndarray, labels: np.ndarray, image_size, skips):
        super().__init__(name, image_size or DEFAULT_IMAGE_SIZE, skips=skips)
        self._images = images
        self._labels = labels.astype(np.int64)
        self.classnames = list(FASHION_MNIST_CLASSES)
        self.templates = list(FASHION_MNIST_TEMPLATES)

    def __len__(self) -> int:
        return len(self._images)

    def load_image(self, i: int) -> np.ndarray:
        return to_square(self._images[i], self.image_size)

    def label(self, i: int) -> int:
        return int(self._labels[i])

    def labels(self) -> list[int]:
        return self._labels.tolist()


def load_fashion_mnist(positional, *, image_size, spec: str, split: str = "test", size: int | None = None,
                       max_skip_fraction: float = 0.01):
    directory = Path(positional[0]).expanduser() if positional else Path(FASHION_MNIST_DIR)
    if split not in ("test", "train"):
        raise DmclipError(f"fashion-mnist: split={split!r} is not allowed", "use split=test or split=train")
    files = fashion_mnist_files(directory, split)
    if files is None:
        raise DmclipError(f"fashion-mnist: no {split} IDX files in {directory}",
                          "install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
                          "or give the folder holding *-images-idx3-ubyte[.gz]: fashion-mnist:DIR")
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DmclipError(f"fashion-mnist: {files[0]} has shape {images.shape} and labels {labels.shape}",
                          "expected (N, 28, 28) images and N labels")
    if size is not None:
        images, labels = images[: int(size)], labels[: int(size)]
    skips = SkipCounter(f"fashion-mnist:{split}", max_skip_fraction)
    skips.total = len(images)
    return FashionMNIST(f"fashion-mnist:{split}" if positional else "fashion-mnist", images, labels, image_size, skips)


def fashion_mnist_available() -> bool:
    return fashion_mnist_files(FASHION_MNIST_DIR, "test") is not None


def _fashion_mnist_factory(*, image_size: int | None = None, seed: int | None = None, **options):
    """Fashion-MNIST test set (10 classes) from Debian's dataset-fashion-mnist."""
    check_options("fashion-mnist", options, OPTIONS)
    return load_fashion_mnist([], image_size=image_size, spec="fashion-mnist", **options)

_fashion_mnist_factory.kind = "classification"  # read by the eval suite without building it
_fashion_mnist_factory.available = fashion_mnist_available


def _register() -> None:
    from dmclip.registry import datasets

    datasets.add("fashion-mnist", _fashion_mnist_factory,
                 description="Fashion-MNIST test set, 10 classes, real grey images (apt-get install "
                             "dataset-fashion-mnist)", tiny={"size": 20, "image_size": 32})


_register()

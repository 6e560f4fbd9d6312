"""Real dataset formats: CSV/TSV, COCO/Karpathy JSON, ImageFolder, Hugging Face, Fashion-MNIST (webdataset
shards live in ``dmclip.data.wds``).

Each loader returns a map-style ``ImageTextDataset`` or ``ClassificationDataset`` (see ``base``): rows
that are visibly bad at load time (missing / zero-byte file, empty / non-UTF-8 caption) are dropped and
counted; images that fail to decode are replaced and counted when read. ``export`` writes any dataset
in these formats, so that the loaders can be tested on files the world itself produced.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
import struct
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
    clean_caption,
    decode_image,
    to_square,
)
from dmclip.errors import DmclipError, did_you_mean

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.",
                     "a cropped photo of a {}.", "a close-up photo of a {}."]
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot"]
FASHION_MNIST_TEMPLATES = ["a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
                           "a photo of the {}.", "a product photo of a {}.", "a grayscale photo of a {}."]

# Sources are plain tuples (picklable for DataLoader workers): ("file", path) or ("tar", path, offset, size).


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


def _name(source: tuple) -> str:
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
        return decode_image(read_source(source), self.image_size, _name(source))

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
        return decode_image(read_source(source), self.image_size, _name(source))

    def label(self, i: int) -> int:
        return self._labels[i]

    def labels(self) -> list[int]:
        return list(self._labels)


# ------------------------------------------------------------------------------------------ helpers


def _options(fmt: str, options: dict, allowed: Sequence[str]) -> dict:
    for key in options:
        if key not in allowed:
            raise DmclipError(f"{fmt}: unknown option {key!r}", did_you_mean(key, allowed)
                              + f" ({fmt} takes: {', '.join(allowed)})")
    return options


def _need_path(fmt: str, positional: list[str], what: str, example: str) -> Path:
    if not positional:
        raise DmclipError(f"{fmt}: no {what} given", f"write it after the format, e.g. {example}")
    path = Path(positional[0]).expanduser()
    if not path.exists():
        raise DmclipError(f"{fmt}: {what} {str(path)!r} does not exist",
                          f"check the path (relative paths start at {os.getcwd()}), e.g. {example}")
    return path


def _file_row(path: Path, skips: SkipCounter) -> bool:
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


def _finish(ds, skips: SkipCounter):
    if skips.skipped:
        log.info("%s: %d samples, %d rows dropped at load (%s)", ds.name, len(ds), skips.skipped,
                 ", ".join(f"{n} {r}" for r, n in sorted(skips.counts.items())))
    skips.check()
    if len(ds) == 0:
        raise DmclipError(f"{ds.name}: no usable samples", "check that the files hold images and captions")
    return ds


# -------------------------------------------------------------------------------------------- CSV


def load_csv(positional, *, image_size, sep: str, spec: str, img_key: str | None = None,
             caption_key: str | None = None, root: str | None = None, max_skip_fraction: float = 0.01):
    """open_clip's layout: an image path column and a caption column; rows with the same path are one
    image with several captions. Relative paths are resolved against ``root`` (default: the CSV's folder)."""
    fmt = "tsv" if sep == "\t" else "csv"
    path = _need_path(fmt, positional, "file", f"{fmt}:data/train.{fmt}")
    base = Path(root).expanduser() if root else path.parent
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep)
    columns = reader.fieldnames or []
    img_key = img_key or next((c for c in ("filepath", "image", "file_name", "path", "url") if c in columns), None)
    caption_key = caption_key or next((c for c in ("caption", "title", "text") if c in columns), None)
    if img_key not in columns or caption_key not in columns:
        raise DmclipError(f"{path} has columns {columns}, needs an image path and a caption column",
                          "name them filepath and caption (or pass img_key=... and caption_key=...)"
                          + (" — is the separator right? use tsv: for tab-separated files" if len(columns) == 1 else ""))
    skips = SkipCounter(f"{fmt}:{path}", max_skip_fraction)
    grouped: dict[str, list[str]] = {}
    rows = 0
    for row in reader:
        rows += 1
        try:
            caption = clean_caption(row.get(caption_key))
        except BadSample as exc:
            skips.add(exc.reason, f"{path} row {rows}")
            continue
        file = row.get(img_key) or ""
        if file not in grouped:
            target = base / file
            if not file or not _file_row(target, skips):
                continue
            grouped[file] = []
        grouped[file].append(caption)
    skips.total = rows
    ds = FileImageTextDataset(f"{fmt}:{path}", [("file", str(base / f)) for f in grouped], list(grouped.values()),
                              image_size, skips)
    return _finish(ds, skips)


# ------------------------------------------------------------------------------------------- COCO


def load_coco(positional, *, image_size, spec: str, max_skip_fraction: float = 0.01):
    """COCO captions JSON ({"images", "annotations"}) or BLIP's coco_karpathy_*.json ([{"image", "caption"}])."""
    path = _need_path("coco", positional, "JSON file", "coco:annotations/captions_val2014.json:val2014")
    root = Path(positional[1]).expanduser() if len(positional) > 1 else path.parent
    if not root.is_dir():
        raise DmclipError(f"coco: image root {str(root)!r} is not a directory",
                          "give it after the JSON path: coco:captions.json:IMAGE_DIR")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DmclipError(f"coco: {path} is not valid JSON ({exc})", "use a COCO captions or Karpathy JSON") from None
    grouped: dict[str, list] = {}
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        files = {img["id"]: img["file_name"] for img in data["images"]}
        for file in files.values():
            grouped.setdefault(file, [])
        for ann in data["annotations"]:
            if ann.get("image_id") in files:
                grouped[files[ann["image_id"]]].append(ann.get("caption"))
    elif isinstance(data, list) and all(isinstance(x, dict) and "image" in x for x in data):
        for item in data:
            value = item.get("caption", [])
            grouped.setdefault(item["image"], []).extend(value if isinstance(value, list) else [value])
    else:
        raise DmclipError(f"coco: {path} is neither COCO captions ({{'images', 'annotations'}}) nor a Karpathy list",
                          "use captions_*.json from COCO or coco_karpathy_*.json from BLIP")
    skips = SkipCounter(f"coco:{path}", max_skip_fraction)
    sources, captions = [], []
    for file, texts in grouped.items():
        good = []
        for text in texts:
            try:
                good.append(clean_caption(text))
            except BadSample as exc:
                skips.add(exc.reason, f"{file}")
        if not good:
            if not texts:
                skips.add("empty-caption", f"{file}: no caption")
            continue
        if _file_row(root / file, skips):
            sources.append(("file", str(root / file)))
            captions.append(good)
    skips.total = len(grouped)
    return _finish(FileImageTextDataset(f"coco:{path}", sources, captions, image_size, skips), skips)


# ------------------------------------------------------------------------------------ ImageFolder


def _read_names(path: Path, folders: list[str]) -> list[str]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        missing = [f for f in folders if f not in data]
        if missing:
            raise DmclipError(f"{path} names no class for folder {missing[0]!r}", "give a name for every class folder")
        return [str(data[f]) for f in folders]
    if len(data) != len(folders):
        raise DmclipError(f"{path} has {len(data)} class names for {len(folders)} class folders",
                          "write one name per line, in the sorted order of the folders: " + ", ".join(folders[:5]))
    return [str(x) for x in data]


def load_imagefolder(positional, *, image_size, spec: str, classnames: str | None = None,
                     templates: str | None = None, max_skip_fraction: float = 0.01):
    """DIR/<class>/<image>; class names from classnames.txt (one per line, sorted folder order, or a JSON
    list / {folder: name}), else the folder names; templates from templates.txt, else CLIP-style defaults."""
    root = _need_path("imagefolder", positional, "directory", "imagefolder:data/val")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DmclipError(f"imagefolder: {root} has no class folders", "lay it out as DIR/<class name>/<image files>")
    names_file = Path(classnames).expanduser() if classnames else root / "classnames.txt"
    templates_file = Path(templates).expanduser() if templates else root / "templates.txt"
    for given, file in ((classnames, names_file), (templates, templates_file)):
        if given and not file.is_file():
            raise DmclipError(f"imagefolder: {file} does not exist", "check the path of the option")
    names = _read_names(names_file, folders) if names_file.is_file() else [f.replace("_", " ") for f in folders]
    prompts = (check_templates(templates_file.read_text(encoding="utf-8").splitlines(), str(templates_file))
               if templates_file.is_file() else DEFAULT_TEMPLATES)
    skips = SkipCounter(f"imagefolder:{root}", max_skip_fraction)
    sources, labels = [], []
    for label, folder in enumerate(folders):
        for file in sorted((root / folder).iterdir()):
            if file.suffix.lower() in IMAGE_EXTENSIONS and _file_row(file, skips):
                sources.append(("file", str(file)))
                labels.append(label)
    skips.total = len(sources) + skips.skipped
    ds = FileClassificationDataset(f"imagefolder:{root}", sources, labels, names, prompts, image_size, skips)
    return _finish(ds, skips)


# ------------------------------------------------------------------------------------ Hugging Face


class HFDataset:
    """Mixin over a ``datasets.Dataset`` whose image column is read undecoded (bytes or path)."""

    def _setup(self, table, image_column: str, base: Path | None):
        self._table = table
        self._image_column = image_column
        self._base = base

    def __len__(self) -> int:
        return len(self._table)

    def load_image(self, i: int) -> np.ndarray:
        value = self._table[i][self._image_column]
        if isinstance(value, dict):
            if value.get("bytes"):
                return decode_image(value["bytes"], self.image_size, value.get("path") or f"row {i}")
            value = value.get("path")
        if not value:
            raise BadSample("missing-file", f"row {i}: no image")
        path = Path(value) if self._base is None else self._base / value
        return decode_image(read_source(("file", str(path))), self.image_size, str(path))


class HFImageText(HFDataset, ImageTextDataset):
    def __init__(self, name, table, image_column, captions, image_size, skips, base):
        ImageTextDataset.__init__(self, name, image_size or DEFAULT_IMAGE_SIZE, skips=skips)
        self._setup(table, image_column, base)
        self._captions = captions

    def captions(self, i: int) -> list[str]:
        return self._captions[self._index(i)]


class HFClassification(HFDataset, ClassificationDataset):
    def __init__(self, name, table, image_column, labels, classnames, templates, image_size, skips, base):
        ClassificationDataset.__init__(self, name, image_size or DEFAULT_IMAGE_SIZE, skips=skips)
        self._setup(table, image_column, base)
        self._labels = labels
        self.classnames = classnames
        self.templates = check_templates(templates, name)

    def label(self, i: int) -> int:
        return self._labels[i]

    def labels(self) -> list[int]:
        return list(self._labels)


def load_hf(positional, *, image_size, spec: str, split: str = "train", image_column: str | None = None,
            text_column: str | None = None, label_column: str | None = None, templates: str | None = None,
            max_skip_fraction: float = 0.01):
    """A local ``imagefolder`` directory (with metadata.jsonl for captions), a local .json/.jsonl file
    (image paths relative to it), or a hub name (needs the network)."""
    import datasets as hf

    if not positional:
        raise DmclipError("hf: no dataset given", "e.g. hf:path/to/imagefolder or hf:user/name:split=test")
    name = ":".join(positional)
    path = Path(name).expanduser()
    cache_dir = str(Path(os.environ.get("DMCLIP_CACHE") or "~/.cache/dmclip").expanduser() / "hf")
    base = None
    try:
        if path.is_dir():
            table = hf.load_dataset("imagefolder", data_dir=str(path), split=split, cache_dir=cache_dir)
        elif path.is_file() and path.suffix in (".json", ".jsonl"):
            table = hf.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
            base = path.parent
        elif "/" in name and not name.startswith((".", "/", "~")) and not path.exists():
            table = hf.load_dataset(name, split=split, cache_dir=cache_dir)
        else:
            raise DmclipError(f"hf: {name!r} does not exist", "give a local imagefolder directory, a .json/.jsonl "
                              "file, or a hub name like user/dataset")
    except DmclipError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        raise DmclipError(f"hf: cannot load {name!r} ({first[:200]})",
                          "offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE): use a local path"
                          if offline else "check the name, the split (split=...) and the network") from None
    features = table.features
    columns = list(features)
    image_column = image_column or next(
        (c for c in columns if type(features[c]).__name__ == "Image"),
        next((c for c in ("image", "img", "jpg", "png", "file_name", "filepath") if c in columns), None))
    if image_column not in columns:
        raise DmclipError(f"hf: {name} has no image column (columns: {columns})", "pass image_column=<name>")
    if type(features[image_column]).__name__ == "Image":
        table = table.cast_column(image_column, hf.Image(decode=False))
    skips = SkipCounter(f"hf:{name}", max_skip_fraction)
    for option, given in (("text_column", text_column), ("label_column", label_column)):
        if given is not None and given not in columns:
            raise DmclipError(f"hf: {name} has no column {given!r} (columns: {columns})", f"pass {option}=<a column>")
    if label_column is None or text_column is not None:  # label_column=<name> alone asks for classification
        text_column = text_column or next((c for c in ("caption", "captions", "text", "sentences", "title")
                                           if c in columns), None)
    label_column = label_column or next((c for c in ("label", "labels") if c in columns), None)
    if text_column is None and label_column is not None:
        names = getattr(features[label_column], "names", None)
        if names:  # a ClassLabel: the values index its names
            classnames, labels = list(names), [int(x) for x in table[label_column]]
        else:  # plain values (ints or strings): each distinct value is a class, in sorted order
            classnames = sorted(set(table[label_column]))
            index = {value: i for i, value in enumerate(classnames)}
            labels = [index[x] for x in table[label_column]]
        classnames = [str(c) for c in classnames]
        prompts = DEFAULT_TEMPLATES
        if templates:
            prompts = check_templates(Path(templates).read_text(encoding="utf-8").splitlines(), templates)
        skips.total = len(table)
        return _finish(HFClassification(f"hf:{name}", table, image_column, labels,
                                        [c.replace("_", " ") for c in classnames], prompts, image_size, skips,
                                        base), skips)
    if text_column is None:
        raise DmclipError(f"hf: {name} has neither a caption nor a label column (columns: {columns})",
                          "pass text_column=<name> or label_column=<name>")
    keep, captions = [], []
    for i, value in enumerate(table[text_column]):
        values = value if isinstance(value, list) else [value]
        try:
            captions.append([clean_caption(v) for v in values] or [clean_caption(None)])
            keep.append(i)
        except BadSample as exc:
            skips.add(exc.reason, f"row {i}")
    skips.total = len(table)
    if len(keep) < len(table):
        table = table.select(keep)
    return _finish(HFImageText(f"hf:{name}", table, image_column, captions, image_size, skips, base), skips)


# ----------------------------------------------------------------------------------- Fashion-MNIST


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


# ------------------------------------------------------------------------------------------ dispatch


_LOADERS = {
    "csv": (lambda p, **kw: load_csv(p, sep=",", **kw), ("img_key", "caption_key", "root", "max_skip_fraction")),
    "tsv": (lambda p, **kw: load_csv(p, sep="\t", **kw), ("img_key", "caption_key", "root", "max_skip_fraction")),
    "coco": (load_coco, ("max_skip_fraction",)),
    "imagefolder": (load_imagefolder, ("classnames", "templates", "max_skip_fraction")),
    "hf": (load_hf, ("split", "image_column", "text_column", "label_column", "templates", "max_skip_fraction")),
    "fashion-mnist": (load_fashion_mnist, ("split", "size", "max_skip_fraction")),
}


def load(fmt: str, positional: list[str], *, image_size: int | None, seed: int | None, spec: str, **options):
    """Load ``fmt`` (one of ``spec.FORMATS``); ``seed`` is unused (files are what they are)."""
    loader, allowed = _LOADERS[fmt]
    _options(fmt, options, allowed)
    return loader(positional, image_size=image_size, spec=spec, **options)


def _fashion_mnist_factory(*, image_size: int | None = None, seed: int | None = None, **options):
    """Fashion-MNIST test set (10 classes) from Debian's dataset-fashion-mnist."""
    return load("fashion-mnist", [], image_size=image_size, seed=seed, spec="fashion-mnist", **options)


_fashion_mnist_factory.kind = "classification"  # read by the eval suite without building it
_fashion_mnist_factory.available = fashion_mnist_available


def _register() -> None:
    from dmclip.registry import datasets

    datasets.add("fashion-mnist", _fashion_mnist_factory,
                 description="Fashion-MNIST test set, 10 classes, real grey images (apt-get install "
                             "dataset-fashion-mnist)", tiny={"size": 20, "image_size": 32})


_register()

"""Hugging Face ``datasets``: a local imagefolder (captions from metadata.jsonl), a local .json/.jsonl file,
or a hub name (needs the network). The image column is read undecoded and decoded like the other formats."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dmclip.data.base import BadSample, SkipCounter, check_templates, clean_caption, decode_image
from dmclip.data.files import (
    DEFAULT_TEMPLATES,
    FileClassificationDataset,
    FileImageTextDataset,
    finish,
    read_source,
)
from dmclip.errors import DmclipError

OPTIONS = ("split", "image_column", "text_column", "label_column", "templates", "max_skip_fraction")


class HFDataset:
    """Mixin over a file-backed dataset whose sources are the rows of a ``datasets.Dataset``: the image
    column is read undecoded (bytes, or a path relative to ``_base`` when that is set)."""

    _image_column: str
    _base: Path | None

    def load_image(self, i: int) -> np.ndarray:
        value = self.sources[i][self._image_column]
        if isinstance(value, dict):
            if value.get("bytes"):
                return decode_image(value["bytes"], self.image_size, value.get("path") or f"row {i}")
            value = value.get("path")
        if not value:
            raise BadSample("missing-file", f"row {i}: no image")
        path = Path(value) if self._base is None else self._base / value
        return decode_image(read_source(("file", str(path))), self.image_size, str(path))


class HFImageText(HFDataset, FileImageTextDataset):
    def __init__(self, name, table, image_column, captions, image_size, skips, base):
        super().__init__(name, table, captions, image_size, skips)
        self._image_column, self._base = image_column, base


class HFClassification(HFDataset, FileClassificationDataset):
    def __init__(self, name, table, image_column, labels, classnames, templates, image_size, skips, base):
        super().__init__(name, table, labels, classnames, templates, image_size, skips)
        self._image_column, self._base = image_column, base


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
        return finish(HFClassification(f"hf:{name}", table, image_column, labels,
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
    return finish(HFImageText(f"hf:{name}", table, image_column, captions, image_size, skips, base), skips)

"""Webdataset tar shards: a stream for training, an index for evaluation and small sets.

Layout (img2dataset / DataComp): ``<key>.jpg|png|webp`` + ``<key>.txt`` and/or ``<key>.json`` (``"captions":
[...]``, ``"caption"`` or ``"text"``). A ``<key>.cls`` integer label makes a classification set
(CLIP_benchmark's layout, and what ``dmclip data export`` writes for classification sets), with class names
from ``classnames.txt`` and prompts from ``zeroshot_classification_templates.txt`` beside the shards or in
their parent folder.

Two readers:

- ``WdsStream`` (``dmclip.data.stream``): webdataset's own pipeline (shard list -> tar reader -> shuffle
  buffer), nothing read up front, every sample once per epoch across ranks x DataLoader workers, resumable.
- ``load_index``: one pass over the tar headers at load; images are read by offset when asked for; captions
  or labels are held in memory. Map-style (``len``, ``ds[i]``): what evaluation, ``data export``/``show``,
  ``capfilt`` and reinforced stores need. ``build_dataset`` returns it unless the caller can take a stream
  (``allow_stream=True``: ``pretrain`` and ``distill`` training data) and the spec does not say ``stream=false``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from pathlib import Path

from dmclip.data.base import BadSample, SkipCounter, check_templates
from dmclip.data.files import DEFAULT_TEMPLATES, FileClassificationDataset, FileImageTextDataset, finish
from dmclip.data.wds_members import IMAGE_SUFFIXES, META_MEMBER, captions_of, label_of
from dmclip.errors import DmclipError

CLASSNAMES_FILES = ("classnames.txt",)
TEMPLATES_FILES = ("zeroshot_classification_templates.txt", "templates.txt")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's split of a member name into key + suffix


# --------------------------------------------------------------------------------------------- shards


def _natural(name: str) -> list:
    """'shard-10.tar' after 'shard-9.tar' (CLIP_benchmark numbers its shards 0.tar, 1.tar, ... 10.tar)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def expand_shards(pattern: str, split: str = "test") -> list[Path]:
    """Shard paths for a brace pattern, a glob, one file, a directory of ``*.tar``, or a CLIP_benchmark
    root (``ROOT/<split>/*.tar``)."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        shards = sorted(path.glob("*.tar"), key=lambda p: _natural(p.name))
        if not shards and (path / split).is_dir():
            shards = sorted((path / split).glob("*.tar"), key=lambda p: _natural(p.name))
        if not shards:
            raise DmclipError(f"wds: no .tar shards in {path}" + (f" nor in {path / split}" if split and
                                                                  (path / split).is_dir() else ""),
                              "point at the shards, e.g. wds:data/{000000..000009}.tar")
        return shards
    import braceexpand

    shards = []
    for item in braceexpand.braceexpand(pattern):
        matches = sorted(glob.glob(os.path.expanduser(item))) if any(ch in item for ch in "*?[") else [item]
        shards.extend(Path(m).expanduser() for m in matches)
    missing = [str(s) for s in shards if not s.is_file()]
    if not shards or missing:
        raise DmclipError(f"wds: shard {missing[0] if missing else pattern!r} does not exist"
                          + (f" ({len(missing)} of {len(shards)} missing)" if len(missing) > 1 else ""),
                          "check the path or brace pattern, e.g. wds:data/shard-{000000..000009}.tar")
    return shards


def _beside(shards: list[Path], names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` in the shards' folder or its parent (CLIP_benchmark keeps them in the parent)."""
    folder = shards[0].parent
    for directory in (folder, folder.parent):
        for name in names:
            if (directory / name).is_file():
                return directory / name
    return None


def dataset_size(shards: list[Path]) -> int | None:
    """Samples in ``shards`` from a ``sizes.json`` beside them (``{"shard-000000.tar": 1000, ...}``, open_clip's
    convention, written by ``dmclip data export``), or None when it does not name every shard."""
    file = shards[0].parent / "sizes.json"
    try:
        sizes = json.loads(file.read_text(encoding="utf-8"))
        return sum(int(sizes[s.name]) for s in shards)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _peek(shard: Path) -> dict:
    """The first sample of a shard (suffix -> bytes), read through webdataset; {} if it has none."""
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples(handler=wds.ignore_and_continue))
    return next(iter(pipeline), {})


# ------------------------------------------------------------------------------- the index (map-style)


def _read_lines(file: Path) -> list[str]:
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _class_files(shards: list[Path], classnames: str | None, templates: str | None) -> tuple[list | None, list]:
    names = prompts = None
    for given in (classnames, templates):
        if given and not Path(given).expanduser().is_file():
            raise DmclipError(f"wds: {given} does not exist", "check the path of the classnames=/templates= option")
    names_file = Path(classnames).expanduser() if classnames else _beside(shards, CLASSNAMES_FILES)
    templates_file = Path(templates).expanduser() if templates else _beside(shards, TEMPLATES_FILES)
    if names_file is not None:
        names = _read_lines(names_file)
    prompts = check_templates(_read_lines(templates_file), str(templates_file)) if templates_file else DEFAULT_TEMPLATES
    return names, prompts


def load_index(shards: list[Path], name: str, *, image_size, classification: bool, classnames: str | None = None,
               templates: str | None = None, max_skip_fraction: float = 0.01):
    """One pass over the tar headers: image members by offset, captions (or ``.cls`` labels) in memory."""
    skips = SkipCounter(name, max_skip_fraction)
    sources, captions, labels, json_names = [], [], [], {}
    rows = 0

    def flush(sample: dict | None):
        nonlocal rows
        if sample is None:
            return
        rows += 1
        where = f"{sample['shard']} key {sample['key']}"
        if "image" not in sample:
            skips.add("missing-file", f"{where}: no image member")
            return
        if sample["image"][3] == 0:
            skips.add("empty-file", where)
            return
        try:
            if classification:
                labels.append(label_of(sample.get("cls")))
                if "json" in sample:  # dmclip's own export: {"captions": [class name], "label": k}
                    try:
                        json_names.setdefault(labels[-1], captions_of(None, sample["json"])[0])
                    except BadSample:
                        pass
            else:
                captions.append(captions_of(sample.get("txt"), sample.get("json")))
        except BadSample as exc:
            skips.add(exc.reason, f"{where}: {exc.detail}")
            return
        sources.append(sample["image"])

    for shard in shards:
        current = None
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile() or META_MEMBER.match(member.name):
                        continue
                    match = _KEY.match(member.name)
                    if not match:
                        continue
                    key, suffix = match.group(1), match.group(2).lower()
                    if current is None or current["key"] != key:
                        flush(current)
                        current = {"key": key, "shard": str(shard)}
                    if suffix.rsplit(".", 1)[-1] in IMAGE_SUFFIXES:
                        current["image"] = ("tar", str(shard), member.offset_data, member.size)
                    elif suffix in ("txt", "json", "cls"):
                        current[suffix] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            skips.add("truncated-shard", f"{shard}: {exc}")
        flush(current)
    skips.total = rows
    if not classification:
        return finish(FileImageTextDataset(name, sources, captions, image_size, skips), skips)
    names, prompts = _class_files(shards, classnames, templates)
    top = max(labels, default=-1)
    if names is None:
        if labels and all(json_names.get(k) for k in range(top + 1)):
            names = [json_names[k] for k in range(top + 1)]
        else:
            raise DmclipError(f"{name}: the samples have .cls labels but no class names were found",
                              "put classnames.txt (one name per line, in label order) beside the shards or in "
                              "their parent folder, or pass classnames=FILE")
    if top >= len(names):
        raise DmclipError(f"{name}: label {top} found but only {len(names)} class names",
                          "give one class name per label 0..N-1 (classnames.txt or classnames=FILE)")
    dataset = FileClassificationDataset(name, sources, labels, names, prompts, image_size, skips)
    return finish(dataset, skips)


# ------------------------------------------------------------------------------------------ dispatch


OPTIONS = ("stream", "shuffle_buffer", "resampled", "samples", "split", "classnames", "templates",
           "max_skip_fraction")


def load(positional: list[str], *, image_size, seed, spec: str, allow_stream: bool = False,
         stream: bool | None = None, shuffle_buffer: int = 1000, resampled: bool = False, samples: int | None = None,
         split: str = "test", classnames: str | None = None, templates: str | None = None,
         max_skip_fraction: float = 0.01):
    """``wds:PATTERN`` -> a ``WdsStream`` when the caller takes one (and the spec does not say stream=false) and
    the samples have captions; else the map-style index (``.cls`` sets always)."""
    if not positional:
        raise DmclipError("wds: no shard path given", "e.g. wds:data/shard-{000000..000009}.tar")
    pattern = ":".join(positional)
    shards = expand_shards(pattern, str(split))
    name = f"wds:{pattern}"
    classification = "cls" in _peek(shards[0])
    if stream and not allow_stream:
        raise DmclipError(f"{name}: stream=true, but this command reads the set by index (len, ds[i])",
                          "drop stream=true: the shards are then indexed (one pass over their headers)")
    if stream and classification:
        raise DmclipError(f"{name}: a .cls (classification) set is not streamed", "drop stream=true")
    if allow_stream and stream is not False and not classification:
        size = int(samples) if samples else dataset_size(shards)
        from dmclip.data.stream import WdsStream

        return WdsStream(name, shards, image_size=image_size, seed=seed or 0, shuffle_buffer=shuffle_buffer,
                         resampled=resampled, size=size, max_skip_fraction=max_skip_fraction)
    return load_index(shards, name, image_size=image_size, classification=classification, classnames=classnames,
                      templates=templates, max_skip_fraction=max_skip_fraction)

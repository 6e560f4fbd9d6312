"""ImageFolder for zero-shot classification: DIR/<class>/<image>, with optional class names and prompts."""

from __future__ import annotations

import json
from pathlib import Path

from dmclip.data.base import SkipCounter, check_templates
from dmclip.data.files import (
    DEFAULT_TEMPLATES,
    IMAGE_EXTENSIONS,
    FileClassificationDataset,
    finish,
    need_path,
    usable_file,
)
from dmclip.errors import DmclipError

OPTIONS = ("classnames", "templates", "max_skip_fraction")


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
    root = need_path("imagefolder", positional, "directory", "imagefolder:data/val")
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
            if file.suffix.lower() in IMAGE_EXTENSIONS and usable_file(file, skips):
                sources.append(("file", str(file)))
                labels.append(label)
    skips.total = len(sources) + skips.skipped
    ds = FileClassificationDataset(f"imagefolder:{root}", sources, labels, names, prompts, image_size, skips)
    return finish(ds, skips)

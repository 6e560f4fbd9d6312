"""Caption files: open_clip's CSV/TSV (an image path and a caption per row) and COCO / Karpathy JSON."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from dmclip.data.base import BadSample, SkipCounter, clean_caption
from dmclip.data.files import FileImageTextDataset, finish, need_path, usable_file
from dmclip.errors import DmclipError

CSV_OPTIONS = ("img_key", "caption_key", "root", "max_skip_fraction")
COCO_OPTIONS = ("max_skip_fraction",)


def load_csv(positional, *, image_size, sep: str, spec: str, img_key: str | None = None,
             caption_key: str | None = None, root: str | None = None, max_skip_fraction: float = 0.01):
    """open_clip's layout: an image path column and a caption column; rows with the same path are one
    image with several captions. Relative paths are resolved against ``root`` (default: the CSV's folder)."""
    fmt = "tsv" if sep == "\t" else "csv"
    path = need_path(fmt, positional, "file", f"{fmt}:data/train.{fmt}")
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
            if not file or not usable_file(target, skips):
                continue
            grouped[file] = []
        grouped[file].append(caption)
    skips.total = rows
    ds = FileImageTextDataset(f"{fmt}:{path}", [("file", str(base / f)) for f in grouped], list(grouped.values()),
                              image_size, skips)
    return finish(ds, skips)


def load_coco(positional, *, image_size, spec: str, max_skip_fraction: float = 0.01):
    """COCO captions JSON ({"images", "annotations"}) or BLIP's coco_karpathy_*.json ([{"image", "caption"}])."""
    path = need_path("coco", positional, "JSON file", "coco:annotations/captions_val2014.json:val2014")
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
        if usable_file(root / file, skips):
            sources.append(("file", str(root / file)))
            captions.append(good)
    skips.total = len(grouped)
    return finish(FileImageTextDataset(f"coco:{path}", sources, captions, image_size, skips), skips)

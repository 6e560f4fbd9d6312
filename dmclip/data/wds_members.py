"""What the members of a webdataset sample hold: which one is the image, the captions, the class label, and
which members webdataset's tar reader leaves out. Shared by the map-style index (:mod:`dmclip.data.wds`) and
the stream (:mod:`dmclip.data.stream`), so the two read a shard the same way.
"""

from __future__ import annotations

import json
import re

from dmclip.data.base import BadSample, clean_caption
from dmclip.data.files import IMAGE_EXTENSIONS

IMAGE_SUFFIXES = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)
META_MEMBER = re.compile(r"__[^/]*__($|/)")  # members webdataset's tar reader leaves out


def image_member(members: dict) -> str | None:
    """The suffix of a sample's image member ('jpg', 'seg.png' ...), or None."""
    return next((s for s in members if not s.startswith("__") and s.rsplit(".", 1)[-1] in IMAGE_SUFFIXES), None)


def captions_of(txt: bytes | None, meta: bytes | None) -> list[str]:
    """Captions from ``.json`` (``captions`` list, or ``caption`` / ``text``), else ``.txt``; ``BadSample`` if none."""
    found = None
    if meta is not None:
        try:
            data = json.loads(meta.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = {}
        if isinstance(data, dict):
            found = data.get("captions") or data.get("caption") or data.get("text")
    texts = (found if isinstance(found, list) else [found]) if found else ([txt] if txt is not None else [None])
    return [clean_caption(t) for t in texts]


def label_of(cls: bytes | None) -> int:
    try:
        label = int(cls.decode("utf-8").strip())
    except (AttributeError, UnicodeDecodeError, ValueError):
        raise BadSample("bad-label", f".cls holds {cls[:20]!r}" if cls is not None else "no .cls member") from None
    if label < 0:
        raise BadSample("bad-label", f".cls holds {label}")
    return label

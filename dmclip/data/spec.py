"""``build_dataset(spec)``: the one way every command gets data.

Spec syntax (options are ``key=value`` parts after the name, separated by ``:`` or ``,``)::

    world-train                     a registered dataset (``dmclip list datasets``)
    world-train:size=2000           ... with options
    world-noisy:noise=0.3,size=500
    csv:PATH  tsv:PATH              open_clip layout: filepath + caption columns
    wds:PATH_OR_BRACE_PATTERN       webdataset tar shards (a directory means all *.tar in it); streamed for
                                    callers that take a stream (allow_stream=True), else indexed
    coco:JSON_PATH[:IMAGE_ROOT]     COCO captions JSON or BLIP's coco_karpathy_*.json
    imagefolder:DIR                 DIR/<class>/<image>, optional classnames.txt / templates.txt
    hf:NAME_OR_LOCAL_PATH           Hugging Face ``datasets`` (local imagefolder / json, or hub when online)
    fashion-mnist[:DIR]             Debian's dataset-fashion-mnist IDX files (split=test|train)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmclip.errors import DmclipError, did_you_mean

FORMATS = ("csv", "tsv", "wds", "coco", "imagefolder", "hf", "fashion-mnist")


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, list[str], dict[str, Any]]:
    """``"coco:a.json:imgs:max_skip_fraction=0.1"`` -> ``("coco", ["a.json", "imgs"], {"max_skip_fraction": 0.1})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise DmclipError("empty dataset spec", "name a dataset, e.g. world-train or csv:train.csv")
    head, _, rest = spec.strip().partition(":")
    positional: list[str] = []
    options: dict[str, Any] = {}
    if rest:
        pieces = rest.split(":")
        for piece in pieces:
            # key=value pieces may hold several comma-separated options; a path stays whole
            if "=" in piece and "/" not in piece.split("=", 1)[0]:
                for item in piece.split(","):
                    key, sep, value = item.partition("=")
                    if not sep or not key.strip():
                        raise DmclipError(f"dataset spec {spec!r}: cannot read option {item!r}",
                                          "write options as key=value, e.g. world-train:size=2000")
                    options[key.strip()] = _value(value.strip())
            elif piece:
                positional.append(piece)
    return head, positional, options


def build_dataset(spec: str, *, image_size: int | None = None, seed: int | None = None, allow_stream: bool = False,
                  **options):
    """Build the dataset named by ``spec`` (see the module doc). ``options`` override those in the spec.

    Returns an ``ImageTextDataset`` or a ``ClassificationDataset``; images are uint8 (3, S, S) with
    S = ``image_size`` (default 64). ``allow_stream=True`` says the caller can also take a
    ``torch.utils.data.IterableDataset`` (the training engine can): webdataset shards are then streamed
    (``dmclip.data.stream.WdsStream``) instead of indexed, unless the spec says ``stream=false``.
    """
    from dmclip.registry import datasets

    head, positional, spec_options = parse_spec(spec)
    merged = {**spec_options, **options}
    if "max_skip_fraction" in spec_options:  # written in the spec on purpose (the skip error's hint says to):
        merged["max_skip_fraction"] = spec_options["max_skip_fraction"]  # it beats a command's config default
    # image_size / seed may come in the spec too ("world-train:image_size=32"); the keyword wins
    spec_size, spec_seed = merged.pop("image_size", None), merged.pop("seed", None)
    image_size = image_size if image_size is not None else spec_size
    seed = seed if seed is not None else spec_seed
    if image_size is not None and (int(image_size) != image_size or not 8 <= int(image_size) <= 1024):
        raise DmclipError(f"image_size {image_size} is out of range", "use a square size in pixels, e.g. 64")
    if head == "wds":
        from dmclip.data import wds
        from dmclip.data.files import check_options

        check_options(head, merged, wds.OPTIONS)
        return wds.load(positional, image_size=image_size, seed=seed, spec=spec, allow_stream=allow_stream, **merged)
    if head in FORMATS:
        from dmclip.data import formats

        return formats.load(head, positional, image_size=image_size, seed=seed, spec=spec, **merged)
    if head in datasets:
        if positional:
            raise DmclipError(f"dataset spec {spec!r}: {head} takes options as key=value, not {positional[0]!r}",
                              f"write e.g. {head}:size=1000")
        return datasets.get(head, image_size=image_size, seed=seed, **merged)
    if Path(spec).exists():
        guess = ("csv" if spec.endswith(".csv") else "tsv" if spec.endswith(".tsv") else
                 "wds" if spec.endswith(".tar") else "coco" if spec.endswith(".json") else "imagefolder")
        raise DmclipError(f"dataset spec {spec!r} is a path without a format",
                          f"prefix it with the format, e.g. {guess}:{spec}")
    known = list(datasets.names()) + [f"{f}:" for f in FORMATS]
    raise DmclipError(f"unknown dataset {head!r}", did_you_mean(head, known)
                      + " (registered datasets: `dmclip list datasets`; formats: " + ", ".join(FORMATS) + ")")

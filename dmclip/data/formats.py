"""The real formats a spec names (``csv:``, ``tsv:``, ``coco:``, ``imagefolder:``, ``hf:``, ``fashion-mnist:``)
-> their loader and the options it takes. Webdataset shards (``wds:``) are loaded by ``dmclip.data.wds``,
which can also stream them.

Each loader lives with its format family: ``captions`` (CSV/TSV, COCO/Karpathy JSON), ``imagefolder``,
``huggingface``, ``fashion_mnist``; what they share (file-backed datasets, the load-time checks) is in
``files``. ``export`` writes any dataset in these formats, so that the loaders can be tested on files the
world itself produced.
"""

from __future__ import annotations

from dmclip.data import captions, fashion_mnist, huggingface, imagefolder
from dmclip.data.files import check_options

_LOADERS = {
    "csv": (lambda p, **kw: captions.load_csv(p, sep=",", **kw), captions.CSV_OPTIONS),
    "tsv": (lambda p, **kw: captions.load_csv(p, sep="\t", **kw), captions.CSV_OPTIONS),
    "coco": (captions.load_coco, captions.COCO_OPTIONS),
    "imagefolder": (imagefolder.load_imagefolder, imagefolder.OPTIONS),
    "hf": (huggingface.load_hf, huggingface.OPTIONS),
    "fashion-mnist": (fashion_mnist.load_fashion_mnist, fashion_mnist.OPTIONS),
}


def load(fmt: str, positional: list[str], *, image_size: int | None, seed: int | None, spec: str, **options):
    """Load ``fmt`` (one of ``spec.FORMATS`` but ``wds``); ``seed`` is unused (files are what they are)."""
    loader, allowed = _LOADERS[fmt]
    check_options(fmt, options, allowed)
    return loader(positional, image_size=image_size, spec=spec, **options)

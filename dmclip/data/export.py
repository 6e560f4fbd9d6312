"""Write any dataset as webdataset shards, CSV + images, COCO captions JSON or an ImageFolder; draw grids."""

from __future__ import annotations

import io
import json
import logging
import re
import textwrap
from pathlib import Path

import numpy as np

from dmclip.data.base import BadSample
from dmclip.errors import DmclipError

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("webdataset", "csv", "coco", "imagefolder")


def encode_image(image: np.ndarray, image_format: str = "png") -> bytes:
    """An (H, W, 3) uint8 image as PNG (exact pixels) or JPEG (quality 95) bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buffer, format="PNG")
    else:
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _samples(ds, limit: int | None):
    """(index, image array, texts, record) for each readable sample; bad ones are skipped and counted."""
    n = len(ds) if limit is None else min(len(ds), int(limit))
    classification = ds.kind == "classification"
    for i in range(n):
        try:
            image = np.asarray(ds.load_image(i))
        except BadSample as exc:
            ds.skips.add(exc.reason, exc.detail)
            ds.skips.check()
            continue
        if classification:
            label = ds.label(i)
            yield i, image, [ds.classnames[label]], {"label": int(label)}
        else:
            extras = {k: v for k, v in ds.extras(i).items()}
            yield i, image, list(ds.captions(i)), extras


def _prepare(out: Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DmclipError(f"{out} already exists and is not empty", "export into a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_webdataset(samples, out: str | Path, shard_size: int, mtime: float | None = None) -> list[str]:
    """Write webdataset samples (``{"__key__": ..., "<ext>": bytes, ...}``) as ``out/shard-NNNNNN.tar``, at most
    ``shard_size`` samples per shard (img2dataset's layout); returns the shard file names.

    ``mtime`` stamps every tar member (a fixed value makes the shards byte-reproducible; None = now).
    """
    import webdataset as wds

    out = Path(out)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=int(shard_size), verbose=0, mtime=mtime) as sink:
        for sample in samples:
            sink.write(sample)
    return sorted(p.name for p in out.glob("shard-*.tar"))


def export(ds, fmt: str, out: str | Path, *, image_format: str = "png", shard_size: int = 1000,
           limit: int | None = None) -> dict:
    """Write ``ds`` to ``out`` in ``fmt``; returns {"format", "samples", "path", "files"}.

    png keeps pixels exact; jpg is smaller and lossy (quality 95).
    """
    if fmt not in EXPORT_FORMATS:
        from dmclip.errors import did_you_mean

        raise DmclipError(f"unknown export format {fmt!r}", did_you_mean(fmt, EXPORT_FORMATS))
    image_format = {"jpeg": "jpg"}.get(image_format, image_format)
    if image_format not in ("png", "jpg"):
        raise DmclipError(f"unknown image format {image_format!r}", "use png (exact) or jpg (smaller, lossy)")
    if fmt == "imagefolder" and ds.kind != "classification":
        raise DmclipError(f"{ds.name} has captions, not classes: it cannot be an ImageFolder",
                          "export it as webdataset, csv or coco")
    out = _prepare(out)
    count = 0
    if fmt == "webdataset":
        def shard_samples():
            nonlocal count
            for i, image, texts, record in _samples(ds, limit):
                sample = {"__key__": f"{i:08d}", image_format: encode_image(image, image_format), "txt": texts[0],
                          "json": json.dumps({"captions": texts, "index": i, **record}).encode()}
                if "label" in record:
                    sample["cls"] = str(record["label"]).encode()
                yield sample
                count += 1

        files = write_webdataset(shard_samples(), out, shard_size)
        # samples per shard (ShardWriter fills each to shard_size in turn), open_clip's sizes.json: a stream's size
        sizes = {name: min(int(shard_size), count - k * int(shard_size)) for k, name in enumerate(files)}
        (out / "sizes.json").write_text(json.dumps(sizes, indent=0) + "\n", encoding="utf-8")
        files.append("sizes.json")
        if ds.kind == "classification":  # CLIP_benchmark's files, read back by wds: for zero-shot
            (out / "classnames.txt").write_text("\n".join(ds.classnames) + "\n", encoding="utf-8")
            (out / "zeroshot_classification_templates.txt").write_text("\n".join(ds.templates) + "\n",
                                                                        encoding="utf-8")
            files += ["classnames.txt", "zeroshot_classification_templates.txt"]
    elif fmt in ("csv", "coco"):
        (out / "images").mkdir()
        rows, images, annotations = [], [], []
        for i, image, texts, record in _samples(ds, limit):
            name = f"images/{i:08d}.{image_format}"
            (out / name).write_bytes(encode_image(image, image_format))
            images.append({"id": i, "file_name": name, "height": int(image.shape[0]), "width": int(image.shape[1]),
                           **({"label": record["label"]} if "label" in record else {})})
            for text in texts:
                rows.append((name, text, record.get("label")))
                annotations.append({"id": len(annotations), "image_id": i, "caption": text})
            count += 1
        if fmt == "csv":
            import csv

            with open(out / "data.csv", "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                labelled = ds.kind == "classification"
                writer.writerow(["filepath", "caption", *(["label"] if labelled else [])])
                for name, text, label in rows:
                    writer.writerow([name, text, *([label] if labelled else [])])
            files = ["data.csv", "images/"]
        else:
            coco = {"info": {"description": f"{ds.name} exported by dmclip"}, "images": images,
                    "annotations": annotations}
            if ds.kind == "classification":
                coco["categories"] = [{"id": k, "name": n} for k, n in enumerate(ds.classnames)]
            (out / "captions.json").write_text(json.dumps(coco), encoding="utf-8")
            files = ["captions.json", "images/"]
    else:
        folders = [f"{k:03d}_" + re.sub(r"[^A-Za-z0-9]+", "_", n).strip("_") for k, n in enumerate(ds.classnames)]
        for folder in folders:
            (out / folder).mkdir()
        for i, image, _, record in _samples(ds, limit):
            (out / folders[record["label"]] / f"{i:08d}.{image_format}").write_bytes(encode_image(image, image_format))
            count += 1
        (out / "classnames.txt").write_text("\n".join(ds.classnames) + "\n", encoding="utf-8")
        (out / "templates.txt").write_text("\n".join(ds.templates) + "\n", encoding="utf-8")
        files = ["classnames.txt", "templates.txt", f"{len(folders)} class folders"]
    log.info("exported %d samples of %s to %s (%s)", count, ds.name, out, fmt)
    return {"format": fmt, "samples": count, "path": str(out), "files": files, "skipped": ds.skipped}


def draw_grid(ds, out: str | Path, *, n: int = 16, columns: int | None = None, seed: int | None = None,
              title: str | None = None) -> dict:
    """A PNG grid of ``n`` samples with their first caption (or class name); wrong world-noisy captions
    are drawn in red. Samples are the first ``n``, or a random ``n`` with ``seed``."""
    from dmclip.report import pyplot, save_figure

    n = max(1, min(int(n), len(ds)))
    if seed is None:
        indices = list(range(n))
    else:
        indices = sorted(np.random.default_rng(seed).choice(len(ds), size=n, replace=False).tolist())
    columns = int(columns or min(n, 8))
    rows = -(-n // columns)
    fig, axes = pyplot().subplots(rows, columns, figsize=(1.9 * columns, 2.4 * rows + 0.3), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, indices):
        sample = ds[i]
        ax.imshow(sample["image"].permute(1, 2, 0).numpy(), interpolation="nearest")
        if ds.kind == "classification":
            text, colour = ds.classnames[sample["label"]], "black"
        else:
            text = sample["captions"][0]
            colour = "red" if sample.get("caption_is_noisy", [False])[0] else "black"
        ax.set_title("\n".join(textwrap.wrap(text, 24)[:3]), fontsize=7, color=colour)
    fig.suptitle(title or f"{ds.name} ({len(ds)} samples)", fontsize=9)
    save_figure(fig, out, dpi=100)
    return {"path": str(out), "samples": indices}

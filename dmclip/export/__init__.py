"""`dmclip export` as a library: a model's image tower (and text tower) as ONNX or as a PyTorch program,
checked against PyTorch.

    export_model("run:runs/distill/<run>", "out/student")                 # image_encoder.onnx + .json
    export_model("run:runs/distill/<run>", "out/fast", format="pt2")      # image_encoder.pt2 + _ops.so + .json
    export_model("builtin:world-vit", "out/teacher", towers=("image", "text"), batch=8, opset=18)

Two formats (``FORMATS``):

- ``onnx`` (:mod:`dmclip.export.onnx_format`): standard ONNX ops, run by onnxruntime on any OS and CPU, no
  PyTorch needed. A Vision-Mamba's selective scan is unrolled over the tokens there: portable, but many times
  slower than PyTorch.
- ``pt2`` (:mod:`dmclip.export.pt2_format`): a ``torch.export`` program whose Vision-Mamba block stack is one
  operator of the fused C++ kernel, whose library is written beside it: as fast as the model in PyTorch, run
  by torch alone (same torch version, Python minor version, OS and CPU family).

Each tower's file is run on a deterministic input and compared with the model's own PyTorch output; a max abs
difference above ``TOLERANCE`` refuses the export and leaves nothing behind. Beside each
``<tower>_encoder.<onnx|pt2>`` a ``<tower>_encoder.json`` says what a user needs to run it without dmclip:
input name, shape, dtype and range, the normalisation the graph applies, the embedding size, the difference
measured, versions, the files it needs and the source model reference.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from dmclip.errors import DmclipError, did_you_mean
from dmclip.export import onnx_format, pt2_format
from dmclip.export.towers import TOLERANCE, check_towers

__all__ = ["FORMATS", "TOLERANCE", "TOWERS", "export_model", "format_writer", "parse_towers"]

TOWERS = ("image", "text")
TOWER_CHOICES = {"image": ("image",), "text": ("text",), "both": ("image", "text")}
FORMATS = {"onnx": onnx_format, "pt2": pt2_format}


def parse_towers(value: str) -> tuple[str, ...]:
    """``image`` | ``text`` | ``both`` -> the towers to export."""
    if value not in TOWER_CHOICES:
        raise DmclipError(f"unknown tower {value!r}", f"--tower takes image, text or both ({did_you_mean(value, TOWER_CHOICES)})")
    return TOWER_CHOICES[value]


def format_writer(name: str):
    """The module that writes format ``name`` (``onnx`` or ``pt2``)."""
    if name not in FORMATS:
        raise DmclipError(f"unknown export format {name!r}", f"--format takes onnx or pt2 ({did_you_mean(name, FORMATS)})")
    return FORMATS[name]


def _check_out(out: Path, towers: Sequence[str], suffixes: Sequence[str]) -> None:
    if out.exists() and not out.is_dir():
        raise DmclipError(f"--out {out} is a file", "pass a directory (it is created if missing)")
    for tower in towers:
        for suffix in (*suffixes, ".json"):
            if (out / f"{tower}_encoder{suffix}").exists():
                raise DmclipError(f"{out / f'{tower}_encoder{suffix}'} already exists",
                                  "choose another --out, or remove the old export first")


def export_model(ref: str, out: str | Path, *, towers: Sequence[str] = ("image",), format: str = "onnx",
                 batch: int | None = None, opset: int | None = None, tolerance: float = TOLERANCE,
                 model: nn.Module | None = None, on_step: Callable[[str], None] | None = None) -> dict:
    """Export the towers of the model ``ref`` names (any reference ``dmclip eval`` takes) into ``out``.

    Returns ``{"source": ref, "out": dir, "format": format, "towers": {tower: the JSON written beside its file,
    plus path (the model file), json and bytes (of every file the tower needs)}}``. Files appear only once
    every tower asked for has passed its check. ``model`` skips loading (for a caller that holds the model
    already; ``ref`` then only names it in the JSON); ``on_step(name)`` is called with ``load``, then each
    tower's name, as the work starts. Bad options fail before the model loads.
    """
    from dmclip.io import atomic_write_json

    writer = format_writer(format)
    versions = writer.require()
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers:
        raise DmclipError(f"unknown tower {unknown[0] if unknown else 'none'!r}", "towers are image and text")
    if batch is not None and batch < 1:
        raise DmclipError(f"batch {batch} is not a batch size",
                          "pass --batch N with N >= 1, or leave it out for a dynamic batch axis")
    writer.check_options(opset)
    out = Path(out)
    _check_out(out, towers, writer.SUFFIXES)
    if model is None:
        from dmclip.models.refs import load_model_ref

        if on_step:
            on_step("load")
        model = load_model_ref(ref)
    model = model.cpu().eval()
    check_towers(model, towers)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out))  # same file system as out: os.replace is atomic
    try:
        described = {}
        for tower in towers:
            if on_step:
                on_step(tower)
            described[tower] = writer.export_tower(model, tower, work, batch=batch, opset=opset, tolerance=tolerance,
                                                   source=ref, versions=versions)
        result = {"source": ref, "out": str(out), "format": format, "towers": {}}
        for tower, info in described.items():
            for name in info["files"]:
                os.replace(work / name, out / name)
            json_path = out / f"{tower}_encoder.json"
            atomic_write_json(json_path, info)
            result["towers"][tower] = {**info, "path": str(out / info["files"][0]), "json": str(json_path),
                                       "bytes": sum((out / name).stat().st_size for name in info["files"])}
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(out.iterdir()):  # a refused export leaves no empty directory behind either
            out.rmdir()

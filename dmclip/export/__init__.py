"""`dmclip export` as a library: a model's image tower (and text tower) as ONNX or as a PyTorch program,
checked against PyTorch.

    export_model("run:runs/distill/<run>", "out/student")                 # image_encoder.onnx + .json
    export_model("run:runs/distill/<run>", "out/fast", format="pt2")      # image_encoder.pt2 + _ops.so + .json
    export_model("builtin:world-vit", "out/teacher", towers=("image", "text"), batch=8, opset=18)

Two formats (``FORMATS``):

- ``onnx``: each tower traced with ``torch.onnx.export(..., dynamo=True)`` on CPU into standard ONNX ops that
  onnxruntime runs on any OS and CPU, no PyTorch needed. Vision-Mamba blocks are switched to the ``reference``
  selective scan while tracing (the fused C++ kernel does not export to ONNX) and back afterwards, so the scan
  is unrolled over the tokens: portable, but for the demo student about 20-50x slower than PyTorch.
- ``pt2``: each tower traced with ``torch.export.export``, Vision-Mamba blocks on the fused ``cpu`` kernel: the
  whole block stack is one operator of the graph, ``torch.ops.dmclip.bimamba_stack`` (dmclip/csrc/torch_ops.cpp),
  so the program runs as fast as the model does in PyTorch. The operator lives in the extension's shared
  library, copied beside the program as ``<tower>_encoder_ops.so``; torch alone runs it, no dmclip:

      import torch
      torch.ops.load_library("exported/fast/image_encoder_ops.so")  # torch.ops.dmclip.bimamba_stack
      encoder = torch.export.load("exported/fast/image_encoder.pt2").module()
      with torch.inference_mode():
          embeddings = encoder(images)  # (batch, 3, S, S) float32 RGB in [0, 1] -> (batch, embed_dim)

  The library is compiled against this torch's C++ ABI and is also a CPython extension module: it loads with
  the same torch version and Python minor version, on the same OS and CPU family (its kernels choose their
  instruction set when it loads). A tower without Vision-Mamba blocks (a ViT, a text tower) needs no library.

Each tower's file is then run as a user runs it (onnxruntime; ``torch.export.load``) on a deterministic input
and compared with the model's own PyTorch output (its normal scan backend); a max abs difference above
``TOLERANCE`` refuses the export and leaves nothing behind. Beside each ``<tower>_encoder.<onnx|pt2>`` a
``<tower>_encoder.json`` says what a user needs to run it without dmclip: input name, shape, dtype and range,
the normalisation the graph applies, the embedding size, the difference measured, the files it needs,
versions and the source model reference (for pt2 also the Python lines that run it and what it requires).
"""


from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from dmclip.errors import DmclipError, did_you_mean
from dmclip.export.to_onnx import check_opset, export_onnx_tower, require_onnx
from dmclip.export.to_pt2 import LIBRARY_SUFFIX, check_pt2_options, export_pt2_tower
from dmclip.export.towers import TOLERANCE, check_towers

TOWERS = ("image", "text")
TOWER_CHOICES = {"image": ("image",), "text": ("text",), "both": ("image", "text")}


def parse_towers(value: str) -> tuple[str, ...]:
    """``image`` | ``text`` | ``both`` -> the towers to export."""
    if value not in TOWER_CHOICES:
        raise DmclipError(f"unknown tower {value!r}", f"--tower takes image, text or both ({did_you_mean(value, TOWER_CHOICES)})")
    return TOWER_CHOICES[value]


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """What :func:`export_model` needs of a format."""

    suffixes: tuple[str, ...]  # of the files it may write per tower, beside <tower>_encoder.json
    require: Callable[[], dict[str, str]]  # the versions of the packages it needs; a DmclipError where one is missing
    check_options: Callable[[int | None], None]  # a DmclipError for an option it does not take (the opset)
    export_tower: Callable[..., dict]  # one tower into a directory, checked; returns its JSON


FORMATS = {
    "onnx": ExportFormat(suffixes=(".onnx",), require=require_onnx, check_options=check_opset,
                         export_tower=export_onnx_tower),
    "pt2": ExportFormat(suffixes=(".pt2", LIBRARY_SUFFIX), require=lambda: {},  # nothing beyond torch
                        check_options=check_pt2_options, export_tower=export_pt2_tower),
}


def export_format(name: str) -> ExportFormat:
    """Format ``name`` (``onnx`` or ``pt2``); a one-line error for another name."""
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

    writer = export_format(format)
    versions = writer.require()
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers:
        raise DmclipError(f"unknown tower {unknown[0] if unknown else 'none'!r}", "towers are image and text")
    if batch is not None and batch < 1:
        raise DmclipError(f"batch {batch} is not a batch size",
                          "pass --batch N with N >= 1, or leave it out for a dynamic batch axis")
    writer.check_options(opset)
    out = Path(out)
    _check_out(out, towers, writer.suffixes)
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

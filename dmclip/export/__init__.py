"""`dmclip export` as a library: a model's image tower (and text tower) as ONNX, checked against PyTorch.

    export_model("run:runs/distill/<run>", "out/student")                  # image_encoder.onnx + .json
    export_model("builtin:world-vit", "out/teacher", towers=("image", "text"), batch=8, opset=18)

Each tower is traced with ``torch.onnx.export(..., dynamo=True)`` on CPU. Vision-Mamba blocks are switched to
the ``reference`` selective scan while tracing (standard ONNX ops; the fused C++ kernel does not export) and
back afterwards. The file is then run with onnxruntime on a deterministic input and compared with the model's
own PyTorch output (its normal scan backend); a max abs difference above ``TOLERANCE`` refuses the export
and leaves nothing behind. Beside each ``<tower>_encoder.onnx`` a ``<tower>_encoder.json`` says what a user
needs to run it without dmclip: input name, shape, dtype and range, the normalisation the graph applies,
the embedding size, the difference measured, versions and the source model reference.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from dmclip.errors import DmclipError, did_you_mean

log = logging.getLogger(__name__)

TOWERS = ("image", "text")
TOWER_CHOICES = {"image": ("image",), "text": ("text",), "both": ("image", "text")}
TOLERANCE = 1e-4  # max abs difference allowed between onnxruntime's and PyTorch's embeddings
DYNAMIC_CHECK_BATCHES = (1, 4)  # a dynamic batch axis is checked at two sizes with the one file
TRACE_BATCH = 2  # torch.export specialises a dimension of size 1: trace a free batch axis at 2
CHECK_SEED = 0
CHECK_CAPTIONS = ("a photo of a small red circle on the left", "two blue squares", "a large green triangle",
                  "a yellow star at the bottom right")
FORMAT = "dmclip-onnx"
INSTALL_HINT = "pip install 'dmclip[export]'"


def parse_towers(value: str) -> tuple[str, ...]:
    """``image`` | ``text`` | ``both`` -> the towers to export."""
    if value not in TOWER_CHOICES:
        raise DmclipError(f"unknown tower {value!r}", f"--tower takes image, text or both ({did_you_mean(value, TOWER_CHOICES)})")
    return TOWER_CHOICES[value]


def require_onnx() -> dict[str, str]:
    """The versions of onnx, onnxruntime and onnxscript; a one-line error naming the extra where one is missing."""
    import importlib

    versions, missing = {}, []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            missing.append(name)
    if missing:
        raise DmclipError(f"dmclip export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          "not installed",
                          f"{INSTALL_HINT} (onnx, onnxruntime and onnxscript)")
    return versions


def onnx_session(path: str | Path, threads: int | None = None, spinning: bool = True):
    """An onnxruntime CPU session for ``path`` (``threads`` intra-op threads; None: torch's current count).

    ``spinning=False`` stops its idle worker threads from busy-waiting after each run (onnxruntime's default
    keeps them spinning for a while, which takes the cores from whatever runs next in the process).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------ the towers


class ImageTower(nn.Module):
    """images (B, 3, H, W) float in [0, 1] -> embeddings (B, embed_dim), unnormalised (normalisation inside)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encode = getattr(self.model, "encode_image", None)
        return encode(images) if callable(encode) else self.model(images)


class TextTower(nn.Module):
    """tokens (B, context_length) int64 from the model's tokenizer -> embeddings (B, embed_dim), unnormalised."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def check_towers(model: nn.Module, towers: Sequence[str]) -> None:
    """A one-line error when ``model`` lacks a tower asked for (before anything is traced or written)."""
    if "image" in towers and not callable(getattr(model, "encode_image", None)) and not hasattr(model, "image_size"):
        raise DmclipError("this model has no image tower to export", "export --tower text, or use a CLIP model")
    if "text" in towers and not callable(getattr(model, "encode_text", None)):
        raise DmclipError("this model has no text tower (a bare image encoder)",
                          "export --tower image, or a CLIP model (a distill run keeps its teacher's text tower)")


def normalisation(model: nn.Module) -> dict | None:
    """The image mean/std the model applies inside its image tower (so inside the ONNX graph), if it has one."""
    for module in model.modules():
        mean, std = getattr(module, "mean", None), getattr(module, "std", None)
        if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor) and mean.numel() == std.numel() == 3:
            return {"mean": [round(float(v), 8) for v in mean.flatten()],
                    "std": [round(float(v), 8) for v in std.flatten()]}
    return None


def example_inputs(model: nn.Module, tower: str, batch: int) -> torch.Tensor:
    """The deterministic input of the check: seeded uniform images in [0, 1], or fixed captions tokenized."""
    if tower == "image":
        size = int(model.image_size)
        generator = torch.Generator().manual_seed(CHECK_SEED)
        return torch.rand(batch, 3, size, size, generator=generator)
    captions = [CHECK_CAPTIONS[i % len(CHECK_CAPTIONS)] for i in range(batch)]
    return model.tokenize(captions)


def _embed_dim(model: nn.Module) -> int:
    return int(getattr(model, "embed_dim", 0) or 0)


def _text_input(model: nn.Module) -> dict:
    tokenizer = getattr(model, "tokenizer", None)
    described = {"name": "tokens", "shape": ["batch", int(model.context_length)], "dtype": "int64"}
    if hasattr(tokenizer, "to_dict"):  # dmclip's tokenizer: open_clip's BPE, optionally over a compact vocabulary
        described["tokenizer"] = {"kind": "open_clip SimpleTokenizer (BPE); ids remapped to 'vocab' when given: "
                                          "pad 0, sot 1, eot 2, unk 3, then vocab[i] -> i + 4",
                                  **tokenizer.to_dict(), "pad_id": tokenizer.pad_id, "sot_id": tokenizer.sot_id,
                                  "eot_id": tokenizer.eot_id}
    return described


# ------------------------------------------------------------------------------------------ export


def check_opset(opset: int | None) -> None:
    """A one-line error for an opset the dynamo exporter cannot write (its op library starts at 18)."""
    from torch.onnx import _constants

    if opset is not None and not 18 <= opset <= _constants.ONNX_MAX_OPSET:
        raise DmclipError(f"opset {opset} is outside what torch {torch.__version__} exports (18 to "
                          f"{_constants.ONNX_MAX_OPSET})", f"pass --opset between 18 and {_constants.ONNX_MAX_OPSET}, "
                                                          f"or leave it out ({_constants.ONNX_DEFAULT_OPSET})")


def _trace(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, batch: int | None,
           opset: int | None) -> None:
    """torch.onnx.export (dynamo) of ``module`` into ``path``, one file, the batch axis free when ``batch`` is None."""
    check_opset(opset)
    dynamic = {input_name: {0: torch.export.Dim("batch", min=1)}} if batch is None else None
    quiet = logging.getLogger("torch.utils.flop_counter")  # imported while tracing; warns that triton is missing
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            program = torch.onnx.export(module, (example,), input_names=[input_name], output_names=["embeddings"],
                                        dynamic_shapes=dynamic, opset_version=opset, dynamo=True, verbose=False,
                                        external_data=False)
        except DmclipError:
            raise
        except Exception as exc:  # the exporter's errors are long reports: the first line names the step
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            hint = "run with DMCLIP_DEBUG=1 for the exporter's report" + (
                "; a fixed --batch N avoids a dynamic batch axis" if batch is None else "")
            raise DmclipError(f"torch.onnx.export failed ({type(exc).__name__}: {first})", hint) from exc
        finally:
            quiet.setLevel(level)
    for warning in caught:
        log.debug("exporter: %s", warning.message)
    program.save(str(path), external_data=False)


def _difference(session, module: nn.Module, inputs: torch.Tensor, input_name: str) -> float:
    with torch.no_grad():
        expected = module(inputs).float()
    got = torch.from_numpy(session.run(None, {input_name: inputs.numpy()})[0])
    if got.shape != expected.shape:
        raise DmclipError(f"the ONNX file returns {tuple(got.shape)} where PyTorch returns {tuple(expected.shape)}",
                          "export a fixed batch with --batch N")
    return float((got - expected).abs().max())


def export_tower(model: nn.Module, tower: str, directory: Path, *, batch: int | None = None,
                 opset: int | None = None, tolerance: float = TOLERANCE, source: str = "",
                 versions: dict | None = None) -> dict:
    """Trace one tower of ``model`` into ``directory/<tower>_encoder.onnx`` and check it; return its description.

    ``batch`` None exports a dynamic batch axis (checked at batch 1 and 4); an int fixes it (checked at it).
    Raises DmclipError when tracing fails or onnxruntime's output differs from PyTorch's by more than ``tolerance``.
    """
    import onnx

    from dmclip.models.mamba import scan_backend

    versions = versions or require_onnx()
    module = (ImageTower(model) if tower == "image" else TextTower(model)).eval()
    input_name = "images" if tower == "image" else "tokens"
    checked = DYNAMIC_CHECK_BATCHES if batch is None else (batch,)
    path = directory / f"{tower}_encoder.onnx"
    start = time.perf_counter()
    with scan_backend(model, "reference") as mamba_towers, torch.no_grad():
        _trace(module, example_inputs(model, tower, batch or TRACE_BATCH), path, input_name, batch, opset)
    export_seconds = time.perf_counter() - start
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    session = onnx_session(path)
    differences = {b: _difference(session, module, example_inputs(model, tower, b), input_name) for b in checked}
    worst = max(differences.values())
    if not worst <= tolerance:  # NaN fails too
        raise DmclipError(f"the ONNX {tower} tower differs from PyTorch by {worst:.3g} (max abs, batch "
                          f"{max(differences, key=differences.get)}), more than {tolerance:g}; nothing was written",
                          "report it with the model reference; another --opset may export it differently")
    axis = "batch" if batch is None else batch
    if tower == "image":
        inputs = {"name": input_name, "shape": [axis, 3, int(model.image_size), int(model.image_size)],
                  "dtype": "float32", "layout": "NCHW, RGB, values in [0, 1]"}
        norm = {**(normalisation(model) or {}), "applied": "inside the graph: feed [0, 1] RGB, do not normalise again"}
    else:
        inputs, norm = {**_text_input(model), "shape": [axis, int(model.context_length)]}, None
    return {
        "format": FORMAT, "version": 1, "tower": tower, "onnx": path.name, "source": source,
        "input": inputs, "normalisation": norm,
        "output": {"name": "embeddings", "shape": [axis, _embed_dim(model)], "dtype": "float32",
                   "normalised": False, "note": "L2-normalise before cosine similarity"},
        "embed_dim": _embed_dim(model),
        "batch": "dynamic" if batch is None else batch,
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "check": {"max_abs_diff": worst, "per_batch": {str(b): d for b, d in differences.items()},
                  "tolerance": tolerance,
                  "against": "PyTorch with the model's own scan backend" if mamba_towers else "PyTorch",
                  "input": "torch.rand seeded 0" if tower == "image" else "fixed captions, tokenized"},
        "scan_backend_traced": "reference" if mamba_towers else None,
        "export_seconds": round(export_seconds, 1),
        "versions": {"torch": torch.__version__, **versions},
    }


def export_model(ref: str, out: str | Path, *, towers: Sequence[str] = ("image",), batch: int | None = None,
                 opset: int | None = None, tolerance: float = TOLERANCE, model: nn.Module | None = None,
                 on_step: Callable[[str], None] | None = None) -> dict:
    """Export the towers of the model ``ref`` names (any reference ``dmclip eval`` takes) into ``out``.

    Returns ``{"source": ref, "out": dir, "towers": {tower: the JSON written beside its .onnx, plus path, json,
    bytes}}``. Files appear only once every tower asked for has passed its check. ``model`` skips loading (for a
    caller that holds the model already; ``ref`` then only names it in the JSON); ``on_step(name)`` is called
    with ``load``, then each tower's name, as the work starts. Bad options fail before the model loads.
    """
    from dmclip.runs import atomic_write_json

    versions = require_onnx()
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers:
        raise DmclipError(f"unknown tower {unknown[0] if unknown else 'none'!r}", "towers are image and text")
    if batch is not None and batch < 1:
        raise DmclipError(f"batch {batch} is not a batch size",
                          "pass --batch N with N >= 1, or leave it out for a dynamic batch axis")
    check_opset(opset)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DmclipError(f"--out {out} is a file", "pass a directory (it is created if missing)")
    for tower in towers:
        for suffix in (".onnx", ".json"):
            if (out / f"{tower}_encoder{suffix}").exists():
                raise DmclipError(f"{out / f'{tower}_encoder{suffix}'} already exists",
                                  "choose another --out, or remove the old export first")
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
            described[tower] = export_tower(model, tower, work, batch=batch, opset=opset, tolerance=tolerance,
                                            source=ref, versions=versions)
        result = {"source": ref, "out": str(out), "towers": {}}
        for tower, info in described.items():
            path = out / info["onnx"]
            os.replace(work / info["onnx"], path)
            atomic_write_json(path.with_suffix(".json"), info)
            result["towers"][tower] = {**info, "path": str(path), "json": str(path.with_suffix(".json")),
                                       "bytes": path.stat().st_size}
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(out.iterdir()):  # a refused export leaves no empty directory behind either
            out.rmdir()

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

import contextlib
import dataclasses
import importlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from dmclip.errors import DmclipError, did_you_mean

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # max abs difference allowed between the exported file's and PyTorch's embeddings
DYNAMIC_CHECK_BATCHES = (1, 4)  # a dynamic batch axis is checked at two sizes with the one file
TRACE_BATCH = 2  # torch.export specialises a dimension of size 1: trace a free batch axis at 2
CHECK_SEED = 0
CHECK_CAPTIONS = ("a photo of a small red circle on the left", "two blue squares", "a large green triangle",
                  "a yellow star at the bottom right")
INPUT_NAMES = {"image": "images", "text": "tokens"}


# -------------------------------------------------------------------------------------- the towers and the check


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


def tower_module(model: nn.Module, tower: str) -> nn.Module:
    """``tower`` of ``model`` as a module of one tensor, in eval mode (what the exporters trace)."""
    return (ImageTower(model) if tower == "image" else TextTower(model)).eval()


def check_towers(model: nn.Module, towers: Sequence[str]) -> None:
    """A one-line error when ``model`` lacks a tower asked for (before anything is traced or written)."""
    if "image" in towers and not callable(getattr(model, "encode_image", None)) and not hasattr(model, "image_size"):
        raise DmclipError("this model has no image tower to export", "export --tower text, or use a CLIP model")
    if "text" in towers and not callable(getattr(model, "encode_text", None)):
        raise DmclipError("this model has no text tower (a bare image encoder)",
                          "export --tower image, or a CLIP model (a distill run keeps its teacher's text tower)")


def normalisation(model: nn.Module) -> dict | None:
    """The image mean/std the model applies inside its image tower (so inside the exported graph), if it has one."""
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


def describe_io(model: nn.Module, tower: str, batch: int | None) -> dict:
    """The JSON's ``input``, ``normalisation``, ``output``, ``embed_dim`` and ``batch`` for ``tower``."""
    axis = "batch" if batch is None else batch
    embed_dim = int(getattr(model, "embed_dim", 0) or 0)
    if tower == "image":
        inputs = {"name": INPUT_NAMES[tower], "shape": [axis, 3, int(model.image_size), int(model.image_size)],
                  "dtype": "float32", "layout": "NCHW, RGB, values in [0, 1]"}
        norm = {**(normalisation(model) or {}), "applied": "inside the graph: feed [0, 1] RGB, do not normalise again"}
    else:
        inputs, norm = {**_text_input(model), "shape": [axis, int(model.context_length)]}, None
    return {"input": inputs, "normalisation": norm,
            "output": {"name": "embeddings", "shape": [axis, embed_dim], "dtype": "float32", "normalised": False,
                       "note": "L2-normalise before cosine similarity"},
            "embed_dim": embed_dim, "batch": "dynamic" if batch is None else batch}


def _text_input(model: nn.Module) -> dict:
    tokenizer = getattr(model, "tokenizer", None)
    described = {"name": INPUT_NAMES["text"], "shape": ["batch", int(model.context_length)], "dtype": "int64"}
    if hasattr(tokenizer, "to_dict"):  # dmclip's tokenizer: open_clip's BPE, optionally over a compact vocabulary
        described["tokenizer"] = {"kind": "open_clip SimpleTokenizer (BPE); ids remapped to 'vocab' when given: "
                                          "pad 0, sot 1, eot 2, unk 3, then vocab[i] -> i + 4",
                                  **tokenizer.to_dict(), "pad_id": tokenizer.pad_id, "sot_id": tokenizer.sot_id,
                                  "eot_id": tokenizer.eot_id}
    return described


def check_against_pytorch(run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, tower: str,
                          batches: Sequence[int], tolerance: float, label: str, hint: str) -> dict:
    """Run the exported file (``run``: input -> embeddings) and ``model``'s ``tower`` on the check input at each
    batch size; the JSON's ``check`` (max abs difference, per batch), or a DmclipError naming the worst batch when
    it is above ``tolerance`` (``label`` names the file's format in it, ``hint`` says what to try)."""
    module = tower_module(model, tower)
    differences = {}
    for batch in batches:
        inputs = example_inputs(model, tower, batch)
        with torch.no_grad():
            expected = module(inputs).float()
            got = run(inputs)
        if got.shape != expected.shape:
            raise DmclipError(f"the {label} file returns {tuple(got.shape)} where PyTorch returns "
                              f"{tuple(expected.shape)}", "export a fixed batch with --batch N")
        differences[batch] = float((got - expected).abs().max())
    worst = max(differences.values())
    if not worst <= tolerance:  # NaN fails too
        raise DmclipError(f"the {label} {tower} tower differs from PyTorch by {worst:.3g} (max abs, batch "
                          f"{max(differences, key=differences.get)}), more than {tolerance:g}; nothing was written",
                          hint)
    return {"max_abs_diff": worst, "per_batch": {str(b): d for b, d in differences.items()}, "tolerance": tolerance,
            "input": "torch.rand seeded 0" if tower == "image" else "fixed captions, tokenized"}


@contextlib.contextmanager
def exporter_errors(exporter: str, batch: int | None) -> Iterator[None]:
    """Turn an exporter's failure into one line naming its first line, and keep its warnings in the debug log."""
    quiet = logging.getLogger("torch.utils.flop_counter")  # imported while tracing; warns that triton is missing
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except DmclipError:
            raise
        except Exception as exc:  # the exporters' errors are long reports: the first line names the step
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            hint = "run with DMCLIP_DEBUG=1 for the exporter's report" + (
                "; a fixed --batch N avoids a dynamic batch axis" if batch is None else "")
            raise DmclipError(f"{exporter} failed ({type(exc).__name__}: {first})", hint) from exc
        finally:
            quiet.setLevel(level)
    for warning in caught:
        log.debug("exporter: %s", warning.message)


def check_batches(batch: int | None) -> tuple[int, ...]:
    """The batch sizes the check runs: 1 and 4 for a dynamic batch axis (one file), else the fixed size."""
    return DYNAMIC_CHECK_BATCHES if batch is None else (batch,)


def dynamic_batch(input_name: str, batch: int | None) -> dict | None:
    """torch.export's ``dynamic_shapes``: the batch axis free when ``batch`` is None, else everything fixed."""
    return {input_name: {0: torch.export.Dim("batch", min=1)}} if batch is None else None


# ---------------------------------------------------------------------------------------------------------- ONNX


ONNX_FORMAT = "dmclip-onnx"
INSTALL_HINT = "pip install -e '.[export]'"
ONNX_MISMATCH_HINT = "report it with the model reference; another --opset may export it differently"


def require_onnx() -> dict[str, str]:
    """The versions of onnx, onnxruntime and onnxscript; a one-line error naming the extra where one is missing."""
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


def check_opset(opset: int | None) -> None:
    """A one-line error for an opset the dynamo exporter cannot write (its op library starts at 18)."""
    from torch.onnx import _constants

    if opset is not None and not 18 <= opset <= _constants.ONNX_MAX_OPSET:
        raise DmclipError(f"opset {opset} is outside what torch {torch.__version__} exports (18 to "
                          f"{_constants.ONNX_MAX_OPSET})", f"pass --opset between 18 and {_constants.ONNX_MAX_OPSET}, "
                                                          f"or leave it out ({_constants.ONNX_DEFAULT_OPSET})")


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


def _trace_onnx(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, batch: int | None,
           opset: int | None) -> None:
    """torch.onnx.export (dynamo) of ``module`` into ``path``, one file, the batch axis free when ``batch`` is None."""
    check_opset(opset)
    with exporter_errors("torch.onnx.export", batch):
        program = torch.onnx.export(module, (example,), input_names=[input_name], output_names=["embeddings"],
                                    dynamic_shapes=dynamic_batch(input_name, batch), opset_version=opset,
                                    dynamo=True, verbose=False, external_data=False)
    program.save(str(path), external_data=False)


def run_onnx_file(path: Path, input_name: str):
    """The exported file as a function of one tensor, run by onnxruntime (what the check compares)."""
    session = onnx_session(path)
    return lambda inputs: torch.from_numpy(session.run(None, {input_name: inputs.numpy()})[0])


def export_onnx_tower(model: nn.Module, tower: str, directory: Path, *, batch: int | None = None,
                      opset: int | None = None, tolerance: float = TOLERANCE, source: str = "",
                      versions: dict | None = None) -> dict:
    """Trace one tower of ``model`` into ``directory/<tower>_encoder.onnx`` and check it; return its description.

    ``batch`` None exports a dynamic batch axis (checked at batch 1 and 4); an int fixes it (checked at it).
    Raises DmclipError when tracing fails or onnxruntime's output differs from PyTorch's by more than ``tolerance``.
    """
    import onnx

    from dmclip.models.mamba import scan_backend

    versions = versions or require_onnx()
    input_name = INPUT_NAMES[tower]
    path = directory / f"{tower}_encoder.onnx"
    start = time.perf_counter()
    with scan_backend(model, "reference") as mamba_towers, torch.no_grad():
        _trace_onnx(tower_module(model, tower), example_inputs(model, tower, batch or TRACE_BATCH), path, input_name,
               batch, opset)
    export_seconds = time.perf_counter() - start
    if mamba_towers and tower == "image":
        log.warning("the ONNX Vision-Mamba tower runs its selective scan as per-token ONNX ops (the demo student: "
                    "about 20-50x slower than PyTorch's fused kernel); --format pt2 keeps the kernel")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    check = check_against_pytorch(run_onnx_file(path, input_name), model, tower, check_batches(batch), tolerance, "ONNX",
                                  ONNX_MISMATCH_HINT)
    return {
        "format": ONNX_FORMAT, "version": 1, "tower": tower, "onnx": path.name, "files": [path.name], "source": source,
        **describe_io(model, tower, batch),
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "check": {**check, "against": "PyTorch with the model's own scan backend" if mamba_towers else "PyTorch"},
        "scan_backend_traced": "reference" if mamba_towers else None,
        "export_seconds": round(export_seconds, 1),
        "versions": {"torch": torch.__version__, **versions},
    }


# ----------------------------------------------------------------------------------------------------------- pt2


PT2_FORMAT = "dmclip-pt2"
LIBRARY_SUFFIX = "_ops.so"
PT2_MISMATCH_HINT = "report it with the model reference; --format onnx exports it another way"


def check_pt2_options(opset: int | None) -> None:
    """A one-line error for an option that only the ONNX format takes."""
    if opset is not None:
        raise DmclipError("--opset is an ONNX option", "leave --opset out with --format pt2")


@contextlib.contextmanager
def fused_scan(model: nn.Module, tower: str) -> Iterator[list]:
    """Every Vision-Mamba of an image tower on the fused ``cpu`` scan for the block (its stack then traces as one
    operator); yields those Vision-Mambas. A one-line error where the kernel is not built."""
    from dmclip.models.mamba import VisionMamba, scan_backend
    from dmclip.models.scan_ext import cpu_extension

    if tower != "image" or not any(isinstance(module, VisionMamba) for module in model.modules()):
        yield []
        return
    if cpu_extension() is None:
        from dmclip.models.scan_build import extension_error

        raise DmclipError(f"--format pt2 runs Vision-Mamba blocks on the fused CPU scan, which is not built here "
                          f"({extension_error()})",
                          "run `python -m dmclip.models.scan_build` to see why, or export --format onnx")
    with scan_backend(model, "cpu") as towers:
        yield towers


def custom_operators(program: torch.export.ExportedProgram) -> list[str]:
    """The dmclip operators the program calls: each needs the library loaded."""
    return sorted({node.target.name() for node in program.graph.nodes
                   if node.op == "call_function" and getattr(node.target, "namespace", None) == "dmclip"})


def without_unused_weights(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` without the parameters and buffers its graph never reads. torch.export keeps every weight of
    the traced module, so one tower's program would otherwise carry the other tower's weights too (a distilled
    student's file, its teacher's text tower)."""
    from torch.export.graph_signature import ExportGraphSignature, InputKind

    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    specs = program.graph_signature.input_specs
    unused = {spec.arg.name for spec in specs
              if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and not placeholders[spec.arg.name].users}
    if not unused:
        return program
    module = program.graph_module
    for name in unused:
        module.graph.erase_node(placeholders[name])
    module.recompile()
    kept = [spec for spec in specs if spec.arg.name not in unused]
    targets = {spec.target for spec in kept}  # a non-persistent buffer is among the constants
    return torch.export.ExportedProgram(
        root=module, graph=module.graph,
        graph_signature=ExportGraphSignature(input_specs=kept, output_specs=program.graph_signature.output_specs),
        state_dict={name: value for name, value in program.state_dict.items() if name in targets},
        range_constraints=program.range_constraints, module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs, verifiers=program.verifiers,
        constants={name: value for name, value in program.constants.items() if name in targets})


def _trace_pt2(model: nn.Module, tower: str, batch: int | None) -> torch.export.ExportedProgram:
    """torch.export of ``tower``, the batch axis free when ``batch`` is None, without the weights it never reads."""
    example = example_inputs(model, tower, batch or TRACE_BATCH)
    with exporter_errors("torch.export.export", batch), torch.no_grad():
        program = torch.export.export(tower_module(model, tower), (example,), strict=False,
                                      dynamic_shapes=dynamic_batch(INPUT_NAMES[tower], batch))
    return without_unused_weights(program)


def load_program(path: Path):
    """The saved program as a function of one tensor, as a user's script loads it (what the check compares)."""
    return torch.export.load(str(path)).module()


def usage(program: str, library: str | None, tower: str) -> list[str]:
    """The lines of Python that run the export from its directory, without dmclip (the JSON's ``python``)."""
    name = INPUT_NAMES[tower]
    shape = "(batch, 3, S, S) float32 RGB in [0, 1]" if tower == "image" else "(batch, context_length) int64"
    lines = ["import torch"]
    if library:
        lines.append(f"torch.ops.load_library('{library}')  # the fused scan, as torch.ops.dmclip.*")
    return [*lines, f"encoder = torch.export.load('{program}').module()", "with torch.inference_mode():",
            f"    embeddings = encoder({name})  # {name}: {shape}"]


def requirements(library: str | None) -> dict:
    """Where the export runs (the JSON's ``requires``)."""
    if library is None:
        return {"torch": torch.__version__, "note": "standard PyTorch operators only: tested with this torch "
                                                    "version; torch.export.load may refuse another"}
    return {"torch": torch.__version__, "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "os": platform.system(),
            "cpu": f"any {platform.machine()} CPU (the kernels choose their instruction set when the library loads)",
            "note": f"{library} is compiled against this torch's C++ ABI and is a CPython extension module: load it "
                    "with the same torch version and Python minor version, on the same OS and CPU family"}


def export_pt2_tower(model: nn.Module, tower: str, directory: Path, *, batch: int | None = None,
                     opset: int | None = None, tolerance: float = TOLERANCE, source: str = "",
                     versions: dict | None = None) -> dict:
    """Export one tower of ``model`` into ``directory/<tower>_encoder.pt2`` (+ ``_ops.so`` where its graph calls the
    fused kernel) and check the saved program; return its description.

    ``batch`` None exports a dynamic batch axis (checked at batch 1 and 4); an int fixes it (checked at it).
    Raises DmclipError when tracing fails or the program's output differs from PyTorch's by more than ``tolerance``.
    """
    from dmclip.models.scan_ext import cpu_extension

    check_pt2_options(opset)
    path = directory / f"{tower}_encoder.pt2"
    start = time.perf_counter()
    with fused_scan(model, tower) as mamba_towers:
        program = _trace_pt2(model, tower, batch)
    torch.export.save(program, str(path))
    export_seconds = time.perf_counter() - start
    operators = custom_operators(program)
    library = f"{tower}_encoder{LIBRARY_SUFFIX}" if operators else None
    if library:
        shutil.copyfile(cpu_extension().__file__, directory / library)
    check = check_against_pytorch(load_program(path), model, tower, check_batches(batch), tolerance, "pt2",
                                  PT2_MISMATCH_HINT)
    return {
        "format": PT2_FORMAT, "version": 1, "tower": tower, "pt2": path.name, "library": library,
        "files": [path.name, *([library] if library else [])], "source": source,
        **describe_io(model, tower, batch),
        "check": {**check, "against": "PyTorch with the model's own scan backend" if mamba_towers else "PyTorch"},
        "operators": operators,
        "python": usage(path.name, library, tower),
        "requires": requirements(library),
        "export_seconds": round(export_seconds, 1),
        "versions": {"torch": torch.__version__, "python": platform.python_version(), **(versions or {})},
    }


# -------------------------------------------------------------------------------------------------------- export


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

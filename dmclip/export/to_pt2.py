"""``--format pt2``: each tower traced by ``torch.export``, the Vision-Mamba block stack one operator of the fused
kernel whose library is copied beside the program, checked against PyTorch."""

from __future__ import annotations

import contextlib
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dmclip.errors import DmclipError
from dmclip.export.towers import (
    INPUT_NAMES,
    TOLERANCE,
    TRACE_BATCH,
    check_against_pytorch,
    check_batches,
    describe_io,
    dynamic_batch,
    example_inputs,
    exporter_errors,
    tower_module,
)

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

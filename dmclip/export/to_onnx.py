"""``--format onnx``: each tower traced by ``torch.onnx.export(..., dynamo=True)`` into standard ONNX ops that
onnxruntime runs, checked against PyTorch."""

from __future__ import annotations

import importlib
import logging
import time
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

log = logging.getLogger(__name__)

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

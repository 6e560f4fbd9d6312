"""`dmclip export`: the demo student's image encoder in each exported form against PyTorch, on the CPU.

The model is the demo's student size (mamba-nano: width 64, depth 4, 32 px, patch 4 -> 65 tokens, embed 128,
random weights), exported with ``dmclip.export.export_model`` (the command's own path, checked against
PyTorch to 1e-4) in both formats: ``onnx`` (dynamo export with the reference scan, run by onnxruntime's CPU
provider, intra-op threads = the row's thread count, no spinning) and ``pt2`` (torch.export with the fused
kernel's operator, run as a user's script runs it: its library loaded with ``torch.ops.load_library``, the
program with ``torch.export.load(...).module()``, under ``torch.inference_mode``). PyTorch is the model as a
user runs it (torch.inference_mode, the fused ``cpu`` scan where it built). The three are timed in
alternation in one process, at batch 1 and 64, at 1 thread and at the run's default count (when that is more
than 1). Ratio = PyTorch time / the form's time (> 1: the form is faster); the goal for pt2 is >= 0.5x (at
most twice PyTorch's time), ONNX has none (recorded). The export's own time and the size of its files are
one row per format.

    python -m benchmarks.run_all --only export
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.common import format_seconds, interleaved, repeats, row, threads

DEMO_STUDENT = {"image_size": 32, "patch_size": 4, "width": 64, "depth": 4, "embed_dim": 128}
BATCHES = (1, 64)
FORMATS = ("onnx", "pt2")
PT2_GOAL = 0.5  # the exported program at least half as fast as PyTorch
RUNS_WITH = {"onnx": "onnxruntime CPU provider, {count} intra-op thread(s), no spinning",
             "pt2": "torch.export.load(...).module() + the kernel's library, {count} torch thread(s)"}


def _pt2_program(info: dict):
    """The program as the script in its JSON runs it (the library is the operator's; dmclip's own copy, loaded
    already in this process, keeps serving it)."""
    directory = Path(info["path"]).parent
    if info["library"]:
        torch.ops.load_library(str(directory / info["library"]))
    return torch.export.load(info["path"]).module()


def _export_rows(exported: dict) -> list[dict]:
    rows = []
    for name, info in exported.items():
        what = f"opset {info['opset']}" if name == "onnx" else f"files: {', '.join(info['files'])}"
        rows.append(row(f"mamba-nano image tower -> {name} (dmclip export --format {name}, 65 tokens, dynamic batch)",
                        f"{info['export_seconds']:.1f} s", threads=torch.get_num_threads(),
                        notes=f"{info['bytes'] / 1e6:.1f} MB, {what}, max |diff| vs PyTorch "
                              f"{info['check']['max_abs_diff']:.2g} (batch 1, 4)"))
    return rows


def _timed_rows(model, exported: dict, count: int, scan: str) -> list[dict]:
    from dmclip.export.to_onnx import onnx_session

    # no spinning: onnxruntime's idle threads would otherwise busy-wait after each run and take the cores from
    # the call timed next to it (and from the benches after this one)
    session = onnx_session(exported["onnx"]["path"], threads=count, spinning=False)
    program = _pt2_program(exported["pt2"])
    rows = []
    for batch in BATCHES:
        images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        feed = {"images": images.numpy()}

        def pytorch(images=images):
            with torch.inference_mode():
                model(images)

        def pt2(images=images):
            with torch.inference_mode():
                program(images)

        times = interleaved({"pytorch": pytorch, "onnx": lambda feed=feed: session.run(None, feed), "pt2": pt2},
                            repeats=repeats(20 if batch == 1 else 7), warmup=2, number=5 if batch == 1 else 1)
        for name in FORMATS:
            ratio = times["pytorch"] / times[name]
            goal = name == "pt2"
            rows.append(row(f"mamba-nano image encoder, batch {batch}: {name} vs PyTorch", format_seconds(times[name]),
                            threads=count, baseline=f"PyTorch, {scan} scan ({format_seconds(times['pytorch'])})",
                            ratio=round(ratio, 2), goal=f">= {PT2_GOAL:g}x" if goal else "",
                            met=ratio >= PT2_GOAL if goal else None,
                            notes=f"{RUNS_WITH[name].format(count=count)}; ratio > 1: {name} faster"
                                  + ("" if goal else "; no goal, recorded")))
    return rows


def main() -> list[dict]:
    from dmclip.export import export_model
    from dmclip.models.mamba import VisionMamba
    from dmclip.models.scan import resolve_backend

    torch.manual_seed(0)
    model = VisionMamba(**DEMO_STUDENT).eval()
    scan = resolve_backend("auto", torch.zeros(1))
    with tempfile.TemporaryDirectory() as tmp:
        exported = {name: export_model("mamba-nano (random weights)", Path(tmp) / name, model=model,
                                       format=name)["towers"]["image"] for name in FORMATS}
        rows = _export_rows(exported)
        for count in sorted({1, torch.get_num_threads()}):
            with threads(count):
                rows += _timed_rows(model, exported, count, scan)
    return rows


if __name__ == "__main__":
    for item in main():
        print(f"| {item['benchmark']} | {item['value']} | {item['threads']} | {item['baseline']} | {item['ratio']} |")

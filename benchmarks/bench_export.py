"""`dmclip export`: the demo student's image encoder in onnxruntime vs in PyTorch, on the CPU.

The model is the demo's student size (mamba-nano: width 64, depth 4, 32 px, patch 4 -> 65 tokens, embed 128,
random weights), exported with ``dmclip.export.export_model`` (the command's own path: dynamo export with the
reference scan, checked against PyTorch to 1e-4). Timed in alternation in one process, at batch 1 and 64:
PyTorch as a user runs the model (torch.inference_mode, the fused ``cpu`` scan where it built) against
onnxruntime's CPU provider on the exported file (intra-op threads = the row's thread count). Rows at 1 thread
and at the run's default count (when that is more than 1). Ratio = PyTorch time / onnxruntime time
(> 1: onnxruntime is faster). The export's own time and the file size are one more row.

    python -m benchmarks.run_all --only export
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.common import format_seconds, interleaved, repeats, row, threads

DEMO_STUDENT = {"image_size": 32, "patch_size": 4, "width": 64, "depth": 4, "embed_dim": 128}
BATCHES = (1, 64)


def main() -> list[dict]:
    from dmclip.export import export_model, onnx_session
    from dmclip.models.mamba import VisionMamba
    from dmclip.models.scan import resolve_backend

    torch.manual_seed(0)
    model = VisionMamba(**DEMO_STUDENT).eval()
    scan = resolve_backend("auto", torch.zeros(1))
    counts = sorted({1, torch.get_num_threads()})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        result = export_model("mamba-nano (random weights)", Path(tmp), model=model)["towers"]["image"]
        rows.append(row("mamba-nano image tower -> ONNX (dmclip export, 65 tokens, dynamic batch)",
                        f"{result['export_seconds']:.1f} s", threads=torch.get_num_threads(),
                        notes=f"{result['bytes'] / 1e6:.1f} MB, opset {result['opset']}, max |diff| vs PyTorch "
                              f"{result['check']['max_abs_diff']:.2g} (batch 1, 4)"))
        for count in counts:
            with threads(count):
                # no spinning: onnxruntime's idle threads would otherwise busy-wait after each run and take
                # the cores from the PyTorch call timed next to it (and from the benches after this one)
                session = onnx_session(result["path"], threads=count, spinning=False)
                for batch in BATCHES:
                    images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
                    feed = {"images": images.numpy()}

                    def pytorch(images=images):
                        with torch.inference_mode():
                            model(images)

                    def onnx(feed=feed, session=session):
                        session.run(None, feed)

                    times = interleaved({"pytorch": pytorch, "onnxruntime": onnx},
                                        repeats=repeats(20 if batch == 1 else 7), warmup=2,
                                        number=5 if batch == 1 else 1)
                    ratio = times["pytorch"] / times["onnxruntime"]
                    rows.append(row(f"mamba-nano image encoder, batch {batch}: onnxruntime vs PyTorch",
                                    format_seconds(times["onnxruntime"]), threads=count,
                                    baseline=f"PyTorch, {scan} scan ({format_seconds(times['pytorch'])})",
                                    ratio=round(ratio, 2),
                                    notes=f"onnxruntime CPU provider, {count} intra-op thread(s), no spinning; ratio > 1: "
                                          "onnxruntime faster; no goal, recorded"))
    return rows


if __name__ == "__main__":
    for item in main():
        print(f"| {item['benchmark']} | {item['value']} | {item['threads']} | {item['baseline']} | {item['ratio']} |")

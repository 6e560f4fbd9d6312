"""`dmclip export`: a model's image tower (and text tower) as ONNX (the library part is dmclip.export)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmclip.cli.common import console, err_console, largest_unit, metrics_table

STEPS = {"load": "loading the model", "image": "exporting the image tower (dynamo) and checking it with onnxruntime",
         "text": "exporting the text tower (dynamo) and checking it with onnxruntime"}


def _size(count: int) -> str:
    value, unit = largest_unit(count, (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1)))
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        model: Annotated[str, typer.Argument(
            help="Model: a run directory, run:<run dir>, builtin:<name>, open_clip:<arch>:<weights> or a "
                 "registered name (what `dmclip eval --model` takes).", show_default=False)],
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write <tower>_encoder.onnx and "
                                                              ".json into (created if missing).",
                                          show_default=False)],
        tower: Annotated[str, typer.Option("--tower", help="image, text or both.")] = "image",
        batch: Annotated[int | None, typer.Option(
            "--batch", help="Fix the batch size to N \\[default: a dynamic batch axis, checked at batch 1 and 4].",
            min=1, show_default=False)] = None,
        opset: Annotated[int | None, typer.Option(
            "--opset", help="ONNX opset, 18 or more \\[default: the exporter's, 20 with torch 2.14].", show_default=False)] = None,
    ) -> None:
        """Write a model's image (and text) tower as ONNX, checked against PyTorch.

        The image file takes RGB images in \\[0, 1] (the normalisation is inside) and returns unnormalised embeddings.

        A JSON beside each file records the input shape, mean/std, embed dim, the difference measured and the versions.

        An export whose onnxruntime output differs from PyTorch by more than 1e-4 is refused; nothing is written.

        Needs pip install 'dmclip\\[export]'.

        Example: dmclip export run:runs/distill/<run> --out exported/student

        Both towers, a fixed batch of 8: dmclip export builtin:world-vit --out exported/teacher --tower both --batch 8
        """
        from rich.markup import escape

        from dmclip.export import export_model, parse_towers, require_onnx

        towers = parse_towers(tower)
        require_onnx()  # a missing package fails before the model loads
        with err_console.status("") as status:
            result = export_model(model, out, towers=towers, batch=batch, opset=opset,
                                  on_step=lambda name: status.update(f"{STEPS[name]} ..."))
        towers_done = result["towers"]
        first = next(iter(towers_done.values()))
        fields = {
            "input": lambda i: f"{i['input']['name']} {i['input']['dtype']} ({', '.join(map(str, i['input']['shape']))})",
            "output": lambda i: f"embeddings ({', '.join(map(str, i['output']['shape']))})",
            "file size": lambda i: _size(i["bytes"]),
            "max |Δ| vs PyTorch": lambda i: f"{i['check']['max_abs_diff']:.2g} (batch {', '.join(i['check']['per_batch'])})",
            "export time": lambda i: f"{i['export_seconds']:.1f} s",
        }
        rows = [{"": label, **{name: fn(info) for name, info in towers_done.items()}} for label, fn in fields.items()]
        console.print(metrics_table(f"export · {escape(model)} · opset {first['opset']}, batch {first['batch']}", rows))
        for info in towers_done.values():
            console.print(f"wrote {escape(info['path'])} and {escape(Path(info['json']).name)}", highlight=False,
                          soft_wrap=True)
        console.print(f"[dim]the JSON says how to run it without dmclip (input, normalisation, embedding); "
                      f"checked with onnxruntime to {first['check']['tolerance']:g}[/dim]", highlight=False,
                      soft_wrap=True)

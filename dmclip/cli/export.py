"""`dmclip export`: a model's image tower (and text tower) as ONNX or a PyTorch program (the library part is
dmclip.export)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmclip.cli.common import console, err_console, largest_unit, metrics_table

CHECKED_WITH = {"onnx": "onnxruntime", "pt2": "torch.export.load"}


def _step(name: str, format: str) -> str:
    if name == "load":
        return "loading the model"
    return f"exporting the {name} tower ({format}) and checking it with {CHECKED_WITH[format]}"


def _size(count: int) -> str:
    value, unit = largest_unit(count, (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1)))
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        model: Annotated[str, typer.Argument(
            help="Model: a run directory, run:<run dir>, builtin:<name>, open_clip:<arch>:<weights> or a "
                 "registered name (what `dmclip eval --model` takes).", show_default=False)],
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write <tower>_encoder.onnx (or .pt2) and "
                                                              ".json into (created if missing).",
                                          show_default=False)],
        tower: Annotated[str, typer.Option("--tower", help="image, text or both.")] = "image",
        format: Annotated[str, typer.Option(
            "--format", help="onnx: standard ONNX ops for onnxruntime, portable (a Vision-Mamba's scan unrolled, "
                             "about 20-50x slower); pt2: a torch.export program that keeps the fused scan kernel (its "
                             "library written beside it), as fast as PyTorch, for the same torch, Python, OS and CPU "
                             "family.")] = "onnx",
        batch: Annotated[int | None, typer.Option(
            "--batch", help="Fix the batch size to N \\[default: a dynamic batch axis, checked at batch 1 and 4].",
            min=1, show_default=False)] = None,
        opset: Annotated[int | None, typer.Option(
            "--opset", help="ONNX opset, 18 or more \\[default: the exporter's, 20 with torch 2.14].", show_default=False)] = None,
    ) -> None:
        """Write a model's towers as ONNX or a PyTorch program, checked against PyTorch.

        The image file takes RGB images in \\[0, 1] (the normalisation is inside) and returns unnormalised embeddings.

        A JSON beside each file records the input shape, mean/std, embed dim, the difference measured, the files it
        needs and the versions; for pt2 also the lines of Python that run it without dmclip.

        An export whose output differs from PyTorch by more than 1e-4 is refused; nothing is written.

        ONNX needs pip install -e '.\\[export]'; pt2 needs only torch (and, for a Vision-Mamba, the fused scan).

        Example: dmclip export run:runs/distill/<run> --out exported/student

        Fast on the CPU, without dmclip: dmclip export run:runs/distill/<run> --out exported/fast --format pt2

        Both towers, a fixed batch of 8: dmclip export builtin:world-vit --out exported/teacher --tower both --batch 8
        """
        from dmclip.export import export_format, export_model, parse_towers

        towers = parse_towers(tower)
        export_format(format).require()  # a missing package fails before the model loads
        with err_console.status("") as status:
            result = export_model(model, out, towers=towers, format=format, batch=batch, opset=opset,
                                  on_step=lambda name: status.update(f"{_step(name, format)} ..."))
        _print_result(result, model)


FIELDS = {
    "input": lambda i: f"{i['input']['name']} {i['input']['dtype']} ({', '.join(map(str, i['input']['shape']))})",
    "output": lambda i: f"embeddings ({', '.join(map(str, i['output']['shape']))})",
    "files": lambda i: ", ".join(i["files"]),
    "size": lambda i: _size(i["bytes"]),
    "max |Δ| vs PyTorch": lambda i: f"{i['check']['max_abs_diff']:.2g} (batch {', '.join(i['check']['per_batch'])})",
    "export time": lambda i: f"{i['export_seconds']:.1f} s",
}


def _print_result(result: dict, model: str) -> None:
    from rich.markup import escape

    towers = result["towers"]
    first = next(iter(towers.values()))
    rows = [{"": label, **{name: fn(info) for name, info in towers.items()}} for label, fn in FIELDS.items()]
    kind = (f"ONNX opset {first['opset']}" if result["format"] == "onnx"
            else f"pt2, torch {first['versions']['torch']}")
    console.print(metrics_table(f"export · {escape(model)} · {kind}, batch {first['batch']}", rows))
    for info in towers.values():
        console.print(f"wrote {escape(', '.join(info['files']))} and {escape(Path(info['json']).name)} in "
                      f"{escape(result['out'])}", highlight=False, soft_wrap=True)
    how = ("input, normalisation, embedding" if result["format"] == "onnx"
           else "its `python` lines: torch and the files beside it, no dmclip")
    console.print(f"[dim]the JSON says how to run it without dmclip ({how}); checked with "
                  f"{CHECKED_WITH[result['format']]} to {first['check']['tolerance']:g}[/dim]", highlight=False,
                  soft_wrap=True)
    libraries = [info for info in towers.values() if info.get("library")]
    if libraries:
        needs = libraries[0]["requires"]
        console.print(f"[dim]{escape(libraries[0]['library'])} loads with torch {needs['torch']}, Python "
                      f"{needs['python']}, on {needs['os']} {escape(needs['cpu'])}[/dim]", highlight=False,
                      soft_wrap=True)

"""`dmclip data`: export splits to real formats, draw sample grids."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmclip.cli.common import console

data_app = typer.Typer(help="Export datasets and draw sample grids.\n\nExample: dmclip data show world-train -o grid.png",
                       no_args_is_help=True)

SpecArg = Annotated[str, typer.Argument(
    help="Dataset spec: a registered name (world-train:size=2000) or a format (csv:PATH, wds:PATH, coco:JSON, "
         "imagefolder:DIR, hf:PATH, fashion-mnist).", show_default=False)]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="Square image size in pixels \\[default: 64].")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Generator seed of a world split \\[default: 0].")]


def register(app: typer.Typer) -> None:
    @data_app.command("export")
    def export_command(
        spec: SpecArg,
        out: Annotated[Path, typer.Argument(help="Output directory (new or empty).", show_default=False)],
        format: Annotated[str, typer.Option("--format", "-f", help="webdataset | csv | coco | imagefolder")] = "webdataset",
        image_format: Annotated[str, typer.Option("--image-format", help="png (exact pixels) or jpg (lossy).")] = "png",
        shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per webdataset shard.", min=1)] = 1000,
        limit: Annotated[int | None, typer.Option("--limit", help="Export only the first N samples.", min=1)] = None,
        image_size: ImageSizeOpt = None,
        seed: SeedOpt = None,
    ) -> None:
        """Write a dataset as webdataset shards, CSV + images, COCO captions JSON or an ImageFolder.

        Example: dmclip data export world-retrieval-a --format coco out/retrieval-a
        """
        from dmclip.data import build_dataset, export

        ds = build_dataset(spec, image_size=image_size, seed=seed)
        result = export(ds, format, out, image_format=image_format, shard_size=shard_size, limit=limit)
        skipped = sum(result["skipped"].values())
        console.print(f"wrote {result['samples']} samples of {ds.name} as {format} to {result['path']} "
                      f"({', '.join(result['files'][:4])})" + (f"; skipped {skipped} bad" if skipped else ""),
                      highlight=False, soft_wrap=True)

    @data_app.command("show")
    def show_command(
        spec: SpecArg,
        n: Annotated[int, typer.Option("--n", "-n", help="How many samples to draw.", min=1, max=256)] = 16,
        output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")] = Path("grid.png"),
        columns: Annotated[int | None, typer.Option("--columns", help="Images per row \\[default: up to 8].",
                                                       min=1)] = None,
        sample_seed: Annotated[int | None, typer.Option(
            "--sample-seed", help="Draw a random n (with this seed) instead of the first n.")] = None,
        image_size: ImageSizeOpt = None,
        seed: SeedOpt = None,
    ) -> None:
        """Draw a grid of images with their first caption (or class name) into a PNG.

        Example: dmclip data show world-noisy --n 16 -o noisy.png
        """
        from dmclip.data import build_dataset, draw_grid

        ds = build_dataset(spec, image_size=image_size, seed=seed)
        result = draw_grid(ds, output, n=n, columns=columns, seed=sample_seed)
        console.print(f"wrote {output} ({len(result['samples'])} samples of {ds.name}, {len(ds)} in all)",
                      highlight=False, soft_wrap=True)

    app.add_typer(data_app, name="data")

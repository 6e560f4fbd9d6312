"""`dmclip reinforce`: a reinforced store of a teacher's outputs, for `dmclip distill --teacher store:<dir>`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmclip.cli.common import console, metrics_table


def register(app: typer.Typer) -> None:
    @app.command("reinforce")
    def reinforce(
        teacher: Annotated[str, typer.Option(
            "--teacher", "-t", help="The teacher: builtin:world-vit, run:<dir>, open_clip:<arch>:<weights>, or "
                                    "'latest' CLIP pretrain run under $DMCLIP_RUNS or ./runs.",
            show_default=False)],
        data: Annotated[str, typer.Option("--data", "-d", help="Image-text set to run it over.",
                                          show_default=False)],
        out: Annotated[Path, typer.Option("--out", "-o", help="The store directory (a rerun with the same one "
                                                              "continues it).", show_default=False)],
        augmentations: Annotated[int, typer.Option(
            "--augmentations", help="Teacher views per image (the first is the full image).", min=1)] = 4,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the views' random crops.", min=0)] = 0,
    ) -> None:
        """Cache a teacher's outputs over a dataset (a reinforced store) for `dmclip distill`.

        The teacher runs once: its image embeddings of K views per image and its text embeddings of every
        caption (DataCompDR's reinforced data) are stored, so that distill need not run it.

        Example:

          dmclip reinforce --teacher builtin:world-vit --data world-train --out stores/teacher-k4

          dmclip distill --teacher store:stores/teacher-k4   (then train from it)
        """
        import time

        from dmclip.distill.reinforce import build_store
        from dmclip.models.teachers import resolve_teacher_ref
        from dmclip.runs import default_runs_root

        start = time.perf_counter()
        meta = build_store(resolve_teacher_ref(teacher, default_runs_root()), data, out, augmentations=augmentations,
                           seed=seed)
        console.print(metrics_table("reinforced store", [{
            "store": str(out), "teacher": meta["teacher"], "images": meta["count"],
            "augmentations": meta["augmentations"], "captions/image": meta["captions_per_image"],
            "seconds": time.perf_counter() - start}]))
        console.print(f"use it: dmclip distill --teacher store:{out}", soft_wrap=True)

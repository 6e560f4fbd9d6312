"""`make demo`: pretrain a small CLIP teacher (or reuse the newest one), distil it into a Vision-Mamba
student with alpha 0.75, score both zero-shot, print one table. Every step is a real `dmclip` command."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dmclip.cli.common import console, metrics_table
from dmclip.cli.main import main
from dmclip.runs import latest_run

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _step(title: str, argv: list[str]) -> None:
    console.rule(f"[bold]{title}[/bold]")
    console.print(f"$ dmclip {' '.join(argv)}", style="cyan", highlight=False)
    code = main(argv)
    if code != 0:
        sys.exit(code)


def run_demo() -> int:
    start = time.perf_counter()
    teacher = latest_run("pretrain", name="pretrain-clip-teacher")
    if teacher is None:
        _step("1/3 pretrain the CLIP teacher", ["pretrain", str(RECIPES / "pretrain-clip-teacher.yaml")])
        teacher = latest_run("pretrain", name="pretrain-clip-teacher")
    else:
        console.rule("[bold]1/3 pretrain the CLIP teacher[/bold]")
        console.print(f"reusing the completed teacher run {teacher.path} (delete it to retrain)")
    _step("2/3 distil it into a Vision-Mamba student",
          ["distill", str(RECIPES / "distill-demo.yaml"), "--alpha", "0.75", "--teacher", f"run:{teacher.path}",
           "--name", "demo-student"])
    student = latest_run("distill", name="demo-student")
    rows = []
    for label, run in (("teacher ViT", teacher), ("student Mamba a=0.75", student)):
        short = label.split()[0]
        _step(f"3/3 eval zero-shot: {label}", ["eval", "zero-shot", "--model", f"run:{run.path}",
                                               "--name", f"demo-{short}"])
        result = latest_run("eval", name=f"demo-{short}").results() or {}
        metrics = result.get("metrics", result)
        trained = run.results() or {}
        params = trained.get("image_parameters")
        if params is None and label.startswith("teacher"):  # a teacher trained before image_parameters existed
            from dmclip.models.base import count_parameters
            from dmclip.models.refs import load_model_ref

            params = count_parameters(load_model_ref(f"run:{run.path}").visual)
        rows.append({"model": label, "acc@1 %": 100 * metrics.get("acc1", float("nan")),
                     "acc@5 %": 100 * metrics.get("acc5", float("nan")),
                     "class recall %": 100 * metrics.get("mean_per_class_recall", float("nan")),
                     "image params M": params / 1e6 if params else None,
                     "train img/s": trained.get("train", {}).get("samples_per_s")})
    console.rule("[bold]results[/bold]")
    console.print(metrics_table("zero-shot on world-zeroshot (100 classes; chance: acc@1 1 %, acc@5 5 %)", rows))
    console.print(f"teacher: run:{teacher.path}\nstudent: run:{student.path}")
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())

"""`make demo`: pretrain a small CLIP teacher (or reuse the newest one), distil it into a Vision-Mamba
student with alpha 0.75, score both zero-shot, print one table. Every step is a real `dmclip` command."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dmclip.cli.common import console, metrics_table
from dmclip.cli.main import main
from dmclip.runs import find_runs

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _newest(command: str, name: str | None = None):
    for run in find_runs(None, command):
        info = run.info
        if info.get("status") == "completed" and (name is None or info.get("name") == name):
            return run
    return None


def _step(title: str, argv: list[str]) -> None:
    console.rule(f"[bold]{title}[/bold]")
    console.print(f"$ dmclip {' '.join(argv)}", style="cyan", highlight=False)
    code = main(argv)
    if code != 0:
        sys.exit(code)


def run_demo() -> int:
    start = time.perf_counter()
    teacher = _newest("pretrain", "pretrain-clip-teacher")
    if teacher is None:
        _step("1/3 pretrain the CLIP teacher", ["pretrain", str(RECIPES / "pretrain-clip-teacher.yaml")])
        teacher = _newest("pretrain", "pretrain-clip-teacher")
    else:
        console.rule("[bold]1/3 pretrain the CLIP teacher[/bold]")
        console.print(f"reusing the completed teacher run {teacher.path} (delete it to retrain)")
    _step("2/3 distil it into a Vision-Mamba student",
          ["distill", str(RECIPES / "distill-demo.yaml"), "--alpha", "0.75", "--teacher", f"run:{teacher.path}",
           "--name", "demo-student"])
    student = _newest("distill", "demo-student")
    rows = []
    for label, run in (("teacher (ViT)", teacher), ("student (Mamba, alpha 0.75)", student)):
        _step(f"3/3 eval zero-shot: {label}", ["eval", "zero-shot", "--model", f"run:{run.path}",
                                               "--name", f"demo-{label.split()[0]}"])
        result = _newest("eval", f"demo-{label.split()[0]}").results() or {}
        metrics = result.get("metrics", result)
        train = (run.results() or {}).get("train", {})
        params = (run.results() or {}).get("image_parameters") or (run.results() or {}).get("parameters")
        rows.append({"model": label, "run": run.path.name,
                     "zero-shot acc@1 %": 100 * metrics.get("acc1", float("nan")),
                     "acc@5 %": 100 * metrics.get("acc5", float("nan")),
                     "mean per-class recall %": 100 * metrics.get("mean_per_class_recall", float("nan")),
                     "train samples/s": train.get("samples_per_s"),
                     "image params (M)": params / 1e6 if params else None})
    console.rule("[bold]results[/bold]")
    console.print(metrics_table("world-zeroshot (100 classes, chance: acc@1 1 %, acc@5 5 %)", rows))
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())

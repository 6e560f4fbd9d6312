"""`make demo`: distil the shipped CLIP teacher (builtin:world-vit) into a Vision-Mamba student twice — without
KD (alpha 0) and with it (alpha 0.75), same steps, same seed — score the teacher and both students on the
eval suite and print one table with the students' difference and its interval. Every step is a real
`dmclip` command; the sweep directory it leaves holds the full tables (summary.md)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dmclip.cli.common import console, metrics_table
from dmclip.cli.main import main

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TEACHER = "builtin:world-vit"


def _step(title: str, argv: list[str]) -> None:
    console.rule(f"[bold]{title}[/bold]")
    console.print(f"$ dmclip {' '.join(argv)}", style="cyan", highlight=False)
    code = main(argv)
    if code != 0:
        sys.exit(code)


def demo_rows(summary: dict) -> list[dict]:
    """The demo's table from a sweep's summary.json: zero-shot acc@1, retrieval R@1 (mean of both directions
    on world-retrieval-a), Avg Perf, and each student's Avg Perf difference against alpha 0 with its 95 %
    bootstrap interval over evaluation items (one seed: the interval says nothing about seed-to-seed noise)."""
    rq1, stats = summary["rq1"], summary["seeds"]
    rows = []
    for row in rq1["rows"]:
        name = row["model"]
        arm = name.replace("student ", "").split(" seed=")[0] if name != "teacher" else None
        difference = stats["differences"].get(arm, {}).get("Avg Perf") if arm else None
        rows.append({
            "model": "teacher ViT" if name == "teacher" else f"Mamba {arm.replace('alpha', 'α')}",
            "zero-shot %": 100 * row["world-zeroshot acc@1"],
            "R@1 %": 50 * (row["world-retrieval-a T→I R@1"] + row["world-retrieval-a I→T R@1"]),
            "Avg Perf": 100 * row["Avg Perf"],
            "Δ vs α=0 [95% CI]": (f"{100 * difference['diff']:+.2f} [{100 * difference['low']:+.1f}, "
                                  f"{100 * difference['high']:+.1f}]" if difference else ""),
        })
    return rows


def run_demo() -> int:
    start = time.perf_counter()
    console.rule("[bold]1/2 the teacher[/bold]")
    console.print(f"{TEACHER}: a CLIP ViT shipped with dmclip (dmclip/builtin/world-vit holds its recipe and "
                  "run record; `dmclip pretrain recipes/pretrain-clip-teacher.yaml` trains it again)")
    _step("2/2 distil it into a Vision-Mamba student without KD (alpha 0) and with KD (alpha 0.75)",
          ["distill", str(RECIPES / "distill-demo.yaml"), "--alpha", "0,0.75", "--teacher", TEACHER,
           "--name", "demo"])
    from dmclip.runs import default_runs_root

    sweep = max((default_runs_root() / "distill").glob("*-sweep-demo"), key=lambda p: p.name)
    summary = json.loads((sweep / "summary.json").read_text())
    console.rule("[bold]results[/bold]")
    console.print(metrics_table("eval suite, percent (Avg Perf: mean over the suite's datasets)",
                                demo_rows(summary)))
    console.print(f"full tables: {sweep / 'summary.md'}")
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())

"""`make demo`'s driver (dmclip/demo.py). What a user would notice if it broke: the demo crashing after its
training minutes, or printing a table whose difference column does not match the sweep it ran."""

from __future__ import annotations

import json

import pytest

from dmclip import demo
from dmclip.cli.main import main

TINY_DATA = "world-train:size=96"
TINY_CLIP = [f"--set=model.{key}" for key in ("vision_width=32", "vision_depth=1", "vision_heads=2", "text_width=32",
                                              "text_depth=1", "text_heads=2", "embed_dim=32", "patch_size=8",
                                              "context_length=16")]
TINY_CLIP += ["--set=train.warmup_steps=1", "--set=train.progress=false", "--set=eval.each_run=false"]


def test_demo_rows_read_the_sweep_summary():
    columns = {"world-zeroshot acc@1": 0.5, "world-retrieval-a T→I R@1": 0.2, "world-retrieval-a I→T R@1": 0.4,
               "Avg Perf": 0.3}
    summary = {
        "rq1": {"rows": [{"model": "teacher", **columns},
                         {"model": "student alpha=0", **{k: v / 2 for k, v in columns.items()}},
                         {"model": "student alpha=0.75", **{k: v / 4 * 3 for k, v in columns.items()}}]},
        "seeds": {"baseline": "alpha=0", "differences": {"alpha=0.75": {"Avg Perf": {
            "diff": 0.075, "low": 0.05, "high": 0.1, "significant": True}}}},
    }
    rows = demo.demo_rows(summary)
    assert [r["model"] for r in rows] == ["teacher ViT", "Mamba α=0", "Mamba α=0.75"]
    assert rows[0]["zero-shot %"] == pytest.approx(50.0) and rows[0]["R@1 %"] == pytest.approx(30.0)
    assert rows[1]["Avg Perf"] == pytest.approx(15.0) and rows[1]["Δ vs α=0 [95% CI]"] == ""
    assert rows[2]["Δ vs α=0 [95% CI]"] == "+7.50 [+5.0, +10.0]"


@pytest.mark.slow
def test_demo_runs_end_to_end_at_tiny_size(tmp_path, monkeypatch, capsys):
    """The real driver with a 2-step recipe and a tiny teacher: it runs the sweep and prints the table
    from that sweep's summary (the Δ cell equals the summary's Avg Perf difference)."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("DMCLIP_RUNS", str(runs))
    assert main(["pretrain", "--data", TINY_DATA, "--steps", "2", "--batch-size", "16", "--name", "tiny-teacher",
                 *TINY_CLIP]) == 0
    teacher = next((runs / "pretrain").iterdir())
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "distill-demo.yaml").write_text(
        f"student:\n  name: mamba-tiny-test\ndata:\n  train: {TINY_DATA}\ntrain:\n  steps: 2\n  batch_size: 16\n"
        "  warmup_steps: 1\n  progress: false\neval:\n  each_run: false\n")
    monkeypatch.setattr(demo, "RECIPES", recipes)
    monkeypatch.setattr(demo, "TEACHER", f"run:{teacher}")
    assert demo.run_demo() == 0
    out = capsys.readouterr().out
    sweep = next((runs / "distill").glob("*-sweep-demo"))
    difference = json.loads((sweep / "summary.json").read_text())["seeds"]["differences"]["alpha=0.75"]["Avg Perf"]
    assert f"{100 * difference['diff']:+.2f}" in out
    assert "Mamba α=0.75" in out and "teacher ViT" in out

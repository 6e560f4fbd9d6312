"""End to end through `dmclip.cli.main([...])` at tiny sizes: pretrain -> distill -> eval, sweeps, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmclip.cli.main import main
from dmclip.models.refs import load_model_ref
from dmclip.runs import RunDir, find_runs

TINY_DATA = "world-train:size=96"
TINY_CLIP = ["--set", "model.vision_width=32", "--set", "model.vision_depth=1", "--set", "model.vision_heads=2",
             "--set", "model.text_width=32", "--set", "model.text_depth=1", "--set", "model.text_heads=2",
             "--set", "model.embed_dim=32", "--set", "model.patch_size=8", "--set", "model.context_length=16",
             "--set", "train.warmup_steps=1", "--set", "train.progress=false", "--set", "eval.zeroshot=world-zeroshot",
             "--set", "train.log_every=1"]


def _only_run(root: Path, command: str) -> RunDir:
    runs = find_runs(root, command)
    assert len(runs) == 1, [r.path for r in runs]
    return runs[0]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> RunDir:
    root = tmp_path_factory.mktemp("runs")
    code = main(["pretrain", "--data", TINY_DATA, "--steps", "4", "--batch-size", "16", "--runs-dir", str(root),
                 "--name", "tiny-teacher", *TINY_CLIP])
    assert code == 0
    return _only_run(root, "pretrain")


def test_pretrain_writes_a_complete_run_directory(teacher_run):
    info = teacher_run.info
    assert info["status"] == "completed" and info["command"] == "pretrain"
    for name in ("resolved.yaml", "recipe.yaml", "overrides.txt", "metrics.jsonl", "log.txt", "results.json",
                 "model/model.json", "model/model.safetensors", "checkpoints/last.pt"):
        assert (teacher_run.path / name).exists(), name
    rows = teacher_run.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    results = teacher_run.results()
    assert 0.0 <= results["zeroshot"]["acc1"] <= results["zeroshot"]["acc5"] <= 1.0


def test_pretrained_model_loads_without_training_code_and_encodes(teacher_run):
    model = load_model_ref(f"run:{teacher_run.path}")
    images = torch.rand(3, 3, model.image_size, model.image_size)
    tokens = model.tokenize(["a red circle", "a blue star", "two green squares"])
    assert model.encode_image(images).shape == (3, model.embed_dim)
    assert model.encode_text(tokens).shape == (3, model.embed_dim)


def test_resolved_yaml_repeats_the_run_exactly(teacher_run, tmp_path):
    """`dmclip pretrain runs/.../resolved.yaml` trains the same model (CPU, same seed)."""
    code = main(["pretrain", str(teacher_run.path / "resolved.yaml"), "--runs-dir", str(tmp_path)])
    assert code == 0
    again = _only_run(tmp_path, "pretrain")
    a = teacher_run.metrics()[-1]["loss"]
    b = again.metrics()[-1]["loss"]
    assert a == pytest.approx(b, rel=1e-5)


def test_distill_from_the_teacher_and_eval(teacher_run, tmp_path):
    code = main(["distill", "--teacher", f"run:{teacher_run.path}", "--student", "mamba-tiny-test", "--alpha", "0.75",
                 "--data", TINY_DATA, "--steps", "3", "--batch-size", "16", "--runs-dir", str(tmp_path),
                 "--set", "train.progress=false", "--set", "train.warmup_steps=1"])
    assert code == 0
    run = _only_run(tmp_path, "distill")
    results = run.results()
    assert results["alpha"] == 0.75 and results["teacher"] == f"run:{teacher_run.path}"
    parts = run.metrics()[-1]
    assert {"contrastive", "distill"} <= set(parts)
    student = load_model_ref(f"run:{run.path}")
    teacher = load_model_ref(f"run:{teacher_run.path}")
    assert student.arch["visual"]["family"] == "vision-mamba"
    # frozen-teacher text tower: the student's text embeddings are the teacher's
    tokens = teacher.tokenize(["a red circle"])
    torch.testing.assert_close(student.encode_text(tokens), teacher.encode_text(tokens))


def test_alpha_sweep_writes_one_run_per_point_and_a_summary(teacher_run, tmp_path):
    code = main(["distill", "--teacher", f"run:{teacher_run.path}", "--student", "mamba-tiny-test", "--alpha", "0,1",
                 "--data", TINY_DATA, "--steps", "2", "--batch-size", "16", "--runs-dir", str(tmp_path),
                 "--set", "train.progress=false", "--set", "eval.zeroshot="])
    assert code == 0
    sweep = next((tmp_path / "distill").glob("*-sweep-*"))
    members = sorted(p for p in sweep.iterdir() if (p / "run.json").exists())
    assert len(members) == 2
    alphas = sorted(json.loads((m / "results.json").read_text())["alpha"] for m in members)
    assert alphas == [0.0, 1.0]
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert len(summary) == 4 and "Avg Perf" in summary[0]  # header, the teacher, two students
    assert [line.split(",")[0] for line in summary[1:]] == ["teacher", "student alpha=0", "student alpha=1"]
    markdown = (sweep / "summary.md").read_text()
    assert "RQ1" in markdown and "RQ2" in markdown and "ViT of the student's size" in markdown
    assert (sweep / "summary.png").stat().st_size > 1000


@pytest.mark.slow
def test_seeds_by_alphas_sweep_reports_intervals_and_paired_differences(teacher_run, tmp_path):
    """`--alpha 0,1 --seeds 3,4`: four runs (every alpha at every seed); summary-seeds.csv holds each alpha's
    mean over its seeds of the per-run table, and alpha 1's paired difference against alpha 0."""
    import csv

    code = main(["distill", "--teacher", f"run:{teacher_run.path}", "--student", "mamba-tiny-test", "--alpha", "0,1",
                 "--seeds", "3,4", "--data", TINY_DATA, "--steps", "2", "--batch-size", "16", "--runs-dir",
                 str(tmp_path), "--set", "train.progress=false", "--set", "eval.zeroshot="])
    assert code == 0
    sweep = next((tmp_path / "distill").glob("*-sweep-*"))
    members = [json.loads((m / "results.json").read_text()) | json.loads((m / "run.json").read_text())
               for m in sweep.iterdir() if (m / "run.json").exists()]
    assert sorted((m["alpha"], m["seed"]) for m in members) == [(0.0, 3), (0.0, 4), (1.0, 3), (1.0, 4)]
    per_run = {row["model"]: row for row in csv.DictReader((sweep / "summary.csv").read_text().splitlines())}
    assert set(per_run) == {"teacher", "student alpha=0 seed=3", "student alpha=0 seed=4",
                            "student alpha=1 seed=3", "student alpha=1 seed=4"}
    # the seed reaches the model: same alpha, other seed, other student
    a, b = (load_model_ref(f"run:{m}") for m in sorted(sweep.glob("*alpha0-seed*")))
    assert not torch.equal(a.visual.state_dict()["patch_embed.weight"], b.visual.state_dict()["patch_embed.weight"])
    rows = {(r["alpha"], r["column"]): r for r in csv.DictReader((sweep / "summary-seeds.csv").read_text().splitlines())}
    avg = lambda alpha: [float(per_run[f"student alpha={alpha} seed={s}"]["Avg Perf"]) for s in (3, 4)]
    assert float(rows[("alpha=0", "Avg Perf")]["mean"]) == pytest.approx(sum(avg(0)) / 2)
    assert float(rows[("alpha=1", "Avg Perf")]["mean"]) == pytest.approx(sum(avg(1)) / 2)
    assert int(rows[("alpha=1", "Avg Perf")]["seeds"]) == 2
    difference = rows[("alpha=1", "Avg Perf")]
    assert float(difference["diff_vs_baseline"]) == pytest.approx(sum(avg(1)) / 2 - sum(avg(0)) / 2, abs=1e-9)
    assert float(difference["diff_low"]) <= float(difference["diff_vs_baseline"]) <= float(difference["diff_high"])
    assert rows[("alpha=0", "Avg Perf")]["diff_vs_baseline"] == ""  # the baseline is not compared with itself
    markdown = (sweep / "summary.md").read_text()
    assert "Paired difference against alpha=0" in markdown and "mean ± std" in markdown
    resolved = (sweep / "resolved.yaml").read_text()
    assert "seeds: [3, 4]" in resolved


@pytest.mark.parametrize("argv, words", [
    (["distill", "--teacher", "run:/nonexistent/run"], "does not exist"),
    (["distill", "--alpha", "1.5"], "out of range"),
    (["distill", "--alpha", "x"], "not a number"),
    (["pretrain", "--set", "model.vision_widht=3"], "vision_width"),
    (["pretrain", "--objective", "simclr"], "not allowed"),
    (["pretrain", "--data", "csv:/nonexistent.csv", "--steps", "1"], "nonexistent"),
])
def test_bad_input_is_one_line_with_a_hint(argv, words, tmp_path, capsys):
    code = main([*argv, "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert words in err and "hint:" in err


def test_distill_from_an_ensemble_of_teachers(teacher_run, tmp_path):
    ref = f"ensemble:run:{teacher_run.path}+run:{teacher_run.path}"
    code = main(["distill", "--teacher", ref, "--student", "vit-nano", "--data", TINY_DATA, "--steps", "2",
                 "--batch-size", "16", "--runs-dir", str(tmp_path), "--set", "train.progress=false",
                 "--set", "eval.zeroshot="])
    assert code == 0
    run = _only_run(tmp_path, "distill")
    assert run.results()["teacher"] == ref
    assert load_model_ref(f"run:{run.path}").encode_image(torch.rand(1, 3, 32, 32)).shape[-1] == 32


def test_an_ensemble_of_one_is_refused(tmp_path, capsys):
    code = main(["distill", "--teacher", "ensemble:run:x", "--runs-dir", str(tmp_path)])
    assert code == 2 and "two or more" in capsys.readouterr().err

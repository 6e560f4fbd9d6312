"""`dmclip eval ...` from the command line: a real saved model (run:<dir>) on small world splits.

What a user would notice if these broke: the commands in the README failing, results.json that
CLIP_benchmark / `dmclip runs compare` cannot read, or a typo'd model reference answered with a traceback.
"""

from __future__ import annotations

import csv
import json

import pytest
from helpers.cli import only_run

from dmclip.cli.main import main

ZS = "world-zeroshot:size=20"
RET = "world-retrieval-a:size=8"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dmclip.models.base import save_model
    from dmclip.models.clip import CLIP, clip_arch

    arch = clip_arch(image_size=32, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2,
                     text_width=32, text_depth=1, text_heads=2, embed_dim=16,
                     tokenizer={"context_length": 16, "vocab": list(range(300))})
    arch.pop("family")
    return save_model(CLIP(**arch), tmp_path_factory.mktemp("tiny-clip"))


def test_zero_shot_writes_clip_benchmark_results(model_dir, tmp_path, capsys):
    assert main(["eval", "zero-shot", "--model", f"run:{model_dir}", "--data", ZS, "--runs-dir", str(tmp_path),
                 "--batch-size", "8"]) == 0
    run = only_run(tmp_path, "eval").path
    results = json.loads((run / "results.json").read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(results)
    assert results["task"] == "zeroshot_classification" and results["dataset"] == ZS
    assert set(results["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert 0.0 <= results["metrics"]["acc1"] <= results["metrics"]["acc5"] <= 1.0
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    # only what the command produced: no empty recipe.yaml, overrides.txt or log.txt, no checkpoints/
    assert {p.name for p in run.iterdir()} <= {"run.json", "resolved.yaml", "results.json", "report.md", "log.txt"}
    assert all(p.stat().st_size > 0 for p in run.iterdir())
    acc1 = f"{100 * results['metrics']['acc1']:.2f}"  # tables show percent, results.json keeps the fraction
    assert f"| acc@1 % | {acc1} |" in (run / "report.md").read_text()
    header, row = [line for line in capsys.readouterr().out.splitlines() if "┃" in line or "│" in line][-2:]
    assert header.split("┃")[1:3] == [" acc@1 % ", " acc@5 % "] and row.split("│")[1].strip() == acc1


def test_a_warning_is_printed_once_after_open_clip_logged_through_the_root_logger(model_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    """open_clip logs with logging.info, which gives the root logger a stderr handler: dmclip's log lines must
    still show once (here the unknown-word warning: this model's vocabulary is 300 BPE pieces, not words), and
    still reach the run's log.txt."""
    import logging

    import open_clip

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as outside pytest, whose handlers hang on the root
    open_clip.get_tokenizer("ViT-B-32")  # logs "Parsing tokenizer identifier" through the root logger
    assert logging.getLogger().handlers  # ... which now has a stderr handler of its own
    names = tmp_path / "names.txt"
    names.write_text("".join(f"crimson disc {i}\n" for i in range(100)))
    assert main(["eval", "zero-shot", "--model", f"run:{model_dir}", "--data", ZS, "--runs-dir", str(tmp_path / "r"),
                 "--classnames", str(names)]) == 0
    out, err = (" ".join(text.split()) for text in capsys.readouterr())  # Rich wraps lines at the terminal width
    assert err.count("not in the model's vocabulary") == 1, err
    assert out.count("not in the model's vocabulary") == 1  # the note under the table
    log = (only_run(tmp_path / "r", "eval").path / "log.txt").read_text()
    assert log.count("not in the model's vocabulary") == 1
    results = json.loads((only_run(tmp_path / "r", "eval").path / "results.json").read_text())
    assert {"crimson", "disc"} <= set(results["details"]["unknown_words"])


def test_custom_classnames_and_templates_files(model_dir, tmp_path):
    from dmclip.data import build_dataset

    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"thing {i}" for i in range(len(build_dataset(ZS, image_size=32).classnames))))
    templates = tmp_path / "templates.txt"
    templates.write_text("# comment lines are skipped\na photo of {c}\n")
    assert main(["eval", "zero-shot", "--model", f"run:{model_dir}", "--data", ZS, "--runs-dir", str(tmp_path / "r"),
                 "--classnames", str(names), "--templates", str(templates)]) == 0
    results = json.loads((only_run(tmp_path / "r", "eval").path / "results.json").read_text())
    assert results["details"]["num_templates"] == 1


def test_retrieval_and_latency_commands(model_dir, tmp_path, capsys):
    assert main(["eval", "retrieval", "--model", f"run:{model_dir}", "--data", RET, "--runs-dir", str(tmp_path / "r")]) == 0
    results = json.loads((only_run(tmp_path / "r", "eval").path / "results.json").read_text())
    assert results["details"] == {"num_images": 8, "num_texts": 40, "rerank_k": 0}
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@10", "text_retrieval_median_rank"):
        assert key in results["metrics"]
    metrics = results["metrics"]
    report = (only_run(tmp_path / "r", "eval").path / "report.md").read_text()
    assert f"| T→I R@5 % | {100 * metrics['image_retrieval_recall@5']:.2f} |" in report
    assert f"| I→T mean rank | {metrics['text_retrieval_mean_rank']:.2f} |" in report  # a rank is no percentage
    row = next(line for line in capsys.readouterr().out.splitlines() if "image → text" in line)
    assert [cell.strip() for cell in row.split("│")[2:5]] == [
        f"{100 * metrics[f'text_retrieval_recall@{k}']:.2f}" for k in (1, 5, 10)]
    # against a model with a wider image tower (same text tower): the ratios are model / vs
    from dmclip.models.base import count_parameters, load_saved_model, save_model
    from dmclip.models.clip import CLIP, clip_arch

    arch = clip_arch(image_size=32, patch_size=8, vision_width=64, vision_depth=2, vision_heads=2,
                     text_width=32, text_depth=1, text_heads=2, embed_dim=16,
                     tokenizer={"context_length": 16, "vocab": list(range(300))})
    arch.pop("family")
    wide_dir = save_model(CLIP(**arch), tmp_path / "wide")
    assert main(["eval", "latency", "--model", f"run:{model_dir}", "--vs", f"run:{wide_dir}", "--runs", "2",
                 "--warmup", "0", "--batch-size", "2", "--threads", "1", "--runs-dir", str(tmp_path / "l")]) == 0
    results = json.loads((only_run(tmp_path / "l", "eval").path / "results.json").read_text())
    assert results["task"] == "latency" and results["details"]["threads"] == 1
    small, wide = load_saved_model(model_dir), load_saved_model(wide_dir)
    ratios = results["vs"]["ratios"]
    assert results["metrics"]["params"] == count_parameters(small)
    assert results["vs"]["metrics"]["params"] == count_parameters(wide)
    assert ratios["params"] == pytest.approx(count_parameters(small) / count_parameters(wide), rel=1e-12)
    assert ratios["image_params"] == pytest.approx(count_parameters(small.visual) / count_parameters(wide.visual))
    assert ratios["image_params"] < 0.5 and ratios["text_params"] == 1.0  # only the image towers differ
    assert ratios["image_flops"] == pytest.approx(results["metrics"]["image_flops"]
                                                  / results["vs"]["metrics"]["image_flops"])
    assert ratios["image_flops"] < 1
    assert results["metrics"]["image_flops"] > 0 and results["metrics"]["text_flops"] > 0
    assert "median" in capsys.readouterr().out


def test_suite_with_several_models(model_dir, tmp_path, capsys):
    assert main(["eval", "suite", "--models", f"run:{model_dir}", str(model_dir), "--zero-shot", ZS,
                 "--retrieval", RET, "--runs-dir", str(tmp_path)]) == 0
    run = only_run(tmp_path, "eval").path
    results = json.loads((run / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == [f"run:{model_dir}", str(model_dir)]
    # the same weights under two references: the second is served from the embedding cache
    assert results["rows"][0]["Avg Perf"] == results["rows"][1]["Avg Perf"]
    assert results["cache"]["hits"] == 4
    rows = list(csv.reader((run / "summary.csv").open()))
    assert rows[0] == ["model", f"{ZS} acc@1", f"{RET} T→I R@1", f"{RET} I→T R@1", "Avg Perf"]
    assert "**" in (run / "summary.md").read_text()  # best per column in bold
    tasks = sorted(p.name for p in (run / "tasks").iterdir())
    assert len(tasks) == 4 and all(json.loads((run / "tasks" / t).read_text())["metrics"] for t in tasks)
    assert "Avg Perf" in capsys.readouterr().out


@pytest.fixture(scope="module")
def seed_models(tmp_path_factory):
    """Four tiny CLIPs of one architecture, each initialised from its own seed: two arms x two seeds."""
    import torch

    from dmclip.models.base import save_model
    from dmclip.models.clip import CLIP, clip_arch

    root = tmp_path_factory.mktemp("seed-models")
    refs = []
    for seed in range(4):
        torch.manual_seed(seed)
        arch = clip_arch(image_size=32, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2,
                         text_width=32, text_depth=1, text_heads=2, embed_dim=16,
                         tokenizer={"context_length": 16, "vocab": list(range(300))})
        arch.pop("family")
        refs.append(f"run:{save_model(CLIP(**arch), root / f'm{seed}')}")
    return refs


def test_suite_compares_arms_over_seeds(seed_models, tmp_path):
    """--arm groups one model per seed: each arm's mean over seeds, and the paired difference against the
    baseline arm, computed from the same per-model scores the table shows."""
    import numpy as np

    a, b = ",".join(seed_models[:2]), ",".join(seed_models[2:])
    assert main(["eval", "suite", "--arm", f"a={a}", "--arm", f"b={b}", "--arm", f"same={a}", "--zero-shot", ZS,
                 "--retrieval", RET, "--runs-dir", str(tmp_path)]) == 0
    run = only_run(tmp_path, "eval").path
    results = json.loads((run / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert list(rows) == seed_models  # every model once, though arm "same" repeats arm a's
    seeds = results["seeds"]
    for column in results["columns"]:
        mean_a = np.mean([rows[m][column] for m in seed_models[:2]])
        mean_b = np.mean([rows[m][column] for m in seed_models[2:]])
        assert seeds["arms"]["a"][column]["mean"] == pytest.approx(mean_a, abs=1e-6)  # rows: float32
        assert seeds["differences"]["b"][column]["diff"] == pytest.approx(mean_b - mean_a, abs=1e-6)
        same = seeds["differences"]["same"][column]
        assert (same["diff"], same["low"], same["high"], same["significant"]) == (0, 0, 0, False)
    assert seeds["baseline"] == "a" and seeds["arms"]["a"][ZS + " acc@1"]["n"] == 2
    items = np.load(run / "items.npz")
    assert items[f"{seed_models[0]}|{ZS} acc@1"].shape == (20,)
    summary = (run / "summary.md").read_text()
    assert "## Over seeds" in summary and "## Paired difference against a" in summary
    assert (run / "summary-seeds.csv").read_text().startswith("arm,column,seeds,mean")


@pytest.fixture(scope="module")
def frontier_models(tmp_path_factory, model_dir):
    """A tiny ViT teacher (the module's model) and students of it: Vision-Mamba and ViT, two seeds each."""
    import torch

    from dmclip.distill import DistillConfig, build_student
    from dmclip.models.base import load_saved_model, save_model

    teacher = load_saved_model(model_dir)
    root = tmp_path_factory.mktemp("frontier")
    arms = {}
    for name, student in (("mamba", "mamba-tiny-test"), ("vit", "vit-nano")):
        refs = []
        for seed in range(2):
            torch.manual_seed(seed)
            cfg = DistillConfig()
            cfg.student.name, cfg.student.width, cfg.student.depth = student, 32, 1
            refs.append(f"run:{save_model(build_student(cfg, teacher).eval(), root / f'{name}{seed}')}")
        arms[name] = refs
    return f"run:{model_dir}", arms


def test_suite_places_arms_on_the_latency_frontier(frontier_models, tmp_path):
    """--latency: each arm's image encoder timed against the reference (the teacher) in one process; its Avg
    Perf over seeds as a share of the reference's; Mamba against the ViT arm nearest in latency, paired."""
    import numpy as np

    teacher, arms = frontier_models
    assert main(["eval", "suite", "--models", teacher, *[f"--arm={n}={','.join(r)}" for n, r in arms.items()],
                 "--latency", "--zero-shot", ZS, "--retrieval", RET, "--latency-runs", "3",
                 "--runs-dir", str(tmp_path)]) == 0
    run = only_run(tmp_path, "eval").path
    results = json.loads((run / "results.json").read_text())
    found = results["frontier"]
    points = {p["name"]: p for p in found["points"]}
    assert list(points) == [teacher, "mamba", "vit"] and found["reference"] == teacher
    assert points[teacher]["b1_ratio"] == 1.0 and points[teacher]["b64_ratio"] == 1.0
    assert (points["mamba"]["family"], points["vit"]["family"]) == ("vision-mamba", "vit")
    for name in ("mamba", "vit"):
        p = points[name]
        assert p["b64_ratio"] == pytest.approx(p["b64_ms"] / points[teacher]["b64_ms"])
        avg = np.mean([r["Avg Perf"] for r in results["rows"] if r["model"] in arms[name]])
        assert p["avg_perf"]["mean"] == pytest.approx(avg, abs=1e-6)
        reference_avg = next(r["Avg Perf"] for r in results["rows"] if r["model"] == teacher)
        assert p["kept"]["mean"] == pytest.approx(avg / reference_avg, rel=1e-6)
    assert [(p["arm"], p["against"], p["batch"]) for p in found["pairs"]] == [("mamba", "vit", 1), ("mamba", "vit", 64)]
    for pair in found["pairs"]:
        assert pair["diff"] == pytest.approx(points["mamba"]["avg_perf"]["mean"] - points["vit"]["avg_perf"]["mean"],
                                             abs=1e-6)
        b = pair["batch"]
        assert pair["latency_ratio"] == pytest.approx(points["mamba"][f"b{b}_ms"] / points["vit"][f"b{b}_ms"])
    summary = (run / "summary.md").read_text()
    assert "## Accuracy against image-encoder latency" in summary and "mamba − vit" in summary
    assert (run / "frontier.png").stat().st_size > 10_000


def test_the_frontier_needs_arms_and_a_reference(frontier_models, tmp_path, capsys):
    teacher, arms = frontier_models
    assert main(["eval", "suite", "--models", teacher, "--latency", "--zero-shot", ZS, "--runs-dir", str(tmp_path)]) == 2
    assert "name them with --arm" in capsys.readouterr().err
    assert main(["eval", "suite", f"--arm=m={','.join(arms['mamba'])}", "--latency", "--zero-shot", ZS,
                 "--runs-dir", str(tmp_path)]) == 2
    assert "needs a reference model outside the arms" in capsys.readouterr().err


@pytest.mark.parametrize("arms, message", [
    (["--arm", "a=run:/x,run:/y", "--arm", "b=run:/z"], "different numbers of seeds"),
    (["--arm", "noisy"], "is not NAME=REF,REF"),
    (["--arm", "a=run:/x", "--baseline", "c"], "baseline arm 'c' is not one of the arms"),
])
def test_malformed_arms_are_one_line_errors(arms, message, tmp_path, capsys):
    assert main(["eval", "suite", *arms, "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err.splitlines()[0] and "hint:" in err
    assert not (tmp_path / "eval").exists()


def test_suite_scores_only_the_kind_of_set_named(model_dir, tmp_path):
    """--zero-shot alone: no retrieval column (the world's retrieval sets are the default only when nothing is named)."""
    assert main(["eval", "suite", "--model", f"run:{model_dir}", "--zero-shot", ZS, "--runs-dir", str(tmp_path)]) == 0
    results = json.loads((only_run(tmp_path, "eval").path / "results.json").read_text())
    assert results["columns"] == [f"{ZS} acc@1", "Avg Perf"] and results["retrieval"] == []


@pytest.mark.parametrize("argv, message", [
    (["eval", "zero-shot", "--model", "no-such-model"], "no model 'no-such-model'"),
    (["eval", "retrieval", "--model", "run:/nonexistent/run"], "does not exist"),
    (["eval", "suite"], "no model to evaluate"),
])
def test_bad_references_are_one_line_errors(argv, message, tmp_path, capsys):
    assert main([*argv, "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and message in lines[0] and lines[1].startswith("hint:")
    assert "Traceback" not in err
    assert not (tmp_path / "eval").exists()  # no run directory left behind for a typo


def test_missing_dataset_is_a_one_line_error(model_dir, tmp_path, capsys):
    assert main(["eval", "zero-shot", "--model", f"run:{model_dir}", "--data", "world-nope",
                 "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "hint:" in err and "Traceback" not in err


def test_caption_needs_a_captioner(model_dir, tmp_path, capsys):
    assert main(["eval", "caption", "--model", f"run:{model_dir}", "--data", RET, "--runs-dir", str(tmp_path)]) == 2
    assert "BLIP" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["zero-shot", "retrieval", "caption", "latency", "suite"])
def test_every_command_has_an_example_in_help(command, capsys):
    assert main(["eval", command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Example: dmclip eval " + command in out and "--runs-dir" in out and "--name" in out

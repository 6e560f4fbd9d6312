"""dmclip.runner: the one way a command runs, as a user meets it.

What a user would notice if this broke: a typo that leaves a "failed" run directory behind (or a third line
under the error), a run that had trained and is deleted instead of resumable, a sweep value refused with a
message that does not name its field (or not refused), a sweep whose members differ in teacher because
`latest` moved, `resolved.yaml` recording `latest` instead of the run it was, or a torchrun sweep whose ranks
write two sweep directories.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from dmclip.cli.main import main
from dmclip.config import field
from dmclip.distill import COMMAND as DISTILL
from dmclip.errors import DmclipError
from dmclip.runner import Command, Run, Sweep, launch, plan
from dmclip.runs import RunDir, find_runs

REPO = Path(__file__).resolve().parents[1]
TINY_DISTILL = ["--student", "mamba-tiny-test", "--data", "world-train:size=32", "--steps", "1", "--batch-size", "8",
                "--set", "train.progress=false", "--set", "eval.each_run=false"]


@dataclass
class EchoConfig:
    seed: int = field(0, "random seed", min=0)
    alpha: float = field(0.5, "a weight", min=0.0, max=1.0)
    fail: str = field("", "'before': a DmclipError before training; 'after': one after a metrics row")


def _echo(config, run_dir):
    if config.fail == "before":
        raise DmclipError("no data", "add data")
    run_dir.log_metrics({"step": 1, "alpha": config.alpha})
    if config.fail == "after":
        raise DmclipError("disk full", "free space")
    return {"alpha": config.alpha, "seed": config.seed}


def _summarize(sweep_dir, members, base) -> dict:
    summary = {"points": [m.point for m in members], "alphas": [m.result["alpha"] for m in members]}
    (sweep_dir / "summary.json").write_text(json.dumps(summary))
    return summary


ECHO = Command("echo", EchoConfig, _echo, sweep_fields={"alpha": "alpha", "seeds": "seed"}, summarize=_summarize,
               sweep_name=lambda name, recipe: f"sweep-{name or 'echo'}",
               member_name=lambda name, recipe, config, point: f"a{config.alpha:g}-s{config.seed}")


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ failed starts


def test_a_typo_in_the_data_leaves_no_run_directory_and_two_lines(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["distill", "--data", "csv:nope.csv", "--runs-dir", str(runs)]) == 2
    lines = _error_lines(capsys)
    assert lines == ["error: csv: file 'nope.csv' does not exist",
                     f"hint: check the path (relative paths start at {Path.cwd()}), e.g. csv:data/train.csv"]
    assert not [p for p in runs.rglob("*")]  # no run directory, no empty runs/distill/
    assert main(["distill", "--data", "csv:nope.csv", "--alpha", "0,1", "--runs-dir", str(runs)]) == 2
    assert len(_error_lines(capsys)) == 2 and not [p for p in runs.rglob("*")]  # nor a sweep directory


def test_a_run_that_began_training_is_kept_for_resume(tmp_path, caplog):
    with pytest.raises(DmclipError, match="disk full"):
        launch(ECHO, sets=["fail=after"], runs_root=tmp_path)
    (run_dir,) = find_runs(tmp_path, "echo")
    assert run_dir.status == "failed" and run_dir.begun()
    assert f"continue it with --resume {run_dir.path}" in caplog.text
    with pytest.raises(DmclipError, match="no data"):
        launch(ECHO, sets=["fail=before"], runs_root=tmp_path)
    assert [r.path for r in find_runs(tmp_path, "echo")] == [run_dir.path]  # only the one that had begun


def test_a_member_that_fails_at_start_keeps_the_members_before_it(tmp_path):
    with pytest.raises(DmclipError, match="echo.alpha|alpha"):  # refused before anything: 2 is out of range
        launch(ECHO, sweep={"alpha": "0,2"}, runs_root=tmp_path)
    assert not (tmp_path / "echo").exists()

    def second_fails(config, run_dir):
        if config.alpha == 1:
            raise DmclipError("no data", "add data")
        return _echo(config, run_dir)

    command = Command("echo", EchoConfig, second_fails, sweep_fields=ECHO.sweep_fields, summarize=_summarize,
                      sweep_name=ECHO.sweep_name, member_name=ECHO.member_name)
    with pytest.raises(DmclipError, match="no data"):
        launch(command, sweep={"alpha": "0,1"}, runs_root=tmp_path)
    (sweep,) = (tmp_path / "echo").iterdir()
    assert sorted(p.name.split("-")[2] for p in sweep.iterdir() if p.is_dir()) == ["a0"]


# ------------------------------------------------------------------------------------------ sweeps


def test_a_sweep_runs_every_point_and_its_resolved_yaml_runs_it_again(tmp_path):
    outcome = launch(ECHO, sweep={"alpha": "0,1", "seeds": "3,4"}, runs_root=tmp_path, name="t")
    assert isinstance(outcome, Sweep) and outcome.sweep_dir.name.endswith("-sweep-t")
    assert [(m.config.alpha, m.config.seed) for m in outcome.members] == [(0, 3), (0, 4), (1, 3), (1, 4)]
    assert outcome.summary["alphas"] == [0.0, 0.0, 1.0, 1.0]
    assert all(RunDir(m.run_dir.path).status == "completed" and m.run_dir.path.parent == outcome.sweep_dir
               for m in outcome.members)
    again = plan(ECHO, recipe=outcome.sweep_dir / "resolved.yaml")
    assert [config for _, config in again.members] == [m.config for m in outcome.members]
    one = launch(ECHO, sweep={"alpha": "0.25"}, runs_root=tmp_path)  # one value: one ordinary run
    assert isinstance(one, Run) and one.result["alpha"] == 0.25 and one.run_dir.path.parent == tmp_path / "echo"


@pytest.mark.parametrize("sweep, message", [
    ({"alpha": "0,,1"}, "--alpha '0,,1' has an empty value"),
    ({"alpha": "0,a"}, "--alpha: loss.alpha = 'a' has the wrong type: expected float"),
    ({"alpha": "0,nan"}, "--alpha: loss.alpha = nan is not a number"),
    ({"alpha": "0,2"}, "--alpha: loss.alpha = 2.0 is out of range"),
    ({"alpha": "0,1,0"}, "--alpha '0,1,0' repeats 0"),
    ({"seeds": "1,-2"}, "--seeds: seed = -2 is out of range"),
])
def test_sweep_values_are_checked_by_the_field_they_set(sweep, message):
    with pytest.raises(DmclipError) as caught:
        plan(DISTILL, sweep=sweep)
    assert caught.value.message == message


def test_a_swept_field_given_by_an_option_too_is_refused():
    with pytest.raises(DmclipError, match="seed is given by an option and swept by --seeds"):
        plan(DISTILL, shortcuts={"seed": 3}, sweep={"seeds": "0,1"})


@pytest.mark.slow
def test_a_sweep_under_torchrun_is_one_directory_shared_by_both_ranks(tmp_path):
    """2 gloo ranks: one sweep directory and one run directory per member, made by rank 0 and used by both
    (each member's all-reduce sees both ranks), the summary written once, by rank 0."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import torch
        import torch.distributed as dist
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_runner import ECHO, Command, EchoConfig, _summarize
        from dmclip.runner import launch
        from dmclip.train import distributed

        def run(config, run_dir):
            total = torch.tensor([distributed.rank() + 1.0])
            dist.all_reduce(total)
            paths = distributed.all_gather_object(str(run_dir.path))
            return {{"alpha": config.alpha, "sum": float(total), "paths": paths}}

        command = Command("echo", EchoConfig, run, sweep_fields=ECHO.sweep_fields, summarize=_summarize,
                          sweep_name=ECHO.sweep_name, member_name=ECHO.member_name)
        outcome = launch(command, sweep={{"alpha": "0,1"}}, runs_root=sys.argv[1])
        rank = int(__import__("os").environ["RANK"])
        with open(f"{{sys.argv[1]}}/rank{{rank}}.json", "w") as fh:
            json.dump({{"sweep": str(outcome.sweep_dir), "summary": outcome.summary, "reports": outcome.reports,
                       "results": [m.result for m in outcome.members]}}, fh)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DMCLIP_DIST_TIMEOUT": "60", "PYTHONPATH": str(REPO)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    runs = tmp_path / "runs"
    runs.mkdir()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(runs)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (runs / "echo").iterdir()
    assert len([p for p in sweep.iterdir() if p.is_dir()]) == 2
    zero, one = (json.loads((runs / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["sweep"] == one["sweep"] == str(sweep)
    assert zero["reports"] and not one["reports"] and one["summary"] is None
    assert json.loads((sweep / "summary.json").read_text()) == zero["summary"]
    for result in zero["results"]:
        assert result["sum"] == 3.0 and result["paths"][0] == result["paths"][1]


# ------------------------------------------------------------------------------------------ teachers


def _completed_clip_run(root: Path) -> RunDir:
    """A completed CLIP pretrain run holding the shipped teacher's weights (as `latest` finds one)."""
    from dmclip.models.refs import builtin_dir

    run_dir = RunDir.create("pretrain", "teacher", root=root)
    shutil.copytree(builtin_dir("world-vit"), run_dir.path / "model",
                    ignore=shutil.ignore_patterns("*.yaml", "run.json", "results.json", "metrics.jsonl", "*.txt"))
    run_dir.write_results({"objective": "clip"})
    run_dir.update_info(status="completed")
    return run_dir


def test_resolved_yaml_records_the_concrete_teacher(tmp_path):
    runs = tmp_path / "runs"
    assert main(["distill", *TINY_DISTILL, "--runs-dir", str(runs)]) == 0
    (default,) = find_runs(runs, "distill")
    assert "teacher: builtin:world-vit\n" in (default.path / "resolved.yaml").read_text()

    teacher = _completed_clip_run(runs)
    assert main(["distill", "--teacher", "latest", *TINY_DISTILL, "--runs-dir", str(runs)]) == 0
    latest = next(r for r in find_runs(runs, "distill") if r.path != default.path)
    assert f"teacher: run:{teacher.path}\n" in (latest.path / "resolved.yaml").read_text()
    assert latest.results()["teacher"] == f"run:{teacher.path}"
    swept = plan(DISTILL, shortcuts={"teacher": "ensemble:latest+builtin:world-vit"}, sweep={"alpha": "0,1"},
                 runs_root=runs)
    assert {config.teacher for _, config in swept.members} == {f"ensemble:run:{teacher.path}+builtin:world-vit"}


def test_latest_without_a_pretrain_run_points_at_the_shipped_teacher(tmp_path):
    with pytest.raises(DmclipError) as caught:
        plan(DISTILL, shortcuts={"teacher": "latest"}, runs_root=tmp_path)
    assert caught.value.message == f"--teacher latest: no completed CLIP pretrain run under {tmp_path}"
    assert "--teacher builtin:world-vit" in caught.value.hint


def test_distill_cache_names_the_command_that_replaced_it(capsys):
    assert main(["distill", "cache", "--teacher", "builtin:world-vit", "--out", "x"]) == 2
    assert _error_lines(capsys) == ["error: `dmclip distill cache` is now `dmclip reinforce`",
                                    "hint: dmclip reinforce --teacher REF --data SPEC --out DIR [--augmentations K] "
                                    "[--seed N]"]


# ------------------------------------------------------------------------------------------ the user's sets

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _user_sets(root: Path) -> tuple[Path, Path]:
    """A CSV image-text set (16 pairs) and an ImageFolder of 4 colour classes (3 images each), as a user has them."""
    from PIL import Image

    rows = ["filepath,caption"]
    for k, (name, rgb) in enumerate(list(COLOURS.items()) * 4):
        path = root / "images" / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), tuple(min(255, c + 3 * k) for c in rgb)).save(path)
        rows.append(f"{path},a {name} square")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    for name, rgb in COLOURS.items():
        (root / "zs" / name).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (32, 32), tuple(max(0, c - 10 * k) for c in rgb)).save(root / "zs" / name / f"{k}.png")
    return root / "train.csv", root / "zs"


@pytest.mark.slow
def test_a_sweep_scores_the_users_sets_and_builds_no_world_split(tmp_path, monkeypatch, capsys):
    """`dmclip distill --data csv:... --alpha 0,1 --seeds 0,1 --set eval.zeroshot=[imagefolder:...]`: the
    ImageFolder is the summary's column, Avg Perf is over it alone, and no world split is built."""
    import csv

    from dmclip import registry

    train, folder = _user_sets(tmp_path)
    built = []
    original = registry.datasets.get
    monkeypatch.setattr(registry.datasets, "get", lambda name, **kw: built.append(name) or original(name, **kw))
    runs = tmp_path / "runs"
    spec = f"imagefolder:{folder}"
    assert main(["distill", "--data", f"csv:{train}", "--alpha", "0,1", "--seeds", "0,1", "--student",
                 "mamba-tiny-test", "--steps", "1", "--batch-size", "8", "--runs-dir", str(runs),
                 "--set", f"eval.zeroshot=[{spec}]", "--set", "eval.latency=false",
                 "--set", "train.progress=false"]) == 0
    assert built == []  # not one world split: not for training, not for scoring
    (sweep,) = (runs / "distill").iterdir()
    column = f"{spec} acc@1"
    header, *rows = list(csv.reader((sweep / "summary.csv").open()))
    assert header == ["model", column, "Avg Perf"] and len(rows) == 5  # the teacher and 4 members
    assert all(row[1] == row[2] for row in rows)  # Avg Perf over exactly the named set
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["rq1"]["columns"] == [column, "Avg Perf"] and summary["rq2"] == []
    markdown = (sweep / "summary.md").read_text()
    assert spec in markdown and not re.search(r"world-(zeroshot|shift|retrieval)", markdown) and "RQ2" not in markdown
    member = json.loads(next(p / "results.json" for p in sweep.iterdir() if p.is_dir()).read_text())
    assert set(member["eval"]) == {column, "Avg Perf"} and member["zeroshot"]["acc1"] == member["eval"][column]
    teacher = next(row for row in summary["rq1"]["rows"] if row["model"] == "teacher")
    out = capsys.readouterr().out
    assert "RQ1: eval suite" in out and f"{100 * teacher[column]:.2f}" in out  # the terminal table, in percent

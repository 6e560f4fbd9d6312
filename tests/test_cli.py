"""The `dmclip` command as a user meets it: help, version, exit codes, one-line errors, runs via common.launch."""

from __future__ import annotations

import dataclasses
import importlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest
import typer
from helpers.cli import stderr_lines

from dmclip import __version__
from dmclip.cli import common
from dmclip.cli.main import app, interrupted_message, main
from dmclip.config import field
from dmclip.errors import DmclipError
from dmclip.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.fixture
def plain_help(monkeypatch):
    """Help rendered the same everywhere: 100 columns, no colour, whatever the terminal or CI says."""
    import typer.rich_utils as rich_utils

    monkeypatch.setattr(rich_utils, "MAX_WIDTH", 100)
    monkeypatch.setattr(rich_utils, "COLOR_SYSTEM", None)
    monkeypatch.setattr(rich_utils, "FORCE_TERMINAL", False)


# ----------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("argv, snapshot", [
    (["--help"], "dmclip.txt"), (["runs", "--help"], "runs.txt"), (["list", "--help"], "list.txt")])
def test_help_snapshot(argv, snapshot, plain_help, capsys):
    """Help text changes only on purpose. Regenerate: DMCLIP_UPDATE_SNAPSHOTS=1 pytest tests/test_cli.py -k help,
    which rewrites a snapshot that differs and still fails, so that a run with the variable set never passes;
    review the diff, then rerun without it."""
    assert main(argv) == 0
    out = "\n".join(line.rstrip() for line in capsys.readouterr().out.splitlines()) + "\n"
    path = SNAPSHOTS / snapshot
    if out != path.read_text() and os.environ.get("DMCLIP_UPDATE_SNAPSHOTS"):
        path.write_text(out)
        pytest.fail(f"snapshot {path} updated: review `git diff {path}`, then rerun without DMCLIP_UPDATE_SNAPSHOTS")
    assert out == path.read_text(), (f"`dmclip {' '.join(argv)}` changed; if on purpose, regenerate {path} "
                                     "with DMCLIP_UPDATE_SNAPSHOTS=1")


def _all_commands(group=None, prefix=()):
    group = group or typer.main.get_command(app)
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from _all_commands(command, (*prefix, name))


@pytest.mark.parametrize("argv", list(_all_commands()), ids=" ".join)
def test_every_command_has_help_with_an_example(argv, plain_help, capsys):
    assert main([*argv, "--help"]) == 0
    assert re.search(r"Example", capsys.readouterr().out), f"`dmclip {' '.join(argv)} --help` shows no example"


def test_no_arguments_prints_help_and_succeeds(plain_help, capsys):
    assert main([]) == 0
    captured = capsys.readouterr()
    assert "Usage: dmclip" in captured.out and captured.err == ""


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dmclip {__version__}"


# ---------------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize("argv, error, hint", [
    (["pretrian"], "error: No such command 'pretrian'.", "hint: see `dmclip --help`"),
    (["runs", "lst"], "error: No such command 'lst'. Did you mean 'list'?", "hint: see `dmclip runs --help`"),
    (["runs", "list", "--bogus"], "error: No such option: --bogus", "hint: see `dmclip runs list --help`"),
    (["runs", "list", "--limit", "many"], "error: Invalid value for '--limit'", "hint: see `dmclip runs list --help`"),
    (["runs", "show"], "error: Missing argument", "hint: see `dmclip runs show --help`"),
])
def test_usage_errors_exit_2_with_error_and_hint(argv, error, hint, capsys):
    assert main(argv) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 2 and lines[0].startswith(error) and lines[1] == hint


def test_user_error_is_exactly_two_lines(capsys):
    assert main(["list", "studnts"]) == 2
    assert stderr_lines(capsys) == ["error: no registry named 'studnts'", "hint: did you mean 'students'?"]


def test_user_text_is_not_read_as_markup(capsys):
    assert main(["list", "[bold]x[/bold]"]) == 2
    assert stderr_lines(capsys)[0] == "error: no registry named '[bold]x[/bold]'"


def test_debug_variable_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("DMCLIP_DEBUG", "1")
    assert main(["list", "studnts"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "error: no registry named 'studnts'" in err


def test_unexpected_exception_exits_1_with_traceback(monkeypatch, capsys):
    import dmclip.runs

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(dmclip.runs, "find_runs", broken)
    assert main(["runs", "list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise RuntimeError("boom")' in err
    assert "error: unexpected RuntimeError: boom" in err and "hint: this is a bug in dmclip" in err


def test_console_script_exit_codes():
    """Through the real entry point, as a shell sees it."""
    run = [sys.executable, "-c", "from dmclip.cli.main import run; run()"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([*run, "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert (ok.returncode, ok.stdout.strip()) == (0, f"dmclip {__version__}")
    bad = subprocess.run([*run, "runs", "show", "/nonexistent-run"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[0] == "error: /nonexistent-run is not a dmclip run directory (no run.json)"


# --------------------------------------------------------------------- common.launch: the run flow


@dataclass
class EchoConfig:
    seed: int = field(0, "random seed")
    alpha: float = field(0.5, "a weight", min=0.0, max=1.0)


def _echo(config, run):
    run.log_metrics({"step": 1, "alpha": config.alpha})
    return {"alpha": config.alpha}


def _launch(run=_echo, command="distill", **kwargs):
    from dmclip.runner import Command

    outcome = common.launch(Command(command, EchoConfig, run), **kwargs)
    return outcome.run_dir, outcome.result


def test_launch_creates_a_completed_run_with_provenance(tmp_path):
    common.CURRENT_ARGV = ["dmclip", "distill", "--alpha", "0.75"]
    run, result = _launch(sets=["seed=3"], shortcuts={"alpha": 0.75}, name="echo", runs_dir=tmp_path)
    assert result == {"alpha": 0.75}
    info = run.info
    assert info["status"] == "completed" and info["seed"] == 3
    assert info["argv"] == ["dmclip", "distill", "--alpha", "0.75"]
    assert (run.path / "overrides.txt").read_text() == "seed=3\n"
    # the resolved config repeats the run: same config, same hash, a new directory
    again, _ = _launch(recipe=run.path / "resolved.yaml", runs_dir=tmp_path)
    assert again.path != run.path and again.path.name[-6:] == run.path.name[-6:]


def test_launch_records_a_failure(tmp_path):
    def fails(config, run):
        run.log_metrics({"step": 1})  # training had begun: the run directory stays, for --resume
        raise DmclipError("no data", "add data")

    with pytest.raises(DmclipError):
        _launch(fails, runs_dir=tmp_path)
    (run,) = [RunDir(p) for p in (tmp_path / "distill").iterdir()]
    assert run.status == "failed" and run.info["error"] == "no data (hint: add data)"


def test_resume_continues_an_interrupted_run_with_its_own_config(tmp_path):
    def interrupted(config, run):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _launch(interrupted, sets=["alpha=0.25"], runs_dir=tmp_path)
    (path,) = list((tmp_path / "distill").iterdir())
    run, result = _launch(resume=path)
    assert run.path == path and result == {"alpha": 0.25} and run.status == "completed"


@pytest.mark.parametrize("status, kwargs, message", [
    ("completed", {}, "already completed"),
    ("running", {}, "is still running"),
    ("interrupted", {"sets": ["alpha=1"]}, "--resume continues a run with its own saved config"),
    ("interrupted", {"command": "pretrain"}, "is a `distill` run, not a `pretrain` run"),
])
def test_resume_refusals(tmp_path, status, kwargs, message):
    run = RunDir.create("distill", "r", EchoConfig(), root=tmp_path)
    run.update_info(status=status, pid=os.getpid(), pid_start=None, host=__import__("socket").gethostname())
    with pytest.raises(DmclipError, match=re.escape(message)):
        _launch(resume=run.path, **kwargs)


def test_config_errors_reach_the_user_as_two_lines(tmp_path, capsys):
    """Any command run through common.launch reports a bad --set like this."""
    cli = typer.Typer()

    @cli.command()
    def echo(sets: common.SetOpt = None) -> None:
        _launch(sets=sets, runs_dir=tmp_path)

    @cli.command()
    def other() -> None:
        pass

    main_module = importlib.import_module("dmclip.cli.main")
    original = main_module.app
    main_module.app = cli
    try:
        assert main(["echo", "--set", "alpah=1"]) == 2
    finally:
        main_module.app = original
    assert stderr_lines(capsys) == ["error: --set alpah: unknown config key 'alpah'", "hint: did you mean alpha?"]
    assert not (tmp_path / "distill").exists()  # nothing is created for a config that does not resolve


# ------------------------------------------------------------------------------------- shared options

RUN_FLAGS = ["--seed", "--report-to", "--set", "--name", "--runs-dir", "--resume"]


def test_run_options_reach_the_command_parsed_and_checked(tmp_path, capsys):
    """@RunOptions.add: one declaration of the options every run-making command takes; the command gets
    them as one object, after its own options, with values parsed (and refused) as if written out."""
    seen = {}

    def command(steps: Annotated[int, typer.Option("--steps")] = 1, *, options: common.RunOptions) -> None:
        seen.update(steps=steps, options=options)

    click_command = typer.main.get_command(_single(common.RunOptions.add(command)))
    click_command.main(["--steps", "3", "--seed", "7", "--set", "a=1", "-s", "b=2", "--runs-dir", str(tmp_path)],
                       standalone_mode=False)
    assert seen == {"steps": 3, "options": common.RunOptions(seed=7, sets=["a=1", "b=2"], runs_dir=tmp_path)}
    assert seen["options"].shortcuts(report_to="finetune.train.report_to") == {
        "seed": 7, "finetune.train.report_to": None}
    assert [p.opts[0] for p in click_command.params] == ["--steps", *RUN_FLAGS]
    assert main(["pretrain", "--seed", "seven"]) == 2  # refused before anything runs, as a written-out option is
    assert stderr_lines(capsys)[0].startswith("error: Invalid value for '--seed'")


def _single(function) -> typer.Typer:
    app = typer.Typer(add_completion=False)
    app.command()(function)
    return app


@pytest.mark.parametrize("argv", [["pretrain"], ["distill"], ["capfilt"]], ids=" ".join)
def test_every_run_command_lists_the_run_options(argv, plain_help, capsys):
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in RUN_FLAGS)
    assert "pip install -e '.[dashboards]'" in out  # square brackets in help survive Rich markup


def test_sizes_and_ages_in_the_largest_unit_they_reach():
    import datetime as dt

    from dmclip.cli.common import age
    from dmclip.cli.export import _size

    assert common.largest_unit(2.5e6, (("MB", 1e6), ("kB", 1e3), ("B", 1))) == (2.5, "MB")
    assert common.largest_unit(0.5, (("kB", 1e3), ("B", 1))) == (0.5, "B")  # below the last: in the last
    assert [_size(n) for n in (512, 1536, 2_500_000, 3_000_000_000)] == ["512 B", "1.5 kB", "2.5 MB", "3.0 GB"]
    now = dt.datetime.now().astimezone()
    ages = [age((now - dt.timedelta(seconds=s)).isoformat()) for s in (30, 150, 7300, 3 * 86400 + 5)]
    assert ages == ["30s", "2m", "2h", "3d"]  # under the header "age"
    assert age(None) == age("not a date") == "-"



def test_metrics_table_shows_fraction_columns_in_percent_with_the_unit_in_the_header():
    from rich.console import Console

    def rendered(**options) -> list[list[str]]:
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(common.metrics_table("t", [{"model": "a", "acc@1": 0.4995, "bleu4": float("nan"),
                                                   "cider": 1.2, "loss": 0.123456}], **options))
        lines = [line for line in console.export_text().splitlines() if "┃" in line or "│" in line]
        return [[cell.strip() for cell in re.split("[┃│]", line)[1:-1]] for line in lines]

    assert rendered(percent=True, labels={"bleu4": "BLEU-4"}) == [
        ["model", "acc@1 %", "BLEU-4 %", "cider ×100", "loss"], ["a", "49.95", "-", "120.00", "0.12"]]
    assert rendered() == [["model", "acc@1", "bleu4", "cider", "loss"], ["a", "0.50", "nan", "1.20", "0.12"]]


@pytest.mark.parametrize("argv, advice", [
    (["pretrain", "--steps", "3"], "continue the run with `dmclip pretrain --resume <run directory>`"),
    (["-v", "distill", "--alpha", "0,1"], "continue the run with `dmclip distill --resume <run directory>`"),
    (["capfilt", "--out", "data/boot"], "continue the run with `dmclip capfilt --resume <run directory>`"),
    (["reinforce", "--out", "stores/x"], "run the same `dmclip reinforce` command again"),
    (["eval", "zero-shot", "--model", "run:x"], "`dmclip eval zero-shot` has no --resume: run it again"),
    (["compress", "serve", "--port", "0"], "`dmclip compress serve` has no --resume: run it again"),
    (["export", "run:x"], "run `dmclip export` again"),
    (["runs", "list"], "run `dmclip runs list` again"),
])
def test_ctrl_c_names_a_way_on_that_the_command_has(argv, advice):
    """Only the commands that take --resume are told to use it."""
    message = interrupted_message(argv)
    assert message.startswith(advice)
    assert ("--resume <run directory>" in message) == ("continue the run" in advice)


def test_ctrl_c_prints_one_line_with_the_way_on(tmp_path, monkeypatch, capsys):
    import dmclip.pretrain
    import dmclip.runs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # the runner calls the command's run function: interrupt it there (patching dmclip.pretrain.run would not reach it)
    monkeypatch.setattr(dmclip.pretrain, "COMMAND", dataclasses.replace(dmclip.pretrain.COMMAND, run=interrupted))
    assert main(["pretrain", "--runs-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted; continue the run with `dmclip pretrain --resume <run directory>`" in err
    (run,) = dmclip.runs.find_runs(tmp_path)
    assert run.status == "interrupted" and str(run.path) in "".join(err.split())  # Rich wraps the path at 80 columns
    monkeypatch.setattr(dmclip.runs, "find_runs", interrupted)
    assert main(["runs", "list"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; run `dmclip runs list` again" in err and "--resume" not in err

"""Run directories: never overwritten, atomic checkpoints, honest statuses, readable after a kill."""

from __future__ import annotations

import csv
import datetime as real_dt
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dmclip import runs as runs_module
from dmclip.cli.main import main
from dmclip.cli.runs import differing_parts, short_names
from dmclip.config import field
from dmclip.errors import DmclipError
from dmclip.io import torch_load
from dmclip.runs import RunDir, find_runs, latest_run

REPO = Path(__file__).resolve().parents[1]


@dataclass
class TinyConfig:
    seed: int = field(0, "random seed")
    lr: float = field(1e-3, "learning rate", min=0.0)


def _create(root: Path, name: str = "demo", config=None, command: str = "distill") -> RunDir:
    return RunDir.create(command, name, config or TinyConfig(), root=root, recipe_text="lr: 0.001\n",
                         overrides=["seed=0"], argv=["dmclip", command], seed=0)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def _python(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------------------ layout, naming


def test_create_writes_the_documented_layout(tmp_path):
    run = _create(tmp_path, "my run/1")
    assert run.path.parent == tmp_path / "distill"
    stamp, rest = run.path.name[:15], run.path.name[16:]
    real_dt.datetime.strptime(stamp, "%Y%m%d-%H%M%S")
    assert rest.startswith("my-run-1-") and len(rest.rsplit("-", 1)[1]) == 6
    assert (run.path / "recipe.yaml").read_text() == "lr: 0.001\n"
    assert (run.path / "overrides.txt").read_text() == "seed=0\n"
    assert (run.path / "resolved.yaml").read_text().startswith("command: distill\nseed: 0\nlr: 0.001\n")
    info = json.loads((run.path / "run.json").read_text())
    assert info["status"] == "created" and info["command"] == "distill" and info["name"] == "my run/1"
    for key in ("schema_version", "dmclip_version", "argv", "git_sha", "python", "torch", "device", "seed",
                "start_time", "end_time", "error"):
        assert key in info
    assert run.resolved_config(TinyConfig) == TinyConfig()


def test_a_run_directory_holds_only_what_was_produced(tmp_path):
    """No recipe, no overrides (an eval run): no empty recipe.yaml, overrides.txt, log.txt or checkpoints/."""
    run = RunDir.create("eval", "zero-shot", TinyConfig(), root=tmp_path, argv=["dmclip", "eval"])
    with run.active():
        pass
    assert sorted(p.name for p in run.path.iterdir()) == ["resolved.yaml", "run.json"]
    with run.active():
        runs_module.log.info("first line")  # the first line makes log.txt, the first checkpoint checkpoints/
        run.save_checkpoint({"step": 1})
    assert "first line" in (run.path / "log.txt").read_text() and run.load_checkpoint()["step"] == 1
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoints", "log.txt", "resolved.yaml", "run.json"]


def test_a_checkpoints_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, monkeypatch):
    run = _create(tmp_path)

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "mkdir", disk_full)
    with pytest.raises(DmclipError, match="could not write .*checkpoints/last.pt: No space left on device"):
        run.save_checkpoint({"step": 1})


def test_same_second_same_config_never_reuses_a_directory(tmp_path, monkeypatch):
    frozen = real_dt.datetime(2030, 1, 2, 3, 4, 5)

    class Frozen(real_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen if tz is None else frozen.replace(tzinfo=tz)

    monkeypatch.setattr(runs_module, "dt", types.SimpleNamespace(datetime=Frozen))
    made = [_create(tmp_path) for _ in range(3)]
    assert len({r.path for r in made}) == 3
    assert all(r.path.name.startswith("20300102-030405-demo-") for r in made)
    assert [r.path.name.endswith(s) for r, s in zip(made[1:], ("-2", "-3"))] == [True, True]
    made[0].write_text("report.md", "first")
    assert (made[0].path / "report.md").read_text() == "first"  # the others did not touch it


def test_open_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(DmclipError, match="is not a dmclip run directory"):
        RunDir.open(tmp_path)


# --------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_truncated_file(tmp_path):
    run = _create(tmp_path)
    run.save_checkpoint({"step": 3, "weight": torch.arange(4.0)})
    state = run.load_checkpoint()
    assert state["step"] == 3 and torch.equal(state["weight"], torch.arange(4.0))
    data = run.checkpoint_path().read_bytes()
    run.checkpoint_path("cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DmclipError, match="cut.pt cannot be read") as info:
        run.load_checkpoint("cut.pt")
    assert "truncated" in info.value.hint
    with pytest.raises(DmclipError, match="does not exist"):
        torch_load(tmp_path / "none.pt")


def test_failed_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = _create(tmp_path)
    run.save_checkpoint({"step": 1})

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs_module.os, "replace", disk_full)
    with pytest.raises(DmclipError, match="No space left on device") as info:
        run.save_checkpoint({"step": 2, "big": torch.zeros(1000)})
    assert "previous file is unchanged" in info.value.hint
    monkeypatch.undo()
    assert run.load_checkpoint()["step"] == 1
    assert sorted(p.name for p in run.checkpoint_path().parent.iterdir()) == ["last.pt"]


def test_kill_between_write_and_rename_leaves_the_previous_checkpoint(tmp_path):
    run = _create(tmp_path)
    run.save_checkpoint({"step": 1})
    # the child writes a 4 MB checkpoint and is SIGKILLed at the moment it would rename it into place
    proc = _python("""
        import os, signal, sys, torch
        from dmclip.runs import RunDir
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
        RunDir.open(sys.argv[1]).save_checkpoint({"step": 2, "big": torch.zeros(1_000_000)})
    """, str(run.path))
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in run.checkpoint_path().parent.iterdir() if p.name != "last.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.")  # the full new file, never as last.pt
    assert run.load_checkpoint()["step"] == 1
    run.save_checkpoint({"step": 3})  # the next save clears the orphan
    assert [p.name for p in run.checkpoint_path().parent.iterdir()] == ["last.pt"]


# ------------------------------------------------------------------------------------ statuses


def test_status_running_then_completed(tmp_path):
    run = _create(tmp_path)
    assert run.status == "created"
    with run.active():
        assert run.status == "running" and run.info["pid"] == os.getpid()
        assert run.display_status() == "running"
        runs_module.log.info("hello from the run")
    info = run.info
    assert info["status"] == "completed" and info["end_time"] and info["error"] is None
    assert "hello from the run" in (run.path / "log.txt").read_text()


@pytest.mark.parametrize("exc, status, error", [
    (DmclipError("data ran out", "add data"), "failed", "data ran out (hint: add data)"),
    (ValueError("bad shape"), "failed", "ValueError: bad shape"),
    (KeyboardInterrupt(), "interrupted", "interrupted (Ctrl-C or SIGTERM)"),
])
def test_status_failed_or_interrupted_keeps_the_error(tmp_path, exc, status, error):
    run = _create(tmp_path)
    with pytest.raises(type(exc)), run.active():
        raise exc
    assert (run.status, run.info["error"]) == (status, error)


def test_sigterm_marks_the_run_interrupted(tmp_path):
    run = _create(tmp_path)
    proc = _python("""
        import sys, time
        from dmclip.runs import RunDir
        run = RunDir.open(sys.argv[1])
        with run.active():
            run.log_metrics({"step": 1, "loss": 2.0})
            print("ready", flush=True)
            time.sleep(60)
    """, str(run.path))
    assert proc.stdout.readline().strip() == "ready"
    assert run.display_status() == "running"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "RunInterrupted" in stderr
    assert run.status == "interrupted" and run.info["end_time"]


def test_resume_records_the_new_process(tmp_path):
    run = _create(tmp_path)
    with pytest.raises(KeyboardInterrupt), run.active():
        raise KeyboardInterrupt
    with RunDir.open(run.path).active():
        assert run.info["resumed_at"] is not None
    assert run.status == "completed"


def test_dead_running_process_shows_as_crashed(tmp_path):
    run = _create(tmp_path)
    run.log_metrics({"step": 40, "loss": 1.5})
    run.update_info(status="running", pid=_dead_pid(), host=socket.gethostname())
    assert run.status == "running"  # the file is not rewritten...
    assert run.display_status() == "crashed"  # ...but nobody is told it is still running
    assert run.last_step() == 40


def test_reused_pid_is_not_mistaken_for_the_run(tmp_path):
    run = _create(tmp_path)
    start = runs_module._process_start(os.getpid())
    run.update_info(status="running", pid=os.getpid(), pid_start=start, host=socket.gethostname())
    assert run.display_status() == "running"
    run.update_info(pid_start=(start or 0) + 12345)  # same pid, another process's start time
    assert run.display_status() == "crashed"
    run.update_info(host="another-machine")  # a run on another host cannot be checked from here
    assert run.display_status() == "running"


# ------------------------------------------------------------------------------------- metrics


def test_metrics_survive_a_cut_last_line(tmp_path):
    run = _create(tmp_path)
    for step in range(3):
        run.log_metrics({"step": step, "loss": 1.0 / (step + 1), "nan": float("nan")})
    with open(run.path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')  # the process died here
    assert [r["step"] for r in run.metrics()] == [0, 1, 2]
    assert run.metrics()[0]["nan"] is None
    reopened = RunDir.open(run.path)
    reopened.log_metrics({"step": 3, "loss": 0.2})  # resumed: the new row starts on its own line
    assert [r["step"] for r in reopened.metrics()] == [0, 1, 2, 3]
    reopened.truncate_metrics(1)
    assert [r["step"] for r in reopened.metrics()] == [0, 1]


def test_results_round_trip(tmp_path):
    run = _create(tmp_path)
    assert run.results() is None
    run.write_results({"acc1": torch.tensor(0.5), "inf": float("inf")})
    assert run.results() == {"acc1": 0.5, "inf": "inf"}


# ----------------------------------------------------------------------------- finding, CLI


def test_find_and_latest_run(tmp_path):
    first, second = _create(tmp_path, "a"), _create(tmp_path, "b", command="eval")
    with first.active():
        pass
    assert {r.path for r in find_runs(tmp_path)} == {first.path, second.path}
    assert [r.path for r in find_runs(tmp_path, "eval")] == [second.path]
    assert latest_run("distill", tmp_path).path == first.path
    assert latest_run("eval", tmp_path) is None  # not completed
    assert find_runs(tmp_path / "missing") == []


@pytest.fixture
def wide_console(monkeypatch):
    """One table row per line whatever the terminal, so a row can be checked as a line."""
    from rich.console import Console

    monkeypatch.setattr("dmclip.cli.runs.console", Console(width=250))


def test_runs_list_shows_crashed_with_last_step_and_survives_damage(tmp_path, capsys, wide_console):
    done = _create(tmp_path, "done")
    with done.active():
        done.write_results({"zeroshot_acc1": 0.4321})
    crashed = _create(tmp_path, "dead")
    crashed.log_metrics({"step": 77, "loss": 0.9})
    crashed.update_info(status="running", pid=_dead_pid(), host=socket.gethostname())
    damaged = _create(tmp_path, "broken")
    (damaged.path / "run.json").write_text("{not json")
    assert main(["runs", "list", "--runs-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    dead = next(line for line in lines if " dead " in line)
    assert "crashed" in dead and "loss 0.9 " in dead and " 77 " in dead
    assert "completed" in next(line for line in lines if " done " in line)
    assert "acc@1 43.21 %" in next(line for line in lines if " done " in line)  # percent, like every table
    assert "damaged" in next(line for line in lines if " broken " in line)


def test_runs_list_filters_by_command_and_says_when_empty(tmp_path, capsys):
    _create(tmp_path, "x", command="eval")
    assert main(["runs", "list", "--runs-dir", str(tmp_path), "--command", "pretrain"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no runs under" in err


def _stamped(root: Path, stamp: str, name: str, config=None, command: str = "eval", parent: Path | None = None,
             results: dict | None = None) -> RunDir:
    """A completed run made at ``stamp`` (YYYYmmdd-HHMMSS)."""
    frozen = real_dt.datetime.strptime(stamp, "%Y%m%d-%H%M%S")

    class Frozen(real_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen if tz is None else frozen.replace(tzinfo=tz)

    original = runs_module.dt
    runs_module.dt = types.SimpleNamespace(datetime=Frozen)
    try:
        run = RunDir.create(command, name, config or TinyConfig(), root=root, parent=parent, argv=["dmclip"])
    finally:
        runs_module.dt = original
    run.update_info(status="completed", start_time=frozen.astimezone().isoformat())
    run.write_results(results or {"metrics": {"acc1": 0.625}})
    return run


@pytest.fixture
def columns_80(monkeypatch):
    """A terminal 80 columns wide, as Rich reads it from $COLUMNS."""
    from rich.console import Console

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr("dmclip.cli.runs.console", Console())


def _rows(out: str) -> list[list[str]]:
    """The body rows of a borderless table, each as its cells."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    return [re.split(r"\s{2,}", line.strip()) for line in lines[rule + 1:] if line.strip()]


def test_runs_list_fits_80_columns_one_line_per_run_with_the_part_that_tells_runs_apart(tmp_path, capsys, columns_80,
                                                                                        monkeypatch):
    """Typical runs: two evals of one model with other data (same name, other config hash), two pretrains with
    the same name and config a minute apart, sweep members. Each is one line of at most 80 characters, and what
    tells two runs apart (hash, time stamp, seed) is on screen; --wide and --format show the whole names."""
    from rich.console import Console

    runs = [_stamped(tmp_path, "20261207-101500", "zero-shot-builtin-world-vit", TinyConfig(seed=1)),
            _stamped(tmp_path, "20261207-101600", "zero-shot-builtin-world-vit", TinyConfig(seed=2)),
            _stamped(tmp_path, "20261207-101700", "pretrain", command="pretrain",
                     results={"zeroshot": {"acc1": 0.038}}),
            _stamped(tmp_path, "20261207-101800", "pretrain", command="pretrain")]
    sweep = tmp_path / "distill" / "20261207-102000-sweep-demo"
    runs += [_stamped(tmp_path, "20261207-102000", f"demo-alpha{alpha}-seed0", TinyConfig(lr=alpha), "distill",
                      parent=sweep) for alpha in (0.25, 0.75)]
    assert main(["runs", "list", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    rows = _rows(out)
    assert len(rows) == len(runs)  # one line per run: no row wraps
    shown = {row[1]: row for row in rows}
    assert len(shown) == len(runs)  # every run has a name of its own
    hashes = [r.path.name[-6:] for r in runs[:2]]
    assert all(any(name.endswith(h) for name in shown) for h in hashes)  # same name: the config hash says which
    assert {"20261207-101700-pretrain", "20261207-101800-pretrain"} <= set(shown)  # same config: the time stamp
    assert {"demo-alpha0.25-seed0", "demo-alpha0.75-seed0"} <= set(shown)  # no stamp or hash where none is needed
    assert shown["20261207-101700-pretrain"][3] == "acc@1 3.80 %"

    monkeypatch.setattr("dmclip.cli.runs.console", Console(width=250))
    assert main(["runs", "list", "--runs-dir", str(tmp_path), "--wide", "--command", "eval"]) == 0
    out = capsys.readouterr().out
    assert all(f" {r.path} " in out for r in runs[:2])  # --wide: whole directories
    assert main(["runs", "list", "--runs-dir", str(tmp_path), "--format", "md"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0] == "| command | run | status | metric | value | step | started | directory |"
    assert f"| pretrain | {runs[2].path.name} | completed | zeroshot.acc1 % | 3.80 | - |" in "\n".join(md)
    assert main(["runs", "list", "--runs-dir", str(tmp_path), "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    row = next(r for r in table if r["run"] == runs[2].path.name)
    assert (row["metric"], row["value"], row["directory"]) == ("zeroshot.acc1", "0.038", str(runs[2].path))
    assert main(["runs", "list", "--runs-dir", str(tmp_path), "--format", "html"]) == 2
    assert "use --format table" in capsys.readouterr().err


def test_short_names_and_differing_parts():
    assert short_names(["20261207-101500-a-0eb6a6", "20261207-101600-b-0eb6a6"]) == ["a", "b"]
    assert short_names(["20261207-101500-a-0eb6a6", "20261207-101600-a-123abc"]) == ["a-0eb6a6", "a-123abc"]
    assert short_names(["20261207-101500-a-0eb6a6", "20261207-101500-a-0eb6a6-2", "my-own-dir"]) == [
        "20261207-101500-a-0eb6a6", "20261207-101500-a-0eb6a6-2", "my-own-dir"]
    values = ["world-train:image_size=32,count=20000", "world-train:image_size=64,count=20000", "absent"]
    assert differing_parts(values, 40) == values  # it fits: whole
    assert differing_parts(values, 20) == ["…image_size=32…", "…image_size=64…", "absent"]
    assert differing_parts(["run:runs/distill/x-alpha0.25", "run:runs/distill/x-alpha0.75"], 12) == [
        "…x-alpha0.25", "…x-alpha0.75"]
    assert differing_parts(["a" * 30, "a" * 30], 10) == ["a" * 30] * 2  # nothing differs: left to the table


def test_runs_show_and_compare(tmp_path, capsys, wide_console):
    a = _create(tmp_path, "a", TinyConfig(lr=0.1))
    b = _create(tmp_path, "b", TinyConfig(lr=0.2))
    a.write_results({"acc1": 0.5, "train": {"loss": 1.25}})
    b.write_results({"acc1": 0.75, "train": {"loss": 1.5}})
    assert main(["runs", "show", str(a.path)]) == 0
    out = capsys.readouterr().out
    assert "created" in out and re.search(r"acc1 % +│ +50\.00 ", out) and re.search(r"train\.loss +│ +1\.25 ", out)
    assert main(["runs", "compare", str(a.path), str(b.path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"acc1 % +50\.00 +75\.00", out)  # percent, the unit beside the key
    lr_row = next(line for line in out.splitlines() if line.strip("│ ").startswith("lr "))
    assert "0.1" in lr_row and "0.2" in lr_row
    assert "seed" not in out.split("config keys that differ")[1]  # equal keys are not listed
    assert main(["runs", "compare", str(a.path)]) == 2
    assert main(["runs", "show", str(tmp_path)]) == 2
    assert "is not a dmclip run directory" in capsys.readouterr().err


def test_runs_compare_fits_80_columns_and_shows_where_values_differ(tmp_path, capsys, columns_80):
    spec = "world-train:image_size={},count=20000,seed=0"
    a, b = [_stamped(tmp_path, "20261207-101500", "pretrain", TinyConfig(seed=seed), "pretrain",
                     results={"zeroshot": {"acc1": acc}}) for seed, acc in ((0, 0.038), (1, 0.0175))]
    for run, size in ((a, 32), (b, 64)):
        path = run.path / "resolved.yaml"
        path.write_text(path.read_text() + f"data:\n  train: {spec.format(size)}\n")
    assert main(["runs", "compare", str(a.path), str(b.path)]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    row = next(line for line in out.splitlines() if line.startswith("data.train"))
    assert "image_size=32" in row and "image_size=64" in row  # the part that differs, not the shared start
    assert re.search(r"zeroshot\.acc1 % +3\.80 +1\.75", out)
    assert main(["runs", "compare", str(a.path), str(b.path), "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert f"| metric | {a.path.name} | {b.path.name} |" in md and "| zeroshot.acc1 % | 3.80 | 1.75 |" in md
    assert f"| data.train | {spec.format(32)} | {spec.format(64)} |" in md
    assert main(["runs", "compare", str(a.path), str(b.path), "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["table", "key", a.path.name, b.path.name]
    assert ["metric", "zeroshot.acc1", "0.038", "0.0175"] in rows and ["config", "seed", "0", "1"] in rows
    assert ["config", "data.train", spec.format(32), spec.format(64)] in rows


# ------------------------------------------------------------------------------------ runs report


def test_runs_report_renders_the_runs_results_and_the_config_that_differs(tmp_path, capsys):
    """The docs' tables come from this command: each row must carry the run's own results, the config keys
    that differ (and none that do not), and a footer that names the command and the seeds."""
    import csv

    a = _create(tmp_path, "a", TinyConfig(seed=0, lr=1e-3))
    b = _create(tmp_path, "b", TinyConfig(seed=0, lr=3e-3))
    a.write_results({"zeroshot": {"acc1": 0.125, "acc5": 0.5}, "train": {"samples_per_s": 250.0}})
    b.write_results({"zeroshot": {"acc1": 0.5, "acc5": 0.875}, "train": {"samples_per_s": 240.0}})
    assert main(["runs", "report", str(a.path), str(b.path), "--metrics", "zeroshot.acc1,train.samples_per_s"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert lines[0] == "| run | lr | zeroshot.acc1 % | train.samples_per_s |"
    assert lines[2] == f"| {a.path.name} | 0.001 | 12.50 | 250 |"
    assert lines[3] == f"| {b.path.name} | 0.003 | 50.00 | 240 |"
    assert "Rendered by `dmclip runs report" in out and "seeds: 0" in out
    assert main(["runs", "report", str(a.path), str(b.path), "--format", "csv"]) == 0  # CSV: fractions
    rows = list(csv.reader(capsys.readouterr().out.strip().splitlines()))
    assert rows[0] == ["run", "lr", "zeroshot.acc1", "zeroshot.acc5"] and rows[1][2:] == ["0.125", "0.5"]
    assert main(["runs", "report", str(a.path), str(b.path), "--format", "csv", "--percent"]) == 0
    rows = list(csv.reader(capsys.readouterr().out.strip().splitlines()))
    assert rows[0][2] == "zeroshot.acc1 %" and rows[1][2:] == ["12.50", "50.00"]


def test_a_key_an_older_run_lacks_differs_only_where_the_newer_one_sets_it(tmp_path, capsys, wide_console):
    """A setting added since an older run: beside the new run's [] or default it is no difference (not
    `- vs []`); set to something else, it is one, and the older run's cell says `absent`, not `-`."""
    from dmclip.pretrain import PretrainConfig

    def pretrain_run(name: str, drop: tuple[str, ...] = (), **train) -> RunDir:
        config = PretrainConfig()
        for key, value in train.items():
            setattr(config.train, key, value)
        run = _create(tmp_path, name, config, command="pretrain")
        path = run.path / "resolved.yaml"
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if line.strip().split(":")[0] not in drop))
        run.write_results({"zeroshot": {"acc1": 0.25}})
        return run

    old = pretrain_run("old", drop=("report_to", "amp"))  # made before train.report_to and train.amp existed
    assert "report_to" not in (old.path / "resolved.yaml").read_text()
    same = pretrain_run("same")  # report_to: [], amp: off (the default)
    assert main(["runs", "report", str(old.path), str(same.path), "--metrics", "zeroshot.acc1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "| run | zeroshot.acc1 % |"
    assert main(["runs", "compare", str(old.path), str(same.path)]) == 0
    assert "config: identical" in capsys.readouterr().out

    new = pretrain_run("new", report_to=["tensorboard"], amp="bf16", lr=1e-3)
    assert main(["runs", "report", str(old.path), str(same.path), str(new.path), "--metrics", "zeroshot.acc1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert lines[0] == "| run | train.lr | train.amp | train.report_to | zeroshot.acc1 % |"
    assert lines[2] == f"| {old.path.name} | 0.0005 | absent | absent | 25.00 |"
    assert lines[3] == f"| {same.path.name} | 0.0005 | off | [] | 25.00 |"
    assert lines[4] == f"| {new.path.name} | 0.001 | bf16 | ['tensorboard'] | 25.00 |"
    assert main(["runs", "compare", str(old.path), str(new.path)]) == 0
    amp_row = next(line for line in capsys.readouterr().out.splitlines() if line.strip("│ ").startswith("train.amp"))
    assert "absent" in amp_row and "bf16" in amp_row


def test_runs_report_groups_runs_over_seeds_with_t_intervals(tmp_path, capsys):
    """--group-by lr: one row per learning rate, each metric's mean ± std [95 % t-interval] over its seeds,
    the same numbers dmclip.metrics.stats.seed_interval gives; a group of one run is called one run."""
    import numpy as np
    from scipy.stats import t

    values = {1e-3: [0.125, 0.25, 0.1875], 3e-3: [0.5, None]}  # None: a run without the result
    runs = []
    for lr, accs in values.items():
        for seed, acc in enumerate(accs):
            run = _create(tmp_path, f"lr{lr}-s{seed}", TinyConfig(seed=seed, lr=lr))
            run.write_results({"zeroshot": {"acc1": acc}})
            runs.append(str(run.path))
    assert main(["runs", "report", *runs, "--metrics", "zeroshot.acc1", "--group-by", "lr"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert lines[0] == "| lr | runs | seeds | zeroshot.acc1 % |"
    accs = np.array(values[1e-3])
    half = t.ppf(0.975, 2) * accs.std(ddof=1) / np.sqrt(3)
    assert lines[2] == (f"| 0.001 | 3 | 0, 1, 2 | {100 * accs.mean():.2f} ± {100 * accs.std(ddof=1):.2f} "
                        f"[{100 * (accs.mean() - half):.2f}, {100 * (accs.mean() + half):.2f}] |")
    assert lines[3] == "| 0.003 | 2 | 0, 1 | 50.00 (1 run) (1 of 2 runs without it) |"
    assert main(["runs", "report", *runs, "--metrics", "zeroshot.acc1", "--group-by", "lrr"]) == 2
    err = capsys.readouterr().err
    assert "no run's config has the key 'lrr'" in err and "lr" in err


def test_runs_report_names_a_missing_result_key(tmp_path, capsys):
    a = _create(tmp_path, "a")
    a.write_results({"zeroshot": {"acc1": 0.1}})
    assert main(["runs", "report", str(a.path), "--metrics", "zeroshot.ac1"]) == 2
    err = capsys.readouterr().err
    assert "no run has the result key 'zeroshot.ac1'" in err and "zeroshot.acc1" in err


# ------------------------------------------------------------------------------------- runs clean


def _with_status(root: Path, name: str, status: str, parent: Path | None = None, days_old: float = 0) -> RunDir:
    run = RunDir.create("distill", name, TinyConfig(), root=root, parent=parent, argv=["dmclip"])
    started = real_dt.datetime.now().astimezone() - real_dt.timedelta(days=days_old)
    fields = {"status": status, "start_time": started.isoformat(timespec="seconds")}
    if status in ("running", "crashed"):  # running: this process; crashed: a process that is gone
        fields.update(status="running", pid=os.getpid() if status == "running" else _dead_pid(),
                      pid_start=runs_module._process_start(os.getpid()) if status == "running" else None,
                      host=socket.gethostname())
    run.update_info(**fields)
    run.log_metrics({"step": 1, "loss": 1.0})
    return run


@pytest.fixture
def mixed_runs(tmp_path) -> dict[str, RunDir]:
    return {status: _with_status(tmp_path, status, status)
            for status in ("completed", "failed", "interrupted", "crashed", "running", "created")}


def test_clean_removes_failed_interrupted_and_crashed_runs_and_keeps_the_rest(tmp_path, mixed_runs, capsys):
    assert main(["runs", "clean", "--runs-dir", str(tmp_path), "--yes"]) == 0
    out = capsys.readouterr().out
    left = {status for status, run in mixed_runs.items() if run.path.exists()}
    assert left == {"completed", "running", "created"}  # a live process's run and a finished result stay
    assert "removed 3 run(s)" in out and str(mixed_runs["failed"].path) in out


def test_clean_lists_first_and_removes_nothing_without_yes(tmp_path, mixed_runs, capsys, monkeypatch):
    assert main(["runs", "clean", "--runs-dir", str(tmp_path), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "would remove: 3 run(s)" in out and "nothing removed" in err
    assert main(["runs", "clean", "--runs-dir", str(tmp_path)]) == 2  # no terminal to ask at: refuse
    err = capsys.readouterr().err
    assert "error: refusing to remove 3 run directories without confirmation" in err and "--yes" in err

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    assert main(["runs", "clean", "--runs-dir", str(tmp_path)]) == 0
    assert all(run.path.exists() for run in mixed_runs.values())  # answered no
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    assert main(["runs", "clean", "--runs-dir", str(tmp_path)]) == 0
    assert not mixed_runs["failed"].path.exists() and mixed_runs["completed"].path.exists()


def test_clean_by_status_and_age(tmp_path, capsys):
    old = _with_status(tmp_path, "old", "failed", days_old=10)
    new = _with_status(tmp_path, "new", "failed", days_old=1)
    stopped = _with_status(tmp_path, "stopped", "interrupted", days_old=10)
    assert main(["runs", "clean", "--runs-dir", str(tmp_path), "--status", "failed", "--older-than", "7d",
                 "--yes"]) == 0
    assert (old.path.exists(), new.path.exists(), stopped.path.exists()) == (False, True, True)
    for argv, message in [(["--status", "completed"], "a completed run is never removed by a filter"),
                          (["--status", "running"], "a running run is never removed by a filter"),
                          (["--status", "faild"], "'faild' is not a status"),
                          (["--older-than", "a week"], "is not a duration"),
                          ([str(new.path), "--status", "failed"], "ambiguous")]:
        assert main(["runs", "clean", "--runs-dir", str(tmp_path), *argv[:1], *argv[1:]]
                    if not argv[0].startswith("/") else ["runs", "clean", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "hint:" in err, argv
    assert new.path.exists()


def test_clean_removes_a_named_completed_run_but_never_a_running_one(tmp_path, mixed_runs, capsys):
    running, completed = mixed_runs["running"], mixed_runs["completed"]
    assert main(["runs", "clean", str(completed.path), str(running.path), "--yes"]) == 2
    err = capsys.readouterr().err
    assert f"{running.path} is running (pid {os.getpid()}" in err and "stop that process first" in err
    assert completed.path.exists() and running.path.exists()  # refused before anything was removed
    assert main(["runs", "clean", str(completed.path), "--yes"]) == 0
    assert not completed.path.exists() and running.path.exists()


def test_clean_takes_a_sweep_directory_with_its_last_run(tmp_path, capsys):
    sweep = tmp_path / "distill" / "20261207-102000-sweep-demo"
    members = [_with_status(tmp_path, f"alpha{a}", "failed", parent=sweep) for a in (0, 1)]
    (sweep / "resolved.yaml").write_text("command: distill\n")
    kept = tmp_path / "distill" / "20261207-103000-sweep-kept"
    _with_status(tmp_path, "alpha0", "failed", parent=kept)
    done = _with_status(tmp_path, "alpha1", "completed", parent=kept)
    assert main(["runs", "clean", "--runs-dir", str(tmp_path), "--dry-run"]) == 0
    assert "would remove: 3 run(s) and 1 sweep directory" in capsys.readouterr().out
    assert main(["runs", "clean", "--runs-dir", str(tmp_path), "--yes"]) == 0
    assert not sweep.exists() and not any(m.path.exists() for m in members)
    assert kept.is_dir() and done.path.exists()  # a sweep with a completed run stays, with that run
    assert (tmp_path / "distill").is_dir()  # the command's folder is no sweep
    sweep2 = tmp_path / "distill" / "20261207-104000-sweep-named"
    named = [_with_status(tmp_path, f"alpha{a}", "completed", parent=sweep2) for a in (0, 1)]
    assert main(["runs", "clean", str(sweep2), str(named[0].path), "--yes"]) == 0  # a sweep: its runs, itself
    assert not sweep2.exists() and not any(m.path.exists() for m in named)

"""SIGKILL a real ``dmclip`` process at a chosen point, then ``--resume`` it (see tests/test_kill_resume.py).

The child (``python -c CHILD <dmclip argv>``) pauses where ``KILL_MODE``/``KILL_AT`` say; the test sees the
evidence in the run directory and sends the SIGKILL itself, so no timing is guessed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from dmclip.cli.main import main
from dmclip.runs import RunDir, find_runs
from helpers.cli import main_at

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # per child process; a loaded 2-core machine needs ~30 s for one at these sizes

# The child: `python -c CHILD <dmclip argv>`. KILL_MODE/KILL_AT pick where it stops and waits to be killed.
CHILD = textwrap.dedent("""
    import os, signal, sys, tempfile
    from pathlib import Path
    import dmclip.io as io
    import dmclip.runs as runs

    mode, at = os.environ.get("KILL_MODE", ""), int(os.environ.get("KILL_AT", "0"))
    if mode == "after-step":
        log_metrics = runs.RunDir.log_metrics

        def paused_log_metrics(self, record):
            log_metrics(self, record)
            if record.get("step") == at and "loss" in record:
                signal.pause()  # the test sees this row in metrics.jsonl and sends SIGKILL

        runs.RunDir.log_metrics = paused_log_metrics
    elif mode == "mid-checkpoint":
        save_checkpoint, write = runs.RunDir.save_checkpoint, io.atomic_write_bytes
        saving = {}

        def tracked_save(self, state, name="last.pt"):
            saving["step"] = state.get("step")
            return save_checkpoint(self, state, name)

        def half_write(path, data):
            path = Path(path)
            if path.name == "last.pt" and saving.get("step") == at:  # as atomic_write_bytes, cut half-way
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                os.write(fd, data[: len(data) // 2])
                os.fsync(fd)
                signal.pause()  # the test sees the temporary file and sends SIGKILL
            return write(path, data)

        runs.RunDir.save_checkpoint, io.atomic_write_bytes = tracked_save, half_write
    from dmclip.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


def start_child(argv: list[str], mode: str, at: int, log: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "KILL_MODE": mode,
           "KILL_AT": str(at)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-c", CHILD, *argv], env=env, stdout=out, stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, ready, log: Path, what: str) -> None:
    """Poll the run directory until ``ready()``; then SIGKILL the child and reap it."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the child exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)  # polling interval only; nothing is asserted about time
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def the_run(root: Path) -> Path | None:
    runs = find_runs(root)
    return runs[0].path if runs else None


def logged_step(root: Path, step: int) -> bool:
    path = the_run(root)
    return path is not None and any(r.get("step") == step and "loss" in r for r in RunDir(path).metrics())


def checkpoint_tmp(root: Path) -> bool:
    path = the_run(root)
    return path is not None and any((path / "checkpoints").glob(".last.pt.*.tmp"))


def comparable(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows without the timing column."""
    return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in rows]


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Bitwise: every weight in model.safetensors, every metrics row, the final loss in results.json."""
    a, b = load_file(str(resumed / "model" / "model.safetensors")), load_file(str(reference / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in b:
        assert torch.equal(a[key], b[key]), key
    assert comparable(RunDir(resumed).metrics()) == comparable(RunDir(reference).metrics())
    assert [r["step"] for r in RunDir(resumed).metrics()] == [1, 2, 3, 4, 5, 6]
    assert RunDir(resumed).results()["train"]["loss"] == RunDir(reference).results()["train"]["loss"]
    assert RunDir(resumed).results()["train"]["resumed_from"] == 2


def runs_list_line(root: Path, run: Path, capsys, monkeypatch) -> str:
    monkeypatch.setattr("dmclip.cli.runs.console", Console(width=250))
    capsys.readouterr()
    assert main(["runs", "list", "--runs-dir", str(root), "--wide"]) == 0  # --wide: the whole directory
    return next(line for line in capsys.readouterr().out.splitlines() if run.name[:20] in line)


def kill_twice_then_resume(argv: list[str], root: Path, tmp_path: Path, capsys, monkeypatch, threads: int = 1) -> Path:
    """Kill after step 3; resume and kill while the step-4 checkpoint is half written; resume to the end, every
    process with ``threads`` torch threads."""
    command = argv[0]
    log = tmp_path / "child.log"
    proc = start_child([*argv, "--runs-dir", str(root)], "after-step", 3, log, threads)
    kill_when(proc, lambda: logged_step(root, 3), log, "metrics row for step 3")
    run = RunDir(the_run(root))
    assert run.status == "running" and run.display_status() == "crashed"
    line = runs_list_line(root, run.path, capsys, monkeypatch)
    assert "crashed" in line and " 3 " in line, line  # the status and the last step it logged
    assert run.load_checkpoint()["step"] == 2

    proc = start_child([command, "--resume", str(run.path)], "mid-checkpoint", 4, log, threads)
    kill_when(proc, lambda: checkpoint_tmp(root), log, "temporary checkpoint file")
    assert run.display_status() == "crashed"
    assert run.load_checkpoint()["step"] == 2  # the previous checkpoint is intact and readable

    assert main_at(threads, [command, "--resume", str(run.path)]) == 0
    assert run.status == "completed"
    assert not list((run.path / "checkpoints").glob("*.tmp"))  # the orphan was cleaned up by the next save
    assert find_runs(root) and len(find_runs(root)) == 1  # resumed in place, no new run directory
    return run.path

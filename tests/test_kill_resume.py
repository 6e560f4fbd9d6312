"""SIGKILL a real `dmclip pretrain` / `dmclip distill` process, then `--resume` it.

What a user would notice if this broke: a run left overnight and killed (OOM killer, a pre-empted node,
a reboot) that cannot be continued, continues to other weights than an uninterrupted run, shows as
`running` forever, or lost its last good checkpoint because the kill landed during a checkpoint write.

Each run is killed twice, at points chosen by a small hook in the child process (no timing guesses):
first after step 3 has been logged (the last checkpoint is step 2, so step 3 is replayed), then, in the
resumed process, half-way through writing the step-4 checkpoint (a `.last.pt.*.tmp` file exists). The
hook only *pauses* the child there; the test sees the evidence in the run directory (the metrics row, the
temporary file) and sends the SIGKILL itself. The final weights (model/model.safetensors) and metrics must
then equal an uninterrupted run at the same thread count bit for bit: on CPU at a given thread count every op
is deterministic (the fused scan kernels split work by the thread count and add the threads' partial sums in a
fixed order) and the engine reseeds every RNG from (seed, step) before each micro-batch. Checked at one thread,
and for distill (the Vision-Mamba student on the fused kernels) at two.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import SIX_STEPS, TINY_CLIP, main_at, one_thread_main, stderr_lines
from helpers.kill_resume import assert_same_run, kill_twice_then_resume, the_run

from dmclip.cli.main import main

# 64 samples / 16 per step = 4 steps per epoch: 6 steps cross an epoch boundary (a new shuffle)
SCHEDULE = ["--data", "world-train:size=64", *SIX_STEPS]
PRETRAIN = ["pretrain", *SCHEDULE, *TINY_CLIP]


def distill_argv(teacher: Path) -> list[str]:
    return ["distill", "--teacher", f"run:{teacher}", "--student", "mamba-tiny-test", "--alpha", "0.75", *SCHEDULE]


# ------------------------------------------------------------------------------------------ pretrain


@pytest.fixture(scope="module")
def pretrain_reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain-reference")
    assert one_thread_main([*PRETRAIN, "--runs-dir", str(root)]) == 0
    return the_run(root)


@pytest.mark.slow
def test_pretrain_killed_twice_resumes_to_the_uninterrupted_weights(pretrain_reference, tmp_path, capsys,
                                                                     monkeypatch):
    resumed = kill_twice_then_resume(PRETRAIN, tmp_path / "runs", tmp_path, capsys, monkeypatch)
    assert_same_run(resumed, pretrain_reference)
    # the vocabulary fitted before the first kill is the one the resumed run used
    assert json.loads((resumed / "tokenizer.json").read_text()) == json.loads(
        (pretrain_reference / "tokenizer.json").read_text())


# ------------------------------------------------------------------------------------------ distill


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("teacher")
    assert one_thread_main(["pretrain", "--data", "world-train:size=32", "--steps", "1", "--batch-size", "16",
                 "--set", "train.progress=false", "--set", "eval.each_run=false", *TINY_CLIP, "--runs-dir", str(root)]) == 0
    return the_run(root)


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_distill_killed_twice_resumes_to_the_uninterrupted_weights(threads, teacher, tmp_path, capsys, monkeypatch):
    # at two threads the student's fused kernels split each step's 16 rows over the threads
    assert main_at(threads, [*distill_argv(teacher), "--runs-dir", str(tmp_path / "reference")]) == 0
    reference = the_run(tmp_path / "reference")
    resumed = kill_twice_then_resume(distill_argv(teacher), tmp_path / "runs", tmp_path, capsys, monkeypatch,
                                     threads)
    assert_same_run(resumed, reference)


# ------------------------------------------------------------------------------------------ refusals


def test_resume_of_a_completed_run_is_refused_and_changes_nothing(pretrain_reference, capsys):
    before = {p: p.read_bytes() for p in pretrain_reference.rglob("*") if p.is_file() and p.name != "log.txt"}
    assert main(["pretrain", "--resume", str(pretrain_reference)]) == 2
    assert stderr_lines(capsys) == [f"error: {pretrain_reference} already completed",
                                    "hint: start a new run instead of --resume"]
    assert {p: p.read_bytes() for p in before} == before


def test_resume_of_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    assert main(["pretrain", "--resume", str(tmp_path)]) == 2
    assert stderr_lines(capsys) == [
        f"error: {tmp_path} is not a dmclip run directory (no run.json)",
        "hint: pass a directory under runs/<command>/ (`dmclip runs list` shows them)"]
    assert list(tmp_path.iterdir()) == []

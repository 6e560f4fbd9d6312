"""`torchrun --nproc_per_node 2 -m dmclip.cli pretrain|distill` (gloo, CPU) against one process.

tests/test_train_distributed.py covers the engine on a toy task; this file runs the real commands.
What a user would notice if this broke: a 2-process run that learns something else than 1 process at the
same global batch, or a dead worker that hangs the job instead of stopping it with a message.
Tolerance: the 2 ranks sum the same per-sample gradients in another order (all-reduce), float32, 6 steps:
losses and final weights agree to 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from helpers.cli import SIX_STEPS, TINY_CLIP, one_rank
from helpers.torchrun import assert_close_runs, torchrun_dmclip
from safetensors.torch import load_file

from dmclip.runs import RunDir, find_runs

SCHEDULE = ["--data", "world-train:size=64", *SIX_STEPS]


@pytest.mark.slow
def test_pretrain_on_two_ranks_equals_one_rank(tmp_path):
    argv = ["pretrain", *SCHEDULE, *TINY_CLIP]
    result = torchrun_dmclip([*argv, "--runs-dir", str(tmp_path / "two")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (two,) = [r.path for r in find_runs(tmp_path / "two")]  # one run directory, written by rank 0
    assert RunDir(two).load_checkpoint()["world_size"] == 2
    assert_close_runs(two, one_rank(argv, tmp_path / "one"))


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_resume_finishes_it(tmp_path):
    """Rank 1 is SIGKILLed in step 4: torchrun exits non-zero (bounded by the subprocess timeout, gloo
    notices at once), rank 0 says what happened and keeps a checkpoint, `--resume` ends where 1 rank ends."""
    argv = ["pretrain", *SCHEDULE, *TINY_CLIP]
    result = torchrun_dmclip([*argv, "--runs-dir", str(tmp_path / "two")], tmp_path, die_at=3)
    assert result.returncode != 0
    (run,) = find_runs(tmp_path / "two")
    # Rank 0 learns of the death one of two ways, whichever comes first: its next collective fails (gloo) ->
    # status failed, with dmclip's own message; or torchrun's SIGTERM -> status interrupted. Either way it
    # saves the 3 steps it completed (the periodic checkpoint is at step 2), and says so in its run record.
    status = run.display_status()
    assert status in ("failed", "interrupted"), (status, result.stderr[-3000:])
    if status == "failed":
        assert "rank 0 lost contact with the other training processes at step 4" in run.info["error"], run.info
    assert run.load_checkpoint()["step"] == 3
    resumed = torchrun_dmclip(["pretrain", "--resume", str(run.path)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run.status == "completed"
    assert_close_runs(run.path, one_rank(argv, tmp_path / "one"))


@pytest.mark.slow
def test_distill_on_two_ranks_equals_one_rank(tmp_path):
    """The distill loss (contrastive + KD) with features gathered over ranks: 2 ranks = 1 rank at one global batch."""
    teacher = one_rank(["pretrain", "--data", "world-train:size=32", "--steps", "2", "--batch-size", "16",
                        "--set", "train.progress=false", "--set", "eval.each_run=false", *TINY_CLIP], tmp_path / "teacher")
    argv = ["distill", "--teacher", f"run:{teacher}", "--student", "mamba-tiny-test", "--alpha", "0.5", *SCHEDULE]
    result = torchrun_dmclip([*argv, "--runs-dir", str(tmp_path / "two")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (two,) = [r.path for r in find_runs(tmp_path / "two")]
    assert RunDir(two).load_checkpoint()["world_size"] == 2
    assert_close_runs(two, one_rank(argv, tmp_path / "one"))


@pytest.mark.slow
def test_blip_pretrain_on_two_ranks_fills_its_queue_from_both(tmp_path):
    """BLIP (as its pretraining code) takes ITC/ITM negatives from the local batch + a queue of momentum
    features gathered over all ranks. One epoch of 64 samples in 4 steps of 16 (8 per rank) with a queue of
    64: every sample's index is in the queue exactly once; a rank that enqueued only its own 8 a step
    would leave 32 slots empty (-100)."""
    argv = ["pretrain", "--objective", "blip", "--data", "world-train:size=64", "--steps", "4", "--batch-size", "16",
            "--set", "train.warmup_steps=1", "--set", "train.progress=false", "--set", "eval.each_run=false",
            "--set", "train.log_every=1", "--set", "model.queue_size=64", *TINY_CLIP]
    result = torchrun_dmclip([*argv, "--runs-dir", str(tmp_path / "two")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = find_runs(tmp_path / "two")
    assert run.status == "completed" and run.load_checkpoint()["world_size"] == 2
    rows = run.metrics()
    assert len(rows) == 4 and all(k in rows[-1] for k in ("itc", "itm", "lm"))
    weights = load_file(str(run.path / "model" / "model.safetensors"))
    assert sorted(weights["idx_queue"].tolist()) == list(range(64))
    assert int(weights["queue_ptr"]) == 0
    queue = weights["image_queue"]
    torch.testing.assert_close(queue.norm(dim=1), torch.ones(64), atol=1e-3, rtol=0)  # all written features

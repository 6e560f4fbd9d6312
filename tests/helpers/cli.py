"""Running ``dmclip`` through ``main([...])`` in tests: the tiny CLIP, one thread, the run it made, stderr."""

from __future__ import annotations

from pathlib import Path

import torch

from dmclip.cli.main import main
from dmclip.runs import RunDir, find_runs

# pretrain's model at test size: a CLIP of width 32, one block per tower, 16-token captions (~0.1 M params)
TINY_CLIP = ["--set", "model.vision_width=32", "--set", "model.vision_depth=1", "--set", "model.vision_heads=2",
             "--set", "model.text_width=32", "--set", "model.text_depth=1", "--set", "model.text_heads=2",
             "--set", "model.embed_dim=32", "--set", "model.patch_size=8", "--set", "model.context_length=16"]

# 6 steps of 16, metrics every step, a checkpoint every 2, no progress bar or zero-shot: the runs that are
# killed, resumed or split over ranks and compared with an uninterrupted one
SIX_STEPS = ["--steps", "6", "--batch-size", "16", "--set", "train.warmup_steps=1", "--set", "train.progress=false",
             "--set", "eval.each_run=false", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2"]


def main_at(threads: int, argv: list[str]) -> int:
    """``main(argv)`` with ``threads`` torch threads, as the children run (OMP_NUM_THREADS): a different thread
    count may sum in another order. Module fixtures run before conftest's per-test ``set_num_threads(1)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(before)


def one_thread_main(argv: list[str]) -> int:
    """``main(argv)`` with one torch thread, as torchrun's and the killed children run (OMP_NUM_THREADS=1)."""
    return main_at(1, argv)


def one_rank(argv: list[str], root: Path) -> Path:
    """``dmclip ARGV --runs-dir ROOT`` in this process on one thread; the run directory it wrote."""
    assert one_thread_main([*argv, "--runs-dir", str(root)]) == 0
    return only_run(root).path


def only_run(root: Path, command: str | None = None) -> RunDir:
    """The one run under ``root`` (of ``command``, if given); fails when there are none or several."""
    runs = find_runs(root, command)
    assert len(runs) == 1, [r.path for r in runs]
    return runs[0]


def stderr_lines(capsys) -> list[str]:
    """What the command wrote to stderr since the last read, blank lines left out (an error is two lines)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]

"""``torchrun --nproc_per_node 2`` on CPU (gloo) from a test, and comparing its run with one process's.

Tolerance of :func:`assert_close_runs`: 2 ranks sum the same per-sample gradients in another order
(all-reduce), float32, 6 steps: losses and final weights agree to 1e-4.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmclip.runs import RunDir

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4


def torchrun(args: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` with this checkout's dmclip and tests/helpers
    (``-m helpers.toy``), one thread per rank and a 60 s collective timeout (a dead peer fails the job instead
    of hanging it); ``env`` is added to the environment."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DMCLIP_DIST_TIMEOUT": "60",
                   "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "tests"))), **env}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def torchrun_dmclip(argv: list[str], cwd: Path, die_at: int = -1) -> subprocess.CompletedProcess:
    """``dmclip ARGV`` on 2 ranks; ``die_at`` >= 0: rank 1 is SIGKILLed in pretrain's loss of that 0-based step."""
    return torchrun(["-m", "helpers.cli_worker", *argv], cwd, DIE_AT=str(die_at))


def assert_close_runs(a: Path, b: Path) -> None:
    """Two 6-step runs logged the same losses and saved the same weights, to :data:`TOL`."""
    losses_a = [r["loss"] for r in RunDir(a).metrics()]
    losses_b = [r["loss"] for r in RunDir(b).metrics()]
    assert len(losses_a) == 6 and losses_a == pytest.approx(losses_b, abs=TOL)
    weights_a = load_file(str(a / "model" / "model.safetensors"))
    weights_b = load_file(str(b / "model" / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], atol=TOL, rtol=0, msg=key)

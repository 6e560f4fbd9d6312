"""The engine under ``torchrun --nproc_per_node 2`` (gloo, CPU).

What a user would notice: 2 processes that do not learn what 1 process learns at the same global batch,
feature gathering that differs from open_clip's, a dead rank that hangs the job instead of stopping it.

Run as a script (``torchrun ... tests/test_train_distributed.py --gather-check OUT``) this file is also the
2-rank worker that compares :func:`dmclip.losses.gather.gather_features` with open_clip's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers.torchrun import torchrun
from helpers.toy import PairDataset, ToyTask, main, toy_config

from dmclip.losses.gather import gather_features
from dmclip.runs import RunDir
from dmclip.train import distributed, fit

# 2 ranks vs 1 rank: the same math summed in another order (all-reduce of per-rank gradients), float32
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5


def toy_on_one_process(tmp_path: Path, *args: str) -> dict:
    """The toy run of ``helpers.toy.main`` in this process: its summary and run path."""
    summary = tmp_path / "one.json"
    assert main(["--runs-dir", str(tmp_path / "one"), "--summary", str(summary), *args]) == 0
    return json.loads(summary.read_text())


def losses(run: RunDir) -> list[float]:
    return [row["loss"] for row in run.metrics()]


def test_gather_features_on_one_process_returns_the_inputs():
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    all_image, all_text = gather_features(image, text)
    assert all_image is image and all_text is text
    assert distributed.rank() == 0 and distributed.world_size() == 1 and not distributed.is_distributed()


def test_one_process_command_wiring_is_the_plain_one(tmp_path):
    """Without torchrun, shared_run/active are RunDir.create/run.active: a command needs no special case."""
    run = distributed.shared_run(lambda: RunDir.create("toy", "wiring", None, root=tmp_path))
    assert run.path.is_dir() and distributed.is_main()
    with distributed.active(run):
        pass
    assert run.status == "completed"
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_reduce_mean(torch.tensor([2.0])).item() == 2.0


TWO_RANK_ARGS = ["--steps", "6", "--batch-size", "16", "--grad-accum", "2"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One torchrun launch (each costs seconds of imports): the gather check, then a 2-rank toy run."""
    tmp_path = tmp_path_factory.mktemp("two-ranks")
    result = torchrun([str(Path(__file__)), "--worker", str(tmp_path), *TWO_RANK_ARGS], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path


@pytest.mark.slow
def test_gather_features_matches_open_clip_on_two_ranks(two_ranks):
    report = json.loads((two_ranks / "gather.json").read_text())
    assert len(report) == 4  # local_loss x gather_with_grad
    for case in report:
        assert case["forward_max_diff"] == 0.0, case
        assert case["grad_max_diff"] <= 1e-6, case


@pytest.mark.slow
def test_two_ranks_follow_the_one_rank_loss_curve(two_ranks, tmp_path):
    """Global batch 16 with 2 micro-batches: 2 ranks x 4 samples (local_loss + gather_with_grad, the
    lead's ClipLoss setting) vs 1 process x 8 samples. Loss curve and weights agree to 1e-5."""
    two = json.loads((two_ranks / "two.json").read_text())
    one = toy_on_one_process(tmp_path, "--mode", "clip", *TWO_RANK_ARGS)
    two_run, one_run = RunDir.open(two["run"]), RunDir.open(one["run"])
    assert len(losses(two_run)) == 6
    assert losses(two_run) == pytest.approx(losses(one_run), abs=LOSS_TOL)
    assert losses(two_run)[-1] < losses(two_run)[0]
    two_state, one_state = two_run.load_checkpoint(), one_run.load_checkpoint()
    assert two_state["world_size"] == 2 and two_run.status == "completed"
    for key, value in one_state["model"].items():
        torch.testing.assert_close(two_state["model"][key], value, atol=WEIGHT_TOL, rtol=0, msg=key)
    assert len(list((two_ranks / "runs").rglob("run.json"))) == 1  # one run dir, written by rank 0


@pytest.mark.slow
def test_a_dying_rank_stops_the_job_and_the_run_resumes(tmp_path):
    """Rank 1 exits hard at step 4: torchrun fails, rank 0 keeps the last good step, and resuming (on 1
    process here) ends where an uninterrupted run ends."""
    summary_path = tmp_path / "two.json"
    result = torchrun(["-m", "helpers.toy", "--runs-dir", str(tmp_path / "two"), "--summary",
                       str(summary_path), "--steps", "6", "--die-at", "3"], tmp_path)
    assert result.returncode != 0
    assert not summary_path.exists()
    (run_dir,) = [p.parent for p in (tmp_path / "two").rglob("run.json")]
    run = RunDir(run_dir)
    assert run.status in ("failed", "interrupted"), run.info
    assert run.display_status() != "running"
    step = run.load_checkpoint()["step"]
    assert step in (2, 3)  # the periodic checkpoint, or the last completed step saved on the way out
    one = toy_on_one_process(tmp_path, "--steps", "6")
    task = ToyTask()
    with run.active():
        fit(task, PairDataset(seed=1), toy_config(steps=6), run, seed=0, resume=True)
    assert run.status == "completed"
    assert losses(run) == pytest.approx(losses(RunDir.open(one["run"])), abs=LOSS_TOL)
    reference = RunDir.open(one["run"]).load_checkpoint()["model"]
    for key, value in reference.items():
        torch.testing.assert_close(task.model.state_dict()[key], value, atol=WEIGHT_TOL, rtol=0, msg=key)


# ---------------------------------------------------------------------------- the torchrun worker


def _gather_check(out: str) -> None:
    """Each (local_loss, gather_with_grad): ClipLoss-style loss via ours and open_clip's gather; compare the
    gathered features and the gradients of this rank's inputs."""
    import open_clip.loss as reference

    distributed.setup()
    rank, world = distributed.rank(), distributed.world_size()
    report = []
    for local_loss in (False, True):
        for with_grad in (False, True):
            results = []
            for gather in ("ours", "open_clip"):
                image = torch.randn(3, 5, generator=torch.Generator().manual_seed(rank)).requires_grad_()
                text = torch.randn(3, 5, generator=torch.Generator().manual_seed(10 + rank)).requires_grad_()
                if gather == "ours":
                    all_image, all_text = gather_features(image, text, local_loss, with_grad)
                else:
                    all_image, all_text = reference.gather_features(image, text, local_loss, with_grad, rank, world)
                if local_loss:
                    logits = image @ all_text.T
                    labels = torch.arange(3) + 3 * rank
                    loss = torch.nn.functional.cross_entropy(logits, labels)
                else:
                    logits = all_image @ all_text.T
                    loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)))
                loss = loss + 0.1 * (text @ all_image.T).pow(2).mean()
                loss.backward()
                results.append((all_image.detach(), all_text.detach(), image.grad.clone(), text.grad.clone()))
            (oi, ot, ogi, ogt), (ri, rt, rgi, rgt) = results
            report.append({"local_loss": local_loss, "gather_with_grad": with_grad,
                           "forward_max_diff": float(max((oi - ri).abs().max(), (ot - rt).abs().max())),
                           "grad_max_diff": float(max((ogi - rgi).abs().max(), (ogt - rgt).abs().max()))})
    reports = distributed.all_gather_object(report)
    if distributed.is_main():
        merged = [max(cases, key=lambda c: c["grad_max_diff"] + c["forward_max_diff"]) for cases in zip(*reports)]
        Path(out).write_text(json.dumps(merged))


if __name__ == "__main__":  # torchrun tests/test_train_distributed.py --worker OUT_DIR <toy args>
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        out_dir = Path(sys.argv[2])
        _gather_check(str(out_dir / "gather.json"))
        sys.exit(main(["--runs-dir", str(out_dir / "runs"), "--summary", str(out_dir / "two.json"),
                       "--mode", "clip-local", *sys.argv[3:]]))

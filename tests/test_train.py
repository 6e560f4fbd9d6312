"""The training engine (dmclip/train) on a tiny CLIP-like task with the real RunDir.

What a user would notice if these broke: a resumed run that ends with other weights than an uninterrupted
one, a learning rate that is not the documented warmup + cosine, accumulation that changes the result,
a NaN that overwrites the last good checkpoint, Ctrl-C that loses the work done.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import re
import signal
import warnings

import pytest
import torch

# the first optimizer a process builds imports torch._dynamo (3 s); imported here, at collection, the processes
# mutmut forks for each mutant find it loaded
import torch._dynamo  # noqa: F401
from helpers.toy import PairDataset, ToyTask, toy_config

from dmclip.config import to_dict
from dmclip.errors import DmclipError
from dmclip.runs import RunDir
from dmclip.train import DataOrder, TrainConfig, default_param_groups, epoch_permutation, fit, lr_at
from dmclip.train.state import TrainState, diverged

TIMING_KEYS = ("samples_per_s",)


def make_cfg(**overrides) -> TrainConfig:
    return toy_config(**{"steps": 12, "warmup_steps": 3, "checkpoint_every": 5, **overrides})


def new_run(tmp_path, cfg, name="toy") -> RunDir:
    return RunDir.create("toy", name, cfg, root=tmp_path, seed=0)


def train(run: RunDir, cfg: TrainConfig, task: ToyTask, dataset=None, *, resume=False, seed=0, **kw) -> dict:
    with run.active():
        return fit(task, dataset if dataset is not None else PairDataset(seed=1), cfg, run, seed=seed,
                   resume=resume, **kw)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), f"{key} differs: max {float((a[key] - b[key]).abs().max())}"
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


# ------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("warmup,min_ratio", [(0, 0.0), (3, 0.0), (4, 0.1)])
def test_lr_schedule_is_warmup_then_cosine(warmup, min_ratio):
    peak, steps = 2e-3, 20
    for s in range(steps):
        if s < warmup:
            expected = peak * (s + 1) / warmup
        else:
            floor = min_ratio * peak
            expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        assert lr_at(s, peak=peak, steps=steps, warmup_steps=warmup, min_lr_ratio=min_ratio) == pytest.approx(
            expected, rel=1e-12, abs=1e-15)
    assert lr_at(warmup - 1 if warmup else 0, peak=peak, steps=steps, warmup_steps=warmup,
                 min_lr_ratio=min_ratio) == pytest.approx(peak)
    assert lr_at(steps - 1, peak=peak, steps=steps, warmup_steps=warmup, min_lr_ratio=min_ratio) >= min_ratio * peak


def test_lr_zero_keeps_every_group_at_zero_and_a_restored_schedule_reports_the_last_lr():
    """train.lr = 0 (allowed: a dry run through the loop) sets every group, even one with its own lr, to 0 rather
    than dividing by zero; a schedule restored from a checkpoint reports the lr its last step used."""
    from dmclip.train.schedule import WarmupCosine

    weights = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
    optimizer = torch.optim.AdamW([{"params": [weights[0]]}, {"params": [weights[1]], "lr": 1e-3}], lr=0.0)
    frozen = WarmupCosine(optimizer, peak=0.0, steps=10, warmup_steps=2, min_lr_ratio=0.1)
    for step in (0, 5):
        assert frozen.apply(step) == 0.0 and [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]
    optimizer = torch.optim.AdamW(weights, lr=1e-3)
    schedule = WarmupCosine(optimizer, peak=1e-3, steps=10, warmup_steps=2, min_lr_ratio=0.1)
    last = schedule.apply(6)
    again = WarmupCosine(torch.optim.AdamW(weights, lr=1e-3), peak=1e-3, steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert again.last_lr == 0.0  # a fresh run has taken no step
    again.load_state_dict(schedule.state_dict())
    assert again.last_lr == last == lr_at(6, peak=1e-3, steps=10, warmup_steps=2, min_lr_ratio=0.1)


def test_optimizer_gets_the_scheduled_lr_and_groups_keep_their_ratio(tmp_path):
    cfg = make_cfg(steps=8, warmup_steps=3, min_lr_ratio=0.1, checkpoint_every=0)
    task = ToyTask()
    seen = []

    def param_groups(model):  # a text tower at a tenth of the lr, as a fine-tuning recipe would ask
        return [{"params": list(model.image_tower.parameters()) + [model.logit_scale]},
                {"params": list(model.text_tower.parameters()), "lr": cfg.lr / 10}]

    task.param_groups = param_groups
    run = new_run(tmp_path, cfg)
    original_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append([g["lr"] for g in self.param_groups])
        return original_step(self, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        train(run, cfg, task)
    finally:
        torch.optim.AdamW.step = original_step
    for s, (lr_image, lr_text) in enumerate(seen):
        expected = lr_at(s, peak=cfg.lr, steps=cfg.steps, warmup_steps=3, min_lr_ratio=0.1)
        assert lr_image == pytest.approx(expected, rel=1e-12)
        assert lr_text == pytest.approx(expected / 10, rel=1e-12)
    assert [r["lr"] for r in run.metrics()] == pytest.approx([lr_at(s, peak=cfg.lr, steps=8, warmup_steps=3,
                                                                     min_lr_ratio=0.1) for s in range(8)])


def _warmup_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "warmup_steps" in r.getMessage()]


def test_a_warmup_longer_than_the_run_is_one_warning_naming_the_fix(tmp_path, caplog):
    """20 steps with 100 warmup steps end at lr 0.0006 of 0.003: said once, at the start, with the setting to change."""
    cfg = make_cfg(steps=20, warmup_steps=100, lr=3e-3, checkpoint_every=0)
    with caplog.at_level(logging.WARNING, logger="dmclip"):
        summary = train(new_run(tmp_path, cfg), cfg, ToyTask())
    assert summary["lr"] == pytest.approx(6e-4)  # 3e-3 * 20 / 100
    assert _warmup_warnings(caplog) == [
        "train.warmup_steps = 100 is longer than the run (train.steps = 20): the learning rate ends at 0.0006, never "
        "reaching train.lr = 0.003; set --set train.warmup_steps=N with N at most 20, e.g. --set train.warmup_steps=2"]


@pytest.mark.parametrize("warmup", [3, 20])
def test_a_warmup_within_the_run_is_not_warned_about(tmp_path, caplog, warmup):
    cfg = make_cfg(steps=20, warmup_steps=warmup, lr=3e-3, checkpoint_every=0)
    run = new_run(tmp_path, cfg)
    with caplog.at_level(logging.WARNING, logger="dmclip"):
        train(run, cfg, ToyTask())
    assert _warmup_warnings(caplog) == []
    assert max(r["lr"] for r in run.metrics()) == pytest.approx(3e-3)  # the peak is reached


def test_run_json_records_the_device_training_resolved(tmp_path, monkeypatch):
    """run.json names the device the run trained on, as resolved when training starts (under torchrun: rank 0's
    GPU, cuda:0); here the resolver answers an indexed CPU device, which no default could guess."""
    import dmclip.train.loop as loop

    monkeypatch.setattr(loop, "resolve_device", lambda device, hint: torch.device("cpu", 0))
    cfg = make_cfg(steps=2, checkpoint_every=0)
    run = new_run(tmp_path, cfg)
    assert run.info["device"] is None  # nothing trained yet
    train(run, cfg, ToyTask())
    assert RunDir.open(run.path).info["device"] == "cpu:0"


def test_default_param_groups_decay_only_weight_matrices():
    model = ToyTask().model
    groups = default_param_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"image_tower.0.weight", "image_tower.4.weight", "text_tower.0.weight", "text_tower.4.weight"}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    embedding = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    decayed = {id(p) for p in default_param_groups(embedding, 0.1)[0]["params"]}
    assert decayed == {id(embedding[1].weight)}


# ---------------------------------------------------------------------------------------- data order


def test_data_order_is_seeded_and_splits_the_global_batch():
    n, batch = 50, 12
    orders = [DataOrder(n, batch, seed=3, grad_accum=2, world_size=3, rank=r) for r in range(3)]
    single = DataOrder(n, batch, seed=3)
    seen_in_epoch = []
    for _ in range(4):  # 50 // 12 = 4 steps per epoch, then a new permutation
        (step_indices,), after = single.next_step()
        single.position = after
        pieces = []
        for order in orders:
            micro_batches, after_r = order.next_step()
            order.position = after_r
            assert [len(m) for m in micro_batches] == [2, 2]
            pieces.append(micro_batches)
        # micro-batch m = rank 0's slice, rank 1's slice, rank 2's slice, in order
        rebuilt = [i for m in range(2) for r in range(3) for i in pieces[r][m]]
        assert rebuilt == step_indices
        seen_in_epoch += step_indices
    assert len(set(seen_in_epoch)) == 48  # no sample twice in an epoch, the tail of 2 dropped
    assert seen_in_epoch == epoch_permutation(3, 0, n)[:48].tolist()
    assert (single.position.epoch, single.position.offset) == (1, 0)
    (next_indices,), _ = single.next_step()
    assert next_indices == epoch_permutation(3, 1, n)[:12].tolist()
    assert not torch.equal(epoch_permutation(3, 0, n), epoch_permutation(3, 1, n))
    assert not torch.equal(epoch_permutation(3, 0, n), epoch_permutation(4, 0, n))
    with pytest.raises(DmclipError, match="divisible"):
        DataOrder(n, 10, seed=0, grad_accum=4)
    with pytest.raises(DmclipError, match="fewer than one batch"):
        DataOrder(5, 8, seed=0)


def test_data_order_ignores_the_global_rng():
    torch.manual_seed(0)
    a = epoch_permutation(1, 2, 100)
    torch.manual_seed(123)
    torch.rand(10)
    assert torch.equal(a, epoch_permutation(1, 2, 100))


# ------------------------------------------------------------------------------------- accumulation


def test_grad_accumulation_equals_the_full_batch(tmp_path):
    """Per-sample loss: 2 micro-batches of 8 give the same updates as one batch of 16 (to 1e-6), and log the same
    loss, parts and gradient norm (AdamW alone would not tell a gradient twice too large: its update is scale-free)."""
    cfg_full = make_cfg(steps=6, batch_size=16, grad_accum=1)
    cfg_accum = make_cfg(steps=6, batch_size=16, grad_accum=2)
    full, accum = ToyTask("mse"), ToyTask("mse")
    full_run = new_run(tmp_path, cfg_full, "full")
    train(full_run, cfg_full, full)
    run = new_run(tmp_path, cfg_accum, "accum")
    train(run, cfg_accum, accum)
    assert_same_weights(weights(full.model), weights(accum.model), atol=1e-6)
    assert run.metrics()[0]["loss"] > run.metrics()[-1]["loss"]
    for accumulated, whole in zip(without_timing(run.metrics()), without_timing(full_run.metrics()), strict=True):
        assert accumulated == pytest.approx(whole, rel=1e-5)


def test_grad_clip_0_trains_unclipped_and_logs_no_gradient_norm(tmp_path):
    """train.grad_clip = 0 means no clipping: the weights of a clip no gradient reaches (1e9), and no grad_norm."""
    trained = []
    for grad_clip in (0.0, 1e9):
        cfg, task = make_cfg(steps=3, grad_clip=grad_clip, checkpoint_every=0), ToyTask()
        run = new_run(tmp_path, cfg, f"clip-{grad_clip}")
        train(run, cfg, task)
        assert all(("grad_norm" in row) == (grad_clip > 0) for row in run.metrics())
        trained.append(weights(task.model))
    assert_same_weights(*trained)


# ------------------------------------------------------------------------------------------- resume


def random_data():
    return PairDataset(seed=1, augment=0.05)  # random augmentation on every read


@pytest.mark.parametrize("grad_accum,num_workers", [(1, 0), (2, 1)])
def test_interrupted_then_resumed_run_equals_an_uninterrupted_one_bitwise(tmp_path, grad_accum, num_workers):
    """With dropout and random augmentation: the RNG streams, data order and task state all come back."""
    cfg = make_cfg(steps=12, grad_accum=grad_accum, num_workers=num_workers)
    reference = ToyTask(dropout=0.2)
    reference_run = new_run(tmp_path, cfg, "reference")
    reference_summary = train(reference_run, cfg, reference, random_data())

    task = ToyTask(interrupt_at=7, dropout=0.2)  # Ctrl-C while computing step 8 (0-based 7)
    run = new_run(tmp_path, cfg, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        train(run, cfg, task, random_data())
    assert run.status == "interrupted"
    assert run.load_checkpoint()["step"] == 7  # the last completed step, not the periodic one (5)
    assert run.last_step() == 7

    resumed = ToyTask(dropout=0.2)  # a fresh process: new model from the same seed, state from the checkpoint
    torch.manual_seed(999)  # whatever the global RNG holds when the process starts again
    summary = train(run, cfg, resumed, random_data(), resume=True)
    assert run.status == "completed"
    assert summary["resumed_from"] == 7 and summary["steps"] == 12
    assert_same_weights(weights(reference.model), weights(resumed.model))  # bitwise on CPU
    assert resumed.steps_ended == 12  # task.state_dict() came back
    assert without_timing(run.metrics()) == without_timing(reference_run.metrics())
    assert summary["loss"] == reference_summary["loss"]
    final = run.load_checkpoint()
    assert final["step"] == 12 and final["position"] == reference_run.load_checkpoint()["position"]


def test_workers_do_not_change_the_result(tmp_path):
    """Loading in 2 worker processes gives bitwise the weights of loading in the training process."""
    results = []
    for workers in (0, 2):
        cfg = make_cfg(steps=5, num_workers=workers, checkpoint_every=0)
        task = ToyTask(dropout=0.2)
        train(new_run(tmp_path, cfg, f"workers{workers}"), cfg, task, random_data())
        results.append(weights(task.model))
    assert_same_weights(*results)


def test_crash_without_checkpoint_resumes_from_the_periodic_one(tmp_path):
    """A kill (no chance to save) leaves metric rows past the checkpoint: they are dropped and replayed."""
    cfg = make_cfg(steps=10, checkpoint_every=4)
    reference = ToyTask()
    reference_run = new_run(tmp_path, cfg, "reference")
    train(reference_run, cfg, reference)

    task = ToyTask()
    real_loss = task.loss

    def crashing_loss(model, batch, step):
        if step == 6:
            raise RuntimeError("simulated crash")
        return real_loss(model, batch, step)

    task.loss = crashing_loss
    run = new_run(tmp_path, cfg, "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(run, cfg, task)
    assert run.status == "failed" and run.last_step() == 6
    assert run.load_checkpoint()["step"] == 4
    resumed = ToyTask()
    train(run, cfg, resumed, resume=True)
    assert_same_weights(weights(reference.model), weights(resumed.model))
    assert without_timing(run.metrics()) == without_timing(reference_run.metrics())


def test_resume_without_a_checkpoint_starts_over(tmp_path):
    cfg = make_cfg(steps=3, checkpoint_every=0)
    run = new_run(tmp_path, cfg)
    summary = train(run, cfg, ToyTask(), resume=True)
    assert summary["resumed_from"] is None and summary["steps"] == 3 and len(run.metrics()) == 3


def test_without_resume_fit_starts_over_on_a_run_that_holds_a_checkpoint(tmp_path):
    cfg = make_cfg(steps=3, checkpoint_every=0)
    run = new_run(tmp_path, cfg)
    first = train(run, cfg, ToyTask())
    with run.active():
        again = fit(ToyTask(), PairDataset(seed=1), cfg, run, seed=0)  # resume left at its default
    assert again["resumed_from"] is None and again["steps"] == 3 and again["loss"] == first["loss"]


def test_resume_refuses_another_batch_size(tmp_path):
    cfg = make_cfg(steps=4, checkpoint_every=2)
    run = new_run(tmp_path, cfg)
    with pytest.raises(KeyboardInterrupt):
        train(run, cfg, ToyTask(interrupt_at=3))
    with pytest.raises(DmclipError, match="batch_size 16"):
        train(run, make_cfg(steps=4, batch_size=32), ToyTask(), resume=True)


def test_checkpoint_loads_with_weights_only(tmp_path):
    cfg = make_cfg(steps=3)
    run = new_run(tmp_path, cfg)
    train(run, cfg, ToyTask(), seed=3)
    state = torch.load(run.checkpoint_path(), weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "task", "position", "step"} <= state.keys()
    # what a reader of the file needs to know how it was trained
    assert (state["seed"], state["world_size"], state["batch_size"], state["dataset_size"]) == (3, 1, 16, 256)
    assert state["config"] == to_dict(cfg)
    assert set(state["rng"]) >= {"torch", "python", "numpy"}


# ----------------------------------------------------------------------------------- interrupts, NaN


def test_sigterm_saves_the_last_completed_step_and_marks_interrupted(tmp_path):
    cfg = make_cfg(steps=10, checkpoint_every=0)
    task = ToyTask()
    real_loss = task.loss

    def loss(model, batch, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # RunDir.active turns it into KeyboardInterrupt
        return real_loss(model, batch, step)

    task.loss = loss
    run = new_run(tmp_path, cfg)
    with pytest.raises(KeyboardInterrupt):
        train(run, cfg, task)
    assert run.status == "interrupted"
    assert run.load_checkpoint()["step"] == 4 and run.last_step() == 4


def test_a_signal_during_the_last_save_waits_for_it(tmp_path, monkeypatch):
    """A rank whose peer died is stopped twice: its collective fails (or Ctrl-C), and torchrun's SIGTERM comes
    while it writes the completed steps. The checkpoint is written whole, then the signal stops the process."""
    cfg = make_cfg(steps=10, checkpoint_every=2)
    task = ToyTask()
    real_loss, real_save = task.loss, RunDir.save_checkpoint

    def loss(model, batch, step):
        if step == 3:  # steps 0-2 done, the periodic checkpoint holds step 2
            raise KeyboardInterrupt
        return real_loss(model, batch, step)

    def save(self, checkpoint):
        if checkpoint["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # torchrun's stop, in the middle of the last save
        return real_save(self, checkpoint)

    task.loss = loss
    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    run = new_run(tmp_path, cfg)
    with pytest.raises(KeyboardInterrupt):
        train(run, cfg, task)
    assert run.load_checkpoint()["step"] == 3 and run.status == "interrupted"


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler for the test: a process started in the background by a non-interactive
    shell inherits SIGINT ignored (and the engine rightly keeps ignoring it), which is not what these tests
    are about."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_the_weight_update_waits_for_it(tmp_path, python_sigint_handler):
    """SIGINT raised inside on_step_end (part of the update) lands after step 3 is complete, not inside it."""
    cfg = make_cfg(steps=10, checkpoint_every=0)

    class Task(ToyTask):
        def on_step_end(self, step):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)
            super().on_step_end(step)

    task = Task()
    run = new_run(tmp_path, cfg)
    with pytest.raises(KeyboardInterrupt):
        train(run, cfg, task)
    state = run.load_checkpoint()
    assert state["step"] == 3 and state["task"]["steps_ended"] == 3
    assert_same_weights(state["model"], weights(task.model))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = make_cfg(steps=12, checkpoint_every=5)
    task = ToyTask(nan_at=7)
    run = new_run(tmp_path, cfg)
    with pytest.raises(DmclipError) as info:
        train(run, cfg, task)
    # every non-finite value is named, in the order of the logged row
    assert info.value.message == "training diverged at step 8: non-finite loss=nan, image_to_text=nan, grad_norm=nan"
    assert "lower train.lr" in info.value.hint and "step 5" in info.value.hint
    assert run.status == "failed"
    state = run.load_checkpoint()
    assert state["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(math.isfinite(row["loss"]) for row in run.metrics())  # no NaN row was written


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """An update that leaves inf in the weights (loss still finite) is caught at the next checkpoint write."""
    cfg = make_cfg(steps=12, checkpoint_every=1)

    class Task(ToyTask):
        def on_step_end(self, step):
            super().on_step_end(step)
            if step == 2:  # the update of step 3 went wrong
                with torch.no_grad():
                    self.model.text_tower[4].weight[0, 0] = float("inf")

    run = new_run(tmp_path, cfg)
    with pytest.raises(DmclipError, match=r"diverged at step 3: non-finite weights text_tower.4.weight"):
        train(run, cfg, Task())
    state = run.load_checkpoint()
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# ---------------------------------------------------------------------------------- metrics, output


def test_metrics_rows_and_summary(tmp_path, capsys):
    cfg = make_cfg(steps=7, log_every=3, checkpoint_every=0, progress=True)  # not a TTY: no bar
    run = new_run(tmp_path, cfg)
    evaluated = []

    def eval_fn(model, step):
        assert not model.training and not torch.is_grad_enabled()
        evaluated.append(step)
        return {"score": float(step)}

    summary = train(run, cfg, ToyTask(), eval_fn=eval_fn, eval_every=3)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    rows = run.metrics()
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6, 7]
    assert list(train_rows[0]) == ["step", "loss", "image_to_text", "text_to_image", "grad_norm", "lr",
                                   "samples_per_s", "epoch"]
    for row in train_rows:
        assert row["loss"] == pytest.approx((row["image_to_text"] + row["text_to_image"]) / 2, rel=1e-6)
        assert row["epoch"] == pytest.approx(row["step"] * 16 // 256 + (row["step"] * 16 % 256) / 256)
        assert row["samples_per_s"] > 0 and row["grad_norm"] > 0  # over the trainable parameters
    assert evaluated == [3, 6, 7]
    assert [(r["step"], r["eval/score"]) for r in rows if "eval/score" in r] == [(3, 3.0), (6, 6.0), (7, 7.0)]
    assert summary["steps"] == 7 and summary["loss"] == train_rows[-1]["loss"]
    assert set(summary["parts"]) == {"loss", "image_to_text", "text_to_image"}
    assert summary["samples_per_s"] > 0 and summary["seconds"] > 0 and summary["eval"] == {"score": 7.0}
    assert summary["epoch"] == pytest.approx(7 * 16 / 256) and summary["checkpoint"] == str(run.checkpoint_path())
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]


def test_the_last_step_is_evaluated_once_and_eval_every_0_never(tmp_path):
    """A last step that is also an eval step gets one evaluation (one eval row); eval_every = 0 turns evaluation
    off even with an eval_fn."""
    cfg = make_cfg(steps=4, checkpoint_every=0)
    for eval_every, evaluated_at in ((2, [2, 4]), (0, [])):
        run, evaluated = new_run(tmp_path, cfg, f"every-{eval_every}"), []

        def eval_fn(model, step, evaluated=evaluated):
            evaluated.append(step)
            return {"score": float(step)}

        summary = train(run, cfg, ToyTask(), eval_fn=eval_fn, eval_every=eval_every)
        assert evaluated == evaluated_at
        assert [r["step"] for r in run.metrics() if "eval/score" in r] == evaluated_at
        assert summary["eval"] == ({"score": 4.0} if evaluated_at else None)


def test_a_one_step_run_ends_with_its_checkpoint(tmp_path):
    cfg = make_cfg(steps=1, checkpoint_every=0)
    run = new_run(tmp_path, cfg)
    assert train(run, cfg, ToyTask())["checkpoint"] == str(run.checkpoint_path())
    assert run.load_checkpoint()["step"] == 1


def test_bf16_autocast_on_cpu_trains(tmp_path):
    cfg = make_cfg(steps=8, amp="bf16", checkpoint_every=0)
    run = new_run(tmp_path, cfg)
    train(run, cfg, ToyTask())
    losses = [r["loss"] for r in run.metrics()]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_fp16_without_a_gpu_is_a_user_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = make_cfg(amp="fp16")
    with pytest.raises(DmclipError, match="fp16"):
        fit(ToyTask(), PairDataset(), cfg, new_run(tmp_path, cfg), seed=0)


def test_fp16_on_a_gpu_is_not_refused_and_the_model_moves_there(tmp_path, monkeypatch):
    """No GPU here: the device resolver answers cuda, and the model's move to that device, where a GPU run goes on,
    is as far as this run gets."""
    import dmclip.train.loop as loop

    class MovedToTheGpu(Exception):
        pass

    def move(device):
        raise MovedToTheGpu(str(device))

    monkeypatch.setattr(loop, "resolve_device", lambda *args, **kwargs: torch.device("cuda"))
    task, cfg = ToyTask(), make_cfg(amp="fp16")
    monkeypatch.setattr(task.model, "to", move)
    with pytest.raises(MovedToTheGpu, match="^cuda$"):
        fit(task, PairDataset(), cfg, new_run(tmp_path, cfg), seed=0)


def test_cuda_without_a_gpu_is_a_user_error_naming_the_setting(tmp_path, monkeypatch):
    """train.device goes through the one device resolver: its error, with the fix for train's setting."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = make_cfg(device="cuda")
    run = new_run(tmp_path, cfg)
    with pytest.raises(DmclipError, match="no GPU is visible") as error:
        fit(ToyTask(), PairDataset(), cfg, run, seed=0)
    assert error.value.hint == "set train.device=auto or cpu"
    assert not run.checkpoint_path().exists()
    task, cfg = ToyTask(), make_cfg(device="auto", steps=1, checkpoint_every=0)
    train(new_run(tmp_path, cfg, "auto"), cfg, task)
    assert {p.device for p in task.model.parameters()} == {torch.device("cpu")}


def test_config_rejects_out_of_range_values():
    from dmclip.config import from_dict

    with pytest.raises(DmclipError, match="amp"):
        from_dict(TrainConfig, {"amp": "fp8"})
    with pytest.raises(DmclipError, match="steps"):
        from_dict(TrainConfig, {"steps": 0})
    assert from_dict(TrainConfig, {"betas": [0.9, 0.95]}).betas == [0.9, 0.95]


# ------------------------------------------------------------------------------ checkpoint and restore


def toy_state(cfg: TrainConfig, task=None, dataset=None, **kw) -> TrainState:
    task = task if task is not None else ToyTask()
    return TrainState.create(task, task.model, dataset if dataset is not None else PairDataset(seed=1), cfg,
                             seed=0, world=1, rank=0, **kw)


def test_resuming_a_finished_run_trains_nothing_and_reports_its_last_step(tmp_path):
    """A checkpoint at train.steps (the run's end) resumes as done: its last row's loss and the last step's lr;
    with its metrics.jsonl emptied, a summary without a loss."""
    cfg = make_cfg(steps=4, checkpoint_every=0)
    run = new_run(tmp_path, cfg)
    first = train(run, cfg, ToyTask())
    again = train(run, cfg, ToyTask(), resume=True)
    assert again["resumed_from"] == 4 and again["steps"] == 4 and again["samples_per_s"] is None
    assert again["loss"] == first["loss"] == run.metrics()[-1]["loss"]
    assert again["parts"] == first["parts"]
    assert again["checkpoint"] == first["checkpoint"] == str(run.checkpoint_path())
    assert again["lr"] == first["lr"] == pytest.approx(lr_at(3, peak=cfg.lr, steps=4, warmup_steps=3,
                                                               min_lr_ratio=cfg.min_lr_ratio))
    assert len(run.metrics()) == 4
    (run.path / "metrics.jsonl").write_text("")
    emptied = train(run, cfg, ToyTask(), resume=True)
    assert emptied["steps"] == 4 and emptied["loss"] is None and emptied["parts"] == {}


@pytest.mark.parametrize("state", [torch.zeros(3), {"format": 1, "step": 2}, {"format": 2, "model": {}}])
def test_restore_refuses_what_dmclip_did_not_write(state):
    with pytest.raises(DmclipError, match="not a dmclip training checkpoint"):
        toy_state(make_cfg()).restore(state, make_cfg(), main=True)


def test_restore_names_the_data_that_differs(tmp_path):
    cfg = make_cfg()
    saved = toy_state(cfg).checkpoint(cfg)
    with pytest.raises(DmclipError) as error:
        toy_state(cfg, dataset=PairDataset(n=100)).restore(saved, cfg, main=True)
    assert error.value.message == ("the checkpoint was trained with batch_size 16 on 256 samples, this run has "
                                "batch_size 16 on 100 samples")
    assert error.value.hint == "resume with the same data and batch size (the data order depends on both)"


def test_restore_names_a_tensor_whose_shape_differs():
    cfg = make_cfg()
    saved = toy_state(cfg, ToyTask(width=64)).checkpoint(cfg)
    with pytest.raises(DmclipError) as error:
        toy_state(cfg).restore(saved, cfg, main=True)
    # the first linear and layer norm of each tower: 2 x (weight, bias, weight, bias) + the last linear's weights
    assert error.value.message == ("the checkpoint does not fit this model (10 tensors differ, "
                                "e.g. image_tower.0.weight (64, 16) vs (32, 16))")


def test_restore_brings_back_the_scaler_and_tolerates_a_task_without_state():
    """fp16's loss scale continues where it was (a CPU GradScaler stands in for CUDA's); a checkpoint with a
    scaler loads into a run without one; a task with no state_dict saves and restores nothing of its own."""
    cfg = make_cfg()

    class Stateless:
        def __init__(self):
            self.model = ToyTask().model

    saving = toy_state(cfg, Stateless())
    saving.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    saving.step = 3
    saved = saving.checkpoint(cfg)
    assert saved["task"] == {} and saved["scaler"]["scale"] == 2.0**10
    restored = toy_state(cfg, Stateless())
    restored.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    restored.restore(saved, cfg, main=True)
    assert restored.scaler.get_scale() == 2.0**10 and restored.step == 3
    without = toy_state(cfg, Stateless())
    without.restore(saved, cfg, main=True)
    assert without.scaler is None and without.step == 3


@pytest.mark.parametrize("amp,last_checkpoint_step", [("off", None), ("bf16", 5)])
def test_the_divergence_error_names_what_to_change_and_what_is_kept(tmp_path, amp, last_checkpoint_step):
    cfg = make_cfg(amp=amp, lr=3e-3)
    run = new_run(tmp_path, cfg)
    error = diverged(7, "loss=nan", cfg, run, last_checkpoint_step)
    assert error.message == "training diverged at step 7: non-finite loss=nan"
    kept = (f"the last good checkpoint (step 5) is kept in {run.checkpoint_path()}" if last_checkpoint_step
            else "no checkpoint was written before it")
    amp_hint = " or set train.amp=off (now bf16)" if amp == "bf16" else ""
    assert error.hint == f"lower train.lr (now 0.003){amp_hint}, or lower train.grad_clip; {kept}"


def test_a_resumed_run_continues_the_host_rngs_a_loss_draws_from(tmp_path):
    """With DataLoader workers the training process never reseeds python's ``random`` or numpy: a loss that draws
    from them (a random caption choice, say) draws after a resume what the uninterrupted run drew."""
    import random

    import numpy as np

    class Drawing(ToyTask):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.draws = []

        def loss(self, model, batch, step):
            out = super().loss(model, batch, step)
            self.draws.append((random.random(), float(np.random.rand())))
            return out

    cfg = make_cfg(steps=6, num_workers=1, checkpoint_every=0)
    random.seed(5), np.random.seed(5)
    reference = Drawing()
    train(new_run(tmp_path, cfg, "reference"), cfg, reference)
    random.seed(5), np.random.seed(5)
    interrupted, run = Drawing(interrupt_at=4), new_run(tmp_path, cfg, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        train(run, cfg, interrupted)
    random.seed(123), np.random.seed(123)  # whatever a new process holds
    resumed = Drawing()
    train(run, cfg, resumed, resume=True)
    assert interrupted.draws + resumed.draws == reference.draws and len(reference.draws) == 6


def test_default_param_groups_spare_every_kind_the_docstring_names_at_any_shape():
    """Weight matrices decay; biases, norms (torch's or hand-written), embeddings and the logit scale/bias do not,
    whatever their shape, and frozen parameters are in no group: a (1, C) gain or a (1, N, D) position
    embedding decayed would be pulled to zero over a long run."""

    class ConditionedNorm(torch.nn.Module):  # a hand-written norm: its own gain spared, its projection a weight
        def __init__(self, channels):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(1, channels))
            self.projection = torch.nn.Linear(channels, channels, bias=False)

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
            self.token_embedding = torch.nn.Embedding(10, 4)
            self.patch_embed = torch.nn.Linear(4, 4)  # a projection inside an "embed" module: a weight
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 5, 4))
            self.attn_bias = torch.nn.Parameter(torch.zeros(2, 5, 5))
            self.norm = ConditionedNorm(4)
            self.logit_scale = torch.nn.Parameter(torch.ones(1, 1))
            self.logit_bias = torch.nn.Parameter(torch.zeros(1, 1))

    model = torch.nn.Sequential(Tower())
    decay, no_decay = default_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.norm.projection.weight", "0.patch_embed.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "0.attn_bias", "0.logit_bias", "0.logit_scale", "0.norm.gain", "0.patch_embed.bias", "0.pos_embed",
        "0.token_embedding.weight"]


def test_the_optimizer_takes_train_betas_eps_and_weight_decay_and_fp16_a_cuda_scaler():
    """AdamW's settings come from train.*, also for a task's own param groups that name no weight decay."""
    cfg = make_cfg(betas=[0.8, 0.95], eps=1e-6, weight_decay=0.05)
    task = ToyTask()
    task.param_groups = lambda model: [{"params": list(model.parameters())}]
    state = toy_state(cfg, task)
    group = state.optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"], group["lr"]) == ((0.8, 0.95), 1e-6, 0.05, cfg.lr)
    assert state.scaler is None and toy_state(make_cfg(amp="bf16")).scaler is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available. Disabling."
        scaler = toy_state(make_cfg(amp="fp16")).scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() == torch.cuda.is_available()


def test_a_checkpoint_leaves_out_the_constant_tensors_and_a_resume_keeps_the_rebuilt_ones():
    """``task.constant_prefixes`` (a frozen teacher copy the task builds again): not written, not overwritten."""
    cfg = make_cfg()
    trained, rebuilt = ToyTask(seed=0), ToyTask(seed=1)
    trained.constant_prefixes = rebuilt.constant_prefixes = ["text_tower."]
    saved = toy_state(cfg, trained).checkpoint(cfg)
    assert sorted(saved["model"]) == sorted(k for k in weights(trained.model) if not k.startswith("text_tower."))
    text_tower = weights(rebuilt.model.text_tower)
    toy_state(cfg, rebuilt).restore(saved, cfg, main=True)
    assert_same_weights(weights(rebuilt.model.text_tower), text_tower)
    assert_same_weights(weights(rebuilt.model.image_tower), weights(trained.model.image_tower))


def test_saving_non_finite_weights_names_the_first_four_and_the_kept_checkpoint(tmp_path):
    cfg = make_cfg()
    run = new_run(tmp_path, cfg)
    state = toy_state(cfg)
    state.step, state.last_checkpoint_step = 3, 2
    with torch.no_grad():
        for tower in (state.model.image_tower, state.model.text_tower):
            tower[0].weight[0, 0] = tower[0].bias[0] = float("nan")
        state.model.logit_scale.fill_(float("inf"))  # registered first; the fifth, text_tower.0.bias, goes unnamed
    with pytest.raises(DmclipError) as error:
        state.save(run, cfg, main=True)
    assert error.value.message == ("training diverged at step 3: non-finite weights logit_scale, "
                                   "image_tower.0.weight, image_tower.0.bias, text_tower.0.weight")
    assert f"the last good checkpoint (step 2) is kept in {run.checkpoint_path()}" in error.value.hint
    assert not run.checkpoint_path().exists()


def test_only_rank_0_writes_the_checkpoint(tmp_path):
    cfg = make_cfg()
    run = new_run(tmp_path, cfg)
    state = toy_state(cfg)
    state.step = 2
    assert state.save(run, cfg, main=False) is None and not run.checkpoint_path().exists()
    assert state.last_checkpoint_step == 2  # every rank knows which step the file holds
    assert state.save(run, cfg, main=True) == run.checkpoint_path() and run.load_checkpoint()["step"] == 2


def test_ctrl_c_on_another_rank_neither_warns_nor_saves(tmp_path, monkeypatch, caplog):
    """torchrun sends its SIGTERM to every rank: only rank 0 says it is saving (one line, not one per rank)."""
    from dmclip.train import distributed

    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    cfg = make_cfg(steps=6, checkpoint_every=0)
    run = new_run(tmp_path, cfg)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train(run, cfg, ToyTask(interrupt_at=3))
    assert not [r for r in caplog.records if "saving step" in r.getMessage()]
    assert not run.checkpoint_path().exists()


def test_evaluation_runs_on_rank_0_only(tmp_path):
    """Another rank neither evaluates nor logs, and its summary holds no eval result."""
    from dmclip.train.loop import _evaluate

    cfg = make_cfg()
    run = new_run(tmp_path, cfg)
    called = []
    assert _evaluate(lambda model, step: called.append(step), ToyTask().model, 3, run, main=False) is None
    assert called == [] and run.metrics() == []


def test_a_batch_goes_to_the_device_whole():
    """Tensors at any depth of the batch move (the meta device stands in for an accelerator); containers keep
    their type and everything else is left as it is."""
    from dmclip.train.loop import _Batches, _to_device

    tensor = torch.ones(2)
    batch = {"image": tensor, "parts": [tensor, (tensor, "caption")], "captions": ["a", "b"], "n": 3}
    moved = _to_device(batch, torch.device("meta"))
    assert moved["image"].device.type == "meta" and moved["parts"][0].device.type == "meta"
    assert isinstance(moved["parts"][1], tuple) and moved["parts"][1][0].device.type == "meta"
    assert moved["parts"][1][1] == "caption" and moved["captions"] == ["a", "b"] and moved["n"] == 3
    cfg, task = make_cfg(), ToyTask()
    fetched = _Batches(PairDataset(), task.collate, cfg, toy_state(cfg, task), 0, torch.device("meta")).get(0, 0, [1])
    assert fetched["image"].device.type == "meta" and fetched["image"].shape == (1, 16)


def test_augmentation_draws_follow_the_run_seed_and_the_rank():
    """The data RNGs are seeded from (seed, step, rank, micro-batch): the same key draws the same augmentation,
    another seed, rank, step or micro-batch another one, and not the numbers the forward pass draws."""
    from dmclip.train.loop import _BatchFetcher
    from dmclip.train.rng import reseed

    dataset, collate = PairDataset(seed=1, augment=0.05), ToyTask().collate

    def images(seed, rank=0, step=4, micro=1):
        return _BatchFetcher(dataset, collate, seed, rank)[(step, micro, [0, 5])]["image"]

    assert torch.equal(images(0), images(0))
    for other in (images(1), images(0, rank=1), images(0, step=5), images(0, micro=0)):
        assert not torch.equal(images(0), other)
    reseed(0, 4, 0, 1)  # the forward pass's seed for the same micro-batch: dropout draws other numbers
    with_forward_draws = torch.stack([dataset.image[i] for i in (0, 5)]) + 0.05 * torch.randn(2, 16)
    assert not torch.allclose(images(0), with_forward_draws)


def test_loss_parts_given_as_python_numbers_are_logged(tmp_path):
    """A task may return a part as a plain number (a fixed temperature, a count): it is logged like a tensor."""

    class WithNumber(ToyTask):
        def loss(self, model, batch, step):
            return {**super().loss(model, batch, step), "temperature": 0.07}

    cfg = make_cfg(steps=2, checkpoint_every=0)
    run = new_run(tmp_path, cfg)
    train(run, cfg, WithNumber())
    assert [row["temperature"] for row in run.metrics()] == pytest.approx([0.07, 0.07], rel=1e-6)
    from dmclip.train.loop import _stack_parts

    on_accelerator = _stack_parts({"loss": torch.tensor(2.0), "temperature": 0.07}, ["temperature", "loss"],
                                  torch.device("meta"))  # beside a gradient norm computed there
    assert on_accelerator.device.type == "meta" and on_accelerator.shape == (2,)


def fake_clock():
    """A ``time`` for the loop whose perf_counter reads 5.0 at the start, then 5.0 + (1 + 2 + ... + k) / 10 s at its
    k-th next call: ticks under a second (a fast run) and not starting at 0. ``CLOCK[k]`` is the k-th reading."""
    import itertools
    import types

    ticks = itertools.accumulate(itertools.count())
    return types.SimpleNamespace(perf_counter=lambda: 5.0 + next(ticks) / 10)


CLOCK = [5.0 + t / 10 for t in itertools.accumulate(range(8))]


def test_samples_per_second_counts_the_samples_since_the_last_row_and_the_summary_those_of_this_call(tmp_path,
                                                                                                    monkeypatch):
    """Against a clock whose ticks grow (0.1, 0.2, 0.3, ... s): each row's rate covers the steps since the row
    before, the summary's the steps this call trained (after a resume: not the ones before it) over its own
    seconds."""
    import dmclip.train.loop as loop

    cfg = make_cfg(steps=5, log_every=2, checkpoint_every=0)
    run = new_run(tmp_path, cfg)
    monkeypatch.setattr(loop, "time", fake_clock())  # read at the start, after each step, at the end
    summary = train(run, cfg, ToyTask())
    rates = {row["step"]: row["samples_per_s"] for row in run.metrics()}
    assert rates == pytest.approx({2: 2 * 16 / (CLOCK[2] - CLOCK[0]), 4: 2 * 16 / (CLOCK[4] - CLOCK[2]),
                                   5: 16 / (CLOCK[5] - CLOCK[4])}, rel=1e-3)
    assert summary["seconds"] == pytest.approx(CLOCK[6] - CLOCK[0])
    assert summary["samples_per_s"] == pytest.approx(5 * 16 / (CLOCK[6] - CLOCK[0]))

    run = new_run(tmp_path, cfg, "resumed")
    with pytest.raises(KeyboardInterrupt):
        train(run, cfg, ToyTask(interrupt_at=3))
    monkeypatch.setattr(loop, "time", fake_clock())
    summary = train(run, cfg, ToyTask(), resume=True)  # steps 4 and 5
    rates = {row["step"]: row["samples_per_s"] for row in run.metrics() if row["step"] > 3}
    assert rates == pytest.approx({4: 16 / (CLOCK[1] - CLOCK[0]), 5: 16 / (CLOCK[2] - CLOCK[1])}, rel=1e-3)
    assert summary["seconds"] == pytest.approx(CLOCK[3] - CLOCK[0])
    assert summary["samples_per_s"] == pytest.approx(2 * 16 / (CLOCK[3] - CLOCK[0]))


def test_on_a_terminal_the_bar_shows_the_step_the_rate_the_lr_and_the_loss_parts(tmp_path, monkeypatch, capsys):
    """train.progress on a terminal: "step n/total" from the step a resumed run starts at, the samples/s since this
    call started and the lr, the last step's loss parts on the line under it, and the bar stays on the screen at
    the end. train.progress = false shows nothing."""
    import dmclip.train.loop as loop

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # Rich draws as on a terminal
    monkeypatch.setenv("COLUMNS", "200")
    cfg = make_cfg(steps=3, checkpoint_every=0, progress=True)
    run = new_run(tmp_path, cfg)
    with pytest.raises(KeyboardInterrupt):
        train(run, cfg, ToyTask(interrupt_at=1))
    capsys.readouterr()
    monkeypatch.setattr(loop, "time", fake_clock())
    train(run, cfg, ToyTask(), resume=True)  # steps 2 and 3
    frames = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frame) for frame in capsys.readouterr().err.split("\x1b[2K")]
    first, last = frames[0], frames[-1]
    assert re.match(r"step \S+ 1/3 - samples/s ", first)
    row = run.metrics()[-1]
    rate = f"{2 * 16 / (CLOCK[2] - CLOCK[0]):,.0f} samples/s  lr {row['lr']:.3g}"
    parts = "  ".join(f"{k} {row[k]:.4g}" for k in ("loss", "image_to_text", "text_to_image", "grad_norm"))
    assert re.match(rf"step \S+ 3/3 {rate} .*\n{parts}\n$", last)

    quiet = make_cfg(steps=1, checkpoint_every=0, progress=False)
    train(new_run(tmp_path, quiet, "quiet"), quiet, ToyTask())
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_num_workers_loads_in_that_many_worker_processes(tmp_path, num_workers):
    """0 collates in the training process; 1 (or more) in DataLoader workers, so loading overlaps training."""

    class Recording(ToyTask):
        def __init__(self):
            super().__init__()
            self.collated_in = set()

        def collate(self, samples):
            return {**super().collate(samples), "pid": os.getpid()}

        def loss(self, model, batch, step):
            self.collated_in.add(batch["pid"])
            return super().loss(model, batch, step)

    cfg = make_cfg(steps=2, num_workers=num_workers, checkpoint_every=0)
    task = Recording()
    train(new_run(tmp_path, cfg), cfg, task)
    assert len(task.collated_in) == 1 and (os.getpid() in task.collated_in) == (num_workers == 0)


def test_a_ranks_worker_loads_that_ranks_share_of_each_step():
    """Rank 1 of 2 with a DataLoader worker gets the micro-batches it would load itself, step after step."""
    from dmclip.train.loop import _Batches

    dataset, task = PairDataset(seed=1, augment=0.05), ToyTask()
    loaded = []
    for workers in (0, 1):
        cfg = make_cfg(grad_accum=2, num_workers=workers)
        state = TrainState.create(task, task.model, dataset, cfg, seed=0, world=2, rank=1)
        batches, images = _Batches(dataset, task.collate, cfg, state, 1, torch.device("cpu")), []
        for step in range(3):
            micro_batches, state.order.position = state.order.next_step()
            images += [batches.get(step, micro, indices)["image"] for micro, indices in enumerate(micro_batches)]
        loaded.append(torch.cat(images))
    assert loaded[0].shape == (3 * 16 // 2, 16) and torch.equal(*loaded)


def test_a_stop_signal_sent_to_a_worker_does_not_stop_training(tmp_path):
    """Ctrl-C in a terminal reaches every process of the group: the workers leave it to the training process,
    which saves the last step (a worker that died instead would end the run with a DataLoader error)."""

    class SignallingWorkers(ToyTask):
        def collate(self, samples):
            return {**super().collate(samples), "pid": os.getpid()}

        def loss(self, model, batch, step):
            if step == 1:
                os.kill(batch["pid"], signal.SIGINT)
                os.kill(batch["pid"], signal.SIGTERM)
            return super().loss(model, batch, step)

    cfg = make_cfg(steps=8, num_workers=1, checkpoint_every=0)
    run = new_run(tmp_path, cfg)
    assert train(run, cfg, SignallingWorkers())["steps"] == 8


def test_what_fit_cannot_train_is_refused_before_anything_is_written(tmp_path):
    cfg = make_cfg(steps=2)
    run = new_run(tmp_path, cfg)
    with pytest.raises(DmclipError, match=r"the training data \(range_iterator\) has no length or indexing") as error:
        fit(ToyTask(), iter(range(4)), cfg, run, seed=0)
    assert error.value.hint == "fit needs a map-style dataset (len(dataset) and dataset[i]) or a stream"

    class IndexedWithoutLength:
        def __getitem__(self, index):
            return PairDataset()[index]

    with pytest.raises(DmclipError, match=r"the training data \(IndexedWithoutLength\) has no length or indexing"):
        fit(ToyTask(), IndexedWithoutLength(), cfg, run, seed=0)
    with pytest.raises(DmclipError, match="eval_every = 3 but no eval_fn was given") as error:
        fit(ToyTask(), PairDataset(), cfg, run, seed=0, eval_every=3)
    assert error.value.hint == "pass eval_fn, or eval_every=0"
    assert not run.checkpoint_path().exists() and run.metrics() == []

    class NoTotal(ToyTask):
        def loss(self, model, batch, step):
            return {"image_to_text": super().loss(model, batch, step)["image_to_text"]}

    with pytest.raises(TypeError, match=r"NoTotal.loss must return a dict with a 'loss' entry, got keys "
                                        r"\['image_to_text'\]"):
        fit(NoTotal(), PairDataset(), cfg, run, seed=0)


# ------------------------------------------------------------------------------- precision, DDP, dashboards


@pytest.mark.parametrize("amp,dtype", [("off", torch.float32), ("bf16", torch.bfloat16)])
def test_the_forward_pass_computes_in_the_dtype_train_amp_names(tmp_path, amp, dtype):
    """bf16 runs the loss under autocast in bfloat16 even where the device's autocast default is another type
    (CUDA's is float16; here the CPU's is set to it); off runs it in float32."""

    class Recording(ToyTask):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def loss(self, model, batch, step):
            self.dtypes.add(model.image_tower[0](batch["image"]).dtype)
            return super().loss(model, batch, step)

    cfg, task = make_cfg(steps=1, amp=amp, checkpoint_every=0), Recording()
    default = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)
    try:
        train(new_run(tmp_path, cfg), cfg, task)
    finally:
        torch.set_autocast_dtype("cpu", default)
    assert task.dtypes == {dtype}


class FiniteLossInfiniteGradient(ToyTask):
    """At step ``at`` the loss stays finite but the logit scale's gradient is inf (d sqrt(x)/dx at 0). Records the
    dtype its first layer computes in."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.dtypes = at, set()

    def loss(self, model, batch, step):
        self.dtypes.add(model.image_tower[0](batch["image"]).dtype)
        out = super().loss(model, batch, step)
        if step == self.at:
            scale = model.logit_scale
            out["loss"] = out["loss"] + torch.sqrt(scale - scale.detach())
        return out


def test_fp16_loss_scaling_keeps_the_update_and_skips_a_step_whose_gradients_overflow(tmp_path):
    """A CPU GradScaler stands in for CUDA's: gradients scaled, then unscaled before clipping, give bitwise the
    update of a run without one. A step whose gradient is inf is skipped (weights kept, the scale halved, the run
    goes on); without a scaler the same step stops the run, naming the gradient norm. train.amp = fp16 computes
    the forward pass in float16."""
    from dmclip.train.interrupt import InterruptGuard
    from dmclip.train.loop import _Batches, _train_step

    cfg, cpu = make_cfg(), torch.device("cpu")
    run = new_run(tmp_path, cfg)
    after_first_step = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**16)):
        task = FiniteLossInfiniteGradient(at=1)
        state = toy_state(cfg, task)
        state.scaler = scaler
        batches = _Batches(PairDataset(seed=1), task.collate, cfg, state, 0, cpu)
        with InterruptGuard() as guard:
            first, _ = _train_step(state, task.model, batches, cfg, run, guard, cpu)
            after_first_step.append(weights(task.model))
            if scaler is None:
                with pytest.raises(DmclipError, match=r"diverged at step 2: non-finite grad_norm=inf"):
                    _train_step(state, task.model, batches, cfg, run, guard, cpu)
                continue
            overflowed, _ = _train_step(state, task.model, batches, cfg, run, guard, cpu)
        assert math.isfinite(overflowed["loss"]) and overflowed["grad_norm"] == math.inf
        assert_same_weights(weights(task.model), after_first_step[-1])
        assert scaler.get_scale() == 2.0**15 and state.step == 2
    assert first["grad_norm"] < math.inf and task.dtypes == {torch.float32}
    assert_same_weights(*after_first_step)

    fp16 = make_cfg(amp="fp16")
    with warnings.catch_warnings():  # CUDA's GradScaler, made for fp16, turns itself off here
        warnings.simplefilter("ignore")
        state = toy_state(fp16, task)
    with InterruptGuard() as guard:
        _train_step(state, task.model, batches, fp16, run, guard, cpu)
    assert task.dtypes == {torch.float32, torch.float16}


class WithBranch(torch.nn.Module):
    """ToyClip with a layer in front of the image tower that only some steps use."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip, self.branch = clip, torch.nn.Linear(16, 16)

    def forward(self, image, text, branch: bool):
        return self.clip(self.branch(image) if branch else image, text)


class BranchAtStepZero(ToyTask):
    """Uses WithBranch's branch on step 0 only, and records its weight after every step."""

    find_unused_parameters = True

    def __init__(self):
        super().__init__()
        self.model = WithBranch(self.model)
        self.branch_weights = []

    def loss(self, model, batch, step):
        return super().loss(lambda image, text: model(image, text, branch=step == 0), batch, step)

    def on_step_end(self, step):
        super().on_step_end(step)
        self.branch_weights.append(self.model.branch.weight.detach().clone())


def test_a_layer_a_step_does_not_use_keeps_its_weights_on_that_step(tmp_path):
    """AdamW skips a parameter without a gradient: no momentum from an earlier step moves it."""
    cfg, task = make_cfg(steps=3, checkpoint_every=0), BranchAtStepZero()
    initial = task.model.branch.weight.detach().clone()
    train(new_run(tmp_path, cfg), cfg, task)
    first, *later = task.branch_weights
    assert not torch.equal(first, initial)
    for weight in later:
        assert torch.equal(weight, first)


@pytest.fixture
def one_process_group(tmp_path, monkeypatch):
    """torchrun's stand-in: a one-process gloo group that dmclip treats as distributed (DDP, collectives)."""
    import torch.distributed as dist

    from dmclip.train import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    yield
    # free the test's DDP wrappers here, with gloo's threads alive: left for a forked DataLoader worker's garbage
    # collector, a process group's destructor waits forever on a thread the fork did not copy
    gc.collect()
    dist.destroy_process_group()


def test_under_torchrun_ddp_is_told_of_parameters_a_step_does_not_use(tmp_path, one_process_group, monkeypatch):
    """A task's find_unused_parameters reaches DDP (without it DDP stops at the next step: 'Expected to have
    finished reduction'), and the run matches the one without DDP."""
    from dmclip.train import distributed

    cfg = make_cfg(steps=3, checkpoint_every=0)
    trained = []
    for under_ddp in (True, False):
        if not under_ddp:
            monkeypatch.setattr(distributed, "is_distributed", lambda: False)
        task = BranchAtStepZero()
        assert train(new_run(tmp_path, cfg, f"ddp-{under_ddp}"), cfg, task)["steps"] == 3
        trained.append(weights(task.model))
    assert_same_weights(*trained)


def test_what_the_loss_calls_is_ddp_under_torchrun_and_compiled_with_train_compile(one_process_group, monkeypatch):
    """DDP gets the task's find_unused_parameters (false when the task does not say: DDP's extra pass over the graph
    costs time and warns) and no device ids on the CPU; train.compile hands the DDP wrapper to torch.compile (a
    stand-in here: importing the compiler takes seconds)."""
    from torch.nn.parallel import DistributedDataParallel

    from dmclip.train.loop import _wrap

    cpu = torch.device("cpu")
    for task, unused in ((ToyTask(), False), (BranchAtStepZero(), True)):
        wrapped = _wrap(task.model, task, make_cfg(), cpu)
        assert isinstance(wrapped, DistributedDataParallel) and wrapped.module is task.model
        assert wrapped.find_unused_parameters is unused and wrapped.device_ids is None
    monkeypatch.setattr(torch, "compile", lambda module: ("compiled", module))
    compiled, module = _wrap(task.model, task, make_cfg(compile=True), cpu)
    assert compiled == "compiled" and isinstance(module, DistributedDataParallel) and module.module is task.model


def test_the_forward_pass_draws_what_the_seed_the_step_and_the_micro_batch_seed(tmp_path, monkeypatch):
    """Dropout, sampling and the like draw from torch's RNG reseeded from (seed, step, rank, micro-batch) before
    each forward pass: the numbers a loss draws are reseed's for that key, whatever loading the batch drew. On a
    GPU its generator gets the same seed (recorded here in place of a GPU: the loop only passes the device on)."""
    from dmclip.train.interrupt import InterruptGuard
    from dmclip.train.loop import _Batches, _train_step
    from dmclip.train.rng import _mix_seed, reseed

    class Drawing(ToyTask):
        def __init__(self):
            super().__init__()
            self.draws = []

        def loss(self, model, batch, step):
            self.draws.append(torch.rand(2))
            return super().loss(model, batch, step)

    cfg, task = make_cfg(steps=2, grad_accum=2, checkpoint_every=0), Drawing()
    train(new_run(tmp_path, cfg), cfg, task, dataset=PairDataset(seed=1, augment=0.05), seed=3)
    expected = []
    for step, micro in ((0, 0), (0, 1), (1, 0), (1, 1)):
        reseed(3, step, 0, micro, host=False)
        expected.append(torch.rand(2))
    assert len(task.draws) == 4 and all(torch.equal(a, b) for a, b in zip(task.draws, expected))

    gpu_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed", gpu_seeds.append)
    state = toy_state(cfg, task)  # seed 0
    batches = _Batches(PairDataset(seed=1), task.collate, cfg, state, 0, torch.device("cpu"))
    with InterruptGuard() as guard:
        _train_step(state, task.model, batches, cfg, new_run(tmp_path, cfg, "gpu"), guard, torch.device("cuda"))
    assert gpu_seeds == [_mix_seed(0, 0, 0, micro, 0) for micro in (0, 1)]


def test_a_lost_peer_is_an_error_naming_the_step_after_the_last_completed_one_is_saved(tmp_path,
                                                                                       one_process_group):
    """A collective failing (another rank died) ends the run with a DmclipError that names the step and how to
    continue, and rank 0 saves the last completed step first; weights that cannot be saved (non-finite) leave the
    last checkpoint as it is and the error is still the lost peer."""

    class LosingPeer(ToyTask):
        def __init__(self, corrupt: bool):
            super().__init__()
            self.corrupt = corrupt

        def loss(self, model, batch, step):
            if step == 3:
                raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500\nmore detail")
            return super().loss(model, batch, step)

        def on_step_end(self, step):
            super().on_step_end(step)
            if self.corrupt and step == 2:
                with torch.no_grad():
                    self.model.text_tower[4].weight[0, 0] = float("inf")

    cfg = make_cfg(steps=6, checkpoint_every=2)
    for corrupt, saved_step in ((False, 3), (True, 2)):
        run = new_run(tmp_path, cfg, f"corrupt-{corrupt}")
        with pytest.raises(DmclipError) as error:
            train(run, cfg, LosingPeer(corrupt))
        assert error.value.message == ("rank 0 lost contact with the other training processes at step 4 "
                                       "([gloo] Connection closed by peer [127.0.0.1]:29500)")
        assert "--resume" in error.value.hint
        assert run.load_checkpoint()["step"] == saved_step


def test_without_torchrun_an_error_that_reads_like_a_lost_peer_surfaces_as_it_is(tmp_path):
    """One process has no peers: a connection error (a dataset read over the network, say) is not reported as a
    lost training process."""

    class ReadingOverTheNetwork(ToyTask):
        def loss(self, model, batch, step):
            if step == 1:
                raise RuntimeError("Connection reset by peer")
            return super().loss(model, batch, step)

    cfg = make_cfg(steps=3, checkpoint_every=0)
    with pytest.raises(RuntimeError, match="^Connection reset by peer$"):
        train(new_run(tmp_path, cfg), cfg, ReadingOverTheNetwork())


def test_dashboards_get_every_metrics_row_and_a_resumed_run_starts_at_its_checkpoint(tmp_path, monkeypatch):
    """train.report_to attaches the dashboards as training starts (a resumed run's from the checkpoint's step, so
    the steps after it are written again, not twice) and each metrics row reaches them."""
    from dmclip.train import report_to

    opened = []

    class Dashboard:
        def __init__(self, names, run_path, *, start_step=0):
            self.names, self.start_step, self.steps = names, start_step, []
            opened.append(self)

        def log(self, row):
            self.steps.append(row["step"])

        def close(self):
            pass

    monkeypatch.setattr(report_to, "Reporter", Dashboard)
    cfg = make_cfg(steps=4, checkpoint_every=2, report_to=["tensorboard"])
    run = new_run(tmp_path, cfg)
    with pytest.raises(KeyboardInterrupt):
        train(run, cfg, ToyTask(interrupt_at=3))
    train(run, cfg, ToyTask(), resume=True)
    assert [(d.names, d.start_step, d.steps) for d in opened] == [(["tensorboard"], 0, [1, 2, 3]),
                                                                  (["tensorboard"], 3, [4])]

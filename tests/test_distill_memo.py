"""The teacher's features computed once per image and caption (dmclip.distill.memo): when it is planned, that
the student trains on the same targets as with the teacher run every step, and that the teacher then runs
once per image instead of once per epoch."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.cli import SIX_STEPS, one_thread_main
from helpers.kill_resume import the_run
from helpers.teachers import save_tiny_teacher

from dmclip.data import build_dataset
from dmclip.distill import DistillConfig, DistillTask, build_student, load_teacher, memo
from dmclip.distill.memo import MemoPlan, TeacherMemo, plan_memo
from dmclip.train.tasks import pick_caption

DATA = "world-train:size=24,captions=3,image_size=32"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(DATA, tmp_path_factory.mktemp("teacher") / "model")


def test_plan_memoises_what_the_run_would_compute_again():
    """24 images with 3 captions each (72): images pay from 36 reads (1.5 epochs), captions from 108."""
    ds = build_dataset(DATA)
    assert plan_memo(ds, reads=35, with_images=True, embed_dim=32) == MemoPlan(False, False, 24, 72)
    assert plan_memo(ds, reads=36, with_images=True, embed_dim=32) == MemoPlan(True, False, 24, 72)
    assert plan_memo(ds, reads=108, with_images=True, embed_dim=32) == MemoPlan(True, True, 24, 72)
    # alpha 0 reads no teacher image features: only captions are worth keeping
    assert plan_memo(ds, reads=108, with_images=False, embed_dim=32) == MemoPlan(False, True, 24, 72)
    assert not plan_memo(ds, reads=107, with_images=False, embed_dim=32)


def test_plan_keeps_nothing_past_its_memory_bound_or_for_a_stream(monkeypatch):
    ds = build_dataset(DATA)
    # (24 + 72) rows x 32 floats = 12288 bytes: one byte less and nothing is kept
    monkeypatch.setattr(memo, "MAX_BYTES", 4 * 32 * (24 + 72))
    assert plan_memo(ds, reads=1000, with_images=True, embed_dim=32) == MemoPlan(True, True, 24, 72)
    monkeypatch.setattr(memo, "MAX_BYTES", 4 * 32 * (24 + 72) - 1)
    assert not plan_memo(ds, reads=1000, with_images=True, embed_dim=32)

    class Stream:  # samples by position in a stream: no index to key features by
        def __iter__(self):
            return iter(())

    assert not plan_memo(Stream(), reads=1000, with_images=True, embed_dim=32)


def _task(teacher_dir, plan: MemoPlan | None, alpha: float = 0.75):
    cfg = DistillConfig(teacher=f"run:{teacher_dir}")
    cfg.student.name, cfg.loss.alpha = "vit-nano", alpha
    teacher = load_teacher(cfg.teacher)
    torch.manual_seed(0)
    task = DistillTask(build_student(cfg, teacher), teacher, cfg)
    ds = build_dataset(DATA, image_size=32)
    if plan is not None:
        task.memo, task.dataset = TeacherMemo(plan), ds
    return task, ds


@pytest.mark.parametrize("plan", [MemoPlan(True, True, 24, 72), MemoPlan(True, False, 24, 72),
                                  MemoPlan(False, True, 24, 72)], ids=["both", "images", "captions"])
def test_memoised_features_and_loss_equal_the_online_teachers(teacher_dir, plan):
    """A shuffled batch at a step whose caption choices are not all the first: every feature the memo hands
    out (and what it leaves to the teacher) equals the teacher's on that batch, and so does the loss."""
    online, ds = _task(teacher_dir, None)
    memoised, _ = _task(teacher_dir, plan)
    order = [17, 3, 23, 0, 9, 12, 5, 20]
    batch = online.collate([ds[i] for i in order])
    step = 7
    captions = [pick_caption(c, 0, step, i) for c, i in zip(batch["captions"], batch["index"])]
    assert len({c.index(p) for c, p in zip(batch["captions"], captions)}) > 1
    expected = online.teacher_features(batch["images"], captions, batch["index"])
    got = memoised.teacher_features(batch["images"], captions, batch["index"])
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)
    with torch.no_grad():
        a, b = online.loss(online.model, batch, step), memoised.loss(online.model, batch, step)
    for key in ("loss", "contrastive", "kd"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_the_teacher_runs_once_per_image_and_caption_not_every_step(teacher_dir):
    task, ds = _task(teacher_dir, MemoPlan(True, True, 24, 72))
    calls = {"encode_image": 0, "encode_text": 0}
    for name in calls:
        method = getattr(task.teacher, name)

        def counted(*args, _name=name, _method=method):
            calls[_name] += 1
            return _method(*args)
        setattr(task.teacher, name, counted)
    for step in range(5):
        batch = task.collate([ds[(5 * step + i) % 24] for i in range(8)])
        task.loss(task.model, batch, step)["loss"].backward()
    # 24 images in one chunk, 72 captions in one chunk, all before the first step's loss
    assert calls == {"encode_image": 1, "encode_text": 1}


def test_alpha_0_memoises_only_captions_and_never_runs_the_image_tower(teacher_dir):
    ds = build_dataset(DATA)
    task, _ = _task(teacher_dir, plan_memo(ds, reads=200, with_images=False, embed_dim=32), alpha=0.0)
    task.teacher.encode_image = None  # any call fails
    batch = task.collate([ds[i] for i in range(8)])
    assert torch.isfinite(task.loss(task.model, batch, 0)["loss"])
    assert task.memo.image_features is None and task.memo.text_features.shape == (72, 32)


def _distill(teacher_dir, root, *extra):
    argv = ["distill", "--teacher", f"run:{teacher_dir}", "--student", "vit-nano", "--alpha", "0.75",
            "--data", "world-train:size=32,captions=1", *SIX_STEPS, "--runs-dir", str(root), *extra]
    assert one_thread_main(argv) == 0
    run = the_run(root)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()], run


def test_distill_run_uses_the_memo_and_trains_on_the_same_targets(teacher_dir, tmp_path, monkeypatch, capsys):
    """6 steps x 16 on 32 images with one caption each read every image 3 times: the run computes the teacher's
    features once, and its losses follow the run that runs the teacher every step."""
    memoised, _ = _distill(teacher_dir, tmp_path / "memo")
    said = " ".join(capsys.readouterr().err.split())  # Rich wraps long lines
    assert "teacher's features of 32 images and 32 captions once" in said
    monkeypatch.setattr(memo, "MIN_READS", float("inf"))
    online, _ = _distill(teacher_dir, tmp_path / "online")
    assert "once" not in " ".join(capsys.readouterr().err.split())
    assert [row["step"] for row in memoised] == [row["step"] for row in online]
    for a, b in zip(memoised, online):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)

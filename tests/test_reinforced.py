"""Reinforced stores: cached teacher outputs equal the online teacher's, and distill reads them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.teachers import save_tiny_teacher

from dmclip.data import build_dataset
from dmclip.data.reinforced import ReinforcedStore, apply_boxes, crop_boxes
from dmclip.distill import DistillConfig, DistillTask, build_student, load_teacher
from dmclip.distill.reinforce import build_store
from dmclip.errors import DmclipError

DATA = "world-train:size=24,captions=1,image_size=32"
DATA3 = "world-train:size=24,captions=3,image_size=32"  # same images, three captions each


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(DATA, tmp_path_factory.mktemp("teacher") / "model")


def test_identity_box_leaves_the_image_unchanged():
    images = torch.rand(3, 3, 32, 32)
    out = apply_boxes(images, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3))
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_crop_boxes_are_inside_the_image_and_seeded():
    boxes = crop_boxes(50, 4, seed=1)
    assert boxes.shape == (50, 4, 4)
    assert (boxes[:, 0] == torch.tensor([0.0, 0.0, 1.0, 1.0])).all()
    assert (boxes >= 0).all() and (boxes <= 1 + 1e-6).all()
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    torch.testing.assert_close(boxes, crop_boxes(50, 4, seed=1))
    assert not torch.equal(boxes, crop_boxes(50, 4, seed=2))


def test_store_holds_the_teachers_embeddings_of_each_view(teacher_dir, tmp_path):
    ref = f"run:{teacher_dir}"
    build_store(ref, DATA, tmp_path / "store", augmentations=3, batch_size=7, shard_size=10, progress=False)
    store = ReinforcedStore(tmp_path / "store")
    teacher = load_teacher(ref)
    ds = build_dataset(DATA, image_size=32)
    assert store.image_embeddings.shape == (len(ds), 3, teacher.embed_dim)
    for index in (0, 13, 23):
        image = ds[index]["image"].float().unsqueeze(0) / 255
        for k in range(3):
            view = apply_boxes(image, store.boxes[index, k].unsqueeze(0))
            with torch.no_grad():
                expected = teacher.encode_image(view)[0]
            torch.testing.assert_close(store.image_embeddings[index, k].float(), expected, atol=2e-3, rtol=2e-3)
        with torch.no_grad():
            text = teacher.encode_text(teacher.tokenize(ds.captions(index)[:1]))[0]
        torch.testing.assert_close(store.text_embeddings[index, 0].float(), text, atol=2e-3, rtol=2e-3)


def test_an_interrupted_store_continues_and_other_settings_are_refused(teacher_dir, tmp_path):
    from safetensors.torch import load_file

    ref = f"run:{teacher_dir}"
    out = tmp_path / "store"
    build_store(ref, DATA, out, augmentations=2, shard_size=10, progress=False)
    (out / "shard-00001.safetensors").unlink()  # as if killed before the second shard
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    build_store(ref, DATA, out, augmentations=2, shard_size=10, progress=False)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first  # kept, not recomputed
    # the resumed store holds what one uninterrupted build holds, shard by shard
    whole = tmp_path / "whole"
    build_store(ref, DATA, whole, augmentations=2, shard_size=10, progress=False)
    names = sorted(p.name for p in whole.glob("shard-*.safetensors"))
    assert names == sorted(p.name for p in out.glob("shard-*.safetensors")) and len(names) == 3
    for name in names:
        resumed, expected = load_file(str(out / name)), load_file(str(whole / name))
        assert set(resumed) == set(expected) == {"image_embeddings", "text_embeddings", "boxes", "indices"}
        for key in expected:
            torch.testing.assert_close(resumed[key], expected[key], atol=1e-3, rtol=1e-3, msg=f"{name} {key}")
    torch.testing.assert_close(ReinforcedStore(out).image_embeddings, ReinforcedStore(whole).image_embeddings,
                               atol=1e-3, rtol=1e-3)
    with pytest.raises(DmclipError, match="other settings"):
        build_store(ref, DATA, out, augmentations=3, shard_size=10, progress=False)


def _close_in_fp16(stored: torch.Tensor, expected: torch.Tensor) -> bool:
    """Stored fp16 equals the float value up to fp16 rounding (2^-11 relative) plus float noise."""
    return torch.allclose(stored.float(), expected, rtol=1e-3, atol=1e-4)


def test_store_of_several_views_and_captions_holds_each_crop_and_caption(teacher_dir, tmp_path):
    """K = 4 views and 3 captions per image: view k > 0 is the teacher's embedding of exactly the stored
    crop, every caption's stored text embedding is the teacher's of that caption, and the (view, caption)
    that distill chooses reads back as the teacher's features of that crop and caption."""
    ref = f"run:{teacher_dir}"
    build_store(ref, DATA3, tmp_path / "store", augmentations=4, captions_per_image=3, batch_size=5,
                shard_size=9, progress=False)
    store = ReinforcedStore(tmp_path / "store")
    teacher = load_teacher(ref)
    ds = build_dataset(DATA3, image_size=32)
    assert store.image_embeddings.shape == (len(ds), 4, teacher.embed_dim)
    assert store.text_embeddings.shape == (len(ds), 3, teacher.embed_dim)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))]).float() / 255
    pixel = 1 / 32
    with torch.no_grad():
        for k in range(1, 4):
            boxes = store.boxes[:, k]
            assert not torch.allclose(boxes, torch.tensor([0.0, 0.0, 1.0, 1.0]))  # a real crop, not the identity
            expected = teacher.encode_image(apply_boxes(images, boxes))
            assert _close_in_fp16(store.image_embeddings[:, k], expected), k
            # one pixel off is outside the tolerance: the check above pins the crop to the pixel
            shifted = teacher.encode_image(apply_boxes(images, boxes + torch.tensor([pixel, 0.0, pixel, 0.0])))
            assert not _close_in_fp16(store.image_embeddings[:, k], shifted), k
        for index in range(len(ds)):
            captions = ds.captions(index)
            assert len(set(captions)) == 3
            texts = teacher.encode_text(teacher.tokenize(captions))
            assert _close_in_fp16(store.text_embeddings[index], texts), index
        # what distill reads for the (view, caption) it chooses
        chosen = {i: store.choose(seed=0, step=7, index=i) for i in range(len(ds))}
        assert {a for a, _ in chosen.values()} >= {1, 2, 3} and {c for _, c in chosen.values()} >= {1, 2}
        for index, (a, c) in chosen.items():
            got = store.features([index], [a], [c])
            view = apply_boxes(images[index:index + 1], store.boxes[index, a].unsqueeze(0))
            image = torch.nn.functional.normalize(teacher.encode_image(view), dim=-1)[0]
            text = torch.nn.functional.normalize(teacher.encode_text(teacher.tokenize([ds.captions(index)[c]])),
                                                 dim=-1)[0]
            torch.testing.assert_close(got["image_features"][0], image, atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(got["text_features"][0], text, atol=1e-3, rtol=1e-3)


def _cached_case(teacher_dir, tmp_path, step: int, text: str = "frozen-teacher") -> SimpleNamespace:
    """A K = 4, 3-caption store of DATA3, a vit-nano student distilling from it, a 12-image batch, and the crops
    and captions the store chooses for that batch at ``step`` (some not the first view or caption)."""
    ref = f"run:{teacher_dir}"
    build_store(ref, DATA3, tmp_path / "store", augmentations=4, captions_per_image=3, progress=False)
    store = ReinforcedStore(tmp_path / "store")
    cfg = DistillConfig(teacher=ref)
    cfg.student.name, cfg.student.text = "vit-nano", text
    teacher = load_teacher(ref)
    torch.manual_seed(0)
    student = build_student(cfg, teacher)
    task = DistillTask(student, teacher, cfg, store)
    ds = build_dataset(DATA3, image_size=32)
    batch = task.collate([ds[i] for i in range(12)])
    chosen = [store.choose(cfg.seed, step, i) for i in batch["index"]]
    assert any(a > 0 for a, _ in chosen) and any(c > 0 for _, c in chosen)
    crops = apply_boxes(batch["images"], torch.stack([store.boxes[i, a] for i, (a, _) in zip(batch["index"], chosen)]))
    captions = [caps[c] for caps, (_, c) in zip(batch["captions"], chosen)]
    return SimpleNamespace(store=store, teacher=teacher, student=student, task=task, batch=batch, chosen=chosen,
                           crops=crops, captions=captions)


def test_store_teacher_with_several_views_and_captions_gives_the_loss_of_the_chosen_crop(teacher_dir, tmp_path):
    """distill from a K = 4, 3-caption store: the loss is the online teacher's on the chosen crop and caption."""
    from dmclip.distill import teacher_features

    step = 4
    case = _cached_case(teacher_dir, tmp_path, step)
    student, teacher, cached, batch = case.student.eval(), case.teacher, case.task, case.batch
    crops, captions = case.crops, case.captions
    with torch.no_grad():
        got = cached.loss(student, batch, step=step)
        target = teacher_features(teacher, crops, captions)
        out = student(crops)
        out["text_features"] = target["text_features"]
        expected = cached.criterion(out, target)
    for key in ("loss", "contrastive", "kd"):
        torch.testing.assert_close(got[key], expected[key], atol=2e-3, rtol=2e-3)


def test_missing_store_shard_is_a_clear_error(teacher_dir, tmp_path):
    out = tmp_path / "store"
    build_store(f"run:{teacher_dir}", DATA, out, augmentations=1, shard_size=10, progress=False)
    (out / "shard-00002.safetensors").unlink()
    with pytest.raises(DmclipError, match="rerun"):
        ReinforcedStore(out)


def test_store_teacher_gives_the_online_teachers_loss(teacher_dir, tmp_path):
    """One view (the identity) and one caption per image: cached and online KD must agree."""
    ref = f"run:{teacher_dir}"
    build_store(ref, DATA, tmp_path / "store", augmentations=1, progress=False)
    store = ReinforcedStore(tmp_path / "store")
    cfg = DistillConfig(teacher=ref)
    cfg.student.name = "vit-nano"
    teacher = load_teacher(ref)
    torch.manual_seed(0)
    student = build_student(cfg, teacher)
    online = DistillTask(student, teacher, cfg)
    cached = DistillTask(student, teacher, cfg, store)
    ds = build_dataset(DATA, image_size=32)
    batch = online.collate([ds[i] for i in range(8)])
    a = online.loss(student, batch, step=3)
    b = cached.loss(student, batch, step=3)
    for key in ("loss", "contrastive", "kd"):
        torch.testing.assert_close(a[key], b[key], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("text", ["frozen-teacher", "finetune-teacher"])
def test_cached_step_reads_the_chosen_crops_and_tokenises_only_for_a_text_tower_that_trains(teacher_dir, tmp_path,
                                                                                           text):
    """The cached step's batch is the stored crop and the chosen caption of each image, and its loss and
    gradients are the student's on exactly those with the store's features. A frozen text tower's features
    come from the store, so the step tokenises nothing (the tokens were computed and thrown away before);
    a text tower that trains gets the chosen captions' tokens."""
    step = 5
    case = _cached_case(teacher_dir, tmp_path, step, text=text)
    store, student, task, batch, chosen = case.store, case.student, case.task, case.batch, case.chosen
    crops, captions = case.crops, case.captions
    target = store.features(batch["index"], [a for a, _ in chosen], [c for _, c in chosen])

    images, got_captions, got_target = task.cached_inputs(batch, step)
    assert torch.equal(images, crops) and got_captions == captions
    for key in target:
        assert torch.equal(got_target[key], target[key]), key

    tokenized = []
    tokenize = student.tokenize
    student.tokenize = lambda texts: tokenized.append(list(texts)) or tokenize(texts)
    got = task.loss(student, batch, step)
    got["loss"].backward()
    got_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert tokenized == ([] if text == "frozen-teacher" else [captions])

    student.zero_grad(set_to_none=True)
    if text == "frozen-teacher":
        out = student(crops)
        out["text_features"] = target["text_features"]
    else:
        out = student(crops, tokenize(captions))
    expected = task.criterion(out, target)
    expected["loss"].backward()
    for key in ("loss", "contrastive", "kd"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-6)
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert set(got_grads) == set(grads) and any(n.startswith("text.") for n in grads) == (text != "frozen-teacher")
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)

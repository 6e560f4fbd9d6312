"""Reinforced stores: cached teacher outputs equal the online teacher's, and distill reads them."""

from __future__ import annotations

import pytest
import torch

from dmclip.data import build_dataset
from dmclip.data.reinforced import ReinforcedStore, apply_boxes, build_store, crop_boxes
from dmclip.data.tokenizer import Tokenizer
from dmclip.distill import DistillConfig, DistillTask, build_student, load_teacher
from dmclip.errors import DmclipError
from dmclip.models.base import build_model, save_model
from dmclip.models.clip import clip_arch

DATA = "world-train:size=24,captions=1,image_size=32"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    ds = build_dataset(DATA)
    tok = Tokenizer.fit([c for i in range(len(ds)) for c in ds.captions(i)], 16).to_dict()
    model = build_model(clip_arch(32, 8, 32, 1, 2, 32, 1, 2, 32, tok))
    return save_model(model, tmp_path_factory.mktemp("teacher") / "model")


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
    ref = f"run:{teacher_dir}"
    out = tmp_path / "store"
    build_store(ref, DATA, out, augmentations=2, shard_size=10, progress=False)
    (out / "shard-00001.safetensors").unlink()  # as if killed before the second shard
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    build_store(ref, DATA, out, augmentations=2, shard_size=10, progress=False)
    assert (out / "shard-00001.safetensors").exists()
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first  # kept, not recomputed
    with pytest.raises(DmclipError, match="other settings"):
        build_store(ref, DATA, out, augmentations=3, shard_size=10, progress=False)


def test_missing_store_shard_is_a_clear_error(teacher_dir, tmp_path):
    out = tmp_path / "store"
    build_store(f"run:{teacher_dir}", DATA, out, augmentations=1, shard_size=10, progress=False)
    (out / "shard-00002.safetensors").unlink()
    with pytest.raises(DmclipError, match="rerun"):
        ReinforcedStore(out)


def test_cached_teacher_gives_the_online_teachers_loss(teacher_dir, tmp_path):
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
    for key in ("loss", "contrastive", "distill"):
        torch.testing.assert_close(a[key], b[key], atol=2e-3, rtol=2e-3)

"""BlipTask: what the training engine calls for `dmclip pretrain --objective blip`.

A user would notice: a resumed run training on other captions than the uninterrupted one, the
distillation weight not ramping up, or momentum encoders that never move.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dmclip.errors import DmclipError
from dmclip.models.blip import BlipModel, blip_tokenizer
from dmclip.train.tasks import BlipTask

CAPTIONS = [[f"a {c} {s}" for s in ("circle", "square", "star")] for c in ("red", "blue", "green", "pink")]
TINY = dict(image_size=16, patch_size=4, vision_width=32, vision_depth=2, vision_heads=2, text_width=32,
            text_depth=2, text_heads=2, embed_dim=16, context_length=16, queue_size=8)


@pytest.fixture
def task() -> BlipTask:
    torch.manual_seed(0)
    model = BlipModel(**TINY, tokenizer=blip_tokenizer([c for cs in CAPTIONS for c in cs], 16))
    return BlipTask(model, seed=3, steps_per_epoch=10)


def samples(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g),
             "captions": CAPTIONS[i], "index": 100 + i} for i in range(n)]


def test_collate(task):
    batch = task.collate(samples())
    assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert 0.0 <= batch["images"].min() and batch["images"].max() <= 1.0
    assert torch.equal(batch["images"] * 255, torch.stack([s["image"] for s in samples()]).float())
    assert batch["indices"].tolist() == [100, 101, 102, 103]
    with pytest.raises(DmclipError, match="no caption"):
        task.collate([{**samples(1)[0], "captions": []}])


def test_caption_choice_is_a_function_of_seed_step_and_index(task):
    batch = task.collate(samples())
    assert task.captions_at(batch, 7) == task.captions_at(task.collate(samples()), 7)
    chosen = {tuple(task.captions_at(batch, step)) for step in range(30)}
    assert len(chosen) > 5  # varies over steps
    other_seed = BlipTask(task.model, seed=4, steps_per_epoch=10)
    assert any(task.captions_at(batch, s) != other_seed.captions_at(batch, s) for s in range(10))
    for step in range(5):
        for caption, options in zip(task.captions_at(batch, step), CAPTIONS):
            assert caption in options


def test_alpha_ramps_linearly_over_two_epochs(task):
    assert [task.alpha_scale(s) for s in (0, 5, 10, 20, 35)] == [0.0, 0.25, 0.5, 1.0, 1.0]


def test_loss_is_the_models_forward_losses_on_the_chosen_captions(task):
    batch = task.collate(samples())
    reference = copy.deepcopy(task.model)
    torch.manual_seed(1)
    out = task.loss(task.model, batch, step=5)
    torch.manual_seed(1)
    expected = reference.forward_losses(batch["images"], reference.tokenize(task.captions_at(batch, 5)),
                                        alpha_scale=0.25, indices=batch["indices"])
    for key in ("loss", "itc", "itm", "lm"):
        assert out[key].item() == pytest.approx(expected[key].item(), abs=1e-6), key
    assert task.model.idx_queue[:4].tolist() == [100, 101, 102, 103]


def test_on_step_end_moves_the_momentum_encoders(task):
    with torch.no_grad():
        task.model.text_proj.weight.add_(1.0)
    before = task.model.text_proj_m.weight.detach().clone()
    task.on_step_end(0)
    expected = 0.995 * before + 0.005 * task.model.text_proj.weight.detach()
    assert torch.allclose(task.model.text_proj_m.weight, expected, atol=1e-6)
    assert task.state_dict() == {}
    task.load_state_dict({})

"""`student.stem: conv`: the student sees the image through the same kind of stem as the shipped teacher.

What a user would notice if this broke: the option silently ignored (a linear patch embedding trained
instead), a saved student that reloads with a different stem (wrong outputs), or a typo accepted.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dmclip.errors import DmclipError
from dmclip.models.base import load_saved_model, save_model
from dmclip.models.mamba import VisionMamba


def test_conv_stem_builds_the_token_grid_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = VisionMamba(image_size=32, patch_size=4, width=32, depth=1, d_state=4, embed_dim=16,
                        scan_backend="reference", stem="conv").eval()
    assert isinstance(model.patch_embed, nn.Sequential) and model.arch["stem"] == "conv"
    images = torch.rand(3, 3, 32, 32)
    assert model.forward_tokens(images).shape == (3, 64, 32)  # (32 / 4)^2 tokens, as the patch stem
    save_model(model, tmp_path / "m")
    loaded = load_saved_model(tmp_path / "m").eval()
    assert isinstance(loaded.patch_embed, nn.Sequential)
    torch.testing.assert_close(loaded(images), model(images))


def test_patch_stem_keeps_the_old_arch_and_a_bad_stem_is_refused():
    assert "stem" not in VisionMamba(image_size=32, patch_size=8, width=32, depth=1, d_state=4, embed_dim=16).arch
    with pytest.raises(DmclipError, match="unknown image stem 'cnv'"):
        VisionMamba(image_size=32, patch_size=8, width=32, depth=1, stem="cnv")


def test_distill_config_passes_the_stem_to_the_student():
    from dmclip.distill import DistillConfig, build_student
    from dmclip.models.base import build_model

    teacher = build_model({"family": "clip",
                           "visual": {"family": "vit", "image_size": 32, "patch_size": 4, "width": 32, "depth": 1,
                                      "heads": 2, "embed_dim": 16},
                           "text": {"family": "text", "width": 32, "depth": 1, "heads": 2, "embed_dim": 16,
                                    "tokenizer": {"context_length": 8, "vocab": [1, 2, 3]}}})
    cfg = DistillConfig()
    cfg.student.name, cfg.student.stem = "mamba-tiny-test", "conv"
    student = build_student(cfg, teacher)
    assert student.visual.arch["stem"] == "conv" and student.visual.arch["patch_size"] == 4

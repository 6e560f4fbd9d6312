"""open_clip models behind dmclip's model contract (any of open_clip's architectures).

``open_clip:ViT-B-32`` builds the architecture with random weights; ``open_clip:ViT-B-32:<path>`` loads a
local checkpoint; ``open_clip:ViT-B-32:<tag>`` asks open_clip for a pretrained tag (needs the hub, so it
fails with a clear error when offline).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.errors import DmclipError, did_you_mean
from dmclip.models.base import register_family


class _OpenClipTokenizer:
    def __init__(self, tokenizer, context_length: int):
        self._tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        return self._tokenizer(texts, context_length=self.context_length)


class OpenClipModel(nn.Module):
    def __init__(self, architecture: str, pretrained: str | None = None):
        super().__init__()
        import open_clip

        if architecture not in open_clip.list_models():
            raise DmclipError(f"open_clip has no architecture {architecture!r}", did_you_mean(architecture, open_clip.list_models()))
        self.arch = {"family": "open_clip", "architecture": architecture, "pretrained": None}
        try:
            model = open_clip.create_model(architecture, pretrained=pretrained, load_weights=True)
        except (RuntimeError, OSError, ValueError) as exc:
            where = "local checkpoint" if pretrained and Path(pretrained).exists() else "pretrained tag"
            raise DmclipError(f"open_clip could not load {where} {pretrained!r} for {architecture}: "
                              f"{str(exc).splitlines()[0][:160]}",
                              "pass a local checkpoint path (no hub on this network), e.g. open_clip:ViT-B-32:/path/model.pt") from None
        self.model = model
        visual = model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.context_length = int(getattr(model, "context_length", 77))
        self.tokenizer = _OpenClipTokenizer(open_clip.get_tokenizer(architecture), self.context_length)
        out = model.text_projection
        self.embed_dim = int(out.shape[1] if isinstance(out, torch.Tensor) else out.out_features)
        self.logit_scale = model.logit_scale

    def tokenize(self, texts) -> torch.Tensor:
        return self.tokenizer(texts)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False).clamp(0, 1)
        return self.model.encode_image((images - self.mean) / self.std)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)


@register_family("open_clip")
def _build_open_clip(architecture: str, pretrained: str | None = None) -> OpenClipModel:
    return OpenClipModel(architecture, pretrained)

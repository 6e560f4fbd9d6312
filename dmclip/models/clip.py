"""CLIP: any image tower + any text tower + a learnable temperature (Radford et al., 2021).

The towers are given as ``arch`` dicts, so one class covers the pretrained ViT teacher, a distilled
Vision-Mamba student that keeps the teacher's text tower, and ViT baselines:

    CLIP(visual={"family": "vit", ...}, text={"family": "text", ...})
    CLIP(visual=VisionMamba(...).arch, text=teacher.text.arch)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dmclip.errors import DmclipError
from dmclip.models.base import build_model
from dmclip.registry import families

# open_clip clamps the learned logit scale at 100 (log 100 = 4.6052)
MAX_LOGIT_SCALE = math.log(100.0)


class CLIP(nn.Module):
    def __init__(self, visual: dict, text: dict, init_logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.visual = build_model(visual)
        self.text = build_model(text)
        if self.visual.embed_dim != self.text.embed_dim:
            raise DmclipError(f"image tower embeds to {self.visual.embed_dim} dims but the text tower to "
                              f"{self.text.embed_dim}", "set the student's embed_dim to the teacher's")
        self.arch = {"family": "clip", "visual": self.visual.arch, "text": self.text.arch,
                     "init_logit_scale": init_logit_scale}
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.embed_dim = self.visual.embed_dim
        self.image_size = self.visual.image_size
        self.context_length = self.text.context_length
        self.tokenizer = self.text.tokenizer

    def tokenize(self, texts) -> torch.Tensor:
        return self.text.tokenize(texts)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.encode_text(tokens)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped to 100 as open_clip does."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None) -> dict:
        """Normalised features and the scale: what the contrastive and KD losses take.

        Without ``tokens`` only the image side is computed (a frozen text tower's features can come
        from the teacher, which has the same weights).
        """
        out = {"image_features": nn.functional.normalize(self.encode_image(images), dim=-1),
               "logit_scale": self.scale()}
        if tokens is not None:
            out["text_features"] = nn.functional.normalize(self.encode_text(tokens), dim=-1)
        return out


@families.register("clip", description="CLIP: any image tower + any text tower + a learnable temperature")
def _build_clip(**kw) -> CLIP:
    return CLIP(**kw)


def clip_arch(image_size: int = 32, patch_size: int = 4, vision_width: int = 128, vision_depth: int = 4,
              vision_heads: int = 4, text_width: int = 128, text_depth: int = 4, text_heads: int = 4,
              embed_dim: int = 128, tokenizer: dict | None = None, vision_stem: str = "patch") -> dict:
    """The arch dict of a ViT + text-transformer CLIP."""
    return {
        "family": "clip",
        "visual": {"family": "vit", "image_size": image_size, "patch_size": patch_size, "width": vision_width,
                   "depth": vision_depth, "heads": vision_heads, "embed_dim": embed_dim,
                   **({"stem": vision_stem} if vision_stem != "patch" else {})},
        "text": {"family": "text", "tokenizer": tokenizer or {"context_length": 32, "vocab": None},
                 "width": text_width, "depth": text_depth, "heads": text_heads, "embed_dim": embed_dim},
    }

"""A plain ViT image tower (CLIP-style, pre-norm), from tiny test sizes to base."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.models.base import Normalize
from dmclip.registry import families, students


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (rate ``p``) in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (B, H, L, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, L, Dh)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.ln_1(x), causal=causal))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


def check_stem(stem: str) -> None:
    """An image tower's ``stem`` is ``patch`` (a linear patch embedding) or ``conv`` (``conv_stem``)."""
    from dmclip.errors import DmclipError

    if stem not in ("patch", "conv"):
        raise DmclipError(f"unknown image stem {stem!r}", "use stem: patch or stem: conv")


def conv_stem(patch_size: int, width: int) -> nn.Sequential:
    """Xiao et al. 2021 ("Early convolutions help transformers see better"): log2(patch) stride-2 3x3
    convolutions (BatchNorm, ReLU), channels doubling up to width/2, then a 1x1 convolution to ``width``:
    the same (H/p, W/p) token grid as a patch embedding, with local shape features a linear patch lacks."""
    from dmclip.errors import DmclipError

    stages = patch_size.bit_length() - 1
    if patch_size < 2 or 2 ** stages != patch_size:
        raise DmclipError(f"a conv stem needs a power-of-two patch_size >= 2, got {patch_size}",
                          "use patch_size 2, 4, 8 or 16, or stem: patch")
    layers, channels = [], 3
    for i in range(stages):
        out = max(8, width // 2 ** (stages - i))
        layers += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    layers.append(nn.Conv2d(channels, width, 1))
    return nn.Sequential(*layers)


class VisionTransformer(nn.Module):
    """ViT image encoder: patches -> [cls] + tokens -> blocks -> cls -> projection to ``embed_dim``.

    ``stem``: ``patch`` (a linear patch embedding, as ViT/CLIP) or ``conv`` (``conv_stem``).
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, width: int = 128, depth: int = 4, heads: int = 4,
                 embed_dim: int = 128, mlp_ratio: float = 4.0, drop_path: float = 0.0, stem: str = "patch"):
        super().__init__()
        from dmclip.errors import DmclipError

        if image_size % patch_size:
            raise DmclipError(f"image_size {image_size} is not a multiple of patch_size {patch_size}",
                              "choose sizes such that image_size % patch_size == 0")
        check_stem(stem)
        self.arch = {"family": "vit", "image_size": image_size, "patch_size": patch_size, "width": width,
                     "depth": depth, "heads": heads, "embed_dim": embed_dim, "mlp_ratio": mlp_ratio,
                     "drop_path": drop_path, **({"stem": stem} if stem != "patch" else {})}
        self.image_size, self.width, self.embed_dim = image_size, width, embed_dim
        self.num_patches = (image_size // patch_size) ** 2
        self.normalize = Normalize()
        self.patch_embed = (nn.Conv2d(3, width, patch_size, patch_size, bias=False) if stem == "patch"
                            else conv_stem(patch_size, width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.num_patches, width) * 0.02)
        self.ln_pre = nn.LayerNorm(width)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, r) for r in rates)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1 + N, width): class token first, after the final norm."""
        x = self.patch_embed(self.normalize(images)).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.forward_tokens(images)[:, 0])  # (B, embed_dim)


@families.register("vit", description="ViT image tower (patch or conv stem), pre-norm blocks, class token")
def _build_vit(**kw) -> VisionTransformer:
    return VisionTransformer(**kw)


def _vit_factory(width: int, depth: int, heads: int, patch_size: int = 16, image_size: int = 224):
    def factory(**overrides) -> VisionTransformer:
        kw = {"image_size": image_size, "patch_size": patch_size, "width": width, "depth": depth,
              "heads": heads, "embed_dim": 512}
        kw.update(overrides)
        return VisionTransformer(**kw)

    return factory


_TINY = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2, "embed_dim": 32}
# ViT baselines sized like the Mamba students (DeiT widths; heads of 64 dims).
students.add("vit-ti", _vit_factory(192, 12, 3), description="ViT-Ti/16 baseline (width 192, depth 12)", tiny=_TINY)
students.add("vit-s", _vit_factory(384, 12, 6), description="ViT-S/16 baseline (width 384, depth 12)", tiny=_TINY)
students.add("vit-b", _vit_factory(768, 12, 12), description="ViT-B/16 baseline (width 768, depth 12)", tiny=_TINY)
students.add("vit-nano", _vit_factory(64, 4, 2, patch_size=4, image_size=32),
             description="ViT baseline for CPU runs (width 64, depth 4, 32 px)", tiny=_TINY)

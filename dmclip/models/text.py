"""CLIP's text tower: causal transformer, feature read at the end-of-text token, projected."""

from __future__ import annotations

import torch
from torch import nn

from dmclip.data.tokenizer import Tokenizer
from dmclip.models.vit import Block
from dmclip.registry import families


class TextTransformer(nn.Module):
    def __init__(self, tokenizer: dict | None = None, width: int = 128, depth: int = 4, heads: int = 4,
                 embed_dim: int = 128, mlp_ratio: float = 4.0):
        super().__init__()
        tokenizer = tokenizer or {"context_length": 32, "vocab": None}
        self.arch = {"family": "text", "tokenizer": tokenizer, "width": width, "depth": depth, "heads": heads,
                     "embed_dim": embed_dim, "mlp_ratio": mlp_ratio}
        self.tokenizer = Tokenizer.from_dict(tokenizer)
        self.context_length, self.embed_dim, self.width = self.tokenizer.context_length, embed_dim, width
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, self.context_length, width) * 0.01)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def tokenize(self, texts) -> torch.Tensor:
        return self.tokenizer(texts)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, embed_dim), read at each row's end-of-text token (CLIP)."""
        x = self.token_embedding(tokens) + self.pos_embed[:, : tokens.shape[1]]  # (B, T, D)
        for block in self.blocks:
            x = block(x, causal=True)
        x = self.ln_final(x)
        eot = self.tokenizer.eot_positions(tokens)  # (B,)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot])


@families.register("text",
                   description="CLIP text transformer (causal mask, end-of-text pooling), BPE or a compact vocabulary")
def _build_text(**kw) -> TextTransformer:
    return TextTransformer(**kw)

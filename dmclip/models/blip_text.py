"""BLIP's text transformer (Li et al., 2022): BERT-style, post-norm, with optional cross-attention to image
tokens. :class:`dmclip.models.blip.BlipModel` uses it as the text encoder and, sharing all but the
self-attention, as the text decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.errors import DmclipError


def init_bert(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class AttentionBlock(nn.Module):
    """BERT attention sub-layer, post-norm: ``LN(x + W_o attn(W_q x, W_k c, W_v c))`` with c = x or the image."""

    def __init__(self, width: int, heads: int, context_width: int | None = None):
        super().__init__()
        if width % heads:
            raise DmclipError(f"text width {width} is not a multiple of its {heads} heads",
                              "choose text_width divisible by text_heads")
        self.heads = heads
        context_width = context_width or width
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(context_width, width)
        self.value = nn.Linear(context_width, width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, M, Dc) -> keys, values (B, H, M, Dh): cacheable across decoding steps."""
        B, M, H = context.shape[0], context.shape[1], self.heads
        k = self.key(context).view(B, M, H, -1).transpose(1, 2)
        v = self.value(context).view(B, M, H, -1).transpose(1, 2)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q = self.query(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, H, L, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, Dh)
        return self.norm(x + self.out(y.transpose(1, 2).reshape(B, L, D)))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D); context (B, M, Dc) or None for self-attention; mask bool, True = may attend."""
        return self.attend(x, *self.project_kv(x if context is None else context), mask)


class FeedForward(nn.Module):
    """BERT feed-forward sub-layer, post-norm: ``LN(x + W_2 gelu(W_1 x))``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class TextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, positions: int, width: int):
        super().__init__()
        self.word = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(positions, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        positions = torch.arange(offset, offset + ids.shape[1], device=ids.device)
        return self.norm(self.word(ids) + self.position(positions))  # (B, L, D)


class TextLayer(nn.Module):
    def __init__(self, width: int, heads: int, vision_width: int | None, shared: TextLayer | None = None):
        super().__init__()
        self.self_attention = AttentionBlock(width, heads)  # never shared: the encoder/decoder difference
        if shared is not None:
            self.cross_attention, self.feed_forward = shared.cross_attention, shared.feed_forward
        else:
            self.cross_attention = AttentionBlock(width, heads, vision_width) if vision_width else None
            self.feed_forward = FeedForward(width, 4 * width)

    def forward(self, x, self_mask, image_tokens=None, image_mask=None):
        x = self.self_attention(x, mask=self_mask)
        if image_tokens is not None:
            x = self.cross_attention(x, image_tokens, mask=image_mask)
        return self.feed_forward(x)


class BlipTextTransformer(nn.Module):
    """BERT-style text transformer; with ``shared`` it reuses that one's embeddings, cross-attention and FFN."""

    def __init__(self, vocab_size: int, positions: int, width: int, depth: int, heads: int,
                 vision_width: int | None, shared: BlipTextTransformer | None = None):
        super().__init__()
        self.embeddings = shared.embeddings if shared is not None else TextEmbeddings(vocab_size, positions, width)
        self.layers = nn.ModuleList(
            TextLayer(width, heads, vision_width, shared.layers[i] if shared is not None else None)
            for i in range(depth))

    def forward(self, ids: torch.Tensor, valid: torch.Tensor, image_tokens: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        """ids (B, L); valid (B, L) bool (not padding); image_tokens (B, M, Dv) -> (B, L, D)."""
        L = ids.shape[1]
        mask = valid[:, None, None, :]  # (B, 1, 1, L): keys that are text
        if causal:
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        if image_tokens is not None and image_tokens.dtype != self.embeddings.word.weight.dtype:
            image_tokens = image_tokens.to(self.embeddings.word.weight.dtype)
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x, mask, image_tokens)
        return x


class LMHead(nn.Module):
    """BERT's prediction head: dense + gelu + LN, then the (tied) word-embedding matrix and a bias."""

    def __init__(self, width: int, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.decoder = nn.Linear(width, word_embeddings.num_embeddings)
        self.decoder.weight = word_embeddings.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))  # (B, L, V)

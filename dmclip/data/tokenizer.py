"""Text tokenisation: open_clip's bundled BPE (offline), optionally over a compact vocabulary.

open_clip's vocabulary has 49,408 tokens; captions of the embedded world use a few hundred. A text
tower over the full table spends most of its parameters (and a captioner most of its softmax) on
tokens that never occur, so models may carry a *compact* vocabulary: the BPE ids seen in the
training captions, remapped to 0..V-1 (0 = padding, then sot, eot, unk). The mapping is part of the
model's ``arch`` so a saved model tokenises exactly as it was trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

PAD, SOT, EOT, UNK = 0, 1, 2, 3
_bpe = None


def bpe():
    """open_clip's SimpleTokenizer (bundled vocabulary, no download), loaded once."""
    global _bpe
    if _bpe is None:
        from open_clip.tokenizer import SimpleTokenizer

        _bpe = SimpleTokenizer()
    return _bpe


class Tokenizer:
    """``tokenizer(["a red circle"]) -> LongTensor (B, context_length)``; ``decode(ids) -> str``.

    With ``vocab=None`` it is open_clip's tokenizer unchanged (ids as open_clip gives them). With a
    ``vocab`` (a list of BPE ids) ids are compact: PAD=0, SOT=1, EOT=2, UNK=3, then the vocab in order.
    """

    def __init__(self, context_length: int = 32, vocab: Sequence[int] | None = None):
        self.context_length = int(context_length)
        self.vocab = list(vocab) if vocab is not None else None
        tok = bpe()
        self._bpe_sot = tok.encoder["<start_of_text>"]
        self._bpe_eot = tok.encoder["<end_of_text>"]
        if self.vocab is not None:
            self._to_compact = {b: i + 4 for i, b in enumerate(self.vocab)}
            self.vocab_size = len(self.vocab) + 4
            self.pad_id, self.sot_id, self.eot_id, self.unk_id = PAD, SOT, EOT, UNK
        else:
            self._to_compact = None
            self.vocab_size = len(tok.encoder)
            self.pad_id, self.sot_id, self.eot_id, self.unk_id = 0, self._bpe_sot, self._bpe_eot, None

    # ---- construction
    @classmethod
    def fit(cls, texts: Iterable[str], context_length: int = 32) -> Tokenizer:
        """A compact tokenizer over the BPE ids that occur in ``texts`` (sorted, deterministic)."""
        tok = bpe()
        seen: set[int] = set()
        for text in texts:
            seen.update(tok.encode(text))
        return cls(context_length, sorted(seen))

    def to_dict(self) -> dict:
        return {"context_length": self.context_length, "vocab": self.vocab}

    @classmethod
    def from_dict(cls, data: dict) -> Tokenizer:
        return cls(data.get("context_length", 32), data.get("vocab"))

    # ---- use
    def encode(self, text: str) -> list[int]:
        """Ids of one text with sot/eot, truncated to context_length (eot kept, as open_clip does)."""
        ids = bpe().encode(text)
        if self._to_compact is not None:
            ids = [self._to_compact.get(i, UNK) for i in ids]
        ids = [self.sot_id, *ids[: self.context_length - 2], self.eot_id]
        return ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def unknown_words(self, texts: Iterable[str]) -> list[str]:
        """The words of ``texts`` (lower case, as the BPE splits them) that this compact vocabulary lacks a piece
        of: each is read as the unknown token. In first-seen order; none for open_clip's full vocabulary."""
        if self._to_compact is None:
            return []
        tok = bpe()
        unknown: dict[str, None] = {}
        for text in texts:
            for word in tok.pat.findall(tok.clean_fn(text)):
                if any(c.isalnum() for c in word) and any(i not in self._to_compact for i in tok.encode(word)):
                    unknown[word] = None
        return list(unknown)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence; stops at eot, skips sot/pad/unk."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        bpe_ids = []
        for i in ids:
            if i == self.eot_id:
                break
            if i in (self.pad_id, self.sot_id) or (self.unk_id is not None and i == self.unk_id):
                continue
            if self.vocab is not None:
                if 4 <= i < self.vocab_size:
                    bpe_ids.append(self.vocab[i - 4])
            else:
                bpe_ids.append(i)
        return bpe().decode(bpe_ids).strip()

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the eot token in each row (B,) — where a CLIP text tower reads its feature."""
        return (tokens == self.eot_id).int().argmax(dim=-1)

"""A tiny CLIP teacher saved as a run's model (width 32, one block per tower), for tests that distil from one."""

from __future__ import annotations

from pathlib import Path

import torch

from dmclip.data import build_dataset
from dmclip.data.tokenizer import Tokenizer
from dmclip.models.base import build_model, save_model
from dmclip.models.clip import clip_arch


def save_tiny_teacher(data_spec: str, directory: Path) -> Path:
    """A randomly initialised (seed 0) 32 px CLIP whose tokenizer knows ``data_spec``'s captions, saved in
    ``directory``; the saved model's directory."""
    torch.manual_seed(0)
    ds = build_dataset(data_spec)
    tok = Tokenizer.fit([c for i in range(len(ds)) for c in ds.captions(i)], 16).to_dict()
    return save_model(build_model(clip_arch(32, 8, 32, 1, 2, 32, 1, 2, 32, tok)), directory)

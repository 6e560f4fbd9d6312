"""The contract every dmclip image-text model keeps, and how models are saved and rebuilt.

An image-text model (CLIP, BLIP, a distilled student + text tower, an open_clip wrapper) is an
``nn.Module`` with:

    image_size: int                  input side in pixels
    context_length: int              text tokens per caption
    embed_dim: int                   joint embedding size
    logit_scale: nn.Parameter        log of the contrastive temperature's inverse (CLIP's)
    arch: dict                       JSON-able; ``build_model(arch)`` rebuilds the same module
    encode_image(images) -> (B, D)   images: float (B, 3, H, W) in [0, 1]; normalisation is inside
    encode_text(tokens)  -> (B, D)   tokens: long (B, context_length) from ``model.tokenize``
    tokenize(texts: list[str]) -> LongTensor (B, context_length)

Both encoders return *unnormalised* features; callers normalise. A model that can only encode
images (a bare student) has ``encode_text = None``.

Saved form (``save_model``): ``<dir>/model.json`` {"format": "dmclip-model", "version": 1, "arch": ...}
and ``<dir>/model.safetensors``. Loading needs no training code and no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dmclip.errors import DmclipError
from dmclip.registry import families

MODEL_FORMAT = "dmclip-model"

# CLIP's image normalisation (OpenAI mean/std), used by every dmclip image tower.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def build_model(arch: dict) -> nn.Module:
    """The module ``arch`` describes, with fresh weights: ``families[arch["family"]](**rest of arch)``."""
    arch = dict(arch)
    family = arch.pop("family", None)
    if not isinstance(family, str) or family not in families:  # `in` imports the built-in families first
        raise DmclipError(f"unknown model family {family!r} in model.json",
                          f"known families: {', '.join(families.names())}; was it saved by a newer dmclip?")
    return families.get(family, **arch)


class Normalize(nn.Module):
    """[0, 1] images -> CLIP-normalised images, as a module so it moves with .to(device)."""

    def __init__(self, mean=IMAGE_MEAN, std=IMAGE_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return (images - self.mean) / self.std


def save_model(model: nn.Module, directory: Path, extra: dict | None = None) -> Path:
    """Write ``model.json`` + ``model.safetensors`` atomically into ``directory``."""
    from safetensors.torch import save as st_save

    from dmclip.io import atomic_write_bytes, atomic_write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # safetensors refuses shared storage: clone tensors that alias each other (tied weights)
    seen: dict[int, str] = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if ptr in seen:
            state[key] = tensor.clone()
        seen[ptr] = key
    atomic_write_bytes(directory / "model.safetensors", st_save(state))
    atomic_write_json(directory / "model.json", {"format": MODEL_FORMAT, "version": 1, "arch": model.arch, **(extra or {})})
    return directory


def load_saved_model(directory: Path) -> nn.Module:
    """Rebuild a model saved by ``save_model`` (no pickle, no training code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise DmclipError(f"{directory} holds no saved model (no model.json)",
                          "point at a completed pretrain/distill run, e.g. run:runs/pretrain/<run>")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DmclipError(f"{meta_path} is not valid JSON ({exc})", "the run is damaged; use another run") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT or not isinstance(meta.get("arch"), dict):
        raise DmclipError(f"{meta_path} is not a dmclip model file", "use a directory written by dmclip")
    try:
        model = build_model(meta["arch"])
    except (TypeError, ValueError, KeyError) as exc:  # arguments the family does not take / cannot build
        raise DmclipError(f"{meta_path} describes a model this dmclip cannot build ({str(exc)[:160]})",
                          "it was edited or saved by another dmclip version; use a run saved by this one") from None
    try:
        state = load_file(str(directory / "model.safetensors"))
    except (SafetensorError, OSError, FileNotFoundError) as exc:
        raise DmclipError(f"weights in {directory} cannot be read ({str(exc)[:120]})",
                          "the file is truncated or missing; use another run") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    # load_state_dict raises a multi-line RuntimeError on a shape mismatch: name the first one instead
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        example = (missing or unexpected or wrong_shape)[0]
        raise DmclipError(f"weights in {directory} do not fit the architecture in model.json "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} of another "
                          f"shape, e.g. {example})",
                          "the weights come from another architecture; use the matching run")
    model.load_state_dict(state)
    model.eval()
    return model


def count_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())

"""The model that plays both ends of the link: loaded from a reference, checked, and captioning restored tokens.

The edge runs the image tower (``model.encode_image_tokens``); the server captions the restored token sequence
(``model.generate(image_tokens=...)``). Any object with those two methods (and ``image_size``) can play the
model, which is how the tests run without a trained BLIP.
"""

from __future__ import annotations

import torch

from dmclip.compress.config import DecodeConfig
from dmclip.errors import DmclipError


def load_compress_model(ref: str):
    """A model that can play edge and server: ``encode_image_tokens`` and ``generate(image_tokens=...)``."""
    from dmclip.models.refs import load_model_ref

    if not ref:
        raise DmclipError("no model given", "pass --model run:<pretrain run dir> (a BLIP model)")
    model = load_model_ref(ref)
    check_compress_model(model, ref)
    return model


def check_compress_model(model, ref: str = "the model") -> None:
    missing = [m for m in ("encode_image_tokens", "generate") if not callable(getattr(model, m, None))]
    if missing:
        raise DmclipError(f"{ref} cannot caption from image tokens (no {', '.join(missing)})",
                          "use a BLIP model: train one with `dmclip pretrain recipes/pretrain-blip.yaml` "
                          "(or --objective blip), then pass --model run:<its run dir>")



def caption_tokens(model, tokens: torch.Tensor, decode_cfg: DecodeConfig) -> list[str]:
    """The server's half: restored tokens (B, M, W) -> one caption per image, decoded as ``decode_cfg`` says."""
    return list(model.generate(image_tokens=tokens, method=decode_cfg.method, num_beams=decode_cfg.num_beams,
                               top_p=decode_cfg.top_p, max_length=decode_cfg.max_length,
                               min_length=decode_cfg.min_length))

"""The model at each end of the link: the server's ``CaptionHandler`` (payload -> captions, with what the model
reads) and the edge's ``send_images`` (encode, compress, send, collect captions and costs)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dmclip.compress.client import LinkClient
from dmclip.compress.codec import DTYPES, Accepts, encode
from dmclip.compress.config import DecodeConfig
from dmclip.compress.model import caption_tokens, check_compress_model
from dmclip.compress.selectors import Selector, restore_payload
from dmclip.data.base import float_images
from dmclip.errors import DmclipError


class CaptionHandler:
    """Server side: what the model reads (``accepts``), payload -> tokens (``restore``), tokens -> captions.

    ``accepts.tokens`` and ``accepts.width`` come from one forward pass of the model's image tower on a
    blank image, so they hold for any model that can play the edge. ``CaptionServer`` checks ``accepts``
    against each payload's header before decoding it and captions concurrent requests in one ``caption`` call.
    """

    def __init__(self, model, decode_cfg: DecodeConfig, *, max_batch: int = 16, dtypes: tuple[str, ...] | None = None,
                 selector_names: tuple[str, ...] | None = None):
        from dmclip.registry import selectors

        check_compress_model(model)
        self.model, self.decode_cfg = model, decode_cfg
        size = int(model.image_size)
        with torch.no_grad():
            probe = model.encode_image_tokens(torch.zeros(1, 3, size, size))
        tokens, width = int(probe.shape[1]), int(probe.shape[2])
        self.accepts = Accepts(tokens, width, max_batch, tuple(dtypes or DTYPES),
                               tuple(selector_names or selectors.names()))

    def restore(self, payload) -> torch.Tensor:
        self.accepts.check(payload.header)
        return restore_payload(payload)

    @torch.no_grad()
    def caption(self, tokens: torch.Tensor) -> list[str]:
        return caption_tokens(self.model, tokens, self.decode_cfg)

    def __call__(self, payload) -> dict:
        tokens = self.restore(payload)
        return {"captions": self.caption(tokens), "restored_tokens": tokens.shape[1]}


def caption_handler(model, decode_cfg: DecodeConfig, **limits) -> CaptionHandler:
    """Server side: payload -> {"captions": [...], "restored_tokens": M}, with what the model reads."""
    return CaptionHandler(model, decode_cfg, **limits)


def load_images(paths: list[Path], image_size: int) -> list[torch.Tensor]:
    """Image files -> uint8 (3, S, S) tensors (RGB, resized)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
        except (OSError, UnidentifiedImageError) as exc:
            raise DmclipError(f"cannot read image {path} ({exc})", "pass PNG or JPEG files") from None
        out.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous())
    return out


@torch.no_grad()
def send_images(model, selector: Selector, images: list[torch.Tensor], address, names: list[str] | None = None,
                timeout: float = 60.0) -> list[dict]:
    """Edge side of the link: encode, compress, send one frame per image, collect captions and costs."""
    check_compress_model(model)
    rows = []
    with LinkClient(address, timeout=timeout) as client:
        info = client.info()
        accepts = Accepts.from_dict(info.get("accepts") or {})
        for i, image in enumerate(images):
            t0 = time.perf_counter()
            tokens = model.encode_image_tokens(float_images(image.unsqueeze(0))).float()
            payload = selector.compress(tokens)
            try:  # the server would refuse it: say so before sending, in the server's own words
                accepts.check(payload.header)
            except DmclipError as exc:
                raise DmclipError(f"{exc.message} (server {client.host}:{client.port})",
                                  "use the server's model on the edge too (--model), with a selector and "
                                  f"--dtype it accepts ({', '.join(accepts.dtypes)})") from None
            body = encode(payload)
            edge = time.perf_counter() - t0
            answer = client.request(body)
            reply = answer["reply"]
            if not reply.get("ok"):
                raise DmclipError(f"the server refused image {i}: {reply.get('error')}",
                                  reply.get("hint") or "check the server's log")
            rows.append({"image": names[i] if names else str(i), "caption": reply["captions"][0],
                         "payload_bytes": len(body), "wire_bytes_sent": answer["bytes_sent"],
                         "wire_bytes_received": answer["bytes_received"], "rtt_ms": 1000 * answer["rtt_seconds"],
                         "edge_ms": 1000 * edge, "server_ms": 1000 * reply.get("server_seconds", 0.0)})
    return rows

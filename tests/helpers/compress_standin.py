"""A tiny stand-in for the BLIP model (edge encoder + captioning decoder) used by the compress tests."""

from __future__ import annotations

import torch

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class StandInCaptioner:
    """Tokens are per-patch mean colours; the caption names the colour closest to the mean restored token."""

    image_size = 16
    vision_width = 6

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images
        patches = images.unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2))  # (B, 3, 4, 4)
        patches = patches.flatten(2).transpose(1, 2)  # (B, 16, 3)
        tokens = torch.cat([patches, 1 - patches], -1)  # (B, 16, 6)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], 1)  # class token first: (B, 17, 6)

    def generate(self, images=None, image_tokens=None, method="beam", num_beams=3, top_p=0.9, max_length=30,
                 min_length=5, **kw) -> list[str]:
        assert images is None and image_tokens is not None
        mean = image_tokens[:, 1:, :3].mean(1)  # (B, 3) mean colour of the restored patch tokens
        names = list(COLOURS)
        palette = torch.tensor([COLOURS[n] for n in names])
        best = torch.cdist(mean, palette).argmin(-1)
        return [f"a {names[i]} square" for i in best.tolist()]


def colour_dataset(n: int = 6) -> list[dict]:
    """Images half one colour and half another; the reference names the majority colour."""
    names = list(COLOURS)
    out = []
    for i in range(n):
        main, other = names[i % 3], names[(i + 1) % 3]
        image = torch.zeros(3, 16, 16)
        image[:, :, :] = torch.tensor(COLOURS[main]).view(3, 1, 1)
        image[:, :5, :] = torch.tensor(COLOURS[other]).view(3, 1, 1)  # a minority stripe
        out.append({"image": (image * 255).to(torch.uint8), "captions": [f"a {main} square", f"a {main} image"],
                    "index": i})
    return out

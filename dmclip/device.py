"""Which device a command runs on: one resolver for every ``device`` option, and where a model's weights are."""

from __future__ import annotations

import torch

from dmclip.errors import DmclipError


def resolve_device(device: str | torch.device | None = "auto", *,
                   hint: str = "use --device cpu (or auto)") -> torch.device:
    """``auto`` (or None) -> this process's GPU when one is visible, else the CPU; a named device as given.

    ``cuda`` without a number is the current GPU, which under torchrun is the rank's own
    (``dmclip.train.distributed.setup`` makes GPU ``LOCAL_RANK`` current). Asking for CUDA without a GPU is a
    one-line error; ``hint`` names the option that fixes it.
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DmclipError("device 'cuda' was asked for but no GPU is visible", hint)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")

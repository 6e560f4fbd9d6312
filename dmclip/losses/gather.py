"""Feature gathering across ranks for contrastive losses (open_clip's ``gather_features``).

It lives with the losses, the lowest layer that needs it; ``dmclip.train.distributed`` re-exports it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, local_loss: bool = False,
                    gather_with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every rank concatenated in rank order: ``(all_image (W*b, D), all_text (W*b, D))``.

    open_clip's ``gather_features`` (torch.distributed branch): with ``gather_with_grad`` the gradient flows
    back to every rank's features through ``torch.distributed.nn.all_gather``; without it the gathered
    copies are constants, and unless ``local_loss`` this rank's own slice is put back with its graph. On
    one process the inputs come back unchanged.
    """
    if not _distributed():
        return image_features, text_features
    if gather_with_grad:
        return _AllGatherWithGrad.apply(image_features), _AllGatherWithGrad.apply(text_features)
    gathered_image = [torch.zeros_like(image_features) for _ in range(dist.get_world_size())]
    gathered_text = [torch.zeros_like(text_features) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered_image, image_features)
    dist.all_gather(gathered_text, text_features)
    if not local_loss:
        gathered_image[dist.get_rank()] = image_features
        gathered_text[dist.get_rank()] = text_features
    return torch.cat(gathered_image, dim=0), torch.cat(gathered_text, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's (b, ...) tensor; the backward sums each rank's gradient of its own slice over
    all ranks (as ``torch.distributed.nn.all_gather``, whose functional form is deprecated)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        ctx.rows = tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor)
        return torch.cat(gathered, dim=0)  # (W*b, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.new_empty((ctx.rows, *grad.shape[1:]))  # the gradient's dtype and device
        dist.reduce_scatter_single(out, grad.contiguous())  # sums; gloo implements it as nccl does
        return out

"""Vision-Mamba (Vim) image encoder: the default distillation student.

Zhu et al. 2024, "Vision Mamba" (Vim): patches -> tokens with a class token in the MIDDLE of the sequence
and a learned position embedding, then bidirectional Mamba blocks (pre-RMSNorm, residual, drop-path): each
block runs a forward and a backward selective scan, each with its own depthwise causal conv1d, x_proj,
dt_proj, A and D, both gated by silu(z), averaged before the shared out_proj. The final-normed class token
goes through a projection head to ``embed_dim``. Mamba's initialisation (Gu & Dao 2023, §3.6, code of
mamba-ssm): dt log-uniform in [dt_min, dt_max] stored as an inverse-softplus bias, A = 1..N, A_log = log A.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.models.base import Normalize
from dmclip.models.mixer import (
    bidirectional_block_inference,
    bidirectional_mixer,
    bidirectional_mixer_reference,
    bidirectional_stack_inference,
    rms_norm,
)
from dmclip.models.scan import resolve_backend
from dmclip.models.vit import DropPath
from dmclip.registry import families, students


class BiMamba(nn.Module):
    """Vim's bidirectional mixer: shared in_proj/out_proj; a forward and a backward direction, each with its
    own depthwise causal conv1d, x_proj, dt_proj, A and D.

    The per-direction parameters are stacked along a leading 2 (index 0: the forward scan, 1: the backward
    scan), so the fused ``cpu`` backend runs conv, x_proj, dt_proj and both scans of a block in one kernel
    call on the (batch, L, channels) layout (no flips, transposes or copies); the other backends run the
    same maths op by op (:func:`dmclip.models.mixer.bidirectional_mixer_reference`).
    """

    def __init__(self, width: int, d_state: int, expand: int, d_conv: int, backend: str, dt_min=0.001,
                 dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        d_inner = expand * width
        dt_rank = math.ceil(width / 16)
        self.backend = backend
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.in_proj = nn.Linear(width, 2 * d_inner, bias=False)
        # depthwise conv1d weights as nn.Conv1d initialises them (fan_in = d_conv)
        bound = 1 / math.sqrt(d_conv)
        self.conv_weight = nn.Parameter(torch.empty(2, d_inner, d_conv).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.empty(2, d_inner).uniform_(-bound, bound))
        bound = 1 / math.sqrt(d_inner)  # as nn.Linear; VisionMamba._init_weights re-draws it
        self.x_proj_weight = nn.Parameter(torch.empty(2, dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        self.dt_proj_weight = nn.Parameter(torch.empty(2, d_inner, dt_rank).uniform_(-dt_rank**-0.5, dt_rank**-0.5))
        dt = torch.exp(torch.rand(2, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus: softplus(b) = dt
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(2, d_inner, 1)  # (2, d_inner, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(2, d_inner))
        self.out_proj = nn.Linear(d_inner, width, bias=False)

    def mixer_params(self) -> tuple[torch.Tensor, ...]:
        return (self.conv_weight, self.conv_bias, self.x_proj_weight, self.dt_proj_weight, self.dt_proj_bias,
                self.A_log, self.D)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: (B, L, width) -> (B, L, width)
        xz = F.linear(hidden, self.in_proj.weight)  # (B, L, 2 * d_inner): x, then the gate z
        if resolve_backend(self.backend, xz) == "cpu":
            y = bidirectional_mixer(xz, *self.mixer_params())
        else:
            y = bidirectional_mixer_reference(xz, *self.mixer_params(), backend=self.backend)
        return F.linear(y, self.out_proj.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _upgrade_branch_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# weights saved before the directions were stacked: {forward,backward}_branch.{conv1d,x_proj,dt_proj,A_log,D}
_OLD_KEYS = {"conv_weight": "conv1d.weight", "conv_bias": "conv1d.bias", "x_proj_weight": "x_proj.weight",
             "dt_proj_weight": "dt_proj.weight", "dt_proj_bias": "dt_proj.bias", "A_log": "A_log", "D": "D"}


def _upgrade_branch_keys(state_dict, prefix: str) -> None:
    for new, old in _OLD_KEYS.items():
        keys = [f"{prefix}{branch}_branch.{old}" for branch in ("forward", "backward")]
        if prefix + new not in state_dict and all(k in state_dict for k in keys):
            parts = [state_dict.pop(k) for k in keys]
            if new == "conv_weight":  # nn.Conv1d's (d_inner, 1, d_conv)
                parts = [p.squeeze(1) for p in parts]
            state_dict[prefix + new] = torch.stack(parts)


class MambaBlock(nn.Module):
    def __init__(self, width, d_state, expand, d_conv, drop_path, backend):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.mixer = BiMamba(width, d_state, expand, d_conv, backend)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_inference(x):  # the whole block in one kernel call: no autograd, nothing saved
            mixer = self.mixer
            return bidirectional_block_inference(x, self.norm.weight, self.norm.eps, mixer.in_proj.weight,
                                                 mixer.mixer_params(), mixer.out_proj.weight)
        return x + self.drop_path(self.mixer(fused_norm(self.norm, x, self.mixer.backend)))

    def fused_params(self) -> tuple:
        """What :func:`bidirectional_stack_inference` takes for this block."""
        mixer = self.mixer
        return self.norm.weight, mixer.in_proj.weight, mixer.mixer_params(), mixer.out_proj.weight

    def _fused_inference(self, x: torch.Tensor) -> bool:
        if torch.is_grad_enabled() and (x.requires_grad or self.norm.weight.requires_grad):
            return False
        if x.dtype not in (torch.float32, torch.float64) or (self.training and self.drop_path.p > 0):
            return False
        params = (self.norm.weight, self.mixer.in_proj.weight, self.mixer.out_proj.weight, *self.mixer.mixer_params())
        if any(p.dtype != x.dtype or not p.is_contiguous() for p in params) or self.norm.eps is None:
            return False
        return resolve_backend(self.mixer.backend, x) == "cpu"


def fused_norm(norm: nn.RMSNorm, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``norm(x)``, on the fused kernel where ``backend`` resolves to ``cpu`` (its backward is two passes per row
    instead of autograd's elementwise ops); the module's own call where a hook watches it or the kernel does
    not apply (other dtypes, a weight of another dtype)."""
    weight = norm.weight
    if (norm._forward_hooks or norm._forward_pre_hooks or weight is None or norm.eps is None
            or x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype
            or resolve_backend(backend, x) != "cpu"):
        return norm(x)
    return rms_norm(x, weight, norm.eps)


class VisionMamba(nn.Module):
    """Vim image encoder: images (B, 3, H, W) in [0, 1] (or uint8) -> features (B, embed_dim)."""

    def __init__(self, image_size=224, patch_size=16, width=192, depth=24, d_state=16, expand=2, d_conv=4,
                 embed_dim=512, drop_path=0.0, scan_backend="auto", stem="patch"):
        super().__init__()
        from dmclip.models.vit import check_stem, conv_stem

        check_stem(stem)
        self.arch = {"family": "vision-mamba", "image_size": image_size, "patch_size": patch_size, "width": width,
                     "depth": depth, "d_state": d_state, "expand": expand, "d_conv": d_conv,
                     "embed_dim": embed_dim, "drop_path": drop_path, "scan_backend": scan_backend,
                     **({"stem": stem} if stem != "patch" else {})}
        self.image_size, self.patch_size, self.width, self.embed_dim = image_size, patch_size, width, embed_dim
        grid = image_size // patch_size
        self.num_patches = grid * grid
        self.cls_position = self.num_patches // 2  # the class token sits in the middle of the sequence
        self.normalize = Normalize()
        # stem "conv": stride-2 convolutions to the same token grid (as the ViT's `stem: conv`)
        self.patch_embed = (conv_stem(patch_size, width) if stem == "conv"
                            else nn.Conv2d(3, width, patch_size, stride=patch_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, width))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(MambaBlock(width, d_state, expand, d_conv, rate, scan_backend) for rate in rates)
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.head = nn.Linear(width, embed_dim)
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, BiMamba):  # x_proj is a Linear per direction; dt_proj keeps Mamba's init
                nn.init.trunc_normal_(module.x_proj_weight, std=0.02)

    def set_scan_backend(self, backend: str) -> None:
        """Switch every block's selective-scan backend (``auto``, ``cpu``, ``chunked``, ``reference``)."""
        self.arch["scan_backend"] = backend
        for block in self.blocks:
            block.mixer.backend = backend

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.normalize(images))  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, num_patches, width)
        if x.shape[1] != self.num_patches:
            from dmclip.errors import DmclipError

            raise DmclipError(f"images of {tuple(images.shape[-2:])} px do not fit this model "
                              f"({self.image_size} px, patch {self.patch_size})",
                              f"resize images to {self.image_size} x {self.image_size}")
        p = self.cls_position
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :p], cls, x[:, p:]], dim=1) + self.pos_embed  # (B, num_patches + 1, width)
        if self._fused_stack(x):  # inference on the cpu backend: every block in one kernel call
            x = bidirectional_stack_inference(x, [block.fused_params() for block in self.blocks], self.blocks[0].norm.eps)
        else:
            for block in self.blocks:
                x = block(x)
        return fused_norm(self.norm, x, self.arch["scan_backend"])

    def _fused_stack(self, x: torch.Tensor) -> bool:
        blocks = self.blocks
        if any(b._forward_hooks or b._forward_pre_hooks for b in blocks):  # hooks see every block's call
            return False
        return len({b.norm.eps for b in blocks}) == 1 and all(b._fused_inference(x) for b in blocks)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Final-normed patch tokens (B, num_patches, width), the class token left out."""
        x = self._encode(images)
        p = self.cls_position
        return torch.cat([x[:, :p], x[:, p + 1:]], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self._encode(images)[:, self.cls_position])  # (B, embed_dim)


@contextlib.contextmanager
def scan_backend(model: nn.Module, backend: str):
    """Run every Vision-Mamba inside ``model`` on ``backend`` for the block, then put each one's own back.

    ONNX export needs this: the fused ``cpu`` kernel is opaque to the exporter, the ``reference`` scan is plain
    PyTorch ops. Only the blocks' backend attribute changes, so the normal path pays nothing.
    """
    resolve_backend(backend)  # an unknown name fails here, before anything is switched
    towers = [module for module in model.modules() if isinstance(module, VisionMamba)]
    saved = [tower.arch["scan_backend"] for tower in towers]
    for tower in towers:
        tower.set_scan_backend(backend)
    try:
        yield towers
    finally:
        for tower, name in zip(towers, saved):
            tower.set_scan_backend(name)


@families.register("vision-mamba",
                   description="Vision-Mamba image tower: bidirectional selective-scan blocks, middle class token")
def _build_vision_mamba(**kwargs) -> VisionMamba:
    return VisionMamba(**kwargs)


_TINY = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "d_state": 8, "embed_dim": 32}


def _factory(name: str, width: int, depth: int, description: str, tiny: dict):
    def build(**overrides) -> VisionMamba:
        return VisionMamba(**{"width": width, "depth": depth, **overrides})

    build.__name__ = name.replace("-", "_")
    students.register(name, description=description, tiny=tiny)(build)
    return build


mamba_ti = _factory("mamba-ti", 192, 24, "Vision-Mamba tiny (Vim-Ti): width 192, depth 24, bidirectional", _TINY)
mamba_s = _factory("mamba-s", 384, 24, "Vision-Mamba small (Vim-S): width 384, depth 24, bidirectional", _TINY)
mamba_b = _factory("mamba-b", 768, 24, "Vision-Mamba base: width 768, depth 24, bidirectional", _TINY)
mamba_nano = _factory("mamba-nano", 64, 4, "Vision-Mamba for CPU demos: width 64, depth 4",
                      {**_TINY, "width": 64, "depth": 4})
mamba_tiny_test = _factory("mamba-tiny-test", 32, 2, "Vision-Mamba for tests: width 32, depth 2", _TINY)

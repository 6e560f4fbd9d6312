"""Vision-Mamba (Vim) image encoder: the default distillation student.

Zhu et al. 2024, "Vision Mamba" (Vim): patches -> tokens with a class token in the MIDDLE of the sequence
and a learned position embedding, then bidirectional Mamba blocks (pre-RMSNorm, residual, drop-path): each
block runs a forward and a backward selective scan, each with its own depthwise causal conv1d, x_proj,
dt_proj, A and D, both gated by silu(z), averaged before the shared out_proj. The final-normed class token
goes through a projection head to ``embed_dim``. Mamba's initialisation (Gu & Dao 2023, §3.6, code of
mamba-ssm): dt log-uniform in [dt_min, dt_max] stored as an inverse-softplus bias, A = 1..N, A_log = log A.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.models.base import Normalize, register_family
from dmclip.models.scan import selective_scan
from dmclip.registry import students


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class ScanBranch(nn.Module):
    """One direction of a bidirectional Mamba mixer: conv1d -> silu -> selective scan (gated by z)."""

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int, dt_min=0.001, dt_max=0.1,
                 dt_init_floor=1e-4):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -dt_rank**-0.5, dt_rank**-0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():  # inverse softplus, so that softplus(bias) == dt at init
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (d_inner, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, x: torch.Tensor, z: torch.Tensor, backend: str) -> torch.Tensor:
        # x, z: (B, d_inner, L)
        L = x.shape[-1]
        x = F.silu(self.conv1d(x)[..., :L])  # causal: keep the first L outputs
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L); bias goes in the scan
        A = -torch.exp(self.A_log.float())
        return selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=z,
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True, backend=backend)


class BiMamba(nn.Module):
    """Vim's bidirectional mixer: shared in_proj/out_proj, a forward and a backward ScanBranch."""

    def __init__(self, width: int, d_state: int, expand: int, d_conv: int, backend: str):
        super().__init__()
        d_inner = expand * width
        dt_rank = math.ceil(width / 16)
        self.backend = backend
        self.in_proj = nn.Linear(width, 2 * d_inner, bias=False)
        self.forward_branch = ScanBranch(d_inner, d_state, d_conv, dt_rank)
        self.backward_branch = ScanBranch(d_inner, d_state, d_conv, dt_rank)
        self.out_proj = nn.Linear(d_inner, width, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: (B, L, width)
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2 * d_inner, L)
        x, z = xz.chunk(2, dim=1)
        y_forward = self.forward_branch(x, z, self.backend)
        y_backward = self.backward_branch(x.flip(-1), z.flip(-1), self.backend).flip(-1)
        return self.out_proj(((y_forward + y_backward) / 2).transpose(1, 2))  # (B, L, width)


class MambaBlock(nn.Module):
    def __init__(self, width, d_state, expand, d_conv, drop_path, backend):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.mixer = BiMamba(width, d_state, expand, d_conv, backend)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


class VisionMamba(nn.Module):
    """Vim image encoder: images (B, 3, H, W) in [0, 1] (or uint8) -> features (B, embed_dim)."""

    def __init__(self, image_size=224, patch_size=16, width=192, depth=24, d_state=16, expand=2, d_conv=4,
                 embed_dim=512, drop_path=0.0, scan_backend="auto"):
        super().__init__()
        self.arch = {"family": "vision-mamba", "image_size": image_size, "patch_size": patch_size, "width": width,
                     "depth": depth, "d_state": d_state, "expand": expand, "d_conv": d_conv,
                     "embed_dim": embed_dim, "drop_path": drop_path, "scan_backend": scan_backend}
        self.image_size, self.patch_size, self.width, self.embed_dim = image_size, patch_size, width, embed_dim
        grid = image_size // patch_size
        self.num_patches = grid * grid
        self.cls_position = self.num_patches // 2  # the class token sits in the middle of the sequence
        self.normalize = Normalize()
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)
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
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("dt_proj"):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

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
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Final-normed patch tokens (B, num_patches, width), the class token left out."""
        x = self._encode(images)
        p = self.cls_position
        return torch.cat([x[:, :p], x[:, p + 1:]], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self._encode(images)[:, self.cls_position])  # (B, embed_dim)


@register_family("vision-mamba")
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

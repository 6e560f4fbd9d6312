"""Vim's bidirectional mixer as functions: fused in one ``cpu`` kernel call, or op by op around the scan.

``dmclip.models.mamba.BiMamba`` holds the parameters and picks the path: :func:`bidirectional_mixer`
(training and inference on the fused kernel), :func:`bidirectional_block_inference` and
:func:`bidirectional_stack_inference` (a whole block, or every block, in one C++ call for inference), and
:func:`bidirectional_mixer_reference` (the ``reference``/``chunked``/``cuda`` backends, and the fused
kernel's test oracle); :func:`rms_norm` is the blocks' RMSNorm on the kernel (training included). Under a
``FlopCounterMode`` the fused paths run op by op, so every backend counts the same FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmclip.models.scan import selective_scan
from dmclip.models.scan_autograd import compute_dtype
from dmclip.models.scan_ext import cpu_extension
from dmclip.models.scan_flops import (
    active_flop_counter_modes,
    add_scan_flops,
    counting_scan_flops,
    scan_flops,
)


def bidirectional_mixer(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D):
    """The inner part of Vim's bidirectional mixer, both directions in one fused ``cpu`` kernel call.

    ``xz`` (batch, L, 2E) is in_proj's output (x, then the gate z); the per-direction weights are stacked
    along a leading 2 (0: the forward-in-time scan, 1: the backward one): conv_weight (2, E, d_conv),
    conv_bias (2, E), x_proj_weight (2, dt_rank + 2N, E), dt_proj_weight (2, E, dt_rank), dt_proj_bias
    (2, E), A_log (2, E, N), D (2, E). Returns silu(z) * (y_forward + y_backward) / 2, (batch, L, E), where
    y_r = selective_scan(silu(causal conv1d(x_r)), dt_proj(x_proj(.)), A = -exp(A_log_r), ...) on x_r = x
    for r = 0 and x flipped in time (output flipped back) for r = 1, exactly as
    :func:`bidirectional_mixer_reference`. Needs the extension (``"cpu" in available_backends()``).
    """
    params = (conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D)
    if active_flop_counter_modes():  # the kernel hides conv and dt_proj: count the same ops as the other backends
        return bidirectional_mixer_reference(xz, *params, backend="cpu")
    if counting_scan_flops():
        batch, L, E = xz.shape[0], xz.shape[1], xz.shape[2] // 2
        add_scan_flops(2 * scan_flops(batch, E, L, A_log.shape[-1], True, True))
    compute = compute_dtype(xz)
    tensors = [t if t.dtype == compute and t.is_contiguous() else t.to(compute).contiguous() for t in (xz, *params)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (xz, *params)):
        out = _BiMixer.apply(*tensors)
    else:  # inference: one C++ call, no autograd node, nothing saved
        out = cpu_extension().bimamba_fwd(*tensors)[0]
    return out if out.dtype == xz.dtype else out.to(xz.dtype)


def bidirectional_block_inference(x, norm_weight, eps, in_proj_weight, mixer_params, out_proj_weight):
    """``x + out_proj(bidirectional_mixer(in_proj(rms_norm(x))))`` for inference, one C++ call (``cpu``).

    Only float32/float64 CPU tensors without autograd; the caller checks (see ``MambaBlock.forward``).
    Under a FlopCounterMode it runs op by op (the fused scan inside), so it counts what the other backends count.
    """
    if active_flop_counter_modes():
        hidden = F.linear(F.rms_norm(x, (x.shape[-1],), norm_weight, eps), in_proj_weight)
        y = bidirectional_mixer_reference(hidden, *mixer_params, backend="cpu")
        return x + F.linear(y, out_proj_weight)
    if counting_scan_flops():
        batch, L, E = x.shape[0], x.shape[1], in_proj_weight.shape[0] // 2
        add_scan_flops(2 * scan_flops(batch, E, L, mixer_params[5].shape[-1], True, True))
    return cpu_extension().bimamba_block_fwd(x.contiguous(), norm_weight, eps, in_proj_weight, *mixer_params,
                                             out_proj_weight)


def bidirectional_stack_inference(x, blocks, eps):
    """Every block of ``blocks`` after the other (:func:`bidirectional_block_inference` each), one C++ call.

    ``blocks``: per block ``(norm_weight, in_proj_weight, mixer_params, out_proj_weight)``, one RMSNorm
    ``eps`` for all. With at least two batch rows per thread each thread runs the whole stack on its own
    rows (one parallel region in all); with fewer, op by op as the single-block call does.

    Under a ``TorchDispatchMode`` (a FLOP counter, ``metrics.latency.peak_tensor_bytes``) it goes block by
    block on this thread: the mode sees every op there, where the stack's worker threads would have to call
    back into Python for each op. Under ``torch.export`` it is one operator, ``torch.ops.dmclip.bimamba_stack``,
    so an exported program runs the fused kernel where the extension is loaded (``dmclip export --format pt2``).
    """
    exporting = torch.compiler.is_exporting()  # its fake tensors are under a dispatch mode as well
    if not exporting and (counting_scan_flops() or torch._C._len_torch_dispatch_stack()):  # a FlopCounterMode is one
        for norm_weight, in_proj_weight, mixer_params, out_proj_weight in blocks:
            x = bidirectional_block_inference(x, norm_weight, eps, in_proj_weight, mixer_params, out_proj_weight)
        return x
    params = []
    for norm_weight, in_proj_weight, mixer_params, out_proj_weight in blocks:
        params += [norm_weight, in_proj_weight, *mixer_params, out_proj_weight]
    if exporting:  # torch.export records the stack as one operator of the graph (dmclip/csrc/torch_ops.cpp)
        return torch.ops.dmclip.bimamba_stack(x, params, eps)
    return cpu_extension().bimamba_stack_fwd(x.contiguous(), params, eps)


def rms_norm(x, weight, eps):
    """``F.rms_norm(x, (width,), weight, eps)`` on the fused kernel (``cpu``), forward and backward.

    One pass over x forward and two per row backward, where autograd runs the norm's backward as about ten
    elementwise ops over the whole tensor (mamba-nano at batch 64, one thread: forward + backward 0.3-0.5 ms
    of CPU instead of 1.1-2.8 ms, five norms a step). float32 or float64 CPU tensors with the weight's dtype;
    the caller checks (see ``MambaBlock``). Under a dispatch mode (a FLOP counter) it is ``F.rms_norm``, so
    every backend counts the same ops.
    """
    if torch._C._len_torch_dispatch_stack() or active_flop_counter_modes():
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x = x.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RmsNorm.apply(x, weight, eps)
    return cpu_extension().rmsnorm_fwd(x, weight, eps)


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return cpu_extension().rmsnorm_fwd(x, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dweight = cpu_extension().rmsnorm_bwd(x, weight, ctx.eps, dy.contiguous())
        return dx if ctx.needs_input_grad[0] else None, dweight if ctx.needs_input_grad[1] else None, None


class _BiMixer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xz, *params):
        out, xc, xdbl = cpu_extension().bimamba_fwd(xz, *params)
        ctx.save_for_backward(xz, *params, xc, xdbl)
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        grads = cpu_extension().bimamba_bwd(*saved, dout.contiguous())
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def bidirectional_mixer_reference(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log,
                                  D, backend="reference"):
    """:func:`bidirectional_mixer` in plain PyTorch ops around :func:`selective_scan` (flips and all).

    The ``reference``/``chunked``/``cuda`` backends run the mixer this way; it is also the fused kernel's oracle.
    """
    L, E = xz.shape[1], xz.shape[2] // 2
    d_conv, N, dt_rank = conv_weight.shape[-1], A_log.shape[-1], dt_proj_weight.shape[-1]
    x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (batch, E, L)
    total = 0
    for r in range(2):
        xr, zr = (x, z) if r == 0 else (x.flip(-1), z.flip(-1))
        xr = F.silu(F.conv1d(xr, conv_weight[r].unsqueeze(1), conv_bias[r], padding=d_conv - 1, groups=E)[..., :L])
        x_dbl = xr.transpose(1, 2) @ x_proj_weight[r].t()  # (batch, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [dt_rank, N, N], dim=-1)
        delta = (dt @ dt_proj_weight[r].t()).transpose(1, 2)  # (batch, E, L); the bias goes in the scan
        A = -torch.exp(A_log[r].float() if A_log.dtype != torch.float64 else A_log[r])
        Dr = None if D is None else (D[r].float() if D.dtype != torch.float64 else D[r])
        bias = dt_proj_bias[r].float() if dt_proj_bias.dtype != torch.float64 else dt_proj_bias[r]
        y = selective_scan(xr, delta, A, B.transpose(1, 2), C.transpose(1, 2), Dr, z=zr, delta_bias=bias,
                           delta_softplus=True, backend=backend)
        total = total + (y if r == 0 else y.flip(-1))
    return (total / 2).transpose(1, 2)  # (batch, L, E)

"""The autograd glue the ``chunked`` and the fused ``cpu`` scans share.

A backend is a :class:`ScanFunction` with two static methods on prepared tensors (detached, in the compute
dtype, contiguous): ``kernel_forward(prepared, delta_softplus, return_last_state) -> (out, last)`` and
``kernel_backward(prepared, delta_softplus, dout, dlast) -> the 8 input gradients``. :func:`run_function`
calls it with an autograd node when a gradient is needed and without one (nothing saved) otherwise; every
gradient comes back in its input's dtype.
"""

from __future__ import annotations

import torch


def compute_dtype(u: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (so gradcheck works), float32 for everything else."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def run_function(function, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """``out`` or ``(out, last_state)`` of the :class:`ScanFunction` subclass ``function``."""
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not needs_grad:  # inference: call the kernel directly, no autograd node, nothing saved
        out, last = function.run_forward(tensors, delta_softplus, return_last_state)
        return (out, last) if return_last_state else out
    out, last = function.apply(delta_softplus, return_last_state, *tensors)
    return (out, last) if return_last_state else out


def _prepare(tensors):
    """Detached, in the compute dtype, contiguous (no copy for contiguous float32/float64 inputs)."""
    compute = compute_dtype(tensors[0])
    return tuple(None if t is None else t.detach().to(compute).contiguous() for t in tensors)


class ScanFunction(torch.autograd.Function):
    """Shared autograd glue: forward/backward on prepared tensors, gradients cast back per input."""

    @classmethod
    def run_forward(cls, tensors, delta_softplus, return_last_state):
        prepared = _prepare(tensors)
        out, last = cls.kernel_forward(prepared, delta_softplus, return_last_state)
        return out.to(tensors[0].dtype), (last if return_last_state else None)

    @staticmethod
    def forward(ctx, delta_softplus, return_last_state, *tensors):
        cls = ctx._forward_cls
        ctx.set_materialize_grads(False)
        prepared = _prepare(tensors)
        out, last = cls.kernel_forward(prepared, delta_softplus, return_last_state)
        ctx.save_for_backward(*prepared)
        ctx.delta_softplus = delta_softplus
        ctx.dtypes = [None if t is None else t.dtype for t in tensors]
        ctx.present = [t is not None for t in tensors]
        out = out.to(tensors[0].dtype)
        if return_last_state:
            return out, last
        return out, None

    @staticmethod
    def backward(ctx, dout, dlast):
        cls = ctx._forward_cls
        prepared = ctx.saved_tensors
        compute = prepared[0].dtype
        dout = torch.zeros_like(prepared[0]) if dout is None else dout.to(compute).contiguous()
        dlast = None if dlast is None else dlast.to(compute).contiguous()
        grads = cls.kernel_backward(prepared, ctx.delta_softplus, dout, dlast)
        result = []
        for grad, present, dtype, need in zip(grads, ctx.present, ctx.dtypes, ctx.needs_input_grad[2:]):
            result.append(grad.to(dtype) if present and need else None)
        return (None, None, *result)

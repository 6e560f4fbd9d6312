"""The two pure-PyTorch selective scans: ``reference`` (the test oracle) and ``chunked`` (the fallback).

- :func:`selective_scan_reference`: the sequential recurrence, written as mamba-ssm's ``selective_scan_ref``.
- :class:`ChunkedScan`: a sequential scan inside chunks run for all chunks at once, then a carry pass between
  chunks (:func:`linear_scan`; stable: decays are only multiplied, never divided), with its own backward
  (the adjoint recurrence, scanned the same way in reverse).

Shapes and semantics are those of :func:`dmclip.models.scan.selective_scan`, which dispatches to these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dmclip.models.scan_autograd import ScanFunction, compute_dtype


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
    """The sequential recurrence as mamba-ssm's ``selective_scan_ref`` (float64 stays float64)."""
    dtype_in = u.dtype
    compute = compute_dtype(u)
    u = u.to(compute)
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(compute)
    if delta_softplus:
        delta = F.softplus(delta)
    A, B, C = A.to(compute), B.to(compute), C.to(compute)
    batch, dim, N = u.shape[0], A.shape[0], A.shape[1]
    x = A.new_zeros((batch, dim, N))
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2)  # (B, dim, L)
    out = y if D is None else y + u * D.to(compute)[:, None]
    if z is not None:
        out = out * F.silu(z.to(compute))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


def linear_scan(a: torch.Tensor, b: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """x_t = a_t * x_{t-1} + b_t along dim -2 of (..., L, N) tensors, x_{-1} = 0 (no autograd needed).

    The L steps are cut into chunks of ~sqrt(L): a sequential scan inside every chunk (all chunks at
    once), a sequential carry pass over chunk ends, then one fix-up multiply by the in-chunk cumulative
    decay. About sqrt(L) Python steps instead of L; decays are multiplied, never divided, so it is stable.
    """
    L = a.shape[-2]
    if chunk is None:
        chunk = max(1, math.isqrt(L))
    chunks = -(-L // chunk)
    pad = chunks * chunk - L
    if pad:
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad), value=0.0)
    shape = a.shape[:-2]
    N = a.shape[-1]
    a = a.reshape(*shape, chunks, chunk, N)
    b = b.reshape(*shape, chunks, chunk, N)
    x = torch.empty_like(b)
    x[..., 0, :] = b[..., 0, :]
    for t in range(1, chunk):  # in-chunk scan, all chunks together
        torch.addcmul(b[..., t, :], a[..., t, :], x[..., t - 1, :], out=x[..., t, :])
    if chunks > 1:
        decay = torch.cumprod(a, dim=-2)  # (..., chunks, chunk, N)
        carry = torch.zeros_like(x[..., 0, 0, :])
        carries = torch.empty_like(x[..., :, 0, :])  # state entering each chunk
        for c in range(chunks):
            carries[..., c, :] = carry
            carry = decay[..., c, -1, :] * carry + x[..., c, -1, :]
        x.add_(decay * carries.unsqueeze(-2))
    x = x.reshape(*shape, chunks * chunk, N)
    return x[..., :L, :] if pad else x


def _chunked_states(u, delta, A, Bt, D, delta_bias, delta_softplus):
    """dt (B, dim, L), decay a (B, dim, L, N), states x (B, dim, L, N)."""
    v = delta if delta_bias is None else delta + delta_bias[:, None]
    dt = F.softplus(v) if delta_softplus else v
    a = torch.exp(dt[..., None] * A[:, None, :])
    b = (dt * u)[..., None] * Bt[:, None, :, :]
    return v, dt, a, linear_scan(a, b)


class ChunkedScan(ScanFunction):
    # works on B, C transposed to (batch, L, N), so that the state axis is last like the states'
    @staticmethod
    def kernel_forward(prepared, delta_softplus, return_last_state):
        u, delta, A, B, C, D, z, delta_bias = prepared
        Bt, Ct = B.transpose(1, 2), C.transpose(1, 2)
        _, _, _, x = _chunked_states(u, delta, A, Bt, D, delta_bias, delta_softplus)
        y = torch.einsum("bdln,bln->bdl", x, Ct)
        if D is not None:
            y = y + D[:, None] * u
        if z is not None:
            y = y * F.silu(z)
        return y, (x[:, :, -1].contiguous() if return_last_state else None)

    @staticmethod
    def kernel_backward(prepared, delta_softplus, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias = prepared
        Bt, Ct = B.transpose(1, 2), C.transpose(1, 2)
        v, dt, a, x = _chunked_states(u, delta, A, Bt, D, delta_bias, delta_softplus)
        y = torch.einsum("bdln,bln->bdl", x, Ct)
        dz = None
        dy = dout
        if z is not None:
            s = torch.sigmoid(z)
            pre = y if D is None else y + D[:, None] * u
            dz = dout * pre * s * (1 + z * (1 - s))
            dy = dout * z * s
        dD = (dy * u).sum(dim=(0, 2)) if D is not None else None
        du = dy * D[:, None] if D is not None else torch.zeros_like(u)
        dCt = torch.einsum("bdl,bdln->bln", dy, x)
        g = dy[..., None] * Ct[:, None, :, :]  # dLoss/dx_t from the readout
        if dlast is not None:
            g[:, :, -1] += dlast
        # adjoint recurrence h_t = g_t + a_{t+1} h_{t+1}: the same scan, reversed in time
        a_next = F.pad(a[:, :, 1:], (0, 0, 0, 1), value=0.0)
        h = linear_scan(a_next.flip(2), g.flip(2)).flip(2)
        x_prev = F.pad(x[:, :, :-1], (0, 0, 1, 0), value=0.0)
        dlog = h * x_prev * a  # dLoss / d(dt * A)
        hB = torch.einsum("bdln,bln->bdl", h, Bt)
        ddt = torch.einsum("bdln,dn->bdl", dlog, A) + hB * u
        dA = torch.einsum("bdln,bdl->dn", dlog, dt)
        dBt = torch.einsum("bdln,bdl->bln", h, dt * u)
        du = du + hB * dt
        ddelta = ddt * torch.sigmoid(v) if delta_softplus else ddt
        if delta_softplus:  # softplus is the identity above its threshold (F.softplus, threshold 20)
            ddelta = torch.where(v > 20, ddt, ddelta)
        dbias = ddelta.sum(dim=(0, 2)) if delta_bias is not None else None
        return du, ddelta, dA, dBt.transpose(1, 2), dCt.transpose(1, 2), dD, dz, dbias

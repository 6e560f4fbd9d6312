"""The selective scan (Mamba's S6 recurrence) behind one function, with four backends.

    out = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

Semantics and shapes are mamba-ssm's ``selective_scan_fn`` (Gu & Dao 2023, Alg. 2; real A, B and C
input-dependent):

    dt_t = softplus(delta_t + delta_bias)                                   (B, dim, L)
    x_t  = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t                        (B, dim, N), x_{-1} = 0
    out_t = (<C_t, x_t> + D * u_t) * silu(z_t)                               (B, dim, L)

u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L); D, delta_bias: (dim,);
last_state: (batch, dim, N). Computation is float32 (float64 for float64 inputs, so gradcheck works);
``out`` has u's dtype, every gradient its input's dtype. Unlike mamba-ssm, gradients also flow through
``last_state``.

Backends:
- ``reference``: the sequential recurrence, written as mamba-ssm's ``selective_scan_ref`` (the test oracle;
  ``scan_ref.py``).
- ``chunked``: pure PyTorch: a sequential scan inside chunks run for all chunks at once, then a carry pass
  between chunks (stable: decays are only multiplied, never divided), with its own backward (the adjoint
  recurrence, scanned the same way in reverse; ``scan_ref.py``).
- ``cpu``: the fused C++ kernel (dmclip/csrc/, loaded by ``scan_ext.py``): forward and backward without any
  (batch, dim, L, N) tensor, threads over batch x channel blocks, channels in vector lanes (AVX-512 or AVX2
  chosen at run time, scalar loops otherwise; :func:`kernel_isa`, :func:`forced_isa`, ``DMCLIP_SCAN_ISA``).
- ``cuda``: mamba-ssm's kernel, for CUDA tensors when ``mamba_ssm`` imports.
``auto`` picks cuda for CUDA tensors when available, else cpu when the extension builds, else chunked
(saying so once in the log). Every scan is counted once, analytically, by :func:`count_scan_flops`
(``scan_flops.py``); Vim's bidirectional mixer around two scans is in ``mixer.py``.
"""

from __future__ import annotations

import logging

import torch

from dmclip.errors import DmclipError, did_you_mean
from dmclip.models import scan_ext
from dmclip.models.scan_autograd import run_function
from dmclip.models.scan_ext import ISAS, forced_isa, kernel_isa, set_kernel_isa
from dmclip.models.scan_flops import (
    FlopCount,
    add_scan_flops,
    count_scan_flops,
    counting_scan_flops,
    hidden_from_flop_counter_modes,
    scan_flops,
)
from dmclip.models.scan_ref import ChunkedScan, selective_scan_reference

__all__ = ["BACKENDS", "ISAS", "FlopCount", "available_backends", "count_scan_flops", "forced_isa", "kernel_isa",
           "resolve_backend", "scan_flops", "selective_scan", "set_kernel_isa"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "chunked", "cpu", "cuda")
_warned: set[str] = set()


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto"):
    """mamba-ssm's ``selective_scan_fn``: returns ``out`` or ``(out, last_state)``; see the module doc."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u)
    if counting_scan_flops():
        add_scan_flops(scan_flops(u.shape[0], u.shape[1], u.shape[2], A.shape[1], D is not None, z is not None))
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    with hidden_from_flop_counter_modes():  # the scan is counted analytically, once, on every backend
        if name == "reference":
            return selective_scan_reference(*args)
        if name == "cuda":
            return scan_ext.selective_scan_cuda(*args)
        return run_function(scan_ext.CpuScan if name == "cpu" else ChunkedScan, *args)


def available_backends() -> list[str]:
    """The backends that run on this machine (``cpu`` builds the extension on first call)."""
    names = ["reference", "chunked"]
    if scan_ext.cpu_extension() is not None:
        names.append("cpu")
    if torch.cuda.is_available() and scan_ext.cuda_scan_fn() is not None:
        names.append("cuda")
    return names


def resolve_backend(backend: str, u: torch.Tensor | None = None) -> str:
    """The concrete backend ``backend`` means for tensors like ``u`` (raises DmclipError if impossible)."""
    if backend not in BACKENDS:
        raise DmclipError(f"unknown selective-scan backend {backend!r}", did_you_mean(backend, BACKENDS))
    on_cuda = u is not None and u.is_cuda
    if backend == "auto":
        if on_cuda:
            if scan_ext.cuda_scan_fn() is not None:
                return "cuda"
            _fallback_once("cuda", "mamba-ssm is not importable; CUDA tensors use the chunked PyTorch scan")
            return "chunked"
        if u is not None and u.device.type != "cpu":
            return "chunked"
        if scan_ext.cpu_extension() is not None:
            return "cpu"
        from dmclip.models.scan_build import extension_error, extension_fix

        _fallback_once("cpu", f"the fused CPU scan is not available ({extension_error()}); using the slower "
                              f"chunked PyTorch scan. Fix: {extension_fix() or 'python -m dmclip.models.scan_build'}")
        return "chunked"
    if backend == "cuda":
        if not on_cuda and u is not None:
            raise DmclipError("the cuda scan backend needs CUDA tensors", "use backend 'auto' or 'cpu' on a CPU")
        if scan_ext.cuda_scan_fn() is None:
            raise DmclipError("the cuda scan backend needs mamba-ssm", "pip install -e '.[cuda]' on a GPU machine")
    if backend == "cpu":
        if u is not None and u.device.type != "cpu":
            raise DmclipError("the cpu scan backend needs CPU tensors", "use backend 'auto'")
        if scan_ext.cpu_extension() is None:
            from dmclip.models.scan_build import extension_error, extension_fix

            raise DmclipError(f"the fused CPU scan could not be built ({extension_error()})",
                              f"{extension_fix() or 'run `python -m dmclip.models.scan_build` to see why'}, "
                              "or use backend 'chunked'")
    return backend


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise DmclipError(f"selective_scan: u must be (batch, dim, L), got {tuple(u.shape)}")
    batch, dim, L = u.shape
    problems = []
    if delta.shape != u.shape:
        problems.append(f"delta {tuple(delta.shape)} != u {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        problems.append(f"A must be real (dim={dim}, N), got {tuple(A.shape)}")
    N = A.shape[-1]
    for name, tensor in (("B", B), ("C", C)):
        if tuple(tensor.shape) != (batch, N, L):
            problems.append(f"{name} must be (batch, N, L) = {(batch, N, L)}, got {tuple(tensor.shape)}")
    for name, tensor in (("D", D), ("delta_bias", delta_bias)):
        if tensor is not None and tuple(tensor.shape) != (dim,):
            problems.append(f"{name} must be (dim,) = ({dim},), got {tuple(tensor.shape)}")
    if z is not None and z.shape != u.shape:
        problems.append(f"z {tuple(z.shape)} != u {tuple(u.shape)}")
    if problems:
        raise DmclipError("selective_scan: " + "; ".join(problems),
                          "shapes follow mamba-ssm's selective_scan_fn")


def _fallback_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)

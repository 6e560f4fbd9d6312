"""The compiled scan kernels: the fused C++ extension (loaded once, its instruction set chosen) and
mamba-ssm's CUDA function.

The fused ``cpu`` kernels (dmclip/csrc/) run forward and backward without any (batch, dim, L, N) tensor,
threads over batch x channel blocks, channels in vector lanes: AVX-512 or AVX2 chosen at run time on x86-64,
scalar loops otherwise (:func:`kernel_isa`, :func:`set_kernel_isa`, :func:`forced_isa`, ``DMCLIP_SCAN_ISA``, read
when the extension is first used). ``dmclip.models.scan_build`` builds and caches the extension.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from dmclip.errors import DmclipError, did_you_mean
from dmclip.models.scan_autograd import ScanFunction

log = logging.getLogger(__name__)

ISAS = ("auto", "avx512", "avx2", "scalar")  # instruction sets of the fused cpu kernels
_isa_env = {"applied": False}
_cuda_fn: dict = {}


def cpu_extension():
    """The fused kernels' module (built on first call), or None where it cannot be built."""
    from dmclip.models.scan_build import load_extension

    module = load_extension()
    if module is not None and not _isa_env["applied"]:
        _isa_env["applied"] = True
        name = os.environ.get("DMCLIP_SCAN_ISA")
        if name:
            try:
                set_kernel_isa(name)
            except DmclipError as exc:
                raise DmclipError(f"DMCLIP_SCAN_ISA={name}: {exc.message}", exc.hint) from None
    return module


def kernel_isa() -> str | None:
    """The instruction set the fused ``cpu`` kernels run with (``avx512``, ``avx2`` or ``scalar``; None when
    the extension is not built). ``auto`` is the best the CPU has; ``DMCLIP_SCAN_ISA`` or
    :func:`set_kernel_isa` force another."""
    module = cpu_extension()
    return None if module is None else module.isa()


def set_kernel_isa(name: str) -> str:
    """Run the fused ``cpu`` kernels with instruction set ``name`` (``auto``, ``avx512``, ``avx2``, ``scalar``:
    the plain loops, also the float64 path); returns the setting before. Results agree to float32 rounding."""
    if name not in ISAS:
        raise DmclipError(f"unknown instruction set {name!r} for the fused scan", did_you_mean(name, ISAS))
    module = cpu_extension()
    if module is None:
        raise DmclipError("the fused CPU scan is not built, so it has no instruction set to choose",
                          "run `python -m dmclip.models.scan_build` to see why")
    supported = list(module.supported_isas())
    if name != "auto" and name not in module.compiled_isas():
        raise DmclipError(f"this build of the fused scan has no {name} kernels (built for a CPU other than x86-64, "
                          "or with DMCLIP_SCAN_NO_SIMD=1)", f"use one of: auto, {', '.join(supported)}")
    if name != "auto" and name not in supported:
        raise DmclipError(f"this CPU cannot run the {name} scan kernels", f"use one of: auto, {', '.join(supported)}")
    return module.set_isa(name)


@contextlib.contextmanager
def forced_isa(name: str):
    """``with forced_isa("scalar"): ...`` runs the fused kernels with ``name`` inside the block (tests, benches)."""
    before = set_kernel_isa(name)
    try:
        yield
    finally:
        set_kernel_isa(before)


class CpuScan(ScanFunction):
    # the kernel takes mamba-ssm's layout as it is: B, C (batch, N, L), any N, no padding or transposes
    @staticmethod
    def kernel_forward(prepared, delta_softplus, return_last_state):
        out, last = cpu_extension().fwd(*prepared, delta_softplus, return_last_state)
        return out, (last if return_last_state else None)

    @staticmethod
    def kernel_backward(prepared, delta_softplus, dout, dlast):
        return cpu_extension().bwd(*prepared, delta_softplus, dout, dlast)


def cuda_scan_fn():
    """mamba-ssm's ``selective_scan_fn``, or None where it does not import (no CUDA, no mamba-ssm build)."""
    if "fn" not in _cuda_fn:
        _cuda_fn["fn"] = None
        if torch.cuda.is_available():
            try:  # mamba_ssm's import fails outright on machines without its CUDA build
                from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

                _cuda_fn["fn"] = selective_scan_fn
            except Exception as exc:  # ImportError, or an undefined CUDA symbol
                log.debug("mamba_ssm not importable: %s", exc)
    return _cuda_fn["fn"]


def selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """The scan on mamba-ssm's kernel (it wants A, D and delta_bias in float32)."""
    fn = cuda_scan_fn()
    return fn(u, delta, A.float(), B, C, None if D is None else D.float(), z,
              None if delta_bias is None else delta_bias.float(), delta_softplus, return_last_state)

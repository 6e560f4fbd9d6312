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
- ``reference``: the sequential recurrence, written as mamba-ssm's ``selective_scan_ref`` (the test oracle).
- ``chunked``: pure PyTorch: a sequential scan inside chunks run for all chunks at once, then a carry pass
  between chunks (stable: decays are only multiplied, never divided), with its own backward (the adjoint
  recurrence, scanned the same way in reverse).
- ``cpu``: the fused C++ kernel (dmclip/csrc/): forward and backward without any (batch, dim, L, N)
  tensor, threads over batch x channel blocks, channels in vector lanes (AVX-512 or AVX2 chosen at run
  time, scalar loops otherwise; :func:`kernel_isa`, :func:`forced_isa`, ``DMCLIP_SCAN_ISA``).
- ``cuda``: mamba-ssm's kernel, for CUDA tensors when ``mamba_ssm`` imports.
``auto`` picks cuda for CUDA tensors when available, else cpu when the extension builds, else chunked
(saying so once in the log).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
import torch.nn.functional as F

from dmclip.errors import DmclipError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "chunked", "cpu", "cuda")
ISAS = ("auto", "avx512", "avx2", "scalar")  # instruction sets of the fused cpu kernels
_warned: set[str] = set()
_isa_env = {"applied": False}
_cuda_fn: dict = {}
_flop_counters: list[FlopCount] = []


# ---------------------------------------------------------------------------------------------- public API


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto"):
    """mamba-ssm's ``selective_scan_fn``: returns ``out`` or ``(out, last_state)``; see the module doc."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u)
    if _flop_counters:
        flops = scan_flops(u.shape[0], u.shape[1], u.shape[2], A.shape[1], D is not None, z is not None)
        for counter in _flop_counters:
            counter.add(flops)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    with _hidden_from_flop_counter_modes():  # the scan is counted analytically, once, on every backend
        if name == "reference":
            return selective_scan_reference(*args)
        if name == "cuda":
            return _selective_scan_cuda(*args)
        return _run_function(_CpuScan if name == "cpu" else _ChunkedScan, *args)


def available_backends() -> list[str]:
    """The backends that run on this machine (``cpu`` builds the extension on first call)."""
    names = ["reference", "chunked"]
    if _cpu_extension() is not None:
        names.append("cpu")
    if torch.cuda.is_available() and _cuda_scan_fn() is not None:
        names.append("cuda")
    return names


def kernel_isa() -> str | None:
    """The instruction set the fused ``cpu`` kernels run with (``avx512``, ``avx2`` or ``scalar``; None when
    the extension is not built). ``auto`` is the best the CPU has; ``DMCLIP_SCAN_ISA`` or
    :func:`set_kernel_isa` force another."""
    module = _cpu_extension()
    return None if module is None else module.isa()


def set_kernel_isa(name: str) -> str:
    """Run the fused ``cpu`` kernels with instruction set ``name`` (``auto``, ``avx512``, ``avx2``, ``scalar``:
    the plain loops, also the float64 path); returns the setting before. Results agree to float32 rounding."""
    if name not in ISAS:
        from dmclip.errors import did_you_mean

        raise DmclipError(f"unknown instruction set {name!r} for the fused scan", did_you_mean(name, ISAS))
    module = _cpu_extension()
    if module is None:
        raise DmclipError("the fused CPU scan is not built, so it has no instruction set to choose",
                          "run `python -m dmclip.models.scan_build` to see why")
    supported = list(module.supported_isas())
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


def resolve_backend(backend: str, u: torch.Tensor | None = None) -> str:
    """The concrete backend ``backend`` means for tensors like ``u`` (raises DmclipError if impossible)."""
    if backend not in BACKENDS:
        from dmclip.errors import did_you_mean

        raise DmclipError(f"unknown selective-scan backend {backend!r}", did_you_mean(backend, BACKENDS))
    on_cuda = u is not None and u.is_cuda
    if backend == "auto":
        if on_cuda:
            if _cuda_scan_fn() is not None:
                return "cuda"
            _fallback_once("cuda", "mamba-ssm is not importable; CUDA tensors use the chunked PyTorch scan")
            return "chunked"
        if u is not None and u.device.type != "cpu":
            return "chunked"
        if _cpu_extension() is not None:
            return "cpu"
        _fallback_once("cpu", "the fused CPU scan is not available; using the chunked PyTorch scan "
                              "(run `python -m dmclip.models.scan_build` to see why)")
        return "chunked"
    if backend == "cuda":
        if not on_cuda and u is not None:
            raise DmclipError("the cuda scan backend needs CUDA tensors", "use backend 'auto' or 'cpu' on a CPU")
        if _cuda_scan_fn() is None:
            raise DmclipError("the cuda scan backend needs mamba-ssm", "pip install 'dmclip[cuda]' on a GPU machine")
    if backend == "cpu":
        if u is not None and u.device.type != "cpu":
            raise DmclipError("the cpu scan backend needs CPU tensors", "use backend 'auto'")
        if _cpu_extension() is None:
            from dmclip.models.scan_build import extension_error

            raise DmclipError(f"the fused CPU scan could not be built ({extension_error()})",
                              "install gcc/g++ and ninja, or use backend 'chunked'")
    return backend


class FlopCount:
    """Accumulates analytic FLOPs of the scans run inside ``count_scan_flops()``."""

    def __init__(self):
        self.total = 0
        self.calls = 0

    def add(self, flops: int) -> None:
        self.total += int(flops)
        self.calls += 1


@contextlib.contextmanager
def count_scan_flops():
    """``with count_scan_flops() as counter: model(x)`` -> ``counter.total`` FLOPs of every scan (forward).

    Add this to ``FlopCounterMode``'s total: the scan counts to FlopCounterMode as nothing on every backend
    (it cannot see inside the fused kernels, and the ops inside the python backends are hidden from it,
    see :func:`_hidden_from_flop_counter_modes`), so every scan is counted exactly once, analytically.
    """
    counter = FlopCount()
    _flop_counters.append(counter)
    try:
        yield counter
    finally:
        _flop_counters.remove(counter)


from dmclip.metrics.latency import register_analytic_counter  # noqa: E402  (count_flops adds the scan)

register_analytic_counter(count_scan_flops)


def scan_flops(batch: int, dim: int, L: int, N: int, has_D: bool = True, has_z: bool = True) -> int:
    """Forward FLOPs of one scan, counting multiply and add separately (exp as one).

    Per (batch, channel, step, state): dt*A, exp, dt*u*B (1, dt*u shared), a*x + b (2), C*x + sum (2) = 7;
    per (batch, channel, step): dt*u (1), softplus (~3), D*u + y (2), silu(z) and gate (~5).
    """
    per_state = 7 * N
    per_step = 1 + 3 + (2 if has_D else 0) + (5 if has_z else 0)
    return batch * dim * L * (per_state + per_step)


def _active_flop_counter_modes() -> list:
    """The ``torch.utils.flop_counter.FlopCounterMode`` objects counting on this thread right now."""
    if not torch._C._len_torch_dispatch_stack():  # the common case (training, timing): nothing to look at
        return []
    from torch.utils import flop_counter
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    inner = getattr(flop_counter, "_FlopCounterMode", None)  # torch >= 2.4: FlopCounterMode pushes this mode
    counters = []
    for mode in _get_current_dispatch_mode_stack():
        if inner is not None and isinstance(mode, inner):
            counters.append(mode.counter)
        elif isinstance(mode, flop_counter.FlopCounterMode):  # older torch: the counter is the mode itself
            counters.append(mode)
    return counters


@contextlib.contextmanager
def _hidden_from_flop_counter_modes():
    """Leave every active FlopCounterMode's counts as they were before the block (per module and op).

    The python backends' inner einsums/matmuls would otherwise add to the analytic count of
    :func:`count_scan_flops`. Only the counts are restored: other dispatch modes (e.g. the peak-memory
    tracker in dmclip.metrics.latency) still see every op, and autograd is untouched.
    """
    counters = _active_flop_counter_modes()
    if not counters:
        yield
        return
    saved = [(counter, {key: dict(ops) for key, ops in counter.flop_counts.items()}) for counter in counters]
    try:
        yield
    finally:
        for counter, counts in saved:
            counter.flop_counts.clear()  # a defaultdict of defaultdicts: keep the object, refill it
            for key, ops in counts.items():
                counter.flop_counts[key].update(ops)


# ------------------------------------------------------------------------------------------------ reference


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
    """The sequential recurrence as mamba-ssm's ``selective_scan_ref`` (float64 stays float64)."""
    dtype_in = u.dtype
    compute = _compute_dtype(u)
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


# -------------------------------------------------------------------------------------------------- helpers


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


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


def _cpu_extension():
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


def _cuda_scan_fn():
    if "fn" not in _cuda_fn:
        _cuda_fn["fn"] = None
        if torch.cuda.is_available():
            try:  # mamba_ssm's import fails outright on machines without its CUDA build
                from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

                _cuda_fn["fn"] = selective_scan_fn
            except Exception as exc:  # ImportError, or an undefined CUDA symbol
                log.debug("mamba_ssm not importable: %s", exc)
    return _cuda_fn["fn"]


def _selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    fn = _cuda_scan_fn()
    result = fn(u, delta, A.float(), B, C, None if D is None else D.float(), z,
                None if delta_bias is None else delta_bias.float(), delta_softplus, return_last_state)
    return result


_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _run_function(function, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not needs_grad:  # inference: call the kernel directly, no autograd node, nothing saved
        out, last = function.run_forward(tensors, delta_softplus, return_last_state)
        return (out, last) if return_last_state else out
    out, last = function.apply(delta_softplus, return_last_state, *tensors)
    return (out, last) if return_last_state else out


def _prepare(tensors):
    """Detached, in the compute dtype, contiguous (no copy for contiguous float32/float64 inputs)."""
    compute = _compute_dtype(tensors[0])
    return tuple(None if t is None else t.detach().to(compute).contiguous() for t in tensors)


class _ScanFunction(torch.autograd.Function):
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


class _CpuScan(_ScanFunction):
    # the kernel takes mamba-ssm's layout as it is: B, C (batch, N, L), any N, no padding or transposes
    @staticmethod
    def kernel_forward(prepared, delta_softplus, return_last_state):
        out, last = _cpu_extension().fwd(*prepared, delta_softplus, return_last_state)
        return out, (last if return_last_state else None)

    @staticmethod
    def kernel_backward(prepared, delta_softplus, dout, dlast):
        return _cpu_extension().bwd(*prepared, delta_softplus, dout, dlast)


# ------------------------------------------------------------------------------------------------- chunked


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


class _ChunkedScan(_ScanFunction):
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


# ------------------------------------------------------------------------------- fused bidirectional mixer


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
    if _active_flop_counter_modes():  # the kernel hides conv and dt_proj: count the same ops as the other backends
        return bidirectional_mixer_reference(xz, *params, backend="cpu")
    if _flop_counters:
        batch, L, E = xz.shape[0], xz.shape[1], xz.shape[2] // 2
        flops = 2 * scan_flops(batch, E, L, A_log.shape[-1], True, True)
        for counter in _flop_counters:
            counter.add(flops)
    compute = _compute_dtype(xz)
    tensors = [t if t.dtype == compute and t.is_contiguous() else t.to(compute).contiguous() for t in (xz, *params)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (xz, *params)):
        out = _BiMixer.apply(*tensors)
    else:  # inference: one C++ call, no autograd node, nothing saved
        out = _cpu_extension().bimamba_fwd(*tensors)[0]
    return out if out.dtype == xz.dtype else out.to(xz.dtype)


def bidirectional_block_inference(x, norm_weight, eps, in_proj_weight, mixer_params, out_proj_weight):
    """``x + out_proj(bidirectional_mixer(in_proj(rms_norm(x))))`` for inference, one C++ call (``cpu``).

    Only float32/float64 CPU tensors without autograd; the caller checks (see ``MambaBlock.forward``).
    Under a FlopCounterMode it runs op by op (the fused scan inside), so it counts what the other backends count.
    """
    if _active_flop_counter_modes():
        hidden = F.linear(F.rms_norm(x, (x.shape[-1],), norm_weight, eps), in_proj_weight)
        y = bidirectional_mixer_reference(hidden, *mixer_params, backend="cpu")
        return x + F.linear(y, out_proj_weight)
    if _flop_counters:
        batch, L, E = x.shape[0], x.shape[1], in_proj_weight.shape[0] // 2
        flops = 2 * scan_flops(batch, E, L, mixer_params[5].shape[-1], True, True)
        for counter in _flop_counters:
            counter.add(flops)
    return _cpu_extension().bimamba_block_fwd(x.contiguous(), norm_weight, eps, in_proj_weight, *mixer_params,
                                              out_proj_weight)


def bidirectional_stack_inference(x, blocks, eps):
    """Every block of ``blocks`` after the other (:func:`bidirectional_block_inference` each), one C++ call.

    ``blocks``: per block ``(norm_weight, in_proj_weight, mixer_params, out_proj_weight)``, one RMSNorm
    ``eps`` for all. With at least two batch rows per thread each thread runs the whole stack on its own
    rows (one parallel region in all); with fewer, op by op as the single-block call does.
    """
    if _active_flop_counter_modes() or _flop_counters:  # count each block as the single-block path does
        for norm_weight, in_proj_weight, mixer_params, out_proj_weight in blocks:
            x = bidirectional_block_inference(x, norm_weight, eps, in_proj_weight, mixer_params, out_proj_weight)
        return x
    params = []
    for norm_weight, in_proj_weight, mixer_params, out_proj_weight in blocks:
        params += [norm_weight, in_proj_weight, *mixer_params, out_proj_weight]
    return _cpu_extension().bimamba_stack_fwd(x.contiguous(), params, eps)


class _BiMixer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xz, *params):
        out, xc, xdbl = _cpu_extension().bimamba_fwd(xz, *params)
        ctx.save_for_backward(xz, *params, xc, xdbl)
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        grads = _cpu_extension().bimamba_bwd(*saved, dout.contiguous())
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

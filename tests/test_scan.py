"""The selective-scan backends agree with the sequential recurrence (mamba-ssm's selective_scan_ref).

If these break, a student trained or evaluated on one backend behaves differently on another: wrong
features at inference, wrong gradients in training. The oracle is the ``reference`` backend evaluated in
float64 on the same inputs (so its own rounding is out of the picture). Tolerances are relative to the
largest magnitude of each reference tensor, ``max|x - ref| <= rtol * max|ref| + SLACK * e_ref``, with rtol
1e-5 for the fused ``cpu`` kernel (issue 11), 1e-4 for ``chunked`` (issue 7), and 2e-2 for bfloat16 inputs
(bf16 keeps 8 bits of mantissa: its rounding alone is 4e-3 relative). ``e_ref`` is the error of the
written-out recurrence run in the backend's own precision: gradients that are small differences of large
terms (short decays, one channel) cannot be computed to rtol of their size in float32 by any algorithm, and
the hypothesis tests found such cases (pinned below with ``@example``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dmclip.errors import DmclipError
from dmclip.models import mixer, scan, scan_build, scan_ext, scan_ref
from dmclip.models.scan import count_scan_flops, scan_flops, selective_scan

REPO = Path(__file__).resolve().parents[1]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# every backend is collected everywhere; the fused one skips, saying why, where its kernel did not build.
# "cpu" runs the best instruction set this CPU has; "cpu:avx2" and "cpu:scalar" force the others (skipped,
# saying why, on a CPU that lacks it), so the AVX2 kernels and the scalar fallback are held to the same oracle.
FUSED = [pytest.param(name, marks=pytest.mark.requires_fused_scan) for name in ("cpu", "cpu:avx2", "cpu:scalar")]
BACKENDS = ["chunked", *FUSED]
RTOL = {"cpu": 1e-5, "chunked": 1e-4}
SLACK = 8  # a backend may err up to this many times what the written-out recurrence errs in its precision


def make_inputs(batch, dim, L, N, *, delta_scale=1.0, softplus=True, with_D=True, with_z=True, with_bias=True,
                dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    delta = r(batch, dim, L) * delta_scale
    if not softplus:  # without softplus dt is delta itself: keep it positive, as a real step size is
        delta = delta.abs()
    tensors = {
        "u": r(batch, dim, L), "delta": delta, "A": -torch.rand(dim, N, generator=g, dtype=torch.float64) * 2 - 0.05,
        "B": r(batch, N, L), "C": r(batch, N, L),
        "D": r(dim) if with_D else None, "z": r(batch, dim, L) if with_z else None,
        "delta_bias": r(dim) * 0.5 if with_bias else None,
    }
    if not softplus and with_bias:  # dt = delta + bias must stay positive too: a negative step grows as exp(L)
        tensors["delta_bias"] = tensors["delta_bias"].abs()
    return {k: None if v is None else v.to(dtype) for k, v in tensors.items()}


def isa_of(backend):
    """``"cpu:avx2"`` -> a context running the fused kernels with AVX2 (skips where the CPU lacks it)."""
    if ":" not in backend:
        return contextlib.nullcontext()
    isa = backend.split(":")[1]
    if isa not in scan_ext.cpu_extension().compiled_isas():
        pytest.skip(f"this build has no {isa} kernels (not x86-64, or DMCLIP_SCAN_NO_SIMD=1)")
    if isa not in scan_ext.cpu_extension().supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    return scan.forced_isa(isa)


def run(backend, inputs, softplus, last_state, out_weight, last_weight, dtype=None):
    """Output, last state and the gradients of a fixed random projection of both, for every input."""
    leaves = {k: None if v is None else v.detach().to(dtype or v.dtype).requires_grad_() for k, v in inputs.items()}
    with isa_of(backend):
        result = selective_scan(*[leaves[k] for k in NAMES], delta_softplus=softplus, return_last_state=last_state,
                                backend=backend.split(":")[0])
    out, last = result if last_state else (result, None)
    loss = (out.double() * out_weight).sum()
    if last_state:
        loss = loss + (last.double() * last_weight).sum()
    present = [k for k in NAMES if leaves[k] is not None]
    with isa_of(backend):  # the backward runs under the same instruction set
        grads = torch.autograd.grad(loss, [leaves[k] for k in present])
    return out, last, dict(zip(present, grads))


def named_results(out, last, grads):
    return [("out", out)] + ([("last_state", last)] if last is not None else []) + \
        [(f"d{k}", grads[k]) for k in grads]


def assert_close_to_oracle(label, results, oracle, same_precision, rtol, slack=SLACK):
    """Each tensor within ``rtol * max|oracle| + slack * (the op-by-op reference's own error)``.

    The second term makes the bound cancellation-aware: where a gradient is a small difference of large
    terms, no float32 algorithm gets within rtol of its magnitude (the written-out recurrence itself does
    not), so the backend must only be no worse than ``slack`` times that reference in the same precision.
    """
    for (name, value), (_, ref), (_, same) in zip(results, oracle, same_precision):
        error = (value.double() - ref).abs().max().item()
        own_error = (same.double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        bound = rtol * scale + slack * own_error + 1e-30
        assert error <= bound, (f"{label} {name}: max error {error:.3g} vs scale {scale:.3g} "
                                f"(the reference in the same precision errs {own_error:.3g})")


def assert_matches(backend, inputs, softplus, last_state, rtol, seed=1):
    g = torch.Generator().manual_seed(seed)
    batch, dim, L = inputs["u"].shape
    out_weight = torch.randn(batch, dim, L, generator=g, dtype=torch.float64)
    last_weight = torch.randn(batch, dim, inputs["A"].shape[1], generator=g, dtype=torch.float64)
    oracle = run("reference", inputs, softplus, last_state, out_weight, last_weight, dtype=torch.float64)
    same_precision = run("reference", inputs, softplus, last_state, out_weight, last_weight)
    out, last, grads = run(backend, inputs, softplus, last_state, out_weight, last_weight)
    assert out.dtype == inputs["u"].dtype
    assert all(grads[k].dtype == inputs[k].dtype for k in grads)  # each gradient in its input's dtype
    assert_close_to_oracle(backend, named_results(out, last, grads), named_results(*oracle),
                           named_results(*same_precision), rtol)


shapes = st.fixed_dictionaries({
    "batch": st.integers(1, 3), "dim": st.integers(1, 6), "L": st.sampled_from([1, 2, 5, 16, 33, 64, 65]),
    "N": st.sampled_from([1, 3, 8, 16]), "delta_scale": st.sampled_from([0.1, 1.0, 8.0]),
    "softplus": st.booleans(), "with_D": st.booleans(), "with_z": st.booleans(), "with_bias": st.booleans(),
    "last_state": st.booleans(), "seed": st.integers(0, 2**16),
})


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=shapes)
# found by hypothesis: one channel, gradients that are small differences of large terms
@example(case={"batch": 3, "dim": 1, "L": 33, "N": 1, "delta_scale": 8.0, "softplus": True, "with_D": True,
               "with_z": True, "with_bias": True, "last_state": False, "seed": 61503})
@example(case={"batch": 1, "dim": 1, "L": 16, "N": 1, "delta_scale": 0.1, "softplus": True, "with_D": True,
               "with_z": True, "with_bias": True, "last_state": True, "seed": 0})
def test_float32_matches_reference_in_outputs_and_all_gradients(backend, case):
    case = dict(case)
    last_state, softplus = case.pop("last_state"), case["softplus"]
    inputs = make_inputs(case.pop("batch"), case.pop("dim"), case.pop("L"), case.pop("N"), **case)
    assert_matches(backend, inputs, softplus, last_state, RTOL[backend.split(":")[0]])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10, deadline=None)
@given(case=shapes)
def test_bfloat16_inputs_match_reference_within_bf16_rounding(backend, case):
    case = dict(case)
    last_state, softplus = case.pop("last_state"), case["softplus"]
    case["delta_scale"] = min(case["delta_scale"], 1.0)
    inputs = make_inputs(case.pop("batch"), case.pop("dim"), case.pop("L"), case.pop("N"), dtype=torch.bfloat16, **case)
    assert_matches(backend, inputs, softplus, last_state, 2e-2)


@pytest.mark.parametrize("L,N", [(1, 1), (7, 4), (9, 16)])
@pytest.mark.parametrize("backend", ["reference", "chunked", FUSED[0]])  # float64 runs the scalar loops on any ISA
def test_gradcheck_float64(backend, L, N):
    inputs = make_inputs(1, 2, L, N, dtype=torch.float64, delta_scale=0.5)
    leaves = [inputs[k].clone().requires_grad_() for k in NAMES]

    def fn(*tensors):
        return selective_scan(*tensors, delta_softplus=True, return_last_state=True, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["cpu", "cpu:avx2", "cpu:scalar"])
@pytest.mark.requires_fused_scan
def test_cpu_kernel_at_224px_length_matches_reference(isa):
    # 197 tokens (224 px, patch 16): the lane kernels' scratch spills out of L1; every instruction set
    assert_matches(isa, make_inputs(2, 40, 197, 16, delta_scale=1.0), True, True, RTOL["cpu"])


@pytest.mark.slow
@pytest.mark.requires_fused_scan
def test_cpu_kernel_on_the_bench_shape_matches_reference():
    # the shape the student runs (65 tokens, N = 16, many channels: every thread's share of the work)
    inputs = make_inputs(4, 256, 65, 16, delta_scale=1.0)
    assert_matches("cpu", inputs, True, True, RTOL["cpu"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_path_equals_autograd_path(backend):
    inputs = make_inputs(2, 5, 13, 16)
    args = [inputs[k] for k in NAMES]
    with isa_of(backend), torch.inference_mode():
        fast, fast_last = selective_scan(*args, delta_softplus=True, return_last_state=True,
                                         backend=backend.split(":")[0])
    leaves = [a.clone().requires_grad_() for a in args]
    with isa_of(backend):
        slow, slow_last = selective_scan(*leaves, delta_softplus=True, return_last_state=True,
                                         backend=backend.split(":")[0])
    assert torch.equal(fast, slow.detach()) and torch.equal(fast_last, slow_last.detach())
    assert slow.grad_fn is not None and fast.grad_fn is None


@pytest.mark.requires_fused_scan
def test_instruction_set_is_the_best_the_cpu_has_and_can_be_forced(monkeypatch):
    module = scan_ext.cpu_extension()
    supported = list(module.supported_isas())
    assert supported[-1] == "scalar" and scan.kernel_isa() == supported[0]  # auto: the best, scalar always there
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    compiled = ["avx512", "avx2", "scalar"] if x86 and not scan_build.no_simd() else ["scalar"]
    assert list(module.compiled_isas()) == compiled
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512f " in flags and " avx512dq " in flags and "avx512" in compiled:
        assert supported[0] == "avx512"
    if compiled == ["scalar"]:
        with pytest.raises(DmclipError, match="this build of the fused scan has no avx2 kernels"):
            scan.set_kernel_isa("avx2")
    with scan.forced_isa("scalar"):
        assert scan.kernel_isa() == "scalar"
    assert scan.kernel_isa() == supported[0]  # put back
    with pytest.raises(DmclipError, match="did you mean"):
        scan.set_kernel_isa("avx521")
    missing = [isa for isa in compiled if isa not in supported]
    if missing:
        with pytest.raises(DmclipError, match=f"cannot run the {missing[0]}"):
            scan.set_kernel_isa(missing[0])
    # the environment variable, read once when the extension is first used
    monkeypatch.setitem(scan_ext._isa_env, "applied", False)
    monkeypatch.setenv("DMCLIP_SCAN_ISA", "sclar")
    with pytest.raises(DmclipError, match="DMCLIP_SCAN_ISA=sclar"):
        scan.kernel_isa()
    monkeypatch.setitem(scan_ext._isa_env, "applied", False)
    monkeypatch.setenv("DMCLIP_SCAN_ISA", "scalar")
    try:
        assert scan.kernel_isa() == "scalar"
    finally:
        scan.set_kernel_isa("auto")


def test_the_build_runs_on_any_x86_64():
    # the vector kernels are picked at run time; a CPU-specific flag would make the .so crash on older CPUs
    assert not [f for f in scan_build.compile_flags() if f.startswith(("-mavx", "-mfma", "-march", "-mtune"))]
    assert {p.name for p in scan_build.sources()} >= {"selective_scan.cpp", "scan_isa.h", "scan_lanes.h"}


def test_each_build_variant_has_its_own_cache_key(monkeypatch):
    # OpenMP only where the compiler takes it; with or without, and without the vector kernels, are three builds
    monkeypatch.delenv("DMCLIP_SCAN_NO_SIMD", raising=False)
    assert "-fopenmp" in scan_build.compile_flags(openmp=True)
    assert "-fopenmp" not in scan_build.compile_flags(openmp=False)
    assert not scan_build.compiler_takes_openmp("false")  # a compiler that fails every probe
    plain = scan_build.build_key(scan_build.compile_flags(openmp=True))
    assert scan_build.build_key(scan_build.compile_flags(openmp=False)) != plain
    monkeypatch.setenv("DMCLIP_SCAN_NO_SIMD", "1")
    assert "-DDMCLIP_SCAN_NO_SIMD=1" in scan_build.compile_flags(openmp=True)
    assert scan_build.build_key(scan_build.compile_flags(openmp=True)) != plain


@pytest.mark.build
@pytest.mark.skipif(scan_build.compiler() is None, reason="no C++ compiler to build the variant with")
def test_the_build_without_vector_instructions_passes_the_scan_tests(tmp_path):
    # the kernels every CPU other than x86-64 runs (portable vectors and scalar loops only), built here into a
    # temporary cache and held to the same oracle by the fused-kernel tests of this file and the thread matrix
    env = {**os.environ, "DMCLIP_SCAN_NO_SIMD": "1", "DMCLIP_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    built = subprocess.run([sys.executable, "-m", "dmclip.models.scan_build"], env=env, capture_output=True,
                           text=True, timeout=900, cwd=REPO)
    assert built.returncode == 0 and "the scalar kernels on this CPU" in built.stdout, built.stdout + built.stderr
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                            "-n", "0", "-m", "not slow", "-k", "cpu or fused or instruction_set",
                            "tests/test_scan.py", "tests/test_threads.py"],
                           env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    summary = tests.stdout.strip().splitlines()[-1]
    assert tests.returncode == 0 and " passed" in summary and " failed" not in summary, tests.stdout[-3000:]


def test_reference_is_the_written_out_recurrence():
    # the oracle itself, against the equations in the module docstring, one step at a time in float64
    i = make_inputs(1, 2, 4, 3, dtype=torch.float64)
    out, last = selective_scan(*[i[k] for k in NAMES], delta_softplus=True, return_last_state=True,
                               backend="reference")
    x = torch.zeros(2, 3, dtype=torch.float64)
    for t in range(4):
        dt = torch.nn.functional.softplus(i["delta"][0, :, t] + i["delta_bias"])  # (dim,)
        x = torch.exp(dt[:, None] * i["A"]) * x + dt[:, None] * i["B"][0, :, t] * i["u"][0, :, t, None]
        y = (x * i["C"][0, :, t]).sum(-1) + i["D"] * i["u"][0, :, t]
        expected = y * torch.nn.functional.silu(i["z"][0, :, t])
        torch.testing.assert_close(out[0, :, t], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last[0], x, rtol=1e-12, atol=1e-12)


def test_auto_falls_back_to_chunked_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(scan_ext, "cpu_extension", lambda: None)
    monkeypatch.setattr(scan, "_warned", set())
    inputs = make_inputs(1, 2, 5, 4)
    with caplog.at_level(logging.WARNING, logger="dmclip.models.scan"):
        for _ in range(3):
            out = selective_scan(*[inputs[k] for k in NAMES], delta_softplus=True)
    assert scan.resolve_backend("auto", inputs["u"]) == "chunked"
    assert len([r for r in caplog.records if "chunked" in r.getMessage()]) == 1
    ref = selective_scan(*[inputs[k] for k in NAMES], delta_softplus=True, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(DmclipError, match="could not be built"):
        scan.resolve_backend("cpu", inputs["u"])


def test_failed_build_is_one_log_line_not_a_crash(monkeypatch, caplog):
    def broken_build(verbose=False):
        raise RuntimeError("Error building extension 'x'\nfoo.cpp:1:1: error: no compiler here\nninja: build stopped")

    monkeypatch.setattr(scan_build, "build", broken_build)
    monkeypatch.setattr(scan_build, "_state", {"tried": False, "module": None, "error": None, "fix": None})
    monkeypatch.delenv("DMCLIP_NO_EXTENSION", raising=False)  # it would stop the loader before the build
    with caplog.at_level(logging.WARNING, logger="dmclip.models.scan_build"):
        assert scan_build.load_extension() is None
        assert scan_build.load_extension() is None
    assert len(caplog.records) == 1 and "no compiler here" in caplog.records[0].getMessage()
    assert "Fix: run `python -m dmclip.models.scan_build --verbose`" in caplog.records[0].getMessage()


def test_bad_shapes_and_backend_names_are_user_errors():
    i = make_inputs(2, 3, 5, 4)
    args = [i[k] for k in NAMES]
    with pytest.raises(DmclipError, match="B must be"):
        selective_scan(args[0], args[1], args[2], args[3].transpose(1, 2), args[4])
    with pytest.raises(DmclipError, match="did you mean"):
        selective_scan(*args, backend="chunkd")
    with pytest.raises(DmclipError, match="CUDA tensors"):
        selective_scan(*args, backend="cuda")


def test_flop_counter_counts_every_scan_call():
    i = make_inputs(2, 3, 5, 4)
    with count_scan_flops() as counter:
        for _ in range(2):
            selective_scan(*[i[k] for k in NAMES], backend="chunked")
    assert counter.calls == 2
    assert counter.total == 2 * scan_flops(2, 3, 5, 4) == 2 * 2 * 3 * 5 * (7 * 4 + 11)
    selective_scan(*[i[k] for k in NAMES], backend="chunked")  # outside the context: not counted
    assert counter.calls == 2


def test_linear_scan_is_stable_when_decays_underflow():
    # decays of exp(-200) per step: a log-space cumsum/division scheme would overflow; the chunked scan must not
    a = torch.full((1, 50, 2), torch.exp(torch.tensor(-200.0)).item())
    b = torch.randn(1, 50, 2)
    x = scan_ref.linear_scan(a, b)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x, b, rtol=1e-6, atol=1e-30)


# ------------------------------------------------------------------- the fused bidirectional mixer (cpu)

MIXER = ("xz", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A_log", "D")


def make_mixer_inputs(batch, L, E, N, R, K, *, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    tensors = [r(batch, L, 2 * E), r(2, E, K) * 0.5, r(2, E) * 0.1, r(2, R + 2 * N, E) * 0.3, r(2, E, R) * 0.5,
               r(2, E) * 0.5 - 1, torch.log(torch.rand(2, E, N, generator=g, dtype=torch.float64) * 4 + 0.5), r(2, E)]
    return [t.to(dtype) for t in tensors]


mixer_shapes = st.fixed_dictionaries({
    "batch": st.integers(1, 3), "L": st.sampled_from([1, 2, 3, 5, 16, 33, 65]), "E": st.sampled_from([1, 5, 8, 13, 24]),
    "N": st.sampled_from([1, 3, 8, 16]), "R": st.integers(1, 4), "K": st.sampled_from([1, 2, 4]),
    "seed": st.integers(0, 2**16),
})


@pytest.mark.parametrize("isa", FUSED)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mixer_shapes)
def test_fused_mixer_matches_the_op_by_op_reference_in_outputs_and_all_gradients(isa, case):
    # oracle: conv1d / x_proj / dt_proj / flips around the reference scan, in float64; the fused kernel in
    # float32 to 1e-5 relative per tensor, cancellation-aware as above (channel tails: E not a multiple of 8; L shorter than the conv)
    inputs = make_mixer_inputs(**case)
    weight, oracle, same_precision = mixer_oracle(inputs, case["seed"])
    with isa_of(isa):
        out, results = run_fused_mixer(inputs, weight)
    assert_close_to_oracle("fused mixer", results, oracle, same_precision, 1e-5)
    with isa_of(isa), torch.inference_mode():  # the inference path (no autograd node): the same output bit for bit
        assert torch.equal(mixer.bidirectional_mixer(*[t.detach().float() for t in inputs]), out.detach())


def mixer_results(out, grads):
    return [("out", out)] + [(f"d{k}", g) for k, g in zip(MIXER, grads)]


def mixer_oracle(inputs, seed):
    """``(weight, oracle, same_precision)``: a random projection of the output, and the output and gradients of
    its sum through the op-by-op reference in float64 and in float32."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref = mixer.bidirectional_mixer_reference(*leaves, backend="reference")
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * weight).sum(), leaves)
    same_leaves = [t.detach().float().requires_grad_() for t in inputs]
    same = mixer.bidirectional_mixer_reference(*same_leaves, backend="reference")
    same_grads = torch.autograd.grad((same.double() * weight).sum(), same_leaves)
    return weight, mixer_results(ref, ref_grads), mixer_results(same, same_grads)


def run_fused_mixer(inputs, weight):
    """The fused mixer in float32 on ``inputs``: ``(out, [(name, tensor), ...])`` for the output and gradients."""
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    out = mixer.bidirectional_mixer(*leaves)
    grads = torch.autograd.grad((out.double() * weight).sum(), leaves)
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    return out, mixer_results(out, grads)


@pytest.mark.requires_fused_scan
@pytest.mark.parametrize("shape", [(1, 1, 3, 1, 1, 4), (2, 7, 10, 4, 2, 4), (1, 9, 8, 16, 3, 2)])
def test_fused_mixer_gradcheck_float64(shape):
    leaves = [t.requires_grad_() for t in make_mixer_inputs(*shape)]
    assert torch.autograd.gradcheck(mixer.bidirectional_mixer, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.requires_fused_scan
def test_fused_mixer_counts_both_scans():
    inputs = make_mixer_inputs(2, 5, 8, 4, 2, 4, dtype=torch.float32)
    with count_scan_flops() as counter:
        mixer.bidirectional_mixer(*inputs)
    assert counter.total == 2 * scan_flops(2, 8, 5, 4)

"""FLOPs of selective scans: every backend counts the scan exactly once, by its analytic count.

``dmclip eval latency`` adds ``count_scan_flops`` (analytic) to ``FlopCounterMode``'s total; the python
backends' inner einsums/matmuls must not reach FlopCounterMode (they used to: ~6 % too many FLOPs on
``reference``/``chunked``), and the fused ``cpu`` mixer must not hide its conv1d/dt_proj from it.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dmclip.metrics.latency import count_flops
from dmclip.models import mixer
from dmclip.models.mamba import VisionMamba
from dmclip.models.scan import scan_flops, selective_scan

# every backend is collected everywhere; the fused one skips, saying why, where its kernel did not build
BACKENDS = ["reference", "chunked", pytest.param("cpu", marks=pytest.mark.requires_fused_scan)]

# mamba-tiny-test's shape: 16 patches + the class token
TINY = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "d_state": 8, "embed_dim": 32}


def tiny_mamba(backend: str) -> VisionMamba:
    torch.manual_seed(0)
    return VisionMamba(**TINY, scan_backend=backend).eval()


def scan_inputs(batch=2, dim=6, L=7, N=4, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(batch, dim, L, generator=g), torch.randn(batch, dim, L, generator=g),
               -torch.rand(dim, N, generator=g) - 0.1, torch.randn(batch, N, L, generator=g),
               torch.randn(batch, N, L, generator=g), torch.randn(dim, generator=g),
               torch.randn(batch, dim, L, generator=g), torch.randn(dim, generator=g)]
    return [t.requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mamba_flops_are_the_same_on_every_backend_and_count_the_scan_once(backend, monkeypatch):
    # one expected count for every backend (what the counter sees around the scans + the analytic scans),
    # so the backends agree with each other by agreeing with it
    x = torch.rand(1, 3, TINY["image_size"], TINY["image_size"])
    L = (TINY["image_size"] // TINY["patch_size"]) ** 2 + 1
    analytic = TINY["depth"] * 2 * scan_flops(1, 2 * TINY["width"], L, TINY["d_state"], True, True)
    model = tiny_mamba(backend)
    measured = count_flops(lambda: model(x))
    # the same model with every scan replaced by a no-op: what FlopCounterMode sees around the scans
    monkeypatch.setattr(mixer, "selective_scan", lambda u, *args, **kwargs: torch.zeros_like(u))
    reference = tiny_mamba("reference")
    without_scan = count_flops(lambda: reference(x))
    assert without_scan["scan"] == 0 and without_scan["counted"] > 0
    assert measured == {"flops": without_scan["counted"] + analytic, "counted": without_scan["counted"],
                        "scan": analytic}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_scan_counts_nothing_to_flop_counter_mode_and_keeps_the_counts_around_it(backend, requires_grad):
    inputs = scan_inputs(requires_grad=requires_grad)
    w = torch.randn(6, 6)
    with torch.set_grad_enabled(requires_grad), FlopCounterMode(display=False) as counter:
        inputs[0].transpose(1, 2) @ w  # a counted (2, 7, 6) x (6, 6) matmul on each side of the scan
        out = selective_scan(*inputs, delta_softplus=True, backend=backend)
        out.transpose(1, 2) @ w
    assert counter.get_total_flops() == 2 * (2 * 2 * 7 * 6 * 6)
    # the scan's result and gradients are those of an uncounted call
    plain = selective_scan(*inputs, delta_softplus=True, backend=backend)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    if requires_grad:
        grads = torch.autograd.grad(out.sum(), inputs)
        plain_grads = torch.autograd.grad(plain.sum(), inputs)
        for g, p in zip(grads, plain_grads):
            torch.testing.assert_close(g, p, rtol=0, atol=0)
    total = count_flops(lambda: selective_scan(*inputs, delta_softplus=True, backend=backend))
    assert total == {"flops": scan_flops(2, 6, 7, 4), "counted": 0, "scan": scan_flops(2, 6, 7, 4)}


@pytest.mark.requires_fused_scan
def test_fused_mixer_counts_the_same_flops_as_the_op_by_op_mixer():
    g = torch.Generator().manual_seed(0)
    batch, L, E, N, R, K = 2, 9, 8, 4, 2, 4
    inputs = [torch.randn(batch, L, 2 * E, generator=g), torch.randn(2, E, K, generator=g),
              torch.randn(2, E, generator=g), torch.randn(2, R + 2 * N, E, generator=g) * 0.3,
              torch.randn(2, E, R, generator=g) * 0.5, torch.randn(2, E, generator=g) - 1,
              torch.log(torch.rand(2, E, N, generator=g) + 0.5), torch.randn(2, E, generator=g)]
    fused = count_flops(lambda: mixer.bidirectional_mixer(*inputs))
    for backend in ("reference", "chunked"):
        assert count_flops(lambda b=backend: mixer.bidirectional_mixer_reference(*inputs, backend=b)) == fused
    assert fused["scan"] == 2 * scan_flops(batch, E, L, N) and fused["counted"] > 0
    with FlopCounterMode(display=False):  # counted op by op, still the fused kernel's result
        counted_out = mixer.bidirectional_mixer(*inputs)
    torch.testing.assert_close(counted_out, mixer.bidirectional_mixer(*inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.requires_fused_scan
def test_fused_block_inference_gives_the_same_features_while_counted():
    model = tiny_mamba("cpu")
    x = torch.rand(2, 3, TINY["image_size"], TINY["image_size"])
    with torch.inference_mode():
        plain = model(x)
        with FlopCounterMode(display=False):
            counted = model(x)
    torch.testing.assert_close(counted, plain, rtol=1e-5, atol=1e-6)

"""The Vision-Mamba student: shapes, the middle class token, a backward branch that really runs backwards,
backends that agree end to end, rebuild from ``arch``, and every registered student's tiny variant."""

from __future__ import annotations

import pytest
import torch

from dmclip.models.base import build_model
from dmclip.models.mamba import VisionMamba
from dmclip.registry import students

TINY = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "d_state": 8, "embed_dim": 24}


def tiny_model(**overrides) -> VisionMamba:
    torch.manual_seed(0)
    return VisionMamba(**{**TINY, **overrides}).eval()


def test_output_shapes_and_uint8_input():
    model = tiny_model()
    images = torch.rand(3, 3, 32, 32)
    assert model(images).shape == (3, 24)
    assert model.forward_tokens(images).shape == (3, 16, 32)
    as_bytes = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(model(as_bytes), model(as_bytes.float() / 255), rtol=0, atol=0)
    assert (model.image_size, model.width, model.embed_dim) == (32, 32, 24)


def test_class_token_sits_in_the_middle():
    model = tiny_model()
    assert model.cls_position == 8  # 16 patches: 8 before, 8 after
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model.forward_tokens(torch.rand(1, 3, 32, 32))
    x = seen["x"][0] - model.pos_embed[0]  # tokens entering block 0, position embedding removed
    torch.testing.assert_close(x[8], model.cls_token[0, 0])
    assert not torch.allclose(x[7], model.cls_token[0, 0]) and not torch.allclose(x[9], model.cls_token[0, 0])


# every backend is collected everywhere; the fused one skips, saying why, where its kernel did not build
CPU = pytest.param("cpu", marks=pytest.mark.requires_fused_scan)


@pytest.mark.parametrize("backend", ["reference", CPU])
def test_backward_branch_scans_from_the_end(backend):
    # forward direction: output at t depends only on inputs <= t; backward direction: only on inputs >= t.
    # Silence one direction exactly (C rows of its x_proj and its D set to 0: y = <C, x> + D u = 0), perturb
    # the LAST token: with only the forward direction the first output must not move, with only the backward
    # one it must (and the last output must not move when the FIRST token changes). Fused and op-by-op paths.
    torch.manual_seed(0)
    mixer = VisionMamba(**TINY, scan_backend=backend).blocks[0].mixer
    with torch.no_grad():  # dt ~ 1 (init gives 0.001..0.1): a token's influence is then clearly visible
        mixer.dt_proj_bias.fill_(0.5)
    x = torch.randn(1, 4, 32)
    x_last = x.clone()
    x_last[:, -1] += 1.0
    x_first = x.clone()
    x_first[:, 0] += 1.0
    saved = {k: v.clone() for k, v in mixer.state_dict().items()}

    def only(direction):
        other = 1 - direction
        mixer.load_state_dict(saved)
        with torch.no_grad():
            mixer.x_proj_weight[other, mixer.dt_rank + mixer.d_state:] = 0
            mixer.D[other] = 0
            return mixer(x), mixer(x_last), mixer(x_first)

    def moved(a, b):
        return (a - b).abs().max() > 1e-2 * b.abs().max()

    base, last_changed, first_changed = only(0)
    torch.testing.assert_close(last_changed[:, 0], base[:, 0])  # causal left-to-right
    assert moved(first_changed[:, -1], base[:, -1])
    base, last_changed, first_changed = only(1)
    torch.testing.assert_close(first_changed[:, -1], base[:, -1])  # causal right-to-left
    assert moved(last_changed[:, 0], base[:, 0])


@pytest.mark.requires_fused_scan
def test_fused_inference_block_equals_the_op_by_op_model():
    # eval + no grad takes the one-call block kernel (norm, in_proj, mixer, out_proj, residual)
    model = tiny_model(scan_backend="cpu")
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        fused = model(images)
        fused_tokens = model.forward_tokens(images)
    with torch.enable_grad():
        slow = model(images)  # parameters require grad: the autograd path
    model.set_scan_backend("reference")
    with torch.no_grad():
        ref = model(images)
    torch.testing.assert_close(fused, slow.detach(), rtol=1e-5, atol=1e-6)
    assert (fused - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert fused_tokens.shape == (3, 16, 32)


@pytest.mark.requires_fused_scan
@pytest.mark.parametrize("batch,threads", [(1, 2), (8, 2), (256, 1), (256, 2)])
def test_fused_stack_equals_block_by_block_inference(batch, threads):
    # eval + no grad runs all blocks in one C++ call; at batch >= 2 x threads each thread takes whole batch
    # rows through every block (batch 8 at 2 threads), below that block after block; rows go in chunks of
    # about 1 MB of in_proj output (120 rows of this model: batch 256 is chunks of 120, 120, 16 on one thread
    # and 120, 8 per thread on two). Same features every way as block-by-block calls (a forward hook forces
    # those: hooks must see every block) and the reference.
    model = tiny_model(scan_backend="cpu")
    images = torch.rand(batch, 3, 32, 32)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            fused = model(images)
            seen = []
            handle = model.blocks[1].register_forward_hook(lambda m, args, out: seen.append(out.shape))
            by_block = model(images)
            handle.remove()
    finally:
        torch.set_num_threads(saved)
    assert seen == [(batch, 17, 32)]  # the hook ran: that call went block by block
    torch.testing.assert_close(fused, by_block, rtol=1e-5, atol=1e-6)
    model.set_scan_backend("reference")
    with torch.no_grad():
        ref = model(images)
    assert (fused - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_weights_saved_with_one_module_per_direction_still_load():
    # the layout before the directions were stacked: {forward,backward}_branch.{conv1d,x_proj,dt_proj,A_log,D}
    model = tiny_model()
    old = {}
    for key, value in model.state_dict().items():
        prefix, _, name = key.rpartition(".")
        if not prefix.endswith("mixer") or name in ("in_proj", "out_proj"):
            old[key] = value
            continue
        names = {"conv_weight": "conv1d.weight", "conv_bias": "conv1d.bias", "x_proj_weight": "x_proj.weight",
                 "dt_proj_weight": "dt_proj.weight", "dt_proj_bias": "dt_proj.bias", "A_log": "A_log", "D": "D"}
        for r, branch in enumerate(("forward", "backward")):
            part = value[r].unsqueeze(1) if name == "conv_weight" else value[r]
            old[f"{prefix}.{branch}_branch.{names[name]}"] = part.clone()
    rebuilt = tiny_model(drop_path=0.0)
    with torch.no_grad():
        for p in rebuilt.parameters():
            p.zero_()
    rebuilt.load_state_dict(old)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(images), model(images))


@pytest.mark.parametrize("backend", [CPU, "chunked"])
def test_backend_equals_reference_end_to_end(backend):
    model = tiny_model(scan_backend="reference").train()
    images = torch.rand(2, 3, 32, 32)
    ref = model(images)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    model.set_scan_backend(backend)
    out = model(images)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    # relative to each tensor's largest entry: the scan's 1e-5 / 1e-4 plus float32 layers around it
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert (g - r).abs().max() <= 1e-3 * r.abs().max() + 1e-12, name


def test_build_model_rebuilds_from_arch():
    model = tiny_model(drop_path=0.1)
    rebuilt = build_model(model.arch)
    assert isinstance(rebuilt, VisionMamba) and rebuilt.arch == model.arch
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    rebuilt.load_state_dict(model.state_dict())
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(images), model(images))


def test_mamba_initialisation_follows_mamba_ssm():
    mixer = tiny_model().blocks[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_proj_bias)  # (2 directions, d_inner)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6  # dt in [dt_min, dt_max]
    torch.testing.assert_close(torch.exp(mixer.A_log), torch.arange(1.0, 9.0).repeat(2, 64, 1))
    assert not torch.equal(mixer.dt_proj_bias[0], mixer.dt_proj_bias[1])  # each direction drew its own


@pytest.mark.parametrize("name", students.names("mamba*"))
def test_every_registered_student_tiny_variant_trains_a_step(name):
    entry = students.entry(name)
    model = students.get(name, **entry.tiny)
    images = torch.rand(2, 3, model.image_size, model.image_size)
    features = model(images)
    assert features.shape == (2, model.embed_dim)
    features.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


STACK_UNDER_A_DISPATCH_MODE = """
import torch
from dmclip.metrics.latency import peak_tensor_bytes
from dmclip.models.mamba import VisionMamba
torch.set_num_threads(2)
torch.manual_seed(0)
model = VisionMamba(image_size=32, patch_size=8, width=32, depth=2, embed_dim=16, scan_backend="cpu").eval()
images = torch.rand(8, 3, 32, 32)
with torch.no_grad():
    plain = model(images)
    peak = peak_tensor_bytes(lambda: model(images), exclude=[model, images])
    again = model(images)
print(peak, float((plain - again).abs().max()))
"""


@pytest.mark.requires_fused_scan
def test_stack_inference_under_a_dispatch_mode_finishes_and_is_measured():
    # `dmclip eval latency` measures peak memory under a TorchDispatchMode. The stack's worker threads used to
    # dispatch their ops back into that Python mode while the caller held the GIL: batch 8 on 2 threads hung
    # forever. Now the stack goes block by block under a mode (the mode sees every op) and releases the GIL.
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", STACK_UNDER_A_DISPATCH_MODE], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    peak, difference = result.stdout.split()
    assert int(peak) > 8 * 17 * 64 * 4  # at least one (batch, L, 2E) float32 activation was seen
    assert float(difference) == 0.0


@pytest.mark.requires_fused_scan
@pytest.mark.parametrize("width", [64, 20])  # 20: a tail after the full vectors (AVX-512 16 + 4, AVX2 8 + 8 + 4)
def test_fused_rms_norm_equals_torch_forward_and_backward(width):
    # the training path's norm (every block's and the final one): a wrong scale or a gradient term off shows as a
    # student that trains differently on the cpu backend than on the others
    from dmclip.models.mixer import rms_norm

    g = torch.Generator().manual_seed(width)
    x = (torch.randn(3, 7, width, generator=g, dtype=torch.float64) * 3).requires_grad_()
    weight = torch.randn(width, generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(3, 7, width, generator=g, dtype=torch.float64)
    expected = torch.nn.functional.rms_norm(x, (width,), weight, 1e-5)
    expected_grads = torch.autograd.grad(expected, (x, weight), dy)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x[:1, :3], weight))
    x32, weight32 = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    out = rms_norm(x32, weight32, 1e-5)
    grads = torch.autograd.grad(out, (x32, weight32), dy.float())
    for got, want in zip((out, *grads), (expected, *expected_grads)):
        assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()

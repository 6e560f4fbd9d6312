"""Selective scan and the Mamba student on the CPU (issue 11).

1. Scan fwd+bwd at (B=8, L=65, D=384 -> 2D = 768 channels, N=16, softplus, D skip, z gate): the fused
   ``cpu`` kernel vs ``reference`` (mamba-ssm's selective_scan_ref), ``chunked`` and mambapy's Blelloch pscan,
   timed in alternation in one process; ratios are baseline time / cpu time.
2. Vision-Mamba encoder (mamba-ti: width 192, depth 24, 224 px, 197 tokens) vs a ViT of the same width
   and depth (inference, torch.inference_mode), batch 1 and 64: ratio = ViT time / Mamba time (the goal,
   Mamba <= 1.0x ViT time, is ratio >= 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import format_seconds, interleaved, quick, repeats, row

SCAN_SHAPE = (8, 768, 65, 16)  # batch, 2 x width, tokens (64 patches + class), state


def _scan_inputs(batch, dim, L, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, dim, L, generator=g), "delta": torch.randn(batch, dim, L, generator=g) * 0.5,
        "A": -torch.rand(dim, N, generator=g) * 2 - 0.1, "B": torch.randn(batch, N, L, generator=g),
        "C": torch.randn(batch, N, L, generator=g), "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, L, generator=g), "delta_bias": torch.randn(dim, generator=g) * 0.3,
    }


def _mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    """The same computation through mambapy's pscan (its layout is (B, L, D, N))."""
    from mambapy.pscan import pscan

    dt = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # (B, L, dim)
    deltaA = torch.exp(dt.unsqueeze(-1) * A)  # (B, L, dim, N)
    BX = (dt * u.transpose(1, 2)).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)
    hs = pscan(deltaA, BX)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3)  # (B, L, dim)
    y = (y + D * u.transpose(1, 2)).transpose(1, 2)
    return y * F.silu(z)


def bench_scan() -> list[dict]:
    from dmclip.models.scan import available_backends, selective_scan

    inputs = _scan_inputs(*SCAN_SHAPE)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def fwd_bwd(fn):
        def step():
            leaves = [inputs[k].clone().requires_grad_() for k in names]
            fn(*leaves).sum().backward()
        return step

    contenders = {}
    backends = [b for b in ("cpu", "chunked", "reference") if b in available_backends()]
    for backend in backends:
        contenders[backend] = fwd_bwd(lambda *t, b=backend: selective_scan(*t, delta_softplus=True, backend=b))
    try:
        import mambapy.pscan  # noqa: F401

        contenders["mambapy pscan"] = fwd_bwd(_mambapy_scan)
    except ImportError:
        pass
    times = interleaved(contenders, repeats=repeats(7), warmup=1)
    batch, dim, L, N = SCAN_SHAPE
    shape = f"B={batch}, L={L}, D={dim // 2} (2D={dim}), N={N}"
    rows = []
    if "cpu" not in times:
        return [row(f"scan fwd+bwd ({shape})", format_seconds(times["chunked"]),
                    notes="the fused cpu kernel did not build here: no cpu row")]
    ours = times["cpu"]
    rows.append(row(f"scan fwd+bwd, fused cpu kernel ({shape})", format_seconds(ours),
                    notes=f"{torch.get_num_threads()} threads"))
    goals = {"reference": 10.0, "mambapy pscan": 8.0}
    for name, seconds in times.items():
        if name == "cpu":
            continue
        goal = goals.get(name)
        ratio = seconds / ours
        rows.append(row(f"scan fwd+bwd: cpu vs {name} ({shape})", format_seconds(seconds), baseline=name,
                        ratio=round(ratio, 2), goal=f">= {goal:.0f}x" if goal else "",
                        met=(ratio >= goal) if goal else None, notes="baseline time / cpu time, same run"))
    return rows


def bench_student(width=192, depth=24, image_size=224, patch_size=16) -> list[dict]:
    from dmclip.models.mamba import VisionMamba

    try:
        from dmclip.models.vit import VisionTransformer
    except ImportError:
        return [row("Mamba student vs ViT", "skipped", notes="dmclip.models.vit.VisionTransformer not available")]
    torch.manual_seed(0)
    mamba = VisionMamba(image_size=image_size, patch_size=patch_size, width=width, depth=depth, embed_dim=512).eval()
    vit = VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, depth=depth,
                            heads=max(1, width // 64), embed_dim=512).eval()
    tokens = (image_size // patch_size) ** 2 + 1
    rows = []
    for batch in (1, 64):
        images = torch.rand(batch, 3, image_size, image_size)

        def run(model, images=images):
            def step():
                with torch.inference_mode():
                    model(images)
            return step

        times = interleaved({"mamba": run(mamba), "vit": run(vit)}, repeats=repeats(3 if batch == 64 else 15),
                            warmup=1)
        ratio = times["vit"] / times["mamba"]  # the contract's baseline / ours: >= 1 means Mamba is not slower
        rows.append(row(f"Vision-Mamba (width {width}, depth {depth}, {tokens} tokens) inference, batch {batch}",
                        format_seconds(times["mamba"]), baseline=f"ViT same width/depth ({format_seconds(times['vit'])})",
                        ratio=round(ratio, 2), goal=">= 1.0x (Mamba time <= ViT time)", met=ratio >= 1.0,
                        notes=f"inference_mode; Mamba / ViT time = {1 / ratio:.2f}"))
    return rows


def main() -> list[dict]:
    rows = bench_scan()
    if quick():
        rows += bench_student(width=64, depth=2, image_size=64)
    else:
        rows += bench_student()
    for item in rows:
        print(f"| {item['benchmark']} | {item['value']} | {item['baseline']} | {item['ratio']} | {item['goal']} |")
    return rows


if __name__ == "__main__":
    main()

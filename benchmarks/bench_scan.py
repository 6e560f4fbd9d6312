"""Selective scan and the Mamba student on the CPU (issues 11 and 17).

1. Scan fwd+bwd at (B=8, L=65, D=384 -> 2D = 768 channels, N=16, softplus, D skip, z gate): the fused
   ``cpu`` kernel (goal <= 10 ms at 2 threads) vs ``reference`` (mamba-ssm's selective_scan_ref), ``chunked``,
   mambapy's Blelloch pscan and the kernel's own scalar fallback, timed in alternation in one process; the
   same against mambapy at L=197 (224 px images). Ratios are baseline time / cpu time.
2. The demo's student (mamba-nano: width 64, depth 4, 32 px, patch 4 -> 65 tokens) vs the demo teacher's
   image tower (ViT width 128, depth 4, 4 heads; goal: Mamba <= 0.5x its time, DM-CLIP's -49.6 %) and vs
   a ViT of the same width and depth (goal <= 1.0x), inference at batch 1 and 64; training fwd+bwd at
   batch 1 and 64 against both (goal vs the same-size ViT: Mamba <= 1.5x).
3. Vision-Mamba encoder (mamba-ti: width 192, depth 24, 224 px, 197 tokens) vs a ViT of the same width
   and depth (inference, torch.inference_mode), batch 1 and 64.
Every ratio is baseline time / Mamba time from one interleaved run (>= 1: Mamba is not slower).

``python -m benchmarks.bench_scan --profile`` prints where the time goes instead (see :func:`profile`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
    describe_calls,
    format_seconds,
    interleaved,
    interleaved_times,
    machine_state,
    observe_calls,
    quick,
    reference_loop_seconds,
    repeats,
    row,
    spread,
    wait_until_quiet,
)

SCAN_SHAPE = (8, 768, 65, 16)  # batch, 2 x width, tokens (64 patches + class), state
SCAN_SHAPE_224 = (8, 768, 197, 16)  # the same at 224 px, patch 16 (196 patches + class)
SCAN_GOAL_SECONDS = 3e-3
SPREAD_GOAL = 1.3  # max / min over the kernel row's repeats


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


NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _fwd_bwd(inputs, fn):
    def step():
        leaves = [inputs[k].clone().requires_grad_() for k in NAMES]
        fn(*leaves).sum().backward()
    return step


def _scalar_fallback(fn):
    from dmclip.models.scan import forced_isa

    def run(*tensors):
        with forced_isa("scalar"):
            return fn(*tensors)
    return run


def _scan_contenders(inputs, baselines):
    from dmclip.models.scan import available_backends, selective_scan

    contenders = {}
    for backend in [b for b in ("cpu", "chunked", "reference") if b in available_backends() and b in baselines]:
        contenders[backend] = _fwd_bwd(inputs, lambda *t, b=backend: selective_scan(*t, delta_softplus=True,
                                                                                   backend=b))
    if "cpu" in contenders and "cpu scalar fallback" in baselines:
        fused = lambda *t: selective_scan(*t, delta_softplus=True, backend="cpu")  # noqa: E731
        contenders["cpu scalar fallback"] = _fwd_bwd(inputs, _scalar_fallback(fused))
    try:
        import mambapy.pscan  # noqa: F401

        contenders["mambapy pscan"] = _fwd_bwd(inputs, _mambapy_scan)
    except ImportError:
        pass
    return contenders


def bench_scan() -> list[dict]:
    from dmclip.models.scan import kernel_isa

    rows = []
    goals = {"reference": 10.0, "mambapy pscan": 8.0}
    # the first row right after a heavy bench read 2x in full runs: let what the previous process left settle
    settled = wait_until_quiet(max_seconds=0 if quick() else 20)
    loop_before = reference_loop_seconds()
    for shape, baselines, reps in ((SCAN_SHAPE, ("cpu", "chunked", "reference", "cpu scalar fallback"), 9),
                                   (SCAN_SHAPE_224, ("cpu",), 5)):
        contenders = _scan_contenders(_scan_inputs(*shape), baselines)
        runs = interleaved_times(contenders, repeats=repeats(reps), warmup=1)
        times = {name: statistics.median(values) for name, values in runs.items()}
        batch, dim, L, N = shape
        label = f"B={batch}, L={L}, D={dim // 2} (2D={dim}), N={N}"
        if "cpu" not in times:
            return [row(f"scan fwd+bwd ({label})", format_seconds(times["chunked"]),
                        notes="the fused cpu kernel did not build here: no cpu row")]
        ours = times["cpu"]
        first = shape == SCAN_SHAPE
        rows.append(row(f"scan fwd+bwd, fused cpu kernel ({label})", format_seconds(ours),
                        goal=f"<= {SCAN_GOAL_SECONDS * 1e3:.0f} ms" if first else "",
                        met=ours <= SCAN_GOAL_SECONDS if first else None,
                        notes=f"median of {len(runs['cpu'])} interleaved repeats, min {format_seconds(min(runs['cpu']))}, "
                              f"max {format_seconds(max(runs['cpu']))}; {kernel_isa()} kernels (the best this CPU has)"))
        if first:
            rows.append(_spread_row(label, runs["cpu"], contenders["cpu"], loop_before, settled))
        for name, seconds in times.items():
            if name == "cpu":
                continue
            goal = goals.get(name)
            ratio = seconds / ours
            notes = "baseline time / cpu time, same run"
            if name == "cpu scalar fallback":
                notes += "; the plain loops DMCLIP_SCAN_ISA=scalar forces (CPUs without AVX2 run them)"
            rows.append(row(f"scan fwd+bwd: cpu vs {name} ({label})", format_seconds(seconds), baseline=name,
                            ratio=round(ratio, 2), goal=f">= {goal:.0f}x" if goal else "",
                            met=(ratio >= goal) if goal else None, notes=notes))
    return rows


def _spread_row(label: str, times: list[float], step, loop_before: float, settled: tuple[float, float]) -> dict:
    """The kernel row's spread over its repeats, and what the process did in 10 more calls right after them:
    whether both threads worked (CPU / wall, each thread's CPU), page faults and descheduling per call, what
    else the machine ran, a fixed Python loop's CPU time before the scan rows and now (a slower clock would
    show there), and how long the bench waited for the machine to go quiet before the scan rows."""
    observed = observe_calls(step, repeats(10))
    ratio = spread(times)
    return row(f"scan fwd+bwd, fused cpu kernel ({label}): spread over the repeats", f"{ratio:.2f}x (max / min)",
               goal=f"<= {SPREAD_GOAL}x", met=ratio <= SPREAD_GOAL,
               notes=f"{len(times)} repeats, {' '.join(format_seconds(t) for t in times)}; 10 calls after them: "
                     f"{describe_calls(observed)}; reference Python loop {format_seconds(loop_before)} CPU before "
                     f"the scan rows, {format_seconds(reference_loop_seconds())} after; waited {settled[0]:.1f} s for "
                     f"the machine to go quiet (other work {settled[1]:.0%} of the CPUs then); {machine_state()}")


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


DEMO_STUDENT = {"image_size": 32, "patch_size": 4, "width": 64, "depth": 4, "embed_dim": 128}
DEMO_TEACHER = {"image_size": 32, "patch_size": 4, "width": 128, "depth": 4, "heads": 4, "embed_dim": 128}
TRAIN_GOAL = 1.5  # training: Mamba time <= 1.5x the same-size ViT's


def bench_demo(batches=(1, 64), train_batches=(1, 64)) -> list[dict]:
    """mamba-nano (the demo student) vs the demo teacher's image tower and vs a same-size ViT."""
    from dmclip.models.mamba import VisionMamba
    from dmclip.models.vit import VisionTransformer

    torch.manual_seed(0)
    mamba = VisionMamba(**DEMO_STUDENT).eval()
    teacher = VisionTransformer(**DEMO_TEACHER).eval()
    same = VisionTransformer(**{**DEMO_TEACHER, "width": DEMO_STUDENT["width"], "heads": 2}).eval()
    baselines = {"demo teacher ViT (width 128, depth 4)": (teacher, 2.0), "ViT same width/depth (64, 4)": (same, 1.0)}
    rows = []
    for batch in batches:
        images = torch.rand(batch, 3, 32, 32)

        def infer(model, images=images):
            def step():
                with torch.inference_mode():
                    model(images)
            return step

        contenders = {"mamba": infer(mamba), **{name: infer(model) for name, (model, _) in baselines.items()}}
        times = interleaved(contenders, repeats=repeats(20 if batch == 1 else 7), warmup=2,
                            number=5 if batch == 1 else 1)
        for name, (_, goal) in baselines.items():
            ratio = times[name] / times["mamba"]
            rows.append(row(f"mamba-nano student inference, batch {batch}: vs {name}", format_seconds(times["mamba"]),
                            baseline=f"{name} ({format_seconds(times[name])})", ratio=round(ratio, 2),
                            goal=f"Mamba time <= {1 / goal:.1f}x (ratio >= {goal:.1f})", met=ratio >= goal,
                            notes=f"inference_mode, 65 tokens; Mamba / ViT time = {1 / ratio:.2f}"))

    def train_step(model, images):
        def step():
            model.zero_grad(set_to_none=True)
            model(images).square().mean().backward()
        return step

    for model in (mamba, teacher, same):
        model.train()
    for batch in train_batches:
        images = torch.rand(batch, 3, 32, 32)
        contenders = {"mamba": train_step(mamba, images),
                      **{name: train_step(model, images) for name, (model, _) in baselines.items()}}
        times = interleaved(contenders, repeats=repeats(15 if batch == 1 else 5), warmup=1)
        for name in baselines:
            ratio = times[name] / times["mamba"]
            same_size = name.startswith("ViT same")
            rows.append(row(f"mamba-nano student training fwd+bwd, batch {batch}: vs {name}",
                            format_seconds(times["mamba"]), baseline=f"{name} ({format_seconds(times[name])})",
                            ratio=round(ratio, 2), goal=f"Mamba time <= {TRAIN_GOAL}x (ratio >= {1 / TRAIN_GOAL:.2f})"
                            if same_size else "", met=ratio >= 1 / TRAIN_GOAL if same_size else None,
                            notes=f"Mamba / ViT time = {1 / ratio:.2f}" + ("" if same_size else "; no goal, recorded")))
    return rows


# op -> the part of the block it belongs to, for the profile's summary (first match wins)
PARTS = (("scan", ("dmclip::mixer_scan", "dmclip::scan", "_BiMixer")),
         ("projections (in/x/dt/out, head)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                                              "aten::linear", "aten::matmul")),
         ("conv + SiLU (depthwise conv1d, patch embedding)", ("dmclip::mixer_conv", "aten::conv", "aten::_conv",
                                                              "aten::mkldnn_convolution", "aten::convolution",
                                                              "aten::thnn_conv")),
         ("norms", ("dmclip::rmsnorm", "aten::rms_norm", "aten::_fused_rms_norm", "aten::pow", "aten::mean",
                    "aten::rsqrt")),
         ("layout copies (cat, copy, transpose, slice)", ("aten::cat", "aten::copy_", "aten::clone",
                                                          "aten::contiguous", "aten::transpose", "aten::slice",
                                                          "aten::narrow", "aten::select", "aten::expand")))


def _part(name: str) -> str:
    for part, prefixes in PARTS:
        if name.startswith(prefixes):
            return part
    return "other ops (elementwise, loss, allocation, autograd bookkeeping)"


def profile_step(step, calls: int) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """(wall seconds per call, seconds per call by part, top ops by self time) of ``step`` under torch.profiler.

    "Python and dispatch" is the wall time no op accounts for: interpreter, module calls, argument checks.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(2):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            step()
        wall = (time.perf_counter() - start) / calls
    parts: dict[str, float] = {}
    ops = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / calls
        parts[_part(event.key)] = parts.get(_part(event.key), 0.0) + seconds
        ops.append((event.key, seconds))
    parts["Python and dispatch (wall time outside every op)"] = max(0.0, wall - sum(s for _, s in ops))
    return wall, parts, sorted(ops, key=lambda item: -item[1])


def _demo_step(model, images, mode: str) -> None:
    """One inference call (eval, inference_mode) or one training fwd+bwd of ``model`` on ``images``."""
    if mode == "inference":
        model.eval()
        with torch.inference_mode():
            model(images)
    else:
        model.train()
        model.zero_grad(set_to_none=True)
        model(images).square().mean().backward()


def profile(batches=(1, 64), top: int = 6) -> str:
    """Markdown: where mamba-nano's inference and training step spend their time, by part and by op, at each
    batch size, beside the same-size ViT's wall time; then the fused scan at the bench shape split into its
    per-step part (layout, softplus, gate) and its per-state part (exp and recurrence), from N = 1 vs N = 16."""
    from dmclip.models.mamba import VisionMamba
    from dmclip.models.scan import kernel_isa
    from dmclip.models.vit import VisionTransformer

    torch.manual_seed(0)
    mamba = VisionMamba(**DEMO_STUDENT)
    vit = VisionTransformer(**{**DEMO_TEACHER, "width": DEMO_STUDENT["width"], "heads": 2})
    lines = [f"threads {torch.get_num_threads()}, {kernel_isa()} kernels", ""]
    for batch in batches:
        images = torch.rand(batch, 3, 32, 32)
        for mode in ("inference", "training"):
            def step(model, images=images, mode=mode):
                _demo_step(model, images, mode)
            calls = repeats(40 if batch == 1 else 5)
            wall, parts, ops = profile_step(lambda: step(mamba), calls)
            vit_wall, _, _ = profile_step(lambda: step(vit), calls)
            lines += [f"mamba-nano {mode}, batch {batch}: {format_seconds(wall)} per step under the profiler "
                      f"(same-size ViT: {format_seconds(vit_wall)}, Mamba / ViT {wall / vit_wall:.2f})", "",
                      "| part | share | per step |", "|---|---|---|"]
            for part, seconds in sorted(parts.items(), key=lambda item: -item[1]):
                lines.append(f"| {part} | {seconds / wall:.0%} | {format_seconds(seconds)} |")
            lines.append("| top ops: " + ", ".join(f"{name} {seconds / wall:.0%}" for name, seconds in ops[:top]) +
                         " | | |")
            lines.append("")
    lines += _profile_scan_kernel() + [""] + cpu_time_table()
    return "\n".join(lines)


def _cpu_seconds(fns: dict, repeats_: int, number: int = 1) -> dict[str, float]:
    """Median CPU seconds (this process, every thread) per call of each function, timed in alternation.

    On a machine other jobs keep busy, wall time mostly measures waiting; CPU time measures the work. At one
    thread it is what a quiet machine's wall time would be (less cache and frequency effects)."""
    names = list(fns)
    for name in names:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats_):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.process_time()
            for _ in range(number):
                fns[name]()
            times[name].append((time.process_time() - start) / number)
    return {name: statistics.median(values) for name, values in times.items()}


def cpu_time_table() -> list[str]:
    """Markdown: CPU time per call, interleaved, of the rows make bench times by wall clock (the goals' ratios)."""
    from dmclip.models.mamba import VisionMamba
    from dmclip.models.vit import VisionTransformer

    lines = ["CPU time per call (median, interleaved; goal ratios as in make bench's rows)", "",
             "| what | Mamba / kernel | baseline | ratio | goal |", "|---|---|---|---|---|"]
    for shape in (SCAN_SHAPE, SCAN_SHAPE_224):
        inputs = _scan_inputs(*shape)
        times = _cpu_seconds(_scan_contenders(inputs, ("cpu", "cpu scalar fallback")), repeats(5))
        for name in ("mambapy pscan", "cpu scalar fallback"):
            if name in times:
                goal = ">= 8x" if name == "mambapy pscan" else "-"
                lines.append(f"| scan fwd+bwd, L={shape[2]} | {format_seconds(times['cpu'])} | {name} "
                             f"{format_seconds(times[name])} | {times[name] / times['cpu']:.1f}x | {goal} |")
    torch.manual_seed(0)
    mamba = VisionMamba(**DEMO_STUDENT)
    vit = VisionTransformer(**{**DEMO_TEACHER, "width": DEMO_STUDENT["width"], "heads": 2})
    for mode, goal in (("inference", 1.0), ("training", TRAIN_GOAL)):
        for batch in (1, 64):
            images = torch.rand(batch, 3, 32, 32)

            def step(model, images=images, mode=mode):
                return lambda: _demo_step(model, images, mode)
            times = _cpu_seconds({"mamba": step(mamba), "vit": step(vit)}, repeats(9 if batch == 1 else 5),
                                 number=10 if batch == 1 else 1)
            lines.append(f"| mamba-nano {mode}, batch {batch} | {format_seconds(times['mamba'])} | same-size ViT "
                         f"{format_seconds(times['vit'])} | Mamba / ViT {times['mamba'] / times['vit']:.2f} | "
                         f"<= {goal} |")
    return lines


def batch1_paths() -> list[str]:
    """Markdown: mamba-nano batch-1 inference under no_grad, inference_mode and torch.compile, CPU time."""
    from dmclip.models.mamba import VisionMamba

    torch.manual_seed(0)
    model = VisionMamba(**DEMO_STUDENT).eval()
    images = torch.rand(1, 3, 32, 32)
    start = time.perf_counter()
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(images)  # the fused kernels are pybind calls: dynamo breaks the graph around them
    seconds = time.perf_counter() - start

    def under(context, fn):
        def run():
            with context():
                fn(images)
        return run
    times = _cpu_seconds({"no_grad": under(torch.no_grad, model), "inference_mode": under(torch.inference_mode, model),
                          "torch.compile, no_grad": under(torch.no_grad, compiled)}, repeats(15), number=20)
    return ["mamba-nano inference, batch 1: eager under two modes vs torch.compile "
            f"(compile and first call {seconds:.0f} s)", "", "| path | CPU time per call |", "|---|---|",
            *[f"| {name} | {format_seconds(t)} |" for name, t in times.items()]]


def _profile_scan_kernel() -> list[str]:
    from dmclip.models.scan import selective_scan

    batch, dim, L, _ = SCAN_SHAPE
    times = {}
    for N in (1, 16):
        inputs = _scan_inputs(batch, dim, L, N)
        leaves = [inputs[k].clone().requires_grad_() for k in NAMES]
        out = selective_scan(*leaves, delta_softplus=True, backend="cpu")
        grad = torch.randn_like(out)

        def forward(inputs=inputs):
            with torch.no_grad():
                selective_scan(*[inputs[k] for k in NAMES], delta_softplus=True, backend="cpu")

        def backward(out=out, grad=grad, leaves=leaves):
            torch.autograd.grad(out, leaves, grad, retain_graph=True)

        for name, fn in (("forward", forward), ("backward", backward)):
            times[name, N] = min(profile_step(fn, repeats(10))[0] for _ in range(3))
    lines = [f"fused scan at B={batch}, L={L}, 2D={dim}: N = 1 vs N = 16 (per-step work vs per-state work)", "",
             "| pass | N = 1 | N = 16 | per-step part (layout, softplus, gate, dispatch) | per-state part (exp, "
             "recurrence), N = 16 |", "|---|---|---|---|---|"]
    for name in ("forward", "backward"):
        one, sixteen = times[name, 1], times[name, 16]
        per_state = (sixteen - one) / 15
        fixed = one - per_state
        lines.append(f"| {name} | {format_seconds(one)} | {format_seconds(sixteen)} | {fixed / sixteen:.0%} | "
                     f"{16 * per_state / sixteen:.0%} |")
    return lines


def main() -> list[dict]:
    rows = bench_scan()
    rows += bench_demo()
    if quick():
        rows += bench_student(width=64, depth=2, image_size=64)
    else:
        rows += bench_student()
    for item in rows:
        print(f"| {item['benchmark']} | {item['value']} | {item['baseline']} | {item['ratio']} | {item['goal']} |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the scan and Mamba-student benches (make bench runs them)",
                                     epilog="examples:\n  python -m benchmarks.bench_scan --profile --threads 1\n"
                                            "  python -m benchmarks.bench_scan --profile --compile --threads 1\n"
                                            "  python -m benchmarks.run_all --only scan",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="store_true", help="print where the time goes instead of the rows")
    parser.add_argument("--compile", action="store_true", help="with --profile: also time torch.compile at batch 1")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.profile:
        print(profile() + ("\n\n" + "\n".join(batch1_paths()) if args.compile else ""))
    else:
        main()

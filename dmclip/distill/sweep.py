"""The tables of a distill sweep (``dmclip distill --alpha 0,0.75 --seeds 0,1,2``): RQ1, accuracy of the
teacher and every member with per-alpha intervals over seeds and paired differences against the baseline
alpha; RQ2, the image encoder's cost against the teacher and a ViT of the student's size.
"""

from __future__ import annotations

from dmclip.report import markdown_table, pyplot, save_figure


def _same_size_vit(student) -> dict:
    """The arch of a ViT image tower with the student's width, depth, patch and image size (RQ2's baseline)."""
    arch = student.visual.arch
    width = arch["width"]
    return {"family": "vit", "image_size": arch["image_size"], "patch_size": arch["patch_size"], "width": width,
            "depth": arch["depth"], "heads": max(1, width // 64), "embed_dim": arch["embed_dim"]}


def member_label(alpha: float, seed: int, seeded: bool) -> str:
    """A sweep member's row name: 'student alpha=0.75' (one seed) or 'student alpha=0.75 seed=1'."""
    return f"student alpha={alpha:g}" + (f" seed={seed}" if seeded else "")


def arm_label(alpha: float) -> str:
    return f"alpha={alpha:g}"


def sweep_report(sweep_dir, members: list[tuple[float, int, str]], teacher_ref: str, eval_config, *,
                 latency_runs: int = 20, replicates: int = 2000) -> dict:
    """The DM-CLIP tables for a sweep of (alpha, seed) members: RQ1 (eval suite of the teacher and every
    member; per alpha the mean, std and 95 % t-interval over seeds; each alpha's paired difference against
    the baseline alpha (0 when swept, else the first) with a seeds x items bootstrap interval) and RQ2 (image
    encoder latency, params, FLOPs of the student vs the teacher vs a ViT of the student's size).

    ``eval_config``, the sweep's :class:`dmclip.train.config.EvalAfterConfig`, names the suite's sets (none
    named: the world suite) and whether RQ2 is measured (``latency``).

    Writes summary.md, summary.csv (one row per run), summary-seeds.csv (per alpha and column: mean, std,
    interval; differences), summary.json, items.npz (per-item hits, so intervals can be recomputed) and
    summary.png into ``sweep_dir``.
    """
    from dmclip.evaluation.benchmark import SUITE_RETRIEVAL, suite
    from dmclip.evaluation.output import (
        difference_table,
        seed_csv,
        seed_table,
        suite_csv,
        suite_markdown,
        write_hits,
    )
    from dmclip.io import atomic_write_json, atomic_write_text
    from dmclip.metrics.stats import compare_arms

    alphas = list(dict.fromkeys(alpha for alpha, _, _ in members))
    seeds = list(dict.fromkeys(seed for _, seed, _ in members))
    seeded = len(seeds) > 1
    models = {"teacher": teacher_ref,
              **{member_label(alpha, seed, seeded): ref for alpha, seed, ref in members}}
    items: dict = {}
    rq1 = suite(models, items=items, zero_shot_specs=eval_config.zeroshot if eval_config.named else None,
                retrieval_specs=eval_config.retrieval if eval_config.named else SUITE_RETRIEVAL)
    baseline = 0.0 if 0.0 in alphas else alphas[0]
    arms = {arm_label(alpha): [{c: items[member_label(a, seed, seeded)][c].numpy() for c in items["teacher"]}
                               for a, seed, _ in members if a == alpha] for alpha in alphas}
    stats = compare_arms(arms, arm_label(baseline), weights=rq1["avg_perf_weights"], replicates=replicates)
    rq2 = _latency_table(members[-1][2], teacher_ref, latency_runs) if eval_config.latency else []
    lines = [f"# distill sweep over alpha\n\nteacher: {teacher_ref}\n",
             f"alphas: {', '.join(f'{a:g}' for a in alphas)}; seeds: {', '.join(map(str, seeds))}\n",
             "## RQ1: accuracy (percent), one row per run\n", suite_markdown(rq1)]
    lines += ["\n## RQ1 over seeds: mean ± std [95 % CI] (percent)\n", seed_table(stats, rq1["columns"], "alpha"),
              f"\n## Paired difference against {arm_label(baseline)} (points; 95 % bootstrap CI over seeds and "
              "evaluation items; * = the interval excludes 0)\n", difference_table(stats, rq1["columns"], "alpha")]
    if rq2:
        lines += ["\n## RQ2: image encoder cost (same process, interleaved timing)\n",
                  markdown_table(list(rq2[0]), [[f"{v:.3g}" if isinstance(v, float) else v for v in row.values()]
                                                for row in rq2], align="l" + "r" * (len(rq2[0]) - 1)).rstrip("\n")]
    atomic_write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    atomic_write_text(sweep_dir / "summary.csv", suite_csv(rq1))
    atomic_write_text(sweep_dir / "summary-seeds.csv", seed_csv(stats, "alpha"))
    atomic_write_json(sweep_dir / "summary.json", {"rq1": {k: v for k, v in rq1.items() if k != "tasks"},
                                                   "seeds": stats, "rq2": rq2})
    write_hits(sweep_dir / "items.npz", items)
    _plot_sweep(sweep_dir / "summary.png", stats, alphas, rq1)
    return {"rq1": rq1, "seeds": stats, "rq2": rq2}


def _latency_table(student_ref: str, teacher_ref: str, latency_runs: int) -> list[dict]:
    from dmclip.metrics.latency import measure
    from dmclip.models.base import build_model
    from dmclip.models.refs import load_model_ref

    student = load_model_ref(student_ref)
    teacher = load_model_ref(teacher_ref)
    vit = build_model({"family": "clip", "visual": _same_size_vit(student), "text": student.text.arch})
    rq2 = []
    for name, model in (("student (" + student.visual.arch["family"] + ")", student), ("teacher", teacher),
                        ("ViT of the student's size", vit)):
        result = measure(model, batch_size=64, runs=latency_runs, warmup=3, vs=student if model is not student else None)
        m = result["metrics"]
        rq2.append({"model": name, "image params M": (m.get("image_params") or 0) / 1e6,
                    "image GFLOPs/img": m["image_flops"] / 1e9, "image ms (b=1)": m["image_b1_median_ms"],
                    "image ms (b=64)": m["image_b64_median_ms"],
                    "student / this (b=1)": (1 / result["vs"]["ratios"]["image_b1_median_ms"]) if "vs" in result else 1.0,
                    "student / this (b=64)": (1 / result["vs"]["ratios"]["image_b64_median_ms"]) if "vs" in result else 1.0})
    return rq2


def _plot_sweep(path, stats: dict, alphas: list[float], rq1: dict) -> None:
    """Accuracy against alpha: per column the mean over seeds with its 95 % interval as error bars."""
    fig, ax = pyplot().subplots(figsize=(6.5, 3.8), dpi=120)
    for column in rq1["columns"]:
        cells = [stats["arms"][arm_label(a)][column] for a in alphas]
        means = [100 * c["mean"] for c in cells]
        errors = [0.0 if c["n"] < 2 else 100 * (c["high"] - c["mean"]) for c in cells]
        ax.errorbar(alphas, means, yerr=errors, marker="o", capsize=3,
                    linewidth=2.5 if column == "Avg Perf" else 1, label=column)
    teacher = next(row for row in rq1["rows"] if row["model"] == "teacher")
    ax.axhline(100 * teacher["Avg Perf"], color="gray", linestyle="--", label="teacher Avg Perf")
    seeds = next(iter(next(iter(stats["arms"].values())).values()))["n"]
    ax.set_xlabel("alpha (weight of KD)")
    ax.set_ylabel("percent")
    ax.set_title(f"student accuracy vs distillation weight ({seeds} seed{'s' if seeds > 1 else ''}; 95 % CI)")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    save_figure(fig, path)

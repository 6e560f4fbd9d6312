"""The training engine's per-step overhead vs a bare PyTorch loop (target: <= 10 %).

Both loops train the same small CLIP-like model (two MLP towers, InfoNCE) on the same in-memory pairs
with the same work per step: seeded permutation, collate, forward, loss, backward, global-norm clipping,
AdamW with warmup + cosine. The engine adds what it is for: per-micro-batch reseeding, the finiteness
check (one host sync per step), metrics.jsonl rows, interrupt-safe updates, and the final checkpoint
(counted). The whole fits are run in alternation by ``benchmarks.common.interleaved`` (bare, engine, then
engine, bare, ...: neither always goes first) and the fastest of each compared (noise from other jobs only
ever adds time).

Times are CPU time of this process (``time.process_time``, one torch thread: ``THREADS``), read by the
step clock inside each fit (the wall times ``interleaved`` returns are not used): on a machine shared with
other jobs wall-clock time swings by tens of percent, CPU time by a few. Waiting on the disk (fsync of
run.json and the checkpoint) is therefore not in the whole-fit number.

    python -m benchmarks.bench_train [--steps 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import interleaved, repeats, row, threads
from dmclip.runs import RunDir
from dmclip.train import TrainConfig, default_param_groups, epoch_permutation, fit, lr_at

THREADS = 1
SIZES = {"tiny (width 32, batch 32)": (32, 32), "small (width 512, batch 256)": (512, 256)}


def pairs(n: int, image_dim: int = 16, text_dim: int = 12, seed: int = 1) -> list[dict]:
    """``n`` (image, text) vector pairs, the text a fixed linear map of the image plus noise."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(n, image_dim, generator=generator)
    mixing = torch.randn(image_dim, text_dim, generator=generator) / math.sqrt(image_dim)
    text = image @ mixing + 0.1 * torch.randn(n, text_dim, generator=generator)
    return [{"image": i, "text": t} for i, t in zip(image, text)]


def _tower(dim: int, width: int, embed_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, embed_dim))


class TwoTowers(nn.Module):
    def __init__(self, width: int, image_dim: int = 16, text_dim: int = 12, embed_dim: int = 8):
        super().__init__()
        self.image_tower, self.text_tower = _tower(image_dim, width, embed_dim), _tower(text_dim, width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict:
        return {"image_features": F.normalize(self.image_tower(image), dim=-1),  # (B, E)
                "text_features": F.normalize(self.text_tower(text), dim=-1),  # (B, E)
                "logit_scale": self.logit_scale.exp().clamp(max=100)}


def info_nce(out: dict) -> dict:
    """CLIP's loss both ways over the batch, as parts: ``{"image_to_text", "text_to_image"}``."""
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T  # (B, B)
    labels = torch.arange(len(logits))
    return {"image_to_text": F.cross_entropy(logits, labels), "text_to_image": F.cross_entropy(logits.T, labels)}


class PairTask:
    """The engine's ``TrainTask`` for :class:`TwoTowers` on :func:`pairs`."""

    def __init__(self, width: int):
        torch.manual_seed(0)
        self.model = TwoTowers(width)

    def collate(self, samples: list[dict]) -> dict:
        return {"image": torch.stack([s["image"] for s in samples]), "text": torch.stack([s["text"] for s in samples])}

    def loss(self, model, batch: dict, step: int) -> dict:
        parts = info_nce(model(batch["image"], batch["text"]))
        return {"loss": sum(parts.values()) / 2, **parts}


class StepClock:
    """CPU time at the end of every step (the engine calls it as ``task.on_step_end``, the bare loop itself)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, step: int) -> None:
        self.times.append(time.process_time())

    def step_costs(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def bare_loop(task: PairTask, dataset: list[dict], cfg: TrainConfig, seed: int, clock: StepClock) -> float:
    """A plain loop doing the same work; returns CPU seconds."""
    model = task.model
    optimizer = torch.optim.AdamW(default_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=tuple(cfg.betas), eps=cfg.eps)
    started = time.process_time()
    steps_per_epoch = len(dataset) // cfg.batch_size
    permutations: dict[int, torch.Tensor] = {}
    for step in range(cfg.steps):
        epoch, offset = divmod(step, steps_per_epoch)
        if epoch not in permutations:
            permutations[epoch] = epoch_permutation(seed, epoch, len(dataset))
        indices = permutations[epoch][offset * cfg.batch_size:(offset + 1) * cfg.batch_size]
        batch = task.collate([dataset[i] for i in indices.tolist()])
        lr = lr_at(step, peak=cfg.lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = sum(info_nce(model(batch["image"], batch["text"])).values()) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock(step)
    return time.process_time() - started


def engine_loop(task: PairTask, dataset: list[dict], cfg: TrainConfig, seed: int, root: str,
                clock: StepClock) -> float:
    run = RunDir.create("bench", "train", cfg, root=root, seed=seed)
    task.on_step_end = clock
    started = time.process_time()
    with run.active():
        fit(task, dataset, cfg, run, seed=seed)
    return time.process_time() - started


def measure(width: int, batch: int, steps: int, repeats: int) -> dict:
    """Per-step cost = the median CPU time between consecutive step ends (robust to other jobs' spikes; a
    metrics row every 10 steps is in the mean, shown as the whole-fit overhead); the best of the repeats."""
    dataset = pairs(8192)
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=10, log_every=10, checkpoint_every=0,
                      progress=False, device="cpu")
    per_step: dict[str, list[float]] = {"bare": [], "engine": []}
    total: dict[str, list[float]] = {"bare": [], "engine": []}
    with tempfile.TemporaryDirectory() as root:
        def fit_once(kind: str):
            def run() -> None:
                clock = StepClock()
                if kind == "bare":
                    seconds = bare_loop(PairTask(width), dataset, cfg, 0, clock)
                else:
                    seconds = engine_loop(PairTask(width), dataset, cfg, 0, root, clock)
                per_step[kind].append(statistics.median(clock.step_costs()))
                total[kind].append(seconds)
            return run

        # the first fit of each (allocators, lazy imports) is the warm-up and is dropped below
        interleaved({kind: fit_once(kind) for kind in ("bare", "engine")}, repeats=repeats, warmup=1)
    per_step = {kind: values[1:] for kind, values in per_step.items()}
    total = {kind: values[1:] for kind, values in total.items()}
    bare_ms, engine_ms = min(per_step["bare"]) * 1e3, min(per_step["engine"]) * 1e3
    spread = statistics.median(per_step["bare"]) / min(per_step["bare"]) - 1
    return {"bare_ms": bare_ms, "engine_ms": engine_ms, "overhead_pct": 100 * (engine_ms / bare_ms - 1),
            "total_overhead_pct": 100 * (min(total["engine"]) / min(total["bare"]) - 1),
            "spread_pct": 100 * spread}


def main(argv: list[str] | None = None) -> list[dict]:
    """Harness rows (ratio = bare loop time / fit time per step) and a printed table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"torch threads (default {THREADS}: keeps a shared machine quiet)")
    args = parser.parse_args(argv if argv is not None else [])
    with threads(args.threads):
        return _rows(args)


def _rows(args: argparse.Namespace) -> list[dict]:
    print(f"### training engine overhead ({args.steps} steps, CPU time, best of {args.repeats} interleaved "
          f"repeats, {torch.get_num_threads()} thread(s))\n")
    print(f"| model | bare loop ms/step | dmclip fit ms/step | per-step overhead | whole {args.steps}-step fit "
          f"(setup, metrics rows, final checkpoint) | bare-loop spread |")
    print("|---|---|---|---|---|---|")
    out = []
    for name, (width, batch) in SIZES.items():
        r = measure(width, batch, args.steps, repeats(args.repeats))
        print(f"| {name} | {r['bare_ms']:.3f} | {r['engine_ms']:.3f} | {r['overhead_pct']:+.1f} % | "
              f"{r['total_overhead_pct']:+.1f} % | {r['spread_pct']:.0f} % |", flush=True)
        out.append(row(f"train step overhead, {name}", f"{r['engine_ms']:.2f} ms/step",
                       baseline=f"bare PyTorch loop {r['bare_ms']:.2f} ms/step",
                       ratio=round(r["bare_ms"] / r["engine_ms"], 3), goal="overhead <= 10 %",
                       met=r["overhead_pct"] <= 10.0,
                       threads=args.threads,
                       notes=f"whole fit {r['total_overhead_pct']:+.1f} %, bare-loop spread {r['spread_pct']:.0f} %"))
    return out


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

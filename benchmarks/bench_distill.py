"""Distillation step throughput: online teacher vs the reinforced store (cached teacher outputs).

The demo's sizes: a ViT teacher (width 128, depth 4, 32 px, patch 4) and the `mamba-nano` student, batch
128. One step = the task's loss (teacher forward online, or a store look-up) + backward + AdamW.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.common import format_seconds, interleaved, repeats, row


def main() -> list[dict]:
    from dmclip.data import build_dataset
    from dmclip.data.reinforced import ReinforcedStore
    from dmclip.data.tokenizer import Tokenizer
    from dmclip.distill import DistillConfig, DistillTask, build_student, load_teacher
    from dmclip.distill.cache import build_store
    from dmclip.models.base import build_model, save_model
    from dmclip.models.clip import clip_arch

    torch.manual_seed(0)
    data = "world-train:size=512,image_size=32"
    dataset = build_dataset(data)
    tokenizer = Tokenizer.fit([c for i in range(len(dataset)) for c in dataset.captions(i)], 24).to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = save_model(build_model(clip_arch(32, 4, 128, 4, 4, 128, 3, 4, 128, tokenizer)),
                                 Path(tmp) / "teacher")
        ref = f"run:{teacher_dir}"
        build_store(ref, data, Path(tmp) / "store", augmentations=2, progress=False)
        store = ReinforcedStore(Path(tmp) / "store")
        cfg = DistillConfig(teacher=ref)
        teacher = load_teacher(ref)
        student = build_student(cfg, teacher)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
        tasks = {"online": DistillTask(student, teacher, cfg), "cached": DistillTask(student, teacher, cfg, store)}
        batch = tasks["online"].collate([dataset[i] for i in range(128)])

        def step(task):
            def run():
                optimizer.zero_grad(set_to_none=True)
                task.loss(student, batch, 0)["loss"].backward()
                optimizer.step()
            return run

        times = interleaved({name: step(task) for name, task in tasks.items()}, repeats=repeats(5), warmup=1)
    ratio = times["online"] / times["cached"]
    return [
        row("distill step, cached teacher (demo sizes, batch 128)", format_seconds(times["cached"]),
            baseline="online teacher " + format_seconds(times["online"]), ratio=round(ratio, 2), goal=">= 3x",
            met=ratio >= 3.0, notes=f"{128 / times['cached']:.0f} vs {128 / times['online']:.0f} samples/s; "
                                    f"student {cfg.student.name}"),
    ]


if __name__ == "__main__":
    for r in main():
        print(r)

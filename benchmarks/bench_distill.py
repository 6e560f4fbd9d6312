"""Distillation step throughput: online teacher vs the reinforced store (cached teacher outputs).

One step = the task's loss (teacher forward online, or a store look-up + the stored crop) + backward + AdamW,
batch 128, student `mamba-nano`, 32 px. Two teachers: the demo's (a ViT of width 128, depth 4, patch 4) and
a larger ViT (width 256, depth 8) whose forward costs several student steps. A third arm, the student's step
with the teacher's outputs already in memory, is the floor no cache can beat: the online/cached ratio cannot
exceed online/floor (Amdahl), and cached/floor is what the store itself costs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.common import format_seconds, interleaved, repeats, row

DATA = "world-train:size=512,image_size=32"
BATCH = 128
TEACHERS = {"demo teacher, ViT 128x4": (128, 4, 4), "ViT 256x8 teacher": (256, 8, 4)}


def _time_teacher(name: str, vision: tuple[int, int, int], dataset, tokenizer, tmp: Path) -> dict:
    from dmclip.data.reinforced import ReinforcedStore
    from dmclip.distill import DistillConfig, DistillTask, build_student, load_teacher
    from dmclip.distill.cache import build_store
    from dmclip.models.base import build_model, save_model
    from dmclip.models.clip import clip_arch

    width, depth, heads = vision
    torch.manual_seed(0)
    teacher_dir = save_model(build_model(clip_arch(32, 4, width, depth, heads, 128, 3, 4, 128, tokenizer)),
                             tmp / f"teacher-{width}")
    ref = f"run:{teacher_dir}"
    build_store(ref, DATA, tmp / f"store-{width}", augmentations=2, progress=False)
    store = ReinforcedStore(tmp / f"store-{width}")
    cfg = DistillConfig(teacher=ref)
    teacher = load_teacher(ref)
    student = build_student(cfg, teacher)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    online = DistillTask(student, teacher, cfg)
    batch = online.collate([dataset[i] for i in range(BATCH)])
    floor = DistillTask(student, teacher, cfg)
    captions = [c[0] for c in batch["captions"]]
    features = floor.teacher_features(batch["images"], captions)
    floor.teacher_features = lambda images, captions: features  # the teacher's outputs already in memory
    tasks = {"online": online, "cached": DistillTask(student, teacher, cfg, store), "floor": floor}

    def step(task):
        def run():
            optimizer.zero_grad(set_to_none=True)
            task.loss(student, batch, 0)["loss"].backward()
            optimizer.step()
        return run

    def teacher_forward():
        online.teacher_features(batch["images"], captions)

    fns = {**{k: step(t) for k, t in tasks.items()}, "teacher": teacher_forward}
    return interleaved(fns, repeats=repeats(5), warmup=1)


def main() -> list[dict]:
    from dmclip.data import build_dataset
    from dmclip.data.tokenizer import Tokenizer

    dataset = build_dataset(DATA)
    tokenizer = Tokenizer.fit([c for i in range(len(dataset)) for c in dataset.captions(i)], 24).to_dict()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, vision in TEACHERS.items():
            t = _time_teacher(name, vision, dataset, tokenizer, Path(tmp))
            ratio, ceiling = t["online"] / t["cached"], t["online"] / t["floor"]
            cost = t["teacher"] / t["floor"]  # the teacher's forward in student training steps
            big = cost >= 4
            rows.append(row(
                f"distill step, cached teacher ({name}, batch {BATCH})", format_seconds(t["cached"]),
                baseline="online teacher " + format_seconds(t["online"]), ratio=round(ratio, 2),
                goal=">= 3x (teacher >= 4 student steps)" if big else "",
                met=(ratio >= 3.0) if big else None,
                notes=f"teacher forward = {cost:.2f} student steps; floor (teacher outputs in memory) "
                      f"{format_seconds(t['floor'])}, so at most {ceiling:.2f}x; the store costs "
                      f"{100 * (t['cached'] / t['floor'] - 1):+.0f} % over the floor; student mamba-nano"))
    return rows


if __name__ == "__main__":
    for r in main():
        print(r)

"""`dmclip distill`: a CLIP teacher -> a smaller student image encoder (Vision-Mamba by default).

loss = alpha * KD + (1 - alpha) * contrastive (DM-CLIP). The student is a CLIP whose image tower is
the registered student and whose text tower comes from the teacher (frozen by default, as DM-CLIP).
Library entry points: ``run(config, run_dir)`` for one run and ``COMMAND``, what :func:`dmclip.runner.launch`
runs (one run, or a sweep over ``alpha`` and ``seeds``). Beside them: :mod:`dmclip.distill.sweep` (a sweep's
tables, ``sweep_report``) and :mod:`dmclip.distill.reinforce` (``build_store``, behind `dmclip reinforce`). The
teachers themselves load in :mod:`dmclip.models.teachers`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.config import field
from dmclip.errors import DmclipError
from dmclip.models.teachers import (
    EnsembleTeacher,
    load_teacher,
    resolve_teacher_ref,
    teacher_features,
)
from dmclip.runner import Command, Member, score_and_write
from dmclip.train import TrainConfig
from dmclip.train.config import DataConfig, EvalAfterConfig
from dmclip.train.tasks import image_caption_batch, pick_caption

log = logging.getLogger(__name__)


@dataclass
class StudentConfig:
    name: str = field("mamba-nano", "registered student image encoder (`dmclip list students`)")
    image_size: int = field(0, "student input side in pixels (0 = the teacher's)", min=0)
    patch_size: int = field(0, "patch side (0 = the student entry's default)", min=0)
    width: int = field(0, "override the student's width (0 = entry default)", min=0)
    depth: int = field(0, "override the student's depth (0 = entry default)", min=0)
    stem: Literal["", "patch", "conv"] = field("", "image stem: patch (linear patch embedding), conv (stride-2 "
                                                  "convolutions, as the shipped teacher's), '' = the entry's default")
    text: Literal["frozen-teacher", "finetune-teacher", "new"] = field(
        "frozen-teacher", "text tower: the teacher's, frozen (DM-CLIP) or fine-tuned, or a new one")
    scan_backend: str = field("auto", "selective scan backend for Mamba students: auto | cpu | chunked | reference")


@dataclass
class LossConfig:
    alpha: float = field(0.75, "weight of KD; 1 - alpha weighs the contrastive loss", min=0.0, max=1.0)
    feature_weight: float = field(0.0, "extra weight of feature mimicry (CLIP-KD), 0 = off", min=0.0)
    feature_kind: Literal["cosine", "mse"] = field("cosine", "feature mimicry distance")
    fd_weight: float = field(0.0, "weight of CLIP-KD's feature distillation (MSE to the teacher's embeddings; "
                                  "CLIP-KD uses 2000), 0 = off", min=0.0)
    icl_weight: float = field(0.0, "weight of CLIP-KD's interactive contrastive loss (student image vs teacher "
                                   "text and the reverse), 0 = off", min=0.0)
    teacher_logit_scale: float = field(0.0, "temperature scale of the teacher's KD targets: 0 = the teacher's own, "
                                            "else fixed (MobileCLIP: 100)", min=0.0, max=1000.0)
    name: str = field("distill", "the registered loss (`dmclip list losses`), built with the settings above and "
                                 "the student's and teacher's embedding widths")


@dataclass
class DistillConfig:
    teacher: str = field("builtin:world-vit", "teacher: builtin:<name> (the shipped builtin:world-vit), run:<dir>, "
                                              "open_clip:<arch>:<weights>, store:<reinforced store dir>, "
                                              "ensemble:<ref>+<ref>..., or 'latest' (the newest completed CLIP "
                                              "pretrain run; recorded as the run:<dir> it names)")
    seed: int = field(0, "seed for init, data order and caption choice", min=0)
    student: StudentConfig = field(factory=StudentConfig, help="student")
    loss: LossConfig = field(factory=LossConfig, help="objective")
    data: DataConfig = field(factory=DataConfig, help="data")
    train: TrainConfig = field(factory=TrainConfig, help="optimisation")
    eval: EvalAfterConfig = field(factory=EvalAfterConfig, help="evaluation at the end")

    # a recipe's `sweep:` is read by dmclip.runner (each member one run), not a field
    RECIPE_BLOCKS: ClassVar[tuple[str, ...]] = ("sweep",)


def build_student(cfg: DistillConfig, teacher):
    """A CLIP whose image tower is the registered student and whose text tower is the teacher's."""
    from dmclip.models.clip import CLIP
    from dmclip.registry import students

    s = cfg.student
    kwargs = {"image_size": s.image_size or teacher.image_size, "embed_dim": teacher.embed_dim}
    teacher_patch = getattr(getattr(teacher, "visual", None), "arch", {}).get("patch_size")
    if teacher_patch and not s.patch_size:  # same token grid as the teacher unless asked otherwise
        kwargs["patch_size"] = teacher_patch
    for key in ("patch_size", "width", "depth", "stem"):
        if getattr(s, key):
            kwargs[key] = getattr(s, key)
    if students.entry(s.name).factory.__module__.endswith("mamba"):
        kwargs["scan_backend"] = s.scan_backend
    visual = students.get(s.name, **kwargs)
    text_tower = teacher.text if hasattr(teacher, "text") else teacher
    text_arch = text_tower.arch
    if text_arch.get("family") == "open_clip":  # the whole open_clip model: keep its text tower only
        text_arch = {**text_arch, "towers": "text"}
    init_scale = float(teacher.logit_scale.detach())
    student = CLIP(visual=visual.arch, text=text_arch, init_logit_scale=init_scale)
    student.visual.load_state_dict(visual.state_dict())
    if s.text != "new":
        wanted = student.text.state_dict().keys()
        student.text.load_state_dict({k: v for k, v in text_tower.state_dict().items() if k in wanted})
    student.text.requires_grad_(s.text == "finetune-teacher" or s.text == "new")
    return student


def build_criterion(loss: LossConfig, student_dim: int, teacher_dim: int | None) -> nn.Module:
    """The registered loss ``loss.name`` built with the other ``loss.*`` settings as keywords (``distill``:
    :class:`dmclip.losses.clip.DistillMix`), called as ``criterion(student_features, teacher_features)``."""
    from dataclasses import asdict

    from dmclip.registry import losses

    settings = {k: v for k, v in asdict(loss).items() if k != "name"}
    factory = losses.entry(loss.name).factory
    try:
        criterion = factory(**settings, student_dim=student_dim, teacher_dim=teacher_dim)
    except TypeError as exc:
        if "keyword argument" not in str(exc):
            raise
        raise DmclipError(f"loss {loss.name!r} does not take distill's loss settings ({exc})",
                          "use loss.name=distill, or a loss whose factory takes loss.* as keywords "
                          "(**kwargs)") from None
    if not isinstance(criterion, nn.Module):
        raise DmclipError(f"loss {loss.name!r} built a {type(criterion).__name__}, not an nn.Module",
                          "distill moves its loss to the device and checkpoints it: register an nn.Module")
    return criterion


class DistillTask:
    """alpha * KD + (1 - alpha) * InfoNCE; the teacher runs online under no_grad, or its outputs come
    from a reinforced store (``store``), in which case the student sees the stored augmentation."""

    def __init__(self, student, teacher, cfg: DistillConfig, store=None):
        self.model = student
        self.teacher = teacher
        self.store = store
        self.memo = self.dataset = None  # run() sets a TeacherMemo, filled from the dataset at the first step
        self.seed = cfg.seed
        self.text_frozen = cfg.student.text == "frozen-teacher"
        self.constant_prefixes = ("text.",) if self.text_frozen else ()  # the teacher's, rebuilt on resume
        self.weight_decay = cfg.train.weight_decay
        self.criterion = build_criterion(cfg.loss, student.embed_dim, getattr(teacher, "embed_dim", None))

    def collate(self, samples: list[dict]) -> dict:
        return image_caption_batch(samples)

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor, captions: list[str], indices: list[int]) -> dict:
        if next(self.teacher.parameters()).device != images.device:  # the engine moves only the student
            self.teacher.to(images.device)
        # alpha 0 (contrastive only) reads no teacher image features: the teacher's image tower is not run
        with_images = getattr(self.criterion, "uses_teacher_images", True)
        if self.memo is not None:
            if not self.memo.filled:
                self.memo.fill(self.teacher, self.dataset, images.device)
            return self.memo.features(self.teacher, images, indices, captions, with_images=with_images)
        if isinstance(self.teacher, EnsembleTeacher):
            members = [teacher_features(m, images, captions, with_images=with_images) for m in self.teacher.members]
            return {**members[0], "members": members}  # the first member's text = the student's text tower
        return teacher_features(self.teacher, images, captions, with_images=with_images)

    def cached_inputs(self, batch: dict, step: int) -> tuple[torch.Tensor, list[str], dict]:
        """(the chosen views, their captions, the store's teacher features of both) for the cached path:
        every image's (view, caption) comes from (seed, step, index), its crop from the stored box."""
        from dmclip.data.reinforced import apply_boxes

        images, indices = batch["images"], batch["index"]
        chosen = [self.store.choose(self.seed, step, i) for i in indices]
        augs, caps = [a for a, _ in chosen], [c for _, c in chosen]
        per_image = self.store.text_embeddings.shape[1]
        captions = [(c[:per_image] + [c[-1]] * per_image)[k] for c, k in zip(batch["captions"], caps)]
        boxes = self.store.boxes[torch.tensor(indices), torch.tensor(augs)].to(images.device)
        teacher = {k: v.to(images.device) for k, v in self.store.features(indices, augs, caps).items()}
        return apply_boxes(images, boxes), captions, teacher

    def loss(self, model, batch: dict, step: int) -> dict:
        if self.store is not None:
            images, captions, teacher = self.cached_inputs(batch, step)
        else:
            images = batch["images"]
            captions = [pick_caption(c, self.seed, step, i) for c, i in zip(batch["captions"], batch["index"])]
            teacher = self.teacher_features(images, captions, batch["index"])
        if images.shape[-1] != self.model.image_size:
            images = F.interpolate(images, size=self.model.image_size, mode="bilinear", align_corners=False)
        self.criterion.to(images.device)  # FD's projection, if any, lives beside the student
        if self.text_frozen:  # same weights as the teacher's text tower: reuse its features, tokenise nothing
            student = model(images)
            student["text_features"] = teacher["text_features"]
        else:
            student = model(images, self.model.tokenize(captions).to(images.device))
        return self.criterion(student, teacher)

    def param_groups(self, model) -> list[dict]:
        """The student's groups, plus FD's projection when it has weights (widths differ)."""
        from dmclip.train import default_param_groups

        groups = default_param_groups(model, self.weight_decay)
        extra = [p for p in self.criterion.parameters() if p.requires_grad]
        return groups + ([{"params": extra, "weight_decay": self.weight_decay}] if extra else [])

    def state_dict(self) -> dict:
        return {"criterion": self.criterion.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "criterion" in state:
            self.criterion.load_state_dict(state["criterion"])


def run(cfg: DistillConfig, run_dir) -> dict:
    """Distil, save the student into ``run_dir/model`` (``run_dir``: the RunDir), score it, return results."""
    from dmclip.data import build_dataset
    from dmclip.models.base import count_parameters, save_model
    from dmclip.registry import losses
    from dmclip.train import distributed, fit

    losses.entry(cfg.loss.name)  # a misspelt loss fails before the teacher loads
    torch.manual_seed(cfg.seed)
    # a run made before teachers were recorded concretely keeps the one run.json names
    teacher_ref = run_dir.info.get("teacher") or cfg.teacher
    teacher, data_spec = load_teacher(teacher_ref), cfg.data.train
    store = getattr(teacher, "store", None)  # store:<dir>: the teacher's outputs come from the store
    if store is not None:
        if data_spec != store.meta["data"]:
            log.info("training on the store's data %s (data.train %s is ignored)", store.meta["data"], data_spec)
        data_spec = store.meta["data"]
        teacher = teacher.source  # only its text tower and sizes are used
    if distributed.is_main() and run_dir.info.get("teacher") != teacher_ref:
        run_dir.update_info(teacher=teacher_ref)
    student = build_student(cfg, teacher)
    dataset = build_dataset(data_spec, image_size=teacher.image_size, max_skip_fraction=cfg.data.max_skip_fraction,
                            allow_stream=store is None)  # a store looks its samples up by index
    log.info("student %s: image tower %.2f M params (teacher's %.2f M); alpha %.2f", cfg.student.name,
             count_parameters(student.visual) / 1e6, count_parameters(getattr(teacher, "visual", teacher)) / 1e6,
             cfg.loss.alpha)
    task = DistillTask(student, teacher, cfg, store)
    task.memo, task.dataset = _memo(cfg, task, dataset), dataset
    resume = run_dir.checkpoint_path("last.pt").exists()
    summary = fit(task, dataset, cfg.train, run_dir, seed=cfg.seed, resume=resume)
    if not distributed.is_main():  # rank 0 saves and scores; the other ranks are done
        return {"train": summary}
    save_model(student, run_dir.path / "model", extra={"teacher": teacher_ref})
    results = {"teacher": teacher_ref, "student": cfg.student.name, "alpha": cfg.loss.alpha,
               "image_parameters": count_parameters(student.visual), "train": summary}
    return score_and_write(run_dir, results, cfg.eval, cfg.data.train)


def _memo(cfg: DistillConfig, task: DistillTask, dataset):
    """A TeacherMemo when computing the teacher's features once pays (dmclip.distill.memo), else None."""
    from dmclip.distill.memo import TeacherMemo, plan_memo
    from dmclip.train import distributed

    if task.store is not None or isinstance(task.teacher, EnsembleTeacher):
        return None
    plan = plan_memo(dataset, reads=cfg.train.steps * cfg.train.batch_size // distributed.world_size(),
                     with_images=getattr(task.criterion, "uses_teacher_images", True),
                     embed_dim=task.teacher.embed_dim)
    return TeacherMemo(plan) if plan else None


def prepare(cfg: DistillConfig, runs_root: Path) -> None:
    """Before any run directory: 'latest' becomes the concrete run:<dir> it names (so resolved.yaml records the
    teacher used, and every member of a sweep gets the same one)."""
    teacher = resolve_teacher_ref(cfg.teacher, runs_root)
    if teacher != cfg.teacher:
        log.info("teacher %s: %s", cfg.teacher, teacher)
        cfg.teacher = teacher


def summarize(sweep_dir: Path, members: list[Member], base: DistillConfig) -> dict:
    from dmclip.distill.sweep import sweep_report

    base.eval.note_world_sets(base.data.train)
    return sweep_report(sweep_dir, [(m.config.loss.alpha, m.config.seed, f"run:{m.run_dir.path}") for m in members],
                        base.teacher, base.eval)


def member_name(name: str | None, recipe, cfg: DistillConfig, point: dict) -> str:
    return f"{name or 'distill'}-alpha{cfg.loss.alpha:g}" + (f"-seed{cfg.seed}" if "seeds" in point else "")


COMMAND = Command("distill", DistillConfig, run, sweep_fields={"alpha": "loss.alpha", "seeds": "seed"},
                  prepare=prepare, summarize=summarize, sweep_name=lambda name, recipe: f"sweep-{name or 'alpha'}",
                  member_name=member_name)

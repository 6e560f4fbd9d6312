"""`dmclip distill`: a CLIP teacher -> a smaller student image encoder (Vision-Mamba by default).

loss = alpha * KD + (1 - alpha) * contrastive (DM-CLIP). The student is a CLIP whose image tower is
the registered student and whose text tower comes from the teacher (frozen by default, as DM-CLIP).
Library entry points: ``run(config, run_dir)``, ``with_alpha(config, alpha)`` per sweep member and
``recipe_sweep(recipe)`` for a recipe's ``sweep:`` block. Beside them: :mod:`dmclip.distill.sweep` (a sweep's
tables, ``sweep_report``) and :mod:`dmclip.distill.cache` (``build_store`` for `dmclip distill cache`). The
teachers themselves load in :mod:`dmclip.models.teachers`.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.config import field, to_yaml
from dmclip.errors import DmclipError, did_you_mean
from dmclip.models.teachers import (
    EnsembleTeacher,
    load_teacher,
    resolve_teacher_ref,
    teacher_features,
)
from dmclip.train.config import DataConfig, EvalAfterConfig
from dmclip.train.tasks import image_caption_batch, pick_caption
from dmclip.recipe import read_recipe
from dmclip.train import TrainConfig

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
    teacher: str = field("latest", "teacher: run:<dir>, builtin:<name>, open_clip:<arch>:<weights>, "
                                   "embeddings:<store>, "
                                   "ensemble:<ref>+<ref>..., or 'latest' (newest completed CLIP pretrain run)")
    seed: int = field(0, "seed for init, data order and caption choice")
    student: StudentConfig = field(factory=StudentConfig, help="student")
    loss: LossConfig = field(factory=LossConfig, help="objective")
    data: DataConfig = field(factory=DataConfig, help="data")
    train: TrainConfig = field(factory=TrainConfig, help="optimisation")
    eval: EvalAfterConfig = field(factory=EvalAfterConfig, help="evaluation at the end")

    # a recipe's `sweep:` is read by `dmclip distill` (recipe_sweep), not a field: each member is one run
    RECIPE_BLOCKS: ClassVar[tuple[str, ...]] = ("sweep",)


def _runs_root(run):
    """The runs directory a run lives in (runs/distill/<run> or runs/distill/<sweep>/<run>)."""
    path = run.path.resolve()
    for parent in path.parents:
        if parent.name == "distill":
            return parent.parent
    return None


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
    init_scale = float(teacher.logit_scale.detach())
    student = CLIP(visual=visual.arch, text=text_tower.arch, init_logit_scale=init_scale)
    student.visual.load_state_dict(visual.state_dict())
    if s.text != "new":
        student.text.load_state_dict(text_tower.state_dict())
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
        self.seed = cfg.seed
        self.text_frozen = cfg.student.text == "frozen-teacher"
        self.weight_decay = cfg.train.weight_decay
        self.criterion = build_criterion(cfg.loss, student.embed_dim, getattr(teacher, "embed_dim", None))

    def collate(self, samples: list[dict]) -> dict:
        return image_caption_batch(samples)

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor, captions: list[str]) -> dict:
        if next(self.teacher.parameters()).device != images.device:  # the engine moves only the student
            self.teacher.to(images.device)
        if isinstance(self.teacher, EnsembleTeacher):
            members = [teacher_features(m, images, captions) for m in self.teacher.members]
            return {**members[0], "members": members}  # the first member's text = the student's text tower
        return teacher_features(self.teacher, images, captions)

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
            teacher = self.teacher_features(images, captions)
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


def run(cfg: DistillConfig, record) -> dict:
    """Distil, save the student into ``record/model`` (``record``: the RunDir), score zero-shot, return results."""
    from dmclip.data import build_dataset
    from dmclip.models.base import count_parameters, load_saved_model, save_model
    from dmclip.registry import losses
    from dmclip.train import distributed, fit

    losses.entry(cfg.loss.name)  # a misspelt loss fails before the teacher loads
    torch.manual_seed(cfg.seed)
    # a resumed run keeps the teacher it started with, even if a newer 'latest' exists by now
    teacher_ref = record.info.get("teacher") or resolve_teacher_ref(cfg.teacher, _runs_root(record))
    teacher, data_spec = load_teacher(teacher_ref), cfg.data.train
    store = getattr(teacher, "store", None)  # embeddings:<store>: the teacher's outputs come from the store
    if store is not None:
        if data_spec != store.meta["data"]:
            log.info("training on the store's data %s (data.train %s is ignored)", store.meta["data"], data_spec)
        data_spec = store.meta["data"]
        teacher = teacher.source  # only its text tower and sizes are used
    if distributed.is_main() and record.info.get("teacher") != teacher_ref:
        if teacher_ref != cfg.teacher:
            log.info("teacher: %s", teacher_ref)
        record.update_info(teacher=teacher_ref)
    student = build_student(cfg, teacher)
    dataset = build_dataset(data_spec, image_size=teacher.image_size, max_skip_fraction=cfg.data.max_skip_fraction,
                            allow_stream=store is None)  # a store looks its samples up by index
    log.info("student %s: image tower %.2f M params (teacher's %.2f M); alpha %.2f", cfg.student.name,
             count_parameters(student.visual) / 1e6, count_parameters(getattr(teacher, "visual", teacher)) / 1e6,
             cfg.loss.alpha)
    task = DistillTask(student, teacher, cfg, store)
    resume = record.checkpoint_path("last.pt").exists()
    summary = fit(task, dataset, cfg.train, record, seed=cfg.seed, resume=resume)
    if not distributed.is_main():  # rank 0 saves and scores; the other ranks are done
        return {"train": summary}
    save_model(student, record.path / "model", extra={"teacher": teacher_ref})
    results = {"teacher": teacher_ref, "student": cfg.student.name, "alpha": cfg.loss.alpha,
               "image_parameters": count_parameters(student.visual), "train": summary}
    if cfg.eval.zeroshot:
        from dmclip.evaluation.zeroshot_classification import zero_shot_accuracy

        model = load_saved_model(record.path / "model")
        results["zeroshot"] = zero_shot_accuracy(model, cfg.eval.zeroshot, batch_size=cfg.eval.batch_size)
    record.write_results(results)
    return results


def with_alpha(cfg: DistillConfig, alpha: float) -> DistillConfig:
    new = copy.deepcopy(cfg)
    new.loss.alpha = alpha
    return new


def sweep_configs(base: DistillConfig, alphas: list[float] | None, seeds: list[int] | None = None) -> list[DistillConfig]:
    """One config per (alpha, seed), alpha-major: every alpha at every seed (``alphas`` None = base.loss.alpha,
    ``seeds`` None = base.seed)."""
    configs = []
    for alpha in alphas or [base.loss.alpha]:
        for seed in seeds or [base.seed]:
            member = with_alpha(base, alpha)
            member.seed = int(seed)
            configs.append(member)
    return configs


# a recipe's `sweep:` key -> the field it varies; the same names as the command line options that sweep
# (--alpha, --seeds)
SWEEP_FIELDS = {"alpha": "loss.alpha", "seeds": "seed"}
_SWEEP_EXAMPLE = "sweep: {alpha: [0.0, 0.75], seeds: [0, 1, 2]}"


def _number(value):
    if isinstance(value, str):  # as config float fields: YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _sweep_alpha(value, where: str) -> float:
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise DmclipError(f"{where} = {value!r} is not a number", "alphas are numbers, e.g. sweep: {alpha: [0.0, 0.5]}")
    if not 0.0 <= value <= 1.0:
        raise DmclipError(f"{where} = {value!r} is out of range", "alpha weighs KD against contrastive: 0 <= alpha <= 1")
    return float(value)


def _sweep_seed(value, where: str) -> int:
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise DmclipError(f"{where} = {value!r} is not a seed", "seeds are whole numbers >= 0, e.g. seeds: [0, 1, 2]")
    return int(value)


def check_sweep(block, where: str = "recipe") -> dict[str, list]:
    """A recipe's ``sweep:`` block -> ``{"alpha": [0.0, 0.5, 1.0], "seeds": [0, 1]}``: known keys, each a
    non-empty list of distinct values in the field's range. ``where`` starts every error ("recipe my.yaml")."""
    if not isinstance(block, dict) or not block:
        raise DmclipError(f"{where}: sweep must map a field to its list of values, got {block!r}",
                          f"write e.g. {_SWEEP_EXAMPLE}")
    sweep = {}
    for key, values in block.items():
        if key not in SWEEP_FIELDS:
            raise DmclipError(f"{where}: unknown sweep key {str(key)!r}", did_you_mean(str(key), SWEEP_FIELDS))
        path = f"sweep.{key}"
        if not isinstance(values, list):
            raise DmclipError(f"{where}: {path} = {values!r} is not a list",
                              f"list the values to run, e.g. {_SWEEP_EXAMPLE}; one value without a sweep "
                              f"goes in {SWEEP_FIELDS[key]}")
        if not values:
            raise DmclipError(f"{where}: {path} is an empty list", f"list the values to run, e.g. {_SWEEP_EXAMPLE}")
        check = _sweep_alpha if key == "alpha" else _sweep_seed
        checked = [check(value, f"{where}: {path}[{i}]") for i, value in enumerate(values)]
        repeated = next((v for i, v in enumerate(checked) if v in checked[:i]), None)
        if repeated is not None:
            raise DmclipError(f"{where}: {path} repeats {repeated:g}", "list each sweep point once")
        sweep[key] = checked
    return sweep


def recipe_sweep(recipe) -> dict[str, list[float]]:
    """The recipe's checked ``sweep:`` block (see check_sweep); ``{}`` without a recipe or a block."""
    if recipe is None:
        return {}
    data, _ = read_recipe(recipe)
    if "sweep" not in data:
        return {}
    return check_sweep(data["sweep"], f"recipe {Path(recipe).name}")


def sweep_yaml(base: DistillConfig, sweep: dict[str, list[float]]) -> str:
    """A sweep directory's resolved.yaml: the members' shared config and the sweep block, so that
    `dmclip distill <sweep dir>/resolved.yaml` runs the same sweep again."""
    import yaml

    block = yaml.safe_dump({"sweep": sweep}, sort_keys=False, default_flow_style=None)
    return "command: distill\n" + to_yaml(base) + block

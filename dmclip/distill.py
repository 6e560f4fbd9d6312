"""`dmclip distill`: a CLIP teacher -> a smaller student image encoder (Vision-Mamba by default).

loss = alpha * KD + (1 - alpha) * contrastive (DM-CLIP). The student is a CLIP whose image tower is
the registered student and whose text tower comes from the teacher (frozen by default, as DM-CLIP).
Library entry points: ``run(config, run_dir)``, ``with_alpha(config, alpha)`` per sweep member,
``recipe_sweep(recipe)`` for a recipe's ``sweep:`` block and ``sweep_report(sweep_dir, ...)``.
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

from dmclip.config import field, read_recipe, to_yaml
from dmclip.errors import DmclipError, did_you_mean
from dmclip.pretrain import DataConfig, EvalAfterConfig, image_caption_batch, pick_caption
from dmclip.train import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class StudentConfig:
    name: str = field("mamba-nano", "registered student image encoder (`dmclip list students`)")
    image_size: int = field(0, "student input side in pixels (0 = the teacher's)", min=0)
    patch_size: int = field(0, "patch side (0 = the student entry's default)", min=0)
    width: int = field(0, "override the student's width (0 = entry default)", min=0)
    depth: int = field(0, "override the student's depth (0 = entry default)", min=0)
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


def resolve_teacher_ref(ref: str, runs_root=None) -> str:
    """'latest' -> run:<newest completed CLIP pretrain run>; anything else unchanged."""
    if ref != "latest":
        return ref
    from dmclip.runs import find_runs

    for run in find_runs(runs_root, "pretrain"):
        if run.info.get("status") == "completed" and (run.results() or {}).get("objective") == "clip":
            return f"run:{run.path}"
    raise DmclipError("no completed CLIP pretrain run to use as the teacher",
                      "train one first (`dmclip pretrain recipes/pretrain-clip-teacher.yaml`) or pass --teacher")


def _runs_root(run):
    """The runs directory a run lives in (runs/distill/<run> or runs/distill/<sweep>/<run>)."""
    path = run.path.resolve()
    for parent in path.parents:
        if parent.name == "distill":
            return parent.parent
    return None


class EnsembleTeacher(nn.Module):
    """Several CLIP teachers as one: KD targets are their image<->text probabilities averaged after the
    softmax (MobileCLIP). The student keeps the first member's text tower, input size and embedding size."""

    def __init__(self, members: list[nn.Module], refs: list[str]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.refs = refs
        first = members[0]
        self.image_size, self.embed_dim, self.logit_scale = first.image_size, first.embed_dim, first.logit_scale
        self.arch = {"family": "ensemble", "members": refs}
        if hasattr(first, "text"):
            self.text = first.text
        if hasattr(first, "visual"):
            self.visual = first.visual

    def tokenize(self, texts):
        return self.members[0].tokenize(texts)

    def encode_text(self, tokens):
        return self.members[0].encode_text(tokens)

    def encode_image(self, images):
        return self.members[0].encode_image(images)


def parse_ensemble(ref: str) -> list[str]:
    """'ensemble:run:a+open_clip:ViT-B-32:/w.pt' -> ['run:a', 'open_clip:ViT-B-32:/w.pt']."""
    members = [m.strip() for m in ref[len("ensemble:"):].split("+") if m.strip()]
    if len(members) < 2:
        raise DmclipError(f"{ref!r} names {len(members)} teacher(s); an ensemble needs two or more",
                          "join references with '+', e.g. ensemble:run:runs/pretrain/a+run:runs/pretrain/b")
    return members


def teacher_features(teacher: nn.Module, images: torch.Tensor, captions: list[str]) -> dict:
    """Normalised teacher features of a batch (each teacher with its own tokenizer and input size)."""
    if images.shape[-1] != teacher.image_size:
        images = F.interpolate(images, size=teacher.image_size, mode="bilinear", align_corners=False)
    tokens = teacher.tokenize(captions).to(images.device)
    return {"image_features": F.normalize(teacher.encode_image(images), dim=-1),
            "text_features": F.normalize(teacher.encode_text(tokens), dim=-1),
            "logit_scale": teacher.logit_scale.exp().clamp(max=100.0)}


def load_teacher(ref: str):
    from dmclip.models.refs import load_model_ref

    if ref.startswith("ensemble:"):
        refs = [resolve_teacher_ref(r) for r in parse_ensemble(ref)]
        return EnsembleTeacher([load_teacher(r) for r in refs], refs).eval()
    teacher = load_model_ref(resolve_teacher_ref(ref))
    if getattr(teacher, "encode_text", None) is None or not hasattr(teacher, "tokenize"):
        raise DmclipError(f"teacher {ref!r} has no text encoder", "distill needs a CLIP teacher with both towers")
    if getattr(teacher, "arch", {}).get("family") not in ("clip", "open_clip"):
        raise DmclipError(f"teacher {ref!r} is a {teacher.arch.get('family')} model; distill takes CLIP teachers",
                          "use builtin:world-vit, a `dmclip pretrain --objective clip` run or open_clip:<arch>:<weights>")
    teacher.requires_grad_(False)
    return teacher.eval()


def build_student(cfg: DistillConfig, teacher):
    """A CLIP whose image tower is the registered student and whose text tower is the teacher's."""
    from dmclip.models.clip import CLIP
    from dmclip.registry import students

    s = cfg.student
    kwargs = {"image_size": s.image_size or teacher.image_size, "embed_dim": teacher.embed_dim}
    teacher_patch = getattr(getattr(teacher, "visual", None), "arch", {}).get("patch_size")
    if teacher_patch and not s.patch_size:  # same token grid as the teacher unless asked otherwise
        kwargs["patch_size"] = teacher_patch
    for key in ("patch_size", "width", "depth"):
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


class DistillTask:
    """alpha * KD + (1 - alpha) * InfoNCE; the teacher runs online under no_grad, or its outputs come
    from a reinforced store (``store``), in which case the student sees the stored augmentation."""

    def __init__(self, student, teacher, cfg: DistillConfig, store=None):
        from dmclip.losses.clip import DistillMix

        self.model = student
        self.teacher = teacher
        self.store = store
        self.seed = cfg.seed
        self.text_frozen = cfg.student.text == "frozen-teacher"
        self.weight_decay = cfg.train.weight_decay
        loss = cfg.loss
        self.criterion = DistillMix(loss.alpha, loss.feature_weight, loss.feature_kind, loss.fd_weight,
                                    loss.icl_weight, loss.teacher_logit_scale, student_dim=student.embed_dim,
                                    teacher_dim=getattr(teacher, "embed_dim", None))

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

    def loss(self, model, batch: dict, step: int) -> dict:
        images = batch["images"]
        if self.store is not None:
            from dmclip.data.reinforced import apply_boxes

            chosen = [self.store.choose(self.seed, step, i) for i in batch["index"]]
            augs, caps = [a for a, _ in chosen], [c for _, c in chosen]
            per_image = self.store.text_embeddings.shape[1]
            captions = [(c[:per_image] + [c[-1]] * per_image)[k] for c, k in zip(batch["captions"], caps)]
            tokens = self.model.tokenize(captions).to(images.device)
            boxes = self.store.boxes[torch.tensor(batch["index"]), torch.tensor(augs)].to(images.device)
            images = apply_boxes(images, boxes)
            teacher = {k: v.to(images.device) for k, v in self.store.features(batch["index"], augs, caps).items()}
        else:
            captions = [pick_caption(c, self.seed, step, i) for c, i in zip(batch["captions"], batch["index"])]
            tokens = self.model.tokenize(captions)
            teacher = self.teacher_features(images, captions)
        if images.shape[-1] != self.model.image_size:
            images = F.interpolate(images, size=self.model.image_size, mode="bilinear", align_corners=False)
        tokens = tokens.to(images.device)
        self.criterion.to(images.device)  # FD's projection, if any, lives beside the student
        if self.text_frozen:  # same weights as the teacher's text tower: reuse its features
            student = model(images)
            student["text_features"] = teacher["text_features"]
        else:
            student = model(images, tokens)
        return self.criterion(student, teacher)

    def param_groups(self, model) -> list[dict]:
        """The student's groups, plus FD's projection when it has weights (widths differ)."""
        from dmclip.train.loop import default_param_groups

        groups = default_param_groups(model, self.weight_decay)
        extra = [p for p in self.criterion.parameters() if p.requires_grad]
        return groups + ([{"params": extra, "weight_decay": self.weight_decay}] if extra else [])

    def state_dict(self) -> dict:
        return {"criterion": self.criterion.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "criterion" in state:
            self.criterion.load_state_dict(state["criterion"])


def run(cfg: DistillConfig, run) -> dict:
    """Distil, save the student into ``run/model``, score zero-shot, return results."""
    from dmclip.data import build_dataset
    from dmclip.models.base import count_parameters, load_saved_model, save_model
    from dmclip.train import distributed, fit

    torch.manual_seed(cfg.seed)
    # a resumed run keeps the teacher it started with, even if a newer 'latest' exists by now
    teacher_ref = run.info.get("teacher") or resolve_teacher_ref(cfg.teacher, _runs_root(run))
    store, data_spec = None, cfg.data.train
    if teacher_ref.startswith("embeddings:"):
        from dmclip.data.reinforced import ReinforcedStore

        store = ReinforcedStore(teacher_ref[len("embeddings:"):])
        if data_spec != store.meta["data"]:
            log.info("training on the store's data %s (data.train %s is ignored)", store.meta["data"], data_spec)
        data_spec = store.meta["data"]
        teacher = load_teacher(store.meta["teacher"])  # only its text tower and sizes are used
    else:
        teacher = load_teacher(teacher_ref)
    if distributed.is_main() and run.info.get("teacher") != teacher_ref:
        if teacher_ref != cfg.teacher:
            log.info("teacher: %s", teacher_ref)
        run.update_info(teacher=teacher_ref)
    student = build_student(cfg, teacher)
    dataset = build_dataset(data_spec, image_size=teacher.image_size, max_skip_fraction=cfg.data.max_skip_fraction,
                            allow_stream=store is None)  # a store looks its samples up by index
    log.info("student %s: image tower %.2f M params (teacher's %.2f M); alpha %.2f", cfg.student.name,
             count_parameters(student.visual) / 1e6, count_parameters(getattr(teacher, "visual", teacher)) / 1e6,
             cfg.loss.alpha)
    task = DistillTask(student, teacher, cfg, store)
    resume = run.checkpoint_path("last.pt").exists()
    summary = fit(task, dataset, cfg.train, run, seed=cfg.seed, resume=resume)
    if not distributed.is_main():  # rank 0 saves and scores; the other ranks are done
        return {"train": summary}
    save_model(student, run.path / "model", extra={"teacher": teacher_ref})
    results = {"teacher": teacher_ref, "student": cfg.student.name, "alpha": cfg.loss.alpha,
               "image_parameters": count_parameters(student.visual), "train": summary}
    if cfg.eval.zeroshot:
        from dmclip.evaluation import zero_shot_accuracy

        model = load_saved_model(run.path / "model")
        results["zeroshot"] = zero_shot_accuracy(model, cfg.eval.zeroshot, batch_size=cfg.eval.batch_size)
    run.write_results(results)
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


def sweep_report(sweep_dir, members: list[tuple[float, int, str]], teacher_ref: str, *,
                 latency_runs: int = 20, replicates: int = 2000) -> dict:
    """The DM-CLIP tables for a sweep of (alpha, seed) members: RQ1 (eval suite of the teacher and every
    member; per alpha the mean, std and 95 % t-interval over seeds; each alpha's paired difference against
    the baseline alpha (0 when swept, else the first) with a seeds x items bootstrap interval) and RQ2 (image
    encoder latency, params, FLOPs of the student vs the teacher vs a ViT of the student's size).

    Writes summary.md, summary.csv (one row per run), summary-seeds.csv (per alpha and column: mean, std,
    interval; differences), summary.json, items.npz (per-item hits, so intervals can be recomputed) and
    summary.png into ``sweep_dir``.
    """
    import io

    import numpy as np

    from dmclip.evaluation import suite, suite_csv, suite_markdown
    from dmclip.metrics.stats import compare_arms
    from dmclip.runs import atomic_write_bytes, atomic_write_json, atomic_write_text

    alphas = list(dict.fromkeys(alpha for alpha, _, _ in members))
    seeds = list(dict.fromkeys(seed for _, seed, _ in members))
    seeded = len(seeds) > 1
    models = {"teacher": teacher_ref,
              **{member_label(alpha, seed, seeded): ref for alpha, seed, ref in members}}
    items: dict = {}
    rq1 = suite(models, items=items)
    baseline = 0.0 if 0.0 in alphas else alphas[0]
    arms = {arm_label(alpha): [{c: items[member_label(a, seed, seeded)][c].numpy() for c in items["teacher"]}
                               for a, seed, _ in members if a == alpha] for alpha in alphas}
    stats = compare_arms(arms, arm_label(baseline), weights=rq1["avg_perf_weights"], replicates=replicates)
    rq2 = _latency_table(members[-1][2], teacher_ref, latency_runs)
    lines = [f"# distill sweep over alpha\n\nteacher: {teacher_ref}\n",
             f"alphas: {', '.join(f'{a:g}' for a in alphas)}; seeds: {', '.join(map(str, seeds))}\n",
             "## RQ1: accuracy (percent), one row per run\n", suite_markdown(rq1)]
    lines += ["\n## RQ1 over seeds: mean ± std [95 % CI] (percent)\n", seed_table(stats, rq1["columns"]),
              f"\n## Paired difference against {arm_label(baseline)} (points; 95 % bootstrap CI over seeds and "
              "evaluation items; * = the interval excludes 0)\n", difference_table(stats, rq1["columns"])]
    lines += ["\n## RQ2: image encoder cost (same process, interleaved timing)\n",
              "| " + " | ".join(rq2[0]) + " |", "|---|" + "---:|" * (len(rq2[0]) - 1)]
    for row in rq2:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    atomic_write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    atomic_write_text(sweep_dir / "summary.csv", suite_csv(rq1))
    atomic_write_text(sweep_dir / "summary-seeds.csv", seed_csv(stats))
    atomic_write_json(sweep_dir / "summary.json", {"rq1": {k: v for k, v in rq1.items() if k != "tasks"},
                                                   "seeds": stats, "rq2": rq2})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{f"{model}|{column}": hits.numpy().astype(np.uint8)
                                   for model, columns in items.items() for column, hits in columns.items()})
    atomic_write_bytes(sweep_dir / "items.npz", buffer.getvalue())
    _plot_sweep(sweep_dir / "summary.png", stats, alphas, rq1)
    return {"rq1": rq1, "seeds": stats, "rq2": rq2}


def _latency_table(student_ref: str, teacher_ref: str, latency_runs: int) -> list[dict]:
    from dmclip.evaluation import latency
    from dmclip.models.base import build_model
    from dmclip.models.refs import load_model_ref

    student = load_model_ref(student_ref)
    teacher = load_model_ref(teacher_ref)
    vit = build_model({"family": "clip", "visual": _same_size_vit(student), "text": student.text.arch})
    rq2 = []
    for name, model in (("student (" + student.visual.arch["family"] + ")", student), ("teacher", teacher),
                        ("ViT of the student's size", vit)):
        result = latency(model, batch_size=64, runs=latency_runs, warmup=3, vs=student if model is not student else None,
                         model_name=name)
        m = result["metrics"]
        rq2.append({"model": name, "image params M": (m.get("image_params") or 0) / 1e6,
                    "image GFLOPs/img": m["image_flops"] / 1e9, "image ms (b=1)": m["image_b1_median_ms"],
                    "image ms (b=64)": m["image_b64_median_ms"],
                    "student / this (b=1)": (1 / result["vs"]["ratios"]["image_b1_median_ms"]) if "vs" in result else 1.0,
                    "student / this (b=64)": (1 / result["vs"]["ratios"]["image_b64_median_ms"]) if "vs" in result else 1.0})
    return rq2


def _interval_cell(s: dict) -> str:
    if s["n"] < 2:
        return f"{100 * s['mean']:.2f} (1 seed)"
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} [{100 * s['low']:.2f}, {100 * s['high']:.2f}]"


def seed_table(stats: dict, columns: list[str]) -> str:
    """Per alpha: mean ± std [95 % t-interval] over seeds of every column, in percent."""
    lines = ["| alpha | seeds | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for arm, per_column in stats["arms"].items():
        n = next(iter(per_column.values()))["n"]
        lines.append(f"| {arm} | {n} | " + " | ".join(_interval_cell(per_column[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def difference_table(stats: dict, columns: list[str]) -> str:
    """Per alpha: the paired difference against the baseline arm, in points, with its bootstrap interval."""
    lines = ["| alpha − " + stats["baseline"] + " | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for arm, per_column in stats["differences"].items():
        cells = [f"{100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]" + ("*" if d["significant"] else "")
                 for d in (per_column[c] for c in columns)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if not stats["differences"]:
        lines.append("| (one alpha: nothing to compare) |" + " |" * len(columns))
    return "\n".join(lines) + "\n"


def seed_csv(stats: dict) -> str:
    """summary-seeds.csv: one row per (alpha, column) with mean/std/CI over seeds and, for non-baseline alphas,
    the paired difference against the baseline with its bootstrap interval (fractions)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["alpha", "column", "seeds", "mean", "std", "ci_low", "ci_high", "diff_vs_baseline",
                     "diff_low", "diff_high", "significant"])
    for arm, per_column in stats["arms"].items():
        for column, s in per_column.items():
            d = stats["differences"].get(arm, {}).get(column)
            writer.writerow([arm, column, s["n"], repr(s["mean"]), repr(s["std"]), repr(s["low"]), repr(s["high"]),
                             *((repr(d["diff"]), repr(d["low"]), repr(d["high"]), d["significant"]) if d else
                               ("", "", "", ""))])
    return buffer.getvalue()


def _plot_sweep(path, stats: dict, alphas: list[float], rq1: dict) -> None:
    """Accuracy against alpha: per column the mean over seeds with its 95 % interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dmclip.report import figure_png

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
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
    from dmclip.runs import atomic_write_bytes

    atomic_write_bytes(path, figure_png(fig))

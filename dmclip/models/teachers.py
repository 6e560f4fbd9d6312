"""Distillation teachers: a CLIP model with both towers, an ensemble of them, or a teacher's cached outputs.

``load_teacher(ref)`` takes any model reference (:mod:`dmclip.models.refs`) and the two distill-only schemes
registered here:

    ensemble:<ref>+<ref>...   several CLIP teachers as one: KD targets averaged after the softmax (MobileCLIP)
    store:<store dir>         a reinforced store (``dmclip reinforce``): the teacher's outputs, precomputed

``latest`` (the newest completed CLIP pretrain run under a runs directory) is not a reference but a choice made
once, before a run starts: ``resolve_teacher_ref(ref, runs_root)`` turns it into the ``run:<dir>`` it names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.errors import DmclipError
from dmclip.registry import references

CLIP_FAMILIES = ("clip", "open_clip")


def resolve_teacher_ref(ref: str, runs_root) -> str:
    """'latest' (alone or as an ensemble member) -> run:<the newest completed CLIP pretrain run under
    ``runs_root``>; anything else unchanged."""
    if ref.startswith("ensemble:"):
        return "ensemble:" + "+".join(resolve_teacher_ref(member, runs_root) for member in parse_ensemble(ref))
    if ref != "latest":
        return ref
    from dmclip.runs import find_runs

    for run_dir in find_runs(runs_root, "pretrain"):
        if run_dir.info.get("status") == "completed" and (run_dir.results() or {}).get("objective") == "clip":
            return f"run:{run_dir.path}"
    raise DmclipError(f"--teacher latest: no completed CLIP pretrain run under {runs_root}",
                      "use the shipped teacher, --teacher builtin:world-vit (the default), or train one with "
                      "`dmclip pretrain`")


def load_teacher(ref: str) -> nn.Module:
    """The frozen teacher ``ref`` names, in eval mode: a CLIP model with both towers, or a distill-only one."""
    from dmclip.models.refs import build_ref

    if ref == "latest":
        raise DmclipError("'latest' names a run only against a runs directory",
                          "resolve it first: resolve_teacher_ref('latest', runs_root)")
    teacher = build_ref(ref)
    if not getattr(teacher, "distill_only", None):  # an ensemble's members and a store's teacher are checked
        if getattr(teacher, "encode_text", None) is None or not hasattr(teacher, "tokenize"):
            raise DmclipError(f"teacher {ref!r} has no text encoder", "distill needs a CLIP teacher with both towers")
        if getattr(teacher, "arch", {}).get("family") not in CLIP_FAMILIES:
            raise DmclipError(f"teacher {ref!r} is a {teacher.arch.get('family')} model; distill takes CLIP teachers",
                              "use builtin:world-vit, a `dmclip pretrain --objective clip` run or "
                              "open_clip:<arch>:<weights>")
    teacher.requires_grad_(False)
    return teacher.eval()


def teacher_features(teacher: nn.Module, images: torch.Tensor | None, captions: list[str], *,
                     with_images: bool = True, with_text: bool = True, device=None) -> dict:
    """Normalised teacher features of a batch (each teacher with its own tokenizer and input size);
    ``with_images=False``: the text side only (a loss that reads no teacher image features), ``images`` may
    then be None with the ``device`` named; ``with_text=False``: the image side only."""
    device = images.device if images is not None else device
    features = {"logit_scale": teacher.logit_scale.exp().clamp(max=100.0)}
    if with_text:
        tokens = teacher.tokenize(captions).to(device)
        features["text_features"] = F.normalize(teacher.encode_text(tokens), dim=-1)
    if with_images:
        if images.shape[-1] != teacher.image_size:
            images = F.interpolate(images, size=teacher.image_size, mode="bilinear", align_corners=False)
        features["image_features"] = F.normalize(teacher.encode_image(images), dim=-1)
    return features


# ------------------------------------------------------------------------------------------ ensemble


class EnsembleTeacher(nn.Module):
    """Several CLIP teachers as one: KD targets are their image<->text probabilities averaged after the
    softmax (MobileCLIP). The student keeps the first member's text tower, input size and embedding size."""

    distill_only = "an ensemble of teachers"

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
    """'ensemble:run:a+open_clip:ViT-B-32:/w.pt' (or the part after 'ensemble:') -> ['run:a', 'open_clip:...']."""
    rest = ref[len("ensemble:"):] if ref.startswith("ensemble:") else ref
    members = [m.strip() for m in rest.split("+") if m.strip()]
    if len(members) < 2:
        raise DmclipError(f"'ensemble:{rest}' names {len(members)} teacher(s); an ensemble needs two or more",
                          "join references with '+', e.g. ensemble:run:runs/pretrain/a+run:runs/pretrain/b")
    return members


@references.register("ensemble", description="ensemble:<ref>+<ref>... — several CLIP teachers, KD targets averaged "
                                             "after the softmax (MobileCLIP); distill only")
def ensemble_teacher(rest: str) -> EnsembleTeacher:
    refs = parse_ensemble(rest)
    return EnsembleTeacher([load_teacher(r) for r in refs], refs)


# ------------------------------------------------------------------------------------------ cached outputs


class StoreTeacher(nn.Module):
    """A reinforced store (:class:`dmclip.data.reinforced.ReinforcedStore`) as a teacher: ``store`` holds the
    outputs, ``source`` is the teacher that wrote them (the student takes its text tower and sizes)."""

    distill_only = "a cache of teacher outputs"

    def __init__(self, store, source: nn.Module):
        super().__init__()
        self.store = store
        self.source = source
        self.image_size, self.embed_dim = source.image_size, source.embed_dim
        self.arch = {"family": "store", "store": str(store.path), "teacher": store.meta["teacher"]}


@references.register("store", description="store:<store dir> — a reinforced store: a teacher's outputs cached by "
                                          "`dmclip reinforce`; distill only")
def store_teacher(rest: str) -> StoreTeacher:
    from dmclip.data.reinforced import ReinforcedStore

    store = ReinforcedStore(rest)
    return StoreTeacher(store, load_teacher(store.meta["teacher"]))

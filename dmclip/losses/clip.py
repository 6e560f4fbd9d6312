"""Contrastive and distillation losses. Each returns ``{"loss": total, **parts}``.

Inputs are dicts of *normalised* features, as ``CLIP.forward`` returns them:
``{"image_features": (B, D), "text_features": (B, D), "logit_scale": exp'd scalar}``.
Under DDP the features are gathered across ranks first (open_clip's local_loss + gather_with_grad).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.registry import losses


def _gathered(image_features: torch.Tensor, text_features: torch.Tensor):
    """(local image, local text, all images, all texts, offset of this rank's rows)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_features, text_features, image_features, text_features, 0
    from dmclip.losses.gather import gather_features

    # gathered with the gradient (the default): every rank's rows keep their graph, so open_clip's local_loss,
    # which only puts this rank's rows back into a gradient-free gather, has nothing left to do
    all_images, all_texts = gather_features(image_features, text_features)
    return image_features, text_features, all_images, all_texts, dist.get_rank() * image_features.shape[0]


def contrastive_logits(features: dict):
    """Image->text and text->image logits of this rank's rows against all rows, and the labels."""
    image, text, all_images, all_texts, offset = _gathered(features["image_features"], features["text_features"])
    scale = features["logit_scale"]
    logits_per_image = scale * image @ all_texts.T  # (b, B)
    logits_per_text = scale * text @ all_images.T  # (b, B)
    labels = torch.arange(image.shape[0], device=image.device) + offset
    return logits_per_image, logits_per_text, labels


def clip_loss(features: dict) -> torch.Tensor:
    """InfoNCE both ways (CLIP eq.): mean of CE(image->text) and CE(text->image)."""
    logits_per_image, logits_per_text, labels = contrastive_logits(features)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def kd_loss(student: dict, teacher: dict) -> torch.Tensor:
    """Soft-label KD between teacher and student similarity distributions, both directions (MobileCLIP/DM-CLIP).

    With ``teacher["members"]`` (an ensemble) the targets are the members' probabilities averaged after the
    softmax, as MobileCLIP averages its teachers.
    """
    s_img, s_txt, _ = contrastive_logits(student)
    with torch.no_grad():
        members = teacher.get("members") or [teacher]
        logits = [contrastive_logits(m)[:2] for m in members]
        p_img = torch.stack([t_img.softmax(dim=1) for t_img, _ in logits]).mean(dim=0)
        p_txt = torch.stack([t_txt.softmax(dim=1) for _, t_txt in logits]).mean(dim=0)
    return (soft_cross_entropy_probs(p_img, s_img) + soft_cross_entropy_probs(p_txt, s_txt)) / 2


def soft_cross_entropy_probs(teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """-sum p_teacher * log_softmax(student), averaged over rows."""
    return -(teacher_probs * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


def feature_loss(student: dict, teacher: dict, kind: str) -> torch.Tensor:
    """CLIP-KD feature mimicry on image embeddings: 1 - cos, or MSE."""
    s, t = student["image_features"], teacher["image_features"].detach()
    if kind == "mse":
        return F.mse_loss(s, t)
    return (1 - (s * t).sum(dim=1)).mean()


def feature_distillation_loss(student: dict, teacher: dict, projection: nn.Module | None = None) -> torch.Tensor:
    """CLIP-KD's feature distillation (Yang et al. 2024, eq. 4): mean squared error between the student's
    embeddings (through ``projection`` when the widths differ) and the teacher's, image plus text, each
    averaged over batch and dimensions as CLIP-KD's ``F.mse_loss``. A frozen shared text tower gives a text
    term of exactly 0."""
    projection = projection or nn.Identity()
    loss = F.mse_loss(projection(student["image_features"]), teacher["image_features"].detach())
    if student.get("text_features") is not None and teacher.get("text_features") is not None:
        loss = loss + F.mse_loss(projection(student["text_features"]), teacher["text_features"].detach())
    return loss


def interactive_contrastive_loss(student: dict, teacher: dict) -> torch.Tensor:
    """CLIP-KD's interactive contrastive learning (eq. 6-8): the student's image features contrasted against
    the teacher's text features and the student's text features against the teacher's image features, with
    the student's temperature; the mean of the two InfoNCE terms."""
    scale = student["logit_scale"]
    crossed_i2t = {"image_features": student["image_features"], "text_features": teacher["text_features"].detach(),
                   "logit_scale": scale}
    crossed_t2i = {"image_features": teacher["image_features"].detach(), "text_features": student["text_features"],
                   "logit_scale": scale}
    logits_image, _, labels = contrastive_logits(crossed_i2t)
    _, logits_text, _ = contrastive_logits(crossed_t2i)
    return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2


class ClipLoss(nn.Module):
    """InfoNCE image<->text with the model's (clamped) learnable temperature: pretrain's CLIP objective."""

    def forward(self, student: dict, teacher: dict | None = None) -> dict:
        loss = clip_loss(student)
        return {"loss": loss, "contrastive": loss.detach()}


class FeatureDistillLoss(nn.Module):
    """CLIP-KD feature distillation; a learned linear projection maps the student's embedding width to the
    teacher's when they differ (its weights train with the student)."""

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None):
        super().__init__()
        differ = student_dim is not None and teacher_dim is not None and student_dim != teacher_dim
        self.projection = nn.Linear(student_dim, teacher_dim, bias=False) if differ else nn.Identity()

    def forward(self, student: dict, teacher: dict) -> torch.Tensor:
        return feature_distillation_loss(student, teacher, self.projection)


class DistillMix(nn.Module):
    """alpha * KD + (1 - alpha) * contrastive + feature_weight * feature + fd_weight * FD + icl_weight * ICL:
    DM-CLIP's objective with CLIP-KD's terms as options.

    ``teacher_logit_scale`` > 0 replaces the teacher's own temperature in the KD targets (MobileCLIP fixes 100).
    """

    def __init__(self, alpha: float = 0.75, feature_weight: float = 0.0, feature_kind: str = "cosine",
                 fd_weight: float = 0.0, icl_weight: float = 0.0, teacher_logit_scale: float = 0.0,
                 student_dim: int | None = None, teacher_dim: int | None = None):
        super().__init__()
        self.alpha, self.feature_weight, self.feature_kind = alpha, feature_weight, feature_kind
        self.fd_weight, self.icl_weight, self.teacher_logit_scale = fd_weight, icl_weight, teacher_logit_scale
        self.fd = FeatureDistillLoss(student_dim, teacher_dim) if fd_weight > 0 else None

    @property
    def uses_teacher_images(self) -> bool:
        """Whether any term reads the teacher's image features (alpha 0 alone does not)."""
        return self.alpha > 0 or self.feature_weight > 0 or self.fd is not None or self.icl_weight > 0

    def forward(self, student: dict, teacher: dict) -> dict:
        if self.teacher_logit_scale > 0:
            scale = student["image_features"].new_tensor(self.teacher_logit_scale)
            teacher = {**teacher, "logit_scale": scale,
                       **({"members": [{**m, "logit_scale": scale} for m in teacher["members"]]}
                          if teacher.get("members") else {})}
        zero = student["image_features"].new_zeros(())
        contrastive = clip_loss(student) if self.alpha < 1 else zero
        kd = kd_loss(student, teacher) if self.alpha > 0 else zero
        total = self.alpha * kd + (1 - self.alpha) * contrastive
        parts = {"contrastive": contrastive.detach(), "kd": kd.detach()}
        if self.feature_weight > 0:
            feature = feature_loss(student, teacher, self.feature_kind)
            total = total + self.feature_weight * feature
            parts["feature"] = feature.detach()
        if self.fd is not None:
            fd = self.fd(student, teacher)
            total = total + self.fd_weight * fd
            parts["fd"] = fd.detach()
        if self.icl_weight > 0:
            icl = interactive_contrastive_loss(student, teacher)
            total = total + self.icl_weight * icl
            parts["icl"] = icl.detach()
        return {"loss": total, **parts}


# the objectives `loss.name` selects; each factory takes distill's loss.* settings and both embedding widths
losses.add("distill", DistillMix,
           description="alpha * KD + (1 - alpha) * InfoNCE (DM-CLIP), + CLIP-KD's feature, FD and ICL terms "
                       "at loss.feature_weight, fd_weight, icl_weight")

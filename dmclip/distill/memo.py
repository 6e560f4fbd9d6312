"""The teacher's features of every training image and caption, computed once when a run would otherwise
compute each of them several times.

Online distillation runs the frozen teacher on every batch. On a map-style set that is read for more than one
epoch, with no augmentation, the teacher sees the same image (and the same caption) again each epoch and
returns the same features: a run of E epochs pays E times for them. :func:`plan_memo` decides, before the
first step, whether computing them once is cheaper (the run reads each image / caption ``MIN_READS`` times or
more) and fits in ``MAX_BYTES``; :class:`TeacherMemo` then computes them in a fixed order and chunk size
on the first step, so a resumed run gets the same features as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MIN_READS = 1.5         # computing once pays when the run would compute each feature this many times or more
MAX_BYTES = 256 << 20   # features kept in memory, images and captions together
CHUNK = 256             # samples per teacher call while computing


@dataclass(frozen=True)
class MemoPlan:
    """What to compute once: the images (when the loss reads the teacher's image features) and/or the
    captions of a set of ``size`` samples holding ``captions`` captions in all."""

    images: bool
    text: bool
    size: int
    captions: int

    def __bool__(self) -> bool:
        return self.images or self.text


def plan_memo(dataset, *, reads: int, with_images: bool, embed_dim: int) -> MemoPlan:
    """The plan for a run that reads ``reads`` samples on this rank from ``dataset``: images memoised when
    ``reads >= MIN_READS * len(dataset)`` and the loss reads image features; captions when ``reads >=
    MIN_READS * captions``; nothing for a set with no index (a stream) or one whose features would pass
    ``MAX_BYTES``."""
    captions_of = getattr(dataset, "captions", None)
    if captions_of is None or not hasattr(dataset, "__len__"):
        return MemoPlan(False, False, 0, 0)
    size = len(dataset)
    captions = sum(len(captions_of(i)) for i in range(size))
    images = with_images and reads >= MIN_READS * size
    text = reads >= MIN_READS * captions
    bytes_needed = 4 * embed_dim * (size * images + captions * text)
    if bytes_needed > MAX_BYTES:
        return MemoPlan(False, False, size, captions)
    return MemoPlan(images, text, size, captions)


class TeacherMemo:
    """Normalised teacher features of a dataset's images (row = sample index) and captions (by text),
    computed by :meth:`fill` in index order, ``CHUNK`` samples per teacher call."""

    def __init__(self, plan: MemoPlan):
        self.plan = plan
        self.image_features: torch.Tensor | None = None
        self.text_rows: dict[str, int] = {}
        self.text_features: torch.Tensor | None = None
        self.logit_scale: torch.Tensor | None = None

    @property
    def filled(self) -> bool:
        return self.logit_scale is not None

    @torch.no_grad()
    def fill(self, teacher, dataset, device: torch.device) -> None:
        from dmclip.data import image_batch
        from dmclip.models.teachers import teacher_features

        start = time.perf_counter()
        what = " and ".join(part for part, on in ((f"{self.plan.size} images", self.plan.images),
                                                  (f"{self.plan.captions} captions", self.plan.text)) if on)
        log.info("computing the teacher's features of %s once (the run would compute each of them again every "
                 "epoch)", what)
        if self.plan.images:
            read_many = getattr(dataset, "__getitems__", None)
            rows, images = [], []
            for first in range(0, len(dataset), CHUNK):
                indices = list(range(first, min(first + CHUNK, len(dataset))))
                samples = read_many(indices) if read_many is not None else [dataset[i] for i in indices]
                rows += [int(s["index"]) for s in samples]  # a bad sample comes back replaced, under its index
                batch = image_batch(samples).to(device)
                images.append(teacher_features(teacher, batch, [], with_text=False)["image_features"])
            features = torch.cat(images)
            self.image_features = features.new_zeros(len(dataset), features.shape[1])
            self.image_features[torch.tensor(rows, device=device)] = features
        if self.plan.text:  # the captions alone: no image is read or decoded for them
            ordered = list(dict.fromkeys(c for i in range(len(dataset)) for c in dataset.captions(i)))
            self.text_features = torch.cat([
                teacher_features(teacher, None, ordered[i:i + CHUNK], with_images=False, device=device)["text_features"]
                for i in range(0, len(ordered), CHUNK)])
            self.text_rows = {caption: row for row, caption in enumerate(ordered)}
        self.logit_scale = teacher.logit_scale.exp().clamp(max=100.0)
        log.info("teacher features computed in %.1f s", time.perf_counter() - start)

    def features(self, teacher, images: torch.Tensor, indices: list[int], captions: list[str], *,
                 with_images: bool) -> dict:
        """The batch's teacher features: memoised rows where planned, the teacher run for the rest."""
        from dmclip.models.teachers import teacher_features

        online_images = with_images and not self.plan.images
        features = teacher_features(teacher, images, captions, with_images=online_images,
                                    with_text=not self.plan.text) if online_images or not self.plan.text else {}
        features["logit_scale"] = self.logit_scale
        if self.plan.text:
            features["text_features"] = self.text_features[
                torch.tensor([self.text_rows[c] for c in captions], device=images.device)]
        if with_images and self.plan.images:
            features["image_features"] = self.image_features[torch.tensor(indices, device=images.device)]
        return features

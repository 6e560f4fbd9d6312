"""Zero-shot classification as CLIP_benchmark scores it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from dmclip.errors import DmclipError
from dmclip.evaluation.embeddings import EmbeddingCache, encode_images, encode_texts
from dmclip.evaluation.loading import (
    TASK_ZERO_SHOT,
    check_eval_model,
    check_templates,
    dataset_name,
    fill_template,
    load_dataset,
    model_fingerprint,
    task_result,
)
from dmclip.metrics.zeroshot import class_embeddings, ranked_classes, zero_shot_logits, zero_shot_metrics

log = logging.getLogger(__name__)


def zero_shot(model: nn.Module, dataset="world-zeroshot", *, classnames: Sequence[str] | None = None,
              templates: Sequence[str] | None = None, batch_size: int = 64, cache: EmbeddingCache | None = None,
              fingerprint: str | None = None, progress: bool = False, model_name: str = "",
              items: dict | None = None) -> dict:
    """Zero-shot classification as CLIP_benchmark: acc1, acc5 (NaN under 5 classes), mean per-class recall.

    Class embedding = mean over templates of normalised text embeddings, renormalised; logits =
    100 · image · class. ``classnames``/``templates`` replace the dataset's. ``items``, when given, receives
    ``"acc1"``: the per-image top-1 hits (float 0/1, (N,)), for intervals over evaluation items.
    """
    check_eval_model(model, "zero-shot")
    name = dataset_name(dataset)
    dataset = load_dataset(dataset, model.image_size)
    if getattr(dataset, "kind", "classification") != "classification":
        raise DmclipError(f"{dataset_name(dataset)} is an image-text set, not a classification set",
                          "zero-shot needs class labels: use e.g. --data world-zeroshot (retrieval takes image-text sets)")
    names = list(classnames) if classnames is not None else list(dataset.classnames)
    prompts = check_templates(list(templates) if templates is not None else list(dataset.templates))
    if len(names) != len(dataset.classnames):
        raise DmclipError(f"{len(names)} class names given but {dataset_name(dataset)} has {len(dataset.classnames)} classes",
                          "give exactly one class name per class, in label order")
    if len(dataset) == 0:
        raise DmclipError(f"{dataset_name(dataset)} has no samples", "check --data")
    fingerprint = fingerprint or (model_fingerprint(model) if cache is not None else None)
    texts = [fill_template(t, c) for c in names for t in prompts]
    unknown = unknown_words(model, texts)
    text_features = encode_texts(model, texts, batch_size=max(batch_size, 64), cache=cache, fingerprint=fingerprint,
                                 progress=progress, description="encoding class prompts")
    classifier = class_embeddings(text_features.view(len(names), len(prompts), -1))  # (C, D)
    image_features, used = encode_images(model, dataset, batch_size=batch_size, cache=cache, fingerprint=fingerprint,
                                         progress=progress, name=name)
    all_labels = dataset.labels()
    labels = torch.tensor([all_labels[i] for i in used], dtype=torch.long)
    logits = zero_shot_logits(image_features, classifier)
    scored = zero_shot_metrics(logits, labels)
    if items is not None:
        items["acc1"] = (ranked_classes(logits)[:, 0] == labels).float()
    notes = scored.pop("notes") + ([unknown_words_note(unknown)] if unknown else [])
    return task_result(TASK_ZERO_SHOT, name, scored, model_name, notes, num_samples=len(labels),
                       num_classes=len(names), num_templates=len(prompts),
                       **({"unknown_words": unknown} if unknown else {}))


def unknown_words(model: nn.Module, prompts: Sequence[str]) -> list[str]:
    """The prompt words outside a dmclip model's compact vocabulary, with a warning naming them and the fix.

    Such a word becomes the unknown token, so two classes that differ only in unknown words get the same
    prompt and zero-shot falls toward chance without any error. open_clip models (full BPE) have none.
    """
    from dmclip.data.tokenizer import Tokenizer

    tokenizer = getattr(model, "tokenizer", None)
    unknown = tokenizer.unknown_words(prompts) if isinstance(tokenizer, Tokenizer) else []
    if unknown:
        log.warning("%s", unknown_words_note(unknown))
    return unknown


def unknown_words_note(unknown: Sequence[str], shown: int = 5) -> str:
    words = ", ".join(repr(w) for w in unknown[:shown]) + (f" and {len(unknown) - shown} more" if len(unknown) > shown
                                                          else "")
    return (f"{len(unknown)} word{'s' if len(unknown) > 1 else ''} of the class names and templates "
            f"{'are' if len(unknown) > 1 else 'is'} not in the model's vocabulary ({words}) and read as one unknown "
            "token, so classes that differ only there look alike: rename the classes with words the model knows "
            "(its training captions' words, e.g. --classnames FILE), or retrain with --set model.compact_vocab=false")


def zero_shot_accuracy(model: nn.Module, spec="world-zeroshot", *, batch_size: int = 64,
                       cache: EmbeddingCache | None = None) -> dict:
    """``{"acc1", "acc5", "mean_per_class_recall"}`` (fractions) of ``model`` on one zero-shot set."""
    return dict(zero_shot(model, spec, batch_size=batch_size, cache=cache)["metrics"])

"""Captioning as the COCO caption evaluation scores it: generated captions, or a COCO results file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dmclip.device import model_device
from dmclip.errors import DmclipError
from dmclip.evaluation.embeddings import as_float, image_batch
from dmclip.evaluation.loading import TASK_CAPTION, check_eval_model, dataset_name, load_dataset, task_result
from dmclip.metrics import caption as caption_metrics_module
from dmclip.progress import progress_bar


def caption(model: nn.Module, dataset="world-retrieval-a", *, method: str = "beam", num_beams: int = 3,
            top_p: float = 0.9, max_length: int = 30, min_length: int = 5, limit: int | None = None,
            batch_size: int = 32, meteor: bool = True, seed: int = 0, progress: bool = False,
            model_name: str = "") -> dict:
    """Captions every image (beam search or nucleus sampling) and scores them as the COCO caption eval.

    BLEU-1..4, METEOR, ROUGE-L and CIDEr against the dataset's captions, PTB-tokenized; the result's
    ``captions`` holds {sample index: generated caption}.
    """
    check_eval_model(model, "caption")
    if method not in ("beam", "nucleus"):
        raise DmclipError(f"unknown decoding method {method!r}", "use --method beam or --method nucleus")
    name, dataset, count = _caption_set(dataset, model.image_size, limit)
    import inspect

    device = model_device(model)
    accepts_generator = "generator" in inspect.signature(model.generate).parameters
    generator = torch.Generator(device=device).manual_seed(seed) if accepts_generator else None
    if not accepts_generator:
        torch.manual_seed(seed)
    candidates: dict[int, str] = {}
    references: dict[int, list[str]] = {}
    with torch.inference_mode(), progress_bar(progress, f"captioning {dataset_name(dataset)}", count) as advance:
        for start in range(0, count, batch_size):
            images, used = image_batch(dataset, range(start, min(start + batch_size, count)))
            kwargs = {"method": method, "num_beams": num_beams, "top_p": top_p, "max_length": max_length,
                      "min_length": min_length}
            if generator is not None:
                kwargs["generator"] = generator
            for index, text in zip(used, model.generate(as_float(images, device), **kwargs)):
                candidates[index] = text
                references[index] = list(dataset.captions(index))
            advance(len(used))
    return _scored(name, references, candidates, meteor, model_name, method=method, num_beams=num_beams,
                   top_p=top_p, max_length=max_length, min_length=min_length, seed=seed)


def _scored(name: str, references: dict[int, list[str]], candidates: dict[int, str], meteor: bool, model_name: str,
            **details) -> dict:
    """The captioning result of ``candidates`` against ``references``; ``captions`` holds the candidates."""
    metrics = caption_metrics_module.caption_metrics(references, candidates, meteor=meteor)
    notes = [] if meteor else ["METEOR skipped (--no-meteor)"]
    result = task_result(TASK_CAPTION, name, metrics, model_name, notes, num_images=len(candidates), **details)
    result["captions"] = candidates
    return result


def _caption_set(dataset, image_size: int | None, limit: int | None):
    """(name, image-text dataset, how many of its first images to caption) or a one-line DmclipError."""
    name = dataset_name(dataset)
    dataset = load_dataset(dataset, image_size)
    if getattr(dataset, "kind", "image-text") != "image-text":
        raise DmclipError(f"{dataset_name(dataset)} has no captions to compare with",
                          "use an image-text set, e.g. --data world-retrieval-a")
    count = len(dataset) if not limit else min(int(limit), len(dataset))
    if count == 0:
        raise DmclipError(f"{dataset_name(dataset)} has no samples", "check --data")
    return name, dataset, count


def read_predictions(predictions: str | Path, dataset="world-retrieval-a", limit: int | None = None):
    """(dataset name, dataset, {sample index: caption}) of a COCO results file, one caption for each of the first
    ``limit`` (or all) images; a one-line DmclipError otherwise."""
    name, dataset, count = _caption_set(dataset, None, limit)
    return name, dataset, caption_metrics_module.read_coco_results(predictions, count, len(dataset), name)


def score_captions(predictions: str | Path, dataset="world-retrieval-a", *, limit: int | None = None,
                   meteor: bool = True, model_name: str = "") -> dict:
    """Scores the captions of a COCO results file (``[{"image_id": <sample index>, "caption": ...}]``, see
    :func:`read_predictions`) against the dataset's references: :func:`caption`'s metrics and result, with
    ``details.predictions`` naming the file instead of the decoding settings."""
    name, dataset, candidates = read_predictions(predictions, dataset, limit)
    references = {index: list(dataset.captions(index)) for index in candidates}
    return _scored(name, references, candidates, meteor, model_name, predictions=str(predictions))


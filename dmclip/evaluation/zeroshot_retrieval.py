"""Image-text retrieval as CLIP_benchmark scores it, with BLIP's optional ITM re-ranking."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dmclip.device import model_device
from dmclip.errors import DmclipError
from dmclip.evaluation.embeddings import EmbeddingCache, as_float, encode_images, encode_texts, image_batch
from dmclip.evaluation.loading import (
    TASK_RETRIEVAL,
    check_eval_model,
    dataset_name,
    load_dataset,
    model_fingerprint,
    task_result,
)
from dmclip.metrics.retrieval import ranks_to_metrics, rerank, retrieval_ranks, similarity
from dmclip.progress import progress_bar


def _retrieval_texts(dataset, used: Sequence[int]) -> tuple[list[str], torch.Tensor]:
    texts, owner = [], []
    for row, index in enumerate(used):
        captions = [c for c in dataset.captions(index) if c and c.strip()]
        if not captions:
            raise DmclipError(f"{dataset_name(dataset)}: image {index} has no caption (empty references)",
                              "every image needs at least one caption; fix or drop it from the dataset")
        texts.extend(captions)
        owner.extend([row] * len(captions))
    return texts, torch.tensor(owner, dtype=torch.long)


def retrieval(model: nn.Module, dataset="world-retrieval-a", *, batch_size: int = 64, rerank_k: int = 0,
              cache: EmbeddingCache | None = None, fingerprint: str | None = None, progress: bool = False,
              model_name: str = "", items: dict | None = None) -> dict:
    """Image->text and text->image R@1/5/10 and mean/median rank with every caption of an image a positive.

    ``items``, when given, receives ``"t2i_r1"`` (per caption) and ``"i2t_r1"`` (per image): float 0/1 hits.

    ``rerank_k > 0`` re-ranks each query's top-k ITC candidates by the model's ITM match probability
    (BLIP models only), as BLIP's retrieval evaluation does.
    """
    check_eval_model(model, "retrieval", rerank_k)
    name = dataset_name(dataset)
    dataset = load_dataset(dataset, model.image_size)
    if getattr(dataset, "kind", "image-text") != "image-text":
        raise DmclipError(f"{dataset_name(dataset)} is a classification set, not an image-text set",
                          "retrieval needs captions: use e.g. --data world-retrieval-a")
    if len(dataset) == 0:
        raise DmclipError(f"{dataset_name(dataset)} has no samples", "check --data")
    fingerprint = fingerprint or (model_fingerprint(model) if cache is not None else None)
    image_features, used = encode_images(model, dataset, batch_size=batch_size, cache=cache, fingerprint=fingerprint,
                                         progress=progress, name=name)
    texts, text_to_image = _retrieval_texts(dataset, used)
    text_features = encode_texts(model, texts, batch_size=max(batch_size, 64), cache=cache, fingerprint=fingerprint,
                                 progress=progress, description="encoding captions")
    scores = similarity(image_features, text_features)  # (images, texts)
    notes = []
    if rerank_k:
        i2t, t2i = _itm_rerank(model, dataset, used, texts, scores, rerank_k, progress)
        image_scores, text_scores = i2t, t2i
        notes.append(f"top-{rerank_k} ITC candidates re-ranked by ITM match probability (ties: ITC similarity)")
    else:
        image_scores, text_scores = scores, None
    t2i_ranks, i2t_ranks = retrieval_ranks(image_scores, text_to_image, text_scores=text_scores)
    metrics = ranks_to_metrics(t2i_ranks, i2t_ranks)
    if items is not None:
        items["t2i_r1"], items["i2t_r1"] = (t2i_ranks <= 1).float(), (i2t_ranks <= 1).float()
    return task_result(TASK_RETRIEVAL, name, metrics, model_name, notes, num_images=len(used), num_texts=len(texts),
                       rerank_k=int(rerank_k))


@torch.inference_mode()
def _itm_rerank(model, dataset, used, texts, scores, k, progress) -> tuple[torch.Tensor, torch.Tensor]:
    device = model_device(model)
    tokens = model.tokenize(list(texts))

    def images_of(rows: torch.Tensor) -> torch.Tensor:
        images, _ = image_batch(dataset, [used[int(r)] for r in rows])
        return as_float(images, device)

    total = scores.shape[0] + scores.shape[1]
    with progress_bar(progress, f"ITM re-ranking top-{k}", total) as advance:
        def image_to_text(image_rows, text_rows):
            advance(len(image_rows) // min(k, scores.shape[1]))
            return model.itm_score(images_of(image_rows), tokens[text_rows].to(device))

        def text_to_image(text_rows, image_rows):
            advance(len(text_rows) // min(k, scores.shape[0]))
            return model.itm_score(images_of(image_rows), tokens[text_rows].to(device))

        i2t = rerank(scores, k, image_to_text)
        t2i = rerank(scores.t(), k, text_to_image)
    return i2t, t2i


def retrieval_recall(model: nn.Module, spec="world-retrieval-a", *, batch_size: int = 64,
                     cache: EmbeddingCache | None = None) -> dict:
    """``{"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", ...}`` (fractions) of ``model`` on one retrieval set."""
    metrics = retrieval(model, spec, batch_size=batch_size, cache=cache)["metrics"]
    return {f"{short}_r{k}": metrics[f"{long}_recall@{k}"] for short, long in (("t2i", "image_retrieval"),
            ("i2t", "text_retrieval")) for k in (1, 5, 10)}

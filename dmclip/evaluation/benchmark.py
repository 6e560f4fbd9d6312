"""The suite: the DM-CLIP table of zero-shot and retrieval sets and their average, Avg Perf."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dmclip.errors import DmclipError
from dmclip.evaluation.embeddings import EmbeddingCache
from dmclip.evaluation.loading import TASK_SUITE, dataset_name, load_model, model_fingerprint
from dmclip.evaluation.zeroshot_classification import zero_shot
from dmclip.evaluation.zeroshot_retrieval import retrieval

SUITE_ZERO_SHOT = ("world-zeroshot", "world-shift")
SUITE_RETRIEVAL = ("world-retrieval-a", "world-retrieval-b")


def registered_zero_shot_specs() -> list[str]:
    """The suite's zero-shot sets: world-zeroshot, world-shift, then every other registered
    classification set whose files are present (Fashion-MNIST when Debian's package is installed).

    A dataset factory declares itself with ``factory.kind = "classification"`` and, where it reads
    files, ``factory.available() -> bool``; nothing is built to find out.
    """
    from dmclip.registry import datasets

    extra = []
    for entry in datasets.entries():
        if entry.name in SUITE_ZERO_SHOT or getattr(entry.factory, "kind", None) != "classification":
            continue
        available = getattr(entry.factory, "available", None)
        if available is None or available():
            extra.append(entry.name)
    return [*SUITE_ZERO_SHOT, *extra]


def avg_perf_weights(zero_shot_specs: Sequence[str], retrieval_specs: Sequence[str]) -> dict[str, float]:
    """Avg Perf as a weighted sum of the suite's columns: each dataset weighs 1/D, a retrieval set's weight
    split evenly between its two directions."""
    count = len(zero_shot_specs) + len(retrieval_specs)
    weights = {f"{dataset_name(spec)} acc@1": 1.0 / count for spec in zero_shot_specs}
    for spec in retrieval_specs:
        weights[f"{dataset_name(spec)} T→I R@1"] = weights[f"{dataset_name(spec)} I→T R@1"] = 0.5 / count
    return weights


def suite_columns(zero_shot_specs: Sequence[str], retrieval_specs: Sequence[str]) -> list[str]:
    columns = [f"{dataset_name(spec)} acc@1" for spec in zero_shot_specs]
    for spec in retrieval_specs:
        columns += [f"{dataset_name(spec)} T→I R@1", f"{dataset_name(spec)} I→T R@1"]
    return [*columns, "Avg Perf"]


def suite(models: Mapping[str, nn.Module] | Sequence[str], *, zero_shot_specs: Sequence[str] | None = None,
          retrieval_specs: Sequence[str] = SUITE_RETRIEVAL, batch_size: int = 64, cache: EmbeddingCache | None = None,
          progress: bool = False, device=None, on_task: Callable[[dict], None] | None = None,
          items: dict | None = None) -> dict:
    """The DM-CLIP table: zero-shot acc@1 on each zero-shot set, T→I and I→T R@1 on each retrieval set and
    Avg Perf = mean over datasets of the main metric (acc@1; for retrieval the mean of T→I and I→T R@1,
    as DataComp averages them). ``models`` maps display names to models, or lists references to load.
    ``items``, when given, receives ``{model name: {column: per-item 0/1 hits (N,)}}`` (see
    ``avg_perf_weights`` for how the columns make Avg Perf).
    """
    zero_shot_specs = list(zero_shot_specs) if zero_shot_specs is not None else registered_zero_shot_specs()
    if not isinstance(models, Mapping):
        models = {ref: ref for ref in models}
    if not models:
        raise DmclipError("the suite needs at least one model", "pass --model REF (or --models A B C)")
    cache = cache if cache is not None else EmbeddingCache()
    columns = suite_columns(zero_shot_specs, retrieval_specs)
    rows, tasks = [], []
    for name, model in models.items():
        if isinstance(model, str):
            model = load_model(model, device)
        fingerprint = model_fingerprint(model)
        row: dict[str, Any] = {"model": name}
        main = []
        hits: dict[str, torch.Tensor] = {}
        for spec in zero_shot_specs:
            found: dict = {}
            result = zero_shot(model, spec, batch_size=batch_size, cache=cache, fingerprint=fingerprint,
                               progress=progress, model_name=name, items=found)
            tasks.append(result)
            hits[f"{dataset_name(spec)} acc@1"] = found["acc1"]
            row[f"{dataset_name(spec)} acc@1"] = result["metrics"]["acc1"]
            main.append(result["metrics"]["acc1"])
            if on_task:
                on_task(result)
        for spec in retrieval_specs:
            found = {}
            result = retrieval(model, spec, batch_size=batch_size, cache=cache, fingerprint=fingerprint,
                               progress=progress, model_name=name, items=found)
            tasks.append(result)
            hits[f"{dataset_name(spec)} T→I R@1"], hits[f"{dataset_name(spec)} I→T R@1"] = found["t2i_r1"], found["i2t_r1"]
            t2i, i2t = result["metrics"]["image_retrieval_recall@1"], result["metrics"]["text_retrieval_recall@1"]
            row[f"{dataset_name(spec)} T→I R@1"], row[f"{dataset_name(spec)} I→T R@1"] = t2i, i2t
            main.append((t2i + i2t) / 2)
            if on_task:
                on_task(result)
        row["Avg Perf"] = sum(main) / len(main) if main else float("nan")
        rows.append(row)
        if items is not None:
            items[name] = hits
    return {"task": TASK_SUITE, "models": list(models), "zero_shot": [dataset_name(s) for s in zero_shot_specs],
            "retrieval": [dataset_name(s) for s in retrieval_specs], "columns": columns, "rows": rows,
            "avg_perf_weights": avg_perf_weights(zero_shot_specs, retrieval_specs),
            "avg_perf": rows[0]["Avg Perf"] if len(rows) == 1 else None, "tasks": tasks,
            "cache": {"hits": cache.hits, "misses": cache.misses}}


def score_saved_model(model_dir, zero_shot_specs: Sequence[str], retrieval_specs: Sequence[str], *,
                      batch_size: int = 64) -> dict:
    """What a training run records when it ends, scored on exactly the model it saved in ``model_dir``:
    ``{"eval": {suite column: fraction, ..., "Avg Perf": ...}, "zeroshot": {acc1, acc5, mean_per_class_recall}
    of the first zero-shot set}`` (``zeroshot`` only when a zero-shot set is named)."""
    from dmclip.models.base import load_saved_model

    result = suite({"model": load_saved_model(model_dir)}, zero_shot_specs=zero_shot_specs,
                   retrieval_specs=retrieval_specs, batch_size=batch_size)
    scores = {"eval": {column: result["rows"][0][column] for column in result["columns"]}}
    if zero_shot_specs:
        scores["zeroshot"] = dict(result["tasks"][0]["metrics"])
    return scores

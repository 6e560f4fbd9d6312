"""Latency as an eval result: :func:`dmclip.metrics.latency.measure` in CLIP_benchmark's layout."""

from __future__ import annotations

from torch import nn

from dmclip.evaluation.loading import TASK_LATENCY, describe_ref, task_result
from dmclip.metrics import latency as latency_metrics


def latency(model: nn.Module, *, batch_size: int = 32, warmup: int = 5, runs: int = 30, threads: int | None = None,
            vs: nn.Module | None = None, model_name: str = "", vs_name: str = "") -> dict:
    """:func:`dmclip.metrics.latency.measure` as an eval result (CLIP_benchmark's layout, ``dataset`` None)."""
    measured = latency_metrics.measure(model, batch_size=batch_size, warmup=warmup, runs=runs, threads=threads, vs=vs)
    result = task_result(TASK_LATENCY, "", measured["metrics"], model_name, **measured["details"])
    result["dataset"] = None
    if vs is not None:
        vs_model, vs_pretrained = describe_ref(vs_name)
        result["vs"] = {"model": vs_model, "pretrained": vs_pretrained, **measured["vs"]}
    return result

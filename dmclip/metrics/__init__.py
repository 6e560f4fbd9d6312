"""Metrics as pure functions over tensors and strings: zero-shot, retrieval, caption, latency, and how well a
data filter removes noise (filtering).

Definitions follow CLIP_benchmark (zero-shot, retrieval), BLIP (retrieval re-ranking) and the COCO
caption evaluation (pycocoevalcap); docs/eval.md writes every formula out.
"""

from dmclip.metrics.caption import METRIC_KEYS as CAPTION_METRIC_KEYS
from dmclip.metrics.caption import caption_metrics, ptb_tokenize
from dmclip.metrics.filtering import noise_removal_metrics, precision_recall_curve
from dmclip.metrics.latency import count_flops, peak_tensor_bytes, summarize_times, time_calls
from dmclip.metrics.retrieval import best_positive_ranks, rerank, retrieval_metrics, similarity
from dmclip.metrics.zeroshot import class_embeddings, topk_accuracy, zero_shot_logits, zero_shot_metrics

__all__ = [
    "CAPTION_METRIC_KEYS", "best_positive_ranks", "caption_metrics", "class_embeddings", "count_flops",
    "noise_removal_metrics", "peak_tensor_bytes", "precision_recall_curve", "ptb_tokenize", "rerank",
    "retrieval_metrics", "similarity", "summarize_times", "time_calls", "topk_accuracy", "zero_shot_logits",
    "zero_shot_metrics",
]

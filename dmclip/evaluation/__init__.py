"""`dmclip eval` as a library: zero-shot, retrieval, captioning, latency and the suite.

Each task works on a model object and a dataset (object or spec) and returns one result in
CLIP_benchmark's layout, so their ``build`` step can merge ours:

    {"dataset": "world-zeroshot", "model": "...", "pretrained": "...", "task": "zeroshot_classification",
     "metrics": {"acc1": 0.31, "acc5": 0.88, "mean_per_class_recall": 0.30}, "notes": [...], "details": {...}}

    zero_shot(model, "world-zeroshot")              retrieval(model, "world-retrieval-a", rerank_k=16)
    caption(blip, "world-retrieval-a")              latency(model, vs=other_model)
    suite({"teacher": t, "student": s})             zero_shot_accuracy(model)  # the small helpers

One concern per module:

    loading                  references -> models and datasets, model checks, prompt files, the result layout
    embeddings               batched image/text embeddings and their cache (a suite encodes each split once)
    zeroshot_classification  zero_shot, zero_shot_accuracy
    zeroshot_retrieval       retrieval (with BLIP's ITM re-ranking), retrieval_recall
    captioning               caption, score_captions (a COCO results file), read_predictions
    benchmark                suite: the DM-CLIP table and Avg Perf
    output                   report.md tables, summary.md / summary.csv
    timing                   latency as an eval result

`dmclip eval` itself (one config per task and its run_* writer) is the command module dmclip.evaluate.

The measuring itself lives in dmclip.metrics (latency: dmclip.metrics.latency). Metrics are fractions in
[0, 1] in the files and percentages in tables; docs/eval.md defines every number.
"""

from dmclip.evaluation.benchmark import suite
from dmclip.evaluation.captioning import caption
from dmclip.evaluation.loading import load_model
from dmclip.evaluation.timing import latency
from dmclip.evaluation.zeroshot_classification import zero_shot, zero_shot_accuracy
from dmclip.evaluation.zeroshot_retrieval import retrieval

__all__ = ["caption", "latency", "load_model", "retrieval", "suite", "zero_shot", "zero_shot_accuracy"]

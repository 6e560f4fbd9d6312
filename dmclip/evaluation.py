"""`dmclip eval` as a library: zero-shot, retrieval, captioning, latency and the suite.

Each task works on a model object and a dataset (object or spec) and returns one result in
CLIP_benchmark's layout, so their ``build`` step can merge ours:

    {"dataset": "world-zeroshot", "model": "...", "pretrained": "...", "task": "zeroshot_classification",
     "metrics": {"acc1": 0.31, "acc5": 0.88, "mean_per_class_recall": 0.30}, "notes": [...], "details": {...}}

    zero_shot(model, "world-zeroshot")              retrieval(model, "world-retrieval-a", rerank_k=16)
    caption(blip, "world-retrieval-a")              latency(model, vs=other_model)
    suite({"teacher": t, "student": s})             zero_shot_accuracy(model)  # the small helpers

``run_*(config, run)`` are what the CLI calls: they load the model reference, run the task and write
results.json + report.md into the run directory. Metrics are fractions in [0, 1] in the files and
percentages in tables; docs/eval.md defines every number.

Image and text embeddings are computed in batches and cached per (model weights, dataset, texts) in an
``EmbeddingCache``, so a suite encodes each split once.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.config import field
from dmclip.errors import DmclipError
from dmclip.metrics import caption as caption_metrics_module
from dmclip.metrics import latency as latency_metrics
from dmclip.metrics.retrieval import ranks_to_metrics, rerank, retrieval_ranks, similarity
from dmclip.metrics.zeroshot import class_embeddings, ranked_classes, zero_shot_logits, zero_shot_metrics

log = logging.getLogger(__name__)

TASK_ZERO_SHOT = "zeroshot_classification"
TASK_RETRIEVAL = "zeroshot_retrieval"
TASK_CAPTION = "captioning"
TASK_LATENCY = "latency"
TASK_SUITE = "suite"

SUITE_ZERO_SHOT = ("world-zeroshot", "world-shift")
SUITE_RETRIEVAL = ("world-retrieval-a", "world-retrieval-b")
LATENCY_TEXT = "a photo of a small red circle on the left"


# ------------------------------------------------------------------------------------------ helpers


def load_model(ref: str, device: str | torch.device | None = None) -> nn.Module:
    """A model from a reference string (``run:``, ``open_clip:``, a registered name), in eval mode."""
    from dmclip.models.refs import load_model_ref

    model = load_model_ref(ref)
    if device is not None:
        model = model.to(resolve_device(device))
    return model.eval()


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DmclipError("device 'cuda' was asked for but no GPU is visible", "use --device cpu (or auto)")
    return device


def load_dataset(spec, image_size: int):
    """A dataset object from a spec string (a dataset object passes through)."""
    if not isinstance(spec, str):
        return spec
    try:
        from dmclip.data import build_dataset
    except ImportError:
        raise DmclipError("the dataset module (dmclip.data.build_dataset) is not available in this install",
                          "reinstall dmclip (`make install`)") from None
    return build_dataset(spec, image_size=image_size)


def dataset_name(dataset) -> str:
    if isinstance(dataset, str):
        return dataset
    return str(getattr(dataset, "spec", None) or getattr(dataset, "name", None) or type(dataset).__name__)


def describe_ref(ref: str) -> tuple[str, str]:
    """A model reference -> CLIP_benchmark's (model, pretrained) pair."""
    if ref.startswith("open_clip:") and not ref.startswith(("open_clip:local-dir:", "open_clip:hf-hub:")):
        parts = ref.split(":", 2)  # open_clip:<arch>:<tag or file> -> (arch, tag), as CLIP_benchmark names them
        return parts[1], (parts[2] if len(parts) > 2 else "")
    return ref, ""


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex) of the architecture and every weight: the model part of a cache key."""
    digest = hashlib.sha256(json.dumps(getattr(model, "arch", type(model).__name__), sort_keys=True,
                                       default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_model(model: nn.Module, task: str, rerank_k: int = 0) -> None:
    """Raise a one-line error when ``model`` cannot do ``task`` (zero-shot, retrieval, caption)."""
    if task in ("zero-shot", "retrieval"):
        _require(model, "encode_text", "zero-shot classification" if task == "zero-shot" else "retrieval")
    if task == "retrieval" and rerank_k and not callable(getattr(model, "itm_score", None)):
        raise DmclipError("--rerank-k needs a model with an image-text matching head (itm_score)",
                          "use a BLIP model (pretrain --model blip), or drop --rerank-k")
    if task == "caption" and not callable(getattr(model, "generate", None)):
        raise DmclipError("this model cannot write captions (it has no generate())",
                          "caption evaluation needs a captioner: a BLIP model (dmclip pretrain --model blip)")


def _require(model: nn.Module, what: str, task: str) -> None:
    if getattr(model, what, None) is None:
        raise DmclipError(f"{task} needs a model with {what}(), and this one has none",
                          "pass a full image-text model (a pretrain run, a distill run with its text tower, "
                          "or open_clip:<arch>)")


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty, non-comment lines of a text file (class names, templates)."""
    path = Path(path)
    if not path.is_file():
        raise DmclipError(f"{what} file {str(path)!r} does not exist", f"pass a text file with one {what[:-1]} per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise DmclipError(f"{what} file {str(path)!r} is empty", f"write one {what[:-1]} per line")
    return lines


def fill_template(template: str, classname: str) -> str:
    """'a photo of a {}.' (or CLIP_benchmark's '{c}') with the class name put in."""
    return template.replace("{c}", classname).replace("{}", classname)


def _check_templates(templates: Sequence[str]) -> list[str]:
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if bad:
        raise DmclipError(f"template {bad[0]!r} has no '{{}}' placeholder for the class name",
                          "write templates like 'a photo of a {}.'")
    return list(templates)


@contextlib.contextmanager
def _progress(enabled: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A Rich progress bar on stderr (library output goes nowhere else); a no-op when disabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# ------------------------------------------------------------------------------------ embeddings


class EmbeddingCache:
    """Normalised embeddings by key (model fingerprint + dataset or texts); in memory, optionally on disk."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def get(self, key: str) -> torch.Tensor | None:
        value = self._memory.get(key)
        if value is None and self.directory is not None and (self.directory / f"{key}.pt").is_file():
            value = torch.load(self.directory / f"{key}.pt", weights_only=True)
            self._memory[key] = value
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> torch.Tensor:
        self._memory[key] = value
        if self.directory is not None:
            from dmclip.runs import atomic_torch_save

            atomic_torch_save(value, self.directory / f"{key}.pt")
        return value


def _image_batch(dataset, indices: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """uint8 (B, 3, S, S) images and the sample indices actually returned (a bad image is replaced)."""
    fast = getattr(dataset, "images", None)
    if callable(fast):
        return fast(list(indices)), list(indices)
    samples = [dataset[i] for i in indices]
    return torch.stack([s["image"] for s in samples]), [int(s.get("index", i)) for s, i in zip(samples, indices)]


def _as_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    from dmclip.data import float_images

    return float_images(images.to(device))


@torch.inference_mode()
def encode_images(model: nn.Module, dataset, *, batch_size: int = 64, cache: EmbeddingCache | None = None,
                  fingerprint: str | None = None, progress: bool = False,
                  name: str | None = None) -> tuple[torch.Tensor, list[int]]:
    """Normalised image embeddings (N, D) of every sample (float32, CPU) and the sample indices used.

    ``name`` (the dataset spec, options included) is the dataset part of the cache key.
    """
    key = None
    name = name or dataset_name(dataset)
    if cache is not None:
        fingerprint = fingerprint or model_fingerprint(model)
        key = cache.key("image", fingerprint, name, len(dataset), getattr(dataset, "image_size", None))
        hit = cache.get(key)
        if hit is not None:
            return hit["features"], hit["indices"].tolist()
    device = model_device(model)
    features, used = [], []
    with _progress(progress, f"encoding images of {name}", len(dataset)) as advance:
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            images, returned = _image_batch(dataset, indices)
            features.append(F.normalize(model.encode_image(_as_float(images, device)).float(), dim=-1).cpu())
            used.extend(returned)
            advance(len(indices))
    out = torch.cat(features) if features else torch.zeros(0, 0)
    if cache is not None:
        cache.put(key, {"features": out, "indices": torch.tensor(used, dtype=torch.long)})
    return out, used


@torch.inference_mode()
def encode_texts(model: nn.Module, texts: Sequence[str], *, batch_size: int = 256,
                 cache: EmbeddingCache | None = None, fingerprint: str | None = None, progress: bool = False,
                 description: str = "encoding texts") -> torch.Tensor:
    """Normalised text embeddings (M, D), float32 on the CPU."""
    key = None
    if cache is not None:
        fingerprint = fingerprint or model_fingerprint(model)
        key = cache.key("text", fingerprint, hashlib.sha256("\n".join(texts).encode()).hexdigest(), len(texts))
        hit = cache.get(key)
        if hit is not None:
            return hit
    device = model_device(model)
    features = []
    with _progress(progress, description, len(texts)) as advance:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            tokens = model.tokenize(chunk).to(device)
            features.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
            advance(len(chunk))
    out = torch.cat(features) if features else torch.zeros(0, 0)
    return cache.put(key, out) if cache is not None else out


def _result(task: str, dataset, metrics: dict, model_name: str = "", notes: Sequence[str] = (), **details) -> dict:
    model, pretrained = describe_ref(model_name)
    return {"dataset": dataset_name(dataset), "model": model, "pretrained": pretrained, "task": task,
            "metrics": metrics, "language": "en", "notes": list(notes), "details": details}


# ------------------------------------------------------------------------------------------- tasks


def zero_shot(model: nn.Module, dataset="world-zeroshot", *, classnames: Sequence[str] | None = None,
              templates: Sequence[str] | None = None, batch_size: int = 64, cache: EmbeddingCache | None = None,
              fingerprint: str | None = None, progress: bool = False, model_name: str = "",
              items: dict | None = None) -> dict:
    """Zero-shot classification as CLIP_benchmark: acc1, acc5 (NaN under 5 classes), mean per-class recall.

    Class embedding = mean over templates of normalised text embeddings, renormalised; logits =
    100 · image · class. ``classnames``/``templates`` replace the dataset's. ``items``, when given, receives
    ``"acc1"``: the per-image top-1 hits (float 0/1, (N,)), for intervals over evaluation items.
    """
    check_model(model, "zero-shot")
    name = dataset_name(dataset)
    dataset = load_dataset(dataset, model.image_size)
    if getattr(dataset, "kind", "classification") != "classification":
        raise DmclipError(f"{dataset_name(dataset)} is an image-text set, not a classification set",
                          "zero-shot needs class labels: use e.g. --data world-zeroshot (retrieval takes image-text sets)")
    names = list(classnames) if classnames is not None else list(dataset.classnames)
    prompts = _check_templates(list(templates) if templates is not None else list(dataset.templates))
    if len(names) != len(dataset.classnames):
        raise DmclipError(f"{len(names)} class names given but {dataset_name(dataset)} has {len(dataset.classnames)} classes",
                          "give exactly one class name per class, in label order")
    if len(dataset) == 0:
        raise DmclipError(f"{dataset_name(dataset)} has no samples", "check --data")
    fingerprint = fingerprint or (model_fingerprint(model) if cache is not None else None)
    texts = [fill_template(t, c) for c in names for t in prompts]
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
    notes = scored.pop("notes")
    return _result(TASK_ZERO_SHOT, name, scored, model_name, notes, num_samples=len(labels),
                   num_classes=len(names), num_templates=len(prompts))


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
    check_model(model, "retrieval", rerank_k)
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
    return _result(TASK_RETRIEVAL, name, metrics, model_name, notes, num_images=len(used), num_texts=len(texts),
                   rerank_k=int(rerank_k))


@torch.inference_mode()
def _itm_rerank(model, dataset, used, texts, scores, k, progress) -> tuple[torch.Tensor, torch.Tensor]:
    device = model_device(model)
    tokens = model.tokenize(list(texts))

    def images_of(rows: torch.Tensor) -> torch.Tensor:
        images, _ = _image_batch(dataset, [used[int(r)] for r in rows])
        return _as_float(images, device)

    total = scores.shape[0] + scores.shape[1]
    with _progress(progress, f"ITM re-ranking top-{k}", total) as advance:
        def image_to_text(image_rows, text_rows):
            advance(len(image_rows) // min(k, scores.shape[1]))
            return model.itm_score(images_of(image_rows), tokens[text_rows].to(device))

        def text_to_image(text_rows, image_rows):
            advance(len(text_rows) // min(k, scores.shape[0]))
            return model.itm_score(images_of(image_rows), tokens[text_rows].to(device))

        i2t = rerank(scores, k, image_to_text)
        t2i = rerank(scores.t(), k, text_to_image)
    return i2t, t2i


def caption(model: nn.Module, dataset="world-retrieval-a", *, method: str = "beam", num_beams: int = 3,
            top_p: float = 0.9, max_length: int = 30, min_length: int = 5, limit: int | None = None,
            batch_size: int = 32, meteor: bool = True, seed: int = 0, progress: bool = False,
            model_name: str = "") -> dict:
    """Captions every image (beam search or nucleus sampling) and scores them as the COCO caption eval.

    BLEU-1..4, METEOR, ROUGE-L and CIDEr against the dataset's captions, PTB-tokenized; the result's
    ``captions`` holds {sample index: generated caption}.
    """
    check_model(model, "caption")
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
    with torch.inference_mode(), _progress(progress, f"captioning {dataset_name(dataset)}", count) as advance:
        for start in range(0, count, batch_size):
            images, used = _image_batch(dataset, range(start, min(start + batch_size, count)))
            kwargs = {"method": method, "num_beams": num_beams, "top_p": top_p, "max_length": max_length,
                      "min_length": min_length}
            if generator is not None:
                kwargs["generator"] = generator
            for index, text in zip(used, model.generate(_as_float(images, device), **kwargs)):
                candidates[index] = text
                references[index] = list(dataset.captions(index))
            advance(len(used))
    metrics = caption_metrics_module.caption_metrics(references, candidates, meteor=meteor)
    notes = [] if meteor else ["METEOR skipped (--no-meteor)"]
    result = _result(TASK_CAPTION, name, metrics, model_name, notes, num_images=len(candidates), method=method,
                     num_beams=num_beams, top_p=top_p, max_length=max_length, min_length=min_length, seed=seed)
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
    metrics = caption_metrics_module.caption_metrics(references, candidates, meteor=meteor)
    notes = [] if meteor else ["METEOR skipped (--no-meteor)"]
    result = _result(TASK_CAPTION, name, metrics, model_name, notes, num_images=len(candidates),
                     predictions=str(predictions))
    result["captions"] = candidates
    return result


def _encoder_parameters(model: nn.Module, fn: Callable[[], torch.Tensor]) -> int | None:
    """Parameters that one encoder call actually uses (those its output has a gradient path to)."""
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            out = fn()
            grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
        seen, total = set(), 0
        for p, g in zip(params, grads):
            if g is not None and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
    except RuntimeError as exc:  # an op without a backward: fall back to "unknown"
        log.warning("could not attribute parameters to an encoder (%s)", str(exc).splitlines()[0][:120])
        return None
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _measure_one(model: nn.Module, batch_sizes: Sequence[int]) -> tuple[dict, dict[str, Callable[[], object]]]:
    """Static numbers (params, FLOPs, memory) of one model and the timed calls (name -> fn)."""
    device = model_device(model)
    size = int(model.image_size)
    numbers: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    calls: dict[str, Callable[[], object]] = {}
    generator = torch.Generator().manual_seed(0)
    encoders = [("image", model.encode_image)]
    if getattr(model, "encode_text", None) is not None:
        encoders.append(("text", model.encode_text))
    for encoder, fn in encoders:
        inputs = {}
        for b in batch_sizes:
            inputs[b] = (torch.rand(b, 3, size, size, generator=generator).to(device) if encoder == "image"
                         else model.tokenize([LATENCY_TEXT] * b).to(device))
        one = inputs[batch_sizes[0]][:1]
        numbers[f"{encoder}_params"] = _encoder_parameters(model, lambda fn=fn, one=one: fn(one))
        numbers[f"{encoder}_flops"] = latency_metrics.count_flops(lambda fn=fn, one=one: fn(one))["flops"]
        for b in batch_sizes:
            x = inputs[b]
            numbers[f"{encoder}_b{b}_peak_bytes"] = latency_metrics.peak_tensor_bytes(
                lambda fn=fn, x=x: fn(x), exclude=[model, x])
            calls[f"{encoder}_b{b}"] = lambda fn=fn, x=x: fn(x)
    numbers["weights_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return numbers, calls


def latency(model: nn.Module, *, batch_size: int = 32, warmup: int = 5, runs: int = 30, threads: int | None = None,
            vs: nn.Module | None = None, model_name: str = "", vs_name: str = "") -> dict:
    """Image/text encoder latency (median, p90 over ``runs`` timed calls after ``warmup``) at batch 1 and
    ``batch_size``, parameters, FLOPs per item, peak activation memory; with ``vs``, the same for a second
    model measured in the same process (timed calls interleaved) and the ratios model / vs.
    """
    if batch_size < 1 or runs < 1 or warmup < 0:
        raise DmclipError("batch size and runs must be >= 1 and warmup >= 0", "e.g. --batch-size 32 --runs 30")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        batch_sizes = sorted({1, int(batch_size)})
        models = {"model": model} if vs is None else {"model": model, "vs": vs}
        numbers, calls = {}, {}
        for key, m in models.items():
            numbers[key], model_calls = _measure_one(m, batch_sizes)
            calls.update({f"{key}/{name}": fn for name, fn in model_calls.items()})
        times = latency_metrics.time_calls(calls, warmup=warmup, runs=runs, device=model_device(model))
        for name, seconds in times.items():
            key, call = name.split("/", 1)
            stats = latency_metrics.summarize_times(seconds)
            b = int(call.rsplit("_b", 1)[1])
            numbers[key][f"{call}_median_ms"] = stats["median_ms"]
            numbers[key][f"{call}_p90_ms"] = stats["p90_ms"]
            numbers[key][f"{call}_items_per_s"] = 1e3 * b / stats["median_ms"] if stats["median_ms"] > 0 else math.inf
        thread_count = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    details = {"batch_sizes": batch_sizes, "warmup": warmup, "runs": runs, "threads": thread_count,
               "interop_threads": torch.get_num_interop_threads(), "device": str(model_device(model)),
               "process_peak_rss_bytes": latency_metrics.process_peak_rss_bytes()}
    result = _result(TASK_LATENCY, "", numbers["model"], model_name, **details)
    result["dataset"] = None
    if vs is not None:
        vs_model, vs_pretrained = describe_ref(vs_name)
        ratios = {k: (v / numbers["vs"][k] if isinstance(v, (int, float)) and numbers["vs"].get(k) else None)
                  for k, v in numbers["model"].items()}
        result["vs"] = {"model": vs_model, "pretrained": vs_pretrained, "metrics": numbers["vs"], "ratios": ratios}
    return result


# -------------------------------------------------------------------------------------------- suite


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


def _best(rows: Sequence[dict], column: str) -> float | None:
    values = [r.get(column) for r in rows if isinstance(r.get(column), (int, float)) and not math.isnan(r[column])]
    return max(values) if values else None


def suite_markdown(result: dict) -> str:
    """The comparison table in markdown, percentages, the best value of each column in bold."""
    columns, rows = result["columns"], result["rows"]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if not isinstance(value, (int, float)) or math.isnan(value):
                cells.append("-")
                continue
            text = f"{100 * value:.2f}"
            cells.append(f"**{text}**" if len(rows) > 1 and value == _best(rows, column) else text)
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def suite_csv(result: dict) -> str:
    """The comparison table as CSV (fractions, full precision)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", *result["columns"]])
    for row in result["rows"]:
        writer.writerow([row["model"], *[("" if row.get(c) is None else repr(float(row[c]))) for c in result["columns"]]])
    return buffer.getvalue()


# -------------------------------------------------------------------------------- small helpers


def zero_shot_accuracy(model: nn.Module, spec="world-zeroshot", *, batch_size: int = 64,
                       cache: EmbeddingCache | None = None) -> dict:
    """``{"acc1", "acc5", "mean_per_class_recall"}`` (fractions) of ``model`` on one zero-shot set."""
    return dict(zero_shot(model, spec, batch_size=batch_size, cache=cache)["metrics"])


def retrieval_recall(model: nn.Module, spec="world-retrieval-a", *, batch_size: int = 64,
                     cache: EmbeddingCache | None = None) -> dict:
    """``{"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", ...}`` (fractions) of ``model`` on one retrieval set."""
    metrics = retrieval(model, spec, batch_size=batch_size, cache=cache)["metrics"]
    return {f"{short}_r{k}": metrics[f"{long}_recall@{k}"] for short, long in (("t2i", "image_retrieval"),
            ("i2t", "text_retrieval")) for k in (1, 5, 10)}


def suite_row(model: nn.Module, name: str = "model", **kwargs) -> dict:
    """One row of the suite table ({column: fraction, "Avg Perf": ...}) for one model."""
    return suite({name: model}, **kwargs)["rows"][0]


# ------------------------------------------------------------------------------------------ configs


@dataclass
class ZeroShotConfig:
    model: str = field("", "model reference: run:<dir>, builtin:<name>, open_clip:<arch>:<weights> or a registered name")
    data: str = field("world-zeroshot", "classification dataset spec (registered name or real format)")
    classnames: str = field("", "file with one class name per line, in label order ('' = the dataset's)")
    templates: str = field("", "file with one prompt template per line, '{}' marks the class ('' = the dataset's)")
    batch_size: int = field(64, "images per encoder call", min=1)
    device: str = field("auto", "cpu, cuda or auto (cuda when visible)")


@dataclass
class RetrievalConfig:
    model: str = field("", "model reference: run:<dir>, builtin:<name>, open_clip:<arch>:<weights> or a registered name")
    data: str = field("world-retrieval-a", "image-text dataset spec with one or more captions per image")
    rerank_k: int = field(0, "re-rank each query's top-k ITC candidates by ITM (BLIP models; 0 = off)", min=0)
    batch_size: int = field(64, "images per encoder call", min=1)
    device: str = field("auto", "cpu, cuda or auto (cuda when visible)")


@dataclass
class CaptionConfig:
    model: str = field("", "model reference of a captioner (a BLIP model)")
    data: str = field("world-retrieval-a", "image-text dataset spec whose captions are the references")
    method: str = field("beam", "decoding: beam search or nucleus sampling", choices=("beam", "nucleus"))
    num_beams: int = field(3, "beams for beam search", min=1)
    top_p: float = field(0.9, "nucleus sampling mass", min=0.0, max=1.0)
    max_length: int = field(30, "most tokens generated per caption", min=1)
    min_length: int = field(5, "fewest tokens before the caption may end", min=0)
    limit: int = field(0, "caption at most this many images (0 = all)", min=0)
    meteor: bool = field(True, "compute METEOR (starts a JVM, a few seconds)")
    seed: int = field(0, "seed for nucleus sampling")
    batch_size: int = field(32, "images per generate call", min=1)
    device: str = field("auto", "cpu, cuda or auto (cuda when visible)")
    predictions: str = field("", "COCO results file of captions to score instead of generating them "
                                 "('' = the model captions)")


@dataclass
class LatencyConfig:
    model: str = field("", "model reference to time")
    vs: str = field("", "a second model reference timed in the same process ('' = none)")
    batch_size: int = field(32, "the batch size timed besides batch 1", min=1)
    warmup: int = field(5, "untimed calls before timing", min=0)
    runs: int = field(30, "timed calls per encoder and batch size", min=1)
    threads: int = field(0, "torch intra-op threads (0 = leave as is)", min=0)
    device: str = field("cpu", "cpu, cuda or auto")


@dataclass
class SuiteConfig:
    models: list[str] = field([], "model references, one table row each")
    zero_shot: list[str] = field([], "zero-shot sets ([] = world-zeroshot, world-shift and every other registered one)")
    retrieval: list[str] = field(list(SUITE_RETRIEVAL), "retrieval sets (T→I and I→T R@1 each)")
    batch_size: int = field(64, "images per encoder call", min=1)
    device: str = field("auto", "cpu, cuda or auto (cuda when visible)")


# ------------------------------------------------------------------------------------- run entries


def _percent(value) -> str:
    return "-" if not isinstance(value, (int, float)) or math.isnan(value) else f"{100 * value:.2f}"


def _markdown_metrics(result: dict, rows: Sequence[tuple[str, str, Callable[[Any], str]]]) -> str:
    lines = ["| metric | value |", "|---|---:|"]
    for key, label, fmt in rows:
        if key in result["metrics"]:
            lines.append(f"| {label} | {fmt(result['metrics'][key])} |")
    return "\n".join(lines) + "\n"


def _header(title: str, ref: str, result: dict) -> str:
    text = f"# {title}\n\nmodel: `{ref}`"
    if result.get("dataset"):
        text += f"  \ndataset: `{result['dataset']}`"
    text += "\n\n"
    if result.get("notes"):
        text += "".join(f"> note: {n}\n" for n in result["notes"]) + "\n"
    return text


ZERO_SHOT_ROWS = [("acc1", "acc@1 (%)", _percent), ("acc5", "acc@5 (%)", _percent),
                  ("mean_per_class_recall", "mean per-class recall (%)", _percent)]
RETRIEVAL_ROWS = [*[(f"image_retrieval_recall@{k}", f"T→I R@{k} (%)", _percent) for k in (1, 5, 10)],
                  ("image_retrieval_mean_rank", "T→I mean rank", "{:.2f}".format),
                  ("image_retrieval_median_rank", "T→I median rank", "{:.1f}".format),
                  *[(f"text_retrieval_recall@{k}", f"I→T R@{k} (%)", _percent) for k in (1, 5, 10)],
                  ("text_retrieval_mean_rank", "I→T mean rank", "{:.2f}".format),
                  ("text_retrieval_median_rank", "I→T median rank", "{:.1f}".format)]
CAPTION_ROWS = [("bleu1", "BLEU-1 (%)", _percent), ("bleu2", "BLEU-2 (%)", _percent),
                ("bleu3", "BLEU-3 (%)", _percent), ("bleu4", "BLEU-4 (%)", _percent),
                ("meteor", "METEOR (%)", _percent), ("rouge_l", "ROUGE-L (%)", _percent),
                ("cider", "CIDEr (%)", _percent)]
FOOTER = "\nDefinitions of every number: docs/eval.md.\n"


def run_zero_shot(config: ZeroShotConfig, run, progress: bool = False, model: nn.Module | None = None) -> dict:
    model = model if model is not None else load_model(config.model, config.device)
    result = zero_shot(model, config.data, batch_size=config.batch_size, model_name=config.model, progress=progress,
                       classnames=read_lines(config.classnames, "classnames") if config.classnames else None,
                       templates=read_lines(config.templates, "templates") if config.templates else None)
    run.write_results(result)
    run.write_text("report.md", _header("Zero-shot classification", config.model, result)
                   + _markdown_metrics(result, ZERO_SHOT_ROWS) + FOOTER)
    return result


def run_retrieval(config: RetrievalConfig, run, progress: bool = False, model: nn.Module | None = None) -> dict:
    model = model if model is not None else load_model(config.model, config.device)
    result = retrieval(model, config.data, batch_size=config.batch_size, rerank_k=config.rerank_k,
                       model_name=config.model, progress=progress)
    run.write_results(result)
    run.write_text("report.md", _header("Image-text retrieval", config.model, result)
                   + _markdown_metrics(result, RETRIEVAL_ROWS) + FOOTER)
    return result


def run_caption(config: CaptionConfig, run, progress: bool = False, model: nn.Module | None = None) -> dict:
    if config.predictions:
        result = score_captions(config.predictions, config.data, limit=config.limit or None, meteor=config.meteor,
                                model_name=config.model)
    else:
        model = model if model is not None else load_model(config.model, config.device)
        result = caption(model, config.data, method=config.method, num_beams=config.num_beams, top_p=config.top_p,
                         max_length=config.max_length, min_length=config.min_length, limit=config.limit or None,
                         batch_size=config.batch_size, meteor=config.meteor, seed=config.seed,
                         model_name=config.model, progress=progress)
    captions = result.pop("captions")
    # COCO results format, so the captions can be re-scored by any COCO tool
    run.write_text("captions.json", json.dumps([{"image_id": k, "caption": v} for k, v in captions.items()], indent=1))
    run.write_results(result)
    samples = "\n".join(f"| {k} | {v} |" for k, v in list(captions.items())[:10])
    run.write_text("report.md", _header("Captioning", config.model or f"predictions {config.predictions}", result)
                   + _markdown_metrics(result, CAPTION_ROWS)
                   + "\nCIDEr is shown ×100 like the other scores (results.json keeps the raw value).\n"
                   + f"\n## First captions\n\n| image | caption |\n|---|---|\n{samples}\n" + FOOTER)
    result["captions"] = captions
    return result


def latency_rows(result: dict) -> list[dict]:
    """(encoder, batch) rows with the numbers a table shows; "model" is "model" or "vs" (the legend names them)."""
    rows = []
    models = [("model", result["metrics"])] + ([("vs", result["vs"]["metrics"])] if "vs" in result else [])
    for who, metrics in models:
        for encoder in ("image", "text"):
            for b in result["details"]["batch_sizes"]:
                if f"{encoder}_b{b}_median_ms" not in metrics:
                    continue
                row = {"model": who, "encoder": encoder,
                       "batch": b, "median ms": metrics[f"{encoder}_b{b}_median_ms"],
                       "p90 ms": metrics[f"{encoder}_b{b}_p90_ms"],
                       "items/s": metrics[f"{encoder}_b{b}_items_per_s"],
                       "params M": (metrics.get(f"{encoder}_params") or float("nan")) / 1e6,
                       "GFLOPs/item": metrics[f"{encoder}_flops"] / 1e9,
                       "peak act. MiB": metrics[f"{encoder}_b{b}_peak_bytes"] / 2**20}
                if who == "model" and "vs" in result:
                    ratio = result["vs"]["ratios"].get(f"{encoder}_b{b}_median_ms")
                    row["× vs"] = ratio
                rows.append(row)
    return rows


def run_latency(config: LatencyConfig, run, progress: bool = False, model: nn.Module | None = None,
                vs_model: nn.Module | None = None) -> dict:
    model = model if model is not None else load_model(config.model, config.device)
    vs = vs_model if vs_model is not None else (load_model(config.vs, config.device) if config.vs else None)
    result = latency(model, batch_size=config.batch_size, warmup=config.warmup, runs=config.runs,
                     threads=config.threads or None, vs=vs, model_name=config.model, vs_name=config.vs)
    run.write_results(result)
    rows = latency_rows(result)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        table.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                                       for c in columns) + " |")
    details = result["details"]
    legend = f"model = `{config.model}`" + (f", vs = `{config.vs}`" if config.vs else "") + "\n\n"
    run.write_text("report.md", _header("Latency", config.model, result) + legend + "\n".join(table) + "\n\n"
                   + f"threads: {details['threads']}, device: {details['device']}, warmup {details['warmup']}, "
                     f"{details['runs']} timed runs per row; total parameters {result['metrics']['params']:,}\n"
                   + FOOTER)
    return result


def run_suite(config: SuiteConfig, run, progress: bool = False, models: Mapping[str, nn.Module] | None = None) -> dict:
    if not config.models:
        raise DmclipError("the suite needs at least one model", "pass --model REF or --models A B C")
    tasks_dir = run.path / "tasks"

    def save_task(result: dict) -> None:  # one CLIP_benchmark file per (model, dataset, task)
        from dmclip.runs import _slug, atomic_write_json

        name = f"{_slug(result['model'] + '_' + result['pretrained'])}__{_slug(result['dataset'])}__{result['task']}.json"
        atomic_write_json(tasks_dir / name, result)

    given = models or {}
    loaded = {ref: given.get(ref) or load_model(ref, config.device) for ref in config.models}
    result = suite(loaded, zero_shot_specs=config.zero_shot or None, retrieval_specs=config.retrieval,
                   batch_size=config.batch_size, progress=progress, device=config.device, on_task=save_task)
    run.write_results(result)
    markdown = suite_markdown(result)
    run.write_text("summary.md", markdown)
    run.write_text("summary.csv", suite_csv(result))
    notes = sorted({f"{t['dataset']}: {n}" for t in result["tasks"] for n in t["notes"]})
    run.write_text("report.md", "# Evaluation suite\n\nAll numbers in %; best per column in bold.\n\n" + markdown
                   + ("\n" + "".join(f"> note: {n}\n" for n in notes) if notes else "") + FOOTER)
    return result


RUNNERS: dict[type, Callable] = {ZeroShotConfig: run_zero_shot, RetrievalConfig: run_retrieval,
                                 CaptionConfig: run_caption, LatencyConfig: run_latency, SuiteConfig: run_suite}


def run(config, run_dir, progress: bool = False) -> dict:
    """Run the eval task the config's type names inside ``run_dir`` (a RunDir); returns the result."""
    for cls, fn in RUNNERS.items():
        if isinstance(config, cls):
            return fn(config, run_dir, progress=progress)
    raise TypeError(f"not an eval config: {type(config).__name__}")


"""`dmclip capfilt`: BLIP's CapFilt (Li et al., 2022, sec. 3.3) — caption, filter, write a new dataset.

For every image of a (noisy, web-like) image-text set:

- the captioner (BLIP's image-grounded decoder) writes ``num_captions`` synthetic captions, by nucleus
  sampling (top-p 0.9) by default: BLIP found sampling's diversity beats beam search here;
- the filter (BLIP's image-grounded encoder + ITM head) scores every (image, web caption) and (image,
  synthetic caption) pair; pairs under ``threshold`` are dropped (or all but the ``keep_fraction`` best).

Optionally both are first fine-tuned on a small clean set with the training engine, as BLIP does on COCO.

Work is done in shards of ``shard_size`` images. A shard is committed by writing
``<out>/shards/shard-NNNNNN.json`` (its samples, captions and ITM scores) after its images; a rerun with
the same ``--out`` skips committed shards and redoes the rest, so no sample is ever written twice.
The dataset files are then (re)written from all shards in one cheap pass:

    <out>/captions.csv       open_clip layout (filepath, caption): ``csv:<out>/captions.csv``
    <out>/wds/shard-*.tar    with format=wds: ``wds:<out>/wds``
    <out>/images/*.png       the images (exact pixels)
    <out>/manifest.jsonl     per sample: every caption with its source (web/synthetic), ITM score, kept
    <out>/capfilt-state.json what produced the shards (a rerun with other settings is refused)

Because the scores are stored, a rerun with another threshold or keep fraction only re-filters.

Noise removal is scored where the data knows which web captions are wrong (``world-noisy``'s
``caption_is_noisy``): positive = a noisy web caption, predicted positive = removed by the filter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dmclip.config import field
from dmclip.data.base import float_images, image_batch
from dmclip.errors import DmclipError
from dmclip.train import TrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "capfilt-state.json"
STATE_VERSION = 1
SOURCES = ("web", "synthetic")


# ------------------------------------------------------------------------------------------- config


@dataclass
class CaptionerConfig:
    method: Literal["nucleus", "beam"] = field("nucleus", "decoding: nucleus sampling (BLIP's choice for CapFilt) "
                                                          "or beam search")
    num_captions: int = field(1, "synthetic captions written per image (0 = filter the web captions only)",
                              min=0, max=64)
    top_p: float = field(0.9, "nucleus sampling: smallest token set with this probability mass", min=0.0, max=1.0)
    num_beams: int = field(3, "beam search: beams (raised to num_captions when smaller)", min=1)
    min_length: int = field(5, "fewest tokens per synthetic caption (after the prompt, end token included)", min=0)
    max_length: int = field(20, "most tokens per synthetic caption (capped by the model's context length)", min=1)


SCORES = ("itm", "itc", "itm+itc")


@dataclass
class FilterConfig:
    score: Literal["itm", "itc", "itm+itc"] = field(
        "itm", "what the filter ranks pairs by: itm = BLIP's ITM match probability; itc = cosine of the unimodal "
               "image and text embeddings; itm+itc = logit(itm) + itc / temperature (all three are stored)")
    threshold: float = field(0.5, "keep a pair whose score is >= this (itm: a probability)", min=-1e9, max=1e9)
    keep_fraction: float = field(0.0, "when > 0: keep exactly round(fraction x pairs) pairs, those with the highest "
                                      "ITM scores (web and synthetic together), instead of the threshold",
                                 min=0.0, max=1.0)
    calibrate_on: str = field("", "clean image-text set whose own pairs set the threshold ('' = use threshold): "
                                  "the score that keeps clean_keep of them, e.g. world-train:size=1000")
    clean_keep: float = field(0.95, "with calibrate_on: fraction of the clean set's pairs the threshold keeps",
                              min=0.0, max=1.0)
    calibrate_limit: int = field(1000, "with calibrate_on: images of the clean set scored (0 = all)", min=0)


def _finetune_train() -> TrainConfig:
    return TrainConfig(steps=100, batch_size=32, lr=1e-4, warmup_steps=10, checkpoint_every=50)


@dataclass
class FinetuneConfig:
    data: str = field("", "clean image-text set to fine-tune captioner + filter on first ('' = none), "
                          "e.g. world-train-clean (BLIP uses COCO)")
    train: TrainConfig = field(factory=_finetune_train, help="fine-tuning optimisation (steps, lr, ...)")


@dataclass
class OutputConfig:
    out: str = field("", "output dataset directory; a rerun with the same directory continues it")
    format: Literal["csv", "wds"] = field("csv", "dataset files: csv (captions.csv + images/) or wds "
                                                 "(webdataset tar shards in wds/); the manifest is always written")
    shard_size: int = field(256, "images per work shard: the unit of resume", min=1)
    examples: int = field(8, "removed / added captions shown in report.md", min=0)


@dataclass
class CapfiltConfig:
    model: str = field("", "BLIP model reference, e.g. run:runs/pretrain/<blip run> (needs an ITM head and a "
                           "caption decoder)")
    data: str = field("world-noisy", "image-text set to bootstrap (registered name, csv:PATH, wds:PATH ...)")
    seed: int = field(0, "seed for caption sampling (per shard, so a resumed shard writes the same captions) "
                         "and fine-tuning")
    batch_size: int = field(64, "images per captioner / filter call", min=1)
    limit: int = field(0, "process only the first N images (0 = all)", min=0)
    device: str = field("auto", "auto (CUDA when available) | cpu | cuda", choices=("auto", "cpu", "cuda"))
    progress: bool = field(True, "Rich progress bar with images/s on stderr")
    captioner: CaptionerConfig = field(factory=CaptionerConfig, help="synthetic captions")
    filter: FilterConfig = field(factory=FilterConfig, help="ITM filter")
    finetune: FinetuneConfig = field(factory=FinetuneConfig, help="optional fine-tuning on a clean set first")
    output: OutputConfig = field(factory=OutputConfig, help="the new dataset")


# ------------------------------------------------------------------------------ filtering and scoring


def select_kept(scores: Sequence[float], threshold: float = 0.5, keep_fraction: float = 0.0) -> tuple[np.ndarray,
                                                                                                      float]:
    """Which pairs survive the filter -> (kept bool mask, the threshold in effect).

    ``keep_fraction > 0``: exactly ``round(keep_fraction * n)`` pairs are kept, the highest scores (ties go to
    the earlier pair); the threshold in effect is the lowest kept score. Otherwise a pair is kept when
    ``score >= threshold``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    kept = np.zeros(len(scores), dtype=bool)
    if keep_fraction > 0:
        count = int(round(keep_fraction * len(scores)))
        order = np.argsort(-scores, kind="stable")
        kept[order[:count]] = True
        return kept, (float(scores[order[count - 1]]) if count else math.inf)
    return scores >= threshold, float(threshold)


def calibrated_threshold(clean_scores: Sequence[float], clean_keep: float) -> float:
    """The threshold that keeps ``clean_keep`` of known-clean pairs: their ``(1 - clean_keep)`` quantile.

    An ITM head trained on 1 match : 2 hard non-matches at small scale is under-confident (clean pairs score
    well under BLIP's 0.5); a threshold read off a small clean set, as BLIP has COCO, needs no noise labels.
    The highest threshold with at least ``ceil(clean_keep * n)`` of the n clean scores at or above it.
    """
    scores = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if scores.size == 0:
        raise DmclipError("the calibration set gave no image-caption pairs", "pass a non-empty --calibrate-on set")
    count = math.ceil(clean_keep * scores.size - 1e-9)  # clean pairs that must stay
    return float(scores[scores.size - count]) if count else math.inf


def score_clean_pairs(model, spec: str, limit: int, batch_size: int, device: torch.device,
                      score: str = "itm") -> list[float]:
    """``score`` (see :func:`pair_scores`) of every (image, own caption) pair of a clean set's first ``limit`` images."""
    from dmclip.data import build_dataset

    dataset = build_dataset(spec, image_size=model.image_size)
    if getattr(dataset, "kind", "image-text") != "image-text":
        raise DmclipError(f"{spec} is a classification set; calibration needs images with their captions",
                          "use an image-text set, e.g. --calibrate-on world-train:size=1000")
    count = len(dataset) if not limit else min(limit, len(dataset))
    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
            images = image_batch(samples).to(device)
            rows = [(row, text) for row, s in enumerate(samples) for text in s["captions"]]
            if not rows:
                continue
            image_tokens = model.encode_image_tokens(images)
            index = torch.tensor([r for r, _ in rows], device=device)
            tokens = model.tokenize([t for _, t in rows]).to(device)
            scores += pair_scores(model, image_tokens, index, tokens)[score]
    return scores


def noise_removal_metrics(is_noisy: Sequence[bool], removed: Sequence[bool]) -> dict:
    """Precision / recall / F1 of noise removal: positive = a noisy caption, predicted positive = removed.

    precision = noisy removed / removed, recall = noisy removed / noisy; None where the denominator is 0.
    """
    noisy = np.asarray(is_noisy, dtype=bool)
    removed = np.asarray(removed, dtype=bool)
    if noisy.shape != removed.shape:
        raise ValueError(f"{noisy.shape} noise labels for {removed.shape} filter decisions")
    tp = int((noisy & removed).sum())
    fp = int((~noisy & removed).sum())
    fn = int((noisy & ~removed).sum())
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (2 * precision * recall / (precision + recall) if precision is not None and recall is not None
          and precision + recall > 0 else None)
    return {"precision": precision, "recall": recall, "f1": f1, "true_positives": tp, "false_positives": fp,
            "false_negatives": fn, "true_negatives": int((~noisy & ~removed).sum()), "noisy": int(noisy.sum()),
            "removed": int(removed.sum()), "total": int(len(noisy))}


def precision_recall_curve(scores: Sequence[float], is_noisy: Sequence[bool]) -> dict:
    """Noise-removal precision and recall at every threshold that changes the decision.

    The filter removes a pair when ``score < threshold``; each point i removes exactly the pairs scored
    below ``thresholds[i]`` (thresholds ascending: recall rises, from the lowest-scored group up to all).
    Also returns the average precision (sum over points of precision x recall gained, as scikit-learn).
    """
    scores = np.asarray(scores, dtype=np.float64)
    noisy = np.asarray(is_noisy, dtype=bool)
    if not len(scores) or not noisy.any():
        return {"thresholds": [], "precision": [], "recall": [], "average_precision": None}
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_noisy = scores[order], noisy[order]
    distinct = np.unique(sorted_scores)  # ascending
    # a threshold just above each distinct score removes that score's group and every lower one
    thresholds = np.nextafter(distinct, np.inf)
    removed = np.searchsorted(sorted_scores, thresholds, side="left")  # pairs with score < threshold
    cumulative_noisy = np.concatenate([[0], np.cumsum(sorted_noisy)])
    tp = cumulative_noisy[removed]
    precision = tp / removed
    recall = tp / noisy.sum()
    gained = np.diff(np.concatenate([[0.0], recall]))
    return {"thresholds": thresholds.tolist(), "precision": precision.tolist(), "recall": recall.tolist(),
            "average_precision": float((gained * precision).sum())}


def _thin(curve: dict, points: int = 201) -> dict:
    """At most ``points`` evenly spaced points of a long curve (results.json stays small)."""
    n = len(curve["thresholds"])
    if n <= points:
        return curve
    keep = np.unique(np.linspace(0, n - 1, points).round().astype(int))
    return {**curve, **{k: [curve[k][i] for i in keep] for k in ("thresholds", "precision", "recall")}}


# ------------------------------------------------------------------------------------------- model


def check_model(model, ref: str) -> None:
    """A one-line error unless ``model`` can caption (generate) and filter (itm_score)."""
    missing = [what for what, attr in (("an ITM head (itm_score)", "itm_score"),
                                       ("unimodal image embeddings from tokens (image_embedding)", "image_embedding"),
                                       ("a caption decoder (generate)", "generate"))
               if not callable(getattr(model, attr, None))]
    if missing:
        family = (getattr(model, "arch", None) or {}).get("family", type(model).__name__)
        raise DmclipError(f"capfilt needs a BLIP model with {' and '.join(missing)}; {ref} is a {family} model "
                          "without it",
                          "pretrain one with `dmclip pretrain --objective blip` and pass --model run:<that run>")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DmclipError("device 'cuda' was asked for but no GPU is visible", "use device=cpu (or auto)")
    return torch.device(name)


def finetune(model, cfg: CapfiltConfig, run) -> dict:
    """Fine-tune captioner + filter (all BLIP losses) on ``cfg.finetune.data`` with the engine, in ``run``."""
    from dmclip.data import build_dataset
    from dmclip.models.blip import BlipTask
    from dmclip.train import fit

    dataset = build_dataset(cfg.finetune.data, image_size=model.image_size)
    if getattr(dataset, "kind", "image-text") != "image-text":
        raise DmclipError(f"{cfg.finetune.data} is a classification set; fine-tuning needs captions",
                          "use an image-text set, e.g. --finetune-on world-train-clean")
    train = cfg.finetune.train
    task = BlipTask(model, cfg.seed, max(1, len(dataset) // train.batch_size))
    summary = fit(task, dataset, train, run, seed=cfg.seed, resume=run.checkpoint_path("last.pt").exists())
    model.eval()
    return summary


# ------------------------------------------------------------------------------------------ shards


def _shard_name(k: int) -> str:
    return f"shard-{k:06d}.json"


def _shard_seed(seed: int, shard: int) -> int:
    digest = hashlib.blake2b(f"capfilt:{seed}:{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _read_shard(path: Path, start: int, stop: int) -> dict | None:
    """A committed shard, or None when it is missing or damaged (it is then redone)."""
    try:
        shard = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(shard, dict) or shard.get("start") != start or shard.get("stop") != stop:
        return None
    return shard


def _encode_png(image: torch.Tensor) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.inference_mode()
def score_batch(model, images: torch.Tensor, web: list[list[str]], cfg: CapfiltConfig,
                generator: torch.Generator | None) -> list[list[dict]]:
    """Caption and score one batch: images float (B, 3, S, S) in [0, 1]; web captions per image.

    Returns per image a list of ``{"text", "source", "itm", "itc", "itm+itc"}`` (web captions first, then
    distinct non-empty synthetic captions); see :func:`pair_scores`.
    """
    image_tokens = model.encode_image_tokens(images)  # (B, M, Dv): shared by the decoder and the filter
    captioner = cfg.captioner
    synthetic: list[list[str]] = [[] for _ in web]
    if captioner.num_captions:
        out = model.generate(image_tokens=image_tokens, method=captioner.method, top_p=captioner.top_p,
                             num_beams=max(captioner.num_beams, captioner.num_captions),
                             max_length=captioner.max_length, min_length=captioner.min_length,
                             num_return=captioner.num_captions, generator=generator)
        for row, texts in enumerate(out):
            texts = [texts] if isinstance(texts, str) else texts
            seen: set[str] = set()
            for text in texts:
                text = " ".join(text.split())
                if text and text not in seen:
                    seen.add(text)
                    synthetic[row].append(text)
    pairs = [(row, text, source) for row in range(len(web))
             for source, texts in (("web", web[row]), ("synthetic", synthetic[row])) for text in texts]
    if not pairs:
        return [[] for _ in web]
    rows = torch.tensor([p[0] for p in pairs], device=image_tokens.device)
    tokens = model.tokenize([p[1] for p in pairs]).to(image_tokens.device)
    scores = pair_scores(model, image_tokens, rows, tokens)
    result: list[list[dict]] = [[] for _ in web]
    for i, (row, text, source) in enumerate(pairs):
        result[row].append({"text": text, "source": source, **{key: scores[key][i] for key in SCORES}})
    return result


def pair_scores(model, image_tokens: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
                chunk: int = 256) -> dict[str, list[float]]:
    """The three filter scores of pairs (image ``rows[i]`` of ``image_tokens``, caption ``tokens[i]``).

    itm: BLIP's ITM match probability (image-grounded encoder); itc: cosine of the unimodal image and text
    embeddings (the ITC features); itm+itc: ``logit(itm) + itc / temperature``, both evidences as logits.
    Rounded to 6 decimals, as stored in the manifest.
    """
    import torch.nn.functional as F

    image_feat = F.normalize(model.image_embedding(image_tokens).float(), dim=-1)  # (B, E): encode_image
    itm, itc = [], []
    for i in range(0, len(rows), chunk):
        part, text = rows[i:i + chunk], tokens[i:i + chunk]
        itm.append(model.itm_score(None, text, image_tokens=image_tokens[part]).float())
        itc.append((image_feat[part] * F.normalize(model.encode_text(text).float(), dim=-1)).sum(-1))
    p, cos = torch.cat(itm).double(), torch.cat(itc).double()
    eps = 1e-6
    both = torch.logit(p.clamp(eps, 1 - eps)) + cos / float(model.temp)
    return {"itm": [round(float(v), 6) for v in p], "itc": [round(float(v), 6) for v in cos],
            "itm+itc": [round(float(v), 6) for v in both]}


def process_shard(model, dataset, k: int, start: int, stop: int, cfg: CapfiltConfig, out: Path,
                  device: torch.device, advance: Callable[[int], None]) -> dict:
    """Caption, score and write the images of samples [start, stop); commit the shard file last."""
    from dmclip.runs import atomic_write_json

    began = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(_shard_seed(cfg.seed, k))
    samples, skipped = [], 0
    (out / "images").mkdir(exist_ok=True)
    for begin in range(start, stop, cfg.batch_size):
        items = []
        for i in range(begin, min(begin + cfg.batch_size, stop)):
            item = dataset[i]
            if int(item["index"]) != i:  # a bad sample, replaced by the dataset with another one: skip it
                skipped += 1
                continue
            items.append(item)
        if items:
            images = torch.stack([s["image"] for s in items])
            floats = float_images(images)
            scored = score_batch(model, floats.to(device), [list(s["captions"]) for s in items], cfg, generator)
            for item, image, captions in zip(items, images, scored):
                index = int(item["index"])
                name = f"images/{index:08d}.png"
                (out / name).write_bytes(_encode_png(image.cpu().to(torch.uint8)))
                noisy, kinds = item.get("caption_is_noisy"), item.get("noise_kind")
                web_rank = 0
                for caption in captions:
                    if caption["source"] == "web":
                        if noisy is not None:
                            caption["noisy"] = bool(noisy[web_rank])
                        if kinds is not None:
                            caption["noise_kind"] = kinds[web_rank]
                        web_rank += 1
                samples.append({"index": index, "image": name, "captions": captions})
        advance(min(begin + cfg.batch_size, stop) - begin)
    shard = {"shard": k, "start": start, "stop": stop, "samples": samples, "skipped": skipped,
             "seconds": time.perf_counter() - began}
    atomic_write_json(out / "shards" / _shard_name(k), shard)
    return shard


# --------------------------------------------------------------------------------------- progress


@contextlib.contextmanager
def _progress(enabled: bool, total: int, done: int) -> Iterator[Callable[[int], None]]:
    """Rich progress on stderr with images/s (the library's only terminal output); a no-op when disabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} images/s" if task.speed else "- images/s")

    columns = (TextColumn("capfilt"), BarColumn(), MofNCompleteColumn(), Speed(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("capfilt", total=total, completed=done)
        yield lambda n: bar.advance(task, n)


# ------------------------------------------------------------------------------------------ output


def _out_path(out_text: str) -> Path:
    """``--out`` as a path, or a one-line error when it cannot be a new dataset directory."""
    if not out_text:
        raise DmclipError("capfilt needs an output directory", "pass --out <new dataset dir>")
    out = Path(out_text).expanduser()
    if not out.parent.is_dir():
        raise DmclipError(f"the parent of --out {out} does not exist ({out.parent})",
                          "create it first, or choose an --out inside an existing directory")
    if out.exists() and not out.is_dir():
        raise DmclipError(f"--out {out} is a file", "choose a directory path for the new dataset")
    return out


def _prepare_out(out_text: str, state: dict) -> Path:
    """Check ``--out`` and its state file: a new directory, or one this same configuration started."""
    from dmclip.runs import atomic_write_json

    out = _out_path(out_text)
    state_path = out / STATE_FILE
    if out.is_dir() and any(out.iterdir()):
        if not state_path.is_file():
            raise DmclipError(f"--out {out} is not empty and holds no capfilt output",
                              "choose a new directory (an existing one is only continued when capfilt started it)")
        try:
            previous = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise DmclipError(f"{state_path} cannot be read", "remove the damaged directory or choose a new --out") \
                from None
        changed = [key for key in state if previous.get(key) != state[key]]
        if changed:
            raise DmclipError(f"--out {out} was started with other settings ({', '.join(changed)} differ); "
                              "continuing would mix two datasets",
                              "use a new --out, or repeat the first run's settings (only the filter's threshold "
                              "and keep fraction may change)")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if not state_path.is_file():
        atomic_write_json(state_path, state)
    return out


def _write_dataset(out: Path, samples: list[dict], fmt: str, shard_size: int) -> tuple[str, int]:
    """captions.csv (or wds shards) from the kept captions, and the manifest; returns (spec, images written)."""
    import csv
    import io

    from dmclip.runs import atomic_write_text

    manifest = "".join(json.dumps(s) + "\n" for s in samples)
    atomic_write_text(out / "manifest.jsonl", manifest)
    with_captions = [s for s in samples if any(c["kept"] for c in s["captions"])]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filepath", "caption"])
    for sample in with_captions:
        for caption in sample["captions"]:
            if caption["kept"]:
                writer.writerow([sample["image"], caption["text"]])
    atomic_write_text(out / "captions.csv", buffer.getvalue())
    if fmt == "csv":
        return f"csv:{out / 'captions.csv'}", len(with_captions)
    import tarfile

    from dmclip.runs import atomic_write_bytes

    folder = out / "wds"
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("shard-*.tar"):
        stale.unlink()
    for number, begin in enumerate(range(0, len(with_captions), shard_size)):
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w") as tar:
            for sample in with_captions[begin:begin + shard_size]:
                key = f"{sample['index']:08d}"
                texts = [c["text"] for c in sample["captions"] if c["kept"]]
                members = {"png": (out / sample["image"]).read_bytes(),
                           "json": json.dumps({"captions": texts, "index": sample["index"]}).encode()}
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        atomic_write_bytes(folder / f"shard-{number:06d}.tar", data.getvalue())
    return f"wds:{folder}", len(with_captions)


# ------------------------------------------------------------------------------------------ report


def summarize(samples: list[dict], examples: int = 8, score: str = "itm") -> dict:
    """Counts by source, noise-removal precision/recall and the curve (where ground truth exists), examples."""
    captions = [(s, c) for s in samples for c in s["captions"]]
    counts = {}
    for source in SOURCES:
        mine = [c for _, c in captions if c["source"] == source]
        kept = sum(c["kept"] for c in mine)
        counts[source] = {"total": len(mine), "kept": kept, "removed": len(mine) - kept}
    web = [c for _, c in captions if c["source"] == "web"]
    noise = curve = None
    by_kind: dict[str, dict] = {}
    if web and all("noisy" in c for c in web):
        noisy = [c["noisy"] for c in web]
        noise = noise_removal_metrics(noisy, [not c["kept"] for c in web])
        curve = precision_recall_curve([c[score] for c in web], noisy)
        for kind in sorted({c.get("noise_kind", "") for c in web if c["noisy"]} - {""}):
            of_kind = [c for c in web if c.get("noise_kind") == kind]
            by_kind[kind] = {"total": len(of_kind), "removed": sum(not c["kept"] for c in of_kind)}
        kept_web = [c for c in web if c["kept"]]
        noise["noisy_fraction_before"] = sum(noisy) / len(noisy)
        noise["noisy_fraction_after"] = (sum(c["noisy"] for c in kept_web) / len(kept_web)) if kept_web else None

    def pick(predicate) -> list[dict]:
        chosen = []
        for sample, caption in captions:
            if predicate(caption) and len(chosen) < examples:
                web_texts = [c["text"] for c in sample["captions"] if c["source"] == "web"]
                chosen.append({"image": sample["image"], "text": caption["text"], "score": caption[score],
                               **({"noisy": caption["noisy"]} if "noisy" in caption else {}),
                               **({"web": web_texts} if caption["source"] == "synthetic" else {})})
        return chosen

    return {
        "images": {"total": len(samples), "with_kept_captions": sum(any(c["kept"] for c in s["captions"])
                                                                    for s in samples)},
        "counts": counts,
        "noise_removal": noise,
        "noise_removal_by_kind": by_kind or None,
        "pr_curve": _thin(curve) if curve else None,
        "examples": {"removed_web": pick(lambda c: c["source"] == "web" and not c["kept"]),
                     "added_synthetic": pick(lambda c: c["source"] == "synthetic" and c["kept"]),
                     "removed_synthetic": pick(lambda c: c["source"] == "synthetic" and not c["kept"])},
    }


def plot_pr_curve(curve: dict, point: dict | None, path: Path, title: str = "", score: str = "itm") -> Path:
    """The noise-removal precision-recall curve as a PNG (matplotlib, Agg), the operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.8, 4.0), dpi=120)
    axes.plot(curve["recall"], curve["precision"], lw=1.6, label=f"{score} threshold sweep")
    if curve["precision"]:  # removing everything: precision = the noise rate, what a random filter gets
        axes.axhline(curve["precision"][-1], ls="--", lw=1, color="grey", label="chance (noise rate)")
    if point and point.get("precision") is not None and point.get("recall") is not None:
        axes.plot([point["recall"]], [point["precision"]], "o", color="C3", label="operating point")
    axes.set_xlabel("recall (noisy web captions removed)")
    axes.set_ylabel("precision (removed captions that were noisy)")
    axes.set_xlim(0, 1.01)
    axes.set_ylim(0, 1.01)
    axes.grid(alpha=0.3)
    ap = curve.get("average_precision")
    axes.set_title(title + (f" (AP {ap:.3f})" if ap is not None else ""), fontsize=9)
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _filter_text(filter_result: dict) -> str:
    calibration = filter_result.get("calibration")
    if filter_result["keep_fraction"] > 0:
        return (f"keep fraction {filter_result['keep_fraction']:g} (threshold in effect "
                f"{filter_result['threshold']:.4f})")
    if calibration:
        return (f"{filter_result.get('score', 'itm')} score >= {filter_result['threshold']:.4f}, the threshold that keeps "
                f"{100 * calibration['clean_keep']:g} % of {calibration['pairs']} clean pairs of {calibration['data']}")
    return f"{filter_result.get('score', 'itm')} score >= {filter_result['threshold']:g}"


def report_markdown(result: dict) -> str:
    lines = [f"# capfilt: {result['data']} with {result['model']}", "",
             f"New dataset: `{result['dataset']}` ({result['images']['with_kept_captions']} of "
             f"{result['images']['total']} images keep at least one caption). Filter: "
             + _filter_text(result["filter"])
             + f"; captioner: {result['captioner']['method']}, {result['captioner']['num_captions']} per image.", "",
             *[f"**Warning:** {text}\n" for text in result.get("warnings", [])],
             "| source | pairs | kept | removed |", "|---|---:|---:|---:|"]
    for source, row in result["counts"].items():
        lines.append(f"| {source} | {row['total']} | {row['kept']} | {row['removed']} |")
    noise = result.get("noise_removal")
    if noise:
        lines += ["", "## Noise removal (positive = a noisy web caption, predicted = removed)", "",
                  f"precision {_pct(noise['precision'])}, recall {_pct(noise['recall'])}, F1 {_pct(noise['f1'])}; "
                  f"noisy web captions {_pct(noise['noisy_fraction_before'])} before, "
                  f"{_pct(noise['noisy_fraction_after'])} of the kept ones after.", ""]
        if result.get("pr_curve") and result["pr_curve"].get("average_precision") is not None:
            lines += [f"Average precision over thresholds: {result['pr_curve']['average_precision']:.3f}; "
                      "the curve: ![precision-recall](pr_curve.png)", ""]
        if result.get("noise_removal_by_kind"):
            lines += ["| noise kind | noisy captions | removed |", "|---|---:|---:|"]
            for kind, row in result["noise_removal_by_kind"].items():
                lines.append(f"| {kind} | {row['total']} | {row['removed']} |")
    for key, title in (("removed_web", "Removed web captions"), ("added_synthetic", "Added synthetic captions"),
                       ("removed_synthetic", "Removed synthetic captions")):
        rows = result["examples"][key]
        if not rows:
            continue
        score = result["filter"].get("score", "itm")
        last = "truly noisy |" if key == "removed_web" else "web caption |"
        lines += ["", f"## {title}", "", f"| image | caption | {score} | {last}",
                  "|---|---|---:|---|"]
        for row in rows:
            extra = (str(row.get("noisy", "-")) if key == "removed_web" else "; ".join(row.get("web", [])))
            lines.append(f"| {row['image']} | {row['text']} | {row['score']:.3f} | {extra} |")
    lines += ["", f"Shards: {result['shards']['total']} ({result['shards']['resumed']} already written, "
                  f"{result['shards']['processed']} processed at {result['images_per_s']:.1f} images/s).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- run


def run(cfg: CapfiltConfig, run, progress: bool | None = None) -> dict:
    """Caption, filter and write the new dataset into ``cfg.output.out``; report into the run directory."""
    from dmclip.data import build_dataset
    from dmclip.evaluation.loading import model_fingerprint
    from dmclip.models.base import load_saved_model, save_model
    from dmclip.models.refs import load_model_ref

    progress = cfg.progress if progress is None else progress
    if not cfg.model:
        raise DmclipError("capfilt needs a BLIP model", "pass --model run:runs/pretrain/<blip run>")
    if cfg.filter.calibrate_on and cfg.filter.keep_fraction > 0:  # refused before any work is done
        raise DmclipError("filter.calibrate_on and filter.keep_fraction both choose what the filter keeps",
                          "set one of them (keep_fraction: 0 to use the calibrated threshold)")
    _out_path(cfg.output.out)  # a bad --out fails before any model is loaded
    if cfg.finetune.train.report_to:  # the fine-tuning rows and the results (filter counts, noise removal)
        from dmclip.train import distributed, report_to

        if distributed.is_main():
            report_to.attach(run, cfg.finetune.train.report_to)
    model = load_model_ref(cfg.model)
    check_model(model, cfg.model)
    torch.manual_seed(cfg.seed)
    # what the shards depend on; not the filter (a rerun may re-filter), nor limit (shards are keyed by their
    # sample range, so a larger limit continues the same dataset)
    finetune_state = None
    if cfg.finetune.data:
        finetune_state = dataclasses.asdict(cfg.finetune)
        for key in ("progress", "log_every", "checkpoint_every", "num_workers", "device", "report_to"):
            finetune_state["train"].pop(key, None)
    state = {"version": STATE_VERSION, "model_fingerprint": model_fingerprint(model),  # weights, not the path
             "data": cfg.data, "seed": cfg.seed, "captioner": dataclasses.asdict(cfg.captioner),
             "finetune": finetune_state, "shard_size": cfg.output.shard_size}
    out = _prepare_out(cfg.output.out, state)

    finetune_summary = None
    if cfg.finetune.data:  # the fine-tuned model is kept beside the shards, so a rerun reuses it
        if (out / "finetuned-model" / "model.json").is_file():
            model = load_saved_model(out / "finetuned-model")
            log.info("using the fine-tuned captioner/filter in %s", out / "finetuned-model")
        else:
            finetune_summary = finetune(model, cfg, run)
            save_model(model, run.path / "model")
            save_model(model, out / "finetuned-model")
    device = _device(cfg.device)
    model = model.to(device).eval()

    dataset = build_dataset(cfg.data, image_size=model.image_size)
    if getattr(dataset, "kind", "image-text") != "image-text":
        raise DmclipError(f"{cfg.data} is a classification set; capfilt needs images with captions",
                          "use an image-text set, e.g. --data world-noisy or csv:PATH")
    total = len(dataset) if not cfg.limit else min(cfg.limit, len(dataset))
    size = cfg.output.shard_size
    bounds = [(k, begin, min(begin + size, total)) for k, begin in enumerate(range(0, total, size))]
    shards: list[dict | None] = [_read_shard(out / "shards" / _shard_name(k), a, b) for k, a, b in bounds]
    if any(cfg.filter.score not in c for s in shards if s is not None for x in s["samples"] for c in x["captions"]):
        raise DmclipError(f"{out} holds shards written without the {cfg.filter.score!r} score (an older dmclip)",
                          "capfilt into a new --out (or use filter.score=itm to re-filter these)")
    resumed = sum(s is not None for s in shards)
    done = sum(s["stop"] - s["start"] for s in shards if s is not None)
    if resumed:
        log.info("%s: %d of %d shards already written; continuing", out, resumed, len(bounds))
    began, processed_images = time.perf_counter(), 0
    with _progress(progress, total, done) as advance:
        for (k, a, b), shard in zip(bounds, shards):
            if shard is None:
                shards[k] = process_shard(model, dataset, k, a, b, cfg, out, device, advance)
                processed_images += b - a
    seconds = time.perf_counter() - began

    samples = [sample for shard in shards for sample in shard["samples"]]
    filter_cfg, calibration = cfg.filter, None
    scores = [c[filter_cfg.score] for s in samples for c in s["captions"]]
    if filter_cfg.calibrate_on:
        clean = score_clean_pairs(model, filter_cfg.calibrate_on, filter_cfg.calibrate_limit, cfg.batch_size, device,
                                  filter_cfg.score)
        calibration = {"data": filter_cfg.calibrate_on, "clean_keep": filter_cfg.clean_keep, "pairs": len(clean),
                       "threshold": calibrated_threshold(clean, filter_cfg.clean_keep),
                       "clean_score_quantiles": {str(q): float(np.quantile(clean, q)) for q in (0.05, 0.5, 0.95)}}
        log.info("threshold %.4f keeps %.0f %% of %d clean pairs of %s", calibration["threshold"],
                 100 * filter_cfg.clean_keep, len(clean), filter_cfg.calibrate_on)
    kept, threshold = select_kept(scores, calibration["threshold"] if calibration else filter_cfg.threshold,
                                  filter_cfg.keep_fraction)
    flags = iter(kept.tolist())
    for sample in samples:
        for caption in sample["captions"]:
            caption["kept"] = next(flags)
    warnings = []
    if scores and not kept.any():  # e.g. an under-trained ITM head whose scores never leave its prior (~1/3)
        warnings.append(f"the filter kept no pair: every {filter_cfg.score} score is under the threshold {threshold:g} (the highest "
                        f"is {max(scores):.3f}); re-filter the stored scores with --keep-fraction or a lower "
                        "--threshold (a rerun with the same --out only re-filters)")
        log.warning(warnings[-1])
    spec, written = _write_dataset(out, samples, cfg.output.format, size)
    result = {"model": cfg.model, "data": cfg.data, "out": str(out), "dataset": spec, "format": cfg.output.format,
              "filter": {"score": filter_cfg.score, "threshold": threshold, "keep_fraction": cfg.filter.keep_fraction,
                         "calibration": calibration},
              "captioner": dataclasses.asdict(cfg.captioner),
              "finetune": finetune_summary, "skipped": sum(s["skipped"] for s in shards), "warnings": warnings,
              "shards": {"total": len(bounds), "resumed": resumed, "processed": len(bounds) - resumed},
              "images_per_s": processed_images / seconds if processed_images and seconds > 0 else 0.0,
              **summarize(samples, cfg.output.examples, filter_cfg.score)}
    if result["pr_curve"] and result["pr_curve"]["thresholds"]:
        plot_pr_curve(result["pr_curve"], result["noise_removal"], run.path / "pr_curve.png",
                      title=f"noise removal on {cfg.data} by {filter_cfg.score}", score=filter_cfg.score)
    run.write_text("report.md", report_markdown(result))
    run.write_results(result)
    log.info("capfilt: %d images -> %s (%d with captions)", total, spec, written)
    return result

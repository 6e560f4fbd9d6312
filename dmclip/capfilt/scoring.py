"""The filter and the captioner at work: which pairs a filter keeps, the three scores of a pair, captioning and
scoring a batch of images, and the model check."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dmclip.capfilt.config import SCORES, CapfiltConfig
from dmclip.data.base import image_batch
from dmclip.errors import DmclipError


def check_capfilt_model(model, ref: str) -> None:
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


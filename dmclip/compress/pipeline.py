"""Library entry points of `dmclip compress`: eval, sweep, fine-tune the server decoder, serve/send helpers.

The edge runs the image tower (``model.encode_image_tokens``) and a selector; the payload crosses the wire
codec (so the bytes are counted, not estimated); the server decodes it, restores the token sequence and
captions it (``model.generate(image_tokens=...)``). Any object with those two methods (and ``image_size``)
can play the model, which is how the tests run without a trained BLIP.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dmclip.compress.codec import DTYPES, Accepts, decode, encode, payload_stats
from dmclip.compress.selectors import Selector, build_selector, restore_payload
from dmclip.config import field
from dmclip.data.base import float_images
from dmclip.errors import DmclipError
from dmclip.report import markdown_table, pyplot, save_figure

log = logging.getLogger(__name__)
QUALITY_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider")


# ------------------------------------------------------------------------------------------ configs


@dataclass
class DecodeConfig:
    method: str = field("beam", "caption decoding: beam | nucleus", choices=("beam", "nucleus"))
    num_beams: int = field(3, "beams for beam search (BLIP's default)", min=1)
    top_p: float = field(0.9, "nucleus sampling mass", min=0.0, max=1.0)
    max_length: int = field(30, "most caption tokens generated", min=1)
    min_length: int = field(5, "fewest caption tokens generated", min=0)


@dataclass
class SweepConfig:
    selectors: list[str] = field(["kmeans", "random", "topk-norm", "pool", "tome"], "selectors swept")
    k: list[int] = field([1, 2, 4, 8, 16, 32], "k values for kmeans", min=1)
    fractions: list[float] = field([0.03, 0.1, 0.25, 0.5], "kept fractions for random and topk-norm",
                                   min=0.0, max=1.0)
    pool_sizes: list[int] = field([2, 4, 8], "window sides for pool", min=1)
    tome_fractions: list[float] = field([0.03, 0.1, 0.25, 0.5], "kept fractions for tome", min=0.0, max=1.0)
    metric: str = field("bleu4", "quality metric on the plot's y axis", choices=QUALITY_KEYS)


@dataclass
class ServerFinetuneConfig:
    enabled: bool = field(False, "train the server decoder on compressed tokens of the selector first")
    dataset: str = field("world-train", "training split for the decoder fine-tuning")
    steps: int = field(200, "optimizer steps", min=1)
    batch_size: int = field(32, "images per step", min=1)
    lr: float = field(1e-4, "peak learning rate", min=0.0)


@dataclass
class CompressConfig:
    model: str = field("", "model reference with an image tower and a captioning decoder, e.g. run:<pretrain dir>")
    dataset: str = field("world-retrieval-a", "test split captioned")
    limit: int = field(100, "images of the test split captioned (0 = all)", min=0)
    batch_size: int = field(16, "images per batch on the edge and the server", min=1)
    selector: str = field("kmeans", "token selector (`dmclip list selectors`)")
    k: int = field(8, "k-means centroids", min=1)
    fraction: float = field(0.4, "kept fraction for random / topk-norm / tome", min=0.0, max=1.0)
    pool_size: int = field(2, "pool window side", min=1)
    dtype: str = field("float16", "wire dtype of vectors: float16 | float32 | int8 (+ fp16 scale per vector)",
                       choices=("float16", "float32", "int8"))
    restore: str = field("expand", "k-means restore: expand (each token -> its centroid; indices sent) | "
                         "centroids (the k centroids only; no indices)", choices=("expand", "centroids"))
    kmeans_iterations: int = field(20, "Lloyd iterations at most", min=0)
    kmeans_restarts: int = field(2, "k-means++ starts per image; the lowest inertia wins", min=1)
    class_token: bool = field(True, "token 0 is a class token: sent verbatim, never clustered or dropped")
    seed: int = field(0, "seed of k-means, random selection and fine-tuning")
    decode: DecodeConfig = field(DecodeConfig(), "caption decoding on the server")
    sweep: SweepConfig = field(SweepConfig(), "points of `compress sweep`")
    finetune: ServerFinetuneConfig = field(ServerFinetuneConfig(), "--finetune-server")


def selector_from_config(cfg: CompressConfig, name: str | None = None, **override) -> Selector:
    knobs = {"k": cfg.k, "fraction": cfg.fraction, "size": cfg.pool_size, **override}
    return build_selector(name or cfg.selector, dtype=cfg.dtype, class_token=cfg.class_token, seed=cfg.seed,
                          restore=cfg.restore, iterations=cfg.kmeans_iterations, restarts=cfg.kmeans_restarts,
                          **knobs)


# ------------------------------------------------------------------------------------------ pieces


def load_compress_model(ref: str):
    """A model that can play edge and server: ``encode_image_tokens`` and ``generate(image_tokens=...)``."""
    from dmclip.models.refs import load_model_ref

    if not ref:
        raise DmclipError("no model given", "pass --model run:<pretrain run dir> (a BLIP model)")
    model = load_model_ref(ref)
    check_compress_model(model, ref)
    return model


def check_compress_model(model, ref: str = "the model") -> None:
    missing = [m for m in ("encode_image_tokens", "generate") if not callable(getattr(model, m, None))]
    if missing:
        raise DmclipError(f"{ref} cannot caption from image tokens (no {', '.join(missing)})",
                          "use a BLIP model: train one with `dmclip pretrain recipes/pretrain-blip.yaml` "
                          "(or --objective blip), then pass --model run:<its run dir>")


def score_captions(references: dict, candidates: dict, tokenize: bool = True) -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr as pycocoevalcap computes them (METEOR skipped: a JVM per call)."""
    from dmclip.metrics.caption import caption_metrics

    scores = caption_metrics(references, candidates, tokenize=tokenize, meteor=False)
    return {k: v for k, v in scores.items() if k != "meteor"}


def load_test_samples(cfg: CompressConfig, image_size: int, dataset=None) -> tuple[list[torch.Tensor], list[list[str]]]:
    """(images uint8 (3, S, S), reference captions) for the first ``limit`` images of the test split."""
    if dataset is None:
        from dmclip.data import build_dataset

        dataset = build_dataset(cfg.dataset, image_size=image_size)
    count = len(dataset) if cfg.limit == 0 else min(cfg.limit, len(dataset))
    if count == 0:
        raise DmclipError(f"{cfg.dataset} holds no images", "choose another --dataset")
    samples = [dataset[i] for i in range(count)]
    return [s["image"] for s in samples], [list(s["captions"]) for s in samples]


@torch.no_grad()
def edge_tokens(model, images: list[torch.Tensor], batch_size: int) -> tuple[torch.Tensor, float]:
    """Run the edge encoder over images -> tokens (n, T, W) and mean encoder seconds per image."""
    chunks, seconds = [], 0.0
    for start in range(0, len(images), batch_size):
        batch = float_images(torch.stack(images[start:start + batch_size]))
        t0 = time.perf_counter()
        chunks.append(model.encode_image_tokens(batch).float())
        seconds += time.perf_counter() - t0
    return torch.cat(chunks), seconds / len(images)


def caption_tokens(model, tokens: torch.Tensor, decode_cfg: DecodeConfig) -> list[str]:
    return list(model.generate(image_tokens=tokens, method=decode_cfg.method, num_beams=decode_cfg.num_beams,
                               top_p=decode_cfg.top_p, max_length=decode_cfg.max_length,
                               min_length=decode_cfg.min_length))


@torch.no_grad()
def evaluate_selector(model, tokens: torch.Tensor, references: list[list[str]], selector: Selector,
                      decode_cfg: DecodeConfig, batch_size: int, encoder_seconds: float = 0.0,
                      score_fn: Callable[[dict, dict], dict] = score_captions) -> dict:
    """Compress, send through the codec image by image, restore, caption, score. One result row."""
    captions, sizes, stats_rows = [], [], []
    edge, server = 0.0, 0.0
    restored_tokens = None
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size]
        t0 = time.perf_counter()
        payload = selector.compress(batch)
        frames = [encode(p) for p in payload.split()]
        edge += time.perf_counter() - t0
        stats_rows.append((payload_stats(payload), batch.shape[0]))
        sizes += [len(f) for f in frames]
        t0 = time.perf_counter()
        restored = torch.cat([restore_payload(decode(f)) for f in frames])
        captions += caption_tokens(model, restored, decode_cfg)
        server += time.perf_counter() - t0
        restored_tokens = restored.shape[1]
    n = tokens.shape[0]
    refs = {i: r for i, r in enumerate(references)}
    cands = {i: c for i, c in enumerate(captions)}
    scores = score_fn(refs, cands)

    def mean(key):
        return sum(s[key] * count for s, count in stats_rows) / n

    return {
        "selector": selector.name, "label": selector.describe(), "setting": _setting(selector),
        **scores,
        "communication_efficiency": mean("communication_efficiency"),
        "vectors_sent": mean("vectors_sent"), "tokens": mean("tokens"), "restored_tokens": restored_tokens,
        "bytes_per_image": sum(sizes) / n,
        "bytes_per_image_without_indices": mean("bytes_per_image_without_indices"),
        "index_bytes_per_image": mean("index_bytes_per_image"),
        "edge_ms": 1000 * (encoder_seconds + edge / n), "encoder_ms": 1000 * encoder_seconds,
        "server_ms": 1000 * server / n, "images": n, "examples": [
            {"caption": captions[i], "references": references[i][:2]} for i in range(min(3, n))],
    }


def _setting(selector: Selector) -> float | None:
    for attr in ("k", "fraction", "size"):
        if hasattr(selector, attr):
            return getattr(selector, attr)
    return None


def add_ratios(row: dict, baseline: dict) -> dict:
    """Quality as a fraction of the uncompressed baseline (the paper's 'keeps 80 % of BLEU')."""
    for key in QUALITY_KEYS:
        base = baseline.get(key)
        row[f"{key}_ratio"] = row[key] / base if base else None
    return row


# ------------------------------------------------------------------------------------- fine-tuning


class CompressedCaptionTask:
    """Train the server decoder (LM loss) on tokens that went through a selector and the wire dtype.

    The edge image tower is frozen (it runs on the device, not the server).
    """

    def __init__(self, model, selector: Selector, seed: int):
        from dmclip.train.data import caption_choice

        self.model, self.selector, self.seed, self._choice = model, selector, seed, caption_choice
        for p in model.visual.parameters():
            p.requires_grad_(False)
        for name in ("visual_m", "text_encoder_m", "text_proj_m"):
            module = getattr(model, name, None)
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(False)
        self.find_unused_parameters = True

    def collate(self, samples: list[dict]) -> dict:
        images = float_images(torch.stack([s["image"] for s in samples]))
        return {"images": images, "captions": [list(s["captions"]) for s in samples],
                "indices": torch.tensor([int(s["index"]) for s in samples])}

    def loss(self, model, batch: dict, step: int) -> dict:
        from dmclip.losses.blip import lm_loss

        core = getattr(model, "module", model)
        with torch.no_grad():
            tokens = core.encode_image_tokens(batch["images"])
            restored = restore_payload(self.selector.compress(tokens.cpu())).to(tokens.device)
        captions = [c[self._choice(len(c), self.seed, step, int(i))] for c, i in zip(batch["captions"], batch["indices"])]
        ids, valid, targets = core.decoder_inputs(core.tokenize(captions).to(restored.device))
        loss = lm_loss(core.decoder_logits(restored, ids, valid), targets, getattr(core, "label_smoothing", 0.1))
        return {"loss": loss, "lm": loss.detach()}


def finetune_server(model, cfg: CompressConfig, run, dataset=None) -> dict:
    """Fine-tune the decoder on compressed tokens; saves the model into ``<run>/model``."""
    from dmclip.models.base import save_model
    from dmclip.train import TrainConfig, fit

    if not hasattr(model, "decoder_logits"):
        raise DmclipError("--finetune-server needs a BLIP model (decoder_logits / decoder_inputs)",
                          "pass --model run:<a BLIP pretrain run>")
    if dataset is None:
        from dmclip.data import build_dataset

        dataset = build_dataset(cfg.finetune.dataset, image_size=model.image_size)
    task = CompressedCaptionTask(model, selector_from_config(cfg), cfg.seed)
    train_cfg = TrainConfig(steps=cfg.finetune.steps, batch_size=cfg.finetune.batch_size, lr=cfg.finetune.lr,
                            warmup_steps=min(20, cfg.finetune.steps // 5), progress=False, device="cpu",
                            checkpoint_every=0, log_every=max(1, cfg.finetune.steps // 10))
    summary = fit(task, dataset, train_cfg, run, seed=cfg.seed)
    model.eval()
    save_model(model, Path(run.path) / "model")
    return summary


# ------------------------------------------------------------------------------------- eval / sweep


def run_eval(cfg: CompressConfig, run, *, model=None, dataset=None, train_dataset=None,
             score_fn: Callable[[dict, dict], dict] = score_captions) -> dict:
    """`dmclip compress eval`: the selector against the uncompressed baseline on the test split."""
    model = model if model is not None else load_compress_model(cfg.model)
    check_compress_model(model)
    images, references = load_test_samples(cfg, model.image_size, dataset)
    tokens, encoder_seconds = edge_tokens(model, images, cfg.batch_size)
    selector = selector_from_config(cfg)
    common = {"decode_cfg": cfg.decode, "batch_size": cfg.batch_size, "encoder_seconds": encoder_seconds,
              "score_fn": score_fn}
    baseline = evaluate_selector(model, tokens, references, selector_from_config(cfg, "none"), **common)
    row = add_ratios(evaluate_selector(model, tokens, references, selector, **common), baseline)
    add_ratios(baseline, baseline)
    result = {"selector": selector.describe(), "baseline": baseline, "compressed": row}
    if cfg.finetune.enabled:
        result["finetune"] = finetune_server(model, cfg, run, train_dataset)
        tuned = add_ratios(evaluate_selector(model, tokens, references, selector_from_config(cfg), **common),
                           baseline)
        result["compressed_finetuned"] = tuned
    run.write_results(result)
    run.write_text("report.md", eval_report(result))
    return result


_TABLE = [("label", "selector"), ("communication_efficiency", "comm. eff."), ("bytes_per_image", "bytes/img"),
          ("bytes_per_image_without_indices", "bytes w/o idx"), ("bleu1", "BLEU-1"), ("bleu4", "BLEU-4"),
          ("cider", "CIDEr"), ("bleu4_ratio", "BLEU-4 / full"), ("cider_ratio", "CIDEr / full"),
          ("edge_ms", "edge ms"), ("server_ms", "server ms")]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def rows_markdown(rows: list[dict]) -> str:
    """Result rows as the table of report.md and summary.md."""
    return markdown_table([h for _, h in _TABLE], [[_fmt(r.get(k)) for k, _ in _TABLE] for r in rows])


def csv_text(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "examples"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def eval_report(result: dict) -> str:
    rows = [result["baseline"], result["compressed"]] + ([result["compressed_finetuned"]]
                                                         if "compressed_finetuned" in result else [])
    if "compressed_finetuned" in result:
        rows[-1] = {**rows[-1], "label": rows[-1]["label"] + " (fine-tuned server)"}
    lines = [f"# compress eval: {result['selector']}\n", rows_markdown(rows),
             "\ncomm. eff. = vectors sent / tokens (class token counted); bytes are whole codec frames per image.\n",
             "\n## example captions\n"]
    for ex in result["compressed"]["examples"]:
        lines.append(f"- {ex['caption']!r} (references: {'; '.join(ex['references'])})\n")
    return "".join(lines)


def sweep_points(cfg: CompressConfig) -> list[Selector]:
    points: list[Selector] = []
    for name in cfg.sweep.selectors:
        if name == "kmeans":
            points += [selector_from_config(cfg, "kmeans", k=k) for k in cfg.sweep.k]
        elif name in ("random", "topk-norm"):
            points += [selector_from_config(cfg, name, fraction=f) for f in cfg.sweep.fractions]
        elif name == "pool":
            points += [selector_from_config(cfg, "pool", size=s) for s in cfg.sweep.pool_sizes]
        elif name == "tome":
            points += [selector_from_config(cfg, "tome", fraction=f) for f in cfg.sweep.tome_fractions]
        else:
            points.append(selector_from_config(cfg, name))
    return points


def run_sweep(cfg: CompressConfig, run, *, model=None, dataset=None,
              score_fn: Callable[[dict, dict], dict] = score_captions) -> dict:
    """`dmclip compress sweep`: every point of cfg.sweep -> summary.md, summary.csv, compress-sweep.png."""
    model = model if model is not None else load_compress_model(cfg.model)
    check_compress_model(model)
    points = sweep_points(cfg)
    images, references = load_test_samples(cfg, model.image_size, dataset)
    tokens, encoder_seconds = edge_tokens(model, images, cfg.batch_size)
    common = {"decode_cfg": cfg.decode, "batch_size": cfg.batch_size, "encoder_seconds": encoder_seconds,
              "score_fn": score_fn}
    baseline = evaluate_selector(model, tokens, references, selector_from_config(cfg, "none"), **common)
    add_ratios(baseline, baseline)
    rows = [baseline]
    for i, selector in enumerate(points):
        log.info("sweep point %d/%d: %s", i + 1, len(points), selector.describe())
        row = add_ratios(evaluate_selector(model, tokens, references, selector, **common), baseline)
        rows.append(row)
        run.log_metrics({"point": i, **{k: v for k, v in row.items() if k != "examples"}})
    table = rows_markdown(rows)
    run.write_text("summary.md", table)
    run.write_text("summary.csv", csv_text(rows))
    plot_path = plot_sweep(rows, Path(run.path) / "compress-sweep.png", cfg.sweep.metric)
    result = {"rows": rows, "metric": cfg.sweep.metric, "plot": str(plot_path), "claims": seed_claims(rows)}
    run.write_results(result)
    claims = "".join(f"- {c}\n" for c in result["claims"])
    run.write_text("report.md", f"# compress sweep\n\n{table}\n![sweep](compress-sweep.png)\n\n## seed claims\n{claims}")
    return result


def seed_claims(rows: list[dict]) -> list[str]:
    """The two claims of the seed paper, checked on these rows (stated, not assumed)."""
    out = []
    k8 = next((r for r in rows if r["selector"] == "kmeans" and r["setting"] == 8), None)
    if k8 and k8.get("bleu4_ratio") is not None:
        out.append(f"kmeans k=8 keeps {100 * k8['bleu4_ratio']:.0f} % of full BLEU-4 "
                   f"({100 * k8['bleu1_ratio']:.0f} % of BLEU-1) at communication efficiency "
                   f"{100 * k8['communication_efficiency']:.1f} % — seed claim ≥ 80 %: "
                   f"{'holds' if k8['bleu4_ratio'] >= 0.8 else 'does not hold'} here")
    randoms = [r for r in rows if r["selector"] == "random"]
    kms = [r for r in rows if r["selector"] == "kmeans"]
    if randoms and kms:
        wins = 0
        for r in randoms:  # kmeans point with the most bytes not above this random point's bytes
            cheaper = [k for k in kms if k["bytes_per_image"] <= r["bytes_per_image"]]
            if cheaper and max(k["bleu4"] for k in cheaper) >= r["bleu4"]:
                wins += 1
        out.append(f"kmeans matches or beats random at equal-or-fewer bytes for {wins} of {len(randoms)} random points")
    return out


def plot_sweep(rows: list[dict], path: Path, metric: str = "bleu4") -> Path:
    """Quality vs communication efficiency and vs bytes per image, one line per selector.

    One row of panels per metric: ``metric`` and, when it is another one, CIDEr (BLEU-4 saturates on short
    template-like captions, CIDEr's tf-idf weighting still separates the selectors).
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    metrics = [metric] + (["cider"] if metric != "cider" and all("cider" in r for r in rows) else [])
    fig, grid = pyplot().subplots(len(metrics), 2, figsize=(11, 4.2 * len(metrics)), squeeze=False)
    baseline = next((r for r in rows if r["selector"] == "none"), None)
    by_selector: dict[str, list[dict]] = {}
    for r in rows:
        if r["selector"] != "none":
            by_selector.setdefault(r["selector"], []).append(r)
    axes_x = (("communication_efficiency", "communication efficiency (vectors sent / tokens)",
               FuncFormatter(lambda v, _: f"{100 * v:g} %")),
              ("bytes_per_image", "bytes per image on the wire", FuncFormatter(lambda v, _: f"{v:,.0f}")))
    for axes, name_y in zip(grid, metrics):
        for ax, (x_key, x_label, formatter) in zip(axes, axes_x):
            for name, points in by_selector.items():
                points = sorted(points, key=lambda r: r[x_key])
                ax.plot([p[x_key] for p in points], [p[name_y] for p in points], marker="o", label=name)
            if baseline:
                ax.axhline(baseline[name_y], color="grey", linestyle="--", label="none (all tokens)")
                ax.axhline(0.8 * baseline[name_y], color="grey", linestyle=":", label="80 % of none")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(formatter)
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels overlap
            ax.set_xlabel(x_label)
            ax.set_ylabel(name_y.upper() if name_y != "cider" else "CIDEr")
            ax.grid(True, alpha=0.3)
    grid[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


# ------------------------------------------------------------------------------------------ the link


class CaptionHandler:
    """Server side: what the model reads (``accepts``), payload -> tokens (``restore``), tokens -> captions.

    ``accepts.tokens`` and ``accepts.width`` come from one forward pass of the model's image tower on a
    blank image, so they hold for any model that can play the edge. ``CaptionServer`` checks ``accepts``
    against each payload's header before decoding it and captions concurrent requests in one ``caption`` call.
    """

    def __init__(self, model, decode_cfg: DecodeConfig, *, max_batch: int = 16, dtypes: tuple[str, ...] | None = None,
                 selector_names: tuple[str, ...] | None = None):
        from dmclip.registry import selectors

        check_compress_model(model)
        self.model, self.decode_cfg = model, decode_cfg
        size = int(model.image_size)
        with torch.no_grad():
            probe = model.encode_image_tokens(torch.zeros(1, 3, size, size))
        tokens, width = int(probe.shape[1]), int(probe.shape[2])
        self.accepts = Accepts(tokens, width, max_batch, tuple(dtypes or DTYPES),
                               tuple(selector_names or selectors.names()))

    def restore(self, payload) -> torch.Tensor:
        self.accepts.check(payload.header)
        return restore_payload(payload)

    @torch.no_grad()
    def caption(self, tokens: torch.Tensor) -> list[str]:
        return caption_tokens(self.model, tokens, self.decode_cfg)

    def __call__(self, payload) -> dict:
        tokens = self.restore(payload)
        return {"captions": self.caption(tokens), "restored_tokens": tokens.shape[1]}


def caption_handler(model, decode_cfg: DecodeConfig, **limits) -> CaptionHandler:
    """Server side: payload -> {"captions": [...], "restored_tokens": M}, with what the model reads."""
    return CaptionHandler(model, decode_cfg, **limits)


def load_images(paths: list[Path], image_size: int) -> list[torch.Tensor]:
    """Image files -> uint8 (3, S, S) tensors (RGB, resized)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
        except (OSError, UnidentifiedImageError) as exc:
            raise DmclipError(f"cannot read image {path} ({exc})", "pass PNG or JPEG files") from None
        out.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous())
    return out


@torch.no_grad()
def send_images(model, selector: Selector, images: list[torch.Tensor], address, names: list[str] | None = None,
                timeout: float = 60.0) -> list[dict]:
    """Edge side of the link: encode, compress, send one frame per image, collect captions and costs."""
    from dmclip.compress.link import LinkClient

    check_compress_model(model)
    rows = []
    with LinkClient(address, timeout=timeout) as client:
        info = client.info()
        accepts = Accepts.from_dict(info.get("accepts") or {})
        for i, image in enumerate(images):
            t0 = time.perf_counter()
            tokens = model.encode_image_tokens(float_images(image.unsqueeze(0))).float()
            payload = selector.compress(tokens)
            try:  # the server would refuse it: say so before sending, in the server's own words
                accepts.check(payload.header)
            except DmclipError as exc:
                raise DmclipError(f"{exc.message} (server {client.host}:{client.port})",
                                  "use the server's model on the edge too (--model), with a selector and "
                                  f"--dtype it accepts ({', '.join(accepts.dtypes)})") from None
            body = encode(payload)
            edge = time.perf_counter() - t0
            answer = client.request(body)
            reply = answer["reply"]
            if not reply.get("ok"):
                raise DmclipError(f"the server refused image {i}: {reply.get('error')}",
                                  reply.get("hint") or "check the server's log")
            rows.append({"image": names[i] if names else str(i), "caption": reply["captions"][0],
                         "payload_bytes": len(body), "wire_bytes_sent": answer["bytes_sent"],
                         "wire_bytes_received": answer["bytes_received"], "rtt_ms": 1000 * answer["rtt_seconds"],
                         "edge_ms": 1000 * edge, "server_ms": 1000 * reply.get("server_seconds", 0.0)})
    return rows

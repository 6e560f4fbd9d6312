"""The configuration of `dmclip compress`: the test split, the selector and its wire dtype, caption decoding on
the server, the sweep's points and the server fine-tuning; ``selector_from_config`` builds the selector."""

from __future__ import annotations

from dataclasses import dataclass

from dmclip.compress.selectors import Selector, build_selector
from dmclip.config import field

QUALITY_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider")


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
    seeds: list[int] = field([], "seeds of the selectors that draw random numbers (kmeans, random), each point "
                             "scored at every one; empty: the run's seed")
    matched_random: bool = field(False, "also score random selection at each k-means point's bytes (the fewest "
                                 "tokens whose frame is at least as large), paired with it")


@dataclass
class ServerFinetuneConfig:
    enabled: bool = field(False, "train the server decoder on compressed tokens of the selector first")
    dataset: str = field("world-train", "training split for the decoder fine-tuning")
    steps: int = field(200, "optimizer steps", min=1)
    batch_size: int = field(32, "images per step", min=1)
    lr: float = field(1e-4, "peak learning rate", min=0.0)
    seeds: list[int] = field([], "training seeds (each also the selector's seed), one fine-tuned decoder each; "
                             "empty: the run's seed")
    control: bool = field(False, "also train a decoder the same steps on all tokens and read it with both, "
                          "so the gain of training on compressed tokens is told from that of more training")


@dataclass
class CompressConfig:
    """Grouped by who reads them: ``model`` (every subcommand but ``load``); the selector and the wire dtype
    (``eval``, ``sweep``, ``send``; ``load`` takes ``k``, ``dtype`` and ``seed``); the test split (``eval`` and
    ``sweep``); then decoding on the server, the sweep's points and the server fine-tuning."""

    model: str = field("", "model reference with an image tower and a captioning decoder, e.g. run:<pretrain dir>")
    # what the edge sends
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
    # the test split `eval` and `sweep` caption
    dataset: str = field("world-retrieval-a", "test split captioned")
    limit: int = field(100, "images of the test split captioned (0 = all)", min=0)
    batch_size: int = field(16, "images per batch on the edge and the server", min=1)
    decode: DecodeConfig = field(DecodeConfig(), "caption decoding on the server")
    sweep: SweepConfig = field(SweepConfig(), "points of `compress sweep`")
    finetune: ServerFinetuneConfig = field(ServerFinetuneConfig(), "--finetune-server")


def selector_from_config(cfg: CompressConfig, name: str | None = None, **override) -> Selector:
    knobs = {"k": cfg.k, "fraction": cfg.fraction, "size": cfg.pool_size, **override}
    return build_selector(name or cfg.selector, dtype=cfg.dtype, class_token=cfg.class_token, seed=cfg.seed,
                          restore=cfg.restore, iterations=cfg.kmeans_iterations, restarts=cfg.kmeans_restarts,
                          **knobs)

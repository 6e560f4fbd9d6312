"""dmclip.evaluation end to end on an oracle model whose answers can be worked out by hand.

The oracle embeds an image as its mean colour and a text as the colour word it contains, so every
zero-shot / retrieval number below follows from geometry (cosines of RGB directions), not from training.
What a user would notice if these broke: eval tables with wrong numbers, re-encoded splits, or
results.json files CLIP_benchmark cannot merge.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from dmclip.data.base import ArrayClassificationDataset, ArrayImageTextDataset
from dmclip.errors import DmclipError
from dmclip.evaluation import caption, latency, retrieval, suite, zero_shot, zero_shot_accuracy
from dmclip.evaluation.embeddings import EmbeddingCache
from dmclip.evaluation.loading import model_fingerprint
from dmclip.evaluation.output import suite_csv, suite_markdown
from dmclip.evaluation.zeroshot_retrieval import retrieval_recall
from dmclip.metrics.caption import caption_metrics
from dmclip.metrics.latency import latency_rows

COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "cyan": (0, 1, 1),
           "magenta": (1, 0, 1)}
NAMES = list(COLOURS)
WORDS = ["<pad>", *NAMES, "a", "photo", "of", "square", "thing", "the"]


class OracleModel(nn.Module):
    """Contract-conforming: image -> mean RGB - 0.5; text -> (RGB - 0.5) of its colour word."""

    image_size, context_length, embed_dim = 8, 8, 3

    def __init__(self, truth: dict[str, int] | None = None, extra_vocab: int = 0):
        super().__init__()
        self.arch = {"family": "oracle", "extra_vocab": extra_vocab}
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self.image_proj = nn.Linear(3, 3)
        with torch.no_grad():
            self.image_proj.weight.copy_(torch.eye(3))
            self.image_proj.bias.fill_(-0.5)
        table = torch.zeros(len(WORDS) + extra_vocab, 3)
        for i, name in enumerate(NAMES):
            table[1 + i] = torch.tensor(COLOURS[name], dtype=torch.float) - 0.5
        self.word_embedding = nn.Embedding.from_pretrained(table, freeze=False)
        self.truth = truth or {}  # caption -> image index the ITM head "knows" it belongs to
        self.encoded_images = 0

    def tokenize(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [WORDS.index(w) for w in text.lower().replace(".", "").split() if w in WORDS]
            out[row, : len(ids)] = torch.tensor(ids[: self.context_length], dtype=torch.long)
        return out

    def encode_image(self, images):
        assert images.dtype == torch.float32 and images.max() <= 1.0  # the contract: float in [0, 1]
        self.encoded_images += images.shape[0]
        return self.image_proj(images.mean(dim=(2, 3)))

    def encode_text(self, tokens):
        return self.word_embedding(tokens).sum(dim=1)

    def _colour_of(self, images):
        rgb = images.mean(dim=(2, 3))
        return [NAMES[int(np.argmin([float(((rgb[i] - torch.tensor(c, dtype=torch.float)) ** 2).sum())
                                      for c in COLOURS.values()]))] for i in range(len(images))]

    def itm_score(self, images, tokens):
        texts = [" ".join(WORDS[t] for t in row if t) for row in tokens.tolist()]
        colours = self._colour_of(images)
        out = []
        for text, colour in zip(texts, colours):
            owner = self.truth.get(text)
            out.append(float(NAMES[owner] == colour) if owner is not None else float(colour in text.split()))
        return torch.tensor(out)

    def generate(self, images, method="beam", num_beams=3, top_p=0.9, max_length=30, min_length=5):
        return [f"a {colour} square" for colour in self._colour_of(images)]


def _solid(colour: str, size: int = 8) -> np.ndarray:
    return np.broadcast_to(np.asarray(COLOURS[colour], dtype=np.uint8) * 255, (size, size, 3)).copy()


@pytest.fixture
def classification():
    labels = [c for c in range(6) for _ in range(3)]  # 6 classes x 3 images
    images = np.stack([_solid(NAMES[c]) for c in labels])
    return ArrayClassificationDataset("colours", images, labels, NAMES, ["a photo of a {}.", "a {} thing"])


@pytest.fixture
def image_text():
    images = np.stack([_solid(name) for name in NAMES])
    captions = [[f"a {name} square", name] for name in NAMES]
    captions[5].append("the green thing")  # a wrong caption of the magenta image (green is its opposite)
    return ArrayImageTextDataset("colour-pairs", images, captions)


# ------------------------------------------------------------------------------------- zero-shot


def test_oracle_zero_shot_is_perfect(classification):
    result = zero_shot(OracleModel(), classification, model_name="open_clip:ViT-B-32:/tmp/x.pt")
    assert result["metrics"] == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    # CLIP_benchmark's layout: their `build` step merges these files
    assert (result["dataset"], result["model"], result["pretrained"], result["task"]) == (
        "colours", "ViT-B-32", "/tmp/x.pt", "zeroshot_classification")
    assert result["details"] == {"num_samples": 18, "num_classes": 6, "num_templates": 2}


def _compact_clip(captions: list[str]) -> nn.Module:
    """A tiny dmclip CLIP whose compact vocabulary holds the words of ``captions`` only."""
    from dmclip.data.tokenizer import Tokenizer
    from dmclip.models.base import build_model
    from dmclip.models.clip import clip_arch

    torch.manual_seed(0)
    return build_model(clip_arch(8, 4, 16, 1, 2, 16, 1, 2, 16, Tokenizer.fit(captions, 16).to_dict())).eval()


def test_class_names_outside_a_compact_vocabulary_are_named_with_the_fix(classification, caplog):
    """'crimson disc' in a model that never saw either word: both become the unknown token, the class prompt
    says nothing, and accuracy falls toward chance. The user is told which words, how many, and the fix."""
    model = _compact_clip([f"a photo of a {name} thing" for name in NAMES])
    names = ["crimson disc", "Crimson square", *NAMES[2:]]
    with caplog.at_level(logging.WARNING, logger="dmclip"):
        result = zero_shot(model, classification, classnames=names)
    assert result["details"]["unknown_words"] == ["crimson", "disc", "square"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0] in result["notes"]
    assert warnings[0].startswith("3 words of the class names and templates are not in the model's vocabulary "
                                  "('crimson', 'disc', 'square')")
    assert "rename the classes" in warnings[0] and "model.compact_vocab=false" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dmclip"):
        known = zero_shot(model, classification)
    assert "unknown_words" not in known["details"] and not known["notes"] and not caplog.records


def test_a_full_vocabulary_knows_every_word():
    """open_clip's tokenizer (the full BPE table) reads any word: never a warning."""
    from dmclip.data.tokenizer import Tokenizer

    assert Tokenizer(16).unknown_words(["a photo of a crimson disc."]) == []
    compact = Tokenizer.fit(["a red circle"], 16)
    assert compact.unknown_words(["A RED circle!", "a crimson disc, 3 of them"]) == ["crimson", "disc", "3", "of",
                                                                                   "them"]


def test_swapped_class_names_cost_exactly_those_classes(classification):
    names = ["green", "red", *NAMES[2:]]  # classes 0 and 1 swapped: their 6 images are wrong
    metrics = zero_shot(OracleModel(), classification, classnames=names)["metrics"]
    assert metrics["acc1"] == pytest.approx(12 / 18)
    assert metrics["mean_per_class_recall"] == pytest.approx(4 / 6)
    # red's true class embedding (now "green") has cosine -1/3: 4th or 5th of 6, still in the top 5
    assert metrics["acc5"] == 1.0


def test_custom_templates_and_their_errors(classification):
    assert zero_shot(OracleModel(), classification, templates=["{c}"])["details"]["num_templates"] == 1
    with pytest.raises(DmclipError, match="placeholder"):
        zero_shot(OracleModel(), classification, templates=["a photo"])
    with pytest.raises(DmclipError, match="class names"):
        zero_shot(OracleModel(), classification, classnames=["red", "green"])


def test_under_five_classes_acc5_is_nan_with_a_note():
    images = np.stack([_solid(c) for c in ("red", "green", "blue")])
    ds = ArrayClassificationDataset("three", images, [0, 1, 2], ["red", "green", "blue"], ["{}"])
    result = zero_shot(OracleModel(), ds)
    assert math.isnan(result["metrics"]["acc5"]) and "acc5" in result["notes"][0]


def test_image_only_model_is_a_clear_error(classification):
    model = OracleModel()
    model.encode_text = None
    with pytest.raises(DmclipError, match="encode_text"):
        zero_shot(model, classification)


# ------------------------------------------------------------------------------------- retrieval


def test_oracle_retrieval_by_hand(image_text):
    m = retrieval(OracleModel(), image_text)["metrics"]
    # I→T: each image's own captions score 1 and come first ("the green thing" is the same vector as
    # "green" but has a higher index, so exact ties keep the green image's own captions ahead)
    assert m["text_retrieval_recall@1"] == 1.0 and m["text_retrieval_mean_rank"] == 1.0
    # T→I: 12 of 13 captions find their image first; "the green thing" finds magenta, its opposite
    # (cosine -1), last of the 6 images
    assert m["image_retrieval_recall@1"] == pytest.approx(12 / 13)
    assert m["image_retrieval_recall@5"] == pytest.approx(12 / 13) and m["image_retrieval_recall@10"] == 1.0
    assert m["image_retrieval_mean_rank"] == pytest.approx(18 / 13) and m["image_retrieval_median_rank"] == 1.0
    assert retrieval_recall(OracleModel(), image_text)["t2i_r1"] == pytest.approx(12 / 13)


def test_itm_rerank_reaches_the_positive_only_within_k(image_text):
    model = OracleModel(truth={"the green thing": 5})  # the ITM head knows the caption is magenta's
    metrics = retrieval(model, image_text, rerank_k=6)["metrics"]
    assert metrics["image_retrieval_recall@1"] == 1.0 and metrics["text_retrieval_recall@1"] == 1.0
    result = retrieval(model, image_text, rerank_k=5)  # magenta is 6th by ITC: outside the re-ranked top 5
    assert result["metrics"]["image_retrieval_recall@1"] == pytest.approx(12 / 13)
    assert result["details"]["rerank_k"] == 5 and "re-ranked" in result["notes"][0]


def test_rerank_needs_an_itm_head(image_text):
    model = OracleModel()
    model.itm_score = None
    with pytest.raises(DmclipError, match="rerank"):
        retrieval(model, image_text, rerank_k=4)


def test_empty_captions_are_a_clear_error():
    images = np.stack([_solid("red"), _solid("blue")])
    ds = ArrayImageTextDataset("broken", images, [["a red square"], []])
    with pytest.raises(DmclipError, match="no caption"):
        retrieval(OracleModel(), ds)


def test_classification_set_for_retrieval_is_a_clear_error(classification):
    with pytest.raises(DmclipError, match="image-text"):
        retrieval(OracleModel(), classification)


# ----------------------------------------------------------------------------------- the cache


def test_embeddings_are_cached_per_model_weights(classification):
    model, cache = OracleModel(), EmbeddingCache()
    first = zero_shot(model, classification, cache=cache)
    assert model.encoded_images == 18
    again = zero_shot(model, classification, cache=cache)
    assert model.encoded_images == 18 and again["metrics"] == first["metrics"]  # nothing re-encoded
    with torch.no_grad():
        model.image_proj.bias.fill_(0.0)  # new weights -> new fingerprint -> encoded again
    zero_shot(model, classification, cache=cache)
    assert model.encoded_images == 36


def test_disk_cache_survives_a_new_process_worth_of_memory(classification, tmp_path):
    zero_shot(OracleModel(), classification, cache=EmbeddingCache(tmp_path))
    model = OracleModel()
    zero_shot(model, classification, cache=EmbeddingCache(tmp_path))
    assert model.encoded_images == 0 and any(tmp_path.glob("*.pt"))


def test_fingerprint_follows_the_weights():
    a, b = OracleModel(), OracleModel()
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.word_embedding.weight[0, 0] = 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)


# ------------------------------------------------------------------------------------ captioning


@pytest.mark.requires_java
def test_caption_scores_equal_the_caption_metrics_of_the_generated_text(image_text):
    result = caption(OracleModel(), image_text, meteor=False, batch_size=4)
    assert result["captions"] == {i: f"a {name} square" for i, name in enumerate(NAMES)}
    assert 0 < result["metrics"]["cider"] < 10  # magenta's wrong reference keeps it below perfect
    expected = caption_metrics({i: image_text.captions(i) for i in range(6)}, result["captions"], meteor=False)
    assert result["metrics"]["cider"] == pytest.approx(expected["cider"])
    assert result["metrics"]["bleu4"] == pytest.approx(expected["bleu4"])
    assert result["task"] == "captioning" and math.isnan(result["metrics"]["meteor"])


def test_caption_needs_a_captioner(image_text):
    model = OracleModel()
    model.generate = None
    with pytest.raises(DmclipError, match="captions"):
        caption(model, image_text)


# --------------------------------------------------------------------------------------- latency


def test_latency_counts_params_flops_and_ratios():
    model, bigger = OracleModel(), OracleModel(extra_vocab=len(WORDS))  # twice the embedding table
    result = latency(model, batch_size=4, warmup=1, runs=3, threads=1, vs=bigger, model_name="a", vs_name="b")
    m = result["metrics"]
    assert m["image_params"] == 3 * 3 + 3  # only the projection: the image path never touches the table
    assert m["text_params"] == len(WORDS) * 3
    assert m["image_flops"] == 2 * 3 * 3  # one (1, 3) x (3, 3) matmul per image
    assert m["params"] == 12 + len(WORDS) * 3 + 1
    assert result["vs"]["ratios"]["text_params"] == pytest.approx(0.5)
    assert result["details"]["threads"] == 1 and result["details"]["batch_sizes"] == [1, 4]
    for key in ("image_b1_median_ms", "image_b4_p90_ms", "text_b4_items_per_s"):
        assert m[key] > 0
    assert m["image_b4_peak_bytes"] >= 4 * 3 * 4  # at least the (4, 3) float output
    assert len(latency_rows(result)) == 8  # 2 models x 2 encoders x 2 batch sizes


# ----------------------------------------------------------------------------------------- suite


def test_suite_table_average_and_bold_best(classification, image_text):
    worse = OracleModel()
    with torch.no_grad():
        worse.word_embedding.weight[1:3] = worse.word_embedding.weight[[2, 1]]  # red <-> green words
    cache = EmbeddingCache()
    result = suite({"oracle": OracleModel(), "swapped": worse}, zero_shot_specs=[classification],
                   retrieval_specs=[image_text], cache=cache)
    best, other = result["rows"]
    assert result["columns"] == ["colours acc@1", "colour-pairs T→I R@1", "colour-pairs I→T R@1", "Avg Perf"]
    # Avg Perf = mean over datasets of the main metric; retrieval's is the mean of both directions
    assert best["Avg Perf"] == pytest.approx((1.0 + (12 / 13 + 1.0) / 2) / 2)
    assert other["colours acc@1"] == pytest.approx(12 / 18)
    markdown = suite_markdown(result)
    assert "| oracle | **100.00** |" in markdown and "| swapped | 66.67 |" in markdown
    assert suite_csv(result).splitlines()[1].startswith("oracle,1.0,")
    assert len(result["tasks"]) == 4 and {t["task"] for t in result["tasks"]} == {
        "zeroshot_classification", "zeroshot_retrieval"}
    assert cache.misses > 0 and cache.hits == 0
    suite({"oracle": OracleModel()}, zero_shot_specs=[classification], retrieval_specs=[image_text], cache=cache)
    assert cache.hits == 4  # class prompts + images of the zero-shot set, images + captions of the retrieval set


def test_zero_shot_accuracy_helper(classification):
    assert zero_shot_accuracy(OracleModel(), classification) == {"acc1": 1.0, "acc5": 1.0,
                                                                 "mean_per_class_recall": 1.0}

"""Per-image caption statistics and their bootstrap intervals: the corpus scores they give back must be
pycocoevalcap's to the last digit, and the intervals must behave as a reader of a results table assumes."""

from __future__ import annotations

import numpy as np
import pytest

from dmclip.errors import DmclipError
from dmclip.metrics.caption import caption_metrics
from dmclip.metrics.caption_intervals import bleu, caption_intervals, caption_items

WORDS = "a the red blue green small large circle square star arrow upper left right of picture".split()


def _corpus(seed: int, images: int = 40, short: bool = False) -> tuple[dict, dict]:
    """Tokenized references (1-5 per image) and candidates: copies, partial matches, short ones, one empty."""
    rng = np.random.default_rng(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))

    refs = {i: [sentence(4, 12) for _ in range(int(rng.integers(1, 6)))] for i in range(images)}
    cands = {}
    for i, r in refs.items():
        kind = i % 4
        if kind == 0:
            cands[i] = r[0]
        elif kind == 1:
            cands[i] = " ".join(r[0].split()[: 2 if short else 5]) + " " + sentence(1, 3)
        else:
            cands[i] = sentence(1, 4) if short else sentence(6, 14)
    cands[images - 1] = ""
    return refs, cands


@pytest.mark.parametrize("short", [False, True])  # True: the candidates are shorter, the brevity penalty bites
def test_corpus_bleu_and_cider_from_item_statistics_are_pycocoevalcaps(short):
    refs, cands = _corpus(3, short=short)
    expected = caption_metrics(refs, cands, tokenize=False, meteor=False)
    items = caption_items(refs, cands)
    assert items["bleu"].shape == (40, 10) and items["cider"].shape == (40,)
    totals = items["bleu"].sum(0)
    ratio = totals[-2] / totals[-1]
    assert (ratio < 1) == short
    for order in range(1, 5):
        assert bleu(totals, order) == pytest.approx(expected[f"bleu{order}"], rel=1e-12, abs=1e-15)
    assert items["cider"].mean() == pytest.approx(expected["cider"], rel=1e-12)


def test_a_point_equal_to_the_baseline_keeps_exactly_all_of_it():
    items = caption_items(*_corpus(4))
    out = caption_intervals({"none": items, "copy": items}, "none", [("none", "copy")], replicates=200)
    for metric in ("bleu4_ratio", "cider_ratio"):
        assert out["points"]["copy"][metric] == pytest.approx({"value": 1.0, "low": 1.0, "high": 1.0})
        pair = out["pairs"]["copy - none"][metric]
        assert pair["diff"] == 0 and pair["low"] == 0 and pair["high"] == 0 and not pair["significant"]
    assert out["points"]["copy"]["bleu4"]["value"] == pytest.approx(bleu(items["bleu"].sum(0)))


def _fake_items(cider: np.ndarray) -> dict:
    """Per-image statistics whose CIDEr is ``cider`` (seeds, images) and whose BLEU is perfect."""
    stats = np.zeros((*cider.shape, 10))
    stats[..., :8] = 5.0
    stats[..., 8:] = 5.0
    return {"bleu": stats, "cider": cider}


def test_one_seed_cider_interval_is_the_bootstrap_of_a_mean():
    """Against the baseline's constant per-image CIDEr of 1, the ratio is the mean of the point's per-image
    scores: its 95 % interval is mean +- 1.96 sd / sqrt(n) to within a bootstrap's error."""
    rng = np.random.default_rng(0)
    scores = rng.normal(0.8, 0.3, size=(1, 2000))
    out = caption_intervals({"none": _fake_items(np.ones((1, 2000))), "k": _fake_items(scores)}, "none")
    kept = out["points"]["k"]["cider_ratio"]
    half = 1.96 * scores.std(ddof=1) / np.sqrt(scores.size)
    assert kept["value"] == pytest.approx(scores.mean(), rel=1e-12)
    assert kept["low"] == pytest.approx(scores.mean() - half, abs=0.15 * half)
    assert kept["high"] == pytest.approx(scores.mean() + half, abs=0.15 * half)
    assert out["seeds"] == 1 and out["images"] == 2000


def test_seed_to_seed_differences_widen_the_interval():
    rng = np.random.default_rng(1)
    noise = rng.normal(0.8, 0.2, size=(1, 500))
    same = np.repeat(noise, 3, 0)
    shifted = same + np.array([[-0.1], [0.0], [0.1]])  # the seeds disagree by +-0.1 on every image
    base = _fake_items(np.ones((1, 500)))

    def width(cider):
        kept = caption_intervals({"none": base, "k": _fake_items(cider)}, "none")["points"]["k"]["cider_ratio"]
        return kept["high"] - kept["low"], kept["value"]

    (narrow, value_same), (wide, value_shifted) = width(same), width(shifted)
    assert value_same == pytest.approx(value_shifted, abs=1e-12)  # pooled over seeds: the offsets cancel
    assert wide > 3 * narrow


def test_pairing_finds_a_small_gain_that_two_separate_intervals_cannot():
    """B is A + 0.02 on every image while the images vary by 0.3: the points' own intervals overlap, the paired
    difference excludes 0."""
    rng = np.random.default_rng(2)
    a = rng.normal(0.8, 0.3, size=(3, 400))
    out = caption_intervals({"none": _fake_items(np.ones((1, 400))), "a": _fake_items(a),
                             "b": _fake_items(a + 0.02)}, "none", [("a", "b")])
    pa, pb = out["points"]["a"]["cider_ratio"], out["points"]["b"]["cider_ratio"]
    assert pb["low"] < pa["high"]
    pair = out["pairs"]["b - a"]["cider_ratio"]
    assert pair["diff"] == pytest.approx(0.02) and pair["significant"] and pair["low"] > 0.015
    assert not out["pairs"]["b - a"]["bleu4_ratio"]["significant"]  # both BLEUs are perfect


def test_mismatched_points_are_refused_with_what_to_do():
    items = _fake_items(np.ones((2, 10)))
    with pytest.raises(DmclipError, match="same test images"):
        caption_intervals({"none": items, "k": _fake_items(np.ones((2, 9)))}, "none")
    with pytest.raises(DmclipError, match="scored at 2 seeds, another at 3"):
        caption_intervals({"none": items, "k": _fake_items(np.ones((3, 10)))}, "none")
    with pytest.raises(DmclipError, match="pairs name points that were not scored"):
        caption_intervals({"none": items}, "none", [("none", "kmeans k=8")])
    with pytest.raises(DmclipError, match="baseline point 'none' was not scored"):
        caption_intervals({"k": items}, "none")
    with pytest.raises(DmclipError, match="no candidate caption"):
        caption_items({0: ["a red circle"], 1: ["a blue star"]}, {0: "a red circle"})


@pytest.mark.requires_java  # the PTB tokenizer
def test_compress_scores_equal_the_caption_metrics_of_eval_caption():
    """compress tokenizes references and candidates in one tokenizer run and keeps the per-image statistics:
    its corpus scores must still be `dmclip eval caption`'s, and the statistics must give them back."""
    from dmclip.compress.measure import score_captions

    refs = {0: ["A red circle.", "a RED circle at the top"], 1: ["Two blue squares!", "blue squares, two"],
            2: ["a green star", "", "   "]}
    cands = {0: "a red circle", 1: "two blue squares .", 2: "a green, star"}
    scores = score_captions(refs, cands)
    expected = caption_metrics(refs, cands, meteor=False)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"):
        assert scores[key] == pytest.approx(expected[key], rel=1e-12), key
    assert bleu(scores["items"]["bleu"].sum(0)) == pytest.approx(expected["bleu4"], rel=1e-12)
    assert scores["items"]["cider"].mean() == pytest.approx(expected["cider"], rel=1e-12)

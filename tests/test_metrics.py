"""Metric functions against hand-computed cases and independent implementations.

What a user would notice if these broke: zero-shot / retrieval / caption numbers that do not match
CLIP_benchmark, BLIP or the COCO caption evaluation, so dmclip's tables could not be compared with papers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmclip.errors import DmclipError
from dmclip.metrics import latency as lat
from dmclip.metrics.filtering import noise_removal_metrics, precision_recall_curve, thin_curve
from dmclip.metrics.retrieval import (
    best_positive_ranks,
    positive_pairs,
    rerank,
    retrieval_metrics,
    similarity,
)
from dmclip.metrics.zeroshot import class_embeddings, topk_accuracy, zero_shot_logits, zero_shot_metrics

# ------------------------------------------------------------------------------------- zero-shot


def test_class_embedding_is_renormalised_mean_of_normalised_templates():
    features = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])  # 1 class, 2 templates
    # by hand: (0.6, 0.8) and (0, 1) -> mean (0.3, 0.9) -> / sqrt(0.9)
    expected = torch.tensor([[0.3, 0.9]]) / math.sqrt(0.9)
    assert torch.allclose(class_embeddings(features), expected, atol=1e-6)


def test_each_class_embedding_is_normalised_on_its_own():
    features = torch.tensor([[[3.0, 4.0]], [[0.0, 10.0]]])  # 2 classes, 1 template
    assert torch.allclose(class_embeddings(features), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_text_features_without_a_template_axis_are_refused():
    with pytest.raises(ValueError, match=r"\(classes, templates, dim\), got \(4, 8\)"):
        class_embeddings(torch.randn(4, 8))


def test_zero_shot_logits_are_100_times_cosine():
    images = torch.tensor([[3.0, 4.0], [0.0, 0.5]])  # each image normalised on its own
    classes = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert torch.allclose(zero_shot_logits(images, classes), torch.tensor([[60.0, 100.0], [0.0, 80.0]]))


def test_hand_computed_metrics_with_a_tie_and_three_classes():
    logits = torch.tensor([[3.0, 1, 2], [0, 5, 1], [2, 2, 0], [1, 0, 4], [0, 0, 1]])
    labels = torch.tensor([0, 2, 1, 2, 2])
    out = zero_shot_metrics(logits, labels)
    # predictions 0, 1, 0 (tie -> lower index), 2, 2: three of five right
    assert out["acc1"] == pytest.approx(0.6)
    # recall per class: class 0 1/1, class 1 0/1, class 2 2/3
    assert out["mean_per_class_recall"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert math.isnan(out["acc5"]) and "acc5" in out["notes"][0]


def test_acc5_by_hand():
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6]])
    labels = torch.tensor([4, 0])  # 5th best -> hit; 6th best -> miss
    assert topk_accuracy(logits, labels, 5) == 0.5
    assert topk_accuracy(logits, labels, 1) == 0.0


def test_one_class_is_always_right():
    out = zero_shot_metrics(torch.randn(4, 1), torch.zeros(4, dtype=torch.long))
    assert out["acc1"] == 1.0 and out["mean_per_class_recall"] == 1.0 and math.isnan(out["acc5"])


def test_labels_beyond_the_class_names_are_a_clear_error():
    with pytest.raises(DmclipError, match="class names"):
        zero_shot_metrics(torch.randn(2, 3), torch.tensor([0, 3]))


def test_tied_classes_rank_the_lower_index_first_past_16_classes():
    """40 equal logits (past torch's small-sort size, where an unstable sort reorders ties)."""
    logits = torch.zeros(2, 40)
    assert zero_shot_metrics(logits, torch.tensor([0, 39]))["acc1"] == 0.5
    assert topk_accuracy(logits, torch.tensor([4, 5]), 5) == 0.5


def test_one_sample_is_scored():
    assert topk_accuracy(torch.tensor([[1.0, 2.0]]), torch.tensor([1]), 1) == 1.0


def test_no_samples_is_a_clear_error():
    with pytest.raises(DmclipError, match="no samples"):
        zero_shot_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_logits_and_labels_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="3 rows of logits but 2 labels"):
        zero_shot_metrics(torch.zeros(3, 2), torch.tensor([0, 1]))


def _clip_benchmark_accuracy(output, target, topk=(1,)):
    # CLIP_benchmark's zeroshot_classification.accuracy, written out
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / n for k in topk]


def test_against_clip_benchmark_and_sklearn():
    from sklearn.metrics import balanced_accuracy_score

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 17, generator=generator)  # continuous: no ties
    labels = torch.randint(0, 17, (300,), generator=generator)
    ours = zero_shot_metrics(logits, labels)
    acc1, acc5 = _clip_benchmark_accuracy(logits, labels, topk=(1, 5))
    assert ours["acc1"] == pytest.approx(acc1) and ours["acc5"] == pytest.approx(acc5)
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))


# ------------------------------------------------------------------------------------- retrieval


def test_hand_computed_retrieval():
    scores = torch.tensor([[0.1, 0.4, 0.5], [0.3, 0.2, 0.8]])  # 2 images x 3 texts
    text_to_image = torch.tensor([0, 0, 1])
    m = retrieval_metrics(scores, text_to_image)
    # I→T: image 0 ranks t2, t1, t0: its best positive is its second caption t1 (rank 2; its first, t0, is
    # rank 3); image 1 ranks t2 first (rank 1)
    assert m["text_retrieval_recall@1"] == 0.5 and m["text_retrieval_recall@5"] == 1.0
    assert m["text_retrieval_mean_rank"] == 1.5 and m["text_retrieval_median_rank"] == 1.5
    # T→I: t0 -> image 1 first (rank 2); t1 -> image 0 first; t2 -> image 1 first
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["image_retrieval_mean_rank"] == pytest.approx(4 / 3) and m["image_retrieval_median_rank"] == 1.0


def test_one_image_with_one_caption_is_found_first():
    m = retrieval_metrics(torch.tensor([[0.3]]), torch.tensor([0]))
    assert m["image_retrieval_recall@1"] == 1.0 and m["text_retrieval_recall@1"] == 1.0
    assert m["image_retrieval_mean_rank"] == 1.0 and m["text_retrieval_median_rank"] == 1.0


def test_recall_is_reported_at_the_asked_ks_in_both_directions():
    m = retrieval_metrics(torch.tensor([[0.1, 0.4, 0.5], [0.3, 0.2, 0.8]]), torch.tensor([0, 0, 1]), ks=(2,))
    assert sorted(k for k in m if "recall" in k) == ["image_retrieval_recall@2", "text_retrieval_recall@2"]
    assert m["image_retrieval_recall@2"] == 1.0 and m["text_retrieval_recall@2"] == 1.0


def test_text_scores_replace_the_text_to_image_direction_only():
    """Re-ranked text -> image scores that put every caption's image second: T→I R@1 drops to 0, I→T stays."""
    scores = torch.eye(2)
    m = retrieval_metrics(scores, torch.tensor([0, 1]), text_scores=1 - torch.eye(2))
    assert m["image_retrieval_recall@1"] == 0.0 and m["image_retrieval_mean_rank"] == 2.0
    assert m["text_retrieval_recall@1"] == 1.0


@pytest.mark.parametrize("scores, text_to_image", [
    (torch.zeros(2, 0), torch.zeros(0, dtype=torch.long)),  # no captions
    (torch.zeros(0, 2), torch.zeros(2, dtype=torch.long)),  # no images
])
def test_nothing_to_retrieve_is_a_clear_error(scores, text_to_image):
    with pytest.raises(DmclipError, match="nothing to retrieve"):
        retrieval_metrics(scores, text_to_image)


@pytest.mark.parametrize("n", [3, 40])  # 40: past torch's small-sort size, where an unstable sort reorders ties
def test_ties_rank_the_lower_index_first(n):
    positives = positive_pairs(torch.arange(n), n)
    assert positives.dtype == torch.bool and torch.equal(positives, torch.eye(n, dtype=torch.bool))
    ranks = best_positive_ranks(torch.zeros(n, n), positives)
    assert ranks.tolist() == list(range(1, n + 1))


def test_an_image_without_caption_is_a_clear_error():
    with pytest.raises(DmclipError, match=r"6 queries have no positive \(e.g. \[2, 3, 4, 5, 6\]\)"):
        retrieval_metrics(torch.randn(8, 2), torch.tensor([0, 1]))


def _clip_benchmark_recall_at_k(scores, positive_pairs, k):
    # CLIP_benchmark's zeroshot_retrieval.recall_at_k, written out
    nb_texts, nb_images = scores.shape
    topk_indices = torch.topk(scores, k, dim=1)[1]
    nb_positive = positive_pairs.sum(dim=1)
    topk_indices_onehot = torch.nn.functional.one_hot(topk_indices, num_classes=nb_images)
    positive_pairs_reshaped = positive_pairs.view(nb_texts, 1, nb_images)
    nb_true_positive = (topk_indices_onehot * positive_pairs_reshaped).sum(dim=(1, 2))
    return nb_true_positive / nb_positive


def _blip_ranks(score_i2t, score_t2i, img2txt, txt2img):
    # BLIP's itm_eval ranks, written out (0-based)
    ranks = np.zeros(score_i2t.shape[0])
    for index, score in enumerate(score_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            rank = min(rank, tmp)
        ranks[index] = rank
    ranks_t = np.zeros(score_t2i.shape[0])
    for index, score in enumerate(score_t2i):
        inds = np.argsort(score)[::-1]
        ranks_t[index] = np.where(inds == txt2img[index])[0][0]
    return ranks, ranks_t


def test_against_clip_benchmark_and_blip():
    generator = torch.Generator().manual_seed(1)
    images, per_image = 40, 5
    text_to_image = torch.arange(images).repeat_interleave(per_image)
    image_features = torch.randn(images, 16, generator=generator)
    text_features = image_features[text_to_image] + 1.5 * torch.randn(images * per_image, 16, generator=generator)
    scores = similarity(image_features, text_features)
    ours = retrieval_metrics(scores, text_to_image)
    positives = positive_pairs(text_to_image, images)
    img2txt = [list(range(i * per_image, (i + 1) * per_image)) for i in range(images)]
    ranks_i2t, ranks_t2i = _blip_ranks(scores.numpy(), scores.t().numpy(), img2txt, text_to_image.numpy())
    for k in (1, 5, 10):
        clip_t2i = (_clip_benchmark_recall_at_k(scores.t(), positives.t(), k) > 0).float().mean().item()
        clip_i2t = (_clip_benchmark_recall_at_k(scores, positives, k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(clip_t2i)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(clip_i2t)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx((ranks_i2t < k).mean())
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx((ranks_t2i < k).mean())
    assert 0 < ours["image_retrieval_recall@1"] < 1  # a case where the comparison means something
    assert ours["text_retrieval_mean_rank"] == pytest.approx(ranks_i2t.mean() + 1)
    assert ours["image_retrieval_median_rank"] == pytest.approx(np.median(ranks_t2i) + 1)


def test_similarity_is_the_cosine_of_each_image_and_text():
    images = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    texts = torch.tensor([[1.0, 0.0], [6.0, 8.0], [0.0, -5.0]])
    expected = torch.tensor([[0.6, 1.0, -0.8], [0.0, 0.8, -1.0]])
    assert torch.allclose(similarity(images, texts), expected, atol=1e-6)


def test_rerank_with_a_perfect_matcher_fixes_everything_within_k():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.8, 0.2, 0.1, 0.3]])  # 2 queries x 4 candidates
    positive = {(0, 2), (1, 3)}  # query 0's positive is 2nd in ITC order, query 1's is 2nd too
    calls = []

    def matcher(queries, candidates):
        calls.append(len(queries))
        return torch.tensor([float((int(q), int(c)) in positive) for q, c in zip(queries, candidates)])

    reranked = rerank(scores, 2, matcher)
    assert reranked.argmax(dim=1).tolist() == [2, 3]
    assert sum(calls) == 4  # only the top-2 of each query were scored
    # outside the top k the ITC order is kept, below every candidate
    assert reranked[0, 0] > reranked[0, 3] and reranked[0, 0] < reranked[0, 1]
    # k = 1 changes nothing: the top-1 stays on top
    assert rerank(scores, 1, matcher).argmax(dim=1).tolist() == scores.argmax(dim=1).tolist()


def test_rerank_ties_keep_the_lower_index_first():
    """Equal similarities and equal match scores (40 candidates: past torch's small-sort size, where an
    unstable sort reorders ties): the re-ranked order is the index order, the tie rule of the ranks."""
    reranked = rerank(torch.zeros(1, 40), 20, lambda queries, candidates: torch.zeros(len(queries)))
    order = torch.sort(reranked, dim=1, descending=True, stable=True).indices
    assert order[0].tolist() == list(range(40))


def test_rerank_scores_each_query_once_whatever_the_batch_size():
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(5, 6, generator=generator)
    match = torch.rand(5, 6, generator=generator)
    calls = []

    def matcher(queries, candidates):
        calls.append(len(queries))
        return match[queries, candidates]

    whole = rerank(scores, 3, matcher)
    assert calls == [15]
    calls.clear()
    assert torch.equal(rerank(scores, 3, matcher, batch_queries=2), whole)
    assert calls == [6, 6, 3]


# ------------------------------------------------------------------------------- noise filtering


def test_noise_removal_precision_and_recall_on_a_hand_case():
    noisy = [True, True, False, False, True, False]
    removed = [True, False, True, False, True, False]
    m = noise_removal_metrics(noisy, removed)
    # removed 3, of which 2 noisy -> precision 2/3; 3 noisy, 2 of them removed -> recall 2/3
    assert (m["true_positives"], m["false_positives"], m["false_negatives"], m["true_negatives"]) == (2, 1, 1, 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert (m["noisy"], m["removed"], m["total"]) == (3, 3, 6)


def test_noise_removal_when_half_of_the_removed_pairs_are_noisy():
    """One noisy and one clean pair removed, one of each kept: precision, recall and F1 are all 1/2."""
    m = noise_removal_metrics([True, False, True, False], [True, True, False, False])
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)


def test_noise_removal_recall_is_undefined_without_noisy_pairs():
    m = noise_removal_metrics([False, False], [True, False])
    assert m["precision"] == 0.0 and m["recall"] is None and m["f1"] is None


def test_noise_labels_as_numbers_count_like_booleans():
    """0/1 labels read as floats (a numpy column, a CSV) give the boolean answer."""
    as_numbers = noise_removal_metrics(np.array([1.0, 0.0, 1.0, 0.0]), np.array([1.0, 1.0, 0.0, 0.0]))
    assert as_numbers == noise_removal_metrics([True, False, True, False], [True, True, False, False])


def test_noise_removal_f1_is_undefined_when_only_clean_pairs_are_removed():
    m = noise_removal_metrics([True, False], [False, True])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] is None


def test_noise_labels_and_filter_decisions_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="noise labels"):
        noise_removal_metrics([True, False, True], [True, False])


def test_noise_removal_is_undefined_not_zero_when_nothing_is_removed():
    m = noise_removal_metrics([True, False], [False, False])
    assert m["precision"] is None and m["recall"] == 0.0 and m["f1"] is None


def test_precision_recall_curve_hand_case():
    # removing the lowest scores first: {0.1} -> P 1, R 1/2; +{0.2} -> 1/2, 1/2; +{0.3} -> 2/3, 1; all -> 1/2, 1
    curve = precision_recall_curve([0.3, 0.1, 0.9, 0.2], [True, True, False, False])
    assert curve["precision"] == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    assert curve["recall"] == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert curve["average_precision"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    # each threshold removes exactly the scores below it
    assert curve["thresholds"][0] > 0.1 and curve["thresholds"][0] < 0.2


def test_precision_recall_curve_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, size=300) / 20.0  # many ties
    noisy = rng.random(300) < 0.3
    curve = precision_recall_curve(scores, noisy)
    assert len(curve["thresholds"]) == len(np.unique(scores))
    for t, p, r in zip(curve["thresholds"], curve["precision"], curve["recall"]):
        m = noise_removal_metrics(noisy, scores < t)
        assert (p, r) == pytest.approx((m["precision"], m["recall"]))


def test_precision_recall_curve_is_empty_without_noise_or_scores():
    empty = {"thresholds": [], "precision": [], "recall": [], "average_precision": None}
    assert precision_recall_curve([0.2, 0.7], [False, False]) == empty
    assert precision_recall_curve([], []) == empty


def test_adjacent_floats_are_separate_thresholds():
    """Two scores one float apart: the first threshold removes the lower one only."""
    low = 0.5
    high = float(np.nextafter(low, 1.0))
    curve = precision_recall_curve([high, low], [False, True])
    assert curve["precision"] == [1.0, 0.5] and curve["recall"] == [1.0, 1.0]


def test_thin_curve_keeps_at_most_201_evenly_spaced_points_with_both_ends():
    n = 1000
    curve = {"thresholds": list(range(n)), "precision": [i / n for i in range(n)],
             "recall": [1 - i / n for i in range(n)], "average_precision": 0.4}
    thin = thin_curve(curve)
    assert len(thin["thresholds"]) == 201 and thin["average_precision"] == 0.4
    assert thin["thresholds"][0] == 0 and thin["thresholds"][-1] == n - 1
    assert np.diff(thin["thresholds"]).max() - np.diff(thin["thresholds"]).min() <= 1
    # the three lists stay aligned point by point
    assert thin["precision"] == [t / n for t in thin["thresholds"]]
    assert thin["recall"] == [1 - t / n for t in thin["thresholds"]]
    short = {**curve, **{k: curve[k][:201] for k in ("thresholds", "precision", "recall")}}
    assert thin_curve(short) == short


@pytest.mark.slow  # importing scikit-learn takes seconds
def test_precision_recall_curve_and_average_precision_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 20, size=300) / 20.0
    noisy = rng.random(300) < 0.3
    curve = precision_recall_curve(scores, noisy)
    precision, recall, _ = metrics.precision_recall_curve(noisy, -scores)  # high "noisiness" = low ITM
    ours = sorted(zip(np.round(curve["recall"], 12), np.round(curve["precision"], 12)))
    theirs = sorted((round(r, 12), round(p, 12)) for p, r in zip(precision[:-1], recall[:-1]))
    assert ours == theirs
    assert curve["average_precision"] == pytest.approx(metrics.average_precision_score(noisy, -scores))


# --------------------------------------------------------------------------------------- latency


def test_percentile_matches_numpy():
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.5]
    for q in (0, 50, 90, 100):
        assert lat.percentile(values, q) == pytest.approx(np.percentile(values, q))
    stats = lat.summarize_times([0.001, 0.002, 0.003])
    assert stats["median_ms"] == pytest.approx(2.0) and stats["runs"] == 3


def test_time_calls_interleaves_after_warmup():
    order = []
    out = lat.time_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=2, runs=3)
    assert order == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    assert len(out["a"]) == len(out["b"]) == 3 and all(t >= 0 for t in out["a"])


def test_flops_of_linear_and_attention_are_counted():
    linear = torch.nn.Linear(10, 20)
    x = torch.randn(3, 10)
    assert lat.count_flops(lambda: linear(x))["flops"] == 2 * 3 * 10 * 20
    B, H, L, Dh = 2, 4, 9, 8
    q = torch.randn(B, H, L, Dh)
    # QK^T and AV: 2 matmuls of B·H·L·L·Dh multiply-adds each (the fused CPU kernel is invisible otherwise)
    flops = lat.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))["flops"]
    assert flops == 2 * 2 * B * H * L * L * Dh


def test_multihead_attention_fast_path_is_counted():
    D, L, heads = 16, 5, 2
    mha = torch.nn.MultiheadAttention(D, heads, batch_first=True).eval()
    x = torch.randn(1, L, D)
    # in projection (3 D x D), out projection (D x D), and the two attention matmuls
    expected = 2 * L * D * 3 * D + 2 * L * D * D + 2 * 2 * L * L * D
    assert lat.count_flops(lambda: mha(x, x, x, need_weights=False))["flops"] == expected


def test_peak_tensor_bytes_by_hand():
    def work():
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 live
        del a
        return b + 1  # 8000 live again, never 12000

    assert lat.peak_tensor_bytes(work) == 8000
    linear = torch.nn.Linear(100, 200)
    x = torch.randn(8, 100)
    assert lat.peak_tensor_bytes(lambda: linear(x), exclude=[linear, x]) == 8 * 200 * 4


def test_selective_scan_flops_are_added_analytically():
    from dmclip.models.scan import scan_flops, selective_scan

    B, D, L, N = 2, 6, 5, 4
    u, delta = torch.randn(B, D, L), torch.rand(B, D, L)
    A, Bm, Cm = -torch.rand(D, N), torch.randn(B, N, L), torch.randn(B, N, L)
    out = lat.count_flops(lambda: selective_scan(u, delta, A, Bm, Cm, backend="reference"))
    # FlopCounterMode alone cannot see a fused scan; the analytic count is added on top
    assert out["scan"] == scan_flops(B, D, L, N, has_D=False, has_z=False) > 0
    assert out["flops"] == out["counted"] + out["scan"]


def test_counting_flops_prints_no_warning_about_triton():
    """torch's FlopCounterMode warns at import on a CUDA build without triton (this machine's); the demo and
    `dmclip eval latency` count FLOPs of CPU models, so a user must not see that line."""
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(); import torch; from dmclip.metrics.latency import count_flops; "
            "print(count_flops(lambda: torch.ones(2, 3) @ torch.ones(3, 4))['flops'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "48"
    assert "triton" not in done.stderr, done.stderr

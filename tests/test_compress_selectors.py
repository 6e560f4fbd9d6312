"""Selectors: if these break, the server would see a different token sequence than the one we measured."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmclip.compress import decode, encode
from dmclip.compress.selectors import _bipartite_merge, build_selector, restore_payload
from dmclip.errors import DmclipError
from dmclip.registry import selectors


def _tokens(B=2, N=16, W=8, seed=0):
    return torch.randn(B, 1 + N, W, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", selectors.names())
@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_every_selector_round_trips_through_the_wire(name, dtype):
    selector = selectors.get(name, dtype=dtype, **selectors.entry(name).tiny)
    tokens = _tokens()
    payload = selector.compress(tokens)
    restored = selector.restore(payload)
    assert restored.shape[0] == 2 and restored.shape[2] == 8 and restored.dtype == torch.float32
    assert torch.equal(restore_payload(decode(encode(payload))), restored)
    # the class token is sent verbatim (up to the wire dtype) and comes first
    tolerance = {"float32": 0, "float16": 1e-2, "int8": 3e-2}[dtype] * tokens[:, 0].abs().max()
    assert (restored[:, 0] - tokens[:, 0]).abs().max() <= tolerance


def test_none_is_lossless_in_float32():
    tokens = _tokens()
    assert torch.equal(selectors.get("none", dtype="float32").restore(selectors.get("none", dtype="float32")
                                                                      .compress(tokens)), tokens)


def test_kmeans_expand_replaces_each_token_by_its_centroid_and_centroids_mode_sends_k():
    tokens = _tokens(N=30)
    expand = build_selector("kmeans", k=4, dtype="float32")
    payload = expand.compress(tokens)
    restored = expand.restore(payload)
    assert restored.shape == (2, 31, 8)
    for b in range(2):
        for i in range(30):
            assert torch.equal(restored[b, 1 + i], payload.vectors[b, payload.indices[b, i]])
    compact = build_selector("kmeans", k=4, dtype="float32", restore="centroids").compress(tokens)
    assert compact.indices is None and restore_payload(compact).shape == (2, 5, 8)
    assert len(encode(compact)) < len(encode(payload))


def test_random_and_topk_keep_a_fraction_in_order():
    tokens = _tokens(N=20)
    for name in ("random", "topk-norm"):
        kept = build_selector(name, fraction=0.25, dtype="float32").compress(tokens).vectors
        assert kept.shape == (2, 5, 8)
        for b in range(2):  # every kept vector is one of the patches, in original order
            positions = [int((tokens[b, 1:] == v).all(-1).nonzero()[0]) for v in kept[b]]
            assert positions == sorted(positions)
    norms = tokens[:, 1:].norm(dim=-1)
    top = build_selector("topk-norm", fraction=0.25, dtype="float32").compress(tokens).vectors.norm(dim=-1)
    assert torch.allclose(top.sort(-1).values, norms.topk(5, -1).values.sort(-1).values)


def test_random_is_deterministic_given_a_seed():
    tokens = _tokens(N=50)
    a = build_selector("random", fraction=0.3, seed=7, dtype="float32").compress(tokens).vectors
    b = build_selector("random", fraction=0.3, seed=7, dtype="float32").compress(tokens).vectors
    assert torch.equal(a, b)


def test_pool_matches_windowed_means():
    tokens = _tokens(N=16, W=3)
    pooled = build_selector("pool", size=2, dtype="float32").compress(tokens).vectors  # 4x4 grid -> 2x2
    grid = tokens[:, 1:].reshape(2, 4, 4, 3)
    expected = torch.stack([grid[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], 1)
    assert torch.allclose(pooled, expected, atol=1e-6)
    # 3x3 windows on a 4x4 grid: rows and columns 0-2 and 3, so 9, 3, 3 and 1 tokens averaged
    pooled = build_selector("pool", size=3, dtype="float32").compress(tokens).vectors
    expected = torch.stack([grid[:, r, c].mean((1, 2)) for r in (slice(0, 3), slice(3, 4))
                            for c in (slice(0, 3), slice(3, 4))], 1)
    assert torch.allclose(pooled, expected, atol=1e-6)
    with pytest.raises(DmclipError):
        build_selector("pool", size=2).compress(_tokens(N=15))


def test_tome_merges_duplicate_pairs_exactly():
    unique = torch.randn(1, 6, 4)
    tokens = torch.cat([torch.zeros(1, 1, 4), unique.repeat_interleave(2, dim=1)], 1)  # a, a, b, b, ...
    merged = build_selector("tome", fraction=0.5, dtype="float32").compress(tokens).vectors
    assert merged.shape == (1, 6, 4)
    assert torch.allclose(merged.sort(1).values, unique.sort(1).values, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(1, 39), st.integers(0, 1000))
def test_tome_keeps_the_size_weighted_sum(n, remove, seed):
    x = torch.randn(2, n, 5, generator=torch.Generator().manual_seed(seed))
    size = torch.ones(2, n, 1)
    out, out_size = x, size
    while out.shape[1] > max(1, n - remove):
        out, out_size = _bipartite_merge(out, out_size, out.shape[1] - max(1, n - remove))
    assert out.shape[1] == max(1, n - remove)
    assert torch.allclose((out * out_size).sum(1), x.sum(1), atol=1e-4)
    assert torch.equal(out_size.sum(1), size.sum(1))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["random", "topk-norm", "tome"]), st.floats(0.01, 1.0), st.integers(1, 60))
def test_fraction_selectors_send_ceil_fraction(name, fraction, n):
    payload = build_selector(name, fraction=fraction).compress(torch.randn(1, 1 + n, 4))
    assert payload.vectors.shape[1] == max(1, min(n, math.ceil(fraction * n - 1e-9)))


def test_bad_settings_are_user_errors():
    with pytest.raises(DmclipError):
        build_selector("random", fraction=0.0)
    with pytest.raises(DmclipError):
        build_selector("kmeans", k=8, restore="sideways")
    with pytest.raises(DmclipError):
        build_selector("none", dtype="bfloat16")
    with pytest.raises(DmclipError):
        build_selector("kmaens")
    with pytest.raises(DmclipError):
        build_selector("none").compress(torch.randn(4, 8))


def _tome_by_hand(x: torch.Tensor, target: int) -> torch.Tensor:
    """ToMe as its docstring states it, one image, one token at a time in float64: tokens (N, W) -> (target, W)."""
    tokens = [(v.double(), 1.0) for v in x]
    while len(tokens) > target:
        a, b = tokens[::2], tokens[1::2]
        r = min(len(tokens) - target, len(a))
        best = []
        for vector, _ in a:
            cosines = [float(vector @ w / (vector.norm() * w.norm())) for w, _ in b]
            best.append((max(cosines), cosines.index(max(cosines))))
        by_similarity = sorted(range(len(a)), key=lambda i: -best[i][0])
        sums = [[w * size, size] for w, size in b]
        for i in by_similarity[:r]:
            vector, size = a[i]
            sums[best[i][1]][0] = sums[best[i][1]][0] + vector * size
            sums[best[i][1]][1] += size
        tokens = [a[i] for i in sorted(by_similarity[r:])] + [(total / size, size) for total, size in sums]
    return torch.stack([v for v, _ in tokens]).float()


@pytest.mark.parametrize("fraction", [0.15, 0.5, 0.9])
def test_tome_equals_bipartite_soft_matching_done_by_hand(fraction):
    """Several rounds (20 -> 10 -> 5 -> 3 at 0.15), the last a partial one: the most similar A tokens merge
    first, into their most similar B token, size-weighted, and the kept A tokens stay in their order."""
    tokens = _tokens(N=20, W=6, seed=3)
    merged = build_selector("tome", fraction=fraction, dtype="float32").compress(tokens).vectors
    for b in range(2):
        expected = _tome_by_hand(tokens[b, 1:], max(1, math.ceil(fraction * 20 - 1e-9)))
        assert torch.allclose(merged[b], expected, atol=1e-5)


def test_labels_name_the_setting():
    """The label of a sweep point in tables and plots."""
    labels = {name: build_selector(name, k=4, fraction=0.25, size=3, dtype="int8") for name in selectors.names()}
    assert {name: s.describe() for name, s in labels.items()} == {
        "none": "none", "kmeans": "kmeans k=4", "random": "random 0.25", "topk-norm": "topk-norm 0.25",
        "pool": "pool 3x3", "tome": "tome 0.25"}
    assert build_selector("kmeans", k=2, restore="centroids").describe() == "kmeans k=2 (centroids only)"
    assert repr(labels["pool"]) == "<selector pool 3x3 (int8)>"


@pytest.mark.parametrize("name", selectors.names())
def test_every_selector_builds_from_the_compress_config(name):
    """`dmclip compress` passes every knob (k-means' restore, iterations, restarts too) to every selector."""
    from dmclip.compress.config import CompressConfig, selector_from_config

    selector = selector_from_config(CompressConfig(), name)
    assert selector.name == name
    assert selector.restore(selector.compress(_tokens())).shape[0] == 2


def test_fractions_outside_zero_to_one_are_refused_and_one_keeps_every_token():
    for fraction in (-0.5, 0.0, 1.5):
        for name in ("random", "topk-norm", "tome"):
            with pytest.raises(DmclipError, match=f"fraction {fraction} must lie in"):
                build_selector(name, fraction=fraction)
    tokens = _tokens(N=9)
    for name in ("random", "topk-norm"):
        kept = build_selector(name, fraction=1.0, dtype="float32").compress(tokens).vectors
        assert torch.equal(kept, tokens[:, 1:])


def test_class_token_needs_a_patch_token_and_class_token_false_keeps_token_zero():
    with pytest.raises(DmclipError, match="need T >= 2, got T=1"):
        build_selector("none").compress(torch.randn(2, 1, 8))
    tokens = _tokens(N=4)
    plain = build_selector("none", dtype="float32", class_token=False)
    payload = plain.compress(tokens)
    assert payload.class_tokens is None and torch.equal(plain.restore(payload), tokens)


@pytest.mark.parametrize("name", selectors.names())
def test_half_precision_tokens_that_require_grad_are_selected_as_their_float32_values(name):
    """What a half-precision image tower on an accelerator hands over."""
    tokens = _tokens(N=16).half()
    reference = build_selector(name, dtype="float32", **selectors.entry(name).tiny).compress(tokens.float())
    payload = build_selector(name, dtype="float32", **selectors.entry(name).tiny).compress(
        tokens.clone().requires_grad_())
    assert payload.vectors.dtype == torch.float32 and torch.equal(payload.vectors, reference.vectors)


def test_pool_on_a_given_grid_and_size_one_sends_every_token():
    tokens = _tokens(N=8, W=2)
    pooled = build_selector("pool", size=2, grid=(2, 4), dtype="float32").compress(tokens).vectors  # 2x4 -> 1x2
    grid = tokens[:, 1:].reshape(2, 2, 4, 2)
    expected = torch.stack([grid[:, :, :2].mean((1, 2)), grid[:, :, 2:].mean((1, 2))], 1)
    assert torch.allclose(pooled, expected, atol=1e-6)
    assert torch.equal(build_selector("pool", size=1, dtype="float32").compress(_tokens(N=9)).vectors,
                       _tokens(N=9)[:, 1:])
    with pytest.raises(DmclipError, match="pool size 0 must be at least 1"):
        build_selector("pool", size=0)


def test_kmeans_with_one_centroid_sends_the_mean_and_no_index_bits():
    tokens = _tokens(N=10)
    payload = build_selector("kmeans", k=1, dtype="float32").compress(tokens)
    assert torch.allclose(payload.vectors[:, 0], tokens[:, 1:].mean(1), atol=1e-6)
    with pytest.raises(DmclipError, match="k = 0 must be at least 1"):
        build_selector("kmeans", k=0)


@pytest.mark.parametrize("name", selectors.names())
def test_a_selector_built_in_python_has_the_cli_defaults(name):
    """selectors.get(name) is the selector `dmclip compress --selector name` builds when nothing is set."""
    from dmclip.compress.config import CompressConfig, selector_from_config

    knobs = ("dtype", "class_token", "seed", "k", "iterations", "restarts", "restore_mode", "fraction", "size")
    ours, cli = selectors.get(name), selector_from_config(CompressConfig(), name)
    assert {k: getattr(ours, k, None) for k in knobs} == {k: getattr(cli, k, None) for k in knobs}


def test_kmeans_selector_clusters_with_its_own_iterations_restarts_and_seed():
    """`--set kmeans_iterations=... kmeans_restarts=... seed=...` change what is sent; each differs from
    k-means' own default here, so a setting that does not reach it shows."""
    from dmclip.compress.kmeans import kmeans

    tokens = _tokens(N=40, seed=1)
    for iterations, restarts, seed in ((1, 3, 0), (20, 1, 0), (20, 3, 5)):
        selector = build_selector("kmeans", k=5, iterations=iterations, restarts=restarts, seed=seed, dtype="float32")
        expected = kmeans(tokens[:, 1:], 5, iterations=iterations, restarts=restarts, seed=seed)
        default = kmeans(tokens[:, 1:], 5)
        assert not torch.equal(expected.centroids, default.centroids)
        assert torch.equal(selector.compress(tokens).vectors, expected.centroids)

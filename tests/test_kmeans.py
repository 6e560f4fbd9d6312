"""k-means: if these break, compressed tokens would be clustered badly or differently from run to run."""

from __future__ import annotations

import pytest
import torch

from dmclip.compress.kmeans import inertia_of, kmeans
from dmclip.errors import DmclipError


def _blobs(B=3, N=64, W=16, centres=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(B, centres, W, generator=g) * 10
    labels = torch.randint(0, centres, (B, N), generator=g)
    return torch.gather(c, 1, labels[..., None].expand(-1, -1, W)) + 0.1 * torch.randn(B, N, W, generator=g)


def _lloyd_reference(x, centroids, iterations):
    """Plain per-image Lloyd's algorithm written out (the oracle)."""
    c = centroids.clone().double()
    x = x.double()
    for _ in range(iterations):
        assign = torch.cdist(x, c).argmin(-1)
        for j in range(c.shape[0]):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
    return c, torch.cdist(x, c).argmin(-1)


def test_separated_blobs_are_found_exactly():
    x = _blobs()
    result = kmeans(x, 4, restarts=3, seed=0)
    # each true blob is one cluster: inertia is the noise only (~0.01 * N * W per image)
    assert (result.inertia < 0.02 * 64 * 16).all()
    assert torch.allclose(result.inertia.double(), inertia_of(x, result.centroids, result.assignments), rtol=1e-4)


def test_same_seed_same_result_and_batch_equals_single_images():
    x = _blobs(B=4, N=40, W=8, centres=6, seed=1) + torch.randn(4, 40, 8)
    a = kmeans(x, 5, seed=3)
    b = kmeans(x, 5, seed=3)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignments, b.assignments)
    for i in range(4):  # batched results match each image clustered on its own within float tolerance
        single = kmeans(x[i:i + 1], 5, seed=3)
        assert torch.allclose(single.inertia, inertia_of(x[i:i + 1], single.centroids, single.assignments).float(),
                              rtol=1e-4)


def test_lloyd_steps_match_the_written_out_algorithm():
    from dmclip.compress import kmeans as km

    x = torch.randn(1, 50, 6, generator=torch.Generator().manual_seed(0))
    init = km.kmeans_plus_plus(x, 4, 1, torch.Generator().manual_seed(0))[0, 0]
    ours = kmeans(x, 4, restarts=1, iterations=10, seed=0)
    ref_c, ref_assign = _lloyd_reference(x[0], init, 10)
    assert torch.equal(ours.assignments[0], ref_assign)
    assert torch.allclose(ours.centroids[0].double(), ref_c, atol=1e-5)


def test_more_restarts_never_hurt_much_and_k_clamps():
    x = torch.randn(2, 100, 12, generator=torch.Generator().manual_seed(2))
    one = kmeans(x, 6, restarts=1, seed=0).inertia
    many = kmeans(x, 6, restarts=8, seed=0).inertia
    assert (many <= one * 1.02).all()
    small = kmeans(x[:, :3], 8, seed=0)
    assert small.centroids.shape == (2, 3, 12) and torch.allclose(small.inertia, torch.zeros(2), atol=1e-4)


def test_identical_tokens_and_bad_arguments():
    x = torch.ones(1, 10, 4)
    result = kmeans(x, 3)
    assert torch.isfinite(result.centroids).all() and result.inertia.item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(DmclipError):
        kmeans(torch.randn(10, 4), 2)
    with pytest.raises(DmclipError):
        kmeans(torch.randn(1, 10, 4), 0)

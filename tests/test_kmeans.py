"""k-means: if these break, compressed tokens would be clustered badly or differently from run to run."""

from __future__ import annotations

import math

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


def test_an_image_alone_is_clustered_exactly_as_inside_a_batch():
    # `compress send` clusters one image, `compress eval` a batch: the same image must compress the same way.
    # Four different images (other blob layouts, scales and noise), each clustered alone and in the batch.
    x = torch.cat([_blobs(B=1, N=40, W=8, centres=3 + i, seed=10 + i) * (1 + i) + torch.randn(1, 40, 8)
                   for i in range(4)])
    batch = kmeans(x, 5, seed=3)
    again = kmeans(x, 5, seed=3)
    assert torch.equal(batch.centroids, again.centroids) and torch.equal(batch.assignments, again.assignments)
    for i in range(4):
        alone = kmeans(x[i:i + 1], 5, seed=3)
        assert torch.equal(alone.assignments[0], batch.assignments[i]), f"image {i}: other clusters alone"
        assert torch.equal(alone.centroids[0], batch.centroids[i]), f"image {i}"
        assert alone.inertia[0].item() == batch.inertia[i].item(), f"image {i}"
    # the images are clustered on their own draws of the seed, not on one shared fixed answer
    assert not torch.equal(kmeans(x, 5, seed=4).assignments, batch.assignments)


def _kmeans_plus_plus_distribution(points, k):
    """Written-out k-means++ (local_trials = 1): exact probability of every ordered sequence of centres.

    The first centre is uniform; each next one is point j with probability D(j)^2 / sum D^2, D(j) the
    distance from j to the nearest centre chosen so far.
    """
    import itertools

    n = len(points)
    sq = [[sum((a - b) ** 2 for a, b in zip(p, q)) for q in points] for p in points]
    probabilities = {}
    for order in itertools.permutations(range(n), k):
        p = 1.0 / n
        for step in range(1, k):
            nearest = [min(sq[c][j] for c in order[:step]) for j in range(n)]
            p *= nearest[order[step]] / sum(nearest)
        probabilities[order] = p
    return probabilities


def test_kmeans_plus_plus_draws_each_centre_with_probability_proportional_to_d_squared():
    from dmclip.compress import kmeans as km

    points = [(0.0, 0.0), (1.0, 0.0), (0.0, 2.0), (3.0, 3.0), (-4.0, 1.0), (5.0, -2.0)]
    x = torch.tensor([points])
    draws = 60_000  # independent restarts of one image: each is one sample of the three initial centres
    centres = km.kmeans_plus_plus(x, 3, draws, torch.Generator().manual_seed(0), local_trials=1)[0]
    chosen = torch.cdist(centres, x[0].expand(draws, -1, -1)).argmin(-1)  # (draws, 3) point indices
    counts = {}
    for order in map(tuple, chosen.tolist()):
        counts[order] = counts.get(order, 0) + 1
    exact = _kmeans_plus_plus_distribution(points, 3)
    assert set(counts) <= set(exact), "a point was picked twice (its D^2 is 0)"
    for order, p in exact.items():
        frequency = counts.get(order, 0) / draws
        # 5 binomial standard deviations: a sampler off by D vs D^2 is off by ~10 of them in many cells
        assert abs(frequency - p) <= 5 * (p * (1 - p) / draws) ** 0.5, (order, frequency, p)


def _assert_matches_lloyd_reference(x: torch.Tensor, *, k: int, seed: int, iterations: int, atol: float) -> None:
    """One restart of kmeans() on one image gives the written-out algorithm's assignments and centroids from
    the same k-means++ start."""
    from dmclip.compress import kmeans as km

    init = km.kmeans_plus_plus(x, k, 1, torch.Generator().manual_seed(seed))[0, 0]
    ours = kmeans(x, k, restarts=1, iterations=iterations, seed=seed)
    ref_c, ref_assign = _lloyd_reference(x[0], init, iterations)
    assert torch.equal(ours.assignments[0], ref_assign)
    assert torch.allclose(ours.centroids[0].double(), ref_c, atol=atol)


def test_lloyd_steps_match_the_written_out_algorithm():
    _assert_matches_lloyd_reference(torch.randn(1, 50, 6, generator=torch.Generator().manual_seed(0)), k=4, seed=0,
                                    iterations=10, atol=1e-5)


def test_every_lloyd_iteration_asked_for_is_run_until_convergence():
    """`iterations` is honoured: on points far from converged, each step asked for lowers the inertia, as the
    written-out algorithm does; once no assignment changes the run stops and says how many steps it took."""
    from dmclip.compress import kmeans as km

    x = torch.randn(1, 200, 2, generator=torch.Generator().manual_seed(0))
    init = km.kmeans_plus_plus(x, 8, 1, torch.Generator().manual_seed(0))[0, 0]
    runs = [kmeans(x, 8, restarts=1, iterations=n, seed=0) for n in (0, 1, 2)]
    assert [run.iterations for run in runs] == [0, 1, 2]
    for steps, run in enumerate(runs):
        ref_c, ref_assign = _lloyd_reference(x[0], init, steps)
        assert torch.allclose(run.centroids[0].double(), ref_c, atol=1e-5), f"after {steps} steps"
        assert torch.equal(run.assignments[0], ref_assign), f"after {steps} steps"
    inertia = [run.inertia.item() for run in runs]
    assert inertia[0] > inertia[1] * 1.05 and inertia[1] > inertia[2] * 1.005, inertia
    converged = kmeans(x, 8, restarts=1, iterations=100, seed=0)
    assert 2 < converged.iterations < 100 and converged.inertia.item() < inertia[2]
    again = kmeans(x, 8, restarts=1, iterations=converged.iterations, seed=0)
    assert torch.equal(again.centroids, converged.centroids) and again.iterations == converged.iterations


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
    for bad in ({"k": 0}, {"restarts": 0}, {"iterations": -1}):
        with pytest.raises(DmclipError):
            kmeans(torch.randn(1, 10, 4), **{"k": 2, **bad})
    with pytest.raises(DmclipError, match="empty token sequence"):
        kmeans(torch.randn(1, 0, 4), 2)


def test_the_smallest_cases_k_1_and_one_token():
    x = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(5))
    one = kmeans(x, 1, iterations=0)  # no Lloyd step needed: k-means++ picks a token, the inertia is then exact
    centred = kmeans(x, 1)
    torch.testing.assert_close(centred.centroids[:, 0], x.mean(1))
    assert (centred.assignments == 0).all() and (centred.inertia < one.inertia).all()
    single = kmeans(x[:, :1], 4)
    assert torch.equal(single.centroids, x[:, :1]) and single.inertia.abs().max() < 1e-6


def test_default_local_trials_are_scikit_learns_2_plus_log_k():
    from dmclip.compress import kmeans as km

    x = torch.randn(2, 60, 5, generator=torch.Generator().manual_seed(7))
    for k in (2, 8, 21):
        default = km.kmeans_plus_plus(x, k, 3, torch.Generator().manual_seed(1))
        explicit = km.kmeans_plus_plus(x, k, 3, torch.Generator().manual_seed(1), local_trials=2 + int(math.log(k)))
        assert torch.equal(default, explicit), k


def test_defaults_are_20_iterations_3_restarts_seed_0():
    x = _blobs(B=2, N=50, W=6, centres=5, seed=3)
    default, explicit = kmeans(x, 4), kmeans(x, 4, iterations=20, restarts=3, seed=0)
    assert torch.equal(default.centroids, explicit.centroids) and default.iterations == explicit.iterations
    assert not torch.equal(kmeans(x, 4, restarts=1).inertia, default.inertia)  # the case tells restarts apart
    slow = torch.randn(1, 2000, 2, generator=torch.Generator().manual_seed(2))  # 33 steps to converge
    assert kmeans(slow, 64, restarts=1).iterations == 20


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_tokens_of_any_float_dtype_are_clustered_in_float32(dtype):
    """A half-precision encoder's tokens cluster as their float32 values do, and come back float32."""
    x = _blobs(B=2, N=40, W=8, seed=1).to(dtype)
    ours, reference = kmeans(x, 3, seed=0), kmeans(x.float(), 3, seed=0)
    assert ours.centroids.dtype == torch.float32 and ours.inertia.dtype == torch.float32
    assert torch.equal(ours.centroids, reference.centroids) and torch.equal(ours.assignments, reference.assignments)


def test_inertia_of_is_exact_in_float64():
    """The oracle itself: squared distances summed in float64, against Python's exactly rounded sum."""
    tokens = 1000 + torch.randn(1, 30, 4, generator=torch.Generator().manual_seed(0))
    centroids = tokens[:, :3] + 1e-3
    assignments = torch.randint(0, 3, (1, 30), generator=torch.Generator().manual_seed(1))
    exact = math.fsum((float(tokens[0, n, w]) - float(centroids[0, assignments[0, n], w])) ** 2
                      for n in range(30) for w in range(4))
    ours = inertia_of(tokens, centroids, assignments)
    assert ours.dtype == torch.float64 and ours.item() == pytest.approx(exact, rel=1e-12)


def test_a_cluster_left_with_one_token_moves_its_centroid_onto_it():
    """Ten tokens on a line, k = 3: in this case a cluster loses all but one token mid-run (found by search
    against the oracle); its centroid must then move onto that token, as the oracle does, not stay put."""
    _assert_matches_lloyd_reference(torch.randn(1, 10, 1, generator=torch.Generator().manual_seed(4)), k=3, seed=4,
                                    iterations=20, atol=1e-6)


def test_fewer_distinct_tokens_than_k_leave_no_centroid_that_is_not_a_token():
    """Two distinct tokens, four centroids: the two extra start on a token already taken and never win one
    (their cluster is empty); they stay on that token rather than becoming a zero vector, which the server
    would receive as a token no image has ('centroids' restore sends every centroid)."""
    x = torch.tensor([[[1.0, 2.0]] * 3 + [[-3.0, 0.5]] * 3])
    result = kmeans(x, 4, restarts=1)
    for centroid in result.centroids[0]:
        assert any(torch.equal(centroid, token) for token in x[0]), result.centroids
    assert result.inertia.item() == 0.0


def test_the_reported_iterations_are_the_steps_that_changed_the_clusters():
    x = torch.randn(1, 200, 2, generator=torch.Generator().manual_seed(0))
    converged = kmeans(x, 8, restarts=1, iterations=100, seed=0)
    one_less = kmeans(x, 8, restarts=1, iterations=converged.iterations - 1, seed=0)
    assert one_less.iterations == converged.iterations - 1
    assert not torch.equal(one_less.centroids, converged.centroids)


def test_kmeans_plus_plus_never_picks_a_token_twice_for_one_image_and_one_restart():
    """`compress send` clusters one image: a token already chosen (D^2 = 0) is never drawn again, whatever the
    seed and however close the tokens (a sum of D^2 under 1 included), as long as distinct tokens remain."""
    from dmclip.compress import kmeans as km

    points = torch.tensor([[(0.0, 0.0), (1.0, 0.0), (0.0, 2.0), (3.0, 3.0), (-4.0, 1.0), (5.0, -2.0)]])
    for x in (points, points * 0.01):
        for seed in range(200):
            centres = km.kmeans_plus_plus(x, 5, 1, torch.Generator().manual_seed(seed), local_trials=1)[0, 0]
            assert len({tuple(c.tolist()) for c in centres}) == 5, seed

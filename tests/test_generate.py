"""Beam search and nucleus sampling against hand-built next-token distributions.

If these break, captions get worse or wrong: beam search stops finding the likeliest caption, sampling
leaks tokens from the tail (garbage words in CapFilt captions), or captions end before ``min_length``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dmclip.models.generate import beam_search, greedy, nucleus_sample, top_p_filter

PAD, EOS = 0, 1


def table_step_fn(logits_table: torch.Tensor):
    """step_fn over a (T, V, V) table: next-token logits given (prefix length - 1, last token)."""

    def step_fn(ids: torch.Tensor) -> torch.Tensor:
        t = min(ids.shape[1] - 1, logits_table.shape[0] - 1)
        return logits_table[t, ids[:, -1]]

    return step_fn


def random_table(seed: int, steps: int = 6, vocab: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(steps, vocab, vocab, generator=g) * 2.0
    table[:, :, PAD] = float("-inf")  # the model never emits padding
    return table


def probs_step_fn(rows: dict[tuple[int, ...], list[float]], vocab: int):
    """step_fn from explicit probabilities per prefix (after the start token)."""

    def step_fn(ids: torch.Tensor) -> torch.Tensor:
        out = []
        for row in ids.tolist():
            p = torch.tensor(rows.get(tuple(row[1:]), [0.0, 1.0] + [0.0] * (vocab - 2)))
            out.append(p.clamp_min(1e-12).log())
        return torch.stack(out)

    return step_fn


def strip(seq: list[int]) -> list[int]:
    return seq[: seq.index(EOS) + 1] if EOS in seq else [t for t in seq if t != PAD]


@pytest.mark.parametrize("seed", range(5))
def test_beam_search_with_one_beam_is_greedy(seed):
    step_fn = table_step_fn(random_table(seed))
    start = torch.tensor([[2], [3], [4]])
    beams, _ = beam_search(step_fn, start, num_beams=1, max_length=6, min_length=2, eos_id=EOS, pad_id=PAD)
    expected = greedy(step_fn, start, max_length=6, min_length=2, eos_id=EOS, pad_id=PAD)
    for b in range(3):
        assert strip(beams[b, 0].tolist()) == strip(expected[b].tolist())


def test_beam_search_finds_the_sequence_greedy_misses():
    # tokens: 0 pad, 1 eos, 2 "A", 3 "B". Greedy takes A (0.6) then eos 0.4 -> 0.24;
    # the best caption is B then eos: 0.4 * 0.99 = 0.396.
    rows = {(): [0, 0.0, 0.6, 0.4], (2,): [0, 0.4, 0.3, 0.3], (3,): [0, 0.99, 0.005, 0.005]}
    step_fn = probs_step_fn(rows, 4)
    start = torch.tensor([[2]])  # the start token itself is not looked at
    assert strip(greedy(step_fn, start, max_length=2, eos_id=EOS, pad_id=PAD)[0].tolist()) == [2, 1]
    tokens, scores = beam_search(step_fn, start, num_beams=2, max_length=2, eos_id=EOS, pad_id=PAD)
    assert tokens[0, 0].tolist() == [3, 1]
    assert scores[0, 0].item() == pytest.approx(math.log(0.4 * 0.99) / 2, abs=1e-5)


def brute_force(step_fn, start: list[int], vocab: int, max_length: int, length_penalty: float):
    """Score of every complete sequence (ended by eos, or cut at max_length), best first."""
    results = []
    for length in range(1, max_length + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if PAD in seq or EOS in seq[:-1] or (length < max_length and seq[-1] != EOS):
                continue
            ids, total = torch.tensor([start]), 0.0
            for token in seq:
                total += torch.log_softmax(step_fn(ids).float(), -1)[0, token].item()
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            results.append((total / length ** length_penalty, list(seq)))
    return sorted(results, key=lambda r: -r[0])


@pytest.mark.parametrize("seed,length_penalty", [(0, 1.0), (1, 1.0), (2, 0.0), (3, 2.0)])
def test_wide_beam_search_equals_exhaustive_search(seed, length_penalty):
    # with more beams than open prefixes and eos candidates, beam search is exhaustive
    step_fn = table_step_fn(random_table(seed, steps=3, vocab=4))
    expected = brute_force(step_fn, [2], vocab=4, max_length=3, length_penalty=length_penalty)
    tokens, scores = beam_search(step_fn, torch.tensor([[2]]), num_beams=12, max_length=3, eos_id=EOS,
                                 pad_id=PAD, length_penalty=length_penalty, num_return=3)
    for r in range(3):
        assert scores[0, r].item() == pytest.approx(expected[r][0], abs=1e-5)
        assert strip(tokens[0, r].tolist()) == expected[r][1]
    assert scores[0].tolist() == sorted(scores[0].tolist(), reverse=True)


def test_min_length_suppresses_eos():
    table = torch.zeros(8, 5, 5)
    table[:, :, EOS] = 5.0  # eos is by far the likeliest token everywhere
    table[:, :, PAD] = float("-inf")
    step_fn = table_step_fn(table)
    start = torch.tensor([[2], [3]])
    outputs = [
        beam_search(step_fn, start, num_beams=3, max_length=8, min_length=4, eos_id=EOS, pad_id=PAD)[0][:, 0],
        greedy(step_fn, start, max_length=8, min_length=4, eos_id=EOS, pad_id=PAD),
        nucleus_sample(step_fn, start, top_p=0.9999, max_length=8, min_length=4, eos_id=EOS,
                       generator=torch.Generator().manual_seed(0), pad_id=PAD),
    ]
    for out in outputs:
        for row in out.tolist():
            assert EOS not in row[:4]
            assert row[4] == EOS  # and eos comes as soon as it is allowed


@pytest.mark.parametrize("seed", range(4))
def test_nucleus_with_tiny_top_p_is_greedy(seed):
    step_fn = table_step_fn(random_table(seed))
    start = torch.tensor([[2], [3], [5]])
    sampled = nucleus_sample(step_fn, start, top_p=1e-6, max_length=6, min_length=1, eos_id=EOS,
                             generator=torch.Generator().manual_seed(seed), pad_id=PAD)
    expected = greedy(step_fn, start, max_length=6, min_length=1, eos_id=EOS, pad_id=PAD)
    assert sampled.tolist() == expected.tolist()


def test_nucleus_never_samples_outside_the_top_p_set():
    probs = torch.tensor([0.03, 0.5, 0.07, 0.25, 0.15])  # nucleus at 0.8: tokens 1, 3, 4 (0.5 + 0.25 + 0.15)
    step_fn = lambda ids: probs.log().expand(ids.shape[0], -1)
    start = torch.full((4000, 1), 2)
    drawn = nucleus_sample(step_fn, start, top_p=0.8, max_length=1, eos_id=EOS,
                           generator=torch.Generator().manual_seed(0), pad_id=PAD)[:, 0]
    counts = torch.bincount(drawn, minlength=5).float()
    assert counts[0] == 0 and counts[2] == 0
    # inside the nucleus, draws follow the renormalised probabilities (4000 draws: ~±0.025 at 3 sigma)
    frequencies = counts[[1, 3, 4]] / counts.sum()
    assert torch.allclose(frequencies, torch.tensor([0.5, 0.25, 0.15]) / 0.9, atol=0.03)


def test_top_p_filter_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    assert top_p_filter(probs, 0.75).tolist() == [[0.5, 0.25, 0.0, 0.0]]  # 0.5 + 0.25 reaches 0.75 exactly
    assert top_p_filter(probs, 0.76).tolist() == [[0.5, 0.25, 0.125, 0.0]]
    assert top_p_filter(probs, 0.0).tolist() == [[0.5, 0.0, 0.0, 0.0]]  # the top token always stays
    assert top_p_filter(probs, 1.0).tolist() == probs.tolist()


def test_nucleus_is_reproducible_with_a_generator_and_pads_after_eos():
    step_fn = table_step_fn(random_table(7))
    start = torch.full((16, 1), 2)
    a = nucleus_sample(step_fn, start, 0.9, 6, 0, EOS, generator=torch.Generator().manual_seed(3), pad_id=PAD)
    b = nucleus_sample(step_fn, start, 0.9, 6, 0, EOS, generator=torch.Generator().manual_seed(3), pad_id=PAD)
    assert torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) > 1  # rows are independent draws
    for row in a.tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1:])


def test_beam_search_rejects_more_returns_than_beams():
    with pytest.raises(ValueError):
        beam_search(table_step_fn(random_table(0)), torch.tensor([[2]]), num_beams=2, max_length=3,
                    eos_id=EOS, pad_id=PAD, num_return=3)

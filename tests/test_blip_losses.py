"""BLIP's ITC / ITM / LM losses against formulas written out by hand.

If these break, BLIP trains on the wrong objective: soft targets that do not sum to one, hard
negatives that are actually positives (ITM learns to call matches mismatches), or a captioning loss
that counts the prompt and padding.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dmclip.errors import DmclipError
from dmclip.losses.blip import (
    IGNORE_INDEX,
    itc_loss,
    itc_soft_targets,
    itm_loss,
    lm_loss,
    sample_hard_negatives,
)

# a softmax without its dim still works on these 2-D inputs but prints a deprecation warning every step
pytestmark = pytest.mark.filterwarnings("error")


def test_soft_targets_mix_momentum_softmax_and_positives():
    g = torch.Generator().manual_seed(0)
    similarity = torch.randn(3, 7, generator=g) * 5
    positive = torch.zeros(3, 7, dtype=torch.bool)
    positive[0, 0] = positive[1, 1] = positive[2, 2] = True
    positive[0, 5] = True  # the queue holds another caption of image 0
    alpha = 0.3
    targets = itc_soft_targets(similarity, positive, alpha)
    for i in range(3):
        hard = [1.0 / positive[i].sum().item() if positive[i, j] else 0.0 for j in range(7)]
        denominator = sum(math.exp(s) for s in similarity[i].tolist())
        for j in range(7):
            expected = alpha * math.exp(similarity[i, j].item()) / denominator + (1 - alpha) * hard[j]
            assert targets[i, j].item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(3))


def test_itc_loss_is_soft_cross_entropy_both_ways():
    g = torch.Generator().manual_seed(1)
    s_i2t, s_t2i = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    t_i2t = F.softmax(torch.randn(4, 9, generator=g), 1)
    t_t2i = F.softmax(torch.randn(4, 9, generator=g), 1)

    def direction(s, t):
        total = 0.0
        for i in range(s.shape[0]):
            log_z = math.log(sum(math.exp(v) for v in s[i].tolist()))
            total += -sum(t[i, j].item() * (s[i, j].item() - log_z) for j in range(s.shape[1]))
        return total / s.shape[0]

    expected = (direction(s_i2t, t_i2t) + direction(s_t2i, t_t2i)) / 2
    assert itc_loss(s_i2t, s_t2i, t_i2t, t_t2i).item() == pytest.approx(expected, abs=1e-5)


def test_itc_with_one_hot_targets_is_clip_infonce():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 5, generator=g)
    eye = torch.eye(5)
    expected = (F.cross_entropy(s, torch.arange(5)) + F.cross_entropy(s.T, torch.arange(5))) / 2
    assert itc_loss(s, s.T, eye, eye).item() == pytest.approx(expected.item(), abs=1e-6)


def test_hard_negatives_never_pick_a_positive():
    g = torch.Generator().manual_seed(0)
    B = 6
    similarity = torch.randn(B, B, generator=g)
    similarity += 30 * torch.eye(B)  # the positive dominates the softmax: masking must still exclude it
    positive = torch.eye(B, dtype=torch.bool)
    positive[0, 1] = positive[1, 0] = True  # rows 0 and 1 are two captions of the same image
    for _ in range(300):
        picks = sample_hard_negatives(similarity, positive, generator=g)
        assert not positive[torch.arange(B), picks].any()


def test_hard_negatives_follow_the_similarity_softmax():
    similarity = torch.tensor([[9.0, 1.0, 0.0, -1.0], [0.0, 9.0, 0.0, 0.0],
                               [0.0, 0.0, 9.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    positive = torch.eye(4, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    picks = torch.stack([sample_hard_negatives(similarity, positive, generator=g)[0] for _ in range(3000)])
    frequencies = torch.bincount(picks, minlength=4).float() / 3000
    expected = torch.tensor([0.0, *F.softmax(torch.tensor([1.0, 0.0, -1.0]), 0).tolist()])
    assert torch.allclose(frequencies, expected, atol=0.03)


def test_hard_negatives_when_the_batch_is_one_image():
    positive = torch.ones(3, 3, dtype=torch.bool)  # every pair shows the same image: no true negative
    picks = sample_hard_negatives(torch.zeros(3, 3), positive, generator=torch.Generator().manual_seed(0))
    assert (picks != torch.arange(3)).all()  # at least never the pair itself
    with pytest.raises(DmclipError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    pair = sample_hard_negatives(torch.zeros(2, 2), torch.eye(2, dtype=torch.bool))  # the smallest batch
    assert pair.tolist() == [1, 0]


def test_hard_negatives_against_a_wider_bank():
    """Rows against more columns than rows (a bank): a row with only positives falls back to any other
    column, the others still never draw a positive."""
    positive = torch.eye(3, 5, dtype=torch.bool)
    positive[0] = True
    g = torch.Generator().manual_seed(2)
    picks = torch.stack([sample_hard_negatives(torch.randn(3, 5, generator=g), positive, generator=g)
                         for _ in range(200)])
    assert (picks[:, 0] != 0).all() and set(picks[:, 0].tolist()) == {1, 2, 3, 4}
    assert not positive[1:][torch.arange(2), picks[:, 1:]].any()


def test_hard_negatives_are_reproducible_from_their_generator():
    similarity, positive = torch.randn(6, 6), torch.eye(6, dtype=torch.bool)
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # the global generator must not matter
        draws.append(torch.stack([sample_hard_negatives(similarity, positive, torch.Generator().manual_seed(7))
                                  for _ in range(5)]))
    assert torch.equal(draws[0], draws[1])


def test_itm_loss_labels_positives_one_and_negatives_zero():
    g = torch.Generator().manual_seed(3)
    positive, negative = torch.randn(3, 2, generator=g), torch.randn(6, 2, generator=g)
    terms = [-F.log_softmax(row, 0)[1] for row in positive] + [-F.log_softmax(row, 0)[0] for row in negative]
    assert itm_loss(positive, negative).item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-6)


def test_itm_labels_live_on_the_logits_device():
    """On an accelerator the labels must be moved there too; the meta device stands in for one."""
    assert itm_loss(torch.zeros(2, 2, device="meta"), torch.zeros(4, 2, device="meta")).device.type == "meta"


def test_lm_loss_ignores_masked_targets_and_smooths_labels():
    g = torch.Generator().manual_seed(4)
    B, T, V = 2, 7, 11
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, :3] = IGNORE_INDEX  # [DEC] + a 2-token prompt
    targets[1, 5:] = IGNORE_INDEX  # padding
    eps, terms = 0.1, []
    for b in range(B):
        for t in range(1, T):
            if targets[b, t] == IGNORE_INDEX:
                continue
            log_p = F.log_softmax(logits[b, t - 1], 0)  # position t - 1 predicts token t
            terms.append((1 - eps) * -log_p[targets[b, t]] + eps * -log_p.mean())
    expected = torch.stack(terms).mean()
    assert len(terms) == 4 + 2
    assert lm_loss(logits, targets, 0.1).item() == pytest.approx(expected.item(), abs=1e-5)
    # and it is exactly torch's label-smoothed cross-entropy over the counted positions
    keep = targets[:, 1:] != IGNORE_INDEX
    reference = F.cross_entropy(logits[:, :-1][keep], targets[:, 1:][keep], label_smoothing=0.1)
    assert lm_loss(logits, targets, 0.1).item() == pytest.approx(reference.item(), abs=1e-6)
    # changing logits that predict ignored positions changes nothing
    changed = logits.clone()
    changed[:, :2] += torch.randn(B, 2, V, generator=g)
    changed[1, 4:] += 5.0
    assert lm_loss(changed, targets, 0.1).item() == pytest.approx(expected.item(), abs=1e-5)

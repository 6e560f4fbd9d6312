"""Autoregressive decoding over any "next-token logits" function: beam search and nucleus sampling.

``step_fn(ids) -> logits``: ids (B', t) long, the whole prefix so far; logits (B', V) for the next
token. Both searches always pass full prefixes, so a stateless model works; a step_fn with a KV cache
reads only the new tokens and, under beam search, follows the beams through ``reorder``.

Outputs hold the *new* tokens only (what follows ``start_ids``), eos included where one was chosen,
right-padded with ``pad_id``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

StepFn = Callable[[torch.Tensor], torch.Tensor]


def beam_search(step_fn: StepFn, start_ids: torch.Tensor, num_beams: int, max_length: int, min_length: int = 0,
                eos_id: int = 2, pad_id: int = 0, length_penalty: float = 1.0,
                num_return: int = 1,
                reorder: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search (as Hugging Face's, without early stopping): the ``num_return`` best hypotheses per row.

    ``step_fn`` is called on (B * num_beams, t) prefixes; rows ``b * num_beams ... (b + 1) * num_beams - 1``
    extend ``start_ids[b]``. A hypothesis scores ``sum log p / len ** length_penalty`` with ``len`` the
    number of new tokens (eos included). eos is forbidden before ``min_length`` new tokens; hypotheses
    still open after ``max_length`` tokens end there.

    ``reorder(rows)``, if given, is told which rows (B * num_beams,) the next prefixes extend, so a
    stateful ``step_fn`` (a KV cache) can follow; it is then only given the new token each step.

    Returns ``(tokens (B, num_return, T) long, scores (B, num_return) float)``, best first.
    """
    if not 1 <= num_return <= num_beams:
        raise ValueError(f"num_return ({num_return}) must be between 1 and num_beams ({num_beams})")
    B, t0 = start_ids.shape
    K = num_beams
    device = start_ids.device
    ids = start_ids.repeat_interleave(K, dim=0)  # (B*K, t0)
    # all K beams start identical: only the first may expand, or the top K would be K copies
    beam_scores = torch.full((B, K), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
    done = [False] * B

    def add_hypothesis(b: int, tokens: torch.Tensor, score: float) -> None:
        hyps = finished[b]
        hyps.append((score / (max(tokens.numel(), 1) ** length_penalty), tokens))
        hyps.sort(key=lambda h: -h[0])
        del hyps[K:]

    for step in range(max_length):
        logprobs = F.log_softmax(step_fn(ids).float(), dim=-1)  # (B*K, V)
        if step < min_length:
            logprobs[:, eos_id] = float("-inf")
        V = logprobs.shape[-1]
        candidates = (beam_scores.view(-1, 1) + logprobs).view(B, K * V)
        # 2K candidates: even if K of them end in eos, K remain to carry on
        top_scores, top_flat = candidates.topk(min(2 * K, K * V), dim=1)
        next_scores = torch.full((B, K), float("-inf"), device=device)
        next_source = (torch.arange(B, device=device) * K).view(B, 1).repeat(1, K)  # default: a valid row
        next_tokens = torch.full((B, K), pad_id, dtype=torch.long, device=device)
        top_scores_l, top_flat_l = top_scores.tolist(), top_flat.tolist()
        for b in range(B):
            if done[b]:
                next_source[b] = b * K + torch.arange(K, device=device)
                continue
            kept = 0
            for rank, (score, flat) in enumerate(zip(top_scores_l[b], top_flat_l[b])):
                if score == float("-inf"):
                    break
                source, token = b * K + flat // V, flat % V
                if token == eos_id:
                    if rank < K:  # an eos outside the top K would never have been a beam
                        add_hypothesis(b, torch.cat([ids[source, t0:], ids.new_tensor([eos_id])]), score)
                    continue
                next_scores[b, kept], next_source[b, kept], next_tokens[b, kept] = score, source, token
                kept += 1
                if kept == K:
                    break
            best_open = next_scores[b].max().item()
            if len(finished[b]) == K:
                # no open beam can still beat the worst kept hypothesis (HF's heuristic)
                done[b] = best_open == float("-inf") or finished[b][-1][0] >= best_open / (
                    (step + 1) ** length_penalty)
            elif best_open == float("-inf"):
                done[b] = True
        ids = torch.cat([ids[next_source.view(-1)], next_tokens.view(-1, 1)], dim=1)
        if reorder is not None:
            reorder(next_source.view(-1))
        beam_scores = next_scores
        if all(done):
            break

    for b in range(B):
        if not done[b]:  # out of length: open beams become hypotheses as they are
            for k in range(K):
                if beam_scores[b, k] > float("-inf"):
                    add_hypothesis(b, ids[b * K + k, t0:], beam_scores[b, k].item())

    length = max((h[1].numel() for hyps in finished for h in hyps[:num_return]), default=0)
    tokens = torch.full((B, num_return, length), pad_id, dtype=torch.long, device=device)
    scores = torch.full((B, num_return), float("-inf"), device=device)
    for b in range(B):
        for r, (score, hyp) in enumerate(finished[b][:num_return]):
            tokens[b, r, : hyp.numel()] = hyp
            scores[b, r] = score
    return tokens, scores


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the nucleus: the smallest set of most likely tokens whose mass reaches ``top_p``.

    probs (B, V) -> (B, V) unnormalised. The most likely token is always kept (Holtzman et al., 2020).
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    remove = mass_before >= top_p
    remove[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(remove, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def nucleus_sample(step_fn: StepFn, start_ids: torch.Tensor, top_p: float, max_length: int, min_length: int = 0,
                   eos_id: int = 2, temperature: float = 1.0, generator: torch.Generator | None = None,
                   pad_id: int = 0) -> torch.Tensor:
    """Nucleus (top-p) sampling, one sequence per row of ``start_ids``: (B, T) new tokens.

    Draw several captions per image by repeating its row. ``generator`` makes draws reproducible.
    """
    B, t0 = start_ids.shape
    ids = start_ids
    finished = torch.zeros(B, dtype=torch.bool, device=start_ids.device)
    for step in range(max_length):
        logits = step_fn(ids).float() / temperature  # (B, V)
        if step < min_length:
            logits[:, eos_id] = float("-inf")
        probs = top_p_filter(F.softmax(logits, dim=-1), top_p)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        token = token.masked_fill(finished, pad_id)
        ids = torch.cat([ids, token[:, None]], dim=1)
        finished |= token == eos_id
        if bool(finished.all()):
            break
    return ids[:, t0:]


def greedy(step_fn: StepFn, start_ids: torch.Tensor, max_length: int, min_length: int = 0, eos_id: int = 2,
           pad_id: int = 0) -> torch.Tensor:
    """Argmax decoding (B, T): what beam search with one beam and nucleus with top_p -> 0 reduce to."""
    B, t0 = start_ids.shape
    ids = start_ids
    finished = torch.zeros(B, dtype=torch.bool, device=start_ids.device)
    for step in range(max_length):
        logits = step_fn(ids).float()
        if step < min_length:
            logits[:, eos_id] = float("-inf")
        token = logits.argmax(dim=-1).masked_fill(finished, pad_id)
        ids = torch.cat([ids, token[:, None]], dim=1)
        finished |= token == eos_id
        if bool(finished.all()):
            break
    return ids[:, t0:]

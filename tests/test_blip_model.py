"""BlipModel: contract, BLIP's weight sharing, the three objectives vs hand computations, save/load.

A user would notice: captions that stop working after `run:` loading, an ITM filter that scores noise,
a decoder whose loss counts the prompt, or an encoder/decoder that silently stopped sharing weights
(twice the parameters, and not BLIP).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dmclip.data.tokenizer import Tokenizer, bpe
from dmclip.errors import DmclipError
from dmclip.losses.blip import IGNORE_INDEX
from dmclip.models.base import build_model, load_saved_model, save_model
from dmclip.models.blip import MAX_LOGIT_SCALE, MIN_LOGIT_SCALE, BlipModel, blip_tokenizer

CAPTIONS = ["a red circle on the left", "two blue squares", "a small green triangle", "a big yellow star"]
TINY = dict(image_size=16, patch_size=4, vision_width=32, vision_depth=2, vision_heads=2, text_width=32,
            text_depth=2, text_heads=2, embed_dim=16, context_length=16, queue_size=8)


def tiny_model(seed: int = 0, **overrides) -> BlipModel:
    torch.manual_seed(seed)
    return BlipModel(**{**TINY, "tokenizer": blip_tokenizer(CAPTIONS, 16), **overrides})


@pytest.fixture(scope="module")
def model() -> BlipModel:
    return tiny_model().eval()


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_contract_shapes(model):
    x, tokens = images(), model.tokenize(CAPTIONS)
    assert tokens.shape == (4, 16) and tokens.dtype == torch.long
    assert model.encode_image(x).shape == (4, 16)
    assert model.encode_text(tokens).shape == (4, 16)
    assert model.encode_image_tokens(x).shape == (4, 1 + 16, 32)
    assert model.itm_score(x, tokens).shape == (4,)
    assert (model.image_size, model.context_length, model.embed_dim) == (16, 16, 16)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.arch["family"] == "blip"
    json.dumps(model.arch)
    rebuilt = build_model(model.arch)
    assert isinstance(rebuilt, BlipModel)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_encoder_and_decoder_share_all_but_self_attention(model):
    encoder, decoder = model.text_encoder, model.text_decoder
    assert decoder.embeddings is encoder.embeddings
    for enc_layer, dec_layer in zip(encoder.layers, decoder.layers):
        assert dec_layer.cross_attention is enc_layer.cross_attention
        assert dec_layer.feed_forward is enc_layer.feed_forward
        assert dec_layer.self_attention is not enc_layer.self_attention
    assert model.lm_head.decoder.weight is encoder.embeddings.word.weight  # tied output embedding
    encoder_ids = {id(p) for p in encoder.parameters()}
    decoder_only = [p for p in decoder.parameters() if id(p) not in encoder_ids]
    self_attention = [p for layer in decoder.layers for p in layer.self_attention.parameters()]
    assert {id(p) for p in decoder_only} == {id(p) for p in self_attention}
    # width 32, 2 layers: q, k, v, out (32x32 + 32 each) + LayerNorm (64) per layer
    assert sum(p.numel() for p in decoder_only) == 2 * (4 * (32 * 32 + 32) + 64)


def test_prompt_words_join_a_compact_vocabulary_that_lacks_them():
    tokenizer = Tokenizer.fit(CAPTIONS, 16).to_dict()  # no "picture"
    assert bpe().encoder["picture</w>"] not in tokenizer["vocab"]
    m = BlipModel(**{**TINY, "tokenizer": tokenizer})
    assert m.tokenizer.unk_id not in m.prompt_ids
    assert m.tokenizer.decode(m.prompt_ids) == "a picture of"
    assert m.tokenize(CAPTIONS[:1]).tolist() != [[0] * 16]


def test_text_features_do_not_depend_on_batch_padding(model):
    alone = model.tokenize(["two blue squares"])
    padded = model.tokenize(["two blue squares", "a red circle on the left and a big yellow star on the right"])
    x = images(2)
    assert torch.allclose(model.encode_text(alone)[0], model.encode_text(padded)[0], atol=1e-5)
    assert torch.allclose(model.itm_score(x[:1], alone), model.itm_score(x, padded)[:1], atol=1e-5)


def test_decoder_is_causal_and_takes_any_number_of_image_tokens(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.tokenizer.vocab_size, (2, 9), generator=g)
    for M in (1, 5, 17):
        memory = torch.randn(2, M, 32, generator=g)
        logits = model.decoder_logits(memory, ids)
        assert logits.shape == (2, 9, model.tokenizer.vocab_size + 2)
        changed = ids.clone()
        changed[:, 6] = 4
        assert torch.allclose(model.decoder_logits(memory, changed)[:, :6], logits[:, :6], atol=1e-5)
        assert not torch.allclose(model.decoder_logits(memory, changed)[:, 6:], logits[:, 6:])


def test_decoder_inputs_put_the_prompt_first_and_out_of_the_loss(model):
    tokens = model.tokenize(CAPTIONS[:2])
    ids, valid, targets = model.decoder_inputs(tokens)
    P = len(model.prompt_ids)
    assert P == 3
    assert ids[:, 0].tolist() == [model.dec_id] * 2
    assert ids[:, 1: 1 + P].tolist() == [model.prompt_ids] * 2
    assert model.tokenizer.decode(ids[0, 1:]) == "a picture of " + CAPTIONS[0]
    assert (targets[:, : 1 + P] == IGNORE_INDEX).all()
    counted = targets != IGNORE_INDEX
    assert torch.equal(targets[counted], ids[counted])
    caption_lengths = [len(model.tokenizer.encode(c)) - 1 for c in CAPTIONS[:2]]  # caption tokens + eot
    assert counted.sum(1).tolist() == caption_lengths
    assert torch.equal(valid, (targets != IGNORE_INDEX) | (torch.arange(ids.shape[1]) < 1 + P))


def test_forward_losses_match_hand_computations():
    m = tiny_model(1)
    x, tokens, indices = images(4, 1), m.tokenize(CAPTIONS), torch.tensor([10, 11, 12, 10])
    alpha_scale = 0.5
    with torch.no_grad():  # expected values, from the public pieces (momentum == online at init)
        temp = math.exp(-m.logit_scale.item())
        image_feat = F.normalize(m.encode_image(x), dim=-1)
        text_feat = F.normalize(m.encode_text(tokens), dim=-1)
        image_bank = torch.cat([image_feat, m.image_queue])
        text_bank = torch.cat([text_feat, m.text_queue])
        bank_indices = torch.cat([indices, m.idx_queue])
        alpha = 0.4 * alpha_scale
        loss = 0.0
        for feat, bank in ((image_feat, text_bank), (text_feat, image_bank)):
            for i in range(4):
                positives = (bank_indices == indices[i]).float()
                target = alpha * F.softmax(feat[i] @ bank.T / temp, 0) + (1 - alpha) * positives / positives.sum()
                loss += -(target * F.log_softmax(feat[i] @ bank.T / temp, 0)).sum() / 8
        expected_itc = loss.item()
        ids, valid, targets = m.decoder_inputs(tokens)
        logits = m.decoder_logits(m.encode_image_tokens(x), ids, valid)
        terms = [0.9 * -F.log_softmax(logits[b, t - 1], 0)[ids[b, t]] + 0.1 * -F.log_softmax(logits[b, t - 1], 0).mean()
                 for b in range(4) for t in range(4, ids.shape[1]) if valid[b, t]]
        expected_lm = torch.stack(terms).mean().item()
    out = m.forward_losses(x, tokens, alpha_scale=alpha_scale, indices=indices)
    assert set(out) == {"loss", "itc", "itm", "lm"}
    assert out["itc"].item() == pytest.approx(expected_itc, abs=1e-4)
    assert out["lm"].item() == pytest.approx(expected_lm, abs=1e-5)
    assert out["itm"].item() == pytest.approx(math.log(2), abs=0.05)  # an untrained head: ~chance
    assert out["loss"].item() == pytest.approx((out["itc"] + out["itm"] + out["lm"]).item(), abs=1e-5)
    # the step enqueued the momentum features and image ids
    assert torch.allclose(m.image_queue[:4], image_feat, atol=1e-5)
    assert torch.allclose(m.text_queue[:4], text_feat, atol=1e-5)
    assert m.idx_queue[:4].tolist() == [10, 11, 12, 10] and int(m.queue_ptr) == 4


def test_gradients_reach_every_trained_part_and_no_momentum_part():
    m = tiny_model(2)
    out = m(images(3), m.tokenize(CAPTIONS[:3]), alpha_scale=1.0)
    out["loss"].backward()
    for name, p in m.named_parameters():
        if name.endswith("_m") or "_m." in name:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_queue_wraps_around():
    m = tiny_model(3, queue_size=6)
    for step in range(2):
        m.forward_losses(images(4, step), m.tokenize(CAPTIONS), indices=torch.arange(4) + 4 * step)
    assert int(m.queue_ptr) == 2
    assert m.idx_queue.tolist() == [6, 7, 2, 3, 4, 5]


def test_temperature_is_clamped_as_blip_does():
    m = tiny_model(4)
    for value, clamped in ((10.0, MAX_LOGIT_SCALE), (0.0, MIN_LOGIT_SCALE)):
        with torch.no_grad():
            m.logit_scale.fill_(value)
        m.forward_losses(images(2), m.tokenize(CAPTIONS[:2]))
        assert m.logit_scale.item() == pytest.approx(clamped)
    assert math.exp(-MAX_LOGIT_SCALE) == pytest.approx(0.001) and math.exp(-MIN_LOGIT_SCALE) == pytest.approx(0.5)


def test_momentum_update_is_an_ema():
    m = tiny_model(5)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    pairs = [(m.visual, m.visual_m), (m.text_encoder, m.text_encoder_m), (m.text_proj, m.text_proj_m)]
    before = {id(p_m): p_m.detach().clone() for _, module_m in pairs for p_m in module_m.parameters()}
    m.momentum_update()
    checked = 0
    for online, module_m in pairs:
        params = dict(online.named_parameters())
        for name, p_m in module_m.named_parameters():
            expected = 0.995 * before[id(p_m)] + 0.005 * params[name].detach()
            assert torch.allclose(p_m, expected, atol=1e-6), name
            checked += p_m.numel()
    assert checked == sum(p.numel() for _, module_m in pairs for p in module_m.parameters()) > 0


def test_generate_api(model):
    x = images(2)
    beams = model.generate(x, num_beams=3, max_length=6, min_length=2)
    assert len(beams) == 2 and all(isinstance(c, str) and not c.startswith("a picture of") for c in beams)
    several = model.generate(x, num_beams=3, num_return=2, max_length=6)
    assert len(several) == 2 and all(len(row) == 2 for row in several)
    first = model.generate(x, method="nucleus", num_return=3, max_length=6, generator=torch.Generator().manual_seed(0))
    again = model.generate(x, method="nucleus", num_return=3, max_length=6, generator=torch.Generator().manual_seed(0))
    assert first == again and len(first[0]) == 3
    from_tokens = model.generate(image_tokens=torch.randn(3, 5, 32), max_length=6)
    assert len(from_tokens) == 3
    assert model.generate(image_tokens=model.encode_image_tokens(x), max_length=6) == model.generate(x, max_length=6)


@pytest.mark.parametrize("kwargs,match", [({}, "exactly one"), ({"image_tokens": torch.randn(1, 4, 7)}, "do not fit"),
                                          ({"image_tokens": torch.randn(1, 4, 32), "num_return": 4}, "num_return"),
                                          ({"image_tokens": torch.randn(1, 4, 32), "method": "top-k"}, "method")])
def test_generate_rejects_bad_requests(model, kwargs, match):
    with pytest.raises(DmclipError, match=match):
        model.generate(**kwargs)


def test_save_and_load_round_trip(tmp_path):
    m = tiny_model(6)
    m.forward_losses(images(4), m.tokenize(CAPTIONS), indices=torch.arange(4))  # non-trivial queues
    m.momentum_update()
    m.eval()
    save_model(m, tmp_path / "blip")
    loaded = load_saved_model(tmp_path / "blip")
    x, tokens = images(3, 9), m.tokenize(CAPTIONS[:3])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), m.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), m.encode_text(tokens))
        assert torch.equal(loaded.itm_score(x, tokens), m.itm_score(x, tokens))
    assert loaded.generate(x, max_length=8) == m.generate(x, max_length=8)
    for key, value in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.lm_head.decoder.weight is loaded.text_encoder.embeddings.word.weight  # still tied


def test_overfits_one_batch_and_captions_it():
    """The whole decoder path: a few AdamW steps on 4 pairs and the captions come back word for word."""
    m = tiny_model(0)
    x, tokens = images(4, 3), m.tokenize(CAPTIONS)
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    history = []
    for _ in range(70):
        out = m(x, tokens, alpha_scale=1.0, indices=torch.arange(4))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        m.momentum_update()
        history.append(out["lm"].item())
    assert history[0] > 2.5 and history[-1] < 0.9  # label smoothing 0.1 keeps it above ~0.6
    m.eval()
    assert m.generate(x, num_beams=1, min_length=1) == CAPTIONS
    assert m.generate(x, num_beams=3, min_length=1) == CAPTIONS


def test_kv_cached_decoding_equals_full_recomputation():
    m = tiny_model(7).eval()
    with torch.no_grad():  # large random weights: a decoder whose next token depends on the whole prefix
        for p in m.text_decoder.parameters():
            p.normal_(0, 0.5)
    x = images(3, 5)
    for kwargs in ({"method": "beam", "num_beams": 3, "num_return": 2},
                   {"method": "nucleus", "num_return": 2, "top_p": 0.95}):
        results = [m.generate(x, max_length=9, min_length=2, use_cache=use_cache,
                              generator=torch.Generator().manual_seed(0), **kwargs) for use_cache in (True, False)]
        assert results[0] == results[1], kwargs
    # step by step, with beams reordered in between, the cached logits are the full decoder's
    from dmclip.models.blip import IncrementalDecoder

    memory = m.encode_image_tokens(x[:2])
    step_fn = IncrementalDecoder(m, memory, copies=2, blocked=[])
    ids = torch.tensor([[m.dec_id, *m.prompt_ids]]).repeat(4, 1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            cached = step_fn(ids)
            full = m.decoder_logits(memory.repeat_interleave(2, dim=0), ids)[:, -1]
            assert torch.allclose(cached, full, atol=1e-4)
            rows = torch.tensor([1, 1, 2, 3])  # beams 0 and 1 of image 0 both extend beam 1
            step_fn.reorder(rows)
            ids = torch.cat([ids[rows], torch.randint(4, 20, (4, 1), generator=g)], dim=1)

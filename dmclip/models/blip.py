"""BLIP: a multimodal mixture of encoder-decoder (Li et al., 2022), at small scale.

One ViT image encoder and one BERT-style (post-norm) text transformer used in three modes:

- unimodal text encoder: self-attention only, feature at the first token -> ITC with the image [cls];
- image-grounded text encoder: + cross-attention to the image tokens, first token set to [ENC] -> ITM head;
- image-grounded text decoder: causal self-attention + cross-attention, first token [DEC] -> LM head.

Encoder and decoder share everything but the self-attention blocks (embeddings, cross-attention and
feed-forward are the same modules; the LM head is tied to the word embeddings), as BLIP's
``tie_encoder_decoder_weights(..., skip_key="/attention")`` does. A momentum (EMA) copy of the image
encoder, text encoder and projections feeds the ITC queues and soft targets (ALBEF).

The text transformer's layers are in :mod:`dmclip.models.blip_text`; the training task that drives this
model (``BlipTask``) is beside `dmclip pretrain`, in :mod:`dmclip.pretrain`.

The tokenizer is open_clip's BPE (optionally a compact vocabulary); [ENC] and [DEC] are two ids
appended after its vocabulary. The decoder reads ``[DEC] <prompt> <caption> <eot>``; the prompt's
positions are not in the LM loss, and captioning decodes what follows the prompt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.data.tokenizer import Tokenizer, bpe
from dmclip.errors import DmclipError
from dmclip.losses.blip import (
    IGNORE_INDEX,
    itc_loss,
    itc_soft_targets,
    itm_loss,
    lm_loss,
    sample_hard_negatives,
)
from dmclip.models import generate as decoding
from dmclip.models.blip_text import BlipTextTransformer, LMHead, init_bert
from dmclip.models.vit import VisionTransformer
from dmclip.registry import families

DEFAULT_PROMPT = "a picture of "
# BLIP clamps its temperature to [0.001, 0.5]; logit_scale = log(1 / temp)
MIN_LOGIT_SCALE, MAX_LOGIT_SCALE = math.log(1 / 0.5), math.log(1 / 0.001)


class IncrementalDecoder:
    """A step_fn for ``generate``: the decoder with cached self-attention keys/values (one new token a step).

    The image tokens' cross-attention keys/values are projected once per image and shared by its
    ``copies`` rows (beams or samples). ``reorder(rows)`` follows beam search's choice of parents.
    """

    def __init__(self, model: BlipModel, image_tokens: torch.Tensor, copies: int, blocked: list[int]):
        self.model, self.blocked, self.length = model, blocked, 0
        decoder = model.text_decoder
        dtype = decoder.embeddings.word.weight.dtype
        self.cross = [tuple(t.repeat_interleave(copies, dim=0) for t in
                            layer.cross_attention.project_kv(image_tokens.to(dtype))) for layer in decoder.layers]
        self.cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(decoder.layers)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        decoder, total = self.model.text_decoder, ids.shape[1]
        new = ids[:, self.length:]  # (R, T_new): all start tokens first, then one at a time
        x = decoder.embeddings(new, offset=self.length)
        mask = None
        if new.shape[1] > 1:  # causal within the new tokens, everything cached is visible
            mask = torch.ones(new.shape[1], total, dtype=torch.bool, device=ids.device).tril(self.length)
        for i, layer in enumerate(decoder.layers):
            k, v = layer.self_attention.project_kv(x)
            if self.cache[i] is not None:
                k, v = torch.cat([self.cache[i][0], k], dim=2), torch.cat([self.cache[i][1], v], dim=2)
            self.cache[i] = (k, v)
            x = layer.self_attention.attend(x, k, v, mask)
            x = layer.cross_attention.attend(x, *self.cross[i])
            x = layer.feed_forward(x)
        self.length = total
        logits = self.model.lm_head(x[:, -1]).float()  # (R, V)
        logits[:, self.blocked] = float("-inf")
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        # beam search only picks parents among the same image's beams: the cross-attention cache stays
        self.cache = [(k[rows], v[rows]) for k, v in self.cache]


def blip_tokenizer(texts, context_length: int = 32, prompt: str = DEFAULT_PROMPT) -> dict:
    """A compact tokenizer description over ``texts`` plus the captioning prompt (for ``BlipModel``)."""
    return Tokenizer.fit([*texts, prompt], context_length).to_dict()


class BlipModel(nn.Module):
    """BLIP's image encoder + text encoder/decoder with ITC, ITM and LM objectives (see module doc).

    Keeps the dmclip model contract (``encode_image``, ``encode_text``, ``tokenize``, ``logit_scale``)
    and adds ``forward_losses``, ``itm_score``, ``encode_image_tokens`` and ``generate``.
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, vision_width: int = 128, vision_depth: int = 4,
                 vision_heads: int = 4, text_width: int = 128, text_depth: int = 4, text_heads: int = 4,
                 embed_dim: int = 128, context_length: int = 32, tokenizer: dict | None = None,
                 queue_size: int = 1024, momentum: float = 0.995, alpha: float = 0.4,
                 label_smoothing: float = 0.1, prompt: str = DEFAULT_PROMPT):
        super().__init__()
        tokenizer = _with_prompt(dict(tokenizer or {"vocab": None}), context_length, prompt)
        self.arch = {"family": "blip", "image_size": image_size, "patch_size": patch_size,
                     "vision_width": vision_width, "vision_depth": vision_depth, "vision_heads": vision_heads,
                     "text_width": text_width, "text_depth": text_depth, "text_heads": text_heads,
                     "embed_dim": embed_dim, "context_length": context_length, "tokenizer": tokenizer,
                     "queue_size": queue_size, "momentum": momentum, "alpha": alpha,
                     "label_smoothing": label_smoothing, "prompt": prompt}
        self.image_size, self.context_length, self.embed_dim = image_size, context_length, embed_dim
        self.vision_width, self.text_width = vision_width, text_width
        self.queue_size, self.momentum, self.alpha = queue_size, momentum, alpha
        self.label_smoothing, self.prompt = label_smoothing, prompt
        self.tokenizer = Tokenizer.from_dict(tokenizer)
        self.enc_id = self.tokenizer.vocab_size  # [ENC]: first token of the image-grounded encoder
        self.dec_id = self.tokenizer.vocab_size + 1  # [DEC]: first token of the decoder
        vocab_size = self.tokenizer.vocab_size + 2
        self.prompt_ids = self.tokenizer.encode(prompt)[1:-1] if prompt else []
        positions = context_length + len(self.prompt_ids)  # [DEC] + prompt + caption tokens after sot

        # image encoder: the ViT's bias-free projection of its [cls] is BLIP's vision_proj
        self.visual = VisionTransformer(image_size, patch_size, vision_width, vision_depth, vision_heads, embed_dim)
        self.text_encoder = BlipTextTransformer(vocab_size, positions, text_width, text_depth, text_heads,
                                                vision_width)
        self.text_decoder = BlipTextTransformer(vocab_size, positions, text_width, text_depth, text_heads,
                                                vision_width, shared=self.text_encoder)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.lm_head = LMHead(text_width, self.text_encoder.embeddings.word)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # BLIP's temp = 0.07
        for module in (self.text_encoder, self.text_decoder, self.text_proj, self.itm_head, self.lm_head):
            module.apply(init_bert)

        # momentum encoders (text: unimodal only, so no cross-attention copy)
        self.visual_m = VisionTransformer(image_size, patch_size, vision_width, vision_depth, vision_heads,
                                          embed_dim)
        self.text_encoder_m = BlipTextTransformer(vocab_size, positions, text_width, text_depth, text_heads, None)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self._momentum_pairs = [(self.visual, self.visual_m), (self.text_encoder, self.text_encoder_m),
                                (self.text_proj, self.text_proj_m)]
        for online, momentum_module in self._momentum_pairs:
            for param, param_m in self._paired_parameters(online, momentum_module):
                param_m.data.copy_(param.data)
                param_m.requires_grad = False

        # queues of momentum features (rows, normalised) and the image index each came from (-100: none)
        self.register_buffer("image_queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
        self.register_buffer("idx_queue", torch.full((queue_size,), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # ---- the dmclip model contract
    def tokenize(self, texts) -> torch.Tensor:
        return self.tokenizer(texts)

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1 + N, vision_width): what the ITM encoder and decoder attend to."""
        return self.visual.forward_tokens(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim), unnormalised: vision_proj of the image [cls]."""
        return self.image_embedding(self.encode_image_tokens(images))

    def image_embedding(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """``encode_image`` from tokens already computed: (B, 1 + N, vision_width) -> (B, embed_dim)."""
        return self.visual.proj(image_tokens[:, 0])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, context_length) -> (B, embed_dim), unnormalised: text_proj of the first token (unimodal)."""
        tokens, valid = self._trim(tokens)
        return self.text_proj(self.text_encoder(tokens, valid)[:, 0])

    @property
    def temp(self) -> torch.Tensor:
        return torch.exp(-self.logit_scale)

    # ---- the other modes
    def itm_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Image-grounded encoder on ``[ENC] caption`` -> ITM head logits (B, 2) (class 1 = match)."""
        tokens, valid = self._trim(tokens)
        tokens = tokens.clone()
        tokens[:, 0] = self.enc_id
        return self.itm_head(self.text_encoder(tokens, valid, image_tokens)[:, 0])

    def itm_score(self, images: torch.Tensor | None, tokens: torch.Tensor,
                  image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Probability (B,) that each caption matches its image (softmax of the ITM head, class 1)."""
        image_tokens = self._image_tokens(images, image_tokens)
        return F.softmax(self.itm_logits(image_tokens, tokens).float(), dim=-1)[:, 1]

    def decoder_inputs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Captions (B, L) -> decoder ids ``[DEC] prompt caption eot pad..`` (B, L + P), valid mask, LM targets.

        Targets equal the ids except -100 over [DEC] + prompt and over padding (BLIP's decoder_targets).
        """
        tokens, valid = self._trim(tokens)
        B = tokens.shape[0]
        start = tokens.new_tensor([self.dec_id, *self.prompt_ids]).expand(B, -1)  # (B, 1 + P)
        ids = torch.cat([start, tokens[:, 1:]], dim=1)  # sot replaced by [DEC] + prompt
        valid = torch.cat([valid.new_ones(start.shape), valid[:, 1:]], dim=1)
        targets = ids.masked_fill(~valid, IGNORE_INDEX)
        targets[:, : start.shape[1]] = IGNORE_INDEX
        return ids, valid, targets

    def decoder_logits(self, image_tokens: torch.Tensor, ids: torch.Tensor,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
        """Causal decoder over ids (B, T) cross-attending to image_tokens (B, M, vision_width): (B, T, V)."""
        valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
        return self.lm_head(self.text_decoder(ids, valid, image_tokens, causal=True))

    # ---- training
    def forward(self, images: torch.Tensor, tokens: torch.Tensor, alpha_scale: float = 1.0,
                indices: torch.Tensor | None = None) -> dict:
        return self.forward_losses(images, tokens, alpha_scale, indices)

    def forward_losses(self, images: torch.Tensor, tokens: torch.Tensor, alpha_scale: float = 1.0,
                       indices: torch.Tensor | None = None) -> dict:
        """BLIP's pre-training step: ``{"loss": itc + itm + lm, "itc", "itm", "lm"}``; enqueues momentum features.

        images (B, 3, H, W) in [0, 1]; tokens from ``tokenize``; ``alpha_scale`` in [0, 1] ramps the
        distillation weight (BLIP: linearly over the first 2 epochs); ``indices`` (B,) image ids make
        every caption of the same image a positive, in the batch and in the queue (BLIP retrieval).
        Call through ``model(...)`` under DDP; call ``momentum_update()`` after each optimizer step.
        """
        with torch.no_grad():
            self.logit_scale.clamp_(MIN_LOGIT_SCALE, MAX_LOGIT_SCALE)
        temp = self.temp
        B = images.shape[0]
        tokens, valid = self._trim(tokens)

        # ---- ITC (unimodal encoders) against [momentum batch; queue]
        image_embeds = self.encode_image_tokens(images)  # (B, 1 + N, Dv)
        image_feat = F.normalize(self.visual.proj(image_embeds[:, 0]), dim=-1)  # (B, E)
        text_feat = F.normalize(self.text_proj(self.text_encoder(tokens, valid)[:, 0]), dim=-1)  # (B, E)
        with torch.no_grad():
            image_feat_m = F.normalize(self.visual_m(images), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(self.text_encoder_m(tokens, valid)[:, 0]), dim=-1)
            image_bank = torch.cat([image_feat_m, self.image_queue.clone()], dim=0)  # (B + Q, E)
            text_bank = torch.cat([text_feat_m, self.text_queue.clone()], dim=0)
            if indices is not None:
                indices = indices.view(-1).to(images.device)
                bank_indices = torch.cat([indices, self.idx_queue.clone()])
                positive = indices[:, None] == bank_indices[None, :]  # (B, B + Q)
            else:
                positive = torch.eye(B, B + self.queue_size, dtype=torch.bool, device=images.device)
            alpha = self.alpha * float(alpha_scale)
            targets_i2t = itc_soft_targets(image_feat_m @ text_bank.T / temp, positive, alpha)
            targets_t2i = itc_soft_targets(text_feat_m @ image_bank.T / temp, positive, alpha)
        itc = itc_loss(image_feat @ text_bank.T / temp, text_feat @ image_bank.T / temp, targets_i2t, targets_t2i)
        self._enqueue(image_feat_m, text_feat_m, indices)

        # ---- ITM: each pair, each text with a hard negative image, each image with a hard negative text
        with torch.no_grad():
            same = positive[:, :B]
            similarity = image_feat @ text_feat.T / temp  # (B, B) i2t
            negative_text = sample_hard_negatives(similarity, same)  # a wrong caption per image
            negative_image = sample_hard_negatives(similarity.T, same.T)  # a wrong image per caption
        enc_tokens = tokens.clone()
        enc_tokens[:, 0] = self.enc_id
        itm_tokens = torch.cat([enc_tokens, enc_tokens, enc_tokens[negative_text]])
        itm_valid = torch.cat([valid, valid, valid[negative_text]])
        itm_images = torch.cat([image_embeds, image_embeds[negative_image], image_embeds])
        itm_out = self.itm_head(self.text_encoder(itm_tokens, itm_valid, itm_images)[:, 0])  # (3B, 2)
        itm = itm_loss(itm_out[:B], itm_out[B:])

        # ---- LM: the causal decoder on [DEC] prompt caption
        ids, dec_valid, targets = self.decoder_inputs(tokens)
        lm = lm_loss(self.decoder_logits(image_embeds, ids, dec_valid), targets, self.label_smoothing)
        return {"loss": itc + itm + lm, "itc": itc, "itm": itm, "lm": lm}

    @staticmethod
    def _paired_parameters(online: nn.Module, momentum_module: nn.Module):
        params = dict(online.named_parameters())
        return [(params[name], param_m) for name, param_m in momentum_module.named_parameters()]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA of the online encoders into the momentum ones: ``p_m <- m p_m + (1 - m) p`` (ALBEF/BLIP)."""
        for online, momentum_module in self._momentum_pairs:
            for param, param_m in self._paired_parameters(online, momentum_module):
                param_m.mul_(self.momentum).add_(param.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, indices: torch.Tensor | None) -> None:
        """Write this step's momentum features (gathered over ranks) at the queue pointer, wrapping around."""
        if self.queue_size == 0:
            return
        if indices is None:
            indices = torch.full((image_feat.shape[0],), -100, dtype=torch.long, device=image_feat.device)
        image_feat, text_feat, indices = (_all_gather(t) for t in (image_feat, text_feat, indices))
        n = min(image_feat.shape[0], self.queue_size)
        rows = (self.queue_ptr + torch.arange(n, device=image_feat.device)) % self.queue_size
        self.image_queue[rows] = image_feat[-n:].to(self.image_queue.dtype)
        self.text_queue[rows] = text_feat[-n:].to(self.text_queue.dtype)
        self.idx_queue[rows] = indices[-n:]
        self.queue_ptr.fill_(int((self.queue_ptr + n) % self.queue_size))

    # ---- captioning
    @torch.no_grad()
    def generate(self, images: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None,
                 method: str = "beam", num_beams: int = 3, top_p: float = 0.9, max_length: int = 30,
                 min_length: int = 5, num_return: int = 1, generator: torch.Generator | None = None,
                 temperature: float = 1.0, use_cache: bool = True) -> list[str] | list[list[str]]:
        """Captions for images (or for given image tokens (B, M, vision_width), any M), prompt stripped.

        ``max_length``/``min_length`` count the tokens after the prompt (eot included) and are capped
        at ``context_length - 1``. ``num_return > 1`` gives a list of lists: the best beams, or
        independent samples. ``use_cache=False`` recomputes the whole prefix each step (same result).
        """
        image_tokens = self._image_tokens(images, image_tokens)
        if method not in ("beam", "nucleus"):
            raise DmclipError(f"unknown caption decoding method {method!r}", "use 'beam' or 'nucleus'")
        if num_return < 1 or (method == "beam" and num_return > num_beams):
            raise DmclipError(f"num_return={num_return} is not possible with {num_beams} beams",
                              "ask for at most num_beams captions, or use method='nucleus'")
        B = image_tokens.shape[0]
        max_length = max(1, min(max_length, self.context_length - 1))
        min_length = min(min_length, max_length)
        start = torch.tensor([self.dec_id, *self.prompt_ids], device=image_tokens.device)
        blocked = [self.tokenizer.pad_id, self.tokenizer.sot_id, self.enc_id, self.dec_id]
        if self.tokenizer.unk_id is not None:
            blocked.append(self.tokenizer.unk_id)
        copies = num_beams if method == "beam" else num_return
        if use_cache:
            step_fn = IncrementalDecoder(self, image_tokens, copies, blocked)
        else:  # the full decoder over the whole prefix at every step (the reference)
            memory = image_tokens.repeat_interleave(copies, dim=0)  # (B * copies, M, Dv)

            def step_fn(ids: torch.Tensor) -> torch.Tensor:
                logits = self.decoder_logits(memory, ids)[:, -1].float()  # (B * copies, V)
                logits[:, blocked] = float("-inf")
                return logits

        eos, pad = self.tokenizer.eot_id, self.tokenizer.pad_id
        if method == "beam":
            out, _ = decoding.beam_search(step_fn, start.expand(B, -1), num_beams, max_length, min_length,
                                          eos, pad, num_return=num_return,
                                          reorder=getattr(step_fn, "reorder", None))  # (B, R, T)
        else:
            out = decoding.nucleus_sample(step_fn, start.expand(B * num_return, -1), top_p, max_length,
                                          min_length, eos, temperature, generator, pad)
            out = out.view(B, num_return, -1)
        captions = [[self.tokenizer.decode(seq) for seq in row] for row in out]
        return [row[0] for row in captions] if num_return == 1 else captions

    # ---- helpers
    def _image_tokens(self, images, image_tokens) -> torch.Tensor:
        if (images is None) == (image_tokens is None):
            raise DmclipError("give exactly one of images or image_tokens", None)
        if image_tokens is None:
            return self.encode_image_tokens(images)
        if image_tokens.dim() != 3 or image_tokens.shape[-1] != self.vision_width:
            raise DmclipError(f"image tokens of shape {tuple(image_tokens.shape)} do not fit this model",
                              f"the decoder attends to (B, M, {self.vision_width}) tokens of its image encoder")
        return image_tokens

    def _trim(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the columns that are padding in every row; (tokens, valid) with valid = up to each eot."""
        eot = tokens == self.tokenizer.eot_id
        L = tokens.shape[1]
        ends = torch.where(eot.any(dim=1), eot.int().argmax(dim=1), L - 1)  # (B,)
        length = int(ends.max()) + 1 if tokens.shape[0] else L
        tokens = tokens[:, :length]
        valid = torch.arange(length, device=tokens.device)[None, :] <= ends[:, None]
        return tokens, valid


def _with_prompt(tokenizer: dict, context_length: int, prompt: str) -> dict:
    """The tokenizer description at the model's context length, its compact vocabulary covering the prompt."""
    tokenizer["context_length"] = context_length
    vocab = tokenizer.get("vocab")
    if vocab is not None and prompt:
        missing = set(bpe().encode(prompt)) - set(vocab)
        if missing:  # the prompt must be words the decoder can read
            tokenizer["vocab"] = sorted(set(vocab) | missing)
    return tokenizer


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a no-grad tensor over DDP ranks (BLIP's concat_all_gather); itself on one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@families.register("blip",
                   description="BLIP: ViT + BERT-style text encoder (ITC, ITM) and causal decoder (captioning)")
def _build_blip(**kw) -> BlipModel:
    return BlipModel(**kw)

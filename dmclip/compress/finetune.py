"""`dmclip compress eval --finetune-server`: the server decoder trained on tokens that went through the selector."""

from __future__ import annotations

from pathlib import Path

import torch

from dmclip.compress.config import CompressConfig, selector_from_config
from dmclip.compress.selectors import Selector, restore_payload
from dmclip.data.base import float_images
from dmclip.errors import DmclipError


class CompressedCaptionTask:
    """Train the server decoder (LM loss) on tokens that went through a selector and the wire dtype.

    The edge image tower is frozen (it runs on the device, not the server).
    """

    def __init__(self, model, selector: Selector, seed: int):
        from dmclip.train.data import caption_choice

        self.model, self.selector, self.seed, self._choice = model, selector, seed, caption_choice
        for p in model.visual.parameters():
            p.requires_grad_(False)
        for name in ("visual_m", "text_encoder_m", "text_proj_m"):
            module = getattr(model, name, None)
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(False)
        self.find_unused_parameters = True

    def collate(self, samples: list[dict]) -> dict:
        images = float_images(torch.stack([s["image"] for s in samples]))
        return {"images": images, "captions": [list(s["captions"]) for s in samples],
                "indices": torch.tensor([int(s["index"]) for s in samples])}

    def loss(self, model, batch: dict, step: int) -> dict:
        from dmclip.losses.blip import lm_loss

        core = getattr(model, "module", model)
        with torch.no_grad():
            tokens = core.encode_image_tokens(batch["images"])
            restored = restore_payload(self.selector.compress(tokens.cpu())).to(tokens.device)
        captions = [c[self._choice(len(c), self.seed, step, int(i))] for c, i in zip(batch["captions"], batch["indices"])]
        ids, valid, targets = core.decoder_inputs(core.tokenize(captions).to(restored.device))
        loss = lm_loss(core.decoder_logits(restored, ids, valid), targets, getattr(core, "label_smoothing", 0.1))
        return {"loss": loss, "lm": loss.detach()}


def finetune_server(model, cfg: CompressConfig, run, dataset=None, selector: str | None = None) -> dict:
    """Fine-tune the decoder on tokens of ``selector`` (default: the config's; ``"none"``: all tokens, the
    equal-steps control); saves the model into ``<run>/model``."""
    from dmclip.models.base import save_model
    from dmclip.train import TrainConfig, fit

    if not hasattr(model, "decoder_logits"):
        raise DmclipError("--finetune-server needs a BLIP model (decoder_logits / decoder_inputs)",
                          "pass --model run:<a BLIP pretrain run>")
    if dataset is None:
        from dmclip.data import build_dataset

        dataset = build_dataset(cfg.finetune.dataset, image_size=model.image_size)
    task = CompressedCaptionTask(model, selector_from_config(cfg, selector), cfg.seed)
    train_cfg = TrainConfig(steps=cfg.finetune.steps, batch_size=cfg.finetune.batch_size, lr=cfg.finetune.lr,
                            warmup_steps=min(20, cfg.finetune.steps // 5), progress=False, device="cpu",
                            checkpoint_every=0, log_every=max(1, cfg.finetune.steps // 10))
    summary = fit(task, dataset, train_cfg, run, seed=cfg.seed)
    model.eval()
    save_model(model, Path(run.path) / "model")
    return summary

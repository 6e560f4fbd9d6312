"""The training tasks two commands share, for the engine (:func:`dmclip.train.fit`): CLIP's InfoNCE (pretrain)
and BLIP's ITC + ITM + LM (pretrain, and capfilt's fine-tuning), with the caption choice and batch layout
distill uses too."""

from __future__ import annotations

import torch

from dmclip.errors import DmclipError


def pick_caption(captions: list[str], seed: int, step: int, index: int) -> str:
    """A caption of the image, chosen deterministically from (seed, step, index): resumable."""
    from dmclip.train.data import caption_choice

    return captions[caption_choice(len(captions), seed, step, index)]


def image_caption_batch(samples: list[dict]) -> dict:
    """Dataset samples -> {"images" float [0, 1], "captions" (all of each image's), "index"}."""
    from dmclip.data import image_batch

    return {"images": image_batch(samples), "captions": [s["captions"] for s in samples],
            "index": [int(s["index"]) for s in samples]}


class ClipTask:
    """InfoNCE on (image, one caption) pairs; the engine calls collate/loss."""

    def __init__(self, model, seed: int):
        from dmclip.losses.clip import ClipLoss

        self.model = model
        self.seed = seed
        self.criterion = ClipLoss()

    def collate(self, samples: list[dict]) -> dict:
        return image_caption_batch(samples)

    def loss(self, model, batch: dict, step: int) -> dict:
        captions = [pick_caption(c, self.seed, step, i) for c, i in zip(batch["captions"], batch["index"])]
        tokens = self.model.tokenize(captions).to(batch["images"].device)
        return self.criterion(model(batch["images"], tokens))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class BlipTask:
    """BLIP pre-training of a :class:`dmclip.models.blip.BlipModel` for the training engine: collate,
    loss(model, batch, step), on_step_end(step)."""

    def __init__(self, model, seed: int, steps_per_epoch: int, ramp_epochs: float = 2.0):
        self.model = model
        self.seed = int(seed)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.ramp_epochs = ramp_epochs

    def collate(self, samples: list[dict]) -> dict:
        """samples {"image": uint8 (3, S, S), "captions": [str], "index": int} -> a batch."""
        for sample in samples:
            if not sample["captions"]:
                raise DmclipError(f"sample {sample['index']} has no caption", "drop it from the dataset")
        from dmclip.data import image_batch

        return {"images": image_batch(samples), "captions": [list(s["captions"]) for s in samples],
                "indices": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)}

    def alpha_scale(self, step: int) -> float:
        """BLIP: alpha * min(1, step / (2 epochs of steps))."""
        return min(1.0, step / (self.ramp_epochs * self.steps_per_epoch)) if self.ramp_epochs > 0 else 1.0

    def captions_at(self, batch: dict, step: int) -> list[str]:
        from dmclip.train.data import caption_choice

        return [captions[caption_choice(len(captions), self.seed, step, int(index))]
                for captions, index in zip(batch["captions"], batch["indices"])]

    def loss(self, model, batch: dict, step: int) -> dict:
        tokens = self.model.tokenize(self.captions_at(batch, step))
        device = batch["images"].device
        return model(batch["images"], tokens.to(device), alpha_scale=self.alpha_scale(step),
                     indices=batch["indices"].to(device))

    def on_step_end(self, step: int) -> None:
        self.model.momentum_update()

    def state_dict(self) -> dict:
        return {}  # the queues and momentum encoders are buffers/parameters of the model

    def load_state_dict(self, state: dict) -> None:
        pass

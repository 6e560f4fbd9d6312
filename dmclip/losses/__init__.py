"""Losses: CLIP InfoNCE, KD, feature mimicry, BLIP's ITC/ITM/LM. Importing registers them."""

from dmclip.losses import blip, clip  # noqa: F401

"""Losses: CLIP InfoNCE, KD, feature mimicry, BLIP's ITC/ITM/LM. Importing registers them."""

import importlib
import importlib.util

from dmclip.losses import clip  # noqa: F401

if importlib.util.find_spec("dmclip.losses.blip") is not None:
    importlib.import_module("dmclip.losses.blip")

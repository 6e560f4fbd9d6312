"""Losses: CLIP InfoNCE, KD, feature mimicry, CLIP-KD's FD and ICL, BLIP's ITC/ITM/LM.

Importing registers the objective distill's ``loss.name`` selects (``dmclip list losses``: ``distill``, which
weighs the other terms by ``loss.*``). Pretrain's CLIP loss and BLIP's three are fixed by their objective: their
models and tasks call them directly.
"""

from dmclip.losses import blip, clip  # noqa: F401

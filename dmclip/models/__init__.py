"""Models: image towers (ViT, Vision-Mamba), text towers, CLIP, BLIP, open_clip wrappers.

Importing the package registers the model families and the registered students.
"""

from dmclip.models import base, blip, clip, mamba, openclip, scan, text, vit  # noqa: F401

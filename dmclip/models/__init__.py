"""Models: image towers (ViT, Vision-Mamba), text towers, CLIP, BLIP, open_clip wrappers.

Importing the package registers the model families, the students and the teacher reference schemes.
"""

from dmclip.models import base, blip, clip, mamba, openclip, refs, scan, teachers, text, vit  # noqa: F401

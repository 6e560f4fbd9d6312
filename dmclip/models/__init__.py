"""Models: image towers (ViT, Vision-Mamba), text towers, CLIP, BLIP, open_clip wrappers.

Importing the package registers the model families and the registered students/teachers.
"""

import importlib
import importlib.util

from dmclip.models import base, clip, openclip, text, vit  # noqa: F401

# Modules written alongside (each registers itself when present).
for _name in ("scan", "mamba", "blip", "teachers"):
    if importlib.util.find_spec(f"dmclip.models.{_name}") is not None:
        importlib.import_module(f"dmclip.models.{_name}")

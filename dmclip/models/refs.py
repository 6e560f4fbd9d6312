"""One place that turns a model reference string into a model.

A reference is ``<scheme>:<rest>``, and every scheme is an entry of the ``references`` registry
(``dmclip list references``), so a plugin adds one the way it adds a student:

    run:<run dir>                       a model trained by dmclip (pretrain / distill)
    builtin:<name>                      a small model shipped with the package, with the recipe and run
                                        record that made it (``builtin_names()`` lists them)
    open_clip:<arch>:<checkpoint file>  an open_clip architecture with local weights; also
    open_clip:local-dir:<dir>           a hub-layout directory, open_clip:hf-hub:<org>/<repo>,
                                        open_clip:<arch>:<pretrained tag>, open_clip:<arch>:random
                                        (see dmclip.models.openclip)
    store:<reinforced store dir>        a teacher's cached outputs (`dmclip reinforce`; distill only; see
                                        dmclip.models.teachers; ``embeddings:`` is its old name)
    ensemble:<ref>+<ref>...             several CLIP teachers as one (distill only; see dmclip.models.teachers)

Besides schemes: a registered student name (random init) or a path to a run or model directory.

A scheme's factory takes the text after ``<scheme>:`` and returns an ``nn.Module``. A module that can only
serve as a distillation teacher (cached outputs, an ensemble) says so with a ``distill_only`` attribute
(what it is, e.g. "a cache of teacher outputs"): :func:`load_model_ref` refuses it, ``load_teacher`` takes it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from dmclip.errors import DmclipError, did_you_mean
from dmclip.registry import references, students

BUILTIN_ROOT = Path(__file__).resolve().parent.parent / "builtin"
RENAMED_SCHEMES = {"embeddings": "store"}  # old scheme -> new, still read (with a one-line warning)
log = logging.getLogger(__name__)


def builtin_names() -> list[str]:
    """The models shipped in the package (each a directory with model.json and its run record)."""
    if not BUILTIN_ROOT.is_dir():
        return []
    return sorted(p.parent.name for p in BUILTIN_ROOT.glob("*/model.json"))


def builtin_dir(name: str) -> Path:
    """The directory of the shipped model ``name`` (model.json, model.safetensors, run.json, results.json,
    the recipe that made it)."""
    path = BUILTIN_ROOT / name
    if not (path / "model.json").is_file():
        raise DmclipError(f"no built-in model {name!r}",
                          f"built-in models: {', '.join(builtin_names()) or 'none'} ({did_you_mean(name, builtin_names())})")
    return path


def run_model_dir(path: str | Path) -> Path:
    """The directory holding model.json for a run directory (or a model directory itself)."""
    path = Path(path)
    if (path / "model.json").is_file():
        return path
    if (path / "model" / "model.json").is_file():
        return path / "model"
    if not path.exists():
        raise DmclipError(f"run directory {str(path)!r} does not exist",
                          "`dmclip runs list` shows the runs; pass one as run:<directory>")
    status = ""
    if (path / "run.json").is_file():
        import json

        status = json.loads((path / "run.json").read_text()).get("status", "")
    raise DmclipError(f"{path} holds no trained model yet" + (f" (run status: {status})" if status else ""),
                      "use a completed pretrain or distill run, or --resume this one to finish it")


# ------------------------------------------------------------------------------------------ schemes


@references.register("run", description="run:<run dir> — a model trained by dmclip (pretrain or distill)")
def run_model(rest: str) -> nn.Module:
    from dmclip.models.base import load_saved_model

    return load_saved_model(run_model_dir(rest))


@references.register("builtin", description="builtin:<name> — a small model shipped with dmclip, with the recipe and "
                                          "run record that made it (e.g. builtin:world-vit)")
def builtin_model(rest: str) -> nn.Module:
    from dmclip.models.base import load_saved_model

    return load_saved_model(builtin_dir(rest))


@references.register("open_clip", description="open_clip:<arch>:<checkpoint file | pretrained tag | random>, "
                                            "open_clip:local-dir:<dir> or open_clip:hf-hub:<org>/<repo>")
def open_clip_model(rest: str) -> nn.Module:
    from dmclip.models.openclip import PREFIX, load_open_clip

    return load_open_clip(PREFIX + rest)


# ------------------------------------------------------------------------------------------ lookup


def build_ref(ref: str) -> nn.Module:
    """The module ``ref`` names (see the module docstring), distill-only ones included; not yet in eval mode."""
    from dmclip.models.base import load_saved_model

    if not isinstance(ref, str) or not ref.strip():
        raise DmclipError("empty model reference",
                          "pass e.g. --model run:runs/pretrain/<run> or open_clip:ViT-B-32:/path/model.bin")
    ref = ref.strip()
    scheme, colon, rest = ref.partition(":")
    if colon and scheme in RENAMED_SCHEMES:
        log.warning("%s: the scheme %s: is now %s:", ref, scheme, RENAMED_SCHEMES[scheme])
        scheme = RENAMED_SCHEMES[scheme]
    if colon and scheme in references:
        return references.entry(scheme).factory(rest)
    if ref in students:
        return students.get(ref)
    if Path(ref).exists():
        return load_saved_model(run_model_dir(ref))
    if colon:
        raise DmclipError(f"no model {ref!r}: {scheme!r} is not a reference scheme",
                          f"{did_you_mean(scheme, references.names())} (`dmclip list references` shows the schemes)")
    raise DmclipError(f"no model {ref!r}",
                      "use run:<run dir>, open_clip:<arch>:<weights>, or a registered name "
                      f"({did_you_mean(ref, students.names())})")


def load_model_ref(ref: str) -> nn.Module:
    """Build or load the model named by ``ref`` (see the module docstring), in eval mode."""
    model = build_ref(ref)
    what = getattr(model, "distill_only", None)
    if what:
        scheme = ref.strip().partition(":")[0]
        raise DmclipError(f"{ref.strip()!r} is {what}, not a model",
                          f"use it only as `dmclip distill --teacher {scheme}:...`")
    model.eval()
    return model

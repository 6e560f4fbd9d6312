"""One place that turns a model reference string into a model.

    run:<run dir>                       a model trained by dmclip (pretrain / distill)
    builtin:<name>                      a small model shipped with the package, with the recipe and run
                                        record that made it (``builtin_names()`` lists them)
    open_clip:<arch>:<checkpoint file>  an open_clip architecture with local weights; also
    open_clip:local-dir:<dir>           a hub-layout directory, open_clip:hf-hub:<org>/<repo>,
                                        open_clip:<arch>:<pretrained tag>, open_clip:<arch>:random
                                        (see dmclip.models.openclip)
    <registered name>                   a teacher or student from the registries (random init)
    embeddings:<store dir>              cached teacher outputs (distill only; see dmclip.distill)
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dmclip.errors import DmclipError, did_you_mean

PREFIXES = ("run:", "builtin:", "open_clip:", "embeddings:")
BUILTIN_ROOT = Path(__file__).resolve().parent.parent / "builtin"


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


def load_model_ref(ref: str) -> nn.Module:
    """Build or load the model named by ``ref`` (see the module docstring), in eval mode."""
    from dmclip.models.base import load_saved_model
    from dmclip.registry import students, teachers

    if not isinstance(ref, str) or not ref.strip():
        raise DmclipError("empty model reference",
                          "pass e.g. --model run:runs/pretrain/<run> or open_clip:ViT-B-32:/path/model.bin")
    ref = ref.strip()
    if ref.startswith("run:"):
        model = load_saved_model(run_model_dir(ref[4:]))
    elif ref.startswith("builtin:"):
        model = load_saved_model(builtin_dir(ref[len("builtin:"):]))
    elif ref.startswith("open_clip:"):
        from dmclip.models.openclip import load_open_clip

        model = load_open_clip(ref)
    elif ref.startswith("embeddings:"):
        raise DmclipError(f"{ref!r} is a cache of teacher outputs, not a model",
                          "use it only as `dmclip distill --teacher embeddings:<dir>`")
    elif ref in teachers:
        model = teachers.get(ref)
    elif ref in students:
        model = students.get(ref)
    elif Path(ref).exists():
        model = load_saved_model(run_model_dir(ref))
    else:
        names = [*teachers.names(), *students.names()]
        raise DmclipError(f"no model {ref!r}",
                          "use run:<run dir>, open_clip:<arch>:<weights>, or a registered name "
                          f"({did_you_mean(ref, names)})")
    model.eval()
    return model

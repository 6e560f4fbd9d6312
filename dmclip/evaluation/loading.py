"""What every eval task starts from: a model and a dataset from their references, the checks that a model can
do the task, prompt files, and the CLIP_benchmark result every task returns."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dmclip.device import resolve_device
from dmclip.errors import DmclipError

TASK_ZERO_SHOT = "zeroshot_classification"
TASK_RETRIEVAL = "zeroshot_retrieval"
TASK_CAPTION = "captioning"
TASK_LATENCY = "latency"
TASK_SUITE = "suite"


def load_model(ref: str, device: str | torch.device | None = None) -> nn.Module:
    """A model from a reference string (``run:``, ``open_clip:``, a registered name), in eval mode."""
    from dmclip.models.refs import load_model_ref

    model = load_model_ref(ref)
    if device is not None:
        model = model.to(resolve_device(device))
    return model.eval()


def load_dataset(spec, image_size: int):
    """A dataset object from a spec string (a dataset object passes through)."""
    if not isinstance(spec, str):
        return spec
    try:
        from dmclip.data import build_dataset
    except ImportError:
        raise DmclipError("the dataset module (dmclip.data.build_dataset) is not available in this install",
                          "reinstall dmclip (`make install`)") from None
    return build_dataset(spec, image_size=image_size)


def dataset_name(dataset) -> str:
    if isinstance(dataset, str):
        return dataset
    return str(getattr(dataset, "spec", None) or getattr(dataset, "name", None) or type(dataset).__name__)


def describe_ref(ref: str) -> tuple[str, str]:
    """A model reference -> CLIP_benchmark's (model, pretrained) pair."""
    if ref.startswith("open_clip:") and not ref.startswith(("open_clip:local-dir:", "open_clip:hf-hub:")):
        parts = ref.split(":", 2)  # open_clip:<arch>:<tag or file> -> (arch, tag), as CLIP_benchmark names them
        return parts[1], (parts[2] if len(parts) > 2 else "")
    return ref, ""


def task_result(task: str, dataset, metrics: dict, model_name: str = "", notes: Sequence[str] = (),
                **details) -> dict:
    """One task's result in CLIP_benchmark's layout (so their ``build`` step can merge ours)."""
    model, pretrained = describe_ref(model_name)
    return {"dataset": dataset_name(dataset), "model": model, "pretrained": pretrained, "task": task,
            "metrics": metrics, "language": "en", "notes": list(notes), "details": details}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex) of the architecture and every weight: the model part of a cache key."""
    digest = hashlib.sha256(json.dumps(getattr(model, "arch", type(model).__name__), sort_keys=True,
                                       default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_eval_model(model: nn.Module, task: str, rerank_k: int = 0) -> None:
    """Raise a one-line error when ``model`` cannot do ``task`` (zero-shot, retrieval, caption)."""
    if task in ("zero-shot", "retrieval"):
        _require(model, "encode_text", "zero-shot classification" if task == "zero-shot" else "retrieval")
    if task == "retrieval" and rerank_k and not callable(getattr(model, "itm_score", None)):
        raise DmclipError("--rerank-k needs a model with an image-text matching head (itm_score)",
                          "use a BLIP model (pretrain --model blip), or drop --rerank-k")
    if task == "caption" and not callable(getattr(model, "generate", None)):
        raise DmclipError("this model cannot write captions (it has no generate())",
                          "caption evaluation needs a captioner: a BLIP model (dmclip pretrain --model blip)")


def _require(model: nn.Module, what: str, task: str) -> None:
    if getattr(model, what, None) is None:
        raise DmclipError(f"{task} needs a model with {what}(), and this one has none",
                          "pass a full image-text model (a pretrain run, a distill run with its text tower, "
                          "or open_clip:<arch>)")


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty, non-comment lines of a text file (class names, templates)."""
    path = Path(path)
    if not path.is_file():
        raise DmclipError(f"{what} file {str(path)!r} does not exist", f"pass a text file with one {what[:-1]} per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise DmclipError(f"{what} file {str(path)!r} is empty", f"write one {what[:-1]} per line")
    return lines


def fill_template(template: str, classname: str) -> str:
    """'a photo of a {}.' (or CLIP_benchmark's '{c}') with the class name put in."""
    return template.replace("{c}", classname).replace("{}", classname)


def check_templates(templates: Sequence[str]) -> list[str]:
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if bad:
        raise DmclipError(f"template {bad[0]!r} has no '{{}}' placeholder for the class name",
                          "write templates like 'a photo of a {}.'")
    return list(templates)

"""What both export formats share: the towers as modules, their check inputs, the check against PyTorch, the
description of inputs and outputs written beside each file, and the exporters' errors as one line."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from dmclip.errors import DmclipError

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # max abs difference allowed between the exported file's and PyTorch's embeddings
DYNAMIC_CHECK_BATCHES = (1, 4)  # a dynamic batch axis is checked at two sizes with the one file
TRACE_BATCH = 2  # torch.export specialises a dimension of size 1: trace a free batch axis at 2
CHECK_SEED = 0
CHECK_CAPTIONS = ("a photo of a small red circle on the left", "two blue squares", "a large green triangle",
                  "a yellow star at the bottom right")
INPUT_NAMES = {"image": "images", "text": "tokens"}


# -------------------------------------------------------------------------------------- the towers and the check


class ImageTower(nn.Module):
    """images (B, 3, H, W) float in [0, 1] -> embeddings (B, embed_dim), unnormalised (normalisation inside)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encode = getattr(self.model, "encode_image", None)
        return encode(images) if callable(encode) else self.model(images)


class TextTower(nn.Module):
    """tokens (B, context_length) int64 from the model's tokenizer -> embeddings (B, embed_dim), unnormalised."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def tower_module(model: nn.Module, tower: str) -> nn.Module:
    """``tower`` of ``model`` as a module of one tensor, in eval mode (what the exporters trace)."""
    return (ImageTower(model) if tower == "image" else TextTower(model)).eval()


def check_towers(model: nn.Module, towers: Sequence[str]) -> None:
    """A one-line error when ``model`` lacks a tower asked for (before anything is traced or written)."""
    if "image" in towers and not callable(getattr(model, "encode_image", None)) and not hasattr(model, "image_size"):
        raise DmclipError("this model has no image tower to export", "export --tower text, or use a CLIP model")
    if "text" in towers and not callable(getattr(model, "encode_text", None)):
        raise DmclipError("this model has no text tower (a bare image encoder)",
                          "export --tower image, or a CLIP model (a distill run keeps its teacher's text tower)")


def normalisation(model: nn.Module) -> dict | None:
    """The image mean/std the model applies inside its image tower (so inside the exported graph), if it has one."""
    for module in model.modules():
        mean, std = getattr(module, "mean", None), getattr(module, "std", None)
        if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor) and mean.numel() == std.numel() == 3:
            return {"mean": [round(float(v), 8) for v in mean.flatten()],
                    "std": [round(float(v), 8) for v in std.flatten()]}
    return None


def example_inputs(model: nn.Module, tower: str, batch: int) -> torch.Tensor:
    """The deterministic input of the check: seeded uniform images in [0, 1], or fixed captions tokenized."""
    if tower == "image":
        size = int(model.image_size)
        generator = torch.Generator().manual_seed(CHECK_SEED)
        return torch.rand(batch, 3, size, size, generator=generator)
    captions = [CHECK_CAPTIONS[i % len(CHECK_CAPTIONS)] for i in range(batch)]
    return model.tokenize(captions)


def describe_io(model: nn.Module, tower: str, batch: int | None) -> dict:
    """The JSON's ``input``, ``normalisation``, ``output``, ``embed_dim`` and ``batch`` for ``tower``."""
    axis = "batch" if batch is None else batch
    embed_dim = int(getattr(model, "embed_dim", 0) or 0)
    if tower == "image":
        inputs = {"name": INPUT_NAMES[tower], "shape": [axis, 3, int(model.image_size), int(model.image_size)],
                  "dtype": "float32", "layout": "NCHW, RGB, values in [0, 1]"}
        norm = {**(normalisation(model) or {}), "applied": "inside the graph: feed [0, 1] RGB, do not normalise again"}
    else:
        inputs, norm = {**_text_input(model), "shape": [axis, int(model.context_length)]}, None
    return {"input": inputs, "normalisation": norm,
            "output": {"name": "embeddings", "shape": [axis, embed_dim], "dtype": "float32", "normalised": False,
                       "note": "L2-normalise before cosine similarity"},
            "embed_dim": embed_dim, "batch": "dynamic" if batch is None else batch}


def _text_input(model: nn.Module) -> dict:
    tokenizer = getattr(model, "tokenizer", None)
    described = {"name": INPUT_NAMES["text"], "shape": ["batch", int(model.context_length)], "dtype": "int64"}
    if hasattr(tokenizer, "to_dict"):  # dmclip's tokenizer: open_clip's BPE, optionally over a compact vocabulary
        described["tokenizer"] = {"kind": "open_clip SimpleTokenizer (BPE); ids remapped to 'vocab' when given: "
                                          "pad 0, sot 1, eot 2, unk 3, then vocab[i] -> i + 4",
                                  **tokenizer.to_dict(), "pad_id": tokenizer.pad_id, "sot_id": tokenizer.sot_id,
                                  "eot_id": tokenizer.eot_id}
    return described


def check_against_pytorch(run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, tower: str,
                          batches: Sequence[int], tolerance: float, label: str, hint: str) -> dict:
    """Run the exported file (``run``: input -> embeddings) and ``model``'s ``tower`` on the check input at each
    batch size; the JSON's ``check`` (max abs difference, per batch), or a DmclipError naming the worst batch when
    it is above ``tolerance`` (``label`` names the file's format in it, ``hint`` says what to try)."""
    module = tower_module(model, tower)
    differences = {}
    for batch in batches:
        inputs = example_inputs(model, tower, batch)
        with torch.no_grad():
            expected = module(inputs).float()
            got = run(inputs)
        if got.shape != expected.shape:
            raise DmclipError(f"the {label} file returns {tuple(got.shape)} where PyTorch returns "
                              f"{tuple(expected.shape)}", "export a fixed batch with --batch N")
        differences[batch] = float((got - expected).abs().max())
    worst = max(differences.values())
    if not worst <= tolerance:  # NaN fails too
        raise DmclipError(f"the {label} {tower} tower differs from PyTorch by {worst:.3g} (max abs, batch "
                          f"{max(differences, key=differences.get)}), more than {tolerance:g}; nothing was written",
                          hint)
    return {"max_abs_diff": worst, "per_batch": {str(b): d for b, d in differences.items()}, "tolerance": tolerance,
            "input": "torch.rand seeded 0" if tower == "image" else "fixed captions, tokenized"}


@contextlib.contextmanager
def exporter_errors(exporter: str, batch: int | None) -> Iterator[None]:
    """Turn an exporter's failure into one line naming its first line, and keep its warnings in the debug log."""
    quiet = logging.getLogger("torch.utils.flop_counter")  # imported while tracing; warns that triton is missing
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except DmclipError:
            raise
        except Exception as exc:  # the exporters' errors are long reports: the first line names the step
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            hint = "run with DMCLIP_DEBUG=1 for the exporter's report" + (
                "; a fixed --batch N avoids a dynamic batch axis" if batch is None else "")
            raise DmclipError(f"{exporter} failed ({type(exc).__name__}: {first})", hint) from exc
        finally:
            quiet.setLevel(level)
    for warning in caught:
        log.debug("exporter: %s", warning.message)


def check_batches(batch: int | None) -> tuple[int, ...]:
    """The batch sizes the check runs: 1 and 4 for a dynamic batch axis (one file), else the fixed size."""
    return DYNAMIC_CHECK_BATCHES if batch is None else (batch,)


def dynamic_batch(input_name: str, batch: int | None) -> dict | None:
    """torch.export's ``dynamic_shapes``: the batch axis free when ``batch`` is None, else everything fixed."""
    return {input_name: {0: torch.export.Dim("batch", min=1)}} if batch is None else None
